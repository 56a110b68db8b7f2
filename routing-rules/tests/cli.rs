//! `cellctl` end to end: real processes, real files, exit codes and JSON.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn cellctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellctl"))
        .args(args)
        .output()
        .expect("run cellctl")
}

fn example(name: &str) -> String {
    format!("{}/../examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A temporary directory (tempfile), removed on drop; `.0` is its path.
struct TempDir(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cellctl-test-{tag}-"))
            .tempdir()
            .unwrap();
        TempDir(dir.path().to_path_buf(), dir)
    }
    fn file(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

#[test]
fn examples_validate() {
    for ex in ["cells.toml", "digits.toml"] {
        let o = cellctl(&["rules", "validate", &example(ex)]);
        assert!(o.status.success(), "{ex}: {}", stderr(&o));
        let o = cellctl(&["rules", "validate", "-o", "json", &example(ex)]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["valid"], true);
    }
}

#[test]
fn broken_documents_get_precise_errors_and_exit_1() {
    let dir = TempDir::new("broken");
    let base = std::fs::read_to_string(example("cells.toml")).unwrap();
    let cases = [
        (
            base.replace("to = 66", "to = 60"),
            "slots 61-66 not assigned",
        ),
        (
            base.replace("from = 67", "from = 60"),
            "slots 60-66 assigned twice",
        ),
        (
            base.replace(
                "failover = [\"cell-c\", \"cell-a\"]",
                "failover = [\"cell-b\"]",
            ),
            "\"cell-b\" fails over to itself",
        ),
        (
            base.replace("green = \"10%\"", "green = 12000"),
            "cells.cell-a.split.green: 12000 basis points",
        ),
        (
            base.replace("green = \"10%\"", "green = \"10\""),
            "cells.cell-a.split.green: \"10\" is not a share such as \"10%\"",
        ),
        (
            base.replace("green = \"10%\"", "green = \"100.5%\""),
            "cells.cell-a.split.green: \"100.5%\" is not a share",
        ),
        (
            base.replace("18202", "18101"),
            "127.0.0.1:18101 is used by both cell-a/blue and cell-b/green",
        ),
        (
            base.replace("cell = \"cell-c\"", "cell = \"cell-x\""),
            "ranges[2].cell: unknown cell \"cell-x\"",
        ),
        (
            base.replace("slots = 100", "slots = 100\nslotz = 3"),
            "line 10, column 1: unknown field `slotz`",
        ),
        (
            base.replace("hash = \"xxh64\"", "hash = \"md5\""),
            "line 8, column 8: unknown variant `md5`, expected `xxh64` or `digits`",
        ),
    ];
    for (text, want) in cases {
        let f = dir.file("bad.toml", &text);
        let o = cellctl(&["rules", "validate", &f]);
        assert_eq!(o.status.code(), Some(1), "{want}");
        assert!(
            stderr(&o).contains(want),
            "want {want:?} in:\n{}",
            stderr(&o)
        );
        let o = cellctl(&["rules", "validate", "-o", "json", &f]);
        assert_eq!(o.status.code(), Some(1));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["valid"], false);
        assert!(
            v["errors"].to_string().contains(&want.replace('"', "\\\"")),
            "{v}"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(cellctl(&["route"]).status.code(), Some(2));
    assert_eq!(cellctl(&["rules", "frobnicate"]).status.code(), Some(2));
    assert_eq!(
        cellctl(&[
            "rules",
            "rebalance",
            &example("cells.toml"),
            "--add-cell",
            "x=heavy",
            "--out",
            "/dev/null"
        ])
        .status
        .code(),
        Some(2)
    );
    let help = cellctl(&["--help"]);
    assert!(help.status.success());
    assert!(stdout(&help).contains("Exit status"));
}

#[test]
fn missing_file_exits_1_with_its_name() {
    let o = cellctl(&["rules", "validate", "/nonexistent/rules.toml"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/nonexistent/rules.toml"));
}

#[test]
fn route_json_has_the_decision_fields() {
    let o = cellctl(&[
        "route",
        "--rules",
        &example("cells.toml"),
        "-o",
        "json",
        "alice",
        "vip-42",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    for field in [
        "key",
        "slot",
        "slots",
        "home_cell",
        "serving_cell",
        "colour",
        "reason",
    ] {
        assert!(arr[0].get(field).is_some(), "missing {field}: {v}");
    }
    assert_eq!(arr[0]["key"], "alice");
    assert_eq!(arr[0]["slot"], 89); // docs/hash.md
    assert_eq!(arr[0]["home_cell"], "cell-c");
    assert_eq!(arr[1]["reason"], "override");
    assert_eq!(arr[1]["serving_cell"], "cell-b");
}

#[test]
fn route_with_down_cell_fails_over() {
    let o = cellctl(&[
        "route",
        "--rules",
        &example("cells.toml"),
        "--down",
        "cell-c",
        "-o",
        "json",
        "alice",
    ]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["home_cell"], "cell-c");
    assert_eq!(v[0]["serving_cell"], "cell-a");
    assert_eq!(v[0]["reason"], "failover");
    let o = cellctl(&[
        "route",
        "--rules",
        &example("cells.toml"),
        "--down",
        "cell-z",
        "alice",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unknown cell \"cell-z\""));
}

#[test]
fn route_rejects_malformed_keys_with_exit_1() {
    let o = cellctl(&["route", "--rules", &example("cells.toml"), "-o", "json", ""]);
    assert_eq!(o.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["error"], "malformed");
}

#[test]
fn diff_reports_moves_and_fractions() {
    let dir = TempDir::new("diff");
    let base = std::fs::read_to_string(example("cells.toml")).unwrap();
    let new = dir.file(
        "new.toml",
        &base
            .replace("to = 33", "to = 23")
            .replace("from = 34", "from = 24")
            .replace("green = \"10%\"", "green = \"20%\""),
    );
    let o = cellctl(&["rules", "diff", "-o", "json", &example("cells.toml"), &new]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["slots_moved"], 10);
    assert_eq!(v["users_moved_fraction"], 0.1);
    assert_eq!(v["cells"]["cell-a"]["lost"], 10);
    assert_eq!(v["cells"]["cell-b"]["gained"], 10);
    assert_eq!(
        v["cells_changed"][0]["split"]["users_switching_fraction"],
        0.1
    );
    let text = stdout(&cellctl(&["rules", "diff", &example("cells.toml"), &new]));
    assert!(
        text.contains("slots moved: 10 of 100 (10.00% of users)"),
        "{text}"
    );
    assert!(text.contains("slots 24-33: cell-a → cell-b"), "{text}");
    // The move carries no data and keeps epoch 1: both are warned about.
    let warnings = v["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        text.contains("warning: 10 slot(s) change owner without their data"),
        "{text}"
    );
    assert!(
        text.contains("warning: 10 moved slot(s) keep or lower their epoch"),
        "{text}"
    );

    // With the epoch raised for the moved range, only the data warning is
    // left, and the epoch change is listed.
    let raised = dir.file(
        "raised.toml",
        &std::fs::read_to_string(&new).unwrap().replace(
            "from = 24\nto = 66",
            "from = 24\nto = 33\ncell = \"cell-b\"\nepoch = 2\n\n[[ranges]]\nfrom = 34\nto = 66",
        ),
    );
    let o = cellctl(&[
        "rules",
        "diff",
        "-o",
        "json",
        &example("cells.toml"),
        &raised,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["warnings"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(
        v["epochs"],
        serde_json::json!([{"from": 24, "to": 33, "before": 1, "after": 2}])
    );
}

#[test]
fn rebalance_writes_a_valid_document_and_prints_its_diff() {
    let dir = TempDir::new("rebalance");
    let input = format!(
        "{}/tests/fixtures/rebalance-in.toml",
        env!("CARGO_MANIFEST_DIR")
    );
    let out = dir.path("out.toml");
    let o = cellctl(&[
        "rules",
        "rebalance",
        &input,
        "--add-cell",
        "cell-d",
        "--out",
        out.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let moved = v["slots_moved"].as_u64().unwrap();
    // 1001 unpinned slots over 4 equal cells: about 250 move, all to cell-d.
    assert!((175..=325).contains(&moved), "moved {moved}");
    assert_eq!(v["cells"]["cell-d"]["gained"].as_u64(), Some(moved));
    let written = std::fs::read_to_string(&out).unwrap();
    assert!(written.starts_with("# Fixture for the pinned rebalance test"));
    // In text, a summary: the first few ranges and how many more; -v all.
    let text_out = dir.path("text.toml");
    let args = |verbose: bool| {
        let mut a = vec![
            "rules",
            "rebalance",
            &input,
            "--add-cell",
            "cell-d",
            "--out",
        ];
        a.push(text_out.to_str().unwrap());
        if verbose {
            a.push("-v");
        }
        cellctl(&a)
    };
    let brief = stdout(&args(false));
    let full = stdout(&args(true));
    let ranges = |t: &str| t.lines().filter(|l| l.starts_with("  slot")).count();
    assert_eq!(ranges(&brief), 5, "{brief}");
    assert!(
        brief.contains("more moved ranges (-v lists them all)"),
        "{brief}"
    );
    assert!(ranges(&full) > 5, "{full}");
    assert!(!full.contains("-v lists them all"), "{full}");
    let o = cellctl(&["rules", "validate", out.to_str().unwrap()]);
    assert!(o.status.success());
    // Removing cell-d again returns its slots; an unknown cell changes nothing.
    let out2 = dir.path("out2.toml");
    let o = cellctl(&[
        "rules",
        "rebalance",
        out.to_str().unwrap(),
        "--remove-cell",
        "cell-zz",
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cell \"cell-zz\" is not defined"));
    assert!(!Path::new(&out2).exists());
}

#[test]
fn bump_raises_the_revision_in_place_and_keeps_comments() {
    let dir = TempDir::new("bump");
    let path = dir.path("rules.toml");
    let original = std::fs::read_to_string(format!(
        "{}/../examples/cells.toml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let unversioned = original.replace("revision = 1\n", "");
    std::fs::write(&path, &unversioned).unwrap();
    for want in [1, 2] {
        let out = cellctl(&["rules", "bump", path.to_str().unwrap()]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains(&format!("revision {want}")));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# cellgate example rules"), "{text}");
        let (_, rev) = routing_rules::parse_versioned(&text).unwrap();
        assert_eq!(rev, Some(want));
    }
    let out = cellctl(&["rules", "validate", path.to_str().unwrap()]);
    assert!(stdout(&out).contains("revision 2"), "{}", stdout(&out));
}

#[test]
fn switchover_refuses_bad_requests_and_changes_nothing() {
    let dir = TempDir::new("switchover");
    let text = "revision = 1\nslots = 4\n[cells.a]\nblue = [\"127.0.0.1:1\"]\nstandby = \"b\"\ninternal = [\"127.0.0.1:9\"]\n[cells.b]\nblue = [\"127.0.0.1:2\"]\n[cells.c]\nblue = [\"127.0.0.1:3\"]\n[[ranges]]\nfrom = 0\nto = 1\ncell = \"a\"\n[[ranges]]\nfrom = 2\nto = 3\ncell = \"b\"\n";
    let rules = dir.file("rules.toml", text);
    let secret = dir.file("secret", "0123456789abcdef0123456789abcdef-secret\n");
    let state = format!("{rules}.switchover.json");
    let run = |args: &[&str]| {
        let mut all = vec!["switchover"];
        all.extend_from_slice(args);
        let mut c = Command::new(env!("CARGO_BIN_EXE_cellctl"));
        c.args(&all)
            .env_remove("CELLGATE_INTERNAL_SECRET_FILE")
            .env_remove("CELLGATE_INTERNAL_SECRET");
        c.output().unwrap()
    };
    for (args, expect) in [
        (vec!["a", "--to", "b", "--rules", &rules], "cluster secret"),
        (
            vec![
                "a",
                "--to",
                "c",
                "--rules",
                &rules,
                "--internal-secret-file",
                &secret,
            ],
            "not the standby",
        ),
        (
            vec![
                "a",
                "--to",
                "z",
                "--rules",
                &rules,
                "--internal-secret-file",
                &secret,
            ],
            "no such cell",
        ),
        (
            vec![
                "z",
                "--to",
                "b",
                "--rules",
                &rules,
                "--internal-secret-file",
                &secret,
            ],
            "not defined",
        ),
        (
            vec![
                "a",
                "--to",
                "a",
                "--rules",
                &rules,
                "--internal-secret-file",
                &secret,
            ],
            "nothing to do",
        ),
        (
            vec!["a", "--to", "b", "--internal-secret-file", &secret],
            "--rules",
        ),
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(expect), "{args:?}: {}", stderr(&o));
        assert_eq!(std::fs::read_to_string(&rules).unwrap(), text, "{args:?}");
        assert!(!Path::new(&state).exists(), "{args:?}");
    }
    // The target's agents cannot be reached: the phase stays recorded, the
    // rules unchanged, and the error says which cell did not answer.
    let o = run(&[
        "a",
        "--to",
        "b",
        "--rules",
        &rules,
        "--internal-secret-file",
        &secret,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no agent of cell a answered"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_to_string(&rules).unwrap(), text);
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(recorded["phase"], "demote");
    // Another switchover while one is recorded is refused.
    let o = run(&[
        "a",
        "--to",
        "c",
        "--rules",
        &rules,
        "--internal-secret-file",
        &secret,
    ]);
    assert!(stderr(&o).contains("in progress"), "{}", stderr(&o));
    let help = cellctl(&["switchover", "--help"]);
    assert!(stdout(&help).contains("--catch-up-timeout-ms"));
}

#[test]
fn failover_and_failback_with_data_refuse_without_proof_and_change_nothing() {
    let dir = TempDir::new("failover");
    let text = "revision = 1\nslots = 4\n[cells.a]\nblue = [\"127.0.0.1:1\"]\nstandby = \"b\"\n[cells.b]\nblue = [\"127.0.0.1:2\"]\ninternal = [\"127.0.0.1:9\"]\n[cells.c]\nblue = [\"127.0.0.1:3\"]\n[[ranges]]\nfrom = 0\nto = 1\ncell = \"a\"\n[[ranges]]\nfrom = 2\nto = 3\ncell = \"b\"\n";
    let rules = dir.file("rules.toml", text);
    let secret = dir.file("secret", "0123456789abcdef0123456789abcdef-secret\n");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cellctl"))
            .args(args)
            .env_remove("CELLGATE_INTERNAL_SECRET_FILE")
            .env_remove("CELLGATE_INTERNAL_SECRET")
            .output()
            .unwrap()
    };
    let s = secret.as_str();
    let r = rules.as_str();
    for (args, expect) in [
        (
            vec![
                "failover",
                "a",
                "--to",
                "c",
                "--rules",
                r,
                "--internal-secret-file",
                s,
            ],
            "not the standby",
        ),
        (
            vec![
                "failover",
                "a",
                "--to",
                "b",
                "--rules",
                r,
                "--internal-secret-file",
                s,
            ],
            "no replication record",
        ),
        (
            vec!["failover", "a", "--to", "b", "--rules", r],
            "cluster secret",
        ),
        (
            vec!["failback", "a", "--rules", r, "--internal-secret-file", s],
            "already holds its own shard",
        ),
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(expect), "{args:?}: {}", stderr(&o));
        assert_eq!(std::fs::read_to_string(&rules).unwrap(), text, "{args:?}");
    }
    // A failed-over shard whose home copy never gets in sync: the failback
    // waits --wait-ms, says what it saw, and changes nothing.
    let away = text.replace("standby = \"b\"\n", "standby = \"b\"\nhosted_by = \"b\"\n");
    let moved = dir.file("moved.toml", &away);
    let o = run(&[
        "failback",
        "a",
        "--rules",
        &moved,
        "--internal-secret-file",
        s,
        "--wait-ms",
        "300",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("did not become its shard's in-sync standby within 300ms")
            && stderr(&o).contains("no record"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_to_string(&moved).unwrap(), away);
    let o = run(&["replication", "status", "--rules", r]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("no shard replication is recorded"),
        "{}",
        stdout(&o)
    );
    // A degraded record refuses too; --force goes on (and here reaches the
    // standby's agent, which is not running: nothing is written).
    std::fs::create_dir_all(format!("{r}.replication")).unwrap();
    std::fs::write(
        format!("{r}.replication/a.json"),
        r#"{"cell":"a","standby":"b","state":"degraded","since_ms":1,"acked_lsn":3,"updated_ms":1}"#,
    )
    .unwrap();
    let o = run(&[
        "failover",
        "a",
        "--to",
        "b",
        "--rules",
        r,
        "--internal-secret-file",
        s,
    ]);
    assert!(
        stderr(&o).contains("runs without a synchronous standby"),
        "{}",
        stderr(&o)
    );
    let o = run(&["replication", "status", "--rules", r]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("a → standby b: degraded"),
        "{}",
        stdout(&o)
    );
    let o = run(&["replication", "status", "--rules", r, "-o", "json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["a"]["acked_lsn"], 3);
    let o = run(&[
        "failover",
        "a",
        "--to",
        "b",
        "--rules",
        r,
        "--internal-secret-file",
        s,
        "--force",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no agent of cell b answered"),
        "{}",
        stderr(&o)
    );
    // The rules moved first (from then on cell-a may not go on without its
    // standby); the error says the promotion is what remains to do, and
    // running the command again retries just that.
    assert!(
        stderr(&o).contains("run the same command again"),
        "{}",
        stderr(&o)
    );
    let moved = std::fs::read_to_string(&rules).unwrap();
    assert!(moved.contains("hosted_by = \"b\""), "{moved}");
    let o = run(&[
        "failover",
        "a",
        "--to",
        "b",
        "--rules",
        r,
        "--internal-secret-file",
        s,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no agent of cell b answered"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(&rules).unwrap(),
        moved,
        "a re-run only retries the promotion"
    );
}

#[test]
fn a_closed_pipe_ends_cellctl_quietly() {
    use std::io::{BufRead, BufReader};
    let keys: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cellctl"))
        .args(["route", "--rules", &example("cells.toml")])
        .args(&keys)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read one line, as `| head -1` does, and close the pipe.
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!line.is_empty());
    assert_ne!(out.status.code(), Some(101), "panicked: {}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn split_edits_a_rules_file_in_place() {
    let dir = TempDir::new("split-file");
    let rules = dir.file(
        "rules.toml",
        &std::fs::read_to_string(example("cells.toml")).unwrap(),
    );
    let revision = |text: &str| routing_rules::parse_versioned(text).unwrap().1;
    let before = std::fs::read_to_string(&rules).unwrap();
    let o = cellctl(&["split", "cell-c", "--green", "25%", "--rules", &rules]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("revision 2 written"), "{}", stdout(&o));
    let after = std::fs::read_to_string(&rules).unwrap();
    assert_eq!(revision(&after), revision(&before).map(|r| r + 1));
    let parsed = routing_rules::parse_rules(&after).unwrap();
    assert_eq!(parsed.cells["cell-c"].split.green, 2_500);
    // The same share again: nothing written.
    let o = cellctl(&[
        "split", "cell-c", "--green", "25", "--rules", &rules, "-o", "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["no_changes"], true, "{v}");
    assert_eq!(std::fs::read_to_string(&rules).unwrap(), after);
    // Bad input: a precise error, the file unchanged.
    for (args, want) in [
        (["split", "cell-c", "--green", "250%"], "250%"),
        (["split", "cell-z", "--green", "5%"], "cell-z"),
    ] {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--rules", &rules]);
        let o = cellctl(&a);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
        assert_eq!(std::fs::read_to_string(&rules).unwrap(), after);
    }
}
