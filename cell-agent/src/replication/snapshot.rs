//! Seeding the standby: a consistent snapshot of the shard sent in chunks
//! to its internal listener.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use super::Shipper;
use crate::relay::post_signed;

/// Wait before another snapshot after one failed.
pub(super) const SNAPSHOT_RETRY: Duration = Duration::from_secs(5);

/// Bytes of a snapshot per request.
const SNAPSHOT_CHUNK: usize = 4 * 1024 * 1024;

impl Shipper {
    /// Sends a consistent snapshot of the shard to the standby, in chunks;
    /// returns the LSN its replica is at afterwards.
    pub(super) async fn send_snapshot(
        &self,
        client: &Client<HttpConnector, Full<Bytes>>,
    ) -> Result<i64, String> {
        let (standby, addrs) = self.standby_in_order().map_err(|f| f.to_string())?;
        // One name per snapshot: both colours of the cell share the file
        // and may send one at the same time.
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).map_err(|e| e.to_string())?;
        let id = hex::encode(raw);
        let (db, tmp) = (
            self.db.clone(),
            PathBuf::from(format!("{}.snapshot-outgoing.{id}", self.db.display())),
        );
        let t = tmp.clone();
        let lsn = tokio::task::spawn_blocking(move || {
            crate::store::sqlite::replica::snapshot_to(&db, &t).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        let bytes = tokio::fs::read(&tmp).await.map_err(|e| e.to_string());
        let _ = tokio::fs::remove_file(&tmp).await;
        let bytes = bytes?;
        tracing::info!(%standby, lsn, bytes = bytes.len(), "sending a snapshot of the shard to the standby");
        // Every address of the standby cell in turn (one colour may be
        // down): the first that takes the first chunk gets the rest.
        let mut failures = Vec::new();
        for addr in &addrs {
            match self.send_snapshot_to(client, addr, &id, &bytes).await {
                Ok(applied) => {
                    self.answered(addr);
                    return Ok(applied);
                }
                Err((error, started)) => {
                    failures.push(error);
                    if started {
                        // Part of it is there: the next try starts over.
                        break;
                    }
                }
            }
        }
        Err(failures.join("; "))
    }

    /// Sends the snapshot `bytes` (named `id`) to `addr` in chunks; the
    /// standby's LSN afterwards, or the error and whether a chunk was
    /// taken before it.
    async fn send_snapshot_to(
        &self,
        client: &Client<HttpConnector, Full<Bytes>>,
        addr: &str,
        id: &str,
        bytes: &[u8],
    ) -> Result<i64, (String, bool)> {
        use crate::internal::SNAPSHOT_PATH;
        let me = &self.shard;
        let total = bytes.len();
        let mut offset = 0usize;
        // A standby instance that takes the connection but hangs costs
        // the first chunk's few seconds, not the later chunks' 30.
        let first_timeout = self.timeout.max(Duration::from_secs(5));
        let timeout = self.timeout.max(Duration::from_secs(30));
        loop {
            let end = (offset + SNAPSHOT_CHUNK).min(total);
            let last = end == total;
            let mut body =
                serde_json::json!({"cell": me, "id": id, "offset": offset, "total": total, "last": last})
                    .to_string()
                    .into_bytes();
            body.push(b'\n');
            body.extend_from_slice(&bytes[offset..end]);
            let started = offset > 0;
            match post_signed(
                client,
                &self.rules,
                &self.secret,
                addr,
                SNAPSHOT_PATH,
                &Bytes::from(body),
                if started { timeout } else { first_timeout },
            )
            .await
            {
                Ok((200, v)) if last => {
                    return v["applied"]
                        .as_i64()
                        .ok_or_else(|| (format!("{addr}: no LSN in {v}"), true))
                }
                Ok((200, _)) => offset = end,
                Ok((status, v)) => return Err((format!("{addr}: {status} {v}"), started)),
                Err(e) => return Err((format!("{addr}: {e}"), started)),
            }
        }
    }
}
