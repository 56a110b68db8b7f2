//! One shipment round: the batches the standby lacks, sent to its
//! addresses within the oldest waiting write's sync timeout.

use std::collections::VecDeque;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

use super::{in_memory, Failure, Outgoing, Shipper, MIN_TRY, SHIPMENT};
use crate::internal::JOURNAL_PATH;
use crate::relay::post_signed;
use crate::store::sqlite::journal::{Batch, Timeline};
use crate::store::sqlite::Ship;

impl Shipper {
    /// Ships batches until the standby has applied `target`; returns the
    /// standby's LSN. Batches this process's writer handed over with their
    /// rows (`pending`) go as they are; others (the other colour's, or
    /// after a gap) are read from the journal.
    pub(super) async fn ship_until(
        &self,
        client: &Client<HttpConnector, Full<Bytes>>,
        acked: &mut i64,
        target: i64,
        pending: &VecDeque<Ship>,
    ) -> Result<(), Failure> {
        // Whether the standby has told its position since the journal was
        // found not to follow `acked` (after a switchover the journal
        // restarts past what this shipper last saw acknowledged).
        let mut asked = false;
        // The whole call gets no more than the oldest waiting write has
        // left of its sync timeout: an address that holds the connection
        // without answering must not make a write wait the timeout once per
        // address or per shipment.
        let now = std::time::Instant::now();
        let deadline = pending
            .front()
            .map_or(now + self.timeout, |s| s.committed + self.timeout)
            .max(now + MIN_TRY);
        while *acked < target {
            let me = self.shard.as_str();
            let (_, addrs) = self.standby_in_order()?;
            let read;
            let (timeline, batches): (&Timeline, Vec<&Batch>) = match in_memory(pending, *acked) {
                Some(found) => found,
                None => {
                    read = self
                        .store
                        .journal_after(*acked, SHIPMENT)
                        .await
                        .map_err(|e| Failure::Other(format!("cannot read the journal: {e}")))?;
                    (&read.0, read.1.iter().collect())
                }
            };
            *self.shipped_timeline.lock().await = timeline.id.clone();
            match batches.first() {
                None => return Err(Failure::Other(format!("batch {target} is not in the journal"))),
                Some(b) if *acked > 0 && b.lsn != *acked + 1 && asked => {
                    return Err(Failure::NeedSnapshot(format!(
                        "the standby is at LSN {acked} but the journal starts at {}: seed its replica again from a snapshot",
                        b.lsn
                    )))
                }
                Some(b) if b.lsn != *acked + 1 => asked = true,
                Some(_) => {}
            }
            let body = Bytes::from(
                serde_json::to_vec(&Outgoing {
                    cell: me,
                    timeline,
                    batches: &batches,
                })
                .map_err(|e| Failure::Other(format!("cannot encode the shipment: {e}")))?,
            );
            let mut last = String::new();
            let mut moved = false;
            // The address that answered last first; each address gets an
            // equal share of the time left.
            let n = addrs.len();
            for (k, addr) in addrs.iter().enumerate() {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    last = format!(
                        "{addr}: not tried, the sync timeout ran out on the addresses before it"
                    );
                    break;
                }
                let share = (left / (n - k) as u32).max(MIN_TRY.min(left));
                match post_signed(
                    client,
                    &self.rules,
                    &self.secret,
                    addr,
                    JOURNAL_PATH,
                    &body,
                    share,
                )
                .await
                {
                    Ok((200, v)) => {
                        *acked = v["applied"].as_i64().unwrap_or(*acked);
                        moved = true;
                        self.answered(addr);
                        break;
                    }
                    Ok((409, v)) if v["error"] == "journal_gap" => {
                        *acked = v["lsn"].as_i64().unwrap_or(0);
                        moved = true;
                        break;
                    }
                    Ok((409, v)) if v["error"] == "is_primary" => {
                        return Err(Failure::Fenced(
                            v["message"].as_str().unwrap_or_default().to_string(),
                        ))
                    }
                    Ok((409, v))
                        if v["error"] == "need_snapshot" || v["error"] == "needs_failback" =>
                    {
                        return Err(Failure::NeedSnapshot(
                            v["message"].as_str().unwrap_or_default().to_string(),
                        ))
                    }
                    Ok((status, v)) => last = format!("{addr}: {status} {v}"),
                    Err(e) => last = format!("{addr}: {e}"),
                }
            }
            if !moved {
                return Err(Failure::Other(last));
            }
        }
        Ok(())
    }
}
