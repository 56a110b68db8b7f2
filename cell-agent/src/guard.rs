//! The cell guard: a tower [`Layer`] that lets through only requests whose
//! user this cell owns under the rules it holds, and answers every other
//! request `421 Misdirected Request` naming the owning cell.
//!
//! Reusable by any Rust service of a cell: give it an [`OwnershipView`].
//! A request stamped (`x-cellgate-rev`) with a newer revision than the
//! view's makes the view catch up first; a request for a user this cell
//! gave away in a newer revision is refused even when the gateway that sent
//! it is stale.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use routing_rules::key::{extract_key, HeaderLookup, RequestParts};
use routing_rules::{AllHealthy, RouteAttrs, RoutingTable, STAMP_EPOCH, STAMP_REV};

use crate::store::SlotStamp;
use tower::{Layer, Service};

/// What the guard needs to know.
pub trait OwnershipView: Send + Sync + 'static {
    /// The rules now.
    fn table(&self) -> Arc<RoutingTable>;
    /// This cell's name.
    fn cell(&self) -> &str;
    /// Catch up to `revision` if possible (reload the rules).
    fn catch_up(&self, revision: u64) -> impl Future<Output = ()> + Send;
}

impl OwnershipView for crate::rules::RulesHolder {
    fn table(&self) -> Arc<RoutingTable> {
        crate::rules::RulesHolder::table(self)
    }
    fn cell(&self) -> &str {
        crate::rules::RulesHolder::cell(self)
    }
    fn catch_up(&self, revision: u64) -> impl Future<Output = ()> + Send {
        crate::rules::RulesHolder::catch_up(self, revision)
    }
}

/// The guarded user, put in the request's extensions for handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardedUser {
    /// The routing key (user id).
    pub key: String,
    /// Its slot.
    pub slot: u32,
    /// Rules revision the decision was made at.
    pub revision: u64,
    /// The slot fence its writes carry (`None` for a user placed in this
    /// cell by a per-user override: the guard alone fences those).
    pub at: Option<SlotStamp>,
    /// The cell whose shard holds the user: this cell, or a cell whose
    /// shard a switchover moved here (`hosted_by`).
    pub shard: String,
}

/// The slot fence of `user`'s writes under `table`: its slot at the
/// slot's epoch, or `None` when the user's home is set by a per-user
/// override (not by its slot) or the key maps to no slot.
pub fn fence_for(table: &RoutingTable, user: &str) -> Option<SlotStamp> {
    let d = table
        .route(Some(user.as_bytes()), &RouteAttrs::default(), &AllHealthy)
        .ok()?;
    let slot = d.slot?;
    (table.slot_cell(slot) == d.home_cell).then(|| SlotStamp {
        slot,
        epoch: table.slot_epoch(slot),
    })
}

/// Layer that adds the guard. Only paths under `prefix` are guarded.
#[derive(Debug)]
pub struct GuardLayer<V> {
    view: Arc<V>,
    prefix: &'static str,
}

impl<V> Clone for GuardLayer<V> {
    fn clone(&self) -> Self {
        GuardLayer {
            view: self.view.clone(),
            prefix: self.prefix,
        }
    }
}

impl<V: OwnershipView> GuardLayer<V> {
    /// Guards every path that starts with `prefix` (e.g. `/v1/`).
    pub fn new(view: Arc<V>, prefix: &'static str) -> Self {
        GuardLayer { view, prefix }
    }
}

impl<S, V> Layer<S> for GuardLayer<V> {
    type Service = Guard<S, V>;
    fn layer(&self, inner: S) -> Guard<S, V> {
        Guard {
            inner,
            view: self.view.clone(),
            prefix: self.prefix,
        }
    }
}

/// The guard service.
#[derive(Debug)]
pub struct Guard<S, V> {
    inner: S,
    view: Arc<V>,
    prefix: &'static str,
}

impl<S: Clone, V> Clone for Guard<S, V> {
    fn clone(&self) -> Self {
        Guard {
            inner: self.inner.clone(),
            view: self.view.clone(),
            prefix: self.prefix,
        }
    }
}

struct Headers<'a>(&'a http::HeaderMap);
impl HeaderLookup for Headers<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.0.get(name).map(HeaderValue::as_bytes)
    }
}

fn reject<B: From<Bytes>>(status: StatusCode, body: serde_json::Value) -> Response<B> {
    let mut r = Response::new(B::from(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The revision a request is stamped with: `Ok(None)` when absent, `Err`
/// (a 400) when malformed.
pub fn stamped_revision<B>(
    req: &Request<B>,
) -> Result<Option<u64>, (StatusCode, serde_json::Value)> {
    match req.headers().get(STAMP_REV) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|r| *r >= 0)
            .map(|r| Some(r as u64))
            .ok_or_else(|| {
                (
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "malformed_revision", "message": format!("{STAMP_REV} must be a revision number (0..=9223372036854775807)")}),
                )
            }),
    }
}

/// The slot epoch a request is stamped with (`x-cellgate-epoch`):
/// `Ok(None)` when absent, `Err` (a 400) when malformed.
pub fn stamped_epoch<B>(req: &Request<B>) -> Result<Option<u64>, (StatusCode, serde_json::Value)> {
    match req.headers().get(STAMP_EPOCH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|e| (routing_rules::FIRST_EPOCH..=routing_rules::MAX_EPOCH).contains(e))
            .map(Some)
            .ok_or_else(|| {
                (
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "malformed_epoch", "message": format!("{STAMP_EPOCH} must be an epoch ({}..={})", routing_rules::FIRST_EPOCH, routing_rules::MAX_EPOCH)}),
                )
            }),
    }
}

