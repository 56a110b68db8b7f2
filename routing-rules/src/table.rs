//! The compiled routing table: an immutable, index-based form of [`Rules`]
//! whose [`RoutingTable::route`] is O(1) in the number of cells, slots and
//! overrides (one hash, two array reads, one hash-map probe, a scan of a
//! cell's short failover list).

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use xxhash_rust::xxh64::xxh64;

use crate::hash::{self, KeyProblem, HASH_VERSION};
use crate::model::*;

/// Index of a cell in a [`RoutingTable`] (cells sorted by name).
pub type CellIdx = u16;

/// Which (cell, colour) currently have a healthy instance.
pub trait HealthView {
    /// True when `colour` of `cell` has at least one healthy instance.
    fn is_up(&self, cell: CellIdx, colour: Colour) -> bool;

    /// True when either colour of `cell` is up.
    fn cell_up(&self, cell: CellIdx) -> bool {
        self.is_up(cell, Colour::Blue) || self.is_up(cell, Colour::Green)
    }
}

/// Everything is healthy.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllHealthy;

impl HealthView for AllHealthy {
    fn is_up(&self, _: CellIdx, _: Colour) -> bool {
        true
    }
}

/// A fixed health view: one flag per (cell, colour).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticHealth {
    up: Vec<[bool; 2]>,
}

impl StaticHealth {
    /// Up wherever the rules list at least one instance for the colour (or
    /// the cell takes registered instances).
    pub fn from_table(table: &RoutingTable) -> Self {
        let up = table
            .rules()
            .cells
            .values()
            .map(|c| {
                [
                    c.registered || !c.blue.is_empty(),
                    c.registered || !c.green.is_empty(),
                ]
            })
            .collect();
        StaticHealth { up }
    }

    /// Marks a colour (or, with `None`, both colours) of a cell up or down.
    pub fn set(&mut self, cell: CellIdx, colour: Option<Colour>, up: bool) {
        if let Some(flags) = self.up.get_mut(cell as usize) {
            match colour {
                Some(c) => flags[c as usize] = up,
                None => *flags = [up, up],
            }
        }
    }
}

impl HealthView for StaticHealth {
    fn is_up(&self, cell: CellIdx, colour: Colour) -> bool {
        self.up
            .get(cell as usize)
            .is_some_and(|f| f[colour as usize])
    }
}

/// Request attributes other than the key that can steer routing.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteAttrs<'a> {
    /// Value of the tester header, if the request carries one.
    pub tester_colour: Option<&'a [u8]>,
}

/// Which rule chose the serving cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CellReason {
    /// The slot's home cell.
    Home,
    /// A per-user override.
    Override,
    /// The home (or override) cell is failed over, draining, or down with
    /// an `auto` policy, and a backup serves.
    Failover,
    /// The key was missing or malformed and the policy names a default cell.
    DefaultCell,
    /// The home cell's shard was moved with its data (`hosted_by`: a
    /// switchover, or a failover that carried the data): its host serves.
    Hosted,
}

impl CellReason {
    /// Name as shown in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CellReason::Home => "home",
            CellReason::Override => "override",
            CellReason::Failover => "failover",
            CellReason::DefaultCell => "default-cell",
            CellReason::Hosted => "hosted",
        }
    }
}

/// Which rule chose the colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ColourReason {
    /// The sticky blue/green split.
    Split,
    /// A per-user override.
    Override,
    /// The (enabled) tester header.
    TesterHeader,
    /// The chosen colour had no healthy instance; the other colour serves.
    ColourFallback,
}

impl ColourReason {
    /// Name as shown in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ColourReason::Split => "split",
            ColourReason::Override => "override",
            ColourReason::TesterHeader => "tester-header",
            ColourReason::ColourFallback => "colour-fallback",
        }
    }
}

