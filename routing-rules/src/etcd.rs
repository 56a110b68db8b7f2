//! The control plane's etcd layout and client, shared by `cellctl`, the
//! gateway and the cell agent (cargo feature `etcd`).
//!
//! Keys, under `/cellgate/<cluster>/`:
//!
//! | key | value |
//! | --- | --- |
//! | `rules` | the rules document, verbatim |
//! | `rules-revision` | the revision of that document (decimal, 1, 2, 3, ...) |
//! | `rules-history/<revision, 20 digits>` | JSON: revision, who applied it, when, message, document |
//!
//! An apply writes all three in one transaction guarded by the expected
//! revision (compare-and-swap), so two engineers editing at once get a
//! conflict instead of overwriting each other, and the history is never
//! out of step with the rules.

pub use etcd_client::GetOptions;
use etcd_client::{Client, Compare, CompareOp, SortOrder, SortTarget, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::error::RulesError;
use crate::validate::parse_rules;

/// Why a control-plane operation failed.
#[derive(Debug, Error)]
pub enum ControlError {
    /// etcd could not be reached or answered an error.
    #[error("etcd ({endpoints}): {source}")]
    Etcd {
        /// The endpoints tried.
        endpoints: String,
        /// The client error.
        source: etcd_client::Error,
    },
    /// Someone else applied a revision first.
    #[error("conflict: expected revision {expected} but the cluster is at revision {current}; nothing was written (re-read the rules and try again)")]
    Conflict {
        /// The revision the apply expected.
        expected: u64,
        /// The revision now stored.
        current: u64,
    },
    /// The document does not validate; nothing was written.
    #[error("invalid rules: {0}")]
    Invalid(RulesError),
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
    /// Stored data that cellgate did not write.
    #[error("corrupt control-plane data at {key}: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A bad argument (cluster name, ...).
    #[error("{0}")]
    BadArgument(String),
}

/// The rules as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredRules {
    /// The document, verbatim.
    pub document: String,
    /// Its revision.
    pub revision: u64,
    /// etcd's store revision at which it was read (for watches).
    pub etcd_revision: i64,
}

/// One applied version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Revision.
    pub revision: u64,
    /// Who applied it.
    pub applied_by: String,
    /// When (Unix ms).
    pub applied_at_ms: u64,
    /// The message given.
    pub message: String,
    /// The document.
    pub document: String,
}

/// Checks a cluster name: 1..=64 of `a-z A-Z 0-9 - _ .`.
pub fn check_cluster(name: &str) -> Result<(), ControlError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(ControlError::BadArgument(format!(
            "cluster name {name:?} must be 1..=64 characters of A-Z a-z 0-9 - _ ."
        )));
    }
    Ok(())
}

/// Parses an endpoint list such as `http://a:2379, http://b:2379`
/// (`--etcd`, `CELLGATE_ETCD`); empty entries are dropped.
pub fn parse_endpoints(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// This machine's host name (for registration ids and `applied_by`), if
/// it can be read.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// The key layout of one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys of `cluster`.
    pub fn new(cluster: &str) -> Result<Self, ControlError> {
        check_cluster(cluster)?;
        Ok(Keys {
            prefix: format!("/cellgate/{cluster}/"),
        })
    }
    /// The rules document.
    pub fn rules(&self) -> String {
        format!("{}rules", self.prefix)
    }
    /// The revision counter.
    pub fn revision(&self) -> String {
        format!("{}rules-revision", self.prefix)
    }
    /// Prefix of the history.
    pub fn history_prefix(&self) -> String {
        format!("{}rules-history/", self.prefix)
    }
    /// One history entry.
    pub fn history(&self, revision: u64) -> String {
        format!("{}{revision:020}", self.history_prefix())
    }
    /// A gateway's registration.
    pub fn gateway(&self, id: &str) -> String {
        format!("{}gateways/{id}", self.prefix)
    }
    /// Prefix of the gateways' registrations.
    pub fn gateways_prefix(&self) -> String {
        format!("{}gateways/", self.prefix)
    }
    /// An instance's registration.
    pub fn instance(&self, cell: &str, colour: &str, id: &str) -> String {
        format!("{}instances/{cell}/{colour}/{id}", self.prefix)
    }
    /// Prefix of every instance registration.
    pub fn instances_prefix(&self) -> String {
        format!("{}instances/", self.prefix)
    }
}

