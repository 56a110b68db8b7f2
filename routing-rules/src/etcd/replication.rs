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

    /// Records `cell`'s replication state only if the rules are still at
    /// `rules_revision` (the revision its agent checked its shard was still
    /// its own in): false when they moved on (nothing written). A failover
    /// moves the rules only if this record did not change meanwhile, so the
    /// two exclude each other.
    pub async fn put_replication_if_rules(
        &mut self,
        cell: &str,
        record: &serde_json::Value,
        rules_revision: u64,
    ) -> Result<bool, ControlError> {
        let txn = Txn::new()
            .when(vec![Compare::value(
                self.keys.revision(),
                CompareOp::Equal,
                rules_revision.to_string(),
            )])
            .and_then(vec![TxnOp::put(
                self.keys.replication(cell),
                record.to_string(),
                None,
            )]);
        let resp = self.client.txn(txn).await.map_err(|e| self.err(e))?;
        Ok(resp.succeeded())
    }

    /// `cell`'s replication record and the etcd revision it was last
    /// written at (0 when there is none).
    pub async fn replication_of(
        &mut self,
        cell: &str,
    ) -> Result<(Option<serde_json::Value>, i64), ControlError> {
        let key = self.keys.replication(cell);
        let resp = self
            .client
            .get(key.clone(), None)
            .await
            .map_err(|e| self.err(e))?;
        let Some(kv) = resp.kvs().first() else {
            return Ok((None, 0));
        };
        let value = serde_json::from_slice(kv.value()).map_err(|e| ControlError::Corrupt {
            key,
            message: e.to_string(),
        })?;
        Ok((Some(value), kv.mod_revision()))
    }

    /// [`Self::apply`] only while `cell`'s replication record is still the
    /// one written at etcd revision `record_mod` (0: still none).
    pub async fn apply_if_record(
        &mut self,
        document: &str,
        expected: u64,
        (cell, record_mod): (&str, i64),
        applied_by: &str,
        message: &str,
    ) -> Result<u64, ControlError> {
        let unchanged =
            Compare::mod_revision(self.keys.replication(cell), CompareOp::Equal, record_mod);
        self.apply_when(document, expected, vec![unchanged], (applied_by, message))
            .await
            .map_err(|e| match e {
                ControlError::Conflict { .. } => ControlError::BadArgument(format!(
                    "the rules (revision {expected}) or cell {cell}'s replication record changed meanwhile; nothing was applied: look again and retry"
                )),
                other => other,
            })
    }

    /// A key's value.
    pub async fn get_raw(&mut self, key: &str) -> Result<Option<Vec<u8>>, ControlError> {
        let resp = self.client.get(key, None).await.map_err(|e| self.err(e))?;
        Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// Writes a key.
    pub async fn put_raw(&mut self, key: &str, value: &str) -> Result<(), ControlError> {
        self.client
            .put(key, value, None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Deletes a key.
    pub async fn delete_raw(&mut self, key: &str) -> Result<(), ControlError> {
        self.client
            .delete(key, None)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The internal addresses the instances registered, by cell.
    pub async fn registered_internal(
        &mut self,
    ) -> Result<std::collections::BTreeMap<String, Vec<String>>, ControlError> {
        let resp = self
            .client
            .get(
                self.keys.instances_prefix(),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| self.err(e))?;
        let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for kv in resp.kvs() {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(kv.value()) else {
                continue;
            };
            if let (Some(cell), Some(addr)) = (v["cell"].as_str(), v["internal_address"].as_str()) {
                out.entry(cell.to_string())
                    .or_default()
                    .push(addr.to_string());
            }
        }
        Ok(out)
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
