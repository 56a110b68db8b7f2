//! SQLite store: WAL, `synchronous = FULL` (every commit is fsynced before
//! any client is answered), migrations embedded, group commit.
//!
//! One writer thread per process takes every pending write, runs each in its
//! own savepoint inside one `BEGIN IMMEDIATE` transaction, commits once, and
//! only then answers. A failed write rolls back to its savepoint and leaves
//! no trace. Several processes (blue and green) may open the same file:
//! SQLite's write lock serialises their transactions. Reads use a small pool
//! of read-only connections (WAL readers never block the writer).

pub mod journal;
mod ledger;
pub mod prune;
mod read;
pub mod replica;
mod reseed;
mod schema;
pub mod shard;
pub mod slots;
mod write;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection};
use tokio::sync::oneshot;

pub use schema::{meta_ms, migrate, recorded_cell};

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// SQLite refused (unreadable file, not a database, locked, ...).
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file belongs to another cell.
    #[error("the database belongs to cell {recorded:?}, not {asked:?} (check --cell and --db)")]
    WrongCell {
        /// The cell recorded in the file.
        recorded: String,
        /// The cell it was opened as.
        asked: String,
    },
    /// The writer thread could not start.
    #[error("cannot start the writer thread: {0}")]
    Thread(std::io::Error),
}

use super::*;

/// Most writes committed in one transaction.
pub const MAX_BATCH: usize = 256;

/// Bounds of the write path: how many writes may wait, and how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterLimits {
    /// Writes that may wait for the writer; one more is refused at once
    /// (503 `overloaded`, retryable) instead of queueing without bound.
    pub queue: usize,
    /// A write that has waited this long without starting is dropped
    /// unapplied (503 `write_expired`): its client has given up or is about
    /// to, and a retry with the same idempotency key must get one effect.
    pub deadline: Duration,
}

impl Default for WriterLimits {
    fn default() -> Self {
        WriterLimits {
            queue: 1024,
            deadline: Duration::from_secs(10),
        }
    }
}

/// Unix time in ms.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn storage(e: rusqlite::Error) -> DomainError {
    DomainError::unavailable(format!("database error: {e}"))
}

/// Statements kept prepared per connection.
const STATEMENT_CACHE: usize = 256;

/// Opens a connection with the store's pragmas.
pub fn open(path: &Path, read_only: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // Every statement of the write path, the reads and a replica's apply
    // (one per table and column set) stays prepared: rusqlite keeps 16 by
    // default, fewer than the writer alone uses, and a statement pushed out
    // is parsed and planned again on its next use.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Savepoints' and statements' undo journals stay in memory: by
    // default they spill to a temporary file past 64 KiB, which a batch of
    // a few hundred writes (one savepoint each) does, costing a file open,
    // writes and a close per batch on the writer's critical path.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    if read_only {
        conn.pragma_update(None, "query_only", "ON")?;
    }
    Ok(conn)
}

/// The answer to one write, held until it may be sent.
pub type HeldReply = (
    oneshot::Sender<Result<Reply, DomainError>>,
    Result<Reply, DomainError>,
);

/// A committed batch handed to the shard's shipper, with the answers of
/// its writes: the shipper sends them once the standby has applied the
/// batch (or once the shard went on degraded).
#[derive(Debug)]
pub struct Ship {
    /// The batch's LSN.
    pub lsn: i64,
    /// When it committed.
    pub committed: Instant,
    /// Its rows as the journal holds them, and the timeline it is on (read
    /// back in its own transaction, so the shipper need not read the
    /// journal for it); `None` when they could not be.
    pub written: Option<journal::Written>,
    /// Its writes' answers, held.
    pub replies: Vec<HeldReply>,
}

/// Synchronous replication as the writer sees it: every committed batch
/// goes to the shipper with its writes' answers, which are sent only once
/// the standby acknowledged it (the writer meanwhile commits the next
/// batch). While `degraded` (the standby did not answer within the sync
/// timeout), answers go out at once and batches are shipped as the
/// standby can take them.
#[derive(Debug)]
pub struct SyncLink {
    /// To the shipper.
    pub ship: tokio::sync::mpsc::UnboundedSender<Ship>,
    /// True while the shard runs without a synchronous standby.
    pub degraded: Arc<AtomicBool>,
}

