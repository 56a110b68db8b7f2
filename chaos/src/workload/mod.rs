//! The recording client of a drill: clients that write (deposits, each
//! with its own idempotency key) and read balances through the gateway,
//! retry an operation with the same key on timeouts, 5xx, 421 and
//! connection errors, as a real client does — and record every attempt and
//! every operation's outcome, so the drill can prove afterwards that no
//! acknowledged write was lost, applied twice or applied out of order
//! ([`verify`]). Same seed, same operations (users, kinds, amounts, keys).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;

use crate::http::HttpClient;

/// What to run.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The gateways' proxy addresses (at least one): client *c* starts on
    /// gateway *c* mod n and moves to the next one when its gateway does
    /// not answer, staying there (as a client behind a load balancer or
    /// DNS does).
    pub gateways: Vec<SocketAddr>,
    /// Concurrent clients.
    pub clients: usize,
    /// How long clients start new operations.
    pub duration: Duration,
    /// Distinct users written to (`chaos-user-N`).
    pub users: usize,
    /// Seed of users, operations, amounts and keys.
    pub seed: u64,
    /// Most operations in all (the run is bounded in count and time).
    pub max_writes: u64,
    /// How long one operation is retried (same key) before it is given up.
    pub retry_for: Duration,
    /// Operations started per second over all clients (0: each client
    /// starts its next one as soon as the last ended).
    pub rate: u32,
    /// Weights of deposits, balance reads, transfers, payments and TCC
    /// orders.
    pub mix: [u32; 5],
    /// Set to stop early (clients stop starting operations and retrying).
    pub stop: Arc<AtomicBool>,
    /// Attempts so far, for a watcher of the error rate.
    pub live: Arc<Live>,
}

/// Attempts so far: answered 2xx, and not.
#[derive(Debug, Default)]
pub struct Live {
    /// 2xx (and 404 reads).
    pub ok: AtomicU64,
    /// Everything else.
    pub failed: AtomicU64,
}

impl Workload {
    /// Deposits only, unpaced.
    pub fn deposits(
        gateway: SocketAddr,
        clients: usize,
        duration: Duration,
        users: usize,
        seed: u64,
    ) -> Workload {
        Workload {
            gateways: vec![gateway],
            clients,
            duration,
            users,
            seed,
            max_writes: 100_000,
            retry_for: Duration::from_secs(10),
            rate: 0,
            mix: [1, 0, 0, 0, 0],
            stop: Arc::default(),
            live: Arc::default(),
        }
    }
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpKind {
    /// `POST /v1/accounts/USER/deposit` with its own idempotency key.
    Deposit,
    /// `GET /v1/accounts/USER` (200, or 404 before the first deposit).
    Read,
    /// `POST /v1/transfers` to another user (same cell or another).
    Transfer,
    /// `POST /v1/orders`, then `POST /v1/orders/ID/pay` (try + confirm).
    Payment,
    /// `POST /v1/orders`, then `POST /v1/orders/ID/try` (the amount
    /// frozen), then `.../confirm` (paid) or, one in four, `.../cancel`
    /// (unfrozen): the try/confirm/cancel of a TCC transaction.
    Tcc,
}

/// The merchant of the workload's payments.
pub const MERCHANT: &str = "chaos-shop";

/// One operation and what became of it.
#[derive(Debug, Clone, Serialize)]
pub struct Write {
    /// What it is.
    pub kind: OpKind,
    /// The client that made it.
    pub client: usize,
    /// Its number among the client's operations (from 0).
    pub seq: u64,
    /// The user (the payer of a transfer or payment).
    pub user: String,
    /// The payee of a transfer.
    pub to: Option<String>,
    /// The transfer's or the order's id, once the cell gave one.
    pub id: Option<String>,
    /// A TCC order: cancelled after its try instead of confirmed.
    pub cancel: bool,
    /// A TCC order: its try was acknowledged (next: confirm or cancel).
    pub tried: bool,
    /// Refused for good (4xx other than 408/421/429, e.g. insufficient
    /// funds): not retried, not a failure of the system.
    pub refused: bool,
    /// Its idempotency key (kept across retries; empty for reads).
    pub key: String,
    /// Minor units (0 for reads).
    pub amount: i64,
    /// When it was due: the paced schedule's time for it (a client held up
    /// by a slow operation sends its next ones late; their wait counts, so
    /// a stall is not hidden by the client's own back-pressure), ms since
    /// the run began. Unpaced: when it was sent.
    pub due_ms: u64,
    /// When it was first sent, ms since the run began.
    pub sent_ms: u64,
    /// When it was acknowledged, ms since the run began.
    pub acked_ms: Option<u64>,
    /// Attempts made.
    pub attempts: u32,
    /// The last status seen (`None`: no answer).
    pub last_status: Option<u16>,
    /// The cell that acknowledged it (its `x-cell` header).
    pub cell: Option<String>,
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Outcome {
    /// 2xx (and 404 on a read: the user has no account yet).
    #[serde(rename = "2xx")]
    Ok,
    /// Any other 4xx but 421.
    #[serde(rename = "4xx")]
    Client,
    /// 421: the cell said the user is not its (shard moving, stale rules).
    #[serde(rename = "421")]
    Misdirected,
    /// 5xx.
    #[serde(rename = "5xx")]
    Server,
    /// No answer: timeout, reset, refused.
    #[serde(rename = "timeout")]
    Timeout,
}

impl Outcome {
    /// Every outcome, in report order.
    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::Client,
        Outcome::Misdirected,
        Outcome::Server,
        Outcome::Timeout,
    ];

