//! The control side of the gateway: loads the rules file, watches it, and
//! publishes each accepted version as an immutable [`Generation`] through an
//! `ArcSwap`, which the data path reads without locks.
//!
//! Instances, their pools, health state and the cells' in-flight limiters
//! live across generations (keyed by cell, colour and address), so a reload
//! neither drops connections nor forgets health.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::HeaderValue;
use routing_rules::{
    next_document, parse_rules, CellIdx, Colour, RevisionError, RoutingTable, Rules,
};

use crate::health::{run_checks, HealthSettings};
use crate::metrics::Metrics;
use crate::upstream::{now_ms, Instance, UpstreamSettings};

mod generation;

pub use generation::*;

/// Why a rules file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Unreadable.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Invalid, or not allowed to replace the current rules (a revision
    /// that did not move forward).
    #[error("{path}: rules refused: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem.
        source: RevisionError,
    },
    /// Larger than `--max-rules-bytes`.
    #[error(
        "{path} is {len} bytes, more than --max-rules-bytes {max}; refused without reading it"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// Cannot compile.
    #[error("{path}: {message}")]
    Compile {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// Owns the current generation and builds new ones.
pub struct Control {
    current: ArcSwap<Generation>,
    instances: Mutex<HashMap<(String, Colour, String), Arc<Instance>>>,
    limiters: Mutex<HashMap<String, Arc<CellLimiter>>>,
    metrics: Metrics,
    upstream: Arc<UpstreamSettings>,
    health: Arc<HealthSettings>,
    cell_max_inflight: usize,
    last_text: Mutex<String>,
    good_text: Mutex<String>,
    /// `--max-rules-bytes`.
    max_rules_bytes: std::sync::atomic::AtomicU64,
    /// Instances registered in the control plane, by (cell, colour name).
    registered: Mutex<std::collections::BTreeMap<(String, String), Vec<String>>>,
    /// Serialises installs (rules changes and registration changes).
    install_lock: Mutex<()>,
    /// The revision of the generation installed last (held requests wait
    /// on it).
    installed: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("revision", &self.current.load().table.revision())
            .finish()
    }
}

impl Control {
    /// Loads `path` and builds the first generation. Must run inside a
    /// tokio runtime (it starts health-check tasks).
    pub fn load(
        path: &Path,
        metrics: Metrics,
        upstream: UpstreamSettings,
        health: HealthSettings,
        cell_max_inflight: usize,
        max_rules_bytes: u64,
    ) -> Result<Arc<Self>, LoadError> {
        let text = read_rules_file(path, max_rules_bytes)?;
        // The revision is the document's own (`revision` key), so every
        // process reading the same text agrees on it. Parsed once.
        let doc = next_document(None, &text).map_err(|source| LoadError::Invalid {
            path: path.to_path_buf(),
            source,
        })?;
        if doc.revision == 0 {
            tracing::warn!(file = %path.display(), "the rules document has no `revision` key: its changes cannot be ordered between processes (add `revision = 1`; `cellctl rules bump` raises it)");
        }
        let table = compile_rules(path, doc.rules, doc.revision)?;
        let control = Self::with_table(text, table, metrics, upstream, health, cell_max_inflight);
        control.set_max_rules_bytes(max_rules_bytes);
        Ok(control)
    }

    /// Builds the first generation from a document and its revision;
    /// `source` names where it came from (errors, logs).
    pub fn from_text(
        source: &Path,
        text: String,
        revision: u64,
        metrics: Metrics,
        upstream: UpstreamSettings,
        health: HealthSettings,
        cell_max_inflight: usize,
    ) -> Result<Arc<Self>, LoadError> {
        let table = compile(source, &text, revision)?;
        Ok(Self::with_table(
            text,
            table,
            metrics,
            upstream,
            health,
            cell_max_inflight,
        ))
    }