/// A connection to the control plane of one cluster.
pub struct ControlPlane {
    client: Client,
    keys: Keys,
    endpoints: String,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("endpoints", &self.endpoints)
            .field("keys", &self.keys)
            .finish()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl ControlPlane {
    /// Connects to `endpoints` (`http://host:port` or `host:port`).
    pub async fn connect(endpoints: &[String], cluster: &str) -> Result<Self, ControlError> {
        let keys = Keys::new(cluster)?;
        let joined = endpoints.join(",");
        if endpoints.is_empty() {
            return Err(ControlError::BadArgument("no etcd endpoint given".into()));
        }
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(3))
            .with_timeout(std::time::Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(opts))
            .await
            .map_err(|source| ControlError::Etcd {
                endpoints: joined.clone(),
                source,
            })?;
        Ok(ControlPlane {
            client,
            keys,
            endpoints: joined,
        })
    }

    /// The key layout.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The underlying client (watches, leases).
    pub fn client(&mut self) -> &mut Client {
        &mut self.client
    }

    fn err(&self, source: etcd_client::Error) -> ControlError {
        ControlError::Etcd {
            endpoints: self.endpoints.clone(),
            source,
        }
    }

    /// The current rules, or `None` when none were ever applied.
    pub async fn get(&mut self) -> Result<Option<StoredRules>, ControlError> {
        let txn = Txn::new().and_then(vec![
            TxnOp::get(self.keys.rules(), None),
            TxnOp::get(self.keys.revision(), None),
        ]);
        let resp = self.client.txn(txn).await.map_err(|e| self.err(e))?;
        let etcd_revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut values = Vec::new();
        for r in resp.op_responses() {
            if let etcd_client::TxnOpResponse::Get(g) = r {
                values.push(g.kvs().first().map(|kv| kv.value().to_vec()));
            }
        }
        let (Some(Some(doc)), Some(Some(rev))) = (values.first().cloned(), values.get(1).cloned())
        else {
            return Ok(None);
        };
        let document = String::from_utf8(doc).map_err(|_| ControlError::Corrupt {
            key: self.keys.rules(),
            message: "not UTF-8".into(),
        })?;
        let revision = parse_revision(&self.keys.revision(), &rev)?;
        Ok(Some(StoredRules {
            document,
            revision,
            etcd_revision,
        }))
    }

    /// Validates `document` and writes it as the next revision, if the
    /// stored revision is still `expected` (0 = nothing applied yet).
    /// Returns the new revision.
    pub async fn apply(
        &mut self,
        document: &str,
        expected: u64,
        applied_by: &str,
        message: &str,
    ) -> Result<u64, ControlError> {
        parse_rules(document).map_err(ControlError::Invalid)?;
        let next = expected + 1;
        let entry = HistoryEntry {
            revision: next,
            applied_by: applied_by.to_string(),
            applied_at_ms: now_ms(),
            message: message.to_string(),
            document: document.to_string(),
        };
        let history =
            serde_json::to_string(&entry).map_err(|e| ControlError::BadArgument(e.to_string()))?;
        let guard = if expected == 0 {
            Compare::version(self.keys.revision(), CompareOp::Equal, 0)
        } else {
            Compare::value(self.keys.revision(), CompareOp::Equal, expected.to_string())
        };
        let txn = Txn::new()
            .when(vec![guard])
            .and_then(vec![
                TxnOp::put(self.keys.rules(), document, None),
                TxnOp::put(self.keys.revision(), next.to_string(), None),
                TxnOp::put(self.keys.history(next), history, None),
            ])
            .or_else(vec![TxnOp::get(self.keys.revision(), None)]);
        let resp = self.client.txn(txn).await.map_err(|e| self.err(e))?;
        if resp.succeeded() {
            return Ok(next);
        }
        let mut current = 0;
        for r in resp.op_responses() {
            if let etcd_client::TxnOpResponse::Get(g) = r {
                if let Some(kv) = g.kvs().first() {
                    current = parse_revision(&self.keys.revision(), kv.value())?;
                }
            }
        }
        Err(ControlError::Conflict { expected, current })
    }

