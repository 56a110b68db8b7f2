//! `diff(a, b)`: who moves where between two rule sets, and `apply` which
//! replays a diff onto `a` to get `b` exactly.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::*;

mod render;

/// A value before and after.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change<T> {
    /// Old value.
    pub before: T,
    /// New value.
    pub after: T,
}

/// A run of slots whose owner changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotMove {
    /// First slot (inclusive).
    pub from: u32,
    /// Last slot (inclusive).
    pub to: u32,
    /// Old owner (`None` for slots that did not exist before).
    pub from_cell: Option<String>,
    /// New owner.
    pub to_cell: String,
}

/// A run of slots whose pinned flag changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PinChange {
    /// First slot.
    pub from: u32,
    /// Last slot.
    pub to: u32,
    /// New flag.
    pub pinned: bool,
}

/// A run of slots whose ownership epoch changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EpochChange {
    /// First slot.
    pub from: u32,
    /// Last slot.
    pub to: u32,
    /// Old epoch (`None` for slots that did not exist before).
    pub before: Option<u64>,
    /// New epoch.
    pub after: u64,
}

/// Slot ownership of one cell before and after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct CellSlots {
    /// Slots owned before.
    pub slots_before: u32,
    /// Slots owned after.
    pub slots_after: u32,
    /// Slots it gained.
    pub gained: u32,
    /// Slots it lost.
    pub lost: u32,
}

/// A split change.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SplitChange {
    /// Old split.
    pub before: Split,
    /// New split.
    pub after: Split,
    /// Fraction of the cell's users that switch colour.
    pub users_switching_fraction: f64,
}

/// A cell present in both, with a different definition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CellModified {
    /// Cell name.
    pub name: String,
    /// State change, if any.
    pub state: Option<Change<CellState>>,
    /// Split change, if any.
    pub split: Option<SplitChange>,
    /// Whole definition before.
    pub before: Cell,
    /// Whole definition after.
    pub after: Cell,
}

/// Everything that differs between two rule sets.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RulesDiff {
    /// Slots whose owner changed (within the new slot range).
    pub slots_moved: u32,
    /// Fraction of users whose home cell changes. Exact (moved / slots)
    /// when hash and slot count are unchanged; an estimate when they change.
    pub users_moved_fraction: f64,
    /// True when the hash or slot count changed, so every key is re-hashed.
    pub rehash: bool,
    /// Slot count before and after.
    pub slots: Change<u32>,
    /// Runs of moved slots.
    pub moves: Vec<SlotMove>,
    /// Runs of slots whose pin changed.
    pub pins: Vec<PinChange>,
    /// Runs of slots whose ownership epoch changed.
    pub epochs: Vec<EpochChange>,
    /// What an operator must know before applying (slots that move without
    /// their data, epochs that do not rise with a move or go back).
    pub warnings: Vec<String>,
    /// Per-cell slot gains and losses (cells in either document).
    pub cells: BTreeMap<String, CellSlots>,
    /// Cells only in the new document.
    pub cells_added: BTreeMap<String, Cell>,
    /// Cells only in the old document.
    pub cells_removed: Vec<String>,
    /// Cells defined differently.
    pub cells_changed: Vec<CellModified>,
    /// Overrides only in the new document.
    pub overrides_added: BTreeMap<String, Override<String>>,
    /// Overrides only in the old document.
    pub overrides_removed: Vec<String>,
    /// Overrides that differ.
    pub overrides_changed: BTreeMap<String, Change<Override<String>>>,
    /// Key source change.
    pub key: Option<Change<KeySource>>,
    /// Missing-key policy change.
    pub on_missing: Option<Change<MissingKeyPolicy>>,
    /// Hash change.
    pub hash: Option<Change<HashAlgorithm>>,
    /// Tester policy change.
    pub tester: Option<Change<Tester>>,
}

fn change<T: PartialEq + Clone>(a: &T, b: &T) -> Option<Change<T>> {
    (a != b).then(|| Change {
        before: a.clone(),
        after: b.clone(),
    })
}

/// Fraction of users switching colour when a split changes.
pub fn split_switch_fraction(a: Split, b: Split) -> f64 {
    let (ga, gb) = (
        a.green as f64 / BASIS_POINTS as f64,
        b.green as f64 / BASIS_POINTS as f64,
    );
    if a.seed == b.seed {
        (gb - ga).abs()
    } else {
        // Independent buckets: green→blue plus blue→green.
        ga * (1.0 - gb) + (1.0 - ga) * gb
    }
}

