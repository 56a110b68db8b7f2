//! The rules document as written (serde structs, unknown keys rejected):
//! the first stage before validation.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::model::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileDoc {
    #[serde(default)]
    pub(super) key: FileKey,
    pub(super) hash: Option<FileHash>,
    pub(super) slots: Option<i64>,
    pub(super) revision: Option<i64>,
    pub(super) digits: Option<FileDigits>,
    #[serde(default)]
    pub(super) tester: FileTester,
    #[serde(default)]
    pub(super) cells: BTreeMap<String, FileCell>,
    #[serde(default)]
    pub(super) ranges: Vec<FileRange>,
    #[serde(default)]
    pub(super) overrides: BTreeMap<String, FileOverride>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum FileHash {
    Xxh64,
    Digits,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileKey {
    pub(super) source: Option<FileKeySource>,
    pub(super) name: Option<String>,
    pub(super) segment: Option<i64>,
    pub(super) on_missing: Option<FileOnMissing>,
    pub(super) default_cell: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum FileKeySource {
    Header,
    Cookie,
    Query,
    Path,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub(super) enum FileOnMissing {
    Reject,
    DefaultCell,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileDigits {
    pub(super) count: i64,
    #[serde(default)]
    pub(super) skip: i64,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTester {
    pub(super) header: Option<String>,
    #[serde(default)]
    pub(super) enabled: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileCell {
    #[serde(default)]
    pub(super) state: CellState,
    #[serde(default)]
    pub(super) failover_policy: FailoverPolicy,
    #[serde(default)]
    pub(super) failover: Vec<String>,
    pub(super) weight: Option<i64>,
    #[serde(default)]
    pub(super) blue: Vec<String>,
    #[serde(default)]
    pub(super) green: Vec<String>,
    #[serde(default)]
    pub(super) split: FileSplit,
    #[serde(default)]
    pub(super) registered: bool,
    #[serde(default)]
    pub(super) internal: Vec<String>,
    pub(super) standby: Option<String>,
    pub(super) hosted_by: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSplit {
    #[serde(default)]
    pub(super) green: FileShare,
    #[serde(default)]
    pub(super) seed: u64,
}

/// A share as the file gives it: `"10%"` (the form people write), or a
/// bare integer in basis points (the older form, still read).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum FileShare {
    BasisPoints(i64),
    Text(String),
}

impl Default for FileShare {
    fn default() -> Self {
        FileShare::BasisPoints(0)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileRange {
    pub(super) from: i64,
    pub(super) to: i64,
    pub(super) cell: String,
    #[serde(default)]
    pub(super) pinned: bool,
    #[serde(default = "first_epoch")]
    pub(super) epoch: i64,
}

fn first_epoch() -> i64 {
    crate::model::FIRST_EPOCH as i64
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileOverride {
    pub(super) cell: Option<String>,
    pub(super) colour: Option<Colour>,
}
