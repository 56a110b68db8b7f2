//! The write operations, one function each, every one inside the writer's
//! transaction (its own savepoint): all of an operation's effects commit
//! together or not at all.

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};

use super::ledger::*;
use super::{slots, storage, unix_ms};
use crate::store::{check_amount, DomainError, OrderAction, Reply, SlotStamp, WriteOp};

/// The slot fences of a write: checked first, in the write's own
/// transaction.
fn fences(op: &WriteOp) -> [Option<&SlotStamp>; 2] {
    match op {
        WriteOp::Deposit { at, .. }
        | WriteOp::CreateOrder { at, .. }
        | WriteOp::Order { at, .. }
        | WriteOp::Credit { at, .. }
        | WriteOp::TransferRefused { at, .. } => [at.as_ref(), None],
        WriteOp::Transfer {
            at, to_at, to_cell, ..
        } => [at.as_ref(), to_at.as_ref().filter(|_| to_cell.is_none())],
        WriteOp::Delivered { .. }
        | WriteOp::DeliveryFailed { .. }
        | WriteOp::Prune { .. }
        | WriteOp::ClaimSlots { .. }
        | WriteOp::BanSlots { .. }
        | WriteOp::Demote { .. }
        | WriteOp::OpenSlots { .. } => [None, None],
    }
}

/// Runs one write in the batch at journal position `lsn`.
pub(super) fn apply(
    conn: &Connection,
    op: &WriteOp,
    cell: &str,
    lsn: i64,
) -> Result<Reply, DomainError> {
    for at in fences(op).into_iter().flatten() {
        slots::check(conn, at, lsn)?;
    }
    match op {
        WriteOp::Deposit {
            user,
            amount,
            key,
            slot,
            ..
        } => deposit(conn, user, *amount, key, *slot),
        WriteOp::CreateOrder {
            user,
            amount,
            merchant,
            key,
            ..
        } => create_order(conn, cell, user, *amount, merchant, key),
        WriteOp::Order {
            id, action, user, ..
        } => order_action(conn, id, *action, user),
        WriteOp::Transfer {
            from,
            to,
            amount,
            key,
            to_cell,
            to_slot,
            ..
        } => transfer(
            conn,
            cell,
            from,
            to,
            *amount,
            key,
            to_cell.as_deref(),
            *to_slot,
        ),
        WriteOp::Credit {
            transfer_id,
            from_cell,
            from,
            to,
            amount,
            slot,
            transfer_created_ms,
            settled_before_ms,
            ..
        } => credit(
            conn,
            Incoming {
                transfer_id,
                from_cell,
                from,
                to,
                amount: *amount,
                slot: *slot,
                transfer_created_ms: *transfer_created_ms,
                settled_before_ms: *settled_before_ms,
            },
        ),
        WriteOp::Prune {
            before_ms,
            margin_ms,
            limit,
        } => super::prune::prune(conn, *before_ms, *margin_ms, *limit),
        WriteOp::Delivered { outbox_id } => delivered(conn, *outbox_id),
        WriteOp::DeliveryFailed {
            outbox_id,
            next_attempt_ms,
            error,
        } => delivery_failed(conn, *outbox_id, *next_attempt_ms, error),
        WriteOp::TransferRefused {
            outbox_id, reason, ..
        } => refund(conn, *outbox_id, reason),
        WriteOp::ClaimSlots { ranges } => slots::claim(conn, ranges, lsn),
        WriteOp::BanSlots { from, to, epoch } => slots::ban(conn, *from, *to, *epoch, lsn),
        WriteOp::OpenSlots { from, to, epoch } => slots::open(conn, *from, *to, *epoch, lsn),
        WriteOp::Demote { ranges } => super::shard::demote(conn, ranges, lsn),
    }
}

fn deposit(
    conn: &Connection,
    user: &str,
    amount: i64,
    key: &str,
    slot: u32,
) -> Result<Reply, DomainError> {
    check_amount(amount)?;
    let fp = json!(["deposit", user, amount]).to_string();
    if let Some(r) = idem_lookup(conn, user, key, &fp)? {
        return Ok(r);
    }
    let a = ensure_account(conn, user, slot)?;
    let a = post(
        conn,
        user,
        &a,
        Move {
            kind: "deposit",
            amount,
            balance_delta: amount,
            frozen_delta: 0,
            reference: key,
        },
    )?;
    let reply = (200, account_json(user, &a));
    idem_store(conn, user, key, &fp, &reply)?;
    Ok(reply)
}