/// After a catch-up to `stamped`: refuses (503 `rules_behind`, retryable)
/// when the view still holds older rules than the request was routed
/// with — a stale cell must not decide ownership with rules it knows are
/// outdated.
pub fn caught_up<V: OwnershipView + ?Sized>(
    view: &V,
    stamped: u64,
) -> Result<(), (StatusCode, serde_json::Value)> {
    let held = view.table().revision();
    if held >= stamped {
        return Ok(());
    }
    Err((
        StatusCode::SERVICE_UNAVAILABLE,
        serde_json::json!({
            "error": "rules_behind",
            "message": format!("this cell holds rules revision {held} but the request was routed with revision {stamped}, which it cannot load yet; retry"),
            "revision": held,
        }),
    ))
}

/// The guard's verdict for a request with the rules the view holds now
/// (the layer first lets the view catch up to a newer stamped revision).
pub fn decide<B, V: OwnershipView + ?Sized>(
    view: &V,
    req: &Request<B>,
) -> Result<GuardedUser, (StatusCode, serde_json::Value)> {
    stamped_revision(req)?;
    let table = view.table();
    let headers = Headers(req.headers());
    let parts = RequestParts {
        headers: &headers,
        path: req.uri().path(),
        query: req.uri().query(),
    };
    let key = extract_key(&table.rules().key, &parts);
    let Some(key) = key else {
        return Err((
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "missing_key", "message": "the request carries no user key (routing key)"}),
        ));
    };
    let Ok(key) = String::from_utf8(key.into_owned()) else {
        return Err((
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "malformed_key", "message": "the user key is malformed"}),
        ));
    };
    let user = owned_here(view, &table, key)?;
    match (stamped_epoch(req)?, user.at) {
        (Some(stamp), Some(at)) if stamp < at.epoch => Err((
            StatusCode::MISDIRECTED_REQUEST,
            serde_json::json!({
                "error": "stale_epoch",
                "message": format!("slot {} is at epoch {} in rules revision {}, but the request was routed with epoch {stamp}: the router's rules are stale", at.slot, at.epoch, table.revision()),
                "owner_cell": view.cell(),
                "slot": at.slot,
                "epoch": at.epoch,
                "revision": table.revision(),
            }),
        )),
        (Some(stamp), Some(at)) if stamp > at.epoch => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({
                "error": "rules_behind",
                "message": format!("slot {} is at epoch {} in this cell's rules (revision {}), but the request was routed with epoch {stamp}; retry", at.slot, at.epoch, table.revision()),
                "revision": table.revision(),
            }),
        )),
        _ => Ok(user),
    }
}

/// Whether `key`'s home cell under `table` is the view's cell: the guarded
/// user, or 400 (malformed key) / 421 naming the owner.
pub fn owned_here<V: OwnershipView + ?Sized>(
    view: &V,
    table: &RoutingTable,
    key: String,
) -> Result<GuardedUser, (StatusCode, serde_json::Value)> {
    let malformed = || {
        (
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "malformed_key", "message": "the user key is malformed"}),
        )
    };
    let d = table
        .route(Some(key.as_bytes()), &RouteAttrs::default(), &AllHealthy)
        .map_err(|_| malformed())?;
    let Some(slot) = d.slot else {
        return Err((
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "malformed_key", "message": "the user key does not map to a slot"}),
        ));
    };
    let home = table.cell_name(d.home_cell);
    let owner = table.rules().host_of(home);
    if owner != view.cell() {
        let whose = if owner == home {
            String::new()
        } else {
            format!(" (which holds cell {home}'s shard)")
        };
        return Err((
            StatusCode::MISDIRECTED_REQUEST,
            serde_json::json!({
                "error": "misdirected",
                "message": format!("user {key:?} (slot {slot}) belongs to cell {owner}{whose}, not {}", view.cell()),
                "owner_cell": owner,
                "slot": slot,
                "revision": table.revision(),
            }),
        ));
    }
    let at = (table.slot_cell(slot) == d.home_cell).then(|| SlotStamp {
        slot,
        epoch: table.slot_epoch(slot),
    });
    Ok(GuardedUser {
        key,
        slot,
        revision: table.revision(),
        at,
        shard: home.to_string(),
    })
}

impl<S, V, ReqBody, ResBody> Service<Request<ReqBody>> for Guard<S, V>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    V: OwnershipView,
    ReqBody: Send + 'static,
    ResBody: From<Bytes> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        if !req.uri().path().starts_with(self.prefix) {
            return Box::pin(self.inner.call(req));
        }
        // A newer stamped revision than ours: catch up before deciding.
        let newer = match stamped_revision(&req) {
            Ok(Some(rev)) if rev > self.view.table().revision() => Some(rev),
            _ => None,
        };
        if let Some(rev) = newer {
            let view = self.view.clone();
            let mut inner = self.inner.clone();
            return Box::pin(async move {
                view.catch_up(rev).await;
                if let Err((status, body)) = caught_up(&*view, rev) {
                    let mut r = reject(status, body);
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return Ok(r);
                }
                match decide(&*view, &req) {
                    Ok(user) => {
                        req.extensions_mut().insert(user);
                        inner.call(req).await
                    }
                    Err((status, body)) => Ok(reject(status, body)),
                }
            });
        }
        match decide(&*self.view, &req) {
            Ok(user) => {
                req.extensions_mut().insert(user);
                Box::pin(self.inner.call(req))
            }
            Err((status, body)) => Box::pin(async move { Ok(reject(status, body)) }),
        }
    }
}
