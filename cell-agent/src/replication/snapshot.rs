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
        use crate::internal::SNAPSHOT_PATH;
        let me = self.shard.clone();
        let (standby, addrs) = self.standby().map_err(|f| f.to_string())?;
        let addr = addrs[0].clone();
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
        let total = bytes.len();
        let mut offset = 0usize;
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
            match post_signed(
                client,
                &self.rules,
                &self.secret,
                &addr,
                SNAPSHOT_PATH,
                &Bytes::from(body),
                timeout,
            )
            .await
            {
                Ok((200, v)) if last => {
                    return v["applied"]
                        .as_i64()
                        .ok_or_else(|| format!("no LSN in {v}"))
                }
                Ok((200, _)) => offset = end,
                Ok((status, v)) => return Err(format!("{addr}: {status} {v}")),
                Err(e) => return Err(format!("{addr}: {e}")),
            }
        }
    }
}
