//! Parsing and validation: TOML text → file structs (serde, unknown keys
//! rejected) → checked [`Rules`]. Every problem found is reported, not just
//! the first, and nothing is accepted unless all checks pass.

use std::collections::{BTreeMap, HashMap};

use crate::error::{RulesError, ValidationError};
use crate::model::*;
mod file;
mod hosting;
mod overrides;
#[cfg(test)]
mod tests;

use file::*;

/// Largest rules document the processes read by default, bytes (64 MiB:
/// room for well over a million overrides).
pub const DEFAULT_MAX_DOCUMENT_BYTES: u64 = 64 * 1024 * 1024;

/// 1-based (line, column) of a byte offset in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Parses and validates a rules document.
///
/// ```
/// let rules = routing_rules::parse_rules(r#"
/// slots = 10
/// [cells.a]
/// blue = ["127.0.0.1:9001"]
/// [[ranges]]
/// from = 0
/// to = 9
/// cell = "a"
/// "#).unwrap();
/// assert_eq!(rules.slots, 10);
/// ```
pub fn parse_rules(text: &str) -> Result<Rules, RulesError> {
    parse_versioned(text).map(|(rules, _)| rules)
}

/// Parses and validates a rules document, also returning its `revision`
/// key (`None` when absent). See [`crate::revision`].
pub fn parse_versioned(text: &str) -> Result<(Rules, Option<u64>), RulesError> {
    // A large [overrides] table in its usual line form is read without the
    // TOML parser's per-value tree (see `overrides.rs`).
    let split = overrides::split(text)?;
    let source = split.as_ref().map_or(text, |s| s.rest.as_str());
    let mut doc: FileDoc = toml::from_str(source).map_err(|e| {
        let (line, column) = e
            .span()
            .map(|s| line_col(source, s.start))
            .unwrap_or((1, 1));
        RulesError::Parse {
            line,
            column,
            message: e.message().trim().to_string(),
        }
    })?;
    if let Some(s) = split {
        doc.overrides = s.overrides;
    }
    check(doc)
}

/// [`parse_versioned`] through the TOML parser alone (tests compare the
/// lean overrides reader with it).
#[cfg(test)]
fn parse_toml_only(text: &str) -> Result<(Rules, Option<u64>), RulesError> {
    let doc: FileDoc = toml::from_str(text).map_err(|e| RulesError::Parse {
        line: 0,
        column: 0,
        message: e.message().trim().to_string(),
    })?;
    check(doc)
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// Whether `name` is a valid cell name (1..=64 of A-Z a-z 0-9 - _ .).
pub fn valid_cell_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CELL_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Checks an instance address of the form `host:port` (`[v6]:port` for IPv6).
pub fn check_address(addr: &str) -> Result<(), String> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("\"{addr}\" is not host:port"));
    };
    match port.parse::<u16>() {
        Ok(p) if p != 0 => {}
        _ => {
            return Err(format!(
                "\"{addr}\" has an invalid port \"{port}\" (1..=65535)"
            ))
        }
    }
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
    };
    if !host_ok {
        return Err(format!("\"{addr}\" has an invalid host \"{host}\""));
    }
    Ok(())
}

/// Checks each address of `cells.NAME.WHAT` and that no address is used
/// twice in the document.
fn claim_addresses<'a>(
    c: &mut Checker,
    seen: &mut HashMap<&'a str, String>,
    name: &str,
    what: &str,
    list: &'a [String],
) {
    for (i, addr) in list.iter().enumerate() {
        if let Err(m) = check_address(addr) {
            c.bad(format!("cells.{name}.{what}[{i}]"), m);
        }
        let here = format!("{name}/{what}");
        if let Some(first) = seen.get(addr.as_str()) {
            c.errors.push(ValidationError::DuplicateInstance {
                address: addr.clone(),
                first: first.clone(),
                second: here,
            });
        } else {
            seen.insert(addr, here);
        }
    }
}

struct Checker {
    errors: Vec<ValidationError>,
    known: String,
}

impl Checker {
    fn bad(&mut self, at: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ValidationError::BadValue {
            at: at.into(),
            message: message.into(),
        });
    }

    fn cell_ref(&mut self, cells: &BTreeMap<String, FileCell>, at: String, cell: &str) {
        if !cells.contains_key(cell) {
            self.errors.push(ValidationError::UnknownCell {
                at,
                cell: cell.to_string(),
                known: self.known.clone(),
            });
        }
    }
}