    /// Every applied version, oldest first.
    pub async fn history(&mut self) -> Result<Vec<HistoryEntry>, ControlError> {
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        let resp = self
            .client
            .get(self.keys.history_prefix(), Some(opts))
            .await
            .map_err(|e| self.err(e))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice(kv.value()).map_err(|e| ControlError::Corrupt {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    message: e.to_string(),
                })
            })
            .collect()
    }

    /// One applied version.
    pub async fn history_entry(&mut self, revision: u64) -> Result<HistoryEntry, ControlError> {
        let key = self.keys.history(revision);
        let resp = self
            .client
            .get(key.clone(), None)
            .await
            .map_err(|e| self.err(e))?;
        let kv = resp.kvs().first().ok_or_else(|| {
            ControlError::NotFound(format!("revision {revision} is not in the history"))
        })?;
        serde_json::from_slice(kv.value()).map_err(|e| ControlError::Corrupt {
            key,
            message: e.to_string(),
        })
    }
}

/// What `cellctl status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// Cluster name.
    pub cluster: String,
    /// Latest applied revision (0 = none).
    pub revision: u64,
    /// Registered gateways.
    pub gateways: Vec<GatewayStatus>,
    /// Registered instances per `cell/colour`, and the static ones in the rules.
    pub cells: std::collections::BTreeMap<String, CellColourStatus>,
    /// Instance health as the gateways see it (from their `/admin/health`):
    /// per `cell/colour`, per address, how many gateways see it up.
    pub health:
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, InstanceHealth>>,
    /// Gateways whose admin API could not be read.
    pub unreachable_gateways: Vec<String>,
}

/// One instance's health across gateways.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InstanceHealth {
    /// Gateways that see it up.
    pub up_in: usize,
    /// Gateways that report it.
    pub seen_by: usize,
}

/// One gateway's registration.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayStatus {
    /// Id.
    pub id: String,
    /// Revision it runs.
    pub revision: u64,
    /// Milliseconds since it applied that revision.
    pub applied_ms_ago: u64,
    /// Whether it runs the latest revision.
    pub current: bool,
    /// Its registration, as stored.
    pub registration: serde_json::Value,
}

/// Instances of one cell and colour.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CellColourStatus {
    /// Addresses registered under live leases.
    pub registered: Vec<String>,
    /// Static addresses in the rules.
    pub static_instances: Vec<String>,
}

impl ClusterStatus {
    /// Every registered gateway runs the latest revision.
    pub fn all_current(&self) -> bool {
        self.gateways.iter().all(|g| g.current)
    }

    /// Text for humans.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "cluster {}: rules revision {}",
            self.cluster, self.revision
        );
        let _ = writeln!(s, "gateways ({}):", self.gateways.len());
        for g in &self.gateways {
            let _ = writeln!(
                s,
                "  {:<24} revision {:<6} applied {:.1} s ago{}",
                g.id,
                g.revision,
                g.applied_ms_ago as f64 / 1000.0,
                if g.current { "" } else { "  BEHIND" }
            );
        }
        let _ = writeln!(
            s,
            "instances (registered = holds a live lease; up = passes the gateways' health checks):"
        );
        for (cc, st) in &self.cells {
            let _ = writeln!(
                s,
                "  {cc:<20} registered [{}]  static [{}]",
                st.registered.join(", "),
                st.static_instances.join(", ")
            );
            if let Some(h) = self.health.get(cc) {
                for (addr, ih) in h {
                    let _ = writeln!(
                        s,
                        "    {addr:<22} up in {}/{} gateways",
                        ih.up_in, ih.seen_by
                    );
                }
            }
        }
        for g in &self.unreachable_gateways {
            let _ = writeln!(
                s,
                "  (gateway {g}: admin API unreachable; its view of health is missing)"
            );
        }
        let _ = writeln!(
            s,
            "{}",
            if self.all_current() {
                "every gateway runs the latest revision"
            } else {
                "NOT every gateway runs the latest revision yet"
            }
        );
        s
    }
}

