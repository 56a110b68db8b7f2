//! `cell-agent` as an operator types it: listen addresses by host name,
//! and `check` naming the file and what is wrong with it.

mod support;

use std::process::Command;

use support::*;

#[test]
fn check_names_the_file_and_the_reason() {
    let dir = TempDir::new("cli-check");
    let run = |db: &std::path::Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_cell-agent"))
            .args(["check", "--db"])
            .arg(db)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let missing = dir.path("missing.db");
    let (code, err) = run(&missing);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("missing.db") && err.contains("no such file"),
        "{err}"
    );
    let junk = dir.path("junk.db");
    std::fs::write(
        &junk,
        "not a database at all, just text that is long enough",
    )
    .unwrap();
    let (code, err) = run(&junk);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("junk.db") && err.contains("not a SQLite database"),
        "{err}"
    );
}

#[tokio::test]
async fn listen_takes_a_host_name() {
    let dir = TempDir::new("cli-listen");
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, placeholder_rules()).unwrap();
    let args: Vec<String> = ["--cell", "cell-a", "--colour", "blue", "--db"]
        .iter()
        .map(|s| s.to_string())
        .chain([
            dir.path("a.db").display().to_string(),
            "--rules".into(),
            rules.display().to_string(),
        ])
        .collect();
    let agent = AgentProcess::start(&args, "localhost:0");
    assert!(agent.addr.ip().is_loopback(), "{}", agent.addr);
    let r = call(&client(), "GET", agent.addr, "/healthz", "", None).await;
    assert_eq!(r.status, http::StatusCode::OK);
    // A port that is not a number is refused with the reason.
    let o = Command::new(env!("CARGO_BIN_EXE_cell-agent"))
        .args(["serve", "--listen", "localhost:http"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("HOST:PORT"));
}
