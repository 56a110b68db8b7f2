//! The store's journal: every row a group-commit batch changes, written by
//! triggers in the batch's own transaction, and one `journal` row naming
//! the batch's log sequence number (`meta.lsn`, raised once per batch) and
//! the id range of its rows — so a batch and its journal commit together
//! or not at all, and the LSNs are contiguous.
//!
//! (SQLite's session extension would give the same changesets, but
//! rusqlite builds it only with bindgen, which needs libclang on every
//! build machine; triggers need nothing.)
//!
//! A replica of the shard (see [`super::replica`]) applies the rows in
//! order, batch by batch; a batch carries its raise of `meta.lsn`, so a
//! replica's `meta.lsn` is the last batch it applied.

use rusqlite::{params, Connection};

use super::unix_ms;

/// Tables the journal leaves out: its own, the migration record, and the
/// copy's own facts (`local`: its role).
const NOT_JOURNALED: [&str; 4] = ["journal", "journal_rows", "schema_version", "local"];

/// Whether the file journals its batches' rows (`meta.journal = on`).
pub fn enabled(conn: &Connection) -> rusqlite::Result<bool> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = 'journal'", [], |r| {
            r.get::<_, String>(0)
        })
        .optional()?
        .is_some_and(|v| v == "on"))
}

/// Turns journaling on for the file at `path` (kept from then on; a
/// replica must start from a snapshot taken after this).
pub fn enable(path: &std::path::Path) -> rusqlite::Result<()> {
    let mut conn = super::open(path, false)?;
    super::migrate(&mut conn)?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('journal', 'on') ON CONFLICT (key) DO UPDATE SET value = 'on'",
        [],
    )?;
    install_triggers(&tx)?;
    tx.commit()
}

/// (Re)creates the journal triggers of every table from its current
/// columns when the file journals (run at every open, after the
/// migrations, so a migration that adds a column is covered).
pub(super) fn refresh_triggers(conn: &Connection) -> rusqlite::Result<()> {
    if super::shard::role(conn)? == super::shard::Role::Replica {
        // A replica applies rows; it does not journal them.
        return drop_triggers(conn);
    }
    if enabled(conn)? {
        install_triggers(conn)?;
    }
    Ok(())
}

/// Turns journaling on inside the caller's transaction, starting an empty
/// journal (a copy promoted to primary: its standby continues from the
/// LSN both copies share).
pub(super) fn restart(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('journal', 'on') ON CONFLICT (key) DO UPDATE SET value = 'on'",
        [],
    )?;
    conn.execute_batch("DELETE FROM journal_rows; DELETE FROM journal;")?;
    install_triggers(conn)
}

fn install_triggers(conn: &Connection) -> rusqlite::Result<()> {
    let tables: Vec<String> = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let old: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'journal_%'")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut sql = String::new();
    for t in old {
        sql.push_str(&format!("DROP TRIGGER \"{t}\";\n"));
    }
    for table in tables
        .iter()
        .filter(|t| !NOT_JOURNALED.contains(&t.as_str()))
    {
        let cols: Vec<(String, i64)> = conn
            .prepare(&format!(
                "SELECT name, pk FROM pragma_table_info('{table}')"
            ))?
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        if !cols.iter().any(|(_, pk)| *pk > 0) {
            // Rows without a key cannot be replayed one by one.
            tracing::warn!(%table, "table without a primary key is not journaled");
            continue;
        }
        let json = |prefix: &str, only_pk: bool| {
            let parts: Vec<String> = cols
                .iter()
                .filter(|(_, pk)| !only_pk || *pk > 0)
                .map(|(c, _)| format!("'{c}', {prefix}.\"{c}\""))
                .collect();
            format!("json_object({})", parts.join(", "))
        };
        for (event, op, row) in [
            ("INSERT", "upsert", json("NEW", false)),
            ("UPDATE", "upsert", json("NEW", false)),
            ("DELETE", "delete", json("OLD", true)),
        ] {
            let name = event.to_ascii_lowercase();
            sql.push_str(&format!(
                "CREATE TRIGGER \"journal_{table}_{name}\" AFTER {event} ON \"{table}\" BEGIN
                   INSERT INTO journal_rows (tbl, op, row) VALUES ('{table}', '{op}', {row});
                 END;\n"
            ));
        }
    }
    conn.execute_batch(&sql)
}

/// Drops the journal triggers (a replica applies rows; it does not
/// journal them).
pub fn drop_triggers(conn: &Connection) -> rusqlite::Result<()> {
    let old: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'journal_%'")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for t in old {
        conn.execute_batch(&format!("DROP TRIGGER \"{t}\""))?;
    }
    Ok(())
}

/// The id the batch's first journal row will get (read before its first
/// change).
pub(super) fn start_batch(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT COALESCE(MAX(id), 0) + 1 FROM journal_rows")?
        .query_row([], |r| r.get(0))
}

