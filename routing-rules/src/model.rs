//! The rule model: the validated form of a rules document.
//!
//! [`Rules`] is what a document means once it has been parsed and checked
//! (see [`crate::validate`]). It is plain data: it can be compared, diffed,
//! rebalanced and compiled into a [`crate::RoutingTable`].

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Default number of slots when a document does not say (`slots`).
pub const DEFAULT_SLOTS: u32 = 100;
/// Largest slot count a document may ask for.
pub const MAX_SLOTS: u32 = 65_536;
/// Basis points in 100 %: splits are given in 0..=`BASIS_POINTS`.
pub const BASIS_POINTS: u32 = 10_000;
/// Parses a share written for people — `"10%"`, `"0.5%"`, `"12.34%"`
/// (the `%` may be left out: `"10"`) — into basis points (0..=10000). At
/// most two decimals; `None` when it is not such a percentage.
pub fn parse_percent(s: &str) -> Option<u32> {
    let s = s.trim();
    let s = s.strip_suffix('%').unwrap_or(s).trim_end();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty()
        || int.len() > 3
        || frac.len() > 2
        || !int.chars().all(|c| c.is_ascii_digit())
        || !frac.chars().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let whole: u32 = int.parse().ok()?;
    let frac_bp: u32 = format!("{frac:0<2}").parse().ok()?;
    let bp = whole.checked_mul(100)?.checked_add(frac_bp)?;
    (bp <= BASIS_POINTS).then_some(bp)
}

/// A share in basis points as people write it: `1000` → `"10%"`, `50` →
/// `"0.5%"`, `1234` → `"12.34%"` (what [`parse_percent`] reads back).
pub fn format_percent(bp: u32) -> String {
    let (whole, frac) = (bp / 100, bp % 100);
    match frac {
        0 => format!("{whole}%"),
        f if f % 10 == 0 => format!("{whole}.{}%", f / 10),
        f => format!("{whole}.{f:02}%"),
    }
}

/// Longest routing key (bytes) accepted; longer keys are malformed.
pub const MAX_KEY_LEN: usize = 256;
/// Default header carrying the routing key.
pub const DEFAULT_KEY_HEADER: &str = "x-user-id";
/// Default tester header (honoured only when `tester.enabled = true`).
pub const DEFAULT_TESTER_HEADER: &str = "x-cellgate-test-colour";
/// Request header stamped by the gateway: the user's slot.
pub const STAMP_SLOT: &str = "x-cellgate-slot";
/// Request header stamped by the gateway: the serving cell.
pub const STAMP_CELL: &str = "x-cellgate-cell";
/// Request header stamped by the gateway: the user's home cell.
pub const STAMP_HOME: &str = "x-cellgate-home";
/// Request header stamped by the gateway: the colour.
pub const STAMP_COLOUR: &str = "x-cellgate-colour";
/// Request header stamped by the gateway: the rules revision.
pub const STAMP_REV: &str = "x-cellgate-rev";
/// Request header stamped by the gateway: the epoch of the user's slot
/// (with [`STAMP_SLOT`]; the cell's store checks it inside every write).
pub const STAMP_EPOCH: &str = "x-cellgate-epoch";
/// All stamp headers. Clients may not send them (the gateway strips them),
/// and no rule may use them as key or tester header.
pub const STAMP_HEADERS: [&str; 6] = [
    STAMP_SLOT,
    STAMP_CELL,
    STAMP_HOME,
    STAMP_COLOUR,
    STAMP_REV,
    STAMP_EPOCH,
];
/// Epoch of a slot range that never changed owner (the default).
pub const FIRST_EPOCH: u64 = 1;
/// Largest epoch (2^53 − 1: exact in every JSON reader).
pub const MAX_EPOCH: u64 = (1 << 53) - 1;
/// Longest cell name; names are also metric label values.
pub const MAX_CELL_NAME_LEN: usize = 64;

/// One of the two equal instance groups inside a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    /// The blue group.
    Blue,
    /// The green group.
    Green,
}

impl Colour {
    /// Both colours, blue first.
    pub const ALL: [Colour; 2] = [Colour::Blue, Colour::Green];

    /// The other colour.
    pub fn other(self) -> Colour {
        match self {
            Colour::Blue => Colour::Green,
            Colour::Green => Colour::Blue,
        }
    }

