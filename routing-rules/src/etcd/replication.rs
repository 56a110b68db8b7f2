//! Replication records: each primary cell agent records its shard's
//! replication state (`in-sync` or `degraded`, since when, its standby, the
//! last LSN the standby acknowledged) under `replication/<cell>`, before it
//! goes on without a synchronous standby; `cellctl replication status`
//! reads them.

use super::*;

impl ControlPlane {
    /// Records `cell`'s replication state (a JSON object).
    pub async fn put_replication(
        &mut self,
        cell: &str,
        record: &serde_json::Value,
    ) -> Result<(), ControlError> {
        let key = self.keys.replication(cell);
        self.client
            .put(key, record.to_string(), None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Every cell's replication record, by cell.
    pub async fn replication(
        &mut self,
    ) -> Result<std::collections::BTreeMap<String, serde_json::Value>, ControlError> {
        let prefix = self.keys.replication_prefix();
        let resp = self
            .client
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.err(e))?;
        let mut out = std::collections::BTreeMap::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let cell = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
            let value = serde_json::from_slice(kv.value()).map_err(|e| ControlError::Corrupt {
                key,
                message: e.to_string(),
            })?;
            out.insert(cell, value);
        }
        Ok(out)
    }
}
