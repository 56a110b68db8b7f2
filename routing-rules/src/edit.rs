//! Small, validated edits of a rules document's text — the operations
//! behind `cellctl split`, `cell`, `failover`, `failback`, `override` and
//! `rules bump`.
//! Edits go through `toml_edit`, so comments and layout are kept, and the
//! result is validated before it is returned.

use thiserror::Error;
use toml_edit::{value, Array, DocumentMut, InlineTable, Item};

use crate::error::RulesError;
use crate::model::{CellState, Colour};
use crate::validate::parse_rules;

/// Why an edit cannot be made. Nothing is changed.
#[derive(Debug, Error)]
pub enum EditError {
    /// The current document does not parse as TOML.
    #[error("the current rules do not parse: {0}")]
    Parse(String),
    /// The cell is not defined.
    #[error("cell {0:?} is not defined in the rules")]
    UnknownCell(String),
    /// A bad argument.
    #[error("{0}")]
    BadArgument(String),
    /// The edited document would be invalid.
    #[error("the edited rules would be invalid: {0}")]
    Invalid(RulesError),
}

fn doc(text: &str) -> Result<DocumentMut, EditError> {
    text.parse::<DocumentMut>()
        .map_err(|e| EditError::Parse(e.to_string()))
}

fn finish(doc: DocumentMut) -> Result<String, EditError> {
    let text = doc.to_string();
    parse_rules(&text).map_err(EditError::Invalid)?;
    Ok(text)
}

fn cell_table<'a>(
    doc: &'a mut DocumentMut,
    cell: &str,
) -> Result<&'a mut dyn toml_edit::TableLike, EditError> {
    doc.get_mut("cells")
        .and_then(|c| c.get_mut(cell))
        .and_then(Item::as_table_like_mut)
        .ok_or_else(|| EditError::UnknownCell(cell.to_string()))
}

/// Raises the document's `revision` key by one (adds `revision = 1` among
/// the top-level keys when it has none); returns the new text and revision.
pub fn bump_revision(text: &str) -> Result<(String, u64), EditError> {
    let mut d = doc(text)?;
    let current =
        match d.get("revision") {
            None => 0,
            Some(item) => item.as_integer().filter(|r| *r >= 1).ok_or_else(|| {
                EditError::BadArgument("`revision` is not a positive integer".into())
            })? as u64,
        };
    let next = current + 1;
    if next > crate::revision::MAX_REVISION {
        return Err(EditError::BadArgument(format!(
            "revision {current} cannot be raised further"
        )));
    }
    // A new key joins the document's top-level keys, after any leading comment.
    d["revision"] = value(next as i64);
    Ok((finish(d)?, next))
}

/// Merges a TOML fragment into the document — what an operator does by
/// editing the file before `cellctl rules apply`: tables (and inline
/// tables) are merged key by key, anything else the fragment sets replaces
/// the document's value (an array of tables such as `[[ranges]]` is
/// replaced whole). `revision` may not be set (it is raised when the edit
/// is applied). The result is validated.
pub fn merge(text: &str, fragment: &str) -> Result<String, EditError> {
    let mut d = doc(text)?;
    let f = fragment
        .parse::<DocumentMut>()
        .map_err(|e| EditError::BadArgument(format!("the fragment is not TOML: {e}")))?;
    if f.contains_key("revision") {
        return Err(EditError::BadArgument(
            "the fragment sets `revision`: it is raised when the edit is applied".into(),
        ));
    }
    if f.is_empty() {
        return Err(EditError::BadArgument("the fragment sets nothing".into()));
    }
    merge_table(d.as_table_mut(), f.as_table());
    finish(d)
}

fn merge_table(into: &mut dyn toml_edit::TableLike, from: &dyn toml_edit::TableLike) {
    for (key, item) in from.iter() {
        let nested = item.as_table_like();
        match (into.get_mut(key).and_then(Item::as_table_like_mut), nested) {
            (Some(t), Some(f)) => merge_table(t, f),
            _ => {
                // The fragment's own spacing is not kept: the value is
                // written as the document writes a new one.
                let mut item = item.clone();
                if let Some(v) = item.as_value_mut() {
                    v.decor_mut().clear();
                }
                into.insert(key, item);
            }
        }
    }
}

