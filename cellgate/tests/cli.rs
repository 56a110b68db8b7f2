//! `cellgate` as an operator starts it: a broken start says what is wrong
//! once, with the file.

use std::process::Command;

fn serve(rules: &std::path::Path) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--rules",
        ])
        .arg(rules)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_bad_start_says_each_problem_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let (code, err) = serve(&missing);
    assert_eq!(code, Some(1));
    assert!(err.contains("missing.toml"), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "slots = 4\n[cells.a]\n").unwrap();
    let (code, err) = serve(&bad);
    assert_eq!(code, Some(1));
    assert!(err.contains("bad.toml"), "{err}");
    assert_eq!(err.matches("not assigned to any cell").count(), 1, "{err}");
}
