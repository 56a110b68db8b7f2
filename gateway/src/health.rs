//! Active health checks: one task per instance, HTTP GET of the health
//! path on a fresh connection every interval, with rise/fall thresholds.
//! The task holds only a weak reference and ends when the instance leaves
//! the rules.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::upstream::{now_ms, Instance};

/// Active-check settings.
#[derive(Debug, Clone)]
pub struct HealthSettings {
    /// Path to GET.
    pub path: String,
    /// Between checks.
    pub interval: Duration,
    /// Per check.
    pub timeout: Duration,
    /// Successes to go up.
    pub rise: u32,
    /// Failures to go down.
    pub fall: u32,
    /// Counts every up/down transition of any instance: requests held for
    /// a moving shard are routed again when health changes, not only when
    /// newer rules arrive (a cell coming back up after a failback).
    pub changed: Arc<tokio::sync::watch::Sender<u64>>,
}

/// One check: GET `path` on a new connection; true on 2xx within `timeout`.
pub async fn check_once(address: &str, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let stream = TcpStream::connect(address).await.ok()?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get(path)
            .header(http::header::HOST, address)
            .header(http::header::USER_AGENT, "cellgate-health")
            .body(Empty::new())
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        Some(resp.status().is_success())
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// Runs the active checks of one instance until it is dropped.
pub async fn run_checks(instance: Weak<Instance>, settings: Arc<HealthSettings>) {
    let (mut rises, mut falls) = (0u32, 0u32);
    loop {
        let Some(inst) = instance.upgrade() else {
            return;
        };
        let ok = check_once(&inst.address, &settings.path, settings.timeout).await;
        if ok {
            falls = 0;
            rises = rises.saturating_add(1);
            if !inst.active_up() && rises >= settings.rise && inst.set_active_up(true) {
                tracing::info!(cell = %inst.cell, colour = %inst.colour, instance = %inst.address, "instance is up (active checks pass)");
                settings.changed.send_modify(|n| *n += 1);
            }
        } else {
            rises = 0;
            falls = falls.saturating_add(1);
            if inst.active_up() && falls >= settings.fall && inst.set_active_up(false) {
                tracing::warn!(cell = %inst.cell, colour = %inst.colour, instance = %inst.address, failures = falls, "instance is down (active checks fail)");
                settings.changed.send_modify(|n| *n += 1);
            }
        }
        inst.refresh_gauge(now_ms());
        drop(inst);
        tokio::time::sleep(settings.interval).await;
    }
}