    /// Its label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "2xx",
            Outcome::Client => "4xx",
            Outcome::Misdirected => "421",
            Outcome::Server => "5xx",
            Outcome::Timeout => "timeout",
        }
    }
}

/// One attempt (every try of every operation).
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    /// When it ended, ms since the run began.
    pub at_ms: u64,
    /// How long it took, ms.
    pub latency_ms: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// The operation's client and number ([`Write::client`],
    /// [`Write::seq`]).
    pub client: usize,
    /// See [`Attempt::client`].
    pub seq: u64,
    /// The request (`deposit`, `read`, `transfer`, `create-order`, `pay`,
    /// `try`, `confirm`, `cancel`).
    pub request: &'static str,
    /// The gateway it went to (index into [`Workload::gateways`]).
    pub gateway: usize,
    /// The status (`None`: no answer).
    pub status: Option<u16>,
    /// The cell that answered (its `x-cell` header).
    pub cell: Option<String>,
}

/// The request an attempt of `w` makes now (a payment's order is created,
/// then paid; a TCC order created, tried, then confirmed or cancelled).
fn request_name(w: &Write) -> &'static str {
    match (w.kind, &w.id) {
        (OpKind::Deposit, _) => "deposit",
        (OpKind::Read, _) => "read",
        (OpKind::Transfer, _) => "transfer",
        (OpKind::Payment | OpKind::Tcc, None) => "create-order",
        (OpKind::Payment, Some(_)) => "pay",
        (OpKind::Tcc, Some(_)) => match (w.tried, w.cancel) {
            (false, _) => "try",
            (true, false) => "confirm",
            (true, true) => "cancel",
        },
    }
}

impl Recording {
    /// Writes the run as evidence: `operations.jsonl` (one line per
    /// operation: user, kind, key, amount, when due, sent and
    /// acknowledged, attempts, last status, serving cell) and
    /// `requests.jsonl` (one line per attempt: when, how long, which
    /// operation, user, request, key, gateway, status, serving cell,
    /// outcome).
    pub fn write_jsonl(&self, dir: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut ops = std::io::BufWriter::new(std::fs::File::create(dir.join("operations.jsonl"))?);
        let mut by_id = std::collections::HashMap::new();
        for o in &self.ops {
            serde_json::to_writer(&mut ops, o)?;
            ops.write_all(b"\n")?;
            by_id.insert((o.client, o.seq), o);
        }
        ops.flush()?;
        let mut reqs = std::io::BufWriter::new(std::fs::File::create(dir.join("requests.jsonl"))?);
        for a in &self.attempts {
            let op = by_id.get(&(a.client, a.seq));
            let line = serde_json::json!({
                "at_ms": a.at_ms,
                "latency_ms": a.latency_ms,
                "client": a.client,
                "seq": a.seq,
                "user": op.map(|o| o.user.as_str()),
                "op": op.map(|o| o.kind),
                "request": a.request,
                "key": op.map(|o| o.key.as_str()),
                "gateway": a.gateway,
                "status": a.status,
                "cell": a.cell,
                "outcome": a.outcome,
            });
            serde_json::to_writer(&mut reqs, &line)?;
            reqs.write_all(b"\n")?;
        }
        reqs.flush()
    }
}

