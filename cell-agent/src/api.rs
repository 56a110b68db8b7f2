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
use http_body_util::{BodyExt, Full, Limited};
use routing_rules::key::percent_decode;
use routing_rules::{AllHealthy, RouteAttrs};
use serde_json::{json, Value};

use crate::guard::GuardedUser;
use crate::metrics::AgentMetrics;
use crate::rules::RulesHolder;
use crate::store::{DomainError, OrderAction, ReadOp, Store, WriteOp};

/// Largest request body accepted, bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Default and largest page sizes.
pub const DEFAULT_PAGE: u32 = 50;
/// Largest page size.
pub const MAX_PAGE: u32 = 500;

/// Shared state of the API.
pub struct Api<S> {
    /// The store.
    pub store: S,
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

fn error_response(e: &DomainError) -> Response<Full<Bytes>> {
    json_response(e.status, &json!({ "error": e.code, "message": e.message }))
}

async fn body_json(req: Request<hyper::body::Incoming>) -> Result<Value, DomainError> {
    let bytes = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            DomainError::bad_request(format!(
                "cannot read the body (limit {MAX_BODY_BYTES} bytes): {e}"
            ))
        })?
        .to_bytes();
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| DomainError::bad_request(format!("malformed JSON: {e}")))?;
    if !v.is_object() {
        return Err(DomainError::bad_request("the body must be a JSON object"));
    }
    Ok(v)
}

fn field_str(v: &Value, name: &str) -> Result<String, DomainError> {
    match v.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        Some(Value::String(_)) => Err(DomainError::bad_request(format!(
            "{name} must not be empty"
        ))),
        Some(_) => Err(DomainError::bad_request(format!("{name} must be a string"))),
        None => Err(DomainError::bad_request(format!("missing field {name}"))),
    }
}

/// An amount: an integer number of minor units in 1..=i64::MAX.
fn field_amount(v: &Value) -> Result<i64, DomainError> {
    match v.get("amount") {
        None => Err(DomainError::bad_request("missing field amount")),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(a) if a > 0 => Ok(a),
            Some(a) => Err(DomainError::unprocessable(
                "invalid_amount",
                format!("amount must be a positive number of minor units, got {a}"),
            )),
            None if n.is_u64() => Err(DomainError::unprocessable(
                "amount_overflow",
                "amount does not fit in a signed 64-bit number of minor units",
            )),
            None => Err(DomainError::unprocessable(
                "invalid_amount",
                "amount must be an integer number of minor units (no fractions)",
            )),
        },
        Some(_) => Err(DomainError::unprocessable(
            "invalid_amount",
            "amount must be a JSON integer of minor units",
        )),
    }
}

fn known_fields(v: &Value, allowed: &[&str]) -> Result<(), DomainError> {
    if let Some(obj) = v.as_object() {
        if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(DomainError::bad_request(format!(
                "unknown field {k:?} (expected: {})",
                allowed.join(", ")
            )));
        }
    }
    Ok(())
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
        (&Method::POST, ["v1", "internal", "credits"]) => "credit",
        (&Method::GET, ["healthz"]) => "healthz",
        (&Method::GET, ["readyz"]) => "readyz",
        (&Method::GET, ["metrics"]) => "metrics",
        _ => "other",
    }
}