impl SyncLink {
    /// Hands batch `lsn` and its answers to the shipper.
    fn hand_over(&self, lsn: i64, written: Option<journal::Written>, mut replies: Vec<HeldReply>) {
        let now_ok = self.degraded.load(Ordering::Acquire);
        if now_ok {
            send_replies(std::mem::take(&mut replies));
        }
        let ship = Ship {
            lsn,
            committed: Instant::now(),
            written,
            replies,
        };
        if let Err(e) = self.ship.send(ship) {
            // The shipper has stopped (the agent is stopping or was
            // killed): the standby may never get the batch, so nothing in
            // it is acknowledged.
            for (tx, _) in e.0.replies {
                let _ = tx.send(Err(DomainError::unavailable(
                    "the write could not be replicated to the standby (the agent is stopping): it was NOT acknowledged; retry with the same key",
                )));
            }
        }
    }
}

/// Sends held answers.
pub fn send_replies(replies: Vec<HeldReply>) {
    for (tx, r) in replies {
        let _ = tx.send(r);
    }
}

/// A queued write: the operation, when it must have started by, and where
/// its answer goes.
struct Job {
    op: WriteOp,
    deadline: Instant,
    reply: oneshot::Sender<Result<Reply, DomainError>>,
}

/// The SQLite store of one cell.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    cell: String,
    writer: std_mpsc::SyncSender<Job>,
    limits: WriterLimits,
    readers: Mutex<Vec<Connection>>,
    sync: Arc<std::sync::OnceLock<SyncLink>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("cell", &self.inner.cell)
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating and migrating) the database of `cell` at `path` and
    /// starts the writer thread.
    pub fn open(path: &Path, cell: &str) -> Result<Self, OpenError> {
        Self::open_with(path, cell, WriterLimits::default())
    }

    /// [`Self::open`] with explicit bounds on the write path.
    pub fn open_with(path: &Path, cell: &str, limits: WriterLimits) -> Result<Self, OpenError> {
        Self::open_gated(path, cell, limits, Arc::new(AtomicBool::new(true)))
    }

    /// [`Self::open_with`] whose writer refuses every write (503 `fenced`)
    /// while `writes_allowed` is false: the self-fence is checked by the
    /// writer itself, right before a write runs, not only when it is queued.
    pub fn open_gated(
        path: &Path,
        cell: &str,
        limits: WriterLimits,
        writes_allowed: Arc<AtomicBool>,
    ) -> Result<Self, OpenError> {
        let mut conn = open(path, false)?;
        migrate(&mut conn)?;
        {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            journal::refresh_triggers(&tx)?;
            tx.commit()?;
        }
        schema::claim_cell(&conn, cell)?;
        let (tx, rx) = std_mpsc::sync_channel::<Job>(limits.queue.max(1));
        let cell_name = cell.to_string();
        let sync: Arc<std::sync::OnceLock<SyncLink>> = Arc::default();
        let writer_sync = sync.clone();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, cell_name, writes_allowed, writer_sync))
            .map_err(OpenError::Thread)?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                cell: cell.to_string(),
                writer: tx,
                limits,
                readers: Mutex::new(Vec::new()),
                sync,
            }),
        })
    }

    /// Turns on synchronous replication (once): from now on every batch
    /// waits for the standby's acknowledgement through `link`.
    pub fn replicate(&self, link: SyncLink) -> bool {
        self.inner.sync.set(link).is_ok()
    }

    /// Journal batches after `after` (at most `limit`), for the shipper.
    pub async fn journal_after(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<(journal::Timeline, Vec<journal::Batch>), DomainError> {
        self.with_reader(move |c| {
            // One read transaction: the batches and the timeline they are on.
            c.execute_batch("BEGIN").map_err(storage)?;
            let r = journal::timeline(c)
                .and_then(|t| Ok((t, journal::batches_after(c, after, limit)?)));
            let _ = c.execute_batch("COMMIT");
            r.map_err(storage)
        })
        .await
    }

    /// This copy's role (a replica takes no writes and ships nothing).
    pub async fn role(&self) -> Result<shard::Role, DomainError> {
        self.with_reader(|c| shard::role(c).map_err(storage)).await
    }

    /// Whether a flag of this copy is set (see [`shard::STANDBY_LOST`]).
    pub async fn flag(&self, key: &'static str) -> Result<bool, DomainError> {
        self.with_reader(move |c| shard::flag(c, key).map_err(storage))
            .await
    }

    /// Clears a flag of this copy.
    pub async fn clear_flag(&self, key: &'static str) -> Result<(), DomainError> {
        let path = self.inner.path.clone();
        tokio::task::spawn_blocking(move || shard::set_flag(&path, key, false))
            .await
            .map_err(|e| DomainError::unavailable(format!("task failed: {e}")))?
    }

    /// The newest committed batch's LSN.
    pub async fn last_lsn(&self) -> Result<i64, DomainError> {
        self.with_reader(|c| meta_ms(c, "lsn").map_err(storage))
            .await
    }

    async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, DomainError> + Send + 'static,
    ) -> Result<T, DomainError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = inner.readers.lock().ok().and_then(|mut v| v.pop());
            let conn = match conn {
                Some(c) => c,
                None => open(&inner.path, true).map_err(storage)?,
            };
            let out = f(&conn);
            if let Ok(mut v) = inner.readers.lock() {
                if v.len() < 8 {
                    v.push(conn);
                }
            }
            out
        })
        .await
        .map_err(|e| DomainError::unavailable(format!("reader task failed: {e}")))?
    }
}