/// Computes the difference from `a` to `b`.
pub fn diff(a: &Rules, b: &Rules) -> RulesDiff {
    let (oa, ob) = (a.slot_owners(), b.slot_owners());
    let (pa, pb) = (a.slot_pins(), b.slot_pins());
    let (ea, eb) = (a.slot_epochs(), b.slot_epochs());
    let rehash = a.hash != b.hash || a.slots != b.slots;

    let mut cells: BTreeMap<String, CellSlots> = BTreeMap::new();
    for (name, n) in a.slots_per_cell() {
        cells.entry(name.to_string()).or_default().slots_before = n;
    }
    for (name, n) in b.slots_per_cell() {
        cells.entry(name.to_string()).or_default().slots_after = n;
    }

    let mut moves: Vec<SlotMove> = Vec::new();
    let mut pins: Vec<PinChange> = Vec::new();
    let mut epochs: Vec<EpochChange> = Vec::new();
    let (mut slots_moved, mut moved_same_epoch, mut epoch_lowered) = (0u32, 0u32, 0u32);
    for (s, new) in ob.iter().enumerate() {
        let s = s as u32;
        let old = oa.get(s as usize).copied();
        let (old_epoch, new_epoch) = (ea.get(s as usize).copied(), eb[s as usize]);
        if old_epoch != Some(new_epoch) {
            epoch_lowered += u32::from(old_epoch.is_some_and(|e| e > new_epoch));
            match epochs.last_mut() {
                Some(e) if e.to + 1 == s && e.after == new_epoch && e.before == old_epoch => {
                    e.to = s
                }
                _ => epochs.push(EpochChange {
                    from: s,
                    to: s,
                    before: old_epoch,
                    after: new_epoch,
                }),
            }
        }
        if old.is_some() && old != Some(*new) && old_epoch.is_some_and(|e| e >= new_epoch) {
            moved_same_epoch += 1;
        }
        if old != Some(*new) {
            slots_moved += 1;
            if let Some(o) = old {
                cells.entry(o.to_string()).or_default().lost += 1;
            }
            cells.entry(new.to_string()).or_default().gained += 1;
            match moves.last_mut() {
                Some(m) if m.to + 1 == s && m.to_cell == *new && m.from_cell.as_deref() == old => {
                    m.to = s
                }
                _ => moves.push(SlotMove {
                    from: s,
                    to: s,
                    from_cell: old.map(str::to_string),
                    to_cell: new.to_string(),
                }),
            }
        }
        let (old_pin, new_pin) = (pa.get(s as usize).copied().unwrap_or(false), pb[s as usize]);
        if old_pin != new_pin {
            match pins.last_mut() {
                Some(p) if p.to + 1 == s && p.pinned == new_pin => p.to = s,
                _ => pins.push(PinChange {
                    from: s,
                    to: s,
                    pinned: new_pin,
                }),
            }
        }
    }

    let users_moved_fraction = if rehash {
        // A re-hashed user lands in a new cell independently of the old one.
        let (sa, sb) = (a.slots_per_cell(), b.slots_per_cell());
        let stay: f64 = sa
            .iter()
            .map(|(c, n)| {
                let nb = sb.get(c).copied().unwrap_or(0);
                (*n as f64 / a.slots as f64) * (nb as f64 / b.slots as f64)
            })
            .sum();
        1.0 - stay
    } else {
        slots_moved as f64 / b.slots as f64
    };

    let mut cells_added = BTreeMap::new();
    let mut cells_changed = Vec::new();
    for (name, cb) in &b.cells {
        match a.cells.get(name) {
            None => {
                cells_added.insert(name.clone(), cb.clone());
            }
            Some(ca) if ca != cb => cells_changed.push(CellModified {
                name: name.clone(),
                state: change(&ca.state, &cb.state),
                split: (ca.split != cb.split).then(|| SplitChange {
                    before: ca.split,
                    after: cb.split,
                    users_switching_fraction: split_switch_fraction(ca.split, cb.split),
                }),
                before: ca.clone(),
                after: cb.clone(),
            }),
            Some(_) => {}
        }
    }
    let cells_removed = a
        .cells
        .keys()
        .filter(|n| !b.cells.contains_key(*n))
        .cloned()
        .collect();

    let mut overrides_added = BTreeMap::new();
    let mut overrides_changed = BTreeMap::new();
    for (user, ob) in &b.overrides {
        match a.overrides.get(user) {
            None => {
                overrides_added.insert(user.clone(), ob.clone());
            }
            Some(oa) if oa != ob => {
                overrides_changed.insert(
                    user.clone(),
                    Change {
                        before: oa.clone(),
                        after: ob.clone(),
                    },
                );
            }
            Some(_) => {}
        }
    }
    let overrides_removed = a
        .overrides
        .keys()
        .filter(|u| !b.overrides.contains_key(*u))
        .cloned()
        .collect();

    let mut warnings = Vec::new();
    if slots_moved > 0 {
        warnings.push(format!(
            "{slots_moved} slot(s) change owner without their data: the new owner refuses their users' writes (503 slot_not_open) until the slots are handed over (switchover, or `cell-agent slots open` once the old owner has banned them), and their money stays in the old owner's store"
        ));
    }
    if moved_same_epoch > 0 {
        warnings.push(format!(
            "{moved_same_epoch} moved slot(s) keep or lower their epoch: raise the epoch of a range whenever it changes owner (`cellctl rules rebalance` does)"
        ));
    }
    if epoch_lowered > 0 {
        warnings.push(format!(
            "{epoch_lowered} slot(s) go back to an older epoch: epochs only rise, and a cell whose store is at the newer epoch refuses requests stamped with the older one"
        ));
    }

    RulesDiff {
        slots_moved,
        users_moved_fraction,
        rehash,
        slots: Change {
            before: a.slots,
            after: b.slots,
        },
        moves,
        pins,
        epochs,
        warnings,
        cells,
        cells_added,
        cells_removed,
        cells_changed,
        overrides_added,
        overrides_removed,
        overrides_changed,
        key: change(&a.key, &b.key),
        on_missing: change(&a.on_missing, &b.on_missing),
        hash: change(&a.hash, &b.hash),
        tester: change(&a.tester, &b.tester),
    }
}

