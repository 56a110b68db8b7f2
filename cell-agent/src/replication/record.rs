//! The replication record of a shard (next to its database, next to the
//! rules in the embedded mode, in etcd with a control plane), and the
//! shipper's decisions that write it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::Shipper;
use crate::store::sqlite::unix_ms;

/// The replication state of a primary's shard, recorded (fsynced) next to
/// its database before the shard goes on without a synchronous standby.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The primary cell.
    pub cell: String,
    /// Its standby cell.
    pub standby: Option<String>,
    /// `in-sync` or `degraded`.
    pub state: String,
    /// Since when (unix ms).
    pub since_ms: i64,
    /// The last batch the standby acknowledged.
    pub acked_lsn: i64,
    /// When this record was written (unix ms).
    pub updated_ms: i64,
}

/// Where the replication record of the shard at `db` lives.
pub fn record_path(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}.replication.json", db.display()))
}

/// Reads a replication record.
pub fn read_record(path: &Path) -> std::io::Result<Record> {
    let text = std::fs::read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes a replication record durably (temporary file, fsync, rename).
pub fn write_record(path: &Path, record: &Record) -> std::io::Result<()> {
    // Both colours of the cell write it: each through its own temporary.
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, serde_json::to_string_pretty(record)?.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A shard's replication state, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Every batch waits for the standby's acknowledgement, and the
    /// standby holds every acknowledged one.
    InSync,
    /// Writes are acknowledged without the standby.
    Degraded,
    /// Just started: the standby has not yet confirmed it holds this
    /// copy's last batch.
    CatchingUp,
}

impl State {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            State::InSync => "in-sync",
            State::Degraded => "degraded",
            State::CatchingUp => "catching-up",
        }
    }
}

impl Shipper {
    /// Records the shard's state durably (on a blocking thread).
    pub(super) async fn write_state(
        &self,
        state: State,
        since_ms: i64,
        acked: i64,
    ) -> std::io::Result<()> {
        let table = self.rules.table();
        // Only the shard's host (under the rules) speaks for it: a lost
        // primary started again after a failover must not overwrite the
        // record its successor keeps.
        let host = table.rules().host_of(&self.shard);
        if host != self.rules.cell() {
            return Err(std::io::Error::other(format!(
                "rules revision {} give cell {}'s shard to cell {host}, not this cell: its record is its host's to write",
                table.revision(),
                self.shard
            )));
        }
        let record = Record {
            cell: self.shard.clone(),
            standby: table.rules().standby_of(&self.shard).map(str::to_string),
            state: state.as_str().to_string(),
            since_ms,
            acked_lsn: acked,
            updated_ms: unix_ms(),
        };
        let path = self.record.clone();
        let file = record.clone();
        let control = self
            .rules_file
            .as_ref()
            .map(|r| routing_rules::switchover::record_path(r, &self.shard));
        tokio::task::spawn_blocking(move || {
            write_record(&path, &file)?;
            if let Some(c) = control {
                if let Some(dir) = c.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                write_record(&c, &file)?;
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))?;
        self.record_in_control_plane(&record).await?;
        let timeline = self.shipped_timeline.lock().await.clone();
        *self.recorded_standby.lock().await = (record.standby.clone(), timeline);
        Ok(())
    }

    /// Before going on without the standby: under the rules' lock (embedded
    /// mode), with the newest rules, the shard must still be held by this
    /// cell — else it was failed over and this copy must stop (`Err`). The
    /// returned lock is held until the degraded state is recorded.
    pub(super) async fn may_go_degraded(&self) -> Result<Option<std::fs::File>, String> {
        let lock = match self.rules_file.clone() {
            Some(rules) => Some(
                tokio::task::spawn_blocking(move || routing_rules::switchover::lock_rules(&rules))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("cannot take the rules lock: {e}"))?,
            ),
            None => None,
        };
        self.rules.catch_up(self.rules.table().revision() + 1).await;
        let table = self.rules.table();
        self.checked_revision
            .store(table.revision(), std::sync::atomic::Ordering::Release);
        let host = table.rules().host_of(&self.shard);
        if host != self.rules.cell() {
            return Err(format!(
                "rules revision {} give cell {}'s shard to cell {host}",
                table.revision(),
                self.shard
            ));
        }
        Ok(lock)
    }

    /// Puts the record in etcd too (`replication/<cell>`), when the agent
    /// follows a control plane.
    #[cfg(feature = "etcd")]
    async fn record_in_control_plane(&self, record: &Record) -> std::io::Result<()> {
        let Some((endpoints, cluster)) = &self.control_plane else {
            return Ok(());
        };
        let mut held = self.etcd.lock().await;
        let put = async {
            if held.is_none() {
                *held = Some(routing_rules::etcd::ControlPlane::connect(endpoints, cluster).await?);
            }
            let value = serde_json::to_value(record).unwrap_or_default();
            match held.as_mut() {
                // Going on without the standby: only while the rules are
                // still those the shard was found to be held here in (a
                // failover moves them only if this record is unchanged).
                Some(cp) if record.state == "degraded" => {
                    let checked = self
                        .checked_revision
                        .load(std::sync::atomic::Ordering::Acquire);
                    if cp
                        .put_replication_if_rules(&record.cell, &value, checked)
                        .await?
                    {
                        Ok(())
                    } else {
                        Err(routing_rules::etcd::ControlError::BadArgument(format!(
                            "the rules moved on from revision {checked}: not recording degraded"
                        )))
                    }
                }
                Some(cp) => cp.put_replication(&record.cell, &value).await,
                None => Ok(()),
            }
        };
        let result =
            match tokio::time::timeout(self.timeout.max(std::time::Duration::from_secs(1)), put)
                .await
            {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => std::io::Error::other(e.to_string()),
                Err(_) => std::io::Error::other("etcd did not answer in time"),
            };
        *held = None;
        Err(result)
    }

    #[cfg(not(feature = "etcd"))]
    async fn record_in_control_plane(&self, _record: &Record) -> std::io::Result<()> {
        Ok(())
    }
}
