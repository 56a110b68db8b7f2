//! Where the embedded mode (the rules in a file) keeps its control-plane
//! state next to the rules file — paths only; reading and writing them is
//! the tools' business.

use std::path::{Path, PathBuf};

/// The directory of the shards' replication records (`RULES.replication/`),
/// as etcd keeps them under `replication/`.
pub fn records_dir(rules: &Path) -> PathBuf {
    PathBuf::from(format!("{}.replication", rules.display()))
}

/// The replication record of `cell`'s shard.
pub fn record_path(rules: &Path, cell: &str) -> PathBuf {
    records_dir(rules).join(format!("{cell}.json"))
}

/// The lock file that serialises degraded decisions and failovers.
pub fn lock_path(rules: &Path) -> PathBuf {
    PathBuf::from(format!("{}.lock", rules.display()))
}

/// The record of a switchover in progress.
pub fn switchover_path(rules: &Path) -> PathBuf {
    PathBuf::from(format!("{}.switchover.json", rules.display()))
}

/// The directory of the canary pipelines' state files.
pub fn canary_dir(rules: &Path) -> PathBuf {
    PathBuf::from(format!("{}.canary", rules.display()))
}

/// The state file of `cell`'s canary pipeline.
pub fn canary_path(rules: &Path, cell: &str) -> PathBuf {
    canary_dir(rules).join(format!("{cell}.json"))
}
