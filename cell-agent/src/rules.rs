//! The rules the agent holds: loaded from a file, reloaded when the file
//! changes or when a request is stamped with a newer revision.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use routing_rules::{next_document, CellIdx, RevisionError, RoutingTable, Versioned};

/// What identifies a file version cheaply: (mtime, length, inode). A
/// reload reads the file only when this changes.
type FileStamp = Option<(SystemTime, u64, u64)>;

/// The file's stamp now.
pub fn file_stamp(path: &Path) -> FileStamp {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some((m.modified().ok()?, m.len(), ino))
}

/// The agent's current rules and its own cell in them.
#[derive(Debug)]
pub struct RulesHolder {
    path: PathBuf,
    cell: String,
    table: ArcSwap<RoutingTable>,
    last_text: Mutex<String>,
    last_stamp: Mutex<FileStamp>,
    /// This holder (for reloads on a blocking thread).
    me: std::sync::Weak<RulesHolder>,
    /// Set when the rules follow etcd instead of a file.
    #[cfg(feature = "etcd")]
    etcd: Option<EtcdLink>,
}

/// Where rules following etcd come from, and a cached connection for
/// catching up on demand.
#[cfg(feature = "etcd")]
pub struct EtcdLink {
    /// Endpoints.
    pub endpoints: Vec<String>,
    /// Cluster.
    pub cluster: String,
    conn: tokio::sync::Mutex<Option<routing_rules::etcd::ControlPlane>>,
}

