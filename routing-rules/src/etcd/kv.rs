//! Compare-and-swap on single keys (a canary pipeline's state): read a
//! key with its version, write it only if nobody changed it meanwhile.

use super::*;

impl ControlPlane {
    /// A key's value and its mod revision (0 when it is absent).
    pub async fn get_versioned(
        &mut self,
        key: &str,
    ) -> Result<(Option<Vec<u8>>, i64), ControlError> {
        let resp = self.client.get(key, None).await.map_err(|e| self.err(e))?;
        Ok(match resp.kvs().first() {
            Some(kv) => (Some(kv.value().to_vec()), kv.mod_revision()),
            None => (None, 0),
        })
    }

    /// Writes `value` if the key's mod revision is still `seen` (0: the key
    /// is still absent); `false`, with nothing written, when it changed.
    pub async fn put_if_unchanged(
        &mut self,
        key: &str,
        value: &str,
        seen: i64,
    ) -> Result<bool, ControlError> {
        let guard = if seen == 0 {
            Compare::version(key, CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key, CompareOp::Equal, seen)
        };
        let txn = Txn::new()
            .when(vec![guard])
            .and_then(vec![TxnOp::put(key, value, None)]);
        let resp = self.client.txn(txn).await.map_err(|e| self.err(e))?;
        Ok(resp.succeeded())
    }
}
