//! Long-running followers: the rules, a registration under a lease, and
//! the registered instances.

use super::*;

/// First pause before reconnecting after an etcd failure, ms (then
/// doubling, with jitter, up to [`super::MAX_RETRY`]: see [`Backoff`]).
pub const RETRY_MS: u64 = 200;

/// Follows the rules of `cluster`: calls `on_rules` with the current
/// document and again after every change, until `stop` flips.
///
/// Watches the revision key from the etcd revision last seen; each event
/// re-reads document and revision together. A broken session is resumed
/// from the last revision seen; a compacted start re-reads everything.
/// `on_connected` reports the session's health (true/false) so callers
/// can keep serving their last good rules and export the state.
pub async fn follow_rules(
    endpoints: Vec<String>,
    cluster: String,
    mut on_rules: impl FnMut(StoredRules) + Send,
    on_connected: impl Fn(bool) + Send,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut resume_from: i64 = 0;
    let mut backoff = Backoff::new("rules");
    loop {
        if *stop.borrow() {
            return;
        }
        let session = async {
            let mut cp = ControlPlane::connect(&endpoints, &cluster).await?;
            let mut seen = 0;
            if let Some(s) = cp.get().await? {
                seen = s.etcd_revision;
                on_rules(s);
            }
            on_connected(true);
            backoff.ok();
            let start = if resume_from > seen {
                resume_from
            } else {
                seen + 1
            };
            let key = cp.keys().revision();
            let mut events = cp
                .client()
                .watch(
                    key,
                    Some(etcd_client::WatchOptions::new().with_start_revision(start)),
                )
                .await
                .map_err(|e| cp.err(e))?;
            loop {
                let msg = tokio::select! {
                    _ = stop.changed() => return Ok::<(), ControlError>(()),
                    m = events.message() => m.map_err(|e| cp.err(e))?,
                };
                let Some(resp) = msg else {
                    return Err(ControlError::NotFound("the watch closed".into()));
                };
                if resp.compact_revision() > 0 {
                    resume_from = 0;
                    return Err(ControlError::NotFound(format!(
                        "watch start compacted at {}",
                        resp.compact_revision()
                    )));
                }
                if resp.canceled() {
                    return Err(ControlError::NotFound("the watch was canceled".into()));
                }
                let mut changed = false;
                for ev in resp.events() {
                    if let Some(kv) = ev.kv() {
                        seen = seen.max(kv.mod_revision());
                    }
                    changed |= ev.event_type() == etcd_client::EventType::Put;
                }
                if changed {
                    if let Some(s) = cp.get().await? {
                        seen = seen.max(s.etcd_revision);
                        on_rules(s);
                    }
                }
                resume_from = seen + 1;
            }
        };
        match session.await {
            Ok(()) => return,
            Err(e) => {
                on_connected(false);
                if !backoff
                    .pause(&format!("{e}; keeping the last good rules"), &mut stop)
                    .await
                {
                    return;
                }
            }
        }
    }
}