/// Everything a run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recording {
    /// Every operation started, in the order they were due.
    pub ops: Vec<Write>,
    /// Every attempt, per client in time order.
    pub attempts: Vec<Attempt>,
}

/// xorshift64*: replayable without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// What one attempt got: status, serving cell, body.
type Answer = (u16, Option<String>, Bytes);

/// One attempt of `w`'s next request (a payment's order is created first,
/// then paid): its answer, or `None` (no answer).
async fn attempt(client: &HttpClient, gw: SocketAddr, w: &Write) -> Option<Answer> {
    let post = |path: String| {
        http::Request::post(format!("http://{gw}{path}")).header("content-type", "application/json")
    };
    let (builder, body) = match (w.kind, &w.id) {
        (OpKind::Deposit, _) => (
            post(format!("/v1/accounts/{}/deposit", w.user)),
            serde_json::json!({"amount": w.amount, "idempotency_key": w.key}).to_string(),
        ),
        (OpKind::Read, _) => (
            http::Request::get(format!("http://{gw}/v1/accounts/{}", w.user)),
            String::new(),
        ),
        (OpKind::Transfer, _) => (
            post("/v1/transfers".into()),
            serde_json::json!({"from": w.user, "to": w.to, "amount": w.amount, "idempotency_key": w.key}).to_string(),
        ),
        (OpKind::Payment | OpKind::Tcc, None) => (
            post("/v1/orders".into()),
            serde_json::json!({"user": w.user, "amount": w.amount, "merchant": MERCHANT, "idempotency_key": w.key}).to_string(),
        ),
        (OpKind::Payment, Some(id)) => (post(format!("/v1/orders/{id}/pay")), String::new()),
        (OpKind::Tcc, Some(id)) => {
            let action = match (w.tried, w.cancel) {
                (false, _) => "try",
                (true, false) => "confirm",
                (true, true) => "cancel",
            };
            (post(format!("/v1/orders/{id}/{action}")), String::new())
        }
    };
    let req = builder
        .header("x-user-id", &w.user)
        .body(Full::new(Bytes::from(body)))
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(2), client.request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let cell = resp
        .headers()
        .get("x-cell")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = tokio::time::timeout(Duration::from_secs(2), resp.into_body().collect())
        .await
        .ok()?
        .ok()?
        .to_bytes();
    Some((status, cell, body))
}

fn classify(kind: OpKind, status: Option<u16>) -> Outcome {
    match status {
        None => Outcome::Timeout,
        Some(404) if kind == OpKind::Read => Outcome::Ok,
        Some(s) if (200..300).contains(&s) => Outcome::Ok,
        Some(421) => Outcome::Misdirected,
        Some(s) if (400..500).contains(&s) => Outcome::Client,
        Some(_) => Outcome::Server,
    }
}

/// The operations of one client, from the seed: the same seed gives the
/// same users, kinds, amounts and keys in the same order.
pub struct OpGen {
    rng: Rng,
    seed: u64,
    client: usize,
    users: u64,
    mix: [u32; 5],
    next: u64,
}