#[cfg(feature = "etcd")]
impl std::fmt::Debug for EtcdLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdLink")
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// Why rules could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RulesLoadError {
    /// Unreadable file.
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// Invalid document, or one that may not replace the current rules.
    #[error("{0}: rules refused: {1}")]
    Invalid(PathBuf, RevisionError),
    /// Larger than the document cap.
    #[error("{0} is {1} bytes, more than {max} allowed; refused without reading it", max = routing_rules::DEFAULT_MAX_DOCUMENT_BYTES)]
    TooLarge(PathBuf, u64),
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
        let stamp = file_stamp(path);
        let text = read_capped(path)?;
        let doc =
            next_document(None, &text).map_err(|e| RulesLoadError::Invalid(path.into(), e))?;
        if doc.revision == 0 {
            tracing::warn!(file = %path.display(), "the rules document has no `revision` key: its changes cannot be ordered between processes (add `revision = 1`; `cellctl rules bump` raises it)");
        }
        let revision = doc.revision;
        let table = compile(path, doc, cell, revision)?;
        Ok(Arc::new_cyclic(|me| RulesHolder {
            me: me.clone(),
            path: path.to_path_buf(),
            cell: cell.to_string(),
            table: ArcSwap::from_pointee(table),
            last_text: Mutex::new(text),
            last_stamp: Mutex::new(stamp),
            #[cfg(feature = "etcd")]
            etcd: None,
        }))
    }

    /// Rules following etcd, starting from `text` at `revision`.
    #[cfg(feature = "etcd")]
    pub fn from_etcd(
        endpoints: Vec<String>,
        cluster: &str,
        cell: &str,
        text: String,
        revision: u64,
    ) -> Result<Arc<Self>, RulesLoadError> {
        let label = PathBuf::from(format!("etcd:/cellgate/{cluster}/rules"));
        let doc =
            next_document(None, &text).map_err(|e| RulesLoadError::Invalid(label.clone(), e))?;
        let table = compile(&label, doc, cell, revision)?;
        Ok(Arc::new_cyclic(|me| RulesHolder {
            me: me.clone(),
            path: label,
            cell: cell.to_string(),
            table: ArcSwap::from_pointee(table),
            last_text: Mutex::new(text),
            last_stamp: Mutex::new(None),
            etcd: Some(EtcdLink {
                endpoints,
                cluster: cluster.to_string(),
                conn: tokio::sync::Mutex::new(None),
            }),
        }))
    }

    /// Swaps in `table`, logging what changed (revision, slots moved,
    /// splits and states).
    fn install(&self, table: RoutingTable) {
        let before = self.table.load();
        let changes = routing_rules::diff(before.rules(), table.rules()).brief();
        tracing::info!(
            source = %self.path.display(),
            revision = table.revision(),
            previous = before.revision(),
            %changes,
            "rules installed"
        );
        drop(before);
        self.table.store(Arc::new(table));
    }

    /// Applies `text` as `revision` (from the control plane) when newer.
    pub fn apply(&self, text: String, revision: u64) -> Result<Option<u64>, RulesLoadError> {
        if revision <= self.table.load().revision() {
            return Ok(None);
        }
        // etcd numbers the revisions: the document is only validated here.
        let doc = next_document(None, &text)
            .map_err(|e| RulesLoadError::Invalid(self.path.clone(), e))?;
        let table = compile(&self.path, doc, &self.cell, revision)?;
        self.install(table);
        *self.last_text.lock().unwrap_or_else(|e| e.into_inner()) = text;
        Ok(Some(revision))
    }

    /// [`Self::apply`] on a blocking thread (compiling is CPU work).
    #[cfg(feature = "etcd")]
    async fn apply_async(
        &self,
        text: String,
        revision: u64,
    ) -> Result<Option<u64>, RulesLoadError> {
        self.blocking("apply", move |me| me.apply(text, revision))
            .await
    }

    /// Runs `f` on this holder on a blocking thread (file I/O, parsing).
    async fn blocking(
        &self,
        what: &str,
        f: impl FnOnce(&RulesHolder) -> Result<Option<u64>, RulesLoadError> + Send + 'static,
    ) -> Result<Option<u64>, RulesLoadError> {
        let Some(me) = self.me.upgrade() else {
            return Ok(None);
        };
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .unwrap_or_else(|e| {
                Err(RulesLoadError::Compile(
                    PathBuf::new(),
                    format!("{what} task failed: {e}"),
                ))
            })
    }

    /// Whether the rules follow etcd.
    pub fn follows_etcd(&self) -> bool {
        #[cfg(feature = "etcd")]
        {
            self.etcd.is_some()
        }
        #[cfg(not(feature = "etcd"))]
        {
            false
        }
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

    /// Re-reads the file when its stamp (mtime, size, inode) changed;
    /// applies a changed, valid version whose revision moved forward.
    /// Returns the new revision when one was applied. Blocking: file I/O
    /// and parsing (run it on a blocking thread).
    pub fn reload(&self) -> Result<Option<u64>, RulesLoadError> {
        if self.follows_etcd() {
            return Ok(None);
        }
        // One reload at a time, held to the end: a second caller (a
        // catch-up racing the periodic check) that found the stamp already
        // taken must not return before the first one installed the rules.
        let mut last_stamp = self.last_stamp.lock().unwrap_or_else(|e| e.into_inner());
        let stamp = file_stamp(&self.path);
        if stamp.is_some() && *last_stamp == stamp {
            return Ok(None);
        }
        *last_stamp = stamp;
        let text = read_capped(&self.path)?;
        let mut last = self.last_text.lock().unwrap_or_else(|e| e.into_inner());
        if *last == text {
            return Ok(None);
        }
        let current = self.table.load().revision();
        let doc = next_document(Some((current, &last)), &text)
            .map_err(|e| RulesLoadError::Invalid(self.path.clone(), e))?;
        let rev = doc.revision;
        let table = compile(&self.path, doc, &self.cell, rev)?;
        self.install(table);
        *last = text;
        Ok(Some(rev))
    }

    /// [`Self::reload`] on a blocking thread.
    pub async fn reload_async(&self) -> Result<Option<u64>, RulesLoadError> {
        self.blocking("reload", |me| me.reload()).await
    }

    /// Makes sure the rules are at least at `revision` if the file has it
    /// (a request was stamped with a newer revision than ours).
    pub async fn catch_up(&self, revision: u64) {
        if revision <= self.table.load().revision() {
            return;
        }
        #[cfg(feature = "etcd")]
        if let Some(link) = &self.etcd {
            let mut conn = link.conn.lock().await;
            if conn.is_none() {
                *conn = routing_rules::etcd::ControlPlane::connect(&link.endpoints, &link.cluster)
                    .await
                    .ok();
            }
            let fetched = match conn.as_mut() {
                Some(cp) => cp.get().await,
                None => return,
            };
            match fetched {
                Ok(Some(stored)) => {
                    match self.apply_async(stored.document, stored.revision).await {
                        Ok(Some(rev)) => tracing::info!(
                            revision = rev,
                            "rules fetched from etcd (a request carried a newer revision)"
                        ),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "rules in etcd rejected; keeping the current rules")
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fetch the rules from etcd");
                    *conn = None;
                }
            }
            return;
        }
        {
            match self.reload_async().await {
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

    /// Polls the file every `interval` until `stop` flips (no-op when
    /// following etcd).
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
            match self.reload_async().await {
                Ok(Some(rev)) => tracing::debug!(revision = rev, "rules reloaded"),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "rules rejected; keeping the current rules"),
            }
        }
    }
}

/// Reads a rules file, refusing one over the document cap before reading.
fn read_capped(path: &Path) -> Result<String, RulesLoadError> {
    let len = std::fs::metadata(path)
        .map_err(|e| RulesLoadError::Read(path.into(), e))?
        .len();
    if len > routing_rules::DEFAULT_MAX_DOCUMENT_BYTES {
        return Err(RulesLoadError::TooLarge(path.into(), len));
    }
    std::fs::read_to_string(path).map_err(|e| RulesLoadError::Read(path.into(), e))
}

fn compile(
    path: &Path,
    doc: Versioned,
    cell: &str,
    revision: u64,
) -> Result<RoutingTable, RulesLoadError> {
    if !doc.rules.cells.contains_key(cell) {
        return Err(RulesLoadError::UnknownCell(path.into(), cell.to_string()));
    }
    RoutingTable::compile(doc.rules, revision)
        .map_err(|e| RulesLoadError::Compile(path.into(), e.to_string()))
}
