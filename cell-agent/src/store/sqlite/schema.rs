//! The schema: embedded migrations, applied in order at open.

use rusqlite::Connection;

pub(super) const MIGRATIONS: &[&str] = &[
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
    // v2: idempotency keys scoped to (user, key); the cell a file belongs
    // to; the payer of each incoming credit (for reconcile); transfers that
    // end `failed` with a refund.
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE idempotency_v2 (
        user        TEXT NOT NULL,
        key         TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        status      INTEGER NOT NULL,
        body        TEXT NOT NULL,
        created_ms  INTEGER NOT NULL,
        PRIMARY KEY (user, key)
    );
    INSERT INTO idempotency_v2 (user, key, fingerprint, status, body, created_ms)
        SELECT COALESCE(json_extract(fingerprint, '$[1]'), ''), key, fingerprint, status, body, created_ms
        FROM idempotency;
    DROP TABLE idempotency;
    ALTER TABLE idempotency_v2 RENAME TO idempotency;
    CREATE INDEX idempotency_age ON idempotency (created_ms);
    ALTER TABLE inbox ADD COLUMN from_user TEXT;
    CREATE INDEX inbox_age ON inbox (created_ms);
    ALTER TABLE transfers ADD COLUMN reason TEXT;
    ALTER TABLE outbox ADD COLUMN failed_ms INTEGER;
    "#,
    // v3: pruning after a retention. An incoming credit records when its
    // transfer was made at the sender, and each sender tells how far back
    // all its transfers are settled: an inbox row is only pruned below
    // that watermark, so a late retry can never be credited twice.
    r#"
    ALTER TABLE inbox ADD COLUMN transfer_created_ms INTEGER;
    CREATE TABLE peer_watermarks (
        cell              TEXT PRIMARY KEY,
        settled_before_ms INTEGER NOT NULL
    );
    CREATE INDEX outbox_done ON outbox (delivered_ms, failed_ms);
    "#,
    // v4: slot ownership inside the data. Every write checks its slot's
    // row in its own transaction; every open, ban and epoch raise is
    // logged with the highest ledger id at that moment, so the ledger rows
    // written under each entry can be told afterwards.
    r#"
    CREATE TABLE slot_owner (
        slot       INTEGER PRIMARY KEY,
        epoch      INTEGER NOT NULL,
        state      TEXT NOT NULL CHECK (state IN ('open', 'banned')),
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE slot_log (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        lsn         INTEGER NOT NULL,
        from_slot   INTEGER NOT NULL,
        to_slot     INTEGER NOT NULL,
        epoch       INTEGER NOT NULL,
        state       TEXT NOT NULL,
        reason      TEXT NOT NULL,
        ledger_high INTEGER NOT NULL,
        at_ms       INTEGER NOT NULL
    );
    "#,
    // v5: the journal: every row each batch changes, written by triggers
    // in the batch's own transaction (for the shard's replica); one
    // `journal` row per batch names its LSN and its rows' id range.
    r#"
    CREATE TABLE journal (
        lsn        INTEGER PRIMARY KEY,
        first_id   INTEGER NOT NULL,
        last_id    INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE journal_rows (
        id  INTEGER PRIMARY KEY,
        tbl TEXT NOT NULL,
        op  TEXT NOT NULL,
        row TEXT NOT NULL
    );
    "#,
    // v6: facts about this copy of the shard, never journaled (each copy
    // has its own): its role, `primary` (takes writes) or `replica`
    // (applies its primary's journal; every write is refused).
    r#"
    CREATE TABLE local (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    "#,
];

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

/// Records which cell the file belongs to on first open, and refuses to
/// serve it as another cell's (a mixed-up `--db` would otherwise serve one
/// cell's money under another's name).
pub fn claim_cell(conn: &Connection, cell: &str) -> Result<(), super::OpenError> {
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('cell', ?1)",
        [cell],
    )?;
    let owner = recorded_cell(conn)?.unwrap_or_default();
    if owner != cell {
        return Err(super::OpenError::WrongCell {
            recorded: owner,
            asked: cell.to_string(),
        });
    }
    Ok(())
}

/// The cell a database file belongs to, once recorded.
pub fn recorded_cell(conn: &Connection) -> rusqlite::Result<Option<String>> {
    use rusqlite::OptionalExtension;
    conn.query_row("SELECT value FROM meta WHERE key = 'cell'", [], |r| {
        r.get(0)
    })
    .optional()
}

/// A number kept in `meta` (e.g. how far back rows were pruned).
pub fn meta_ms(conn: &Connection, key: &str) -> rusqlite::Result<i64> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get::<_, String>(0))
        .optional()?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Raises a number kept in `meta` to at least `value`.
pub fn raise_meta_ms(conn: &Connection, key: &str, value: i64) -> rusqlite::Result<()> {
    if meta_ms(conn, key)? < value {
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            rusqlite::params![key, value.to_string()],
        )?;
    }
    Ok(())
}