impl ControlPlane {
    /// Registrations of gateways and instances, and the live revision.
    pub async fn status(&mut self) -> Result<ClusterStatus, ControlError> {
        let stored = self.get().await?;
        let revision = stored.as_ref().map(|s| s.revision).unwrap_or(0);
        let now = now_ms();
        let mut gateways = Vec::new();
        let resp = self
            .client
            .get(
                self.keys.gateways_prefix(),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| self.err(e))?;
        for kv in resp.kvs() {
            let v: serde_json::Value = serde_json::from_slice(kv.value()).unwrap_or_default();
            let rev = v["revision"].as_u64().unwrap_or(0);
            gateways.push(GatewayStatus {
                id: v["id"].as_str().unwrap_or("?").to_string(),
                revision: rev,
                applied_ms_ago: now.saturating_sub(v["applied_at_ms"].as_u64().unwrap_or(now)),
                current: rev == revision,
                registration: v,
            });
        }
        let mut cells: std::collections::BTreeMap<String, CellColourStatus> = Default::default();
        if let Some(s) = &stored {
            if let Ok(rules) = parse_rules(&s.document) {
                for (name, cell) in &rules.cells {
                    for (colour, list) in [("blue", &cell.blue), ("green", &cell.green)] {
                        cells
                            .entry(format!("{name}/{colour}"))
                            .or_default()
                            .static_instances = list.clone();
                    }
                }
            }
        }
        let resp = self
            .client
            .get(
                self.keys.instances_prefix(),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| self.err(e))?;
        for kv in resp.kvs() {
            let v: serde_json::Value = serde_json::from_slice(kv.value()).unwrap_or_default();
            let key = format!(
                "{}/{}",
                v["cell"].as_str().unwrap_or("?"),
                v["colour"].as_str().unwrap_or("?")
            );
            cells
                .entry(key)
                .or_default()
                .registered
                .push(v["address"].as_str().unwrap_or("?").to_string());
        }
        Ok(ClusterStatus {
            cluster: self
                .keys
                .prefix
                .trim_start_matches("/cellgate/")
                .trim_end_matches('/')
                .to_string(),
            revision,
            gateways,
            cells,
            health: Default::default(),
            unreachable_gateways: Vec::new(),
        })
    }
}

impl ClusterStatus {
    /// Asks every registered gateway's admin API (`/admin/health`, with
    /// `token` as bearer token when given) how it sees each instance.
    pub async fn add_health(&mut self, token: Option<&str>) {
        use http_body_util::BodyExt;
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        for g in &self.gateways {
            let Some(admin) = g.registration["admin"].as_str() else {
                self.unreachable_gateways.push(g.id.clone());
                continue;
            };
            let mut req = http::Request::get(format!("http://{admin}/admin/health"));
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let Ok(req) = req.body(http_body_util::Empty::new()) else {
                continue;
            };
            let fetched = async {
                let resp = client.request(req).await.ok()?;
                if !resp.status().is_success() {
                    return None;
                }
                let body = resp.into_body().collect().await.ok()?.to_bytes();
                serde_json::from_slice::<serde_json::Value>(&body).ok()
            };
            match tokio::time::timeout(std::time::Duration::from_secs(2), fetched).await {
                Ok(Some(v)) => {
                    for i in v["instances"].as_array().into_iter().flatten() {
                        let cc = format!(
                            "{}/{}",
                            i["cell"].as_str().unwrap_or("?"),
                            i["colour"].as_str().unwrap_or("?")
                        );
                        let e = self
                            .health
                            .entry(cc)
                            .or_default()
                            .entry(i["address"].as_str().unwrap_or("?").to_string())
                            .or_default();
                        e.seen_by += 1;
                        if i["up"].as_bool() == Some(true) {
                            e.up_in += 1;
                        }
                    }
                }
                _ => self.unreachable_gateways.push(g.id.clone()),
            }
        }
    }
}

fn parse_revision(key: &str, bytes: &[u8]) -> Result<u64, ControlError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ControlError::Corrupt {
            key: key.to_string(),
            message: format!(
                "not a revision number: {:?}",
                String::from_utf8_lossy(bytes)
            ),
        })
}

