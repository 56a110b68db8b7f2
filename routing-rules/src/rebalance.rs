//! Rebalancing the slot table when cells are added or removed.
//!
//! Consistent hashing only *generates* a new explicit table; routing never
//! consults the ring. The ring is wrapped here (`Ring`) so the
//! `consistent_hash` crate can be swapped without touching callers.
//!
//! Movement rule, for every slot that is not pinned:
//! - its owner is being removed → the slot goes to the ring's first choice;
//! - the ring's first choice is a cell being added → the slot goes there;
//! - otherwise the slot stays.
//!
//! So adding an (N+1)th equal cell moves about `slots/(N+1)` slots (only to
//! the new cell) and removing a cell moves only that cell's slots.

use std::collections::{BTreeMap, BTreeSet};

use consistent_hash::{DefaultHash, Node, StaticHashRing};
use thiserror::Error;
use toml_edit::{value, ArrayOfTables, DocumentMut, Item, Table};

use crate::model::*;

/// Virtual nodes per unit of weight. `consistent_hash` spreads poorly with
/// few virtual nodes; 160 keeps each cell within a few percent of its share.
pub const VNODES_PER_WEIGHT: usize = 160;

/// A weighted hash ring over cell names.
struct Ring {
    nodes: Vec<(String, usize)>,
}

impl Ring {
    fn new(cells: &BTreeMap<String, u32>) -> Self {
        Ring {
            nodes: cells
                .iter()
                .map(|(c, w)| (c.clone(), *w as usize * VNODES_PER_WEIGHT))
                .collect(),
        }
    }

