//! How a [`RulesDiff`] reads for people: the full summary (`cellctl rules
//! diff`) and a one-line brief (the reload logs).

use std::fmt::Write as _;

use super::{CellModified, RulesDiff};
use crate::model::format_percent;

fn pct(f: f64) -> String {
    format!("{:.2}%", f * 100.0)
}

impl CellModified {
    /// What changed in this cell, one item each.
    pub fn describe(&self) -> Vec<String> {
        let m = self;
        let mut what = Vec::new();
        if let Some(st) = &m.state {
            what.push(format!("state {} → {}", st.before, st.after));
        }
        if let Some(sp) = &m.split {
            what.push(format!(
                "green {} → {}{} ({} of its users switch colour)",
                format_percent(sp.before.green),
                format_percent(sp.after.green),
                if sp.before.seed != sp.after.seed {
                    ", seed changed"
                } else {
                    ""
                },
                pct(sp.users_switching_fraction)
            ));
        }
        let (b, a) = (&m.before, &m.after);
        if b.failover != a.failover {
            what.push(format!("failover {:?} → {:?}", b.failover, a.failover));
        }
        if b.failover_policy != a.failover_policy {
            what.push(format!(
                "failover_policy {} → {}",
                b.failover_policy.as_str(),
                a.failover_policy.as_str()
            ));
        }
        if b.blue != a.blue || b.green != a.green {
            what.push("instances changed".to_string());
        }
        if b.internal != a.internal {
            what.push("internal addresses changed".to_string());
        }
        if b.standby() != a.standby() {
            what.push(format!(
                "standby {} → {}",
                b.standby().unwrap_or("(none)"),
                a.standby().unwrap_or("(none)")
            ));
        }
        if b.hosted_by != a.hosted_by {
            what.push(format!(
                "shard hosted by {} → {}",
                b.hosted_by.as_deref().unwrap_or(&m.name),
                a.hosted_by.as_deref().unwrap_or(&m.name)
            ));
        }
        if b.registered != a.registered {
            what.push(format!("registered {} → {}", b.registered, a.registered));
        }
        if b.weight != a.weight {
            what.push(format!("weight {} → {}", b.weight, a.weight));
        }
        what
    }
}

