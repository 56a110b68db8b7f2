//! One `[[step]]` as written → the steps it stands for, each checked
//! against the topology (cells, colours, links).

use std::time::Duration;

use serde::Deserialize;

use super::{duration, Action, Link, LinkFault, Step, Target};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StepFile {
    pub(super) at: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    pub(super) action: String,
    target: Option<String>,
    link: Option<String>,
    fault: Option<String>,
    latency: Option<String>,
    cell: Option<String>,
    to: Option<String>,
    green: Option<String>,
    every: Option<String>,
    times: Option<u32>,
    merge: Option<String>,
}

fn cell(cells: &[String], what: &str, name: &str) -> Result<String, String> {
    if cells.iter().any(|c| c == name) {
        Ok(name.to_string())
    } else {
        Err(format!(
            "{what} = {name:?}: no such cell (the topology has {})",
            cells.join(", ")
        ))
    }
}

fn agent(cells: &[String], what: &str, s: &str) -> Result<(String, routing_rules::Colour), String> {
    let (c, col) = s
        .split_once('/')
        .ok_or_else(|| format!("{what} = {s:?}: write CELL/COLOUR, e.g. \"cell-a/blue\""))?;
    let colour = match col {
        "blue" => routing_rules::Colour::Blue,
        "green" => routing_rules::Colour::Green,
        _ => return Err(format!("{what} = {s:?}: the colour is blue or green")),
    };
    Ok((cell(cells, what, c)?, colour))
}

fn target(cells: &[String], gateways: usize, s: &Option<String>) -> Result<Target, String> {
    let s = s.as_deref().ok_or(
        "needs target (\"gateway\", \"gateway-N\", \"etcd\", \"CELL\" or \"CELL/COLOUR\")",
    )?;
    if s == "gateway" {
        Ok(Target::Gateway)
    } else if let Some(n) = s.strip_prefix("gateway-") {
        match n.parse::<usize>() {
            Ok(n) if (1..=gateways).contains(&n) => Ok(Target::GatewayN(n)),
            _ => Err(format!(
                "target = {s:?}: no such gateway (the topology has gateway-1 .. gateway-{gateways}; \"gateway\" is every one)"
            )),
        }
    } else if s == "etcd" {
        Ok(Target::Etcd)
    } else if s.contains('/') {
        let (c, col) = agent(cells, "target", s)?;
        Ok(Target::Agent(c, col))
    } else {
        Ok(Target::Cell(cell(cells, "target", s)?))
    }
}

fn link(cells: &[String], s: &str) -> Result<Link, String> {
    let (from, to) = s.split_once("->").ok_or_else(|| {
        format!("link = {s:?}: write \"gateway->CELL/COLOUR\", \"CELL->STANDBY\" or \"CELL->etcd\"")
    })?;
    if to == "etcd" {
        Ok(Link::ToEtcd(cell(cells, "link", from)?))
    } else if from == "gateway" {
        let (c, col) = agent(cells, "link", to)?;
        Ok(Link::GatewayToAgent(c, col))
    } else {
        let (from, to) = (cell(cells, "link", from)?, cell(cells, "link", to)?);
        if from == to {
            return Err(format!("link = {s:?}: a cell has no link to itself"));
        }
        Ok(Link::Internal { from, to })
    }
}

fn required<'a>(v: &'a Option<String>, what: &str) -> Result<&'a str, String> {
    v.as_deref().ok_or_else(|| format!("needs {what}"))
}

