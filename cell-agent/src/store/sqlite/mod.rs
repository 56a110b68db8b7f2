//! SQLite store: WAL, `synchronous = FULL` (every commit is fsynced before
//! any client is answered), migrations embedded, group commit.
//!
//! One writer thread per process takes every pending write, runs each in its
//! own savepoint inside one `BEGIN IMMEDIATE` transaction, commits once, and
//! only then answers. A failed write rolls back to its savepoint and leaves
//! no trace. Several processes (blue and green) may open the same file:
//! SQLite's write lock serialises their transactions. Reads use a small pool
//! of read-only connections (WAL readers never block the writer).

mod ledger;
mod read;
mod schema;
mod write;

use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection};
use tokio::sync::oneshot;

pub use schema::{migrate, recorded_cell};

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

/// Opens a connection with the store's pragmas.
pub fn open(path: &Path, read_only: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    if read_only {
        conn.pragma_update(None, "query_only", "ON")?;
    }
    Ok(conn)
}

type Job = (WriteOp, oneshot::Sender<Result<Reply, DomainError>>);

/// The SQLite store of one cell.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    cell: String,
    writer: Mutex<std_mpsc::Sender<Job>>,
    readers: Mutex<Vec<Connection>>,
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
        let mut conn = open(path, false)?;
        migrate(&mut conn)?;
        schema::claim_cell(&conn, cell)?;
        let (tx, rx) = std_mpsc::channel::<Job>();
        let cell_name = cell.to_string();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, cell_name))
            .map_err(OpenError::Thread)?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                cell: cell.to_string(),
                writer: Mutex::new(tx),
                readers: Mutex::new(Vec::new()),
            }),
        })
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

fn writer_loop(mut conn: Connection, rx: std_mpsc::Receiver<Job>, cell: String) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let results = run_batch(&mut conn, &batch, &cell);
        for ((_, reply), result) in batch.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

fn run_batch(conn: &mut Connection, batch: &[Job], cell: &str) -> Vec<Result<Reply, DomainError>> {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let err = storage(e);
        return batch.iter().map(|_| Err(err.clone())).collect();
    }
    let mut results = Vec::with_capacity(batch.len());
    for (op, _) in batch {
        if let Err(e) = conn.execute_batch("SAVEPOINT op") {
            results.push(Err(storage(e)));
            continue;
        }
        let r = write::apply(conn, op, cell);
        let end = if r.is_ok() {
            "RELEASE op"
        } else {
            "ROLLBACK TO op; RELEASE op"
        };
        match conn.execute_batch(end) {
            Ok(()) => results.push(r),
            Err(e) => results.push(Err(storage(e))),
        }
    }
    if let Err(e) = conn.execute_batch("COMMIT") {
        let _ = conn.execute_batch("ROLLBACK");
        let err = storage(e);
        return batch.iter().map(|_| Err(err.clone())).collect();
    }
    results
}

impl Store for SqliteStore {
    async fn write(&self, op: WriteOp) -> Result<Reply, DomainError> {
        let (tx, rx) = oneshot::channel();
        let sent = self
            .inner
            .writer
            .lock()
            .map_err(|_| DomainError::unavailable("writer lock poisoned"))?
            .send((op, tx));
        if sent.is_err() {
            return Err(DomainError::unavailable("the database writer has stopped"));
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
                    "SELECT o.id, o.transfer_id, t.from_user, o.to_user, o.to_cell, o.amount, o.attempts
                     FROM outbox o JOIN transfers t ON t.id = o.transfer_id
                     WHERE o.delivered_ms IS NULL AND o.failed_ms IS NULL AND o.next_attempt_ms <= ?1
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
                })
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
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