fn create_order(
    conn: &Connection,
    cell: &str,
    user: &str,
    amount: i64,
    merchant: &str,
    key: &str,
) -> Result<Reply, DomainError> {
    check_amount(amount)?;
    if merchant.is_empty() || merchant.len() > 200 {
        return Err(DomainError::bad_request(
            "merchant must be 1..=200 characters",
        ));
    }
    let fp = json!(["order", user, amount, merchant]).to_string();
    if let Some(r) = idem_lookup(conn, user, key, &fp)? {
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
    idem_store(conn, user, key, &fp, &reply)?;
    Ok(reply)
}

fn order_action(
    conn: &Connection,
    id: &str,
    action: OrderAction,
    requester: &str,
) -> Result<Reply, DomainError> {
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
    // (ledger kind, balance delta, frozen delta) and the next state.
    let (movement, next) = match (state.as_str(), action) {
        ("created", OrderAction::Try) => (Some(("freeze", 0, amount)), Some("tried")),
        ("created", OrderAction::Pay) => (Some(("debit", -amount, 0)), Some("paid")),
        ("tried", OrderAction::Confirm | OrderAction::Pay) => {
            (Some(("debit", -amount, -amount)), Some("paid"))
        }
        ("created", OrderAction::Cancel) => (None, Some("cancelled")),
        ("tried", OrderAction::Cancel) => (Some(("unfreeze", 0, -amount)), Some("cancelled")),
        // Repeats of what already happened: answer, move nothing.
        ("tried", OrderAction::Try)
        | ("paid", OrderAction::Try | OrderAction::Confirm | OrderAction::Pay)
        | ("cancelled", OrderAction::Cancel) => (None, None),
        ("created", OrderAction::Confirm) => return invalid("try it first"),
        ("paid", OrderAction::Cancel) => return invalid("it is paid"),
        ("cancelled", _) => return invalid("it is cancelled"),
        _ => return invalid("unknown state"),
    };
    if let Some((kind, balance_delta, frozen_delta)) = movement {
        let a = existing_account(conn, &user)?;
        post(
            conn,
            &user,
            &a,
            Move {
                kind,
                amount,
                balance_delta,
                frozen_delta,
                reference: &format!("order:{id}"),
            },
        )?;
    }
    if let Some(next) = next {
        set_order_state(conn, id, next)?;
    }
    let body = order_json(conn, id)?.map(|o| o.0).unwrap_or(Value::Null);
    Ok((200, body))
}

/// A transfer id nobody can guess: the payee's cell uses it as the
/// idempotency key of the credit, so a predictable one could be taken
/// first by a forger.
fn new_transfer_id(cell: &str) -> Result<String, DomainError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| DomainError::unavailable(format!("no randomness for a transfer id: {e}")))?;
    Ok(format!("t-{cell}-{}", hex::encode(bytes)))
}

