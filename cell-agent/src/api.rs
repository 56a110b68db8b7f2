//! The cell's HTTP API (JSON). Paths, bodies and errors are documented in
//! `docs/api.md` and `docs/openapi.yaml`.
//!
//! Every `/v1/` request has passed the [`crate::guard`]: its user key
//! belongs to this cell. Handlers additionally require that the user they
//! act on *is* that key (a body or path naming another user is refused), so
//! a request can never touch an account the routing did not send here.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use routing_rules::key::percent_decode;
use routing_rules::{AllHealthy, RouteAttrs};
use serde_json::{json, Value};

use crate::body::{require_json, JsonBody};
use crate::guard::GuardedUser;
use crate::metrics::AgentMetrics;
use crate::rules::RulesHolder;
use crate::store::{DomainError, OrderAction, ReadOp, Store, WriteOp};

pub use crate::body::MAX_BODY_BYTES;
/// Default and largest page sizes.
pub const DEFAULT_PAGE: u32 = 50;
/// Largest page size.
pub const MAX_PAGE: u32 = 500;

/// Shared state of the API.
pub struct Api<S> {
    /// The stores of the shards this agent serves.
    pub shards: crate::shards::Shards<S>,
    /// Rules.
    pub rules: Arc<RulesHolder>,
    /// Metrics.
    pub metrics: AgentMetrics,
    /// Wakes the outbox relay after a cross-cell transfer.
    pub relay_wake: Arc<tokio::sync::Notify>,
    /// False once draining.
    pub ready: std::sync::atomic::AtomicBool,
    /// False while the instance does not hold its control-plane lease
    /// (self-fencing): writes are refused, reads go on.
    pub writes_allowed: Arc<std::sync::atomic::AtomicBool>,
    /// The cluster secret for cell-to-cell calls; without one, cross-cell
    /// transfers are refused (503) rather than left undeliverable.
    pub secret: Option<crate::auth::ClusterSecret>,
    /// Outbox records older than this (ms) count as overdue in `/metrics`.
    pub outbox_alert_after_ms: i64,
    /// Where this cell, as a standby, keeps the replicas of other cells'
    /// shards (`<cell>.replica.db`).
    pub replicas: crate::store::sqlite::replica::Replicas,
}

