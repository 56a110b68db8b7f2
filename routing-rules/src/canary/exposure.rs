//! Which of a cell's users a canary puts on green at each step. The split
//! is sticky and one-directional: a user's bucket (0..10000, from its key
//! and the cell's split seed) is green once the share is above it, so a
//! user on green at 5 % stays on green at 25 %.

use serde::Serialize;

use super::Bp;
use crate::{AllHealthy, RouteAttrs, RoutingTable};

/// One step's exposure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepExposure {
    /// The step's green share, %.
    pub green: String,
    /// The cell's listed users on green at this step.
    pub on_green: usize,
    /// The users this step moves from blue to green.
    pub newly: Vec<String>,
}

/// The exposure of a plan for a list of users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Exposure {
    /// The cell.
    pub cell: String,
    /// Listed users the cell serves (their colour follows the split).
    pub users_in_cell: usize,
    /// Listed users the cell serves whose colour is pinned (an override):
    /// no step moves them.
    pub pinned: Vec<String>,
    /// Per step.
    pub steps: Vec<StepExposure>,
}

/// Which of `users` (keys as the gateway extracts them) `table` serves in
/// `cell`, and which step puts each on green. Users served by another
/// cell are left out; a key the rules cannot route is an error.
pub fn exposure(
    table: &RoutingTable,
    cell: &str,
    users: &[String],
    steps: &[Bp],
) -> Result<Exposure, String> {
    let mut out = Exposure {
        cell: cell.to_string(),
        users_in_cell: 0,
        pinned: Vec::new(),
        steps: steps
            .iter()
            .map(|&s| StepExposure {
                green: crate::model::format_percent(s),
                on_green: 0,
                newly: Vec::new(),
            })
            .collect(),
    };
    for user in users {
        let d = table
            .route(Some(user.as_bytes()), &RouteAttrs::default(), &AllHealthy)
            .map_err(|e| format!("user {user:?}: {e:?}"))?;
        if table.cell_name(d.serving_cell) != cell {
            continue;
        }
        out.users_in_cell += 1;
        let Some(bucket) = d.bucket else {
            out.pinned.push(user.clone());
            continue;
        };
        if let Some(first) = steps.iter().position(|&s| bucket < s) {
            out.steps[first].newly.push(user.clone());
            for s in &mut out.steps[first..] {
                s.on_green += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: &str = r#"
revision = 1
slots = 64
[cells.a]
blue = ["127.0.0.1:1"]
green = ["127.0.0.1:2"]
split = { green = "0%", seed = 11 }
[cells.b]
blue = ["127.0.0.1:3"]
[[ranges]]
from = 0
to = 31
cell = "a"
[[ranges]]
from = 32
to = 63
cell = "b"
"#;

    fn table() -> RoutingTable {
        RoutingTable::compile(crate::parse_rules(RULES).unwrap(), 1).unwrap()
    }

    #[test]
    fn each_step_holds_its_share_of_100k_users_within_one_point() {
        let users: Vec<String> = (0..100_000).map(|i| format!("user-{i}")).collect();
        let steps = [100, 500, 2500, 5000, 10_000];
        let e = exposure(&table(), "a", &users, &steps).unwrap();
        assert!(
            (45_000..55_000).contains(&e.users_in_cell),
            "{}",
            e.users_in_cell
        );
        for (s, step) in steps.iter().zip(&e.steps) {
            let share = step.on_green as f64 / e.users_in_cell as f64 * 100.0;
            let want = *s as f64 / 100.0;
            assert!(
                (share - want).abs() <= 1.0,
                "step {}: {share:.2} % on green",
                step.green
            );
        }
        assert_eq!(e.steps[4].on_green, e.users_in_cell);
    }

    #[test]
    fn a_user_on_green_stays_on_green_at_every_later_step() {
        let users: Vec<String> = (0..5_000).map(|i| format!("u{i}")).collect();
        let e = exposure(&table(), "a", &users, &[100, 500, 2500]).unwrap();
        let moved: usize = e.steps.iter().map(|s| s.newly.len()).sum();
        assert_eq!(moved, e.steps[2].on_green);
        // No user is moved twice.
        let mut all: Vec<&String> = e.steps.iter().flat_map(|s| &s.newly).collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