fn writer_loop(
    mut conn: Connection,
    rx: std_mpsc::Receiver<Job>,
    cell: String,
    writes_allowed: Arc<AtomicBool>,
    sync: Arc<std::sync::OnceLock<SyncLink>>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut next = Some(first);
        while let Some(job) = next.take() {
            let now = Instant::now();
            if job.reply.is_closed() {
                // Nobody waits for the answer (the client went away): a
                // retry with the same key will apply it.
            } else if !writes_allowed.load(Ordering::Acquire)
                && !matches!(job.op, WriteOp::ClaimSlots { .. })
            {
                let _ = job.reply.send(Err(DomainError::new(
                    503,
                    "fenced",
                    "this instance lost its control-plane lease before the write ran; it was not applied (retry)",
                )));
            } else if now > job.deadline {
                let _ = job.reply.send(Err(DomainError::new(
                    503,
                    "write_expired",
                    "the cell was too busy to start this write before its deadline; it was not applied (retry with the same idempotency key)",
                )));
            } else {
                batch.push(job);
            }
            if batch.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if batch.is_empty() {
            continue;
        }
        let link = sync.get();
        let (results, lsn, written) = run_batch(&mut conn, &batch, &cell, link.is_some());
        let replies: Vec<HeldReply> = batch.into_iter().map(|j| j.reply).zip(results).collect();
        // RPO 0: nobody is answered before the standby has the batch.
        match (lsn, link) {
            (Some(lsn), Some(link)) => link.hand_over(lsn, written, replies),
            _ => send_replies(replies),
        }
    }
}

/// Runs a batch in one transaction: each write's result, and the batch's
/// LSN when it committed.
fn run_batch(conn: &mut Connection, batch: &[Job], cell: &str, read_back: bool) -> BatchResults {
    let conn: &Connection = conn;
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let err = storage(e);
        return (batch.iter().map(|_| Err(err.clone())).collect(), None, None);
    }
    match run_ops(conn, batch, cell, read_back)
        .and_then(|r| conn.execute_batch("COMMIT").map(|()| r))
    {
        Ok(r) => r,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            let err = storage(e);
            (batch.iter().map(|_| Err(err.clone())).collect(), None, None)
        }
    }
}

/// The batch's writes, each in its own savepoint, and its journal entry
/// (inside the caller's transaction). `Err` rolls the whole batch back.
/// No LSN when nothing could be written (this copy is a replica). With
/// `read_back`, the batch's journal rows too (for the shipper).
type BatchResults = (
    Vec<Result<Reply, DomainError>>,
    Option<i64>,
    Option<journal::Written>,
);

fn run_ops(
    conn: &Connection,
    batch: &[Job],
    cell: &str,
    read_back: bool,
) -> rusqlite::Result<BatchResults> {
    if shard::role(conn)? == shard::Role::Replica {
        // Checked in the batch's own transaction: the other colour may
        // have demoted the file since this process last wrote.
        let results = batch
            .iter()
            .map(|j| match &j.op {
                WriteOp::Demote { ranges } => shard::demoted(conn, ranges),
                _ => Err(shard::refused(cell)),
            })
            .collect();
        return Ok((results, None, None));
    }
    let first_row = journal::start_batch(conn)?;
    let lsn = slots::next_lsn(conn)?;
    let mut results = Vec::with_capacity(batch.len());
    for Job { op, .. } in batch {
        conn.execute_batch("SAVEPOINT op")?;
        let r = write::apply(conn, op, cell, lsn);
        conn.execute_batch(if r.is_ok() {
            "RELEASE op"
        } else {
            "ROLLBACK TO op; RELEASE op"
        })?;
        results.push(r);
    }
    journal::finish_batch(conn, lsn, first_row)?;
    let written = if read_back {
        Some(journal::written_batch(conn, lsn, first_row)?)
    } else {
        None
    };
    Ok((results, Some(lsn), written))
}

