//! What a shipment carries: the batches this process's writer handed over
//! with their rows (so the shipper need not read them back from the
//! journal), and the body posted to the standby.

use std::collections::VecDeque;

use crate::store::sqlite::journal::{Batch, Timeline};
use crate::store::sqlite::Ship;

/// A shipment as sent (`POST /v1/internal/journal`).
#[derive(serde::Serialize)]
pub(super) struct Outgoing<'a> {
    pub cell: &'a str,
    pub timeline: &'a Timeline,
    pub batches: &'a [&'a Batch],
}

/// The batches after `acked` that this process's writer handed over with
/// their rows, contiguous and on one timeline (at most [`super::SHIPMENT`]);
/// `None` when the next one is not among them.
pub(super) fn in_memory(pending: &VecDeque<Ship>, acked: i64) -> Option<(&Timeline, Vec<&Batch>)> {
    let start = pending.iter().position(|s| s.lsn == acked + 1)?;
    let (timeline, first) = pending[start].written.as_ref()?;
    let mut batches = vec![first];
    for s in pending
        .iter()
        .skip(start + 1)
        .take(super::SHIPMENT as usize - 1)
    {
        match &s.written {
            Some((t, b)) if b.lsn == acked + 1 + batches.len() as i64 && t == timeline => {
                batches.push(b)
            }
            _ => break,
        }
    }
    Some((timeline, batches))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::journal::RowChange;

    fn ship(lsn: i64, timeline: &str, with_rows: bool) -> Ship {
        let row =
            serde_json::value::RawValue::from_string(format!(r#"{{"key":"lsn","value":"{lsn}"}}"#))
                .unwrap();
        let batch = Batch {
            lsn,
            rows: vec![RowChange {
                table: "meta".into(),
                upsert: true,
                row,
            }],
        };
        let tl = Timeline {
            id: timeline.into(),
            since: 0,
        };
        Ship {
            lsn,
            committed: std::time::Instant::now(),
            written: with_rows.then_some((tl, batch)),
            replies: Vec::new(),
        }
    }

    fn lsns(found: Option<(&Timeline, Vec<&Batch>)>) -> Option<Vec<i64>> {
        found.map(|(_, b)| b.iter().map(|b| b.lsn).collect())
    }

    #[test]
    fn only_contiguous_batches_on_one_timeline_go_from_memory() {
        // 7 is the other colour's batch (not handed over here).
        let pending: VecDeque<Ship> = [ship(5, "", true), ship(6, "", true), ship(8, "", true)]
            .into_iter()
            .collect();
        assert_eq!(lsns(in_memory(&pending, 4)), Some(vec![5, 6]));
        assert_eq!(lsns(in_memory(&pending, 5)), Some(vec![6]));
        assert_eq!(
            lsns(in_memory(&pending, 6)),
            None,
            "7 is read from the journal"
        );
        assert_eq!(lsns(in_memory(&pending, 7)), Some(vec![8]));
        assert_eq!(lsns(in_memory(&pending, 8)), None);
        // A promotion between two batches starts a new timeline.
        let pending: VecDeque<Ship> = [ship(1, "", true), ship(2, "t2", true)]
            .into_iter()
            .collect();
        assert_eq!(lsns(in_memory(&pending, 0)), Some(vec![1]));
        // A batch whose rows could not be read back comes from the journal.
        let pending: VecDeque<Ship> = [ship(1, "", false), ship(2, "", true)]
            .into_iter()
            .collect();
        assert_eq!(lsns(in_memory(&pending, 0)), None);
        assert_eq!(lsns(in_memory(&pending, 1)), Some(vec![2]));
    }

    #[test]
    fn a_shipment_holds_at_most_the_shipment_limit() {
        let pending: VecDeque<Ship> = (1..=200).map(|l| ship(l, "", true)).collect();
        let got = lsns(in_memory(&pending, 0)).unwrap();
        assert_eq!(got.len(), super::super::SHIPMENT as usize);
        assert_eq!(got.first(), Some(&1));
    }
}
