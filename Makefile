# Targets shared by developers and CI (.ci/run calls `make test`).
CARGO ?= cargo

.PHONY: test deps lint unit bench fuzz vectors

## test: install what a fresh machine lacks, then lint and run every test.
test: deps lint unit

deps:
	./scripts/install-deps.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit:
	$(CARGO) test --workspace --locked

## bench: criterion benches of the rule engine (figures: docs/benchmarks.md).
bench:
	$(CARGO) bench -p routing-rules --bench route

## fuzz: fuzz the rules parser and key extraction for FUZZ_SECONDS each.
FUZZ_SECONDS ?= 60
fuzz:
	./scripts/fuzz.sh $(FUZZ_SECONDS)

## vectors: print the hash test vectors of docs/hash.md.
vectors:
	$(CARGO) run -q -p routing-rules --example vectors
