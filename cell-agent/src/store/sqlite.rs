//! SQLite store: WAL, `synchronous = FULL` (every commit is fsynced before
//! any client is answered), migrations embedded, group commit.
//!
//! One writer thread per process takes every pending write, runs each in its
//! own savepoint inside one `BEGIN IMMEDIATE` transaction, commits once, and
//! only then answers. A failed write rolls back to its savepoint and leaves
//! no trace. Several processes (blue and green) may open the same file:
//! SQLite's write lock serialises their transactions. Reads use a small pool
//! of read-only connections (WAL readers never block the writer).

use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use super::*;

/// Most writes committed in one transaction.
pub const MAX_BATCH: usize = 256;

const MIGRATIONS: &[&str] = &[
    // v1
    r#"
    CREATE TABLE accounts (
        user       TEXT PRIMARY KEY,
        slot       INTEGER NOT NULL,
        balance    INTEGER NOT NULL DEFAULT 0,
        frozen     INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL,
        CHECK (frozen >= 0 AND balance >= frozen)
    );
    CREATE TABLE ledger (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        user          TEXT NOT NULL,
        kind          TEXT NOT NULL,
        amount        INTEGER NOT NULL,
        balance_delta INTEGER NOT NULL,
        frozen_delta  INTEGER NOT NULL,
        balance_after INTEGER NOT NULL,
        frozen_after  INTEGER NOT NULL,
        ref           TEXT,
        created_ms    INTEGER NOT NULL
    );
    CREATE INDEX ledger_user ON ledger (user, id);
    CREATE TABLE orders (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        id         TEXT NOT NULL UNIQUE,
        user       TEXT NOT NULL,
        amount     INTEGER NOT NULL,
        merchant   TEXT NOT NULL,
        state      TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE INDEX orders_user ON orders (user, seq);
    CREATE TABLE transfers (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        id         TEXT NOT NULL UNIQUE,
        from_user  TEXT NOT NULL,
        to_user    TEXT NOT NULL,
        amount     INTEGER NOT NULL,
        to_cell    TEXT,
        state      TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        transfer_id     TEXT NOT NULL UNIQUE,
        to_user         TEXT NOT NULL,
        to_cell         TEXT NOT NULL,
        amount          INTEGER NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER NOT NULL,
        last_error      TEXT,
        created_ms      INTEGER NOT NULL,
        delivered_ms    INTEGER
    );
    CREATE INDEX outbox_due ON outbox (delivered_ms, next_attempt_ms);
    CREATE TABLE inbox (
        transfer_id TEXT PRIMARY KEY,
        from_cell   TEXT NOT NULL,
        to_user     TEXT NOT NULL,
        amount      INTEGER NOT NULL,
        created_ms  INTEGER NOT NULL
    );
    CREATE TABLE idempotency (
        key         TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        status      INTEGER NOT NULL,
        body        TEXT NOT NULL,
        created_ms  INTEGER NOT NULL
    );
    "#,
];

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

/// Applies the embedded migrations (idempotent; safe with two processes).
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<u32> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let current: u32 = tx.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_version",
        [],
        |r| r.get(0),
    )?;
    for (i, m) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(m)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [i as u32 + 1],
        )?;
    }
    tx.commit()?;
    Ok(MIGRATIONS.len() as u32)
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
    pub fn open(path: &Path, cell: &str) -> rusqlite::Result<Self> {
        let mut conn = open(path, false)?;
        migrate(&mut conn)?;
        let (tx, rx) = std_mpsc::channel::<Job>();
        let cell_name = cell.to_string();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx, cell_name))
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
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
        let r = apply(conn, op, cell);
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

