//! `cellctl`'s offline commands: they read and write rules documents
//! (files), never the control plane.

use std::path::Path;

use anyhow::{Context, Result};
use routing_rules::edit::bump_revision;
use routing_rules::rebalance::render_table_into;
use routing_rules::{
    diff, parse_rules, parse_versioned, rebalance, Colour, RebalancePlan, RouteAttrs, RoutingTable,
    StaticHealth,
};

use crate::{load, read, Output, OutputArg, Reported, RouteArgs};

/// `cellctl rules validate FILE`.
pub(crate) fn validate(file: &Path, out: OutputArg) -> Result<()> {
    let (text, rules) = load(file, out.output)?;
    let revision = parse_versioned(&text)
        .ok()
        .and_then(|(_, r)| r)
        .unwrap_or(0);
    let per_cell = rules.slots_per_cell();
    match out.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "valid": true,
                "file": file.display().to_string(),
                "revision": revision,
                "slots": rules.slots,
                "cells": rules.cells.len(),
                "overrides": rules.overrides.len(),
                "slots_per_cell": per_cell,
            })
        ),
        Output::Text => {
            println!(
                "{}: valid (revision {}, {} cells, {} slots, {} overrides)",
                file.display(),
                if revision == 0 {
                    "none".to_string()
                } else {
                    revision.to_string()
                },
                rules.cells.len(),
                rules.slots,
                rules.overrides.len()
            );
            for (cell, n) in per_cell {
                let c = &rules.cells[cell];
                println!(
                    "  {cell}: {n} slots, {}, green {}, blue {} / green {} instances",
                    c.state,
                    routing_rules::model::format_percent(c.split.green),
                    c.blue.len(),
                    c.green.len()
                );
            }
        }
    }
    Ok(())
}

/// `cellctl rules diff OLD NEW`.
pub(crate) fn diff_files(old: &Path, new: &Path, out: OutputArg) -> Result<()> {
    let (_, a) = load(old, out.output)?;
    let (_, b) = load(new, out.output)?;
    let d = diff(&a, &b);
    match out.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&d)?),
        Output::Text => print!("{}", d.summary()),
    }
    Ok(())
}

/// `cellctl rules rebalance`.
pub(crate) fn rebalance_file(
    file: &Path,
    add: Vec<(String, Option<u32>)>,
    remove: Vec<String>,
    out: &Path,
    output: OutputArg,
    verbose: bool,
) -> Result<()> {
    let (text, rules) = load(file, output.output)?;
    let plan = RebalancePlan { add, remove };
    let new_rules = rebalance(&rules, &plan)?;
    let new_text = render_table_into(&text, &new_rules)?;
    // Never write a document that would not load back identically.
    let reparsed = parse_rules(&new_text)
        .context("internal error: the rebalanced document does not validate")?;
    anyhow::ensure!(
        reparsed == new_rules,
        "internal error: the rebalanced document does not read back as computed"
    );
    // A new document replaces FILE: its revision moves forward.
    let (new_text, _) = bump_revision(&new_text)
        .context("internal error: cannot raise the revision of the rebalanced document")?;
    write_atomically(out, &new_text)?;
    let d = diff(&rules, &new_rules);
    match output.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&d)?),
        Output::Text => {
            println!("wrote {}", out.display());
            print!("{}", d.summary_limited((!verbose).then_some(5)));
        }
    }
    Ok(())
}

/// `cellctl rules bump FILE`: raises the document's `revision` (adds
/// `revision = 1` when it has none), comments kept, written atomically.
pub(crate) fn bump(file: &Path, out: OutputArg) -> Result<()> {
    let text = read(file)?;
    load(file, out.output)?;
    let (new_text, revision) =
        bump_revision(&text).with_context(|| format!("cannot bump {}", file.display()))?;
    write_atomically(file, &new_text)?;
    match out.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"file": file.display().to_string(), "revision": revision})
        ),
        Output::Text => println!("{}: revision {revision}", file.display()),
    }
    Ok(())
}