#[allow(clippy::too_many_arguments)]
fn transfer(
    conn: &Connection,
    cell: &str,
    from: &str,
    to: &str,
    amount: i64,
    key: &str,
    to_cell: Option<&str>,
    to_slot: u32,
) -> Result<Reply, DomainError> {
    check_amount(amount)?;
    if from == to {
        return Err(DomainError::unprocessable(
            "same_account",
            "cannot transfer to the same user",
        ));
    }
    let fp = json!(["transfer", from, to, amount]).to_string();
    if let Some(r) = idem_lookup(conn, from, key, &fp)? {
        return Ok(r);
    }
    let a = existing_account(conn, from)?;
    let now = unix_ms();
    let id = new_transfer_id(cell)?;
    let state = if to_cell.is_some() {
        "pending"
    } else {
        "completed"
    };
    conn.prepare_cached(
        "INSERT INTO transfers (id, from_user, to_user, amount, to_cell, state, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
    )
    .and_then(|mut s| s.execute(params![id, from, to, amount, to_cell, state, now]))
    .map_err(storage)?;
    let reference = format!("transfer:{id}");
    post(
        conn,
        from,
        &a,
        Move {
            kind: "transfer_out",
            amount,
            balance_delta: -amount,
            frozen_delta: 0,
            reference: &reference,
        },
    )?;
    match to_cell {
        None => {
            let b = ensure_account(conn, to, to_slot)?;
            post(
                conn,
                to,
                &b,
                Move {
                    kind: "transfer_in",
                    amount,
                    balance_delta: amount,
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
    idem_store(conn, from, key, &fp, &reply)?;
    Ok(reply)
}

/// An incoming credit, as [`WriteOp::Credit`] carries it.
struct Incoming<'a> {
    transfer_id: &'a str,
    from_cell: &'a str,
    from: &'a str,
    to: &'a str,
    amount: i64,
    slot: u32,
    transfer_created_ms: i64,
    settled_before_ms: i64,
}

fn credit(conn: &Connection, c: Incoming<'_>) -> Result<Reply, DomainError> {
    let Incoming {
        transfer_id,
        from_cell,
        from,
        to,
        amount,
        slot,
        transfer_created_ms,
        settled_before_ms,
    } = c;
    check_amount(amount)?;
    if settled_before_ms > 0 {
        conn.prepare_cached(
            "INSERT INTO peer_watermarks (cell, settled_before_ms) VALUES (?1, ?2)
             ON CONFLICT (cell) DO UPDATE SET settled_before_ms = MAX(settled_before_ms, excluded.settled_before_ms)",
        )
        .and_then(|mut s| s.execute(params![from_cell, settled_before_ms]))
        .map_err(storage)?;
    }
    let seen: Option<(String, i64, String)> = conn
        .prepare_cached("SELECT to_user, amount, from_cell FROM inbox WHERE transfer_id = ?1")
        .and_then(|mut s| {
            s.query_row([transfer_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .map_err(storage)?;
    if let Some((u, a, c)) = seen {
        if u != to || a != amount || c != from_cell {
            return Err(DomainError::conflict(
                "idempotency_conflict",
                format!("transfer {transfer_id} was already credited with different details"),
            ));
        }
        return Ok((
            200,
            json!({ "transfer_id": transfer_id, "to": to, "amount": amount, "duplicate": true }),
        ));
    }
    let b = ensure_account(conn, to, slot)?;
    post(
        conn,
        to,
        &b,
        Move {
            kind: "credit",
            amount,
            balance_delta: amount,
            frozen_delta: 0,
            reference: &format!("transfer:{transfer_id}"),
        },
    )?;
    conn.prepare_cached(
        "INSERT INTO inbox (transfer_id, from_cell, from_user, to_user, amount, created_ms, transfer_created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut s| {
        s.execute(params![
            transfer_id,
            from_cell,
            from,
            to,
            amount,
            unix_ms(),
            (transfer_created_ms > 0).then_some(transfer_created_ms)
        ])
    })
    .map_err(storage)?;
    Ok((
        200,
        json!({ "transfer_id": transfer_id, "to": to, "amount": amount, "duplicate": false }),
    ))
}

/// The open outbox record `outbox_id` (neither delivered nor failed):
/// its transfer id.
fn open_outbox(conn: &Connection, outbox_id: i64) -> Result<Option<String>, DomainError> {
    conn.prepare_cached(
        "SELECT transfer_id FROM outbox WHERE id = ?1 AND delivered_ms IS NULL AND failed_ms IS NULL",
    )
    .and_then(|mut s| s.query_row([outbox_id], |r| r.get(0)).optional())
    .map_err(storage)
}

fn delivered(conn: &Connection, outbox_id: i64) -> Result<Reply, DomainError> {
    let now = unix_ms();
    if let Some(tid) = open_outbox(conn, outbox_id)? {
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

fn delivery_failed(
    conn: &Connection,
    outbox_id: i64,
    next_attempt_ms: i64,
    error: &str,
) -> Result<Reply, DomainError> {
    conn.prepare_cached(
        "UPDATE outbox SET attempts = attempts + 1, next_attempt_ms = ?2, last_error = ?3 WHERE id = ?1 AND delivered_ms IS NULL AND failed_ms IS NULL",
    )
    .and_then(|mut s| s.execute(params![outbox_id, next_attempt_ms, error]))
    .map_err(storage)?;
    Ok((200, json!({ "outbox_id": outbox_id })))
}

/// The payee's owner definitively refused the credit: the transfer ends
/// `failed` and the payer gets the amount back, in one transaction and at
/// most once (a closed outbox record is left alone).
fn refund(conn: &Connection, outbox_id: i64, reason: &str) -> Result<Reply, DomainError> {
    let Some(tid) = open_outbox(conn, outbox_id)? else {
        return Ok((200, json!({ "outbox_id": outbox_id, "refunded": false })));
    };
    let (payer, amount): (String, i64) = conn
        .prepare_cached("SELECT from_user, amount FROM transfers WHERE id = ?1")
        .and_then(|mut s| s.query_row([&tid], |r| Ok((r.get(0)?, r.get(1)?))))
        .map_err(storage)?;
    let now = unix_ms();
    let a = existing_account(conn, &payer)?;
    post(
        conn,
        &payer,
        &a,
        Move {
            kind: "refund",
            amount,
            balance_delta: amount,
            frozen_delta: 0,
            reference: &format!("transfer:{tid}"),
        },
    )?;
    conn.prepare_cached("UPDATE outbox SET failed_ms = ?2, last_error = ?3 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![outbox_id, now, reason]))
        .map_err(storage)?;
    conn.prepare_cached(
        "UPDATE transfers SET state = 'failed', reason = ?2, updated_ms = ?3 WHERE id = ?1",
    )
    .and_then(|mut s| s.execute(params![tid, reason, now]))
    .map_err(storage)?;
    Ok((200, json!({ "outbox_id": outbox_id, "refunded": true })))
}
