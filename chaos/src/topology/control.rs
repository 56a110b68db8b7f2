//! A drill topology's control plane: the rules file, or an etcd the drill
//! started. Rules edits (a split) and the shards' replication records go
//! through here, whichever it is.

use std::path::{Path, PathBuf};

use anyhow::Result;
use routing_rules::switchover::EtcdTarget;

/// The cluster name a drill's etcd holds its rules under.
pub const CLUSTER: &str = "drill";

/// Reads the shards' replication records (keeps an etcd connection).
pub struct Records {
    rules: PathBuf,
    etcd: Option<EtcdTarget>,
    #[cfg(feature = "etcd")]
    conn: Option<routing_rules::etcd::ControlPlane>,
}

impl Records {
    /// Records of the topology whose rules file is `rules` (and whose
    /// control plane is `etcd`, if set).
    pub fn new(rules: &Path, etcd: Option<EtcdTarget>) -> Records {
        Records {
            rules: rules.to_path_buf(),
            etcd,
            #[cfg(feature = "etcd")]
            conn: None,
        }
    }

    /// `cell`'s replication record, `None` when there is none or it cannot
    /// be read now (etcd down).
    pub async fn get(&mut self, cell: &str) -> Option<serde_json::Value> {
        if self.etcd.is_none() {
            let path = routing_rules::switchover::record_path(&self.rules, cell);
            return std::fs::read_to_string(path)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
        }
        self.read_etcd(cell).await
    }

    /// Polls `cell`'s record every 20 ms until `wanted` holds for it;
    /// at `deadline`, the last record read (`None`: none could be read).
    pub async fn wait_for(
        &mut self,
        cell: &str,
        deadline: tokio::time::Instant,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<(), Option<serde_json::Value>> {
        loop {
            let record = self.get(cell).await;
            if record.as_ref().is_some_and(&wanted) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(record);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Where `cell`'s record is kept, for messages.
    pub fn place(&self, cell: &str) -> String {
        match &self.etcd {
            None => routing_rules::switchover::record_path(&self.rules, cell)
                .display()
                .to_string(),
            Some(t) => format!("etcd cluster {}", t.cluster),
        }
    }

    #[cfg(feature = "etcd")]
    async fn read_etcd(&mut self, cell: &str) -> Option<serde_json::Value> {
        let target = self.etcd.as_ref()?;
        if self.conn.is_none() {
            let connect =
                routing_rules::etcd::ControlPlane::connect(&target.endpoints, &target.cluster);
            self.conn = tokio::time::timeout(std::time::Duration::from_secs(1), connect)
                .await
                .ok()?
                .ok();
        }
        let conn = self.conn.as_mut()?;
        match tokio::time::timeout(std::time::Duration::from_secs(1), conn.replication_of(cell))
            .await
        {
            Ok(Ok((record, _))) => record,
            _ => {
                // Connect again next time.
                self.conn = None;
                None
            }
        }
    }

    #[cfg(not(feature = "etcd"))]
    async fn read_etcd(&mut self, _cell: &str) -> Option<serde_json::Value> {
        None
    }
}

/// Applies the drill's first rules in etcd.
#[cfg(feature = "etcd")]
pub async fn publish(target: &EtcdTarget, text: &str) -> Result<()> {
    let mut cp =
        routing_rules::etcd::ControlPlane::connect(&target.endpoints, &target.cluster).await?;
    cp.apply(text, 0, "cellchaos", "drill start").await?;
    Ok(())
}

/// Applies the drill's first rules in etcd.
#[cfg(not(feature = "etcd"))]
pub async fn publish(_target: &EtcdTarget, _text: &str) -> Result<()> {
    anyhow::bail!("topology.control_plane = \"etcd\": this cellchaos was built without etcd support (the `etcd` feature)")
}

/// Edits the live rules (the file under its lock, or etcd by compare and
/// swap): the new revision, or `None` when the edit changed nothing.
pub async fn edit_rules(
    rules: &Path,
    etcd: Option<&EtcdTarget>,
    edit: impl FnOnce(&str) -> Result<String>,
) -> Result<Option<u64>> {
    match etcd {
        None => routing_rules::switchover::edit_rules_file(rules, edit),
        Some(target) => edit_in_etcd(target, edit).await,
    }
}

#[cfg(feature = "etcd")]
async fn edit_in_etcd(
    target: &EtcdTarget,
    edit: impl FnOnce(&str) -> Result<String>,
) -> Result<Option<u64>> {
    let mut cp =
        routing_rules::etcd::ControlPlane::connect(&target.endpoints, &target.cluster).await?;
    let current = cp
        .get()
        .await?
        .ok_or_else(|| anyhow::anyhow!("cluster {}: no rules in etcd", target.cluster))?;
    let edited = edit(&current.document)?;
    if edited == current.document {
        return Ok(None);
    }
    Ok(Some(
        cp.apply(&edited, current.revision, "cellchaos", "drill step")
            .await?,
    ))
}

#[cfg(not(feature = "etcd"))]
async fn edit_in_etcd(
    _target: &EtcdTarget,
    _edit: impl FnOnce(&str) -> Result<String>,
) -> Result<Option<u64>> {
    anyhow::bail!("this cellchaos was built without etcd support")
}