/// Writes `text` to `path` through a temporary file and a rename.
pub(crate) fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `cellctl route`.
pub(crate) fn route(args: RouteArgs, live: Option<(String, u64)>) -> Result<()> {
    let (rules, revision) = match (&args.rules, live) {
        (Some(path), _) => (load(path, args.out.output)?.1, 0),
        (None, Some((text, rev))) => (
            parse_rules(&text).context("the live rules do not validate")?,
            rev,
        ),
        (None, None) => anyhow::bail!("give --rules FILE, or --etcd for the live rules"),
    };
    let table = RoutingTable::compile(rules, revision)?;
    let mut health = StaticHealth::from_table(&table);
    for d in &args.down {
        let (cell, colour) = match d.split_once(':') {
            Some((c, col)) => (
                c,
                Some(Colour::parse(col).with_context(|| {
                    format!("--down {d}: colour \"{col}\" is not blue or green")
                })?),
            ),
            None => (d.as_str(), None),
        };
        let idx = table
            .cell_index(cell)
            .with_context(|| format!("--down {d}: unknown cell \"{cell}\""))?;
        health.set(idx, colour, false);
    }
    let attrs = RouteAttrs {
        tester_colour: args.tester_colour.as_deref().map(str::as_bytes),
    };
    let mut json = Vec::new();
    let mut rejected = 0;
    for key in &args.keys {
        match table.route(Some(key.as_bytes()), &attrs, &health) {
            Ok(d) => {
                let e = table.explain(key, &d);
                match args.out.output {
                    Output::Json => json.push(serde_json::to_value(&e)?),
                    Output::Text => {
                        let slot = e.slot.map_or("-".to_string(), |s| s.to_string());
                        println!(
                            "{key}\tslot {slot}/{}\thome {}\tserving {}\t{}\t(cell: {}, colour: {}{})",
                            e.slots,
                            e.home_cell,
                            e.serving_cell,
                            e.colour,
                            e.reason.as_str(),
                            e.colour_reason.as_str(),
                            e.bucket
                                .map(|b| format!(", bucket {b} vs green share {}", e.green_share))
                                .unwrap_or_default()
                        );
                    }
                }
            }
            Err(problem) => {
                rejected += 1;
                let message = format!(
                    "key is {} and the rules reject such keys (HTTP 400)",
                    problem.as_str()
                );
                match args.out.output {
                    Output::Json => json.push(serde_json::json!({
                        "key": key, "error": problem.as_str(), "message": message,
                    })),
                    Output::Text => println!("{key}\trejected: {message}"),
                }
            }
        }
    }
    if args.out.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    if rejected > 0 {
        return Err(Reported.into());
    }
    Ok(())
}

/// Prints shard replication records (`where_` names their source); exit 1
/// unless every recorded shard is in sync.
pub(crate) fn replication_status(
    records: &std::collections::BTreeMap<String, serde_json::Value>,
    output: Output,
    where_: &str,
) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(records)?),
        Output::Text => {
            if records.is_empty() {
                println!("no shard replication is recorded in {where_}");
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            for (cell, r) in records {
                println!(
                    "{cell} → standby {}: {} for {} s; acknowledged LSN {}; recorded {} s ago",
                    r["standby"].as_str().unwrap_or("(none)"),
                    r["state"].as_str().unwrap_or("?"),
                    (now - r["since_ms"].as_i64().unwrap_or(now)) / 1000,
                    r["acked_lsn"],
                    (now - r["updated_ms"].as_i64().unwrap_or(now)) / 1000,
                );
            }
        }
    }
    if !records.is_empty() && records.values().all(|r| r["state"] == "in-sync") {
        Ok(())
    } else {
        Err(crate::Reported.into())
    }
}

/// `cellctl replication status --rules FILE`: the records the agents keep
/// next to the rules file (`FILE.replication/CELL.json`).
pub(crate) fn replication_file(rules: &Path, output: Output) -> Result<()> {
    let dir = routing_rules::files::records_dir(rules);
    let mut records = std::collections::BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(cell) = name.strip_suffix(".json") else {
                continue;
            };
            let text = std::fs::read_to_string(e.path())
                .with_context(|| format!("cannot read {}", e.path().display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a replication record", e.path().display()))?;
            records.insert(cell.to_string(), v);
        }
    }
    replication_status(&records, output, &dir.display().to_string())
}