impl RulesDiff {
    /// True when the two documents mean the same thing.
    pub fn is_empty(&self) -> bool {
        self.slots_moved == 0
            && !self.rehash
            && self.pins.is_empty()
            && self.epochs.is_empty()
            && self.cells_added.is_empty()
            && self.cells_removed.is_empty()
            && self.cells_changed.is_empty()
            && self.overrides_added.is_empty()
            && self.overrides_removed.is_empty()
            && self.overrides_changed.is_empty()
            && self.key.is_none()
            && self.on_missing.is_none()
            && self.hash.is_none()
            && self.tester.is_none()
    }

    /// Replays this diff onto `a` (the document it was computed from).
    pub fn apply(&self, a: &Rules) -> Rules {
        let mut r = a.clone();
        if let Some(c) = &self.key {
            r.key = c.after.clone();
        }
        if let Some(c) = &self.on_missing {
            r.on_missing = c.after.clone();
        }
        if let Some(c) = &self.hash {
            r.hash = c.after;
        }
        if let Some(c) = &self.tester {
            r.tester = c.after.clone();
        }
        for name in &self.cells_removed {
            r.cells.remove(name);
        }
        for (name, cell) in &self.cells_added {
            r.cells.insert(name.clone(), cell.clone());
        }
        for m in &self.cells_changed {
            r.cells.insert(m.name.clone(), m.after.clone());
        }
        for user in &self.overrides_removed {
            r.overrides.remove(user);
        }
        for (user, o) in &self.overrides_added {
            r.overrides.insert(user.clone(), o.clone());
        }
        for (user, c) in &self.overrides_changed {
            r.overrides.insert(user.clone(), c.after.clone());
        }
        let n = self.slots.after as usize;
        let mut owners: Vec<String> = a.slot_owners().into_iter().map(str::to_string).collect();
        let mut pins = a.slot_pins();
        let mut epochs = a.slot_epochs();
        owners.resize(n, String::new());
        pins.resize(n, false);
        epochs.resize(n, FIRST_EPOCH);
        for m in &self.moves {
            for s in m.from..=m.to {
                owners[s as usize] = m.to_cell.clone();
            }
        }
        for p in &self.pins {
            for s in p.from..=p.to {
                pins[s as usize] = p.pinned;
            }
        }
        for e in &self.epochs {
            for s in e.from..=e.to {
                epochs[s as usize] = e.after;
            }
        }
        r.slots = self.slots.after;
        r.table = Rules::table_from_slot_parts(&owners, &pins, &epochs);
        r
    }
}