/// A JSON response.
pub fn json_response(status: u16, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The JSON answer for a domain error (`owner_cell` with a 421).
pub fn error_response(e: &DomainError) -> Response<Full<Bytes>> {
    let mut body = json!({ "error": e.code, "message": e.message });
    if let Some(owner) = &e.owner_cell {
        body["owner_cell"] = owner.as_str().into();
    }
    if let Some(lsn) = e.lsn {
        body["lsn"] = lsn.into();
    }
    let mut r = json_response(e.status, &body);
    if e.retryable() {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// A write's JSON body (already read by the server, at most
/// [`MAX_BODY_BYTES`]): `application/json` (else 415), one object.
pub fn json_body(req: &Request<Bytes>) -> Result<JsonBody, DomainError> {
    require_json(req.headers())?;
    JsonBody::parse(req.body())
}

fn same_user(guarded: &GuardedUser, user: &str, what: &str) -> Result<(), DomainError> {
    if guarded.key != user {
        return Err(DomainError::bad_request(format!(
            "{what} {user:?} does not match the request's user key {:?}",
            guarded.key
        )));
    }
    Ok(())
}

fn query_u(query: Option<&str>, name: &str) -> Result<Option<i64>, DomainError> {
    let Some(q) = query else { return Ok(None) };
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name {
            return v
                .parse::<i64>()
                .ok()
                .filter(|n| *n > 0)
                .map(Some)
                .ok_or_else(|| {
                    DomainError::bad_request(format!("{name} must be a positive integer"))
                });
        }
    }
    Ok(None)
}

fn page(query: Option<&str>) -> Result<(u32, Option<i64>), DomainError> {
    let limit = match query_u(query, "limit")? {
        None => DEFAULT_PAGE,
        Some(l) if l as u64 <= MAX_PAGE as u64 => l as u32,
        Some(_) => {
            return Err(DomainError::bad_request(format!(
                "limit must be 1..={MAX_PAGE}"
            )))
        }
    };
    Ok((limit, query_u(query, "before")?))
}

/// A low-cardinality name of the route, for metrics.
pub fn route_name(method: &Method, segs: &[&str]) -> &'static str {
    match (method, segs) {
        (&Method::POST, ["v1", "accounts", _, "deposit"]) => "deposit",
        (&Method::GET, ["v1", "accounts", _]) => "account",
        (&Method::GET, ["v1", "accounts", _, "ledger"]) => "ledger",
        (&Method::GET, ["v1", "accounts", _, "orders"]) => "user_orders",
        (&Method::POST, ["v1", "orders"]) => "create_order",
        (&Method::GET, ["v1", "orders", _]) => "order",
        (&Method::POST, ["v1", "orders", _, _]) => "order_action",
        (&Method::POST, ["v1", "transfers"]) => "transfer",
        (&Method::GET, ["v1", "transfers", _]) => "get_transfer",
        (&Method::GET, ["healthz"]) => "healthz",
        (&Method::GET, ["readyz"]) => "readyz",
        (&Method::GET, ["metrics"]) => "metrics",
        _ => "other",
    }
}

impl<S: Store> Api<S> {
    /// Answers one request (after the guard).
    pub async fn handle(&self, req: Request<Bytes>) -> Response<Full<Bytes>> {
        let start = Instant::now();
        // Path segments percent-decoded: user ids may hold any character.
        let decoded: Vec<String> = req
            .uri()
            .path()
            .trim_matches('/')
            .split('/')
            .map(|s| String::from_utf8_lossy(&percent_decode(s.as_bytes())).into_owned())
            .collect();
        let segs: Vec<&str> = decoded.iter().map(String::as_str).collect();
        let route = route_name(req.method(), &segs);
        if route == "other" {
            let allowed: Vec<&str> = [Method::GET, Method::POST]
                .iter()
                .filter(|m| route_name(m, &segs) != "other")
                .map(Method::as_str)
                .collect();
            if !allowed.is_empty() {
                let e = DomainError::new(
                    405,
                    "method_not_allowed",
                    format!("use {}", allowed.join(" or ")),
                );
                let mut r = error_response(&e);
                if let Ok(v) = HeaderValue::from_str(&allowed.join(", ")) {
                    r.headers_mut().insert(header::ALLOW, v);
                }
                self.metrics
                    .observe(route, 405, start.elapsed().as_secs_f64());
                return r;
            }
        }
        if route == "metrics" && req.method() == Method::GET {
            return self.metrics_response().await;
        }
        let resp = match self.dispatch(req, &segs).await {
            Ok((status, body)) => json_response(status, &body),
            Err(e) => error_response(&e),
        };
        self.metrics
            .observe(route, resp.status().as_u16(), start.elapsed().as_secs_f64());
        resp
    }

    async fn dispatch(
        &self,
        req: Request<Bytes>,
        segs: &[&str],
    ) -> Result<(u16, Value), DomainError> {
        let method = req.method().clone();
        let query = req.uri().query().map(str::to_string);
        let query = query.as_deref();
        match (&method, segs) {
            (&Method::GET, ["healthz"]) => {
                let table = self.rules.table();
                return Ok((
                    200,
                    json!({"status": "ok", "cell": self.rules.cell(), "revision": table.revision()}),
                ));
            }
            (&Method::GET, ["readyz"]) => {
                // Ready = can take writes now: not draining, and not fenced
                // (the control-plane lease is held). Gateways probe this.
                if !self.ready.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(DomainError::new(503, "draining", "the agent is stopping"));
                }
                self.check_writable()?;
                return Ok((
                    200,
                    json!({"status": "ready", "revision": self.rules.table().revision()}),
                ));
            }
            _ => {}
        }
        if method == Method::POST {
            self.check_writable()?;
        }
        let guarded = req
            .extensions()
            .get::<GuardedUser>()
            .cloned()
            .ok_or_else(|| {
                DomainError::not_found(
                    "not_found",
                    format!("no such endpoint: {method} /{}", segs.join("/")),
                )
            })?;
        let store = self.shards.get(&guarded.shard)?;
        match (&method, segs) {
            (&Method::POST, ["v1", "accounts", user, "deposit"]) => {
                same_user(&guarded, user, "account")?;
                let v = json_body(&req)?;
                v.known_fields(&["amount", "idempotency_key"])?;
                let amount = v.amount()?;
                let key = v.str("idempotency_key")?;
                self.write(
                    &store,
                    WriteOp::Deposit {
                        user: user.to_string(),
                        amount,
                        key,
                        slot: guarded.slot,
                        at: guarded.at,
                    },
                )
                .await
            }
            (&Method::GET, ["v1", "accounts", user]) => {
                same_user(&guarded, user, "account")?;
                store
                    .read(ReadOp::Account {
                        user: user.to_string(),
                    })
                    .await
            }
            (&Method::GET, ["v1", "accounts", user, "ledger"]) => {
                same_user(&guarded, user, "account")?;
                let (limit, before) = page(query)?;
                store
                    .read(ReadOp::Ledger {
                        user: user.to_string(),
                        limit,
                        before,
                    })
                    .await
            }
            (&Method::GET, ["v1", "accounts", user, "orders"]) => {
                same_user(&guarded, user, "account")?;
                let (limit, before) = page(query)?;
                store
                    .read(ReadOp::UserOrders {
                        user: user.to_string(),
                        limit,
                        before,
                    })
                    .await
            }
            (&Method::POST, ["v1", "orders"]) => {
                let v = json_body(&req)?;
                v.known_fields(&["user", "amount", "merchant", "idempotency_key"])?;
                let user = v.str("user")?;
                same_user(&guarded, &user, "user")?;
                let amount = v.amount()?;
                let merchant = v.str("merchant")?;
                let key = v.str("idempotency_key")?;
                self.write(
                    &store,
                    WriteOp::CreateOrder {
                        user,
                        amount,
                        merchant,
                        key,
                        at: guarded.at,
                    },
                )
                .await
            }
            (&Method::GET, ["v1", "orders", id]) => {
                let r = store.read(ReadOp::Order { id: id.to_string() }).await?;
                self.owned_by(&guarded, r, "order", id)
            }
            (&Method::POST, ["v1", "orders", id, action]) => {
                let action = match *action {
                    "try" => OrderAction::Try,
                    "confirm" => OrderAction::Confirm,
                    "cancel" => OrderAction::Cancel,
                    "pay" => OrderAction::Pay,
                    other => {
                        return Err(DomainError::not_found(
                            "not_found",
                            format!("no order action {other:?} (try, confirm, cancel, pay)"),
                        ))
                    }
                };
                // The store checks, in the same transaction, that the order is this user's.
                self.write(
                    &store,
                    WriteOp::Order {
                        id: id.to_string(),
                        action,
                        user: guarded.key.clone(),
                        at: guarded.at,
                    },
                )
                .await
            }
            (&Method::POST, ["v1", "transfers"]) => {
                let v = json_body(&req)?;
                v.known_fields(&["from", "to", "amount", "idempotency_key"])?;
                let from = v.str("from")?;
                same_user(&guarded, &from, "from")?;
                let to = v.str("to")?;
                let amount = v.amount()?;
                let key = v.str("idempotency_key")?;
                let table = self.rules.table();
                let d = table
                    .route(Some(to.as_bytes()), &RouteAttrs::default(), &AllHealthy)
                    .map_err(|_| {
                        DomainError::bad_request(format!("payee {to:?} is not a valid user key"))
                    })?;
                let to_slot = d.slot.ok_or_else(|| {
                    DomainError::bad_request(format!("payee {to:?} is not a valid user key"))
                })?;
                let home = table.cell_name(d.home_cell);
                // Another shard (even one this cell also serves) is credited
                // through the outbox, exactly once, by its own store.
                let to_cell = (home != guarded.shard).then(|| home.to_string());
                let remote = to_cell.is_some();
                if remote && self.secret.is_none() {
                    return Err(DomainError::new(
                        503,
                        "cross_cell_unavailable",
                        format!("payee {to:?} is in cell {home}, and this cell has no internal secret for cell-to-cell credits (--internal-secret-file)"),
                    ));
                }
                let to_at = crate::guard::fence_for(&table, &to);
                let r = self
                    .write(
                        &store,
                        WriteOp::Transfer {
                            from,
                            to,
                            amount,
                            key,
                            to_cell,
                            to_slot,
                            at: guarded.at,
                            to_at,
                        },
                    )
                    .await?;
                if remote {
                    self.relay_wake.notify_one();
                }
                Ok(r)
            }
            (&Method::GET, ["v1", "transfers", id]) => {
                let r = store.read(ReadOp::Transfer { id: id.to_string() }).await?;
                if r.1["from"] != guarded.key.as_str() && r.1["to"] != guarded.key.as_str() {
                    return Err(DomainError::not_found(
                        "unknown_transfer",
                        format!("transfer {id:?} does not exist in this cell"),
                    ));
                }
                Ok(r)
            }
            _ => Err(DomainError::not_found(
                "not_found",
                format!("no such endpoint: {method} /{}", segs.join("/")),
            )),
        }
    }

    fn owned_by(
        &self,
        guarded: &GuardedUser,
        r: (u16, Value),
        what: &str,
        id: &str,
    ) -> Result<(u16, Value), DomainError> {
        if r.1["user"] != guarded.key.as_str() {
            return Err(DomainError::not_found(
                "unknown_order",
                format!("{what} {id:?} does not exist for this user"),
            ));
        }
        Ok(r)
    }

    /// `/metrics`: refreshes the data gauges from the store, then renders.
    async fn metrics_response(&self) -> Response<Full<Bytes>> {
        match self.shards.own().stats(self.outbox_alert_after_ms).await {
            Ok(stats) => self.metrics.set_stats(&stats),
            Err(e) => {
                self.metrics.stats_errors.inc();
                tracing::warn!(error = %e, "cannot read the cell's figures for /metrics");
            }
        }
        let mut r = Response::new(Full::new(Bytes::from(self.metrics.encode())));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        r
    }

    /// Refuses writes while the instance does not hold its control-plane
    /// lease (self-fencing).
    pub fn check_writable(&self) -> Result<(), DomainError> {
        if self
            .writes_allowed
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(());
        }
        Err(DomainError::new(
            503,
            "fenced",
            "this instance does not hold its control-plane lease; writes are refused until it is renewed (reads still work)",
        ))
    }

    /// Runs a write through the store, timing it.
    pub async fn write(&self, store: &S, op: WriteOp) -> Result<(u16, Value), DomainError> {
        let t = Instant::now();
        let r = store.write(op).await;
        self.metrics.db_latency.observe(t.elapsed().as_secs_f64());
        if let Err(e) = &r {
            if matches!(e.code, "overloaded" | "write_expired") {
                self.metrics.writes_shed.with_label_values(&[e.code]).inc();
            }
        }
        r
    }
}
