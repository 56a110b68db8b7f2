//! Errors of the rule engine. Every variant names the thing that was wrong.

use std::fmt;

use thiserror::Error;

/// A document could not be accepted.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RulesError {
    /// The text is not TOML, or does not have the document's shape.
    #[error("{}", fmt_parse(.line, .column, .message))]
    Parse {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// What the parser said.
        message: String,
    },
    /// The document parsed but breaks one or more rules.
    #[error("{}", fmt_invalid(.0))]
    Invalid(Vec<ValidationError>),
}

impl RulesError {
    /// The individual problems (one for a parse error).
    pub fn problems(&self) -> Vec<String> {
        match self {
            RulesError::Parse { .. } => vec![self.to_string()],
            RulesError::Invalid(errs) => errs.iter().map(|e| e.to_string()).collect(),
        }
    }
}

fn fmt_parse(line: &usize, column: &usize, message: &str) -> String {
    format!("line {line}, column {column}: {message}")
}

/// Problems listed in a message; the rest are counted.
pub const MAX_LISTED_PROBLEMS: usize = 100;

fn fmt_invalid(errs: &[ValidationError]) -> String {
    let mut s = format!("{} problem(s):", errs.len());
    for e in errs.iter().take(MAX_LISTED_PROBLEMS) {
        s.push_str("\n  - ");
        s.push_str(&e.to_string());
    }
    if errs.len() > MAX_LISTED_PROBLEMS {
        s.push_str(&format!(
            "\n  ... and {} more",
            errs.len() - MAX_LISTED_PROBLEMS
        ));
    }
    s
}

/// Renders an inclusive slot range as `5` or `5-9`.
pub(crate) struct Slots(pub u32, pub u32);

impl fmt::Display for Slots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == self.1 {
            write!(f, "slot {}", self.0)
        } else {
            write!(f, "slots {}-{}", self.0, self.1)
        }
    }
}

/// One semantic problem in a document. `at` is the key path in the document
/// (e.g. `cells.cell-a.failover[1]`, `ranges[3]`).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ValidationError {
    /// `slots` outside 1..=65536.
    #[error("slots: {0} is out of range (1..=65536)")]
    SlotCount(u64),
    /// A value is not allowed.
    #[error("{at}: {message}")]
    BadValue {
        /// Key path.
        at: String,
        /// Why.
        message: String,
    },
    /// A cell name is referenced but not defined.
    #[error("{at}: unknown cell \"{cell}\" (defined cells: {known})")]
    UnknownCell {
        /// Key path of the reference.
        at: String,
        /// The name used.
        cell: String,
        /// Comma-separated defined cells.
        known: String,
    },
    /// A cell lists itself as a failover target.
    #[error("cells.{cell}.failover: cell \"{cell}\" fails over to itself")]
    FailoverToSelf {
        /// The cell.
        cell: String,
    },
    /// A failover list names the same cell twice.
    #[error("cells.{cell}.failover: \"{target}\" is listed more than once")]
    DuplicateFailover {
        /// The cell.
        cell: String,
        /// The repeated target.
        target: String,
    },
    /// A split is outside 0..=10000 basis points.
    #[error("cells.{cell}.split.green: {value} basis points is out of range (0..=10000)")]
    SplitOutOfRange {
        /// The cell.
        cell: String,
        /// The given value.
        value: i64,
    },
    /// The same instance address appears twice.
    #[error("instance address {address} is used by both {first} and {second}")]
    DuplicateInstance {
        /// The address.
        address: String,
        /// Where it appeared first (`cell/colour`).
        first: String,
        /// Where it appeared again.
        second: String,
    },
    /// A colour gets traffic but has no instances.
    #[error("cells.{cell}.{colour}: the split gives {colour} {share} basis points of traffic but it has no instances")]
    WeightWithoutInstances {
        /// The cell.
        cell: String,
        /// The colour.
        colour: String,
        /// Its share in basis points.
        share: u32,
    },
    /// A range is malformed (`from > to` or beyond the slot count).
    #[error("ranges[{index}]: {message}")]
    BadRange {
        /// Index in `ranges`.
        index: usize,
        /// Why.
        message: String,
    },
    /// Slots owned by no range.
    #[error("ranges: {} not assigned to any cell", Slots(*.from, *.to))]
    Unassigned {
        /// First unassigned slot.
        from: u32,
        /// Last unassigned slot.
        to: u32,
    },
    /// Slots owned by more than one range.
    #[error("ranges: {} assigned twice, to \"{first_cell}\" (ranges[{first}]) and \"{second_cell}\" (ranges[{second}])", Slots(*.from, *.to))]
    DoublyAssigned {
        /// First slot assigned twice.
        from: u32,
        /// Last slot of that overlap.
        to: u32,
        /// First range index.
        first: usize,
        /// Its cell.
        first_cell: String,
        /// Second range index.
        second: usize,
        /// Its cell.
        second_cell: String,
    },
    /// No cell is defined.
    #[error("cells: at least one cell must be defined")]
    NoCells,
}

/// An error and its causes as one line for people: `{:#}` of an error
/// whose message already includes its cause (thiserror's `{source}`)
/// says the same thing twice or three times; here a cause already said is
/// left out.
pub fn report(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod report_tests {
    #[test]
    fn a_cause_already_said_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(io).context("cannot read x.toml: No such file");
        assert_eq!(super::report(&e), "cannot read x.toml: No such file");
        let e = anyhow::anyhow!("disk full").context("cannot write y");
        assert_eq!(super::report(&e), "cannot write y: disk full");
    }
}