/// One step as written → the steps it stands for (`every`/`times` repeat
/// a `split`).
pub(super) fn step(s: &StepFile, cells: &[String], gateways: usize) -> Result<Vec<Step>, String> {
    let at = duration("at", &s.at)?;
    let for_ = match &s.for_ {
        Some(f) => Some(duration("for", f)?),
        None => None,
    };
    let unused = |names: &[(&str, bool)]| -> Result<(), String> {
        match names.iter().find(|(_, set)| *set) {
            Some((n, _)) => Err(format!("{n} does not apply to this action")),
            None => Ok(()),
        }
    };
    let action = match s.action.as_str() {
        "kill" | "freeze" | "restart" => {
            unused(&[
                ("merge", s.merge.is_some()),
                ("link", s.link.is_some()),
                ("fault", s.fault.is_some()),
                ("cell", s.cell.is_some()),
                ("to", s.to.is_some()),
                ("green", s.green.is_some()),
            ])?;
            let target = target(cells, gateways, &s.target)?;
            match s.action.as_str() {
                "kill" => Action::Kill { target },
                "freeze" => {
                    if for_.is_none() {
                        return Err("needs for (how long the processes stay frozen)".into());
                    }
                    Action::Freeze { target }
                }
                _ => {
                    if for_.is_some() {
                        return Err(
                            "for does not apply to restart (it starts again at once)".into()
                        );
                    }
                    Action::Restart { target }
                }
            }
        }
        "link" => {
            unused(&[
                ("merge", s.merge.is_some()),
                ("target", s.target.is_some()),
                ("cell", s.cell.is_some()),
                ("to", s.to.is_some()),
                ("green", s.green.is_some()),
            ])?;
            let l = link(cells, required(&s.link, "link")?)?;
            let fault = match required(&s.fault, "fault (latency, blackhole or reset)")? {
                "latency" => LinkFault::Latency(duration(
                    "latency",
                    required(&s.latency, "latency (e.g. \"200ms\")")?,
                )?),
                "blackhole" => LinkFault::Blackhole,
                "reset" => LinkFault::Reset,
                other => {
                    return Err(format!(
                        "fault = {other:?}: one of latency, blackhole, reset"
                    ))
                }
            };
            if s.latency.is_some() && !matches!(fault, LinkFault::Latency(_)) {
                return Err("latency applies only to fault = \"latency\"".into());
            }
            Action::Link { link: l, fault }
        }
        "rules-apply" => {
            unused(&[
                ("target", s.target.is_some()),
                ("link", s.link.is_some()),
                ("fault", s.fault.is_some()),
                ("latency", s.latency.is_some()),
                ("cell", s.cell.is_some()),
                ("to", s.to.is_some()),
                ("green", s.green.is_some()),
                ("for", for_.is_some()),
            ])?;
            let merge = required(&s.merge, "merge (the TOML merged into the live rules)")?;
            let fragment = merge
                .parse::<toml_edit::DocumentMut>()
                .map_err(|e| format!("merge: not TOML: {e}"))?;
            if fragment.contains_key("revision") {
                return Err("merge sets `revision`: the step raises it".into());
            }
            if fragment.is_empty() {
                return Err("merge sets nothing".into());
            }
            Action::RulesApply {
                merge: merge.to_string(),
            }
        }
        "partition" => {
            unused(&[
                ("merge", s.merge.is_some()),
                ("target", s.target.is_some()),
                ("link", s.link.is_some()),
                ("fault", s.fault.is_some()),
                ("latency", s.latency.is_some()),
                ("to", s.to.is_some()),
                ("green", s.green.is_some()),
            ])?;
            Action::Partition {
                cell: cell(cells, "cell", required(&s.cell, "cell (the cell cut off)")?)?,
            }
        }
        "switchover" | "failover" => {
            unused(&[
                ("merge", s.merge.is_some()),
                ("target", s.target.is_some()),
                ("link", s.link.is_some()),
                ("fault", s.fault.is_some()),
                ("green", s.green.is_some()),
                ("for", for_.is_some()),
            ])?;
            let c = cell(cells, "cell", required(&s.cell, "cell")?)?;
            let to = cell(cells, "to", required(&s.to, "to")?)?;
            if s.action == "switchover" {
                Action::Switchover { cell: c, to }
            } else {
                Action::Failover { cell: c, to }
            }
        }
        "failback" => {
            unused(&[
                ("merge", s.merge.is_some()),
                ("target", s.target.is_some()),
                ("link", s.link.is_some()),
                ("fault", s.fault.is_some()),
                ("green", s.green.is_some()),
                ("to", s.to.is_some()),
                ("for", for_.is_some()),
            ])?;
            Action::Failback {
                cell: cell(cells, "cell", required(&s.cell, "cell")?)?,
            }
        }
        "split" => {
            unused(&[
                ("merge", s.merge.is_some()),
                ("target", s.target.is_some()),
                ("link", s.link.is_some()),
                ("fault", s.fault.is_some()),
                ("to", s.to.is_some()),
                ("for", for_.is_some()),
            ])?;
            let c = cell(cells, "cell", required(&s.cell, "cell")?)?;
            let mut shares = Vec::new();
            for g in required(&s.green, "green (e.g. \"10%\", or a list \"0%,50%\")")?.split(',') {
                shares.push(
                    routing_rules::model::parse_percent(g).ok_or_else(|| {
                        format!("green = {g:?}: a percentage 0..=100 with at most two decimals, e.g. \"10%\"")
                    })?,
                );
            }
            let times = s.times.unwrap_or(1).max(1);
            let every = match &s.every {
                Some(e) => duration("every", e)?,
                None if times > 1 => return Err("times needs every".into()),
                None => Duration::ZERO,
            };
            return Ok((0..times)
                .map(|i| Step {
                    at: at + every * i,
                    for_: None,
                    action: Action::Split {
                        cell: c.clone(),
                        green_bp: shares[i as usize % shares.len()],
                    },
                })
                .collect());
        }
        other => {
            return Err(format!(
            "action = {other:?}: one of kill, freeze, restart, link, partition, switchover, failover, failback, split, rules-apply"
        ))
        }
    };
    if s.every.is_some() || s.times.is_some() {
        return Err("every/times apply only to split".into());
    }
    Ok(vec![Step { at, for_, action }])
}