/// Pause before reconnecting after an etcd failure, ms.
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
                tracing_warn(&format!(
                    "etcd rules session ended ({e}); keeping the last good rules, reconnecting"
                ));
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(RETRY_MS)) => {}
        }
    }
}

/// Keeps `key` registered with the latest value of `value` under a lease of
/// `ttl_s` seconds, re-granting after a loss, until `stop` flips.
/// `on_lease` reports whether the lease is held (false as soon as a
/// keep-alive fails or the lease expires) — cell agents fence themselves on it.
pub async fn keep_registered(
    endpoints: Vec<String>,
    cluster: String,
    key: String,
    mut value: tokio::sync::watch::Receiver<String>,
    ttl_s: i64,
    on_lease: impl Fn(bool) + Send,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let session = async {
            let mut cp = ControlPlane::connect(&endpoints, &cluster).await?;
            let lease = cp
                .client()
                .lease_grant(ttl_s, None)
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
                    key.clone(),
                    v,
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )
            };
            let current = value.borrow_and_update().clone();
            cp.client()
                .txn(Txn::new().and_then(vec![put(current)]))
                .await
                .map_err(|e| cp.err(e))?;
            on_lease(true);
            // Renew well inside the TTL, and give the lease up (fence)
            // before the server could expire it: if no renewal has been
            // acknowledged for 2/3 of the TTL, this session is over.
            let ttl = std::time::Duration::from_secs(ttl_s as u64);
            let mut tick =
                tokio::time::interval((ttl / 6).max(std::time::Duration::from_millis(50)));
            let mut last_ack = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    _ = stop.changed() => {
                        let _ = cp.client().lease_revoke(lease).await;
                        return Ok::<(), ControlError>(());
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
        };
        match session.await {
            Ok(()) => return,
            Err(e) => {
                on_lease(false);
                tracing_warn(&format!("etcd registration of {key} lost ({e}); retrying"));
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(RETRY_MS)) => {}
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
            Err(e) => tracing_warn(&format!("etcd instances session ended ({e}); reconnecting")),
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(std::time::Duration::from_millis(RETRY_MS)) => {}
        }
    }
}

fn tracing_warn(msg: &str) {
    tracing::warn!("{msg}");
}

/// A real etcd server for tests: Debian's `etcd` on free loopback ports
/// with a temporary data dir, killed (and the dir removed) on drop.
pub mod testing {
    use std::net::TcpListener;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A running (or stopped) test etcd.
    #[derive(Debug)]
    pub struct EtcdServer {
        child: Option<Child>,
        /// Client URL, `http://127.0.0.1:PORT`.
        pub url: String,
        client_port: u16,
        peer_port: u16,
        dir: PathBuf,
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0)
    }

    impl EtcdServer {
        /// Starts etcd and waits until it accepts connections.
        pub fn start() -> EtcdServer {
            let dir = std::env::temp_dir().join(format!(
                "cellgate-etcd-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ));
            let (client_port, peer_port) = (free_port(), free_port());
            let mut e = EtcdServer {
                child: None,
                url: format!("http://127.0.0.1:{client_port}"),
                client_port,
                peer_port,
                dir,
            };
            e.restart();
            e
        }

        /// Stops etcd (SIGKILL); the data dir is kept for [`EtcdServer::restart`].
        pub fn kill(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }

        /// (Re)starts etcd on the same ports and data dir.
        pub fn restart(&mut self) {
            self.kill();
            let url = self.url.clone();
            let peer = format!("http://127.0.0.1:{}", self.peer_port);
            let child = Command::new("etcd")
                .args(["--name", "t", "--data-dir"])
                .arg(&self.dir)
                .args([
                    "--listen-client-urls",
                    &url,
                    "--advertise-client-urls",
                    &url,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                ])
                .args([
                    "--initial-cluster",
                    &format!("t={peer}"),
                    "--log-level",
                    "error",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcd is installed (apt-get install etcd-server)");
            self.child = Some(child);
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
                assert!(Instant::now() < deadline, "etcd did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    impl Drop for EtcdServer {
        fn drop(&mut self) {
            self.kill();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
