//! The rules the agent holds: loaded from a file, reloaded when the file
//! changes or when a request is stamped with a newer revision.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use arc_swap::ArcSwap;
use routing_rules::{parse_rules, CellIdx, RoutingTable};

/// Revision of a file-based rules version: its modification time in ms
/// since the Unix epoch (the gateway computes the same), and never below
/// `previous + 1`.
pub fn file_revision(path: &Path, previous: u64) -> u64 {
    let mtime = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    mtime.max(previous + 1)
}

/// The agent's current rules and its own cell in them.
#[derive(Debug)]
pub struct RulesHolder {
    path: PathBuf,
    cell: String,
    table: ArcSwap<RoutingTable>,
    last_text: Mutex<String>,
}

/// Why rules could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RulesLoadError {
    /// Unreadable file.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// Invalid document.
    #[error("{0}: invalid rules: {1}")]
    Invalid(PathBuf, routing_rules::RulesError),
    /// The agent's cell is not in the rules.
    #[error("{0}: cell {1:?} is not defined in the rules")]
    UnknownCell(PathBuf, String),
    /// Too many cells.
    #[error("{0}: {1}")]
    Compile(PathBuf, String),
}

impl RulesHolder {
    /// Loads `path` for cell `cell`.
    pub fn load(path: &Path, cell: &str) -> Result<Arc<Self>, RulesLoadError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| RulesLoadError::Read(path.into(), e))?;
        let table = compile(path, &text, cell, file_revision(path, 0))?;
        Ok(Arc::new(RulesHolder {
            path: path.to_path_buf(),
            cell: cell.to_string(),
            table: ArcSwap::from_pointee(table),
            last_text: Mutex::new(text),
        }))
    }

    /// The current table.
    pub fn table(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// This agent's cell name.
    pub fn cell(&self) -> &str {
        &self.cell
    }

    /// This agent's cell index in `table`.
    pub fn cell_index(&self, table: &RoutingTable) -> Option<CellIdx> {
        table.cell_index(&self.cell)
    }

    /// Re-reads the file; applies a changed, valid version. Returns the new
    /// revision when one was applied.
    pub fn reload(&self) -> Result<Option<u64>, RulesLoadError> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| RulesLoadError::Read(self.path.clone(), e))?;
        let mut last = self.last_text.lock().unwrap_or_else(|e| e.into_inner());
        if *last == text {
            return Ok(None);
        }
        let previous = self.table.load().revision();
        let table = compile(
            &self.path,
            &text,
            &self.cell,
            file_revision(&self.path, previous),
        )?;
        let rev = table.revision();
        self.table.store(Arc::new(table));
        *last = text;
        Ok(Some(rev))
    }

    /// Makes sure the rules are at least at `revision` if the file has it
    /// (a request was stamped with a newer revision than ours).
    pub fn catch_up(&self, revision: u64) {
        if revision > self.table.load().revision() {
            match self.reload() {
                Ok(Some(rev)) => tracing::info!(
                    revision = rev,
                    "rules reloaded (a request carried a newer revision)"
                ),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "rules reload failed; keeping the current rules")
                }
            }
        }
    }

    /// Polls the file every `interval` until `stop` flips.
    pub async fn watch(
        self: Arc<Self>,
        interval: std::time::Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            match self.reload() {
                Ok(Some(rev)) => tracing::info!(revision = rev, "rules reloaded"),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "rules rejected; keeping the current rules"),
            }
        }
    }
}

fn compile(
    path: &Path,
    text: &str,
    cell: &str,
    revision: u64,
) -> Result<RoutingTable, RulesLoadError> {
    let rules = parse_rules(text).map_err(|e| RulesLoadError::Invalid(path.into(), e))?;
    if !rules.cells.contains_key(cell) {
        return Err(RulesLoadError::UnknownCell(path.into(), cell.to_string()));
    }
    RoutingTable::compile(rules, revision)
        .map_err(|e| RulesLoadError::Compile(path.into(), e.to_string()))
}
