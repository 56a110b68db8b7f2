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
//! | `replication/<cell>` | JSON: the cell's shard replication record (standby, `in-sync`/`degraded` since, acknowledged LSN) |
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
    #[error("{}", etcd_message(.endpoints, .error))]
    Etcd {
        /// The endpoints tried.
        endpoints: String,
        /// The client error (summarised in the message, not chained: its
        /// text is a long transport dump).
        error: etcd_client::Error,
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

/// One line for an etcd client error: what failed, where, what to do.
fn etcd_message(endpoints: &str, e: &etcd_client::Error) -> String {
    let text = e.to_string();
    let unreachable = [
        "Connection refused",
        "tcp connect error",
        "timed out",
        "dns error",
        "unavailable",
    ]
    .iter()
    .any(|m| text.contains(m));
    if unreachable {
        let why = if text.contains("Connection refused") {
            "connection refused"
        } else if text.contains("timed out") {
            "timed out"
        } else if text.contains("dns error") {
            "the host name does not resolve"
        } else {
            "unavailable"
        };
        return format!(
            "cannot reach etcd at {endpoints} ({why}): is it running, and are --etcd (CELLGATE_ETCD) and --cluster right?"
        );
    }
    let short: String = text.chars().take(200).collect();
    format!("etcd at {endpoints} answered an error: {short}")
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
    /// A primary shard's replication record.
    pub fn replication(&self, cell: &str) -> String {
        format!("{}{cell}", self.replication_prefix())
    }
    /// Prefix of the replication records.
    pub fn replication_prefix(&self) -> String {
        format!("{}replication/", self.prefix)
    }
    /// The switchover in progress (`cellctl switchover`), if any.
    pub fn switchover(&self) -> String {
        format!("{}switchover", self.prefix)
    }
    /// A cell's canary pipeline (`cellctl canary`).
    pub fn canary(&self, cell: &str) -> String {
        format!("{}canary/{cell}", self.prefix)
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
            .map_err(|error| ControlError::Etcd {
                endpoints: joined.clone(),
                error,
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

    fn err(&self, error: etcd_client::Error) -> ControlError {
        ControlError::Etcd {
            endpoints: self.endpoints.clone(),
            error,
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
        self.apply_when(document, expected, Vec::new(), (applied_by, message))
            .await
    }

    /// [`Self::apply`] under extra conditions of the transaction; a conflict
    /// names the revision found.
    pub(crate) async fn apply_when(
        &mut self,
        document: &str,
        expected: u64,
        extra: Vec<Compare>,
        (applied_by, message): (&str, &str),
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
        let mut when = vec![guard];
        when.extend(extra);
        let txn = Txn::new()
            .when(when)
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

mod backoff;
mod follow;
mod kv;
mod replication;
mod status;
pub mod testing;

pub use backoff::{Backoff, Note, MAX_RETRY, SUMMARY_EVERY};
pub use follow::*;
pub use status::*;
