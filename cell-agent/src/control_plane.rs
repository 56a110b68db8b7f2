//! With `--etcd`: the agent follows the rules in etcd, registers its
//! instance under a lease, and learns the other cells' internal addresses;
//! the lease state opens and closes writes (self-fencing).

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
#[cfg(feature = "etcd")]
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::watch;

use crate::rules::RulesHolder;
#[cfg(feature = "etcd")]
use crate::server::etcd_endpoints;
use crate::AgentConfig;

/// With --etcd: follow the rules and hold the instance's registration
/// lease; the lease state opens and closes writes (self-fencing).
#[cfg(feature = "etcd")]
pub(crate) fn tasks(
    cfg: &AgentConfig,
    rules: &Arc<RulesHolder>,
    (addr, internal_addr): (SocketAddr, Option<SocketAddr>),
    writes_allowed: Arc<AtomicBool>,
    peers: &crate::relay::Peers,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    if cfg.rules.is_some() {
        return Ok(Vec::new());
    }
    let eps = etcd_endpoints(cfg);
    let keys = routing_rules::etcd::Keys::new(&cfg.cluster)?;
    let host = routing_rules::etcd::host_name().unwrap_or_else(|| "cell".into());
    let id = cfg
        .instance_id
        .clone()
        .unwrap_or_else(|| format!("{host}-{}", std::process::id()));
    let key = keys.instance(&cfg.cell, cfg.colour.as_str(), &id);
    let mut value = serde_json::json!({
        "id": id, "cell": cfg.cell, "colour": cfg.colour.as_str(),
        "address": cfg.advertise.clone().unwrap_or_else(|| addr.to_string()),
        "version": env!("CARGO_PKG_VERSION"),
        "started_at_ms": crate::store::sqlite::unix_ms(),
    });
    if let Some(internal) = cfg
        .internal_advertise
        .clone()
        .or(internal_addr.map(|a| a.to_string()))
    {
        value["internal_address"] = internal.into();
    }
    let value = value.to_string();
    let (value_tx, value_rx) = watch::channel(value);
    let cluster = cfg.cluster.clone();
    let ttl = cfg.lease_ttl_s;
    let stop_reg = stop.clone();
    let registration = tokio::spawn(async move {
        let _sender = value_tx; // the value never changes; keep the channel open
        routing_rules::etcd::keep_registered(
            eps.clone(),
            cluster,
            key,
            value_rx,
            ttl,
            move |held| {
                let was = writes_allowed.swap(held, Ordering::Relaxed);
                if was != held {
                    if held {
                        tracing::info!("control-plane lease held: accepting writes");
                    } else {
                        tracing::warn!(
                            "control-plane lease lost: refusing writes until it is renewed"
                        );
                    }
                }
            },
            stop_reg,
        )
        .await
    });
    // The watch only hands documents over; compiling them (CPU work for a
    // big document) runs on a blocking thread, newest document first.
    let (doc_tx, mut doc_rx) = watch::channel::<Option<(String, u64)>>(None);
    let holder = rules.clone();
    let applier = tokio::spawn(async move {
        while doc_rx.changed().await.is_ok() {
            let Some((text, rev)) = doc_rx.borrow_and_update().clone() else {
                continue;
            };
            let h = holder.clone();
            match tokio::task::spawn_blocking(move || h.apply(text, rev)).await {
                Ok(Ok(Some(rev))) => tracing::debug!(revision = rev, "rules applied from etcd"),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "rules in etcd rejected; keeping the current rules")
                }
                Err(e) => tracing::error!(error = %e, "applying the rules from etcd failed"),
            }
        }
    });
    let follower = tokio::spawn(routing_rules::etcd::follow_rules(
        etcd_endpoints(cfg),
        cfg.cluster.clone(),
        move |stored| {
            let _ = doc_tx.send(Some((stored.document, stored.revision)));
        },
        |_| {},
        stop.clone(),
    ));
    let peers = peers.clone();
    let instances = tokio::spawn(routing_rules::etcd::follow_instances(
        etcd_endpoints(cfg),
        cfg.cluster.clone(),
        move |registered| {
            let internal = registered
                .into_iter()
                .filter(|((_, colour), _)| colour == routing_rules::etcd::INTERNAL)
                .map(|((cell, _), addrs)| (cell, addrs))
                .collect();
            peers.store(Arc::new(internal));
        },
        stop.clone(),
    ));
    Ok(vec![registration, follower, applier, instances])
}

#[cfg(not(feature = "etcd"))]
pub(crate) fn tasks(
    _cfg: &AgentConfig,
    _rules: &Arc<RulesHolder>,
    _addrs: (SocketAddr, Option<SocketAddr>),
    _writes_allowed: Arc<AtomicBool>,
    _peers: &crate::relay::Peers,
    _stop: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    Ok(Vec::new())
}