impl OpGen {
    /// Client `client`'s operations under `w`'s seed, users and mix.
    pub fn new(w: &Workload, client: usize) -> OpGen {
        OpGen {
            rng: Rng(w.seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(client as u64 + 1)) | 1),
            seed: w.seed,
            client,
            users: w.users.max(1) as u64,
            mix: w.mix,
            next: 0,
        }
    }

    /// The next operation (not sent yet: times, attempts and outcome empty).
    pub fn next_op(&mut self) -> Write {
        let i = self.next;
        self.next += 1;
        let user = format!("chaos-user-{}", self.rng.next() % self.users);
        let amount = 1 + (self.rng.next() % 1000) as i64;
        let [d, r, t, p, c] = self.mix.map(u64::from);
        let pick = self.rng.next() % (d + r + t + p + c).max(1);
        let kind = if pick < d {
            OpKind::Deposit
        } else if pick < d + r {
            OpKind::Read
        } else if pick < d + r + t {
            OpKind::Transfer
        } else if pick < d + r + t + p {
            OpKind::Payment
        } else {
            OpKind::Tcc
        };
        let cancel = kind == OpKind::Tcc && self.rng.next() % 4 == 0;
        let to = (kind == OpKind::Transfer).then(|| {
            let n = self.rng.next() % self.users;
            let payee = format!("chaos-user-{n}");
            if payee == user {
                format!("chaos-user-{}", (n + 1) % self.users.max(2))
            } else {
                payee
            }
        });
        Write {
            kind,
            client: self.client,
            seq: i,
            user,
            to,
            id: None,
            cancel,
            tried: false,
            refused: false,
            key: match kind {
                OpKind::Read => String::new(),
                _ => format!("chaos-{}-{}-{i}", self.seed, self.client),
            },
            amount: match kind {
                OpKind::Deposit => amount,
                OpKind::Read => 0,
                // Smaller than deposits: most have the funds.
                OpKind::Transfer | OpKind::Payment | OpKind::Tcc => 1 + amount % 50,
            },
            due_ms: 0,
            sent_ms: 0,
            acked_ms: None,
            attempts: 0,
            last_status: None,
            cell: None,
        }
    }
}

/// Most operations of one paced client in flight at once (beyond it, the
/// next ones wait: they are sent late, and their lateness counts).
const IN_FLIGHT_PER_CLIENT: usize = 256;

/// Sends `op` until it is acknowledged, refused, or given up; records
/// every attempt.
async fn perform(
    client: HttpClient,
    w: Arc<Workload>,
    mut op: Write,
    (start, preferred): (Instant, Arc<AtomicUsize>),
) -> (Write, Vec<Attempt>) {
    let mut attempts = Vec::new();
    op.sent_ms = start.elapsed().as_millis() as u64;
    let give_up = Instant::now() + w.retry_for;
    loop {
        op.attempts += 1;
        let began = Instant::now();
        let gateway = preferred.load(Ordering::Relaxed) % w.gateways.len();
        let request = request_name(&op);
        let got = attempt(&client, w.gateways[gateway], &op).await;
        if got.is_none() {
            // No answer at all (refused, reset, timed out): this client's
            // next attempts go to the next gateway (unless another of its
            // operations moved it already).
            let next = (gateway + 1) % w.gateways.len();
            let _ = preferred.compare_exchange(gateway, next, Ordering::Relaxed, Ordering::Relaxed);
        }
        op.last_status = got.as_ref().map(|g| g.0);
        let outcome = classify(op.kind, op.last_status);
        match outcome {
            Outcome::Ok => &w.live.ok,
            _ => &w.live.failed,
        }
        .fetch_add(1, Ordering::Relaxed);
        attempts.push(Attempt {
            at_ms: start.elapsed().as_millis() as u64,
            latency_ms: began.elapsed().as_millis() as u64,
            outcome,
            client: op.client,
            seq: op.seq,
            request,
            gateway,
            status: op.last_status,
            cell: got.as_ref().and_then(|g| g.1.clone()),
        });
        match (outcome, got) {
            (Outcome::Ok, Some((_, cell, body))) => {
                let id = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["id"].as_str().map(str::to_string));
                if matches!(op.kind, OpKind::Payment | OpKind::Tcc) && op.id.is_none() {
                    // The order exists: pay it, or try it (same retries,
                    // same deadline).
                    op.id = id;
                    if op.id.is_none() {
                        break;
                    }
                    continue;
                }
                if op.kind == OpKind::Tcc && !op.tried {
                    // Frozen: confirm or cancel it.
                    op.tried = true;
                    continue;
                }
                if op.kind == OpKind::Transfer {
                    op.id = id;
                }
                op.acked_ms = Some(start.elapsed().as_millis() as u64);
                op.cell = cell;
                break;
            }
            // Not retryable: a refusal of the request itself.
            (Outcome::Client, Some((s, ..))) if s != 408 && s != 429 => {
                op.refused = true;
                break;
            }
            _ if Instant::now() >= give_up || w.stop.load(Ordering::Relaxed) => break,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    (op, attempts)
}

/// One client's run. Paced (`rate` > 0): open loop — each operation is
/// sent at its due time whatever became of the earlier ones (up to
/// [`IN_FLIGHT_PER_CLIENT`] at once), so a stalled cell does not slow
/// down the load on the others. Unpaced: one operation after another.
async fn client_run(w: Arc<Workload>, c: usize, start: Instant) -> (Vec<Write>, Vec<Attempt>) {
    let client = crate::http::client();
    let mut ops_gen = OpGen::new(&w, c);
    let per_client = w.max_writes.div_ceil(w.clients.max(1) as u64);
    let interval = (w.rate > 0).then(|| Duration::from_secs_f64(w.clients as f64 / w.rate as f64));
    let (mut ops, mut attempts) = (Vec::new(), Vec::new());
    let preferred = Arc::new(AtomicUsize::new(c % w.gateways.len().max(1)));
    let mut in_flight = tokio::task::JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT_PER_CLIENT));
    for i in 0..per_client {
        let mut op = ops_gen.next_op();
        match interval {
            Some(iv) => {
                let due = start + iv.mul_f64(i as f64 + c as f64 / w.clients as f64);
                tokio::time::sleep_until(due.into()).await;
                op.due_ms = due.saturating_duration_since(start).as_millis() as u64;
            }
            None => op.due_ms = start.elapsed().as_millis() as u64,
        }
        if start.elapsed() >= w.duration || w.stop.load(Ordering::Relaxed) {
            break;
        }
        if interval.is_some() {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
            };
            let (client, w, preferred) = (client.clone(), w.clone(), preferred.clone());
            in_flight.spawn(async move {
                let done = perform(client, w, op, (start, preferred)).await;
                drop(permit);
                done
            });
        } else {
            let (op, a) = perform(client.clone(), w.clone(), op, (start, preferred.clone())).await;
            ops.push(op);
            attempts.extend(a);
        }
    }
    while let Some(done) = in_flight.join_next().await {
        if let Ok((op, a)) = done {
            ops.push(op);
            attempts.extend(a);
        }
    }
    (ops, attempts)
}