/// Keeps `key` registered with the latest value of `value` under a lease of
/// `ttl_s` seconds, re-granting after a loss, until `stop` flips.
/// `on_lease` reports whether the lease is held — cell agents fence
/// themselves on it. When the connection to etcd fails, the lease is still
/// reported held until it could lapse at etcd (2/3 of the TTL after the last
/// acknowledged renewal; a renewal is acknowledged after etcd restarted the
/// lease's clock), so a short etcd outage does not stop writes; false at once
/// when etcd says the lease expired.
pub async fn keep_registered(
    endpoints: Vec<String>,
    cluster: String,
    key: String,
    mut value: tokio::sync::watch::Receiver<String>,
    ttl_s: i64,
    on_lease: impl Fn(bool) + Send,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // Fenced while it has no lease: retried at least every second.
    let mut backoff = Backoff::up_to(
        format!("registration of {key}"),
        std::time::Duration::from_secs(1),
    );
    let ttl = std::time::Duration::from_secs(ttl_s as u64);
    // After a failed session: when the old lease could lapse at etcd.
    let mut fence_at: Option<tokio::time::Instant> = None;
    // The last acknowledged renewal of any session.
    let mut last_ack: Option<tokio::time::Instant> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let granted = std::sync::atomic::AtomicBool::new(false);
        let result = {
            let session = session(
                (&endpoints, &cluster, &key),
                &mut value,
                ttl,
                (&on_lease, &granted, &mut last_ack),
                &mut stop,
            );
            tokio::pin!(session);
            match fence_at.take() {
                Some(at) => tokio::select! {
                    r = &mut session => r,
                    _ = tokio::time::sleep_until(at) => {
                        if !granted.load(std::sync::atomic::Ordering::Acquire) {
                            on_lease(false);
                        }
                        session.await
                    }
                },
                None => session.await,
            }
        };
        let e = match result {
            Ok(()) => return,
            Err(e) => e,
        };
        if granted.load(std::sync::atomic::Ordering::Acquire) {
            backoff.ok();
        }
        let expired = matches!(&e, ControlError::NotFound(m) if m == "the lease expired");
        let now = tokio::time::Instant::now();
        fence_at = last_ack
            .map(|t| t + ttl * 2 / 3)
            .filter(|at| *at > now && !expired);
        match fence_at {
            None => on_lease(false),
            // Said once, when a session that held the lease fails.
            Some(at) if granted.load(std::sync::atomic::Ordering::Acquire) => tracing::warn!(
                error = %e,
                writes_for_ms = (at - now).as_millis() as u64,
                "lost the control plane: writes stay open until the lease could lapse"
            ),
            Some(_) => {}
        }
        let why = e.to_string();
        let pause = backoff.pause(&why, &mut stop);
        tokio::pin!(pause);
        let go_on = match fence_at {
            Some(at) => tokio::select! {
                c = &mut pause => c,
                _ = tokio::time::sleep_until(at) => {
                    on_lease(false);
                    fence_at = None;
                    pause.await
                }
            },
            None => pause.await,
        };
        if !go_on {
            return;
        }
    }
}