    /// The first generation from a compiled table and its document.
    fn with_table(
        text: String,
        table: RoutingTable,
        metrics: Metrics,
        upstream: UpstreamSettings,
        health: HealthSettings,
        cell_max_inflight: usize,
    ) -> Arc<Self> {
        let control = Arc::new(Control {
            current: ArcSwap::from_pointee(Generation {
                table: Arc::new(table.clone()),
                cells: Vec::new(),
                rev_header: HeaderValue::from(0u64),
                loaded_at: SystemTime::now(),
            }),
            instances: Mutex::new(HashMap::new()),
            limiters: Mutex::new(HashMap::new()),
            metrics,
            upstream: Arc::new(upstream),
            health: Arc::new(health),
            cell_max_inflight,
            good_text: Mutex::new(text.clone()),
            registered: Mutex::new(Default::default()),
            install_lock: Mutex::new(()),
            installed: tokio::sync::watch::Sender::new(0),
            last_text: Mutex::new(text),
            max_rules_bytes: std::sync::atomic::AtomicU64::new(
                routing_rules::DEFAULT_MAX_DOCUMENT_BYTES,
            ),
        });
        control.install(Arc::new(table));
        control.metrics.reloads.with_label_values(&["ok"]).inc();
        control
    }

    /// Sets the largest rules document accepted from now on.
    pub fn set_max_rules_bytes(&self, max: u64) {
        self.max_rules_bytes.store(max, Ordering::Relaxed);
    }

