//! The read-only admin API: `/metrics`, `/admin/rules`, `/admin/route`,
//! `/admin/health`, `/healthz`, `/readyz`. Bound to loopback by default;
//! with a token, `/metrics` and `/admin/*` need `Authorization: Bearer TOKEN`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use routing_rules::key::{extract_key, RequestParts};
use routing_rules::{CellIdx, Colour, KeySource, RouteAttrs};
use serde_json::json;

use crate::control::Control;
use crate::upstream::now_ms;

/// Shared state of the admin API.
#[derive(Debug)]
pub struct Admin {
    control: Arc<Control>,
    token: Option<String>,
    draining: AtomicBool,
    rules_path: String,
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json_response(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", v.to_string())
}

fn error(status: StatusCode, error: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(status, json!({ "error": error, "message": message }))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The first value of query parameter `name`, percent-decoded (the same
/// parsing as a `source = "query"` routing key).
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    let no_headers = |_: &str| None;
    let parts = RequestParts {
        headers: &no_headers,
        path: "",
        query,
    };
    let source = KeySource::Query {
        name: name.to_string(),
    };
    extract_key(&source, &parts).map(|v| String::from_utf8_lossy(&v).into_owned())
}

impl Admin {
    /// Admin API over `control`.
    pub fn new(control: Arc<Control>, token: Option<String>, rules_path: String) -> Arc<Self> {
        Arc::new(Admin {
            control,
            token,
            draining: AtomicBool::new(false),
            rules_path,
        })
    }

    /// Marks the gateway as draining: `/readyz` answers 503.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    fn authorised<B>(&self, req: &Request<B>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let expected = format!("Bearer {token}");
        req.headers()
            .get(header::AUTHORIZATION)
            .is_some_and(|v| constant_time_eq(v.as_bytes(), expected.as_bytes()))
    }

    /// Answers one admin request.
    pub fn handle<B>(&self, req: &Request<B>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "the admin API is read-only: use GET",
            );
        }
        match path {
            "/healthz" => return respond(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => {
                return if self.draining.load(Ordering::Relaxed) {
                    respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "draining\n".into(),
                    )
                } else {
                    respond(StatusCode::OK, "text/plain", "ready\n".into())
                }
            }
            _ => {}
        }
        if !self.authorised(req) {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this endpoint needs Authorization: Bearer <admin token>",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        match path {
            "/metrics" => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.control.metrics().encode(),
            ),
            "/admin/rules" => self.rules(),
            "/admin/route" => self.route(req.uri().query()),
            "/admin/health" => self.health(),
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "endpoints: /healthz /readyz /metrics /admin/rules /admin/route?key=K /admin/health",
            ),
        }
    }

    fn rules(&self) -> Response<Full<Bytes>> {
        let gen = self.control.current();
        let rules = gen.table.rules();
        let per_cell = rules.slots_per_cell();
        let cells: BTreeMap<&str, serde_json::Value> = rules
            .cells
            .iter()
            .map(|(name, c)| {
                (
                    name.as_str(),
                    json!({
                        "state": c.state,
                        "failover_policy": c.failover_policy,
                        "failover": c.failover,
                        "slots": per_cell.get(name.as_str()).copied().unwrap_or(0),
                        "green_share": c.split.green,
                        "instances": { "blue": c.blue, "green": c.green },
                    }),
                )
            })
            .collect();
        let loaded_at = gen
            .loaded_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        json_response(
            StatusCode::OK,
            json!({
                "revision": gen.table.revision(),
                "source": self.rules_path,
                "loaded_at_unix_ms": loaded_at,
                "slots": rules.slots,
                "hash": rules.hash,
                "key": rules.key,
                "on_missing": rules.on_missing,
                "overrides": rules.overrides.len(),
                "cells": cells,
            }),
        )
    }

    fn route(&self, query: Option<&str>) -> Response<Full<Bytes>> {
        let Some(key) = query_param(query, "key") else {
            return error(
                StatusCode::BAD_REQUEST,
                "missing_key",
                "give the user key as ?key=K (and optionally &tester_colour=blue|green)",
            );
        };
        let tester = query_param(query, "tester_colour");
        let gen = self.control.current();
        let attrs = RouteAttrs {
            tester_colour: tester.as_deref().map(str::as_bytes),
        };
        match gen.table.route(Some(key.as_bytes()), &attrs, &gen.health()) {
            Ok(d) => json_response(
                StatusCode::OK,
                serde_json::to_value(gen.table.explain(&key, &d)).unwrap_or_default(),
            ),
            Err(p) => error(
                StatusCode::BAD_REQUEST,
                p.as_str(),
                "the rules reject this key (the proxy would answer 400)",
            ),
        }
    }

    fn health(&self) -> Response<Full<Bytes>> {
        let gen = self.control.current();
        let now = now_ms();
        let mut cells = BTreeMap::new();
        let mut instances = Vec::new();
        for (idx, cell) in gen.table.cells().iter().enumerate() {
            let mut colours = BTreeMap::new();
            for colour in Colour::ALL {
                let group = gen.group(idx as CellIdx, colour);
                colours.insert(colour.as_str(), group.any_up(now));
                instances.extend(group.instances.iter().map(|i| i.status(now)));
            }
            let (serving, moved) = gen.table.serving_cell(idx as CellIdx, &gen.health());
            cells.insert(
                cell.name.to_string(),
                json!({
                    "up": colours,
                    "serving_cell": gen.table.cell_name(serving),
                    "failed_over": moved,
                    "inflight": gen.cells[idx].limiter.inflight(),
                }),
            );
        }
        json_response(
            StatusCode::OK,
            json!({ "revision": gen.table.revision(), "cells": cells, "instances": instances }),
        )
    }
}