    /// Lower-case name, as used in documents, headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Colour::Blue => "blue",
            Colour::Green => "green",
        }
    }

    /// Parses `blue` or `green` (ASCII case-insensitive).
    pub fn parse(s: &str) -> Option<Colour> {
        if s.eq_ignore_ascii_case("blue") {
            Some(Colour::Blue)
        } else if s.eq_ignore_ascii_case("green") {
            Some(Colour::Green)
        } else {
            None
        }
    }
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Operational state of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CellState {
    /// Serves its own slots and may take other cells' users on failover.
    #[default]
    Active,
    /// Planned drain (e.g. for a release): its users are served by its
    /// failover list, and it takes nobody else's users.
    Draining,
    /// Failed over by an operator: its users are served by its failover list,
    /// and it takes nobody else's users.
    FailedOver,
}

impl CellState {
    /// Name as written in documents.
    pub fn as_str(self) -> &'static str {
        match self {
            CellState::Active => "active",
            CellState::Draining => "draining",
            CellState::FailedOver => "failed-over",
        }
    }
}

impl fmt::Display for CellState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens when health says a cell is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailoverPolicy {
    /// A cell with no healthy instance is served by its failover list.
    #[default]
    Auto,
    /// Only an operator (state `failed-over`) moves the cell's users.
    Manual,
}

impl FailoverPolicy {
    /// Name as written in documents.
    pub fn as_str(self) -> &'static str {
        match self {
            FailoverPolicy::Auto => "auto",
            FailoverPolicy::Manual => "manual",
        }
    }
}

/// Where the routing key is read from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum KeySource {
    /// A request header (name is lower-case).
    Header {
        /// Header name, lower-case.
        name: String,
    },
    /// A cookie in the `cookie` header.
    Cookie {
        /// Cookie name (case-sensitive).
        name: String,
    },
    /// A query-string parameter (first occurrence, percent-decoded).
    Query {
        /// Parameter name (case-sensitive).
        name: String,
    },
    /// A segment of the request path, 0-based (`/v1/users/42` → segment 2 is `42`).
    Path {
        /// 0-based segment index.
        segment: usize,
    },
}

impl Default for KeySource {
    fn default() -> Self {
        KeySource::Header {
            name: DEFAULT_KEY_HEADER.to_string(),
        }
    }
}

/// What to do with a request whose key is missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Default)]
#[serde(tag = "policy", content = "cell", rename_all = "kebab-case")]
pub enum MissingKeyPolicy {
    /// Answer 400 with a JSON error body.
    #[default]
    Reject,
    /// Send the request to this cell.
    DefaultCell(String),
}

/// How a key is turned into a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
#[serde(tag = "algorithm", rename_all = "lowercase")]
pub enum HashAlgorithm {
    /// `slot = xxh64(key bytes, seed 0) mod slots` (hash version 1).
    #[default]
    Xxh64,
    /// `slot = (the `count` decimal digits that end `skip` digits before the
    /// end of the key) mod slots`. Keys that are not all ASCII digits, or
    /// that are shorter than `count + skip`, are malformed.
    Digits {
        /// How many digits form the slot number (1..=9).
        count: u8,
        /// How many trailing digits are skipped before reading.
        skip: u8,
    },
}

/// Sticky blue/green split of one cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
pub struct Split {
    /// Green share in basis points (0..=10000); the rest goes to blue. The
    /// rules file writes it as a percentage (`green = "10%"`); a bare
    /// integer is read as basis points (the older form).
    pub green: u32,
    /// Seed of the colour bucket hash; changing it reshuffles users.
    pub seed: u64,
}