fn check(mut doc: FileDoc) -> Result<(Rules, Option<u64>), RulesError> {
    let file_overrides = std::mem::take(&mut doc.overrides);
    let mut c = Checker {
        errors: Vec::new(),
        known: doc.cells.keys().cloned().collect::<Vec<_>>().join(", "),
    };
    let revision = match doc.revision {
        None => None,
        Some(r) if (1..=crate::revision::MAX_REVISION as i64).contains(&r) => Some(r as u64),
        Some(r) => {
            c.bad(
                "revision",
                format!(
                    "{r} is out of range (1..={})",
                    crate::revision::MAX_REVISION
                ),
            );
            None
        }
    };

    // Slots and hash.
    let slots_raw = doc.slots.unwrap_or(DEFAULT_SLOTS as i64);
    let slots = if (1..=MAX_SLOTS as i64).contains(&slots_raw) {
        slots_raw as u32
    } else {
        c.errors.push(ValidationError::SlotCount(slots_raw as u64));
        1
    };
    let hash = match (doc.hash.unwrap_or(FileHash::Xxh64), &doc.digits) {
        (FileHash::Xxh64, None) => HashAlgorithm::Xxh64,
        (FileHash::Xxh64, Some(_)) => {
            c.bad("digits", "[digits] is only used with hash = \"digits\"");
            HashAlgorithm::Xxh64
        }
        (FileHash::Digits, None) => {
            c.bad(
                "digits",
                "hash = \"digits\" needs a [digits] table with count (and optionally skip)",
            );
            HashAlgorithm::Xxh64
        }
        (FileHash::Digits, Some(d)) => {
            let mut ok = true;
            if !(1..=9).contains(&d.count) {
                c.bad(
                    "digits.count",
                    format!("{} is out of range (1..=9)", d.count),
                );
                ok = false;
            }
            if !(0..=32).contains(&d.skip) {
                c.bad(
                    "digits.skip",
                    format!("{} is out of range (0..=32)", d.skip),
                );
                ok = false;
            }
            if ok && 10u64.pow(d.count as u32) < slots as u64 {
                c.bad(
                    "digits.count",
                    format!(
                        "{} digit(s) give only {} values, fewer than slots = {slots}",
                        d.count,
                        10u64.pow(d.count as u32)
                    ),
                );
            }
            HashAlgorithm::Digits {
                count: d.count.clamp(1, 9) as u8,
                skip: d.skip.clamp(0, 32) as u8,
            }
        }
    };

    // Key source and policy.
    let source = doc.key.source.unwrap_or(FileKeySource::Header);
    let key = match source {
        FileKeySource::Header => {
            let name = doc
                .key
                .name
                .clone()
                .unwrap_or_else(|| DEFAULT_KEY_HEADER.to_string());
            if name.is_empty() || !name.chars().all(is_token_char) {
                c.bad("key.name", format!("\"{name}\" is not a valid header name"));
            }
            KeySource::Header {
                name: name.to_ascii_lowercase(),
            }
        }
        FileKeySource::Cookie | FileKeySource::Query => {
            let name = match &doc.key.name {
                Some(n) => n.clone(),
                None => {
                    c.bad("key.name", "a cookie or query key source needs a name");
                    String::new()
                }
            };
            if doc.key.name.is_some()
                && (name.is_empty()
                    || name
                        .chars()
                        .any(|ch| ch.is_whitespace() || ch.is_control() || "=;&,".contains(ch)))
            {
                c.bad(
                    "key.name",
                    format!("\"{name}\" is not a valid cookie or parameter name"),
                );
            }
            if source == FileKeySource::Cookie {
                KeySource::Cookie { name }
            } else {
                KeySource::Query { name }
            }
        }
        FileKeySource::Path => match doc.key.segment {
            Some(s) if (0..=64).contains(&s) => KeySource::Path {
                segment: s as usize,
            },
            Some(s) => {
                c.bad("key.segment", format!("{s} is out of range (0..=64)"));
                KeySource::Path { segment: 0 }
            }
            None => {
                c.bad("key.segment", "a path key source needs a segment index");
                KeySource::Path { segment: 0 }
            }
        },
    };
    if source != FileKeySource::Path && doc.key.segment.is_some() {
        c.bad("key.segment", "only used with source = \"path\"");
    }
    if source == FileKeySource::Path && doc.key.name.is_some() {
        c.bad("key.name", "not used with source = \"path\" (use segment)");
    }
    let on_missing = match (
        doc.key.on_missing.unwrap_or(FileOnMissing::Reject),
        &doc.key.default_cell,
    ) {
        (FileOnMissing::Reject, None) => MissingKeyPolicy::Reject,
        (FileOnMissing::Reject, Some(_)) => {
            c.bad(
                "key.default_cell",
                "only used with on_missing = \"default-cell\"",
            );
            MissingKeyPolicy::Reject
        }
        (FileOnMissing::DefaultCell, None) => {
            c.bad(
                "key.default_cell",
                "on_missing = \"default-cell\" needs default_cell",
            );
            MissingKeyPolicy::Reject
        }
        (FileOnMissing::DefaultCell, Some(cell)) => {
            c.cell_ref(&doc.cells, "key.default_cell".into(), cell);
            MissingKeyPolicy::DefaultCell(cell.clone())
        }
    };

    // Tester header.
    let tester_header = doc
        .tester
        .header
        .clone()
        .unwrap_or_else(|| DEFAULT_TESTER_HEADER.to_string());
    if tester_header.is_empty() || !tester_header.chars().all(is_token_char) {
        c.bad(
            "tester.header",
            format!("\"{tester_header}\" is not a valid header name"),
        );
    }
    if STAMP_HEADERS.contains(&tester_header.to_ascii_lowercase().as_str()) {
        c.bad(
            "tester.header",
            format!("\"{tester_header}\" is a header the gateway stamps itself"),
        );
    }
    if let KeySource::Header { name } = &key {
        if STAMP_HEADERS.contains(&name.as_str()) {
            c.bad(
                "key.name",
                format!("\"{name}\" is a header the gateway stamps itself"),
            );
        }
    }
    let tester = Tester {
        header: tester_header.to_ascii_lowercase(),
        enabled: doc.tester.enabled,
    };

    // Cells.
    if doc.cells.is_empty() {
        c.errors.push(ValidationError::NoCells);
    }
    let mut seen_addr: HashMap<&str, String> = HashMap::new();
    let mut cells = BTreeMap::new();
    for (name, fc) in &doc.cells {
        if !valid_cell_name(name) {
            c.bad(
                format!("cells.{name}"),
                format!("cell name \"{name}\" must be 1..=64 characters of A-Z a-z 0-9 - _ ."),
            );
        }
        for (i, target) in fc.failover.iter().enumerate() {
            if target == name {
                c.errors
                    .push(ValidationError::FailoverToSelf { cell: name.clone() });
            } else {
                c.cell_ref(&doc.cells, format!("cells.{name}.failover[{i}]"), target);
            }
            if fc.failover[..i].contains(target) {
                c.errors.push(ValidationError::DuplicateFailover {
                    cell: name.clone(),
                    target: target.clone(),
                });
            }
        }
        if let Some(standby) = &fc.standby {
            if standby == name {
                c.bad(
                    format!("cells.{name}.standby"),
                    "a cell cannot be its own standby",
                );
            } else {
                c.cell_ref(&doc.cells, format!("cells.{name}.standby"), standby);
            }
        }
        hosting::check(&mut c, &doc.cells, name, fc);
        if fc.state == CellState::FailedOver && fc.failover.is_empty() {
            c.bad(
                format!("cells.{name}.state"),
                "a failed-over cell needs a failover list to serve its users",
            );
        }
        let weight = fc.weight.unwrap_or(1);
        if !(1..=1000).contains(&weight) {
            c.bad(
                format!("cells.{name}.weight"),
                format!("{weight} is out of range (1..=1000)"),
            );
        }
        let green = match &fc.split.green {
            file::FileShare::BasisPoints(bp) => {
                if !(0..=BASIS_POINTS as i64).contains(bp) {
                    c.errors.push(ValidationError::SplitOutOfRange {
                        cell: name.clone(),
                        value: *bp,
                    });
                }
                *bp
            }
            file::FileShare::Text(t) => match crate::model::parse_percent(t) {
                Some(bp) if t.trim_end().ends_with('%') => bp as i64,
                _ => {
                    c.bad(
                        format!("cells.{name}.split.green"),
                        format!("{t:?} is not a share such as \"10%\" or \"0.5%\" (0% to 100%, at most two decimals, with the % sign)"),
                    );
                    0
                }
            },
        };
        let green = green.clamp(0, BASIS_POINTS as i64) as u32;
        for (colour, list, share) in [
            (Colour::Blue, &fc.blue, BASIS_POINTS - green),
            (Colour::Green, &fc.green, green),
        ] {
            if share > 0 && list.is_empty() && !fc.registered {
                c.errors.push(ValidationError::WeightWithoutInstances {
                    cell: name.clone(),
                    colour: colour.to_string(),
                    share,
                });
            }
            claim_addresses(&mut c, &mut seen_addr, name, colour.as_str(), list);
        }
        claim_addresses(&mut c, &mut seen_addr, name, "internal", &fc.internal);
        cells.insert(
            name.clone(),
            Cell {
                state: fc.state,
                failover_policy: fc.failover_policy,
                failover: fc.failover.clone(),
                weight: weight.clamp(1, 1000) as u32,
                blue: fc.blue.clone(),
                green: fc.green.clone(),
                split: Split {
                    green,
                    seed: fc.split.seed,
                },
                registered: fc.registered,
                internal: fc.internal.clone(),
                standby: fc.standby.clone(),
                hosted_by: fc.hosted_by.clone(),
            },
        );
    }

    // Slot table: every slot exactly once.
    let mut owner: Vec<Option<usize>> = vec![None; slots as usize];
    let mut table = Vec::new();
    let mut overlaps: Vec<(u32, u32, usize, usize)> = Vec::new();
    for (i, r) in doc.ranges.iter().enumerate() {
        c.cell_ref(&doc.cells, format!("ranges[{i}].cell"), &r.cell);
        if r.from < 0 || r.to < 0 || r.from > r.to {
            c.errors.push(ValidationError::BadRange {
                index: i,
                message: format!(
                    "from = {} to = {} is not a range (0 <= from <= to)",
                    r.from, r.to
                ),
            });
            continue;
        }
        if r.to >= slots as i64 {
            c.errors.push(ValidationError::BadRange {
                index: i,
                message: format!(
                    "to = {} is beyond the last slot ({}; slots = {slots})",
                    r.to,
                    slots - 1
                ),
            });
            continue;
        }
        if r.epoch < FIRST_EPOCH as i64 || r.epoch > MAX_EPOCH as i64 {
            c.errors.push(ValidationError::BadRange {
                index: i,
                message: format!(
                    "epoch = {} is out of range ({FIRST_EPOCH}..={MAX_EPOCH})",
                    r.epoch
                ),
            });
            continue;
        }
        for s in r.from as u32..=r.to as u32 {
            match owner[s as usize] {
                None => owner[s as usize] = Some(i),
                Some(first) => match overlaps.last_mut() {
                    Some(o) if o.2 == first && o.3 == i && o.1 + 1 == s => o.1 = s,
                    _ => overlaps.push((s, s, first, i)),
                },
            }
        }
        table.push(SlotRange {
            from: r.from as u32,
            to: r.to as u32,
            cell: r.cell.clone(),
            pinned: r.pinned,
            epoch: r.epoch as u64,
        });
    }
    for (from, to, first, second) in overlaps {
        c.errors.push(ValidationError::DoublyAssigned {
            from,
            to,
            first,
            first_cell: doc.ranges[first].cell.clone(),
            second,
            second_cell: doc.ranges[second].cell.clone(),
        });
    }
    let mut s = 0usize;
    while s < owner.len() {
        if owner[s].is_none() {
            let start = s;
            while s < owner.len() && owner[s].is_none() {
                s += 1;
            }
            c.errors.push(ValidationError::Unassigned {
                from: start as u32,
                to: (s - 1) as u32,
            });
        } else {
            s += 1;
        }
    }

    // Overrides.
    let mut overrides = BTreeMap::new();
    for (user, o) in file_overrides {
        if user.is_empty() || user.len() > MAX_KEY_LEN {
            c.bad(
                format!("overrides.\"{user}\""),
                format!("a user key must be 1..={MAX_KEY_LEN} bytes"),
            );
        }
        if o.cell.is_none() && o.colour.is_none() {
            c.bad(
                format!("overrides.\"{user}\""),
                "an override needs a cell, a colour, or both",
            );
        }
        if let Some(cell) = &o.cell {
            if !doc.cells.contains_key(cell) {
                c.cell_ref(&doc.cells, format!("overrides.\"{user}\".cell"), cell);
            }
        }
        overrides.insert(
            user,
            Override {
                cell: o.cell,
                colour: o.colour,
            },
        );
    }

    if !c.errors.is_empty() {
        return Err(RulesError::Invalid(c.errors));
    }
    table.sort_by_key(|r| r.from);
    let mut rules = Rules {
        key,
        on_missing,
        hash,
        slots,
        tester,
        cells,
        table,
        overrides,
    };
    rules.normalise_table();
    Ok((rules, revision))
}