/// Runs the workload: every operation it started and every attempt.
pub async fn run(w: &Workload) -> Recording {
    run_from(w, Instant::now()).await
}

/// [`run`], with times counted from `start` (shared with a fault
/// timeline).
pub async fn run_from(w: &Workload, start: Instant) -> Recording {
    let shared = Arc::new(w.clone());
    let tasks: Vec<_> = (0..w.clients)
        .map(|c| tokio::spawn(client_run(shared.clone(), c, start)))
        .collect();
    let mut all = Recording::default();
    for t in tasks {
        if let Ok((ops, attempts)) = t.await {
            all.ops.extend(ops);
            all.attempts.extend(attempts);
        }
    }
    all.ops.sort_by_key(|o| (o.due_ms, o.client));
    all.attempts.sort_by_key(|a| a.at_ms);
    all
}

mod api_check;
mod verify;
pub use api_check::{check_through_api, ApiCheck};
pub use verify::{verify, verify_copies, RpoReport};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_operations() {
        let w = |seed| Workload {
            mix: [3, 1, 0, 0, 0],
            ..Workload::deposits(
                "127.0.0.1:1".parse().unwrap(),
                4,
                Duration::from_secs(1),
                50,
                seed,
            )
        };
        let ops = |seed, client| {
            let mut g = OpGen::new(&w(seed), client);
            (0..200)
                .map(|_| {
                    let o = g.next_op();
                    (o.kind, o.user, o.amount, o.key)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(ops(7, 1), ops(7, 1));
        assert_ne!(ops(7, 1), ops(8, 1));
        assert_ne!(ops(7, 1), ops(7, 2));
        let reads = ops(7, 1).iter().filter(|o| o.0 == OpKind::Read).count();
        assert!(
            (20..90).contains(&reads),
            "{reads} reads of 200 at a 3:1 mix"
        );
    }
}