/// One cell: its instances, failover order, state and split.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Cell {
    /// Operational state.
    pub state: CellState,
    /// Reaction to health.
    pub failover_policy: FailoverPolicy,
    /// Ordered backup cells.
    pub failover: Vec<String>,
    /// Relative weight used by `rebalance` (default 1).
    pub weight: u32,
    /// Blue instance addresses (`host:port`).
    pub blue: Vec<String>,
    /// Green instance addresses (`host:port`).
    pub green: Vec<String>,
    /// Blue/green split.
    pub split: Split,
    /// Instances may also come from control-plane registrations, so a
    /// colour with traffic may list no static instance (default false).
    pub registered: bool,
    /// Internal (cell-to-cell) listener addresses of the cell's agents:
    /// where other cells deliver cross-cell credits. Never routed to by a
    /// gateway (default empty; with `registered = true` they may also come
    /// from registrations).
    pub internal: Vec<String>,
    /// The cell that keeps a synchronous replica of this cell's shard
    /// (default: the first cell of `failover`).
    pub standby: Option<String>,
    /// The cell whose agents hold this cell's shard (its users' data) and
    /// serve its users, after a switchover moved it there (`cellctl
    /// switchover`); `None` while the shard is at home.
    pub hosted_by: Option<String>,
}

impl Cell {
    /// The standby cell: `standby`, else the first failover cell.
    pub fn standby(&self) -> Option<&str> {
        self.standby
            .as_deref()
            .or(self.failover.first().map(String::as_str))
    }

    /// Instance addresses of one colour.
    pub fn instances(&self, colour: Colour) -> &[String] {
        match colour {
            Colour::Blue => &self.blue,
            Colour::Green => &self.green,
        }
    }
}

/// An inclusive range of slots owned by one cell.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct SlotRange {
    /// First slot (inclusive).
    pub from: u32,
    /// Last slot (inclusive).
    pub to: u32,
    /// Owning cell.
    pub cell: String,
    /// Pinned ranges are never moved by `rebalance`.
    pub pinned: bool,
    /// Ownership epoch of these slots (monotonic per slot: raised whenever
    /// the slots change owner; default [`FIRST_EPOCH`]). The gateway stamps
    /// it on every request and a cell's store accepts a write only when its
    /// own row for the slot is open at this epoch.
    pub epoch: u64,
}

impl SlotRange {
    /// Number of slots in the range.
    pub fn len(&self) -> u32 {
        self.to - self.from + 1
    }

    /// Always false: a range holds at least one slot.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// A per-user pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Override<C> {
    /// Pinned cell, if any.
    pub cell: Option<C>,
    /// Pinned colour, if any.
    pub colour: Option<Colour>,
}

/// Tester header policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Tester {
    /// Header name (lower-case) whose value `blue`/`green` picks the colour.
    pub header: String,
    /// Whether the header is honoured (default false).
    pub enabled: bool,
}

impl Default for Tester {
    fn default() -> Self {
        Tester {
            header: DEFAULT_TESTER_HEADER.to_string(),
            enabled: false,
        }
    }
}

/// A validated rules document.
///
/// Invariants (checked by [`crate::validate`]): every slot in `0..slots` is
/// covered by exactly one range of `table`; every cell named anywhere exists;
/// splits are within 0..=10000; instance addresses are unique.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rules {
    /// Where the key comes from.
    pub key: KeySource,
    /// Missing/malformed key policy.
    pub on_missing: MissingKeyPolicy,
    /// Key → slot function.
    pub hash: HashAlgorithm,
    /// Number of slots (1..=65536).
    pub slots: u32,
    /// Tester header policy.
    pub tester: Tester,
    /// Cells by name.
    pub cells: BTreeMap<String, Cell>,
    /// Slot table, sorted by `from`, adjacent equal ranges merged.
    pub table: Vec<SlotRange>,
    /// Per-user pins.
    pub overrides: BTreeMap<String, Override<String>>,
}

impl Rules {
    /// Owner of every slot, index = slot.
    pub fn slot_owners(&self) -> Vec<&str> {
        let mut owners = Vec::with_capacity(self.slots as usize);
        for r in &self.table {
            for _ in r.from..=r.to {
                owners.push(r.cell.as_str());
            }
        }
        owners
    }

    /// The cell keeping a synchronous replica of `cell`'s shard: while the
    /// shard is hosted by another cell, its home cell (reverse
    /// replication, so a switchover back finds the data at home); else
    /// the cell's standby (see [`Cell::standby`]).
    pub fn standby_of<'a>(&'a self, cell: &'a str) -> Option<&'a str> {
        let c = self.cells.get(cell)?;
        match c.hosted_by {
            Some(_) => Some(cell),
            None => c.standby(),
        }
    }