/// Parses a percentage such as `5`, `0.5`, `12.34` or `10%` into basis
/// points (see [`crate::model::parse_percent`]).
pub fn percent_to_bp(s: &str) -> Result<u32, EditError> {
    crate::model::parse_percent(s).ok_or_else(|| {
        EditError::BadArgument(format!(
            "--green {s:?}: give a percentage from 0 to 100 with at most two decimals, e.g. 10% or 0.5%"
        ))
    })
}

/// Sets a cell's green share (basis points; written as a percentage,
/// `green = "10%"`), keeping its seed.
pub fn set_split(text: &str, cell: &str, green_bp: u32) -> Result<String, EditError> {
    let mut d = doc(text)?;
    let t = cell_table(&mut d, cell)?;
    let share = crate::model::format_percent(green_bp);
    match t.get_mut("split") {
        Some(Item::Value(toml_edit::Value::InlineTable(it))) => {
            it.insert("green", share.as_str().into());
        }
        Some(Item::Table(tb)) => {
            tb.insert("green", value(share.as_str()));
        }
        _ => {
            let mut it = InlineTable::new();
            it.insert("green", share.as_str().into());
            t.insert("split", Item::Value(toml_edit::Value::InlineTable(it)));
        }
    }
    finish(d)
}

/// Sets a cell's state.
pub fn set_state(text: &str, cell: &str, state: CellState) -> Result<String, EditError> {
    let mut d = doc(text)?;
    cell_table(&mut d, cell)?.insert("state", value(state.as_str()));
    finish(d)
}

