//! `hosted_by`: the cell holding a cell's shard after a switchover.

use std::collections::BTreeMap;

use super::file::FileCell;
use super::Checker;
use crate::model::CellState;

/// Checks cell `name`'s `hosted_by`: another defined cell, active, whose
/// own shard is at home (no chains).
pub(super) fn check(
    c: &mut Checker,
    cells: &BTreeMap<String, FileCell>,
    name: &str,
    fc: &FileCell,
) {
    if let Some(host) = &fc.hosted_by {
        let path = format!("cells.{name}.hosted_by");
        if host == name {
            c.bad(
                path,
                "a cell's shard at home is written without `hosted_by`",
            );
        } else if let Some(h) = cells.get(host) {
            if h.hosted_by.is_some() {
                c.bad(
                    path,
                    format!(
                        "cell {host} cannot host {name}'s shard: its own shard is hosted elsewhere"
                    ),
                );
            } else if h.state != CellState::Active {
                c.bad(
                    path,
                    format!("cell {host} cannot host {name}'s shard: it is {}", h.state),
                );
            }
        } else {
            c.cell_ref(cells, path, host);
        }
    }
}