/// One registration session: grants a lease, registers `key` under it,
/// renews it until an error (or `stop`: `Ok`). Records when a renewal was
/// last acknowledged, and that a lease was granted.
async fn session(
    (endpoints, cluster, key): (&[String], &str, &str),
    value: &mut tokio::sync::watch::Receiver<String>,
    ttl: std::time::Duration,
    (on_lease, granted, last_ack_out): (
        &(impl Fn(bool) + Send),
        &std::sync::atomic::AtomicBool,
        &mut Option<tokio::time::Instant>,
    ),
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<(), ControlError> {
    let mut cp = ControlPlane::connect(endpoints, cluster).await?;
    let lease = cp
        .client()
        .lease_grant(ttl.as_secs() as i64, None)
        .await
        .map_err(|e| cp.err(e))?
        .id();
    let (mut keeper, mut acks) = cp
        .client()
        .lease_keep_alive(lease)
        .await
        .map_err(|e| cp.err(e))?;
    let put = |v: String| {
        etcd_client::TxnOp::put(
            key.to_string(),
            v,
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
    };
    let current = value.borrow_and_update().clone();
    cp.client()
        .txn(Txn::new().and_then(vec![put(current)]))
        .await
        .map_err(|e| cp.err(e))?;
    let mut last_ack = tokio::time::Instant::now();
    *last_ack_out = Some(last_ack);
    granted.store(true, std::sync::atomic::Ordering::Release);
    on_lease(true);
    // Renew well inside the TTL, and give the lease up (fence) before the
    // server could expire it: if no renewal has been acknowledged for 2/3
    // of the TTL, this session is over.
    let mut tick = tokio::time::interval((ttl / 6).max(std::time::Duration::from_millis(50)));
    loop {
        tokio::select! {
            _ = stop.changed() => {
                let _ = cp.client().lease_revoke(lease).await;
                return Ok(());
            }
            _ = tick.tick() => {
                if last_ack.elapsed() >= ttl * 2 / 3 {
                    return Err(ControlError::NotFound("the lease was not renewed in time".into()));
                }
                let renewed = tokio::time::timeout(ttl / 6, keeper.keep_alive()).await;
                match renewed {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Err(cp.err(e)),
                    Err(_) => return Err(ControlError::NotFound("lease keep-alive timed out".into())),
                }
            }
            ack = acks.message() => {
                match ack.map_err(|e| cp.err(e))? {
                    Some(a) if a.ttl() > 0 => {
                        last_ack = tokio::time::Instant::now();
                        *last_ack_out = Some(last_ack);
                        on_lease(true);
                    }
                    _ => return Err(ControlError::NotFound("the lease expired".into())),
                }
            }
            changed = value.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let v = value.borrow_and_update().clone();
                cp.client().txn(Txn::new().and_then(vec![put(v)])).await.map_err(|e| cp.err(e))?;
            }
        }
    }
}

/// The pseudo-colour under which [`Registered`] lists a cell's internal
/// (cell-to-cell) listener addresses.
pub const INTERNAL: &str = "internal";

/// Registered instance addresses by `(cell, colour)`, plus each cell's
/// internal listener addresses under `(cell, INTERNAL)`.
pub type Registered = std::collections::BTreeMap<(String, String), Vec<String>>;

/// Follows the instance registrations of `cluster`: calls `on_change` with
/// the full set after the first read and after every change (a lapsed lease
/// deletes its key, so the instance leaves the set), until `stop` flips.
pub async fn follow_instances(
    endpoints: Vec<String>,
    cluster: String,
    mut on_change: impl FnMut(Registered) + Send,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new("instances");
    loop {
        if *stop.borrow() {
            return;
        }
        let session = async {
            let mut cp = ControlPlane::connect(&endpoints, &cluster).await?;
            let prefix = cp.keys().instances_prefix();
            let resp = cp
                .client()
                .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(|e| cp.err(e))?;
            let start = resp.header().map(|h| h.revision()).unwrap_or(0) + 1;
            // key → [((cell, colour), address)]; an agent's internal
            // (cell-to-cell) address is listed under the colour "internal".
            type Entries = Vec<((String, String), String)>;
            let mut by_key: std::collections::BTreeMap<Vec<u8>, Entries> = Default::default();
            let parse = |value: &[u8]| -> Option<Entries> {
                let v: serde_json::Value = serde_json::from_slice(value).ok()?;
                let cell = v["cell"].as_str()?.to_string();
                let mut out = vec![(
                    (cell.clone(), v["colour"].as_str()?.to_string()),
                    v["address"].as_str()?.to_string(),
                )];
                if let Some(internal) = v["internal_address"].as_str() {
                    out.push(((cell, INTERNAL.to_string()), internal.to_string()));
                }
                Some(out)
            };
            for kv in resp.kvs() {
                if let Some(e) = parse(kv.value()) {
                    by_key.insert(kv.key().to_vec(), e);
                }
            }
            let snapshot = |by_key: &std::collections::BTreeMap<Vec<u8>, Entries>| {
                let mut r = Registered::new();
                for (cc, addr) in by_key.values().flatten() {
                    r.entry(cc.clone()).or_default().push(addr.clone());
                }
                r
            };
            on_change(snapshot(&by_key));
            backoff.ok();
            let mut events = cp
                .client()
                .watch(
                    prefix,
                    Some(
                        etcd_client::WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(start),
                    ),
                )
                .await
                .map_err(|e| cp.err(e))?;
            loop {
                let msg = tokio::select! {
                    _ = stop.changed() => return Ok::<(), ControlError>(()),
                    m = events.message() => m.map_err(|e| cp.err(e))?,
                };
                let Some(resp) = msg else {
                    return Err(ControlError::NotFound("the watch closed".into()));
                };
                if resp.canceled() || resp.compact_revision() > 0 {
                    return Err(ControlError::NotFound(
                        "the instances watch was canceled".into(),
                    ));
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    match ev.event_type() {
                        etcd_client::EventType::Put => {
                            if let Some(e) = parse(kv.value()) {
                                by_key.insert(kv.key().to_vec(), e);
                            }
                        }
                        etcd_client::EventType::Delete => {
                            by_key.remove(kv.key());
                        }
                    }
                }
                on_change(snapshot(&by_key));
            }
        };
        match session.await {
            Ok(()) => return,
            Err(e) => {
                if !backoff.pause(&e.to_string(), &mut stop).await {
                    return;
                }
            }
        }
    }
}