/// Looks up an idempotency key: the stored reply, a conflict, or nothing.
fn idem_lookup(
    conn: &Connection,
    key: &str,
    fingerprint: &str,
) -> Result<Option<Reply>, DomainError> {
    if key.is_empty() || key.len() > 200 {
        return Err(DomainError::bad_request(
            "idempotency_key must be 1..=200 characters",
        ));
    }
    let row: Option<(String, u16, String)> = conn
        .prepare_cached("SELECT fingerprint, status, body FROM idempotency WHERE key = ?1")
        .and_then(|mut s| {
            s.query_row([key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .map_err(storage)?;
    match row {
        None => Ok(None),
        Some((fp, status, body)) if fp == fingerprint => Ok(Some((
            status,
            serde_json::from_str(&body).unwrap_or(Value::Null),
        ))),
        Some(_) => Err(DomainError::conflict(
            "idempotency_conflict",
            format!("idempotency key {key:?} was already used with a different request"),
        )),
    }
}

fn idem_store(
    conn: &Connection,
    key: &str,
    fingerprint: &str,
    reply: &Reply,
) -> Result<(), DomainError> {
    conn.prepare_cached(
        "INSERT INTO idempotency (key, fingerprint, status, body, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut s| s.execute(params![key, fingerprint, reply.0, reply.1.to_string(), unix_ms()]))
    .map_err(storage)?;
    Ok(())
}

struct Acct {
    balance: i64,
    frozen: i64,
}

fn account(conn: &Connection, user: &str) -> Result<Option<Acct>, DomainError> {
    conn.prepare_cached("SELECT balance, frozen FROM accounts WHERE user = ?1")
        .and_then(|mut s| {
            s.query_row([user], |r| {
                Ok(Acct {
                    balance: r.get(0)?,
                    frozen: r.get(1)?,
                })
            })
            .optional()
        })
        .map_err(storage)
}

fn account_json(user: &str, a: &Acct) -> Value {
    json!({ "user": user, "balance": a.balance, "frozen": a.frozen, "available": a.balance - a.frozen })
}

fn ensure_account(conn: &Connection, user: &str, slot: u32) -> Result<Acct, DomainError> {
    let now = unix_ms();
    conn.prepare_cached(
        "INSERT OR IGNORE INTO accounts (user, slot, balance, frozen, created_ms, updated_ms) VALUES (?1, ?2, 0, 0, ?3, ?3)",
    )
    .and_then(|mut s| s.execute(params![user, slot, now]))
    .map_err(storage)?;
    account(conn, user)?.ok_or_else(|| DomainError::unavailable("account vanished"))
}

fn existing_account(conn: &Connection, user: &str) -> Result<Acct, DomainError> {
    account(conn, user)?.ok_or_else(|| {
        DomainError::not_found(
            "unknown_user",
            format!("user {user:?} has no account in this cell"),
        )
    })
}

/// One fund movement: what it is, and how it changes balance and frozen.
struct Move<'a> {
    kind: &'a str,
    amount: i64,
    balance_delta: i64,
    frozen_delta: i64,
    reference: &'a str,
}

/// Applies a movement to an account and appends it to the ledger.
fn post(conn: &Connection, user: &str, a: &Acct, m: Move<'_>) -> Result<Acct, DomainError> {
    let Move {
        kind,
        amount,
        balance_delta,
        frozen_delta,
        reference,
    } = m;
    let overflow = || DomainError::unprocessable("amount_overflow", "the balance would overflow");
    let balance = a.balance.checked_add(balance_delta).ok_or_else(overflow)?;
    let frozen = a.frozen.checked_add(frozen_delta).ok_or_else(overflow)?;
    if frozen < 0 || balance < frozen {
        return Err(DomainError::conflict(
            "insufficient_funds",
            format!(
                "available balance {} is less than {amount}",
                a.balance - a.frozen
            ),
        ));
    }
    let now = unix_ms();
    conn.prepare_cached(
        "UPDATE accounts SET balance = ?2, frozen = ?3, updated_ms = ?4 WHERE user = ?1",
    )
    .and_then(|mut s| s.execute(params![user, balance, frozen, now]))
    .map_err(storage)?;
    conn.prepare_cached(
        "INSERT INTO ledger (user, kind, amount, balance_delta, frozen_delta, balance_after, frozen_after, ref, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .and_then(|mut s| {
        s.execute(params![user, kind, amount, balance_delta, frozen_delta, balance, frozen, reference, now])
    })
    .map_err(storage)?;
    Ok(Acct { balance, frozen })
}

fn order_json(
    conn: &Connection,
    id: &str,
) -> Result<Option<(Value, String, i64, String)>, DomainError> {
    conn.prepare_cached(
        "SELECT id, user, amount, merchant, state, created_ms, updated_ms FROM orders WHERE id = ?1",
    )
    .and_then(|mut s| {
        s.query_row([id], |r| {
            let user: String = r.get(1)?;
            let amount: i64 = r.get(2)?;
            let state: String = r.get(4)?;
            Ok((
                json!({
                    "id": r.get::<_, String>(0)?, "user": user, "amount": amount,
                    "merchant": r.get::<_, String>(3)?, "state": state,
                    "created_ms": r.get::<_, i64>(5)?, "updated_ms": r.get::<_, i64>(6)?,
                }),
                user,
                amount,
                state,
            ))
        })
        .optional()
    })
    .map_err(storage)
}

fn set_order_state(conn: &Connection, id: &str, state: &str) -> Result<(), DomainError> {
    conn.prepare_cached("UPDATE orders SET state = ?2, updated_ms = ?3 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![id, state, unix_ms()]))
        .map_err(storage)?;
    Ok(())
}

fn transfer_json(conn: &Connection, id: &str) -> Result<Option<Value>, DomainError> {
    conn.prepare_cached(
        "SELECT id, from_user, to_user, amount, to_cell, state, created_ms, updated_ms FROM transfers WHERE id = ?1",
    )
    .and_then(|mut s| {
        s.query_row([id], |r| {
            Ok(json!({
                "id": r.get::<_, String>(0)?, "from": r.get::<_, String>(1)?,
                "to": r.get::<_, String>(2)?, "amount": r.get::<_, i64>(3)?,
                "to_cell": r.get::<_, Option<String>>(4)?, "state": r.get::<_, String>(5)?,
                "created_ms": r.get::<_, i64>(6)?, "updated_ms": r.get::<_, i64>(7)?,
            }))
        })
        .optional()
    })
    .map_err(storage)
}

fn apply(conn: &Connection, op: &WriteOp, cell: &str) -> Result<Reply, DomainError> {
    match op {
        WriteOp::Deposit {
            user,
            amount,
            key,
            slot,
        } => {
            check_amount(*amount)?;
            let fp = json!(["deposit", user, amount]).to_string();
            if let Some(r) = idem_lookup(conn, key, &fp)? {
                return Ok(r);
            }
            let a = ensure_account(conn, user, *slot)?;
            let a = post(
                conn,
                user,
                &a,
                Move {
                    kind: "deposit",
                    amount: *amount,
                    balance_delta: *amount,
                    frozen_delta: 0,
                    reference: key,
                },
            )?;
            let reply = (200, account_json(user, &a));
            idem_store(conn, key, &fp, &reply)?;
            Ok(reply)
        }
        WriteOp::CreateOrder {
            user,
            amount,
            merchant,
            key,
        } => {
            check_amount(*amount)?;
            if merchant.is_empty() || merchant.len() > 200 {
                return Err(DomainError::bad_request(
                    "merchant must be 1..=200 characters",
                ));
            }
            let fp = json!(["order", user, amount, merchant]).to_string();
            if let Some(r) = idem_lookup(conn, key, &fp)? {
                return Ok(r);
            }
            existing_account(conn, user)?;
            let now = unix_ms();
            conn.prepare_cached(
                "INSERT INTO orders (id, user, amount, merchant, state, created_ms, updated_ms) VALUES ('', ?1, ?2, ?3, 'created', ?4, ?4)",
            )
            .and_then(|mut s| s.execute(params![user, amount, merchant, now]))
            .map_err(storage)?;
            let seq = conn.last_insert_rowid();
            let id = format!("o-{cell}-{seq}");
            conn.prepare_cached("UPDATE orders SET id = ?2 WHERE seq = ?1")
                .and_then(|mut s| s.execute(params![seq, id]))
                .map_err(storage)?;
            let body = order_json(conn, &id)?.map(|o| o.0).unwrap_or(Value::Null);
            let reply = (201, body);
            idem_store(conn, key, &fp, &reply)?;
            Ok(reply)
        }
        WriteOp::Order {
            id,
            action,
            user: requester,
        } => {
            let (_, user, amount, state) = order_json(conn, id)?
                .filter(|o| o.1 == *requester)
                .ok_or_else(|| {
                    DomainError::not_found(
                        "unknown_order",
                        format!("order {id:?} does not exist for this user"),
                    )
                })?;
            let invalid = |why: &str| {
                Err(DomainError::conflict(
                    "invalid_state",
                    format!(
                        "cannot {} order {id} in state {state}: {why}",
                        action.as_str()
                    ),
                ))
            };
            let reference = format!("order:{id}");
            let next = match (state.as_str(), action) {
                ("created", OrderAction::Try) => {
                    let a = existing_account(conn, &user)?;
                    post(
                        conn,
                        &user,
                        &a,
                        Move {
                            kind: "freeze",
                            amount,
                            balance_delta: 0,
                            frozen_delta: amount,
                            reference: &reference,
                        },
                    )?;
                    Some("tried")
                }
                ("created", OrderAction::Pay) => {
                    let a = existing_account(conn, &user)?;
                    post(
                        conn,
                        &user,
                        &a,
                        Move {
                            kind: "debit",
                            amount,
                            balance_delta: -amount,
                            frozen_delta: 0,
                            reference: &reference,
                        },
                    )?;
                    Some("paid")
                }
                ("tried", OrderAction::Confirm | OrderAction::Pay) => {
                    let a = existing_account(conn, &user)?;
                    post(
                        conn,
                        &user,
                        &a,
                        Move {
                            kind: "debit",
                            amount,
                            balance_delta: -amount,
                            frozen_delta: -amount,
                            reference: &reference,
                        },
                    )?;
                    Some("paid")
                }
                ("created", OrderAction::Cancel) => Some("cancelled"),
                ("tried", OrderAction::Cancel) => {
                    let a = existing_account(conn, &user)?;
                    post(
                        conn,
                        &user,
                        &a,
                        Move {
                            kind: "unfreeze",
                            amount,
                            balance_delta: 0,
                            frozen_delta: -amount,
                            reference: &reference,
                        },
                    )?;
                    Some("cancelled")
                }
                // Repeats of what already happened: answer, move nothing.
                ("tried", OrderAction::Try)
                | ("paid", OrderAction::Try | OrderAction::Confirm | OrderAction::Pay)
                | ("cancelled", OrderAction::Cancel) => None,
                ("created", OrderAction::Confirm) => return invalid("try it first"),
                ("paid", OrderAction::Cancel) => return invalid("it is paid"),
                ("cancelled", _) => return invalid("it is cancelled"),
                _ => return invalid("unknown state"),
            };
            if let Some(next) = next {
                set_order_state(conn, id, next)?;
            }
            let body = order_json(conn, id)?.map(|o| o.0).unwrap_or(Value::Null);
            Ok((200, body))
        }
        WriteOp::Transfer {
            from,
            to,
            amount,
            key,
            to_cell,
            to_slot,
        } => {
            check_amount(*amount)?;
            if from == to {
                return Err(DomainError::unprocessable(
                    "same_account",
                    "cannot transfer to the same user",
                ));
            }
            let fp = json!(["transfer", from, to, amount]).to_string();
            if let Some(r) = idem_lookup(conn, key, &fp)? {
                return Ok(r);
            }
            let a = existing_account(conn, from)?;
            let now = unix_ms();
            conn.prepare_cached(
                "INSERT INTO transfers (id, from_user, to_user, amount, to_cell, state, created_ms, updated_ms) VALUES ('', ?1, ?2, ?3, ?4, ?5, ?6, ?6)",
            )
            .and_then(|mut s| {
                s.execute(params![from, to, amount, to_cell, if to_cell.is_some() { "pending" } else { "completed" }, now])
            })
            .map_err(storage)?;
            let seq = conn.last_insert_rowid();
            let id = format!("t-{cell}-{seq}");
            conn.prepare_cached("UPDATE transfers SET id = ?2 WHERE seq = ?1")
                .and_then(|mut s| s.execute(params![seq, id]))
                .map_err(storage)?;
            let reference = format!("transfer:{id}");
            post(
                conn,
                from,
                &a,
                Move {
                    kind: "transfer_out",
                    amount: *amount,
                    balance_delta: -amount,
                    frozen_delta: 0,
                    reference: &reference,
                },
            )?;
            match to_cell {
                None => {
                    let b = ensure_account(conn, to, *to_slot)?;
                    post(
                        conn,
                        to,
                        &b,
                        Move {
                            kind: "transfer_in",
                            amount: *amount,
                            balance_delta: *amount,
                            frozen_delta: 0,
                            reference: &reference,
                        },
                    )?;
                }
                Some(c) => {
                    conn.prepare_cached(
                        "INSERT INTO outbox (transfer_id, to_user, to_cell, amount, next_attempt_ms, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                    )
                    .and_then(|mut s| s.execute(params![id, to, c, amount, now]))
                    .map_err(storage)?;
                }
            }
            let body = transfer_json(conn, &id)?.unwrap_or(Value::Null);
            let reply = (201, body);
            idem_store(conn, key, &fp, &reply)?;
            Ok(reply)
        }
        WriteOp::Credit {
            transfer_id,
            from_cell,
            to,
            amount,
            slot,
        } => {
            check_amount(*amount)?;
            let seen: Option<(String, i64)> = conn
                .prepare_cached("SELECT to_user, amount FROM inbox WHERE transfer_id = ?1")
                .and_then(|mut s| {
                    s.query_row([transfer_id], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                })
                .map_err(storage)?;
            if let Some((u, a)) = seen {
                if u != *to || a != *amount {
                    return Err(DomainError::conflict(
                        "idempotency_conflict",
                        format!(
                            "transfer {transfer_id} was already credited with different details"
                        ),
                    ));
                }
                return Ok((
                    200,
                    json!({ "transfer_id": transfer_id, "to": to, "amount": amount, "duplicate": true }),
                ));
            }
            let b = ensure_account(conn, to, *slot)?;
            let reference = format!("transfer:{transfer_id}");
            post(
                conn,
                to,
                &b,
                Move {
                    kind: "credit",
                    amount: *amount,
                    balance_delta: *amount,
                    frozen_delta: 0,
                    reference: &reference,
                },
            )?;
            conn.prepare_cached(
                "INSERT INTO inbox (transfer_id, from_cell, to_user, amount, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| s.execute(params![transfer_id, from_cell, to, amount, unix_ms()]))
            .map_err(storage)?;
            Ok((
                200,
                json!({ "transfer_id": transfer_id, "to": to, "amount": amount, "duplicate": false }),
            ))
        }
        WriteOp::Delivered { outbox_id } => {
            let now = unix_ms();
            let tid: Option<String> = conn
                .prepare_cached(
                    "SELECT transfer_id FROM outbox WHERE id = ?1 AND delivered_ms IS NULL",
                )
                .and_then(|mut s| s.query_row([outbox_id], |r| r.get(0)).optional())
                .map_err(storage)?;
            if let Some(tid) = tid {
                conn.prepare_cached("UPDATE outbox SET delivered_ms = ?2 WHERE id = ?1")
                    .and_then(|mut s| s.execute(params![outbox_id, now]))
                    .map_err(storage)?;
                conn.prepare_cached(
                    "UPDATE transfers SET state = 'delivered', updated_ms = ?2 WHERE id = ?1",
                )
                .and_then(|mut s| s.execute(params![tid, now]))
                .map_err(storage)?;
            }
            Ok((200, json!({ "outbox_id": outbox_id })))
        }
        WriteOp::DeliveryFailed {
            outbox_id,
            next_attempt_ms,
            error,
        } => {
            conn.prepare_cached(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_ms = ?2, last_error = ?3 WHERE id = ?1 AND delivered_ms IS NULL",
            )
            .and_then(|mut s| s.execute(params![outbox_id, next_attempt_ms, error]))
            .map_err(storage)?;
            Ok((200, json!({ "outbox_id": outbox_id })))
        }
    }
}

fn read_op(conn: &Connection, op: &ReadOp) -> Result<Reply, DomainError> {
    match op {
        ReadOp::Account { user } => {
            let a = existing_account(conn, user)?;
            Ok((200, account_json(user, &a)))
        }
        ReadOp::Ledger {
            user,
            limit,
            before,
        } => {
            existing_account(conn, user)?;
            let mut s = conn
                .prepare_cached(
                    "SELECT id, kind, amount, balance_delta, frozen_delta, balance_after, frozen_after, ref, created_ms
                     FROM ledger WHERE user = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3",
                )
                .map_err(storage)?;
            let rows = s
                .query_map(params![user, before.unwrap_or(i64::MAX), limit], |r| {
                    Ok(json!({
                        "id": r.get::<_, i64>(0)?, "kind": r.get::<_, String>(1)?,
                        "amount": r.get::<_, i64>(2)?, "balance_delta": r.get::<_, i64>(3)?,
                        "frozen_delta": r.get::<_, i64>(4)?, "balance_after": r.get::<_, i64>(5)?,
                        "frozen_after": r.get::<_, i64>(6)?, "ref": r.get::<_, Option<String>>(7)?,
                        "created_ms": r.get::<_, i64>(8)?,
                    }))
                })
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(storage)?;
            let next = if rows.len() as u32 == *limit {
                rows.last().and_then(|e| e["id"].as_i64())
            } else {
                None
            };
            Ok((
                200,
                json!({ "user": user, "entries": rows, "next_before": next }),
            ))
        }
        ReadOp::Order { id } => order_json(conn, id)?.map(|o| (200, o.0)).ok_or_else(|| {
            DomainError::not_found(
                "unknown_order",
                format!("order {id:?} does not exist in this cell"),
            )
        }),
        ReadOp::UserOrders {
            user,
            limit,
            before,
        } => {
            existing_account(conn, user)?;
            let mut s = conn
                .prepare_cached(
                    "SELECT seq, id, amount, merchant, state, created_ms, updated_ms FROM orders
                     WHERE user = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
                )
                .map_err(storage)?;
            let rows: Vec<(i64, Value)> = s
                .query_map(params![user, before.unwrap_or(i64::MAX), limit], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        json!({
                            "id": r.get::<_, String>(1)?, "user": user, "amount": r.get::<_, i64>(2)?,
                            "merchant": r.get::<_, String>(3)?, "state": r.get::<_, String>(4)?,
                            "created_ms": r.get::<_, i64>(5)?, "updated_ms": r.get::<_, i64>(6)?,
                        }),
                    ))
                })
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(storage)?;
            let next = if rows.len() as u32 == *limit {
                rows.last().map(|r| r.0)
            } else {
                None
            };
            let orders: Vec<Value> = rows.into_iter().map(|r| r.1).collect();
            Ok((
                200,
                json!({ "user": user, "orders": orders, "next_before": next }),
            ))
        }
        ReadOp::Transfer { id } => transfer_json(conn, id)?.map(|t| (200, t)).ok_or_else(|| {
            DomainError::not_found(
                "unknown_transfer",
                format!("transfer {id:?} does not exist in this cell"),
            )
        }),
    }
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
        self.with_reader(move |c| read_op(c, &op)).await
    }

    async fn due_outbox(&self, now_ms: i64, limit: u32) -> Result<Vec<OutboxItem>, DomainError> {
        self.with_reader(move |c| {
            let mut s = c
                .prepare_cached(
                    "SELECT id, transfer_id, to_user, to_cell, amount, attempts FROM outbox
                     WHERE delivered_ms IS NULL AND next_attempt_ms <= ?1 ORDER BY id LIMIT ?2",
                )
                .map_err(storage)?;
            s.query_map(params![now_ms, limit], |r| {
                Ok(OutboxItem {
                    id: r.get(0)?,
                    transfer_id: r.get(1)?,
                    to: r.get(2)?,
                    to_cell: r.get(3)?,
                    amount: r.get(4)?,
                    attempts: r.get(5)?,
                })
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(storage)
        })
        .await
    }

    async fn stats(&self) -> Result<Stats, DomainError> {
        self.with_reader(|c| {
            let balance_total: i64 = c
                .query_row("SELECT COALESCE(SUM(balance), 0) FROM accounts", [], |r| {
                    r.get(0)
                })
                .map_err(storage)?;
            let mut s = c
                .prepare_cached("SELECT state, COUNT(*) FROM orders GROUP BY state")
                .map_err(storage)?;
            let orders_by_state = s
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(storage)?;
            let (outbox_backlog, oldest): (i64, Option<i64>) = c
                .query_row(
                    "SELECT COUNT(*), MIN(created_ms) FROM outbox WHERE delivered_ms IS NULL",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(storage)?;
            Ok(Stats {
                balance_total,
                orders_by_state,
                outbox_backlog,
                outbox_oldest_age_ms: oldest.map(|o| (unix_ms() - o).max(0)).unwrap_or(0),
            })
        })
        .await
    }
}