impl<S: Store> Api<S> {
    /// Answers one request (after the guard).
    pub async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
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
        req: Request<hyper::body::Incoming>,
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
                return if self.ready.load(std::sync::atomic::Ordering::Relaxed) {
                    Ok((200, json!({"status": "ready"})))
                } else {
                    Err(DomainError::unavailable("draining"))
                };
            }
            _ => {}
        }
        if method == Method::POST
            && !self
                .writes_allowed
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(DomainError::new(
                503,
                "fenced",
                "this instance does not hold its control-plane lease; writes are refused until it is renewed (reads still work)",
            ));
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
        match (&method, segs) {
            (&Method::POST, ["v1", "accounts", user, "deposit"]) => {
                same_user(&guarded, user, "account")?;
                let v = body_json(req).await?;
                known_fields(&v, &["amount", "idempotency_key"])?;
                let amount = field_amount(&v)?;
                let key = field_str(&v, "idempotency_key")?;
                self.write(WriteOp::Deposit {
                    user: user.to_string(),
                    amount,
                    key,
                    slot: guarded.slot,
                })
                .await
            }
            (&Method::GET, ["v1", "accounts", user]) => {
                same_user(&guarded, user, "account")?;
                self.store
                    .read(ReadOp::Account {
                        user: user.to_string(),
                    })
                    .await
            }
            (&Method::GET, ["v1", "accounts", user, "ledger"]) => {
                same_user(&guarded, user, "account")?;
                let (limit, before) = page(query)?;
                self.store
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
                self.store
                    .read(ReadOp::UserOrders {
                        user: user.to_string(),
                        limit,
                        before,
                    })
                    .await
            }
            (&Method::POST, ["v1", "orders"]) => {
                let v = body_json(req).await?;
                known_fields(&v, &["user", "amount", "merchant", "idempotency_key"])?;
                let user = field_str(&v, "user")?;
                same_user(&guarded, &user, "user")?;
                let amount = field_amount(&v)?;
                let merchant = field_str(&v, "merchant")?;
                let key = field_str(&v, "idempotency_key")?;
                self.write(WriteOp::CreateOrder {
                    user,
                    amount,
                    merchant,
                    key,
                })
                .await
            }
            (&Method::GET, ["v1", "orders", id]) => {
                let r = self
                    .store
                    .read(ReadOp::Order { id: id.to_string() })
                    .await?;
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
                self.write(WriteOp::Order {
                    id: id.to_string(),
                    action,
                    user: guarded.key.clone(),
                })
                .await
            }
            (&Method::POST, ["v1", "transfers"]) => {
                let v = body_json(req).await?;
                known_fields(&v, &["from", "to", "amount", "idempotency_key"])?;
                let from = field_str(&v, "from")?;
                same_user(&guarded, &from, "from")?;
                let to = field_str(&v, "to")?;
                let amount = field_amount(&v)?;
                let key = field_str(&v, "idempotency_key")?;
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
                let to_cell = (home != self.rules.cell()).then(|| home.to_string());
                let remote = to_cell.is_some();
                let r = self
                    .write(WriteOp::Transfer {
                        from,
                        to,
                        amount,
                        key,
                        to_cell,
                        to_slot,
                    })
                    .await?;
                if remote {
                    self.relay_wake.notify_one();
                }
                Ok(r)
            }
            (&Method::GET, ["v1", "transfers", id]) => {
                let r = self
                    .store
                    .read(ReadOp::Transfer { id: id.to_string() })
                    .await?;
                if r.1["from"] != guarded.key.as_str() && r.1["to"] != guarded.key.as_str() {
                    return Err(DomainError::not_found(
                        "unknown_transfer",
                        format!("transfer {id:?} does not exist in this cell"),
                    ));
                }
                Ok(r)
            }
            (&Method::POST, ["v1", "internal", "credits"]) => {
                let v = body_json(req).await?;
                known_fields(&v, &["transfer_id", "from_cell", "to", "amount"])?;
                let to = field_str(&v, "to")?;
                same_user(&guarded, &to, "to")?;
                let transfer_id = field_str(&v, "transfer_id")?;
                let from_cell = field_str(&v, "from_cell")?;
                let amount = field_amount(&v)?;
                self.write(WriteOp::Credit {
                    transfer_id,
                    from_cell,
                    to,
                    amount,
                    slot: guarded.slot,
                })
                .await
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
        if let Ok(stats) = self.store.stats().await {
            self.metrics.set_stats(&stats);
        }
        let mut r = Response::new(Full::new(Bytes::from(self.metrics.encode())));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        r
    }

    async fn write(&self, op: WriteOp) -> Result<(u16, Value), DomainError> {
        let t = Instant::now();
        let r = self.store.write(op).await;
        self.metrics.db_latency.observe(t.elapsed().as_secs_f64());
        r
    }
}