    /// The generation being served.
    #[inline]
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The document being served, verbatim.
    pub fn current_text(&self) -> String {
        self.good_text.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Re-reads `path`; applies it when its content changed, is valid and
    /// its revision moved forward (or it is unversioned). Returns the new
    /// revision when applied, `Ok(None)` when unchanged. Every refusal —
    /// unreadable, deleted, not UTF-8, invalid, revision not raised — is
    /// counted in `cellgate_rules_reloads_total{result="error"}`.
    pub fn reload(&self, path: &Path) -> Result<Option<u64>, LoadError> {
        let max = self.max_rules_bytes.load(Ordering::Relaxed);
        let text = read_rules_file(path, max).inspect_err(|_| {
            self.metrics.reloads.with_label_values(&["error"]).inc();
        })?;
        let last = self.last_text.lock().map(|t| t.clone()).unwrap_or_default();
        if last == text {
            return Ok(None);
        }
        let current = self.current.load().table.revision();
        match next_document(Some((current, &last)), &text) {
            Ok(doc) => {
                let revision = doc.revision;
                let table = compile_rules(path, doc.rules, revision);
                self.install_text(path, text, table).map(Some)
            }
            Err(source) => {
                // Remember the refused text so it is reported once, not every poll.
                if let Ok(mut t) = self.last_text.lock() {
                    *t = text;
                }
                self.metrics.reloads.with_label_values(&["error"]).inc();
                Err(LoadError::Invalid {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }

    /// Validates, compiles and swaps in `text` as `revision`. An invalid
    /// document is counted and refused; the current rules keep serving.
    pub fn apply_text(&self, source: &Path, text: String, revision: u64) -> Result<u64, LoadError> {
        let table = compile(source, &text, revision);
        self.install_text(source, text, table)
    }

    /// Swaps in a compiled document (or counts and remembers a refused one,
    /// so it is reported once, not every poll).
    /// Logs what changed (revision, slots moved, splits and states).
    fn install_text(
        &self,
        source: &Path,
        text: String,
        table: Result<RoutingTable, LoadError>,
    ) -> Result<u64, LoadError> {
        match table {
            Ok(table) => {
                let revision = table.revision();
                let _serial = self.install_lock.lock().unwrap_or_else(|e| e.into_inner());
                let before = self.current.load();
                let changes = routing_rules::diff(before.table.rules(), table.rules()).brief();
                tracing::info!(
                    source = %source.display(),
                    revision,
                    previous = before.table.revision(),
                    %changes,
                    "rules installed"
                );
                drop(before);
                self.install(Arc::new(table));
                if let Ok(mut t) = self.good_text.lock() {
                    t.clone_from(&text);
                }
                if let Ok(mut t) = self.last_text.lock() {
                    *t = text;
                }
                self.metrics.reloads.with_label_values(&["ok"]).inc();
                Ok(revision)
            }
            Err(e) => {
                if let Ok(mut t) = self.last_text.lock() {
                    *t = text;
                }
                self.metrics.reloads.with_label_values(&["error"]).inc();
                Err(e)
            }
        }
    }

    /// Replaces the set of instances registered in the control plane and
    /// re-publishes the current rules with it: new instances join routing
    /// (after their first health check), lapsed ones leave it.
    pub fn set_registered(
        &self,
        registered: std::collections::BTreeMap<(String, String), Vec<String>>,
    ) {
        let _serial = self.install_lock.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut r = self.registered.lock().unwrap_or_else(|e| e.into_inner());
            if *r == registered {
                return;
            }
            *r = registered;
        }
        let table = self.current.load().table.clone();
        self.install(table);
    }

    fn install(&self, table: Arc<RoutingTable>) {
        let registered = self
            .registered
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default();
        let mut instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        let mut limiters = self.limiters.lock().unwrap_or_else(|e| e.into_inner());
        let mut next_instances = HashMap::new();
        let mut cells = Vec::with_capacity(table.cells().len());
        let now = now_ms();
        for (idx, cell) in table.cells().iter().enumerate() {
            let name = cell.name.clone();
            let limiter = limiters
                .entry(name.to_string())
                .or_insert_with(|| {
                    Arc::new(CellLimiter {
                        inflight: AtomicUsize::new(0),
                        cap: self.cell_max_inflight,
                        gauge: self.metrics.cell_inflight.with_label_values(&[&name]),
                    })
                })
                .clone();
            let colours = Colour::ALL.map(|colour| {
                let mut addrs: Vec<String> = table.instances(idx as CellIdx, colour).to_vec();
                if let Some(extra) =
                    registered.get(&(name.to_string(), colour.as_str().to_string()))
                {
                    for a in extra {
                        if !addrs.contains(a) {
                            addrs.push(a.clone());
                        }
                    }
                }
                let list = addrs
                    .iter()
                    .map(|addr| {
                        let key = (name.to_string(), colour, addr.clone());
                        let inst = instances.remove(&key).unwrap_or_else(|| {
                            let gauge = self.metrics.instance_up.with_label_values(&[
                                &name,
                                colour.as_str(),
                                addr,
                            ]);
                            let inst = Arc::new(Instance::new(
                                name.clone(),
                                colour,
                                addr,
                                self.upstream.clone(),
                                gauge,
                            ));
                            tokio::spawn(run_checks(Arc::downgrade(&inst), self.health.clone()));
                            inst
                        });
                        inst.refresh_gauge(now);
                        next_instances.insert(key, inst.clone());
                        inst
                    })
                    .collect();
                ColourGroup {
                    instances: list,
                    rr: AtomicUsize::new(0),
                    metrics: self.metrics.bind(&name, colour.as_str()),
                }
            });
            cells.push(CellRuntime {
                name_header: HeaderValue::from_str(&name)
                    .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
                limiter,
                colours,
            });
        }
        // Instances no longer in the rules: forget their metric series.
        for ((cell, colour, addr), _) in instances.drain() {
            let _ = self
                .metrics
                .instance_up
                .remove_label_values(&[&cell, colour.as_str(), &addr]);
        }
        *instances = next_instances;
        let rev = table.revision();
        self.metrics.rules_revision.set(rev as i64);
        self.current.store(Arc::new(Generation {
            rev_header: HeaderValue::from(rev),
            table,
            cells,
            loaded_at: SystemTime::now(),
        }));
        self.installed.send_replace(rev);
    }

    /// Waits until a generation with a revision above `revision` is
    /// installed, or any instance's health changes (at most until
    /// `until`); returns the generation to route with then.
    pub async fn newer_than(
        &self,
        revision: u64,
        until: tokio::time::Instant,
    ) -> Option<Arc<Generation>> {
        let mut rules = self.installed.subscribe();
        let mut health = self.health.changed.subscribe();
        let changed = async {
            tokio::select! {
                r = rules.wait_for(|r| *r > revision) => r.is_ok(),
                r = health.changed() => r.is_ok(),
            }
        };
        match tokio::time::timeout_at(until, changed).await {
            Ok(true) => Some(self.current()),
            _ => None,
        }
    }

    /// Watches `path` until `stop` resolves: woken by the file system's
    /// change events on its directory (inotify; an edit is seen at once),
    /// and every `interval` whatever happens (file systems without events,
    /// a missed event).
    pub async fn watch(
        self: Arc<Self>,
        path: PathBuf,
        interval: std::time::Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        // None: the first tick always compares the text, so a change made
        // between the initial load and this task's start is not missed.
        let mut last_meta = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let changed = Arc::new(tokio::sync::Notify::new());
        let _events = file_events(&path, changed.clone());
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = changed.notified() => {}
                _ = stop.changed() => return,
            }
            let meta = meta_key(&path);
            if meta == last_meta {
                continue;
            }
            last_meta = meta;
            let control = self.clone();
            let p = path.clone();
            // Parsing a large document is CPU work: keep it off the I/O threads.
            let outcome = tokio::task::spawn_blocking(move || control.reload(&p)).await;
            match outcome {
                Ok(Ok(Some(rev))) => {
                    tracing::debug!(file = %path.display(), revision = rev, "rules reloaded")
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "rules rejected; still serving the previous rules")
                }
                Err(e) => tracing::error!(error = %e, "rules reload task failed"),
            }
        }
    }
}

/// Wakes `changed` on every change in `path`'s directory (the rules are
/// replaced by a rename, so the directory is watched, not the file); `None`
/// (polling only) when the system gives no events.
fn file_events(
    path: &Path,
    changed: Arc<tokio::sync::Notify>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
        if e.is_ok() {
            changed.notify_one();
        }
    });
    match watcher.and_then(|mut w| {
        w.watch(&dir, notify::RecursiveMode::NonRecursive)
            .map(|()| w)
    }) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "no file-system events for the rules file; polling it only");
            None
        }
    }
}