    /// First choice of the ring for each slot in `0..slots`.
    fn owners(&self, slots: u32) -> Vec<String> {
        let ring = StaticHashRing::new(
            DefaultHash,
            self.nodes
                .iter()
                .map(|(c, q)| Node::new(c.as_str()).quantity(*q)),
        );
        (0..slots)
            .map(|s| {
                ring.calc_candidates(&s)
                    .next()
                    .map(|n| n.key.to_string())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// What to change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebalancePlan {
    /// Cells to add (or re-weight), with an optional new weight.
    pub add: Vec<(String, Option<u32>)>,
    /// Cells whose slots are to be given away.
    pub remove: Vec<String>,
}

/// Why a rebalance cannot be done. Nothing is written.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RebalanceError {
    /// Nothing to do.
    #[error("nothing to rebalance: give --add-cell and/or --remove-cell")]
    Empty,
    /// Cells must be defined before slots can be given to them.
    #[error("cell \"{0}\" is not defined: add its [cells.{0}] section (instances, failover) first, then rebalance")]
    UnknownCell(String),
    /// A cell both added and removed.
    #[error("cell \"{0}\" is both added and removed")]
    AddAndRemove(String),
    /// A weight out of range.
    #[error("cell \"{cell}\": weight {weight} is out of range (1..=1000)")]
    BadWeight {
        /// The cell.
        cell: String,
        /// The weight.
        weight: u32,
    },
    /// A removed cell owns pinned slots, which never move.
    #[error("cell \"{cell}\" owns {count} pinned slot(s) (first: {first}); unpin them before removing the cell")]
    PinnedSlots {
        /// The cell.
        cell: String,
        /// Number of pinned slots.
        count: u32,
        /// First pinned slot.
        first: u32,
    },
    /// No cell would be left owning slots.
    #[error("removing {0} would leave no cell to own the slots")]
    NoneLeft(String),
    /// The original text could not be edited (it did not parse).
    #[error("cannot edit the document: {0}")]
    Edit(String),
}

/// Rebalances `rules` according to `plan`; everything but the slot table
/// (and the weights of added cells) is kept.
pub fn rebalance(rules: &Rules, plan: &RebalancePlan) -> Result<Rules, RebalanceError> {
    if plan.add.is_empty() && plan.remove.is_empty() {
        return Err(RebalanceError::Empty);
    }
    let removed: BTreeSet<&str> = plan.remove.iter().map(String::as_str).collect();
    let added: BTreeSet<&str> = plan.add.iter().map(|(c, _)| c.as_str()).collect();
    for c in removed.iter().chain(added.iter()) {
        if !rules.cells.contains_key(*c) {
            return Err(RebalanceError::UnknownCell(c.to_string()));
        }
    }
    if let Some(c) = removed.intersection(&added).next() {
        return Err(RebalanceError::AddAndRemove(c.to_string()));
    }
    let mut out = rules.clone();
    for (c, w) in &plan.add {
        if let Some(w) = *w {
            if !(1..=1000).contains(&w) {
                return Err(RebalanceError::BadWeight {
                    cell: c.clone(),
                    weight: w,
                });
            }
            if let Some(cell) = out.cells.get_mut(c) {
                cell.weight = w;
            }
        }
    }

    let owners = rules.slot_owners();
    let pins = rules.slot_pins();
    for c in &removed {
        let pinned: Vec<u32> = (0..rules.slots)
            .filter(|&s| pins[s as usize] && owners[s as usize] == *c)
            .collect();
        if let Some(&first) = pinned.first() {
            return Err(RebalanceError::PinnedSlots {
                cell: c.to_string(),
                count: pinned.len() as u32,
                first,
            });
        }
    }

    let mut members: BTreeMap<String, u32> = BTreeMap::new();
    for o in &owners {
        if !removed.contains(o) {
            members.insert(o.to_string(), out.cells[*o].weight);
        }
    }
    for c in &added {
        members.insert(c.to_string(), out.cells[*c].weight);
    }
    if members.is_empty() {
        return Err(RebalanceError::NoneLeft(plan.remove.join(", ")));
    }
    let ring = Ring::new(&members).owners(rules.slots);

    let new_owners: Vec<&str> = owners
        .iter()
        .enumerate()
        .map(|(s, &cur)| {
            let choice = ring[s].as_str();
            if pins[s] {
                cur
            } else if removed.contains(cur) || (added.contains(choice) && choice != cur) {
                choice
            } else {
                cur
            }
        })
        .collect();
    // A slot that changes owner starts a new ownership epoch.
    let epochs = Rules::epochs_after_moves(&owners, &rules.slot_epochs(), &new_owners);
    out.table = Rules::table_from_slot_parts(&new_owners, &pins, &epochs);
    Ok(out)
}

/// Writes `rules`' slot table and cell weights into the original document
/// text, keeping everything else (comments, order, formatting).
pub fn render_table_into(original: &str, rules: &Rules) -> Result<String, RebalanceError> {
    let mut doc: DocumentMut = original
        .parse()
        .map_err(|e: toml_edit::TomlError| RebalanceError::Edit(e.to_string()))?;

    match doc.get("ranges") {
        // `ranges = [ { from = .., to = .., cell = .. }, ... ]`: keep that form.
        Some(Item::Value(toml_edit::Value::Array(_))) => {
            let mut arr = toml_edit::Array::new();
            for r in &rules.table {
                let mut t = toml_edit::InlineTable::new();
                t.insert("from", (r.from as i64).into());
                t.insert("to", (r.to as i64).into());
                t.insert("cell", r.cell.as_str().into());
                if r.pinned {
                    t.insert("pinned", true.into());
                }
                if r.epoch != FIRST_EPOCH {
                    t.insert("epoch", (r.epoch as i64).into());
                }
                let mut v = toml_edit::Value::InlineTable(t);
                v.decor_mut().set_prefix("\n  ");
                arr.push_formatted(v);
            }
            arr.set_trailing("\n");
            arr.set_trailing_comma(true);
            doc["ranges"] = value(arr);
        }
        // `[[ranges]]` tables: replace them where they stood, keeping the
        // comment block above the first one.
        other => {
            let (position, decor) = match other {
                Some(Item::ArrayOfTables(a)) => (
                    a.get(0).and_then(Table::position),
                    a.get(0).map(|t| t.decor().clone()),
                ),
                _ => (None, None),
            };
            let mut ranges = ArrayOfTables::new();
            for (i, r) in rules.table.iter().enumerate() {
                let mut t = Table::new();
                t.insert("from", value(r.from as i64));
                t.insert("to", value(r.to as i64));
                t.insert("cell", value(r.cell.as_str()));
                if r.pinned {
                    t.insert("pinned", value(true));
                }
                if r.epoch != FIRST_EPOCH {
                    t.insert("epoch", value(r.epoch as i64));
                }
                if position.is_some() {
                    t.set_position(position);
                }
                if i == 0 {
                    if let Some(d) = &decor {
                        *t.decor_mut() = d.clone();
                    }
                }
                ranges.push(t);
            }
            doc["ranges"] = Item::ArrayOfTables(ranges);
        }
    }

    for (name, cell) in &rules.cells {
        let Some(t) = doc
            .get_mut("cells")
            .and_then(|c| c.get_mut(name.as_str()))
            .and_then(Item::as_table_like_mut)
        else {
            continue;
        };
        let current = t.get("weight").and_then(Item::as_integer).unwrap_or(1);
        if current != cell.weight as i64 {
            t.insert("weight", value(cell.weight as i64));
        }
    }
    Ok(doc.to_string())
}
