//! The recording client of a drill: clients that write (deposits, each
//! with its own idempotency key) through the gateway and retry a write
//! with the same key on timeouts, 5xx, 421 and connection errors, as a
//! real client does — and record every write's outcome, so the drill can
//! prove afterwards that no acknowledged write was lost or applied twice
//! ([`verify`]). Same seed, same writes (users, amounts, keys).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

/// What to run.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The gateway's proxy address (loopback).
    pub gateway: SocketAddr,
    /// Concurrent clients.
    pub clients: usize,
    /// How long clients start new writes.
    pub duration: Duration,
    /// Distinct users written to (`chaos-user-N`).
    pub users: usize,
    /// Seed of users, amounts and keys.
    pub seed: u64,
    /// Most writes in all (the run is bounded in count and time).
    pub max_writes: u64,
    /// How long one write is retried (same key) before it is given up.
    pub retry_for: Duration,
}

/// One write and what became of it.
#[derive(Debug, Clone, Serialize)]
pub struct Write {
    /// The client that made it.
    pub client: usize,
    /// The user credited.
    pub user: String,
    /// Its idempotency key (kept across retries).
    pub key: String,
    /// Minor units.
    pub amount: i64,
    /// When it was first sent, ms since the run began.
    pub sent_ms: u64,
    /// When it was acknowledged (200), ms since the run began.
    pub acked_ms: Option<u64>,
    /// Attempts made.
    pub attempts: u32,
    /// The last status seen (`None`: no answer).
    pub last_status: Option<u16>,
    /// The cell that acknowledged it (its `x-cell` header).
    pub cell: Option<String>,
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

/// One attempt: the status and the serving cell, or `None` (no answer).
async fn attempt(
    client: &Client<HttpConnector, Full<Bytes>>,
    gw: SocketAddr,
    w: &Write,
) -> Option<(u16, Option<String>)> {
    let body = serde_json::json!({"amount": w.amount, "idempotency_key": w.key}).to_string();
    let req = http::Request::post(format!("http://{gw}/v1/accounts/{}/deposit", w.user))
        .header("x-user-id", &w.user)
        .header("content-type", "application/json")
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
    let _ = tokio::time::timeout(Duration::from_secs(2), resp.into_body().collect()).await;
    Some((status, cell))
}

/// Runs the workload; every write it started, in the order they started
/// per client.
pub async fn run(w: &Workload) -> Vec<Write> {
    let start = Instant::now();
    let per_client = w.max_writes.div_ceil(w.clients.max(1) as u64);
    let mut tasks = Vec::new();
    for c in 0..w.clients {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            let client: Client<HttpConnector, Full<Bytes>> =
                Client::builder(TokioExecutor::new()).build_http();
            let mut rng = Rng(w.seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(c as u64 + 1)) | 1);
            let mut out = Vec::new();
            for i in 0..per_client {
                if start.elapsed() >= w.duration {
                    break;
                }
                let mut write = Write {
                    client: c,
                    user: format!("chaos-user-{}", rng.next() % w.users.max(1) as u64),
                    key: format!("chaos-{}-{c}-{i}", w.seed),
                    amount: 1 + (rng.next() % 1000) as i64,
                    sent_ms: start.elapsed().as_millis() as u64,
                    acked_ms: None,
                    attempts: 0,
                    last_status: None,
                    cell: None,
                };
                let give_up = Instant::now() + w.retry_for;
                loop {
                    write.attempts += 1;
                    let got = attempt(&client, w.gateway, &write).await;
                    write.last_status = got.as_ref().map(|g| g.0);
                    match got {
                        Some((200, cell)) => {
                            write.acked_ms = Some(start.elapsed().as_millis() as u64);
                            write.cell = cell;
                            break;
                        }
                        // Not retryable: a refusal of the request itself.
                        Some((s, _))
                            if (400..500).contains(&s) && s != 408 && s != 421 && s != 429 =>
                        {
                            break
                        }
                        _ if Instant::now() >= give_up => break,
                        _ => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
                out.push(write);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(w) = t.await {
            all.extend(w);
        }
    }
    all
}

/// What the files say about the recorded writes.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RpoReport {
    /// Writes made.
    pub writes: usize,
    /// Writes acknowledged.
    pub acked: usize,
    /// Acknowledged writes found in no primary copy (RPO broken).
    pub lost: Vec<String>,
    /// Writes applied more than once (counted over the primary copies).
    pub doubled: Vec<String>,
    /// Writes never acknowledged but applied (allowed: the client gave up
    /// after the cell had applied it).
    pub applied_unacked: usize,
}

impl RpoReport {
    /// True when nothing acknowledged was lost and nothing was doubled.
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.doubled.is_empty()
    }
}

/// Checks `writes` against the ledgers of the current primary copies under
/// `dir` (see [`crate::offline::check_dir`] for which copies those are):
/// every acknowledged write is there exactly once, none is there twice.
pub fn verify(dir: &Path, writes: &[Write]) -> Result<RpoReport, crate::offline::CannotCheck> {
    let offline = crate::offline::check_dir(dir)?;
    let mut applied: HashMap<String, i64> = HashMap::new();
    for copy in offline.copies.iter().filter(|c| c.role == "primary") {
        let conn = rusqlite::Connection::open_with_flags(
            &copy.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .map_err(|e| crate::offline::CannotCheck(format!("{}: {e}", copy.path.display())))?;
        let mut s = conn
            .prepare("SELECT ref, COUNT(*) FROM ledger WHERE ref LIKE 'chaos-%' GROUP BY ref")
            .map_err(|e| crate::offline::CannotCheck(format!("{}: {e}", copy.path.display())))?;
        let rows = s
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| crate::offline::CannotCheck(format!("{}: {e}", copy.path.display())))?;
        for (key, n) in rows {
            *applied.entry(key).or_default() += n;
        }
    }
    let mut r = RpoReport {
        writes: writes.len(),
        ..Default::default()
    };
    for w in writes {
        let n = applied.get(&w.key).copied().unwrap_or(0);
        if w.acked_ms.is_some() {
            r.acked += 1;
            if n == 0 {
                r.lost.push(w.key.clone());
            }
        } else if n > 0 {
            r.applied_unacked += 1;
        }
        if n > 1 {
            r.doubled.push(w.key.clone());
        }
    }
    Ok(r)
}