fn meta_key(path: &Path) -> Option<(SystemTime, u64, u64)> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some((m.modified().ok()?, m.len(), ino))
}

/// Reads a rules file of at most `max` bytes (a larger one is refused
/// before it is read, so a huge file cannot take the gateway's memory).
pub fn read_rules_file(path: &Path, max: u64) -> Result<String, LoadError> {
    let read_err = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    // One open file, checked and read: a file replaced between a size
    // check by path and the read (an atomic rename) cannot slip past the
    // limit.
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(read_err)?;
    let too_large = |len| LoadError::TooLarge {
        path: path.to_path_buf(),
        len,
        max,
    };
    let len = file.metadata().map_err(read_err)?.len();
    if len > max {
        return Err(too_large(len));
    }
    let mut text = String::new();
    file.take(max.saturating_add(1))
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > max {
        return Err(too_large(text.len() as u64));
    }
    Ok(text)
}

fn compile(path: &Path, text: &str, revision: u64) -> Result<RoutingTable, LoadError> {
    let rules = parse_rules(text).map_err(|source| LoadError::Invalid {
        path: path.to_path_buf(),
        source: source.into(),
    })?;
    compile_rules(path, rules, revision)
}

fn compile_rules(path: &Path, rules: Rules, revision: u64) -> Result<RoutingTable, LoadError> {
    RoutingTable::compile(rules, revision).map_err(|e| LoadError::Compile {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