/// Records batch `lsn`: its rows are `first_id..` up to the last one.
pub(super) fn finish_batch(conn: &Connection, lsn: i64, first_id: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO journal (lsn, first_id, last_id, created_ms)
         VALUES (?1, ?2, (SELECT COALESCE(MAX(id), 0) FROM journal_rows), ?3)",
    )?
    .execute(params![lsn, first_id, unix_ms()])?;
    Ok(())
}

/// One changed row.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RowChange {
    /// Table.
    pub table: String,
    /// True: upsert `row`; false: delete the row whose key is `row`.
    pub upsert: bool,
    /// Column → value, as the JSON object the journal holds (all columns
    /// for an upsert, the key for a delete).
    pub row: Box<serde_json::value::RawValue>,
}

/// One batch of the journal.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Batch {
    /// Its log sequence number.
    pub lsn: i64,
    /// Its rows, in the order they changed.
    pub rows: Vec<RowChange>,
}

/// Batches after `after`, in LSN order, at most `limit`.
pub fn batches_after(conn: &Connection, after: i64, limit: u32) -> rusqlite::Result<Vec<Batch>> {
    let mut s = conn.prepare_cached(
        "SELECT j.lsn, r.tbl, r.op, r.row
         FROM (SELECT lsn, first_id, last_id FROM journal WHERE lsn > ?1 ORDER BY lsn LIMIT ?2) j
         JOIN journal_rows r ON r.id BETWEEN j.first_id AND j.last_id
         ORDER BY r.id",
    )?;
    let rows = s.query_map(params![after, limit], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    let mut out: Vec<Batch> = Vec::new();
    for row in rows {
        let (lsn, table, op, json) = row?;
        let row = serde_json::value::RawValue::from_string(json).map_err(|_| {
            rusqlite::Error::InvalidColumnType(3, "row".into(), rusqlite::types::Type::Text)
        })?;
        let change = RowChange {
            table,
            upsert: op == "upsert",
            row,
        };
        match out.last_mut() {
            Some(b) if b.lsn == lsn => b.rows.push(change),
            _ => out.push(Batch {
                lsn,
                rows: vec![change],
            }),
        }
    }
    Ok(out)
}

/// A batch as its writer wrote it, and the timeline it is on.
pub type Written = (Timeline, Batch);

/// Batch `lsn`, whose rows start at id `first_id`, read back inside the
/// writer's transaction (before its commit) so the shipper can send it
/// without reading the journal again; with the timeline it is on.
pub(super) fn written_batch(
    conn: &Connection,
    lsn: i64,
    first_id: i64,
) -> rusqlite::Result<Written> {
    let mut s =
        conn.prepare_cached("SELECT tbl, op, row FROM journal_rows WHERE id >= ?1 ORDER BY id")?;
    let rows = s.query_map([first_id], |r| {
        let json: String = r.get(2)?;
        let row = serde_json::value::RawValue::from_string(json).map_err(|_| {
            rusqlite::Error::InvalidColumnType(2, "row".into(), rusqlite::types::Type::Text)
        })?;
        Ok(RowChange {
            table: r.get(0)?,
            upsert: r.get::<_, String>(1)? == "upsert",
            row,
        })
    })?;
    let rows = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok((timeline(conn)?, Batch { lsn, rows }))
}

/// The oldest batch still in the journal (`None` when empty).
pub fn oldest(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.query_row("SELECT MIN(lsn) FROM journal", [], |r| r.get(0))
}

/// The history a copy's journal belongs to: a promotion starts a new one
/// (a random id, and the LSN of its first batch), so a copy that went on
/// past that LSN on the old history (the unacknowledged tail of a primary
/// that was failed over) is told apart from one that is merely behind.
/// Kept in `meta` (journaled: a replica follows its primary's history).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Timeline {
    /// Its id (empty: the history the shard started with).
    pub id: String,
    /// The LSN of its first batch (0 for the first history).
    pub since: i64,
}

/// The timeline of the copy open on `conn`.
pub fn timeline(conn: &Connection) -> rusqlite::Result<Timeline> {
    use rusqlite::OptionalExtension;
    let id: Option<String> = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'timeline'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(Timeline {
        id: id.unwrap_or_default(),
        since: super::meta_ms(conn, "timeline_since")?,
    })
}

/// Starts a new timeline at `since` (inside a promotion's batch).
pub(super) fn new_timeline(conn: &Connection, since: i64) -> rusqlite::Result<()> {
    let mut id = [0u8; 8];
    let _ = getrandom::fill(&mut id);
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('timeline', ?1), ('timeline_since', ?2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![hex::encode(id), since.to_string()],
    )?;
    Ok(())
}