impl Store for SqliteStore {
    async fn write(&self, op: WriteOp) -> Result<Reply, DomainError> {
        let (tx, rx) = oneshot::channel();
        let job = Job {
            op,
            deadline: Instant::now() + self.inner.limits.deadline,
            reply: tx,
        };
        match self.inner.writer.try_send(job) {
            Ok(()) => {}
            Err(std_mpsc::TrySendError::Full(_)) => {
                return Err(DomainError::new(
                    503,
                    "overloaded",
                    format!(
                        "the cell's write queue is full ({} writes waiting); nothing was applied, retry later",
                        self.inner.limits.queue
                    ),
                ))
            }
            Err(std_mpsc::TrySendError::Disconnected(_)) => {
                return Err(DomainError::unavailable("the database writer has stopped"))
            }
        }
        rx.await
            .map_err(|_| DomainError::unavailable("the database writer has stopped"))?
    }

    async fn read(&self, op: ReadOp) -> Result<Reply, DomainError> {
        self.with_reader(move |c| read::read_op(c, &op)).await
    }

    async fn due_outbox(&self, now_ms: i64, limit: u32) -> Result<Vec<OutboxItem>, DomainError> {
        self.with_reader(move |c| {
            let mut s = c
                .prepare_cached(
                    "SELECT o.id, o.transfer_id, t.from_user, o.to_user, o.to_cell, o.amount, o.attempts, o.created_ms
                     FROM outbox o JOIN transfers t ON t.id = o.transfer_id
                     WHERE o.delivered_ms IS NULL AND o.failed_ms IS NULL AND o.next_attempt_ms <= ?1
                       -- a replica's outbox is its primary's to deliver
                       AND NOT EXISTS (SELECT 1 FROM local WHERE key = 'role' AND value = 'replica')
                     ORDER BY o.id LIMIT ?2",
                )
                .map_err(storage)?;
            s.query_map(params![now_ms, limit], |r| {
                Ok(OutboxItem {
                    id: r.get(0)?,
                    transfer_id: r.get(1)?,
                    from: r.get(2)?,
                    to: r.get(3)?,
                    to_cell: r.get(4)?,
                    amount: r.get(5)?,
                    attempts: r.get(6)?,
                    created_ms: r.get(7)?,
                })
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(storage)
        })
        .await
    }

    async fn oldest_unsettled_ms(&self, now_ms: i64) -> Result<i64, DomainError> {
        self.with_reader(move |c| {
            c.query_row(
                "SELECT MIN(created_ms) FROM outbox WHERE delivered_ms IS NULL AND failed_ms IS NULL",
                [],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map(|m| m.unwrap_or(now_ms).min(now_ms))
            .map_err(storage)
        })
        .await
    }

    async fn stats(&self, alert_after_ms: i64) -> Result<Stats, DomainError> {
        self.with_reader(move |c| {
            let balance_total =
                crate::check::sum(c, "SELECT balance FROM accounts").map_err(storage)?;
            let mut s = c
                .prepare_cached("SELECT state, COUNT(*) FROM orders GROUP BY state")
                .map_err(storage)?;
            let orders_by_state = s
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(storage)?;
            let now = unix_ms();
            let (outbox_backlog, oldest, outbox_overdue): (i64, Option<i64>, i64) = c
                .query_row(
                    "SELECT COUNT(*), MIN(created_ms), COALESCE(SUM(created_ms < ?1), 0)
                     FROM outbox WHERE delivered_ms IS NULL AND failed_ms IS NULL",
                    [now - alert_after_ms],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .map_err(storage)?;
            let transfers_failed: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM outbox WHERE failed_ms IS NOT NULL",
                    [],
                    |r| r.get(0),
                )
                .map_err(storage)?;
            Ok(Stats {
                balance_total,
                orders_by_state,
                outbox_backlog,
                outbox_oldest_age_ms: oldest.map(|o| (now - o).max(0)).unwrap_or(0),
                outbox_overdue,
                transfers_failed,
            })
        })
        .await
    }
}
