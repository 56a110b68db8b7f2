//! The read operations, on a pooled read-only connection.

use rusqlite::{params, Connection};
use serde_json::{json, Value};

use super::ledger::*;
use super::storage;
use crate::store::{DomainError, ReadOp, Reply};

pub(super) fn read_op(conn: &Connection, op: &ReadOp) -> Result<Reply, DomainError> {
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
