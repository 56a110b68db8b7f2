# Targets shared by developers and CI (.ci/run calls `make test`).
CARGO ?= cargo

.PHONY: test deps lint unit e2e demo bench fuzz vectors install

## test: install what a fresh machine lacks, then lint, run every test, and
## run the demo's end-to-end smoke workload.
test: deps lint unit e2e

deps:
	./scripts/install-deps.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features --locked -- -D warnings
	@# Boundaries (docs/architecture.md): the gateway links neither the cell
	@# agent nor SQLite; the rule engine's core has no I/O.
	@! $(CARGO) tree --locked -p gateway -e normal | grep -E 'cell-agent|rusqlite' \
		|| { echo "lint: the gateway depends on the cell agent or SQLite"; exit 1; }
	@! $(CARGO) tree --locked -p routing-rules --no-default-features -e normal | grep -E 'tokio|etcd-client' \
		|| { echo "lint: routing-rules' core depends on an I/O crate"; exit 1; }

unit:
	$(CARGO) test --workspace --all-features --locked

## e2e: the whole system (gateway + 3 cells x 2 colours) with a checked workload.
e2e:
	$(CARGO) run -q --locked -p cellgate --bin cellgate -- demo --smoke

## demo: run the demo until Ctrl-C.
demo:
	$(CARGO) run -q --release -p cellgate --bin cellgate -- demo

## install: put cellgate, cell-agent and cellctl on PATH (~/.cargo/bin, or
## PREFIX/bin with PREFIX=DIR). One build of each, etcd support included; no
## system protoc needed (scripts/protoc runs the vendored one).
PREFIX ?=
install:
	$(CARGO) install --locked --path cellgate $(if $(PREFIX),--root $(PREFIX))
	$(CARGO) install --locked --path cell-agent $(if $(PREFIX),--root $(PREFIX))
	$(CARGO) install --locked --path routing-rules $(if $(PREFIX),--root $(PREFIX))

## bench: criterion benches of the rule engine (figures: docs/benchmarks.md).
bench:
	$(CARGO) bench -p routing-rules --bench route

## fuzz: fuzz the rules parser, key extraction and the HTTP/1.1 codec for FUZZ_SECONDS each.
FUZZ_SECONDS ?= 60
fuzz:
	./scripts/fuzz.sh $(FUZZ_SECONDS)

## vectors: print the hash test vectors of docs/hash.md.
vectors:
	$(CARGO) run -q -p routing-rules --example vectors
