//! The access log (`cellgate serve --access-log PATH|-`): one JSON line per
//! request, as nginx and Envoy users expect — time, request id, method,
//! path, status, the gateway's own error code when it answered itself,
//! serving cell, colour, slot, the last upstream instance tried, attempts,
//! and the time to the response head. The user id is logged only as a
//! hash unless `--access-log-user-ids`.
//!
//! Lines are formatted on the request's task and handed to one writer
//! thread through a bounded queue; a full queue drops the line (counted in
//! `cellgate_access_log_dropped_total`) rather than slow requests down.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant, SystemTime};

use prometheus::IntCounter;
use routing_rules::RouteDecision;
use serde::Serialize;

use crate::control::Generation;

/// Lines that may wait for the writer thread.
const QUEUE: usize = 16_384;
/// Seed of the user-id hash (a pseudonym for correlating a user's
/// requests, not anonymisation: ids from a small space can be guessed).
const USER_HASH_SEED: u64 = 0x6365_6c6c_6761_7465;

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Standard output (`-`).
    Stdout,
    /// A file, appended to (created when missing; `copytruncate` rotation
    /// works, the file is opened with O_APPEND).
    File(PathBuf),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" => Err("--access-log: give a file path, or - for standard output".into()),
            "-" => Ok(Target::Stdout),
            p => Ok(Target::File(PathBuf::from(p))),
        }
    }
}

/// The running access log.
#[derive(Debug)]
pub struct AccessLog {
    tx: SyncSender<Vec<u8>>,
    dropped: IntCounter,
    user_ids: bool,
}

impl AccessLog {
    /// Opens `target` (a file must be writable now: a bad path is an error
    /// at start, not a silent loss) and starts the writer thread.
    pub fn open(target: &Target, user_ids: bool, dropped: IntCounter) -> anyhow::Result<Self> {
        let mut out: Box<dyn Write + Send> = match target {
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| anyhow::anyhow!("--access-log {}: {e}", p.display()))?,
            ),
        };
        let (tx, rx) = sync_channel::<Vec<u8>>(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || loop {
                match rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(line) => {
                        let _ = out.write_all(&line);
                        // Flush when the queue runs dry, not per line.
                        while let Ok(line) = rx.try_recv() {
                            let _ = out.write_all(&line);
                        }
                        let _ = out.flush();
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        let _ = out.flush();
                        return;
                    }
                }
            })?;
        Ok(AccessLog {
            tx,
            dropped,
            user_ids,
        })
    }

    /// Writes `entry` (never blocks: a full queue drops it, counted).
    pub fn write(&self, entry: &Entry) {
        let line = entry.line(self.user_ids);
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(line) {
            self.dropped.inc();
        }
    }
}

/// One request as the access log records it, filled in as the request
/// goes (see the front ends).
#[derive(Debug, Clone)]
pub struct Entry {
    start: Instant,
    at: SystemTime,
    method: String,
    path: String,
    request_id: String,
    status: u16,
    error: Option<&'static str>,
    cell: Option<String>,
    colour: Option<&'static str>,
    slot: Option<u32>,
    upstream: Option<String>,
    attempts: u32,
    user: Option<Vec<u8>>,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    request_id: Option<&'a str>,
    method: &'a str,
    path: std::borrow::Cow<'a, str>,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    cell: Option<&'a str>,
    colour: Option<&'a str>,
    slot: Option<u32>,
    upstream: Option<&'a str>,
    attempts: u32,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<String>,
}

impl Entry {
    /// A request that arrived at `start` (its path without the query: a
    /// query may carry what does not belong in a log).
    pub fn new(method: &[u8], target: &str, start: Instant) -> Self {
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        Entry {
            start,
            at: SystemTime::now() - start.elapsed(),
            method: String::from_utf8_lossy(method).into_owned(),
            path: path.to_string(),
            request_id: String::new(),
            status: 0,
            error: None,
            cell: None,
            colour: None,
            slot: None,
            upstream: None,
            attempts: 0,
            user: None,
        }
    }

