//! Following the rules in etcd (cargo feature `etcd`).
//!
//! - Boot: read the rules from etcd; if etcd is unreachable, boot from the
//!   last good document saved in `--state-dir` (warning + metric).
//! - Follow: watch the revision key from the last etcd revision seen; on an
//!   event re-read document and revision together (one transaction) and
//!   swap them in. A watch that breaks is resumed from the last revision
//!   seen; one whose start was compacted re-reads everything. While etcd is
//!   unreachable the gateway keeps serving its last good rules.
//! - Register: `/cellgate/<cluster>/gateways/<id>` under a lease, with the
//!   revision the gateway runs, updated on every change.
//! - Instances: cell agents' registrations (`instances/<cell>/<colour>/<id>`)
//!   join the static addresses of the rules; a lapsed lease deletes the key
//!   and the instance leaves routing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use routing_rules::etcd::{ControlPlane, Keys};
use tokio::sync::watch;

use crate::control::Control;

/// Lease TTL of a gateway's registration, seconds.
pub const GATEWAY_LEASE_TTL_S: i64 = 5;

/// Where the gateway follows its rules.
#[derive(Debug, Clone)]
pub struct EtcdSource {
    /// Endpoints.
    pub endpoints: Vec<String>,
    /// Cluster.
    pub cluster: String,
    /// Saved last-good rules.
    pub state_dir: Option<PathBuf>,
    /// Registration id.
    pub gateway_id: String,
}

/// A label for errors and logs.
pub fn source_label(cluster: &str) -> PathBuf {
    PathBuf::from(format!("etcd:/cellgate/{cluster}/rules"))
}

/// The saved state: one file holding the revision and the document, so
/// the two can never be saved apart.
fn state_path(dir: &Path) -> PathBuf {
    dir.join("rules.state.json")
}

/// Saves the last good document: written to a temporary file, fsynced,
/// renamed over the old one, and the directory fsynced — a crash leaves
/// either the old state or the new one, never a mix or a torn file.
/// Blocking: call it from a blocking thread.
pub fn save_state(dir: &Path, text: &str, revision: u64) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    let body = serde_json::json!({ "revision": revision, "document": text }).to_string();
    let tmp = dir.join(".rules.state.json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(body.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, state_path(dir))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// The last good document saved in `dir`, if any (also reads the
/// two-file layout of earlier versions).
pub fn load_state(dir: &Path) -> Option<(String, u64)> {
    if let Ok(body) = std::fs::read_to_string(state_path(dir)) {
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        return Some((v["document"].as_str()?.to_string(), v["revision"].as_u64()?));
    }
    let text = std::fs::read_to_string(dir.join("rules.toml")).ok()?;
    let revision = std::fs::read_to_string(dir.join("rules.revision"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some((text, revision))
}

/// Reads the rules for boot: from etcd, else from the state dir. Returns
/// the document, its revision and whether it came from the saved state.
pub async fn boot(src: &EtcdSource) -> anyhow::Result<(String, u64, bool)> {
    let from_etcd = async {
        let mut cp = ControlPlane::connect(&src.endpoints, &src.cluster).await?;
        anyhow::Ok(cp.get().await?)
    };
    match tokio::time::timeout(Duration::from_secs(5), from_etcd).await {
        Ok(Ok(Some(stored))) => {
            if let Some(dir) = src.state_dir.clone() {
                let (text, rev) = (stored.document.clone(), stored.revision);
                let saved = tokio::task::spawn_blocking(move || {
                    save_state(&dir, &text, rev).map_err(|e| (dir, e))
                })
                .await;
                if let Ok(Err((dir, e))) = saved {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot save the rules to the state dir");
                }
            }
            Ok((stored.document, stored.revision, false))
        }
        Ok(Ok(None)) => anyhow::bail!(
            "no rules in etcd for cluster {:?}: apply some first (cellctl rules apply FILE)",
            src.cluster
        ),
        outcome => {
            let why = match outcome {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".to_string(),
            };
            let dir = src.state_dir.clone();
            let saved = tokio::task::spawn_blocking(move || dir.as_deref().and_then(load_state))
                .await
                .ok()
                .flatten();
            match saved {
                Some((text, rev)) => {
                    tracing::warn!(error = %why, revision = rev, "etcd unreachable at start; serving the rules saved in the state dir");
                    Ok((text, rev, true))
                }
                None => anyhow::bail!(
                    "etcd unreachable ({why}) and no saved rules (--state-dir) to boot from"
                ),
            }
        }
    }
}

/// Follows the rules and keeps the registration alive until `stop` flips.
pub async fn follow(
    control: Arc<Control>,
    src: EtcdSource,
    registration: serde_json::Value,
    stop: watch::Receiver<bool>,
) {
    let label = source_label(&src.cluster);
    let key = match Keys::new(&src.cluster) {
        Ok(k) => k.gateway(&src.gateway_id),
        Err(e) => {
            tracing::error!(error = %e, "bad cluster name");
            return;
        }
    };
    let value = move |rev: u64| {
        let mut v = registration.clone();
        v["revision"] = rev.into();
        v["applied_at_ms"] = now_ms().into();
        v.to_string()
    };
    let (reg_tx, reg_rx) = watch::channel(value(control.current().table.revision()));
    let metrics = control.metrics().clone();
    let registrar = tokio::spawn(routing_rules::etcd::keep_registered(
        src.endpoints.clone(),
        src.cluster.clone(),
        key,
        reg_rx,
        GATEWAY_LEASE_TTL_S,
        |_| {},
        stop.clone(),
    ));
    let registry_control = control.clone();
    let instances = tokio::spawn(routing_rules::etcd::follow_instances(
        src.endpoints.clone(),
        src.cluster.clone(),
        move |registered| registry_control.set_registered(registered),
        stop.clone(),
    ));
    // The watch only hands documents over; compiling (CPU) and saving the
    // state (fsync) run on a blocking thread, newest document first.
    let (doc_tx, mut doc_rx) = watch::channel::<Option<(String, u64)>>(None);
    let (endpoints, cluster) = (src.endpoints.clone(), src.cluster.clone());
    let applier = tokio::spawn(async move {
        while doc_rx.changed().await.is_ok() {
            let Some((text, rev)) = doc_rx.borrow_and_update().clone() else {
                continue;
            };
            let before = control.current().table.revision();
            let (c, l, s) = (control.clone(), label.clone(), src.clone());
            if let Err(e) = tokio::task::spawn_blocking(move || adopt(&c, &l, &s, text, rev)).await
            {
                tracing::error!(error = %e, "applying the rules from etcd failed");
            }
            let now = control.current().table.revision();
            if now != before {
                let _ = reg_tx.send(value(now));
            }
        }
    });
    routing_rules::etcd::follow_rules(
        endpoints,
        cluster,
        move |stored| {
            let _ = doc_tx.send(Some((stored.document, stored.revision)));
        },
        move |up| metrics.control_plane_up.set(up as i64),
        stop,
    )
    .await;
    let _ = applier.await;
    let _ = registrar.await;
    let _ = instances.await;
}

fn adopt(control: &Control, label: &Path, src: &EtcdSource, text: String, revision: u64) {
    if revision == control.current().table.revision() {
        return;
    }
    match control.apply_text(label, text.clone(), revision) {
        Ok(rev) => {
            control.metrics().rules_from_saved_state.set(0);
            tracing::debug!(revision = rev, "rules applied from etcd");
            if let Some(dir) = &src.state_dir {
                if let Err(e) = save_state(dir, &text, rev) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot save the rules to the state dir");
                }
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "rules in etcd rejected; still serving the previous rules")
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