/// Fails `cell` over to `to`: state `failed-over`, with `to` first in its
/// failover list.
pub fn failover(text: &str, cell: &str, to: &str) -> Result<String, EditError> {
    if cell == to {
        return Err(EditError::BadArgument(format!(
            "cannot fail {cell} over to itself"
        )));
    }
    let mut d = doc(text)?;
    if d.get("cells").and_then(|c| c.get(to)).is_none() {
        return Err(EditError::UnknownCell(to.to_string()));
    }
    let t = cell_table(&mut d, cell)?;
    let mut list: Vec<String> = t
        .get("failover")
        .and_then(Item::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    list.retain(|c| c != to);
    list.insert(0, to.to_string());
    let mut arr = Array::new();
    for c in list {
        arr.push(c);
    }
    t.insert("failover", value(arr));
    t.insert("state", value(CellState::FailedOver.as_str()));
    finish(d)
}

/// Returns a failed-over or draining cell to `active`.
pub fn failback(text: &str, cell: &str) -> Result<String, EditError> {
    set_state(text, cell, CellState::Active)
}

/// The slot ranges of `cell`'s shard with their epochs, in document
/// order (`(from, to, epoch)`).
pub fn shard_ranges(text: &str, cell: &str) -> Result<Vec<(u32, u32, u64)>, EditError> {
    let rules = parse_rules(text).map_err(EditError::Invalid)?;
    if !rules.cells.contains_key(cell) {
        return Err(EditError::UnknownCell(cell.to_string()));
    }
    Ok(rules
        .table
        .iter()
        .filter(|r| r.cell == cell)
        .map(|r| (r.from, r.to, r.epoch))
        .collect())
}

/// Moves `cell`'s shard to `host` (its home when `host == cell`): sets
/// (or removes) `hosted_by` and raises the epoch of every range of the
/// cell by one, so a request routed before the move is refused by the
/// store of either copy.
pub fn move_shard(text: &str, cell: &str, host: &str) -> Result<String, EditError> {
    let mut d = doc(text)?;
    if d.get("cells").and_then(|c| c.get(host)).is_none() {
        return Err(EditError::UnknownCell(host.to_string()));
    }
    let t = cell_table(&mut d, cell)?;
    if host == cell {
        t.remove("hosted_by");
    } else {
        t.insert("hosted_by", value(host));
    }
    let ranges = d
        .get_mut("ranges")
        .and_then(Item::as_array_of_tables_mut)
        .ok_or_else(|| EditError::BadArgument("the rules have no [[ranges]]".into()))?;
    for r in ranges.iter_mut() {
        if r.get("cell").and_then(Item::as_str) != Some(cell) {
            continue;
        }
        let epoch = match r.get("epoch") {
            None => crate::model::FIRST_EPOCH,
            Some(e) => e.as_integer().filter(|e| *e >= 1).ok_or_else(|| {
                EditError::BadArgument("a range's `epoch` is not a positive integer".into())
            })? as u64,
        };
        r.insert("epoch", value((epoch + 1) as i64));
    }
    finish(d)
}

/// Pins a user to a cell and/or colour.
pub fn set_override(
    text: &str,
    user: &str,
    cell: Option<&str>,
    colour: Option<Colour>,
) -> Result<String, EditError> {
    if cell.is_none() && colour.is_none() {
        return Err(EditError::BadArgument(
            "give --cell, --colour, or both".into(),
        ));
    }
    let mut d = doc(text)?;
    if let Some(c) = cell {
        if d.get("cells").and_then(|cs| cs.get(c)).is_none() {
            return Err(EditError::UnknownCell(c.to_string()));
        }
    }
    let mut it = InlineTable::new();
    if let Some(c) = cell {
        it.insert("cell", c.into());
    }
    if let Some(c) = colour {
        it.insert("colour", c.as_str().into());
    }
    if d.get("overrides").is_none() {
        d.insert("overrides", Item::Table(toml_edit::Table::new()));
    }
    let o = d
        .get_mut("overrides")
        .and_then(Item::as_table_like_mut)
        .ok_or_else(|| EditError::BadArgument("overrides is not a table".into()))?;
    o.insert(user, Item::Value(toml_edit::Value::InlineTable(it)));
    finish(d)
}

/// Removes a user's override.
pub fn remove_override(text: &str, user: &str) -> Result<String, EditError> {
    let mut d = doc(text)?;
    let removed = d
        .get_mut("overrides")
        .and_then(Item::as_table_like_mut)
        .and_then(|o| o.remove(user));
    if removed.is_none() {
        return Err(EditError::BadArgument(format!(
            "user {user:?} has no override"
        )));
    }
    finish(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = include_str!("../../examples/cells.toml");

    #[test]
    fn percentages() {
        assert_eq!(percent_to_bp("5").unwrap(), 500);
        assert_eq!(percent_to_bp("0.5").unwrap(), 50);
        assert_eq!(percent_to_bp("12.34").unwrap(), 1234);
        assert_eq!(percent_to_bp("100").unwrap(), 10_000);
        assert_eq!(percent_to_bp("10%").unwrap(), 1000);
        assert_eq!(percent_to_bp("0.5%").unwrap(), 50);
        for bad in [
            "101", "-1", "1.234", "", "x", "1e2", ".5", "%", "10%%", "1000",
        ] {
            assert!(percent_to_bp(bad).is_err(), "{bad}");
        }
        for bp in [0, 1, 10, 50, 99, 100, 1000, 1234, 2500, 9999, 10_000] {
            let text = crate::model::format_percent(bp);
            assert_eq!(crate::model::parse_percent(&text), Some(bp), "{text}");
        }
        assert_eq!(crate::model::format_percent(50), "0.5%");
        assert_eq!(crate::model::format_percent(1234), "12.34%");
        assert_eq!(crate::model::format_percent(1), "0.01%");
    }

    #[test]
    fn a_split_is_written_as_a_percentage_and_the_old_form_still_read() {
        let t = set_split(DOC, "cell-a", 50).unwrap();
        assert!(
            t.contains(r#"split = { green = "0.5%", seed = 11 }"#),
            "{t}"
        );
        assert_eq!(parse_rules(&t).unwrap().cells["cell-a"].split.green, 50);
        let old = DOC.replace(r#"green = "10%""#, "green = 1000");
        assert_eq!(parse_rules(&old).unwrap().cells["cell-a"].split.green, 1000);
        let t = set_split(&old, "cell-a", 2500).unwrap();
        assert!(t.contains(r#"green = "25%""#), "{t}");
    }

    #[test]
    fn a_fragment_is_merged_key_by_key_and_checked() {
        // Nested tables and inline tables merge; other values are replaced;
        // comments stay.
        let t = merge(
            DOC,
            "[cells.cell-b]\nsplit = { green = \"25%\" }\n[overrides]\n\"vip-7\" = { colour = \"green\" }\n",
        )
        .unwrap();
        let r = parse_rules(&t).unwrap();
        assert!(t.contains(r#"split = { green = "25%", seed = 22 }"#), "{t}");
        assert_eq!(r.cells["cell-b"].split.green, 2500);
        assert_eq!(r.cells["cell-b"].split.seed, 22, "the seed was kept");
        assert_eq!(r.cells["cell-b"].blue.len(), 1);
        assert!(r.overrides.contains_key("vip-42") && r.overrides.contains_key("vip-7"));
        assert!(t.contains("# Per-user pins"), "{t}");
        // An array of tables is replaced whole.
        let t = merge(
            DOC,
            "[[ranges]]\nfrom = 0\nto = 49\ncell = \"cell-a\"\n[[ranges]]\nfrom = 50\nto = 99\ncell = \"cell-c\"\n",
        )
        .unwrap();
        assert_eq!(parse_rules(&t).unwrap().table.len(), 2);
        // Bad fragments change nothing and say why.
        for (fragment, want) in [
            ("revision = 9", "sets `revision`"),
            ("[cells.cell-b\n", "not TOML"),
            ("", "sets nothing"),
            (
                "[cells.cell-b]\nsplit = { green = \"200%\" }",
                "would be invalid",
            ),
            ("slots = 7", "would be invalid"),
        ] {
            let e = merge(DOC, fragment).unwrap_err().to_string();
            assert!(e.contains(want), "{fragment:?}: {e}");
        }
    }

    #[test]
    fn edits_keep_comments_and_validate() {
        let t = set_split(DOC, "cell-c", 2500).unwrap();
        assert!(t.contains("# Slot table: every slot exactly once."));
        let r = parse_rules(&t).unwrap();
        assert_eq!(r.cells["cell-c"].split.green, 2500);
        assert_eq!(r.cells["cell-c"].split.seed, 33);
        let t = failover(&t, "cell-c", "cell-b").unwrap();
        let r = parse_rules(&t).unwrap();
        assert_eq!(r.cells["cell-c"].state, CellState::FailedOver);
        assert_eq!(r.cells["cell-c"].failover, ["cell-b", "cell-a"]);
        let r = parse_rules(&failback(&t, "cell-c").unwrap()).unwrap();
        assert_eq!(r.cells["cell-c"].state, CellState::Active);
        let t = set_override(DOC, "u-1", Some("cell-a"), Some(Colour::Green)).unwrap();
        assert_eq!(
            parse_rules(&t).unwrap().overrides["u-1"].cell.as_deref(),
            Some("cell-a")
        );
        let t = remove_override(&t, "u-1").unwrap();
        assert!(!parse_rules(&t).unwrap().overrides.contains_key("u-1"));
    }

    #[test]
    fn bad_edits_are_refused() {
        assert!(matches!(
            set_split(DOC, "cell-z", 1),
            Err(EditError::UnknownCell(_))
        ));
        assert!(matches!(
            failover(DOC, "cell-a", "cell-a"),
            Err(EditError::BadArgument(_))
        ));
        assert!(matches!(
            failover(DOC, "cell-a", "cell-z"),
            Err(EditError::UnknownCell(_))
        ));
        assert!(matches!(
            set_override(DOC, "u", None, None),
            Err(EditError::BadArgument(_))
        ));
        assert!(matches!(
            remove_override(DOC, "nobody"),
            Err(EditError::BadArgument(_))
        ));
        // cell-c has no... every colour with traffic needs instances: green share on a cell without green.
        let no_green = DOC.replace("green = [\"127.0.0.1:18302\"]\n", "");
        assert!(matches!(
            set_split(&no_green, "cell-c", 100),
            Err(EditError::Invalid(_))
        ));
    }

    #[test]
    fn moving_a_shard_raises_its_epochs_and_back() {
        let text = "slots = 4\n[cells.a]\nblue = [\"127.0.0.1:1\"]\n[cells.b]\nblue = [\"127.0.0.1:2\"]\n# keep me\n[[ranges]]\nfrom = 0\nto = 1\ncell = \"a\"\n[[ranges]]\nfrom = 2\nto = 3\ncell = \"b\"\nepoch = 4\n";
        let moved = move_shard(text, "a", "b").unwrap();
        assert!(moved.contains("# keep me"));
        let r = parse_rules(&moved).unwrap();
        assert_eq!(r.host_of("a"), "b");
        assert_eq!(shard_ranges(&moved, "a").unwrap(), vec![(0, 1, 2)]);
        assert_eq!(shard_ranges(&moved, "b").unwrap(), vec![(2, 3, 4)]);
        let home = move_shard(&moved, "a", "a").unwrap();
        assert_eq!(parse_rules(&home).unwrap().host_of("a"), "a");
        assert_eq!(shard_ranges(&home, "a").unwrap(), vec![(0, 1, 3)]);
        assert!(matches!(
            move_shard(text, "a", "z"),
            Err(EditError::UnknownCell(_))
        ));
        assert!(matches!(
            shard_ranges(text, "z"),
            Err(EditError::UnknownCell(_))
        ));
    }
}