    /// Routed: its request id, user and first decision.
    pub fn routed(&mut self, gen: &Generation, out: &crate::proxy::Outgoing) {
        self.request_id = String::from_utf8_lossy(out.request_id()).into_owned();
        self.user = out.key().map(<[u8]>::to_vec);
        self.decided(gen, &out.decision);
        self.attempted(out);
    }

    /// The upstream attempts `out` made (of the last send, when a held
    /// request was sent again).
    pub fn attempted(&mut self, out: &crate::proxy::Outgoing) {
        self.attempts = out.attempts();
        if let Some(u) = out.upstream() {
            self.upstream = Some(u.to_string());
        }
    }

    /// The decision that served it.
    pub fn decided(&mut self, gen: &Generation, d: &RouteDecision) {
        self.cell = Some(gen.table.cell_name(d.serving_cell).to_string());
        self.colour = Some(d.colour.as_str());
        self.slot = d.slot;
    }

    /// The status noted so far (0: none yet).
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Answered by the cell with `status`.
    pub fn answered(&mut self, status: u16) {
        self.status = status;
    }

    /// Answered by the gateway itself.
    pub fn refused(&mut self, r: &crate::proxy::Refusal) {
        self.status = r.status.as_u16();
        self.error = Some(r.error);
    }

    fn line(&self, user_ids: bool) -> Vec<u8> {
        let user_hash = self
            .user
            .as_ref()
            .map(|u| format!("{:016x}", xxhash_rust::xxh64::xxh64(u, USER_HASH_SEED)));
        // A path segment that is the user id itself (`/v1/accounts/alice`)
        // is logged as `{user}` unless user ids are logged.
        let path = match (&self.user, user_ids) {
            (Some(u), false)
                if self
                    .path
                    .split('/')
                    .any(|seg| seg.as_bytes() == u.as_slice()) =>
            {
                std::borrow::Cow::Owned(
                    self.path
                        .split('/')
                        .map(|seg| {
                            if seg.as_bytes() == u.as_slice() {
                                "{user}"
                            } else {
                                seg
                            }
                        })
                        .collect::<Vec<_>>()
                        .join("/"),
                )
            }
            _ => std::borrow::Cow::Borrowed(self.path.as_str()),
        };
        let line = Line {
            time: humantime::format_rfc3339_millis(self.at).to_string(),
            request_id: (!self.request_id.is_empty()).then_some(self.request_id.as_str()),
            method: &self.method,
            path,
            status: self.status,
            error: self.error,
            cell: self.cell.as_deref(),
            colour: self.colour,
            slot: self.slot,
            upstream: self.upstream.as_deref(),
            attempts: self.attempts,
            duration_ms: (self.start.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            user_hash,
            user: if user_ids {
                self.user
                    .as_ref()
                    .map(|u| String::from_utf8_lossy(u).into_owned())
            } else {
                None
            },
        };
        let mut v = serde_json::to_vec(&line).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_one_json_object_without_the_query_or_the_raw_user() {
        let mut e = Entry::new(
            b"POST",
            "/v1/accounts/alice/deposit?token=secret",
            Instant::now(),
        );
        e.user = Some(b"alice".to_vec());
        e.status = 201;
        let text = String::from_utf8(e.line(false)).unwrap();
        assert!(text.ends_with('\n') && text.lines().count() == 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["path"], "/v1/accounts/{user}/deposit");
        assert_eq!(v["status"], 201);
        assert!(v.get("user").is_none(), "{v}");
        assert_eq!(v["user_hash"].as_str().unwrap().len(), 16);
        assert!(
            !text.contains("alice") && !text.contains("secret"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_slice(&e.line(true)).unwrap();
        assert_eq!(v["user"], "alice");
        assert_eq!(v["path"], "/v1/accounts/alice/deposit");
        assert!(v["request_id"].is_null(), "not routed: no id yet");
    }

    #[test]
    fn targets_parse() {
        assert_eq!("-".parse::<Target>(), Ok(Target::Stdout));
        assert_eq!(
            "/var/log/x.log".parse::<Target>(),
            Ok(Target::File("/var/log/x.log".into()))
        );
        assert!("".parse::<Target>().is_err());
    }
}