/// The outcome of routing one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteDecision {
    /// The key's slot (`None` when a missing key went to the default cell).
    pub slot: Option<u32>,
    /// The cell that owns the user (the override cell when pinned).
    pub home_cell: CellIdx,
    /// The cell that serves this request.
    pub serving_cell: CellIdx,
    /// Colour inside the serving cell.
    pub colour: Colour,
    /// Why this serving cell.
    pub reason: CellReason,
    /// Why this colour.
    pub colour_reason: ColourReason,
    /// Sticky bucket (0..10000) when the split was consulted.
    pub bucket: Option<u32>,
}

/// A compiled cell.
#[derive(Debug, Clone)]
pub struct CompiledCell {
    /// Name.
    pub name: Arc<str>,
    /// State.
    pub state: CellState,
    /// Failover policy.
    pub policy: FailoverPolicy,
    /// Backups, in order.
    pub failover: Box<[CellIdx]>,
    /// Split.
    pub split: Split,
    /// The cell holding this cell's shard after a switchover.
    pub hosted_by: Option<CellIdx>,
}

/// One override, stored inline in the hash table: user ids up to 24 bytes
/// live in the entry itself, so a lookup touches one control group and one
/// bucket, not a separate heap allocation.
#[derive(Debug, Clone)]
struct OverrideEntry {
    user: compact_str::CompactString,
    pin: Override<CellIdx>,
}

/// Overrides keyed by `xxh64(key, 0)` — the hash the slot lookup already
/// computed — so a lookup costs no second hash of the key.
#[derive(Debug, Clone, Default)]
struct OverrideMap {
    table: hashbrown::HashTable<OverrideEntry>,
}

impl OverrideMap {
    fn with_capacity(n: usize) -> Self {
        OverrideMap {
            table: hashbrown::HashTable::with_capacity(n),
        }
    }

    fn insert(&mut self, user: &str, pin: Override<CellIdx>) {
        let h = xxh64(user.as_bytes(), 0);
        self.table.insert_unique(
            h,
            OverrideEntry {
                user: user.into(),
                pin,
            },
            |e| xxh64(e.user.as_bytes(), 0),
        );
    }