    /// The cell whose agents hold `cell`'s shard and serve its users: the
    /// cell itself unless a switchover moved the shard (`hosted_by`).
    pub fn host_of<'a>(&'a self, cell: &'a str) -> &'a str {
        self.cells
            .get(cell)
            .and_then(|c| c.hosted_by.as_deref())
            .unwrap_or(cell)
    }

    /// The shards `cell`'s agents hold: its own (unless hosted elsewhere)
    /// and every shard hosted by it.
    pub fn shards_of<'a>(&'a self, cell: &'a str) -> Vec<&'a str> {
        self.cells
            .keys()
            .map(String::as_str)
            .filter(|c| self.host_of(c) == cell)
            .collect()
    }

    /// Epoch of every slot, index = slot.
    pub fn slot_epochs(&self) -> Vec<u64> {
        let mut epochs = Vec::with_capacity(self.slots as usize);
        for r in &self.table {
            epochs.extend(std::iter::repeat_n(r.epoch, r.len() as usize));
        }
        epochs
    }

    /// Whether each slot is pinned, index = slot.
    pub fn slot_pins(&self) -> Vec<bool> {
        let mut pins = Vec::with_capacity(self.slots as usize);
        for r in &self.table {
            pins.extend(std::iter::repeat_n(r.pinned, r.len() as usize));
        }
        pins
    }

    /// Number of slots each cell owns (cells owning none are listed with 0).
    pub fn slots_per_cell(&self) -> BTreeMap<&str, u32> {
        let mut counts: BTreeMap<&str, u32> = self.cells.keys().map(|c| (c.as_str(), 0)).collect();
        for r in &self.table {
            *counts.entry(r.cell.as_str()).or_default() += r.len();
        }
        counts
    }

    /// Builds a normalised table (sorted, adjacent equal ranges merged) from
    /// per-slot owners and pins, every slot at [`FIRST_EPOCH`].
    pub fn table_from_slots<S: AsRef<str>>(owners: &[S], pins: &[bool]) -> Vec<SlotRange> {
        Rules::table_from_slot_parts(owners, pins, &[])
    }

    /// Builds a normalised table from per-slot owners, pins and epochs (a
    /// slot missing from `pins` is unpinned, from `epochs` at
    /// [`FIRST_EPOCH`]).
    pub fn table_from_slot_parts<S: AsRef<str>>(
        owners: &[S],
        pins: &[bool],
        epochs: &[u64],
    ) -> Vec<SlotRange> {
        let mut table: Vec<SlotRange> = Vec::new();
        for (slot, owner) in owners.iter().enumerate() {
            let owner = owner.as_ref();
            let pinned = pins.get(slot).copied().unwrap_or(false);
            let epoch = epochs.get(slot).copied().unwrap_or(FIRST_EPOCH);
            let slot = slot as u32;
            match table.last_mut() {
                Some(last)
                    if last.cell == owner
                        && last.pinned == pinned
                        && last.epoch == epoch
                        && last.to + 1 == slot =>
                {
                    last.to = slot;
                }
                _ => table.push(SlotRange {
                    from: slot,
                    to: slot,
                    cell: owner.to_string(),
                    pinned,
                    epoch,
                }),
            }
        }
        table
    }

    /// The epochs after moving slots from `before` owners to `after`
    /// owners: a slot whose owner changed gets its old epoch + 1 (a slot
    /// beyond the old table starts at [`FIRST_EPOCH`]); the rest keep theirs.
    pub fn epochs_after_moves<A: AsRef<str>, B: AsRef<str>>(
        before: &[A],
        before_epochs: &[u64],
        after: &[B],
    ) -> Vec<u64> {
        after
            .iter()
            .enumerate()
            .map(|(s, new)| match (before.get(s), before_epochs.get(s)) {
                (Some(old), Some(&e)) if old.as_ref() != new.as_ref() => (e + 1).min(MAX_EPOCH),
                (_, Some(&e)) => e,
                _ => FIRST_EPOCH,
            })
            .collect()
    }

    /// Sorts and merges the table in place (same owners, same pins).
    pub fn normalise_table(&mut self) {
        let owners: Vec<String> = self.slot_owners().into_iter().map(str::to_string).collect();
        let pins = self.slot_pins();
        let epochs = self.slot_epochs();
        self.table = Rules::table_from_slot_parts(&owners, &pins, &epochs);
    }
}
