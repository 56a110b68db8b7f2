//! `cellctl canary` as a process: bad input exits 2 and changes nothing,
//! the dry run and the exposure list who moves, `abort` sets green to 0 %
//! at once. (The pipeline itself, through real gateways: the gateway
//! crate's `tests/canary.rs`.)

use std::process::{Command, Output};

use serde_json::Value;

fn cellctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellctl"))
        .args(args)
        .output()
        .expect("run cellctl")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

const RULES: &str = r#"revision = 3
slots = 64
[cells.a]
blue = ["127.0.0.1:1"]
green = ["127.0.0.1:2"]
split = { green = "0%", seed = 7 }
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

#[test]
fn bad_input_exits_2_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let r = rules.to_str().unwrap();
    let dead = "http://127.0.0.1:9/metrics";
    for (args, expect) in [
        (vec!["a", "--steps", "5,1"], "must rise"),
        (vec!["a", "--steps", "100"], "no baseline"),
        (vec!["a", "--max-error-ratio", "0.5"], "at least 1"),
        (vec!["a", "--min-requests", "0"], "above 0"),
        (vec!["a"], "give --metrics"),
        (vec!["zz", "--metrics", dead], "unknown cell"),
        (vec!["a", "--metrics", "https://x/metrics"], "only http://"),
        (vec!["a", "--metrics", dead], "must be readable before"),
    ] {
        let mut all = vec!["canary", "run", "--rules", r];
        all.extend(args.iter());
        let o = cellctl(&all);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{all:?}: {out}{err}");
        assert!(err.contains(expect), "{all:?}: {err}");
        assert_eq!(std::fs::read_to_string(&rules).unwrap(), RULES, "{all:?}");
    }
    // Bad durations are usage errors (clap: exit 2 as well).
    let o = cellctl(&["canary", "run", "a", "--rules", r, "--hold", "soon"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("e.g. 30s"), "{}", text(&o).1);
    assert!(!dir.path().join("rules.toml.canary/a.json").exists());
    let o = cellctl(&["canary", "status", "a", "--rules", r]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("no canary of cell a"), "{}", text(&o).1);
    let o = cellctl(&["canary", "pause", "a", "--rules", r]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn dry_run_and_exposure_name_who_moves_at_each_step() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES).unwrap();
    let users = dir.path().join("users.txt");
    let list: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
    std::fs::write(&users, list.join("\n")).unwrap();
    let (r, u) = (rules.to_str().unwrap(), users.to_str().unwrap());
    let o = cellctl(&[
        "canary",
        "run",
        "a",
        "--rules",
        r,
        "--steps",
        "10,50,100",
        "--hold",
        "30s",
        "--dry-run",
        "--users",
        u,
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let plan: Value = serde_json::from_slice(&o.stdout).unwrap();
    let in_cell = plan["users_in_cell"].as_u64().unwrap();
    assert!((800..1200).contains(&in_cell), "{plan}");
    let moved: u64 = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["moves_users"].as_u64().unwrap())
        .sum();
    assert_eq!(
        moved, in_cell,
        "every user of the cell is on green at 100 %"
    );
    assert_eq!(plan["least_duration_ms"], 90_000);
    assert_eq!(std::fs::read_to_string(&rules).unwrap(), RULES);
    let o = cellctl(&["canary", "run", "a", "--rules", r, "--dry-run"]);
    let (out, _) = text(&o);
    assert!(
        out.contains("step 1: green 5%, moves 4% of the cell's users"),
        "{out}"
    );

    let o = cellctl(&[
        "canary", "exposure", "a", "--rules", r, "--users", u, "--steps", "10,50", "-o", "json",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let e: Value = serde_json::from_slice(&o.stdout).unwrap();
    let first: Vec<&str> = e["steps"][0]["newly"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // The same users through `cellctl route` once the share is 10 %: green.
    let ten = dir.path().join("ten.toml");
    std::fs::write(&ten, RULES.replace("\"0%\"", "\"10%\"")).unwrap();
    for user in first.iter().take(5) {
        let o = cellctl(&[
            "route",
            "--rules",
            ten.to_str().unwrap(),
            "-o",
            "json",
            user,
        ]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v[0]["colour"], "green", "{user}: {v}");
    }
    assert_eq!(
        e["steps"][1]["on_green"].as_u64().unwrap(),
        e["steps"][0]["on_green"].as_u64().unwrap()
            + e["steps"][1]["newly"].as_array().unwrap().len() as u64
    );
}

#[test]
fn abort_sets_green_to_zero_at_once_even_without_a_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(&rules, RULES.replace("\"0%\"", "\"25%\"")).unwrap();
    let r = rules.to_str().unwrap();
    let o = cellctl(&["canary", "abort", "a", "--rules", r, "-o", "json"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["revision"], 4, "{v}");
    let now = std::fs::read_to_string(&rules).unwrap();
    assert!(
        now.contains("green = \"0%\"") && now.contains("revision = 4"),
        "{now}"
    );
    // Again: nothing left to change.
    let o = cellctl(&["canary", "abort", "a", "--rules", r]);
    assert!(text(&o).0.contains("it was already"), "{}", text(&o).0);
    assert_eq!(std::fs::read_to_string(&rules).unwrap(), now);
}