    #[inline]
    fn get(&self, key_hash: u64, key: &[u8]) -> Option<Override<CellIdx>> {
        self.table
            .find(key_hash, |e| e.user.as_bytes() == key)
            .map(|e| e.pin)
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

/// An immutable routing table compiled from [`Rules`].
#[derive(Debug, Clone)]
pub struct RoutingTable {
    rules: Arc<Rules>,
    revision: u64,
    slot_cell: Box<[CellIdx]>,
    slot_epoch: Box<[u64]>,
    cells: Box<[CompiledCell]>,
    by_name: HashMap<Arc<str>, CellIdx>,
    overrides: OverrideMap,
    default_cell: Option<CellIdx>,
}

/// The table cannot hold this many cells.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("too many cells: {0} (at most 65535)")]
pub struct TooManyCells(pub usize);

impl RoutingTable {
    /// Compiles validated rules, tagging the table with `revision`.
    pub fn compile(rules: Rules, revision: u64) -> Result<Self, TooManyCells> {
        Self::compile_arc(Arc::new(rules), revision)
    }

    /// Like [`RoutingTable::compile`], sharing the rules.
    pub fn compile_arc(rules: Arc<Rules>, revision: u64) -> Result<Self, TooManyCells> {
        if rules.cells.len() > CellIdx::MAX as usize {
            return Err(TooManyCells(rules.cells.len()));
        }
        let by_name: HashMap<Arc<str>, CellIdx> = rules
            .cells
            .keys()
            .enumerate()
            .map(|(i, n)| (Arc::from(n.as_str()), i as CellIdx))
            .collect();
        let idx = |n: &str| by_name[n];
        let cells = rules
            .cells
            .iter()
            .map(|(name, c)| CompiledCell {
                name: Arc::from(name.as_str()),
                state: c.state,
                policy: c.failover_policy,
                failover: c.failover.iter().map(|f| idx(f)).collect(),
                split: c.split,
                hosted_by: c.hosted_by.as_deref().map(idx),
            })
            .collect();
        let mut slot_cell = Vec::with_capacity(rules.slots as usize);
        for r in &rules.table {
            slot_cell.extend(std::iter::repeat_n(idx(&r.cell), r.len() as usize));
        }
        let slot_epoch = rules.slot_epochs();
        let mut overrides = OverrideMap::with_capacity(rules.overrides.len());
        for (user, o) in &rules.overrides {
            overrides.insert(
                user,
                Override {
                    cell: o.cell.as_deref().map(idx),
                    colour: o.colour,
                },
            );
        }
        let default_cell = match &rules.on_missing {
            MissingKeyPolicy::Reject => None,
            MissingKeyPolicy::DefaultCell(c) => Some(idx(c)),
        };
        Ok(RoutingTable {
            revision,
            slot_cell: slot_cell.into(),
            slot_epoch: slot_epoch.into(),
            cells,
            by_name,
            overrides,
            default_cell,
            rules,
        })
    }

    /// The rules this table was compiled from.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Shared handle to the rules.
    pub fn rules_arc(&self) -> &Arc<Rules> {
        &self.rules
    }

    /// Rules revision this table was tagged with.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Number of slots.
    pub fn slots(&self) -> u32 {
        self.slot_cell.len() as u32
    }

    /// Number of per-user overrides.
    pub fn override_count(&self) -> usize {
        self.overrides.len()
    }

    /// Compiled cells, by index.
    pub fn cells(&self) -> &[CompiledCell] {
        &self.cells
    }

    /// Name of a cell.
    pub fn cell_name(&self, cell: CellIdx) -> &str {
        &self.cells[cell as usize].name
    }

    /// Index of a cell by name.
    pub fn cell_index(&self, name: &str) -> Option<CellIdx> {
        self.by_name.get(name).copied()
    }

    /// Static instance addresses of a cell's colour.
    pub fn instances(&self, cell: CellIdx, colour: Colour) -> &[String] {
        self.rules
            .cells
            .get(self.cell_name(cell))
            .map(|c| c.instances(colour))
            .unwrap_or(&[])
    }

    /// Home cell of a slot.
    #[inline]
    pub fn slot_cell(&self, slot: u32) -> CellIdx {
        self.slot_cell[slot as usize]
    }

    /// Ownership epoch of a slot (stamped as `x-cellgate-epoch`).
    #[inline]
    pub fn slot_epoch(&self, slot: u32) -> u64 {
        self.slot_epoch[slot as usize]
    }

    /// The serving cell for a home cell given health, and whether it moved.
    #[inline]
    pub fn serving_cell(&self, home: CellIdx, health: &impl HealthView) -> (CellIdx, bool) {
        let c = &self.cells[home as usize];
        // A shard moved with its data: its host serves it, whatever the
        // health says (no other cell has the data).
        if let Some(host) = c.hosted_by {
            return (host, true);
        }
        let moved = match c.state {
            CellState::Active => c.policy == FailoverPolicy::Auto && !health.cell_up(home),
            CellState::Draining | CellState::FailedOver => true,
        };
        if moved {
            for &b in c.failover.iter() {
                if self.cells[b as usize].state == CellState::Active && health.cell_up(b) {
                    return (b, true);
                }
            }
        }
        (home, false)
    }

    /// Routes one request.
    ///
    /// `key` is the routing key as extracted from the request (`None` when
    /// absent). Returns `Err` when the key is missing or malformed and the
    /// policy is to reject.
    #[inline]
    pub fn route(
        &self,
        key: Option<&[u8]>,
        attrs: &RouteAttrs<'_>,
        health: &impl HealthView,
    ) -> Result<RouteDecision, KeyProblem> {
        // One xxh64 of the key serves both the slot and the override lookup.
        let placed = match key {
            None => Err(KeyProblem::Missing),
            Some(k) => hash::check_key(k).and_then(|()| match self.rules.hash {
                HashAlgorithm::Xxh64 => {
                    let h = xxh64(k, 0);
                    Ok((k, (h % self.slots() as u64) as u32, h))
                }
                HashAlgorithm::Digits { count, skip } => {
                    hash::digits_slot(k, count, skip, self.slots()).map(|s| (k, s, 0))
                }
            }),
        };
        let (key, slot, home, pinned) = match placed {
            Ok((k, slot, h)) => {
                let pin = if self.overrides.is_empty() {
                    None
                } else {
                    let h = match self.rules.hash {
                        HashAlgorithm::Xxh64 => h,
                        HashAlgorithm::Digits { .. } => xxh64(k, 0),
                    };
                    self.overrides.get(h, k)
                };
                let home = match pin.and_then(|p| p.cell) {
                    Some(c) => c,
                    None => self.slot_cell[slot as usize],
                };
                (Some(k), Some(slot), home, pin)
            }
            Err(problem) => match self.default_cell {
                Some(c) => (None, None, c, None),
                None => return Err(problem),
            },
        };
        let (serving, moved) = self.serving_cell(home, health);
        let reason = if moved && self.cells[home as usize].hosted_by.is_some() {
            CellReason::Hosted
        } else if moved {
            CellReason::Failover
        } else if slot.is_none() {
            CellReason::DefaultCell
        } else if pinned.is_some_and(|p| p.cell.is_some()) {
            CellReason::Override
        } else {
            CellReason::Home
        };

        let split = self.cells[serving as usize].split;
        let tester = if self.rules.tester.enabled {
            attrs
                .tester_colour
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| Colour::parse(v.trim()))
        } else {
            None
        };
        let mut bucket = None;
        let (mut colour, mut colour_reason) = if let Some(c) = tester {
            (c, ColourReason::TesterHeader)
        } else if let Some(c) = pinned.and_then(|p| p.colour) {
            (c, ColourReason::Override)
        } else if let Some(k) = key {
            let b = hash::colour_bucket(k, split.seed);
            bucket = Some(b);
            let c = if b < split.green {
                Colour::Green
            } else {
                Colour::Blue
            };
            (c, ColourReason::Split)
        } else {
            // No key to bucket: the larger share (blue on a tie).
            let c = if split.green > BASIS_POINTS / 2 {
                Colour::Green
            } else {
                Colour::Blue
            };
            (c, ColourReason::Split)
        };
        if !health.is_up(serving, colour) && health.is_up(serving, colour.other()) {
            colour = colour.other();
            colour_reason = ColourReason::ColourFallback;
        }
        Ok(RouteDecision {
            slot,
            home_cell: home,
            serving_cell: serving,
            colour,
            reason,
            colour_reason,
            bucket,
        })
    }

    /// A serialisable explanation of a decision, as printed by
    /// `cellctl route -o json` and the gateway's `/admin/route`.
    pub fn explain(&self, key: &str, decision: &RouteDecision) -> RouteExplanation {
        let serving = &self.cells[decision.serving_cell as usize];
        RouteExplanation {
            key: key.to_string(),
            slot: decision.slot,
            epoch: decision.slot.map(|s| self.slot_epoch(s)),
            slots: self.slots(),
            home_cell: self.cell_name(decision.home_cell).to_string(),
            serving_cell: serving.name.to_string(),
            colour: decision.colour,
            reason: decision.reason,
            colour_reason: decision.colour_reason,
            bucket: decision.bucket,
            green_share: serving.split.green,
            revision: self.revision,
            hash_version: HASH_VERSION,
        }
    }
}

/// A route decision with names instead of indexes (JSON output).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteExplanation {
    /// The key routed.
    pub key: String,
    /// Its slot (`null` for a missing key sent to the default cell).
    pub slot: Option<u32>,
    /// The slot's ownership epoch.
    pub epoch: Option<u64>,
    /// Slot count of the rules.
    pub slots: u32,
    /// Home cell.
    pub home_cell: String,
    /// Serving cell.
    pub serving_cell: String,
    /// Colour.
    pub colour: Colour,
    /// Why this serving cell.
    pub reason: CellReason,
    /// Why this colour.
    pub colour_reason: ColourReason,
    /// Sticky bucket when the split decided.
    pub bucket: Option<u32>,
    /// Green share (basis points) of the serving cell.
    pub green_share: u32,
    /// Rules revision.
    pub revision: u64,
    /// Hash contract version.
    pub hash_version: u32,
}
