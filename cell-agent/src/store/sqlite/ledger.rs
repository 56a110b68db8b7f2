//! Shared pieces of every write: idempotency records, accounts, the
//! ledger posting that changes a balance, and the JSON forms of rows.

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};

use super::{storage, unix_ms};
use crate::store::{DomainError, Reply};

/// Looks up `user`'s idempotency key: the stored reply, a conflict, or
/// nothing. Keys are scoped to the user: one user can neither consume nor
/// probe another's.
pub(super) fn idem_lookup(
    conn: &Connection,
    user: &str,
    key: &str,
    fingerprint: &str,
) -> Result<Option<Reply>, DomainError> {
    if key.is_empty() || key.len() > 200 {
        return Err(DomainError::bad_request(
            "idempotency_key must be 1..=200 characters",
        ));
    }
    let row: Option<(String, u16, String)> = conn
        .prepare_cached(
            "SELECT fingerprint, status, body FROM idempotency WHERE user = ?1 AND key = ?2",
        )
        .and_then(|mut s| {
            s.query_row([user, key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
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

pub(super) fn idem_store(
    conn: &Connection,
    user: &str,
    key: &str,
    fingerprint: &str,
    reply: &Reply,
) -> Result<(), DomainError> {
    conn.prepare_cached(
        "INSERT INTO idempotency (user, key, fingerprint, status, body, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| s.execute(params![user, key, fingerprint, reply.0, reply.1.to_string(), unix_ms()]))
    .map_err(storage)?;
    Ok(())
}

pub(super) struct Acct {
    pub(super) balance: i64,
    pub(super) frozen: i64,
}

pub(super) fn account(conn: &Connection, user: &str) -> Result<Option<Acct>, DomainError> {
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

pub(super) fn account_json(user: &str, a: &Acct) -> Value {
    json!({ "user": user, "balance": a.balance, "frozen": a.frozen, "available": a.balance - a.frozen })
}

pub(super) fn ensure_account(
    conn: &Connection,
    user: &str,
    slot: u32,
) -> Result<Acct, DomainError> {
    let now = unix_ms();
    conn.prepare_cached(
        "INSERT OR IGNORE INTO accounts (user, slot, balance, frozen, created_ms, updated_ms) VALUES (?1, ?2, 0, 0, ?3, ?3)",
    )
    .and_then(|mut s| s.execute(params![user, slot, now]))
    .map_err(storage)?;
    account(conn, user)?.ok_or_else(|| DomainError::unavailable("account vanished"))
}

pub(super) fn existing_account(conn: &Connection, user: &str) -> Result<Acct, DomainError> {
    account(conn, user)?.ok_or_else(|| {
        DomainError::not_found(
            "unknown_user",
            format!("user {user:?} has no account in this cell"),
        )
    })
}

/// One fund movement: what it is, and how it changes balance and frozen.
pub(super) struct Move<'a> {
    pub(super) kind: &'a str,
    pub(super) amount: i64,
    pub(super) balance_delta: i64,
    pub(super) frozen_delta: i64,
    pub(super) reference: &'a str,
}

/// Applies a movement to an account and appends it to the ledger.
pub(super) fn post(
    conn: &Connection,
    user: &str,
    a: &Acct,
    m: Move<'_>,
) -> Result<Acct, DomainError> {
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

pub(super) fn order_json(
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

pub(super) fn set_order_state(conn: &Connection, id: &str, state: &str) -> Result<(), DomainError> {
    conn.prepare_cached("UPDATE orders SET state = ?2, updated_ms = ?3 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![id, state, unix_ms()]))
        .map_err(storage)?;
    Ok(())
}

pub(super) fn transfer_json(conn: &Connection, id: &str) -> Result<Option<Value>, DomainError> {
    conn.prepare_cached(
        "SELECT id, from_user, to_user, amount, to_cell, state, created_ms, updated_ms, reason FROM transfers WHERE id = ?1",
    )
    .and_then(|mut s| {
        s.query_row([id], |r| {
            Ok(json!({
                "id": r.get::<_, String>(0)?, "from": r.get::<_, String>(1)?,
                "to": r.get::<_, String>(2)?, "amount": r.get::<_, i64>(3)?,
                "to_cell": r.get::<_, Option<String>>(4)?, "state": r.get::<_, String>(5)?,
                "created_ms": r.get::<_, i64>(6)?, "updated_ms": r.get::<_, i64>(7)?,
                "reason": r.get::<_, Option<String>>(8)?,
            }))
        })
        .optional()
    })
    .map_err(storage)
}
