//! Where a switchover or failover reads and writes the cluster's state:
//! the rules file and the files next to it (the embedded mode), or etcd.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{write_atomically, Plan};
use crate::edit;

/// An etcd control plane to drive instead of a rules file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTarget {
    /// Its endpoints.
    pub endpoints: Vec<String>,
    /// The cluster (keys under `/cellgate/CLUSTER/`).
    pub cluster: String,
}

/// The cluster's state, as the driver sees it.
pub(super) enum Plane {
    /// A rules file; the phase, the records and the lock next to it.
    File(PathBuf),
    /// etcd: the rules under compare-and-swap, the phase and the records
    /// under their keys.
    #[cfg(feature = "etcd")]
    Etcd(Box<crate::etcd::ControlPlane>),
}

/// A shard's replication record and the version it was read at (a
/// failover in etcd moves the rules only if it is unchanged).
pub(super) struct RecordSeen {
    pub(super) record: Option<serde_json::Value>,
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(super) version: i64,
    pub(super) place: String,
}

/// The rules document in the file at `p` and its revision (0: none).
pub(crate) fn rules_in_file(p: &Path) -> Result<(String, u64)> {
    let text =
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    let (_, rev) = crate::parse_versioned(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid rules: {e}", p.display()))?;
    Ok((text, rev.unwrap_or(0)))
}

/// The rules document in etcd and its revision.
#[cfg(feature = "etcd")]
pub(crate) async fn rules_in_etcd(cp: &mut crate::etcd::ControlPlane) -> Result<(String, u64)> {
    let stored = cp
        .get()
        .await?
        .context("no rules in etcd for this cluster (cellctl rules apply FILE)")?;
    Ok((stored.document, stored.revision))
}

impl Plane {
    pub(super) async fn open(rules: &Path, etcd: Option<&EtcdTarget>) -> Result<Plane> {
        match etcd {
            None => Ok(Plane::File(rules.to_path_buf())),
            #[cfg(feature = "etcd")]
            Some(t) => {
                let cp = crate::etcd::ControlPlane::connect(&t.endpoints, &t.cluster)
                    .await
                    .with_context(|| format!("cannot reach etcd at {}", t.endpoints.join(",")))?;
                Ok(Plane::Etcd(Box::new(cp)))
            }
            #[cfg(not(feature = "etcd"))]
            Some(_) => {
                bail!("this build has no etcd support (it was built with --no-default-features)")
            }
        }
    }

    /// The rules document and its revision.
    pub(super) async fn rules(&mut self) -> Result<(String, u64)> {
        match self {
            Plane::File(p) => rules_in_file(p),
            #[cfg(feature = "etcd")]
            Plane::Etcd(cp) => rules_in_etcd(cp).await,
        }
    }

    /// Writes `text` as the next revision after `expected` (a conflicting
    /// change is an error, not an overwrite); the new revision.
    pub(super) async fn write_rules(
        &mut self,
        text: &str,
        expected: u64,
        message: &str,
    ) -> Result<u64> {
        match self {
            Plane::File(p) => {
                let _ = message; // a file keeps no history
                let (_, current) = crate::parse_versioned(&std::fs::read_to_string(&*p)?)
                    .map_err(|e| anyhow::anyhow!("{}: invalid rules: {e}", p.display()))?;
                if current.unwrap_or(0) != expected {
                    bail!(
                        "{} changed meanwhile (revision {expected} expected); nothing was written",
                        p.display()
                    );
                }
                let (next, revision) = edit::bump_revision(text)?;
                write_atomically(p, &next)?;
                Ok(revision)
            }
            #[cfg(feature = "etcd")]
            Plane::Etcd(cp) => Ok(cp
                .apply(text, expected, &super::applied_by(), message)
                .await?),
        }
    }

    /// The switchover in progress.
    pub(super) async fn phase(&mut self) -> Result<Option<Plan>> {
        let (text, place) = match self {
            Plane::File(p) => {
                let state = crate::files::switchover_path(p);
                match std::fs::read_to_string(&state) {
                    Ok(t) => (t, state.display().to_string()),
                    Err(_) => return Ok(None),
                }
            }
            #[cfg(feature = "etcd")]
            Plane::Etcd(cp) => {
                let key = cp.keys().switchover();
                match cp.get_raw(&key).await? {
                    Some(v) => (String::from_utf8_lossy(&v).into_owned(), key),
                    None => return Ok(None),
                }
            }
        };
        Ok(Some(serde_json::from_str(&text).with_context(|| {
            format!("{place} is not a switchover record")
        })?))
    }

    /// Records the phase about to run.
    pub(super) async fn record_phase(&mut self, plan: &Plan) -> Result<()> {
        let text = serde_json::to_string_pretty(plan)?;
        match self {
            Plane::File(p) => write_atomically(&crate::files::switchover_path(p), &text),
            #[cfg(feature = "etcd")]
            Plane::Etcd(cp) => {
                let key = cp.keys().switchover();
                Ok(cp.put_raw(&key, &text).await?)
            }
        }
    }

    /// The switchover is over.
    pub(super) async fn clear_phase(&mut self) -> Result<()> {
        match self {
            Plane::File(p) => {
                let _ = std::fs::remove_file(crate::files::switchover_path(p));
                Ok(())
            }
            #[cfg(feature = "etcd")]
            Plane::Etcd(cp) => {
                let key = cp.keys().switchover();
                Ok(cp.delete_raw(&key).await?)
            }
        }
    }

    /// `cell`'s replication record.
    pub(super) async fn record(&mut self, cell: &str) -> Result<RecordSeen> {
        match self {
            Plane::File(p) => {
                let f = crate::files::record_path(p, cell);
                let record = std::fs::read_to_string(&f)
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
                Ok(RecordSeen {
                    record,
                    version: 0,
                    place: f.display().to_string(),
                })
            }
            #[cfg(feature = "etcd")]
            Plane::Etcd(cp) => {
                let place = cp.keys().replication(cell);
                let (record, version) = cp.replication_of(cell).await?;
                Ok(RecordSeen {
                    record,
                    version,
                    place,
                })
            }
        }
    }

    /// A failover's move of the rules: only while `cell`'s record is still
    /// the one `seen` (etcd: one transaction; the file: under the lock the
    /// agents take to go degraded, held by the caller).
    pub(super) async fn move_if_record(
        &mut self,
        text: &str,
        expected: u64,
        cell: &str,
        seen: &RecordSeen,
        message: &str,
    ) -> Result<u64> {
        match self {
            Plane::File(_) => {
                let _ = (cell, seen);
                self.write_rules(text, expected, message).await
            }
            #[cfg(feature = "etcd")]
            Plane::Etcd(cp) => Ok(cp
                .apply_if_record(
                    text,
                    expected,
                    (cell, seen.version),
                    &super::applied_by(),
                    message,
                )
                .await?),
        }
    }

    /// Internal addresses the instances registered (etcd), by cell.
    pub(super) async fn registered(&mut self) -> BTreeMap<String, Vec<String>> {
        match self {
            Plane::File(_) => BTreeMap::new(),
            #[cfg(feature = "etcd")]
            Plane::Etcd(cp) => cp.registered_internal().await.unwrap_or_default(),
        }
    }

    /// The lock the agents take to go degraded (the file); etcd uses
    /// transactions instead.
    pub(super) async fn lock(&self) -> Result<Option<std::fs::File>> {
        match self {
            Plane::File(p) => {
                let p = p.clone();
                Ok(Some(
                    tokio::task::spawn_blocking(move || super::lock_rules(&p))
                        .await?
                        .context("cannot take the rules lock")?,
                ))
            }
            #[cfg(feature = "etcd")]
            Plane::Etcd(_) => Ok(None),
        }
    }
}