impl RulesDiff {
    /// The document-wide policies that changed (`key`, `on_missing`,
    /// `hash`, `tester`).
    fn policies_changed(&self) -> Vec<&'static str> {
        [
            ("key", self.key.is_some()),
            ("on_missing", self.on_missing.is_some()),
            ("hash", self.hash.is_some()),
            ("tester", self.tester.is_some()),
        ]
        .into_iter()
        .filter_map(|(what, changed)| changed.then_some(what))
        .collect()
    }

    /// A human summary, one change per line.
    pub fn summary(&self) -> String {
        self.summary_limited(None)
    }

    /// [`Self::summary`] listing at most `limit` moved ranges, epoch
    /// changes and warnings each (a rebalance moves hundreds of ranges),
    /// with how many more there are.
    pub fn summary_limited(&self, limit: Option<usize>) -> String {
        let shown = |n: usize| limit.map_or(n, |l| n.min(l));
        let more = |s: &mut String, n: usize, what: &str| {
            if let Some(l) = limit.filter(|l| n > *l) {
                let _ = writeln!(s, "  … and {} more {what} (-v lists them all)", n - l);
            }
        };
        let mut s = String::new();
        if self.is_empty() {
            s.push_str("no changes\n");
            return s;
        }
        if self.rehash {
            let _ = writeln!(
                s,
                "hash or slot count changed ({} → {} slots): every key is re-hashed; about {} of users change home cell",
                self.slots.before,
                self.slots.after,
                pct(self.users_moved_fraction)
            );
        } else {
            let _ = writeln!(
                s,
                "slots moved: {} of {} ({} of users)",
                self.slots_moved,
                self.slots.after,
                pct(self.users_moved_fraction)
            );
        }
        for m in self.moves.iter().take(shown(self.moves.len())) {
            let range = if m.from == m.to {
                format!("slot {}", m.from)
            } else {
                format!("slots {}-{}", m.from, m.to)
            };
            let _ = writeln!(
                s,
                "  {range}: {} → {}",
                m.from_cell.as_deref().unwrap_or("(new)"),
                m.to_cell
            );
        }
        more(&mut s, self.moves.len(), "moved ranges");
        for (cell, c) in &self.cells {
            if c.gained > 0 || c.lost > 0 {
                let _ = writeln!(
                    s,
                    "  cell {cell}: {} → {} slots (+{} −{})",
                    c.slots_before, c.slots_after, c.gained, c.lost
                );
            }
        }
        for e in self.epochs.iter().take(shown(self.epochs.len())) {
            let _ = writeln!(
                s,
                "epochs: slots {}-{} {} → {}",
                e.from,
                e.to,
                e.before
                    .map_or_else(|| "(new)".to_string(), |b| b.to_string()),
                e.after
            );
        }
        more(&mut s, self.epochs.len(), "epoch changes");
        for w in self.warnings.iter().take(shown(self.warnings.len())) {
            let _ = writeln!(s, "warning: {w}");
        }
        more(&mut s, self.warnings.len(), "warnings");
        for p in &self.pins {
            let _ = writeln!(
                s,
                "pins: slots {}-{} {}",
                p.from,
                p.to,
                if p.pinned { "pinned" } else { "unpinned" }
            );
        }
        for name in self.cells_added.keys() {
            let _ = writeln!(s, "cell added: {name}");
        }
        for name in &self.cells_removed {
            let _ = writeln!(s, "cell removed: {name}");
        }
        for m in &self.cells_changed {
            let what = m.describe();
            let _ = writeln!(s, "cell {}: {}", m.name, what.join("; "));
        }
        let _ = writeln!(
            s,
            "overrides: +{} −{} ~{}",
            self.overrides_added.len(),
            self.overrides_removed.len(),
            self.overrides_changed.len()
        );
        for what in self.policies_changed() {
            let _ = writeln!(s, "{what} changed");
        }
        s
    }

    /// One line for a log: slots moved (per pair of cells), cells changed
    /// (state, split, instances, ...), cells and overrides added or removed;
    /// "no routing change" when nothing differs.
    pub fn brief(&self) -> String {
        if self.is_empty() {
            return "no routing change".into();
        }
        let mut parts = Vec::new();
        if self.rehash {
            parts.push(format!(
                "re-hashed ({} → {} slots, ~{} of users move)",
                self.slots.before,
                self.slots.after,
                pct(self.users_moved_fraction)
            ));
        } else if self.slots_moved > 0 {
            let mut pairs: std::collections::BTreeMap<(String, String), u32> = Default::default();
            for m in &self.moves {
                let from = m.from_cell.clone().unwrap_or_else(|| "(new)".into());
                *pairs.entry((from, m.to_cell.clone())).or_default() += m.to - m.from + 1;
            }
            let list: Vec<String> = pairs
                .iter()
                .map(|((f, t), n)| format!("{f}→{t} {n}"))
                .collect();
            parts.push(format!(
                "{} slots moved ({})",
                self.slots_moved,
                list.join(", ")
            ));
        }
        if !self.epochs.is_empty() && self.slots_moved == 0 {
            parts.push(format!("epochs raised on {} ranges", self.epochs.len()));
        }
        for m in &self.cells_changed {
            parts.push(format!("{}: {}", m.name, m.describe().join(", ")));
        }
        for name in self.cells_added.keys() {
            parts.push(format!("cell {name} added"));
        }
        for name in &self.cells_removed {
            parts.push(format!("cell {name} removed"));
        }
        let (a, r, c) = (
            self.overrides_added.len(),
            self.overrides_removed.len(),
            self.overrides_changed.len(),
        );
        if a + r + c > 0 {
            parts.push(format!("overrides +{a} −{r} ~{c}"));
        }
        for what in self.policies_changed() {
            parts.push(format!("{what} changed"));
        }
        if !self.pins.is_empty() {
            parts.push(format!("pins changed on {} ranges", self.pins.len()));
        }
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use crate::{diff, parse_rules};

    const DOC: &str = include_str!("../../../examples/cells.toml");

    #[test]
    fn a_brief_names_moved_slots_and_changed_splits() {
        let a = parse_rules(DOC).unwrap();
        assert_eq!(diff(&a, &a).brief(), "no routing change");
        let b = parse_rules(
            &DOC.replace("to = 33", "to = 23")
                .replace("from = 34", "from = 24")
                .replace(r#"green = "10%""#, r#"green = "25%""#),
        )
        .unwrap();
        let brief = diff(&a, &b).brief();
        assert!(
            brief.contains("10 slots moved (cell-a→cell-b 10)"),
            "{brief}"
        );
        assert!(brief.contains("cell-a: green 10% → 25%"), "{brief}");
        assert!(!brief.contains('\n'), "{brief}");
    }
}
