//! deploy/prometheus/alerts.yml: valid for Prometheus (`promtool check
//! rules`), its unit tests pass (`promtool test rules`), and every metric it
//! (and the Grafana dashboard) queries is one cellgate exports, as listed
//! in docs/metrics.md. promtool comes from Debian's `prometheus` package
//! (scripts/install-deps.sh installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool: {e} (install it: ./scripts/install-deps.sh, Debian package prometheus)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn the_alert_rules_are_valid_and_their_unit_tests_pass() {
    let text = promtool(&["check", "rules", "deploy/prometheus/alerts.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
    let text = promtool(&["test", "rules", "deploy/prometheus/alerts_test.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
}

/// Metric names (`cellgate_*`, `cell_*`) in `text`, histogram suffixes cut.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = text[i..].starts_with("cellgate_") || text[i..].starts_with("cell_");
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts && boundary {
            let end = text[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(text.len(), |n| i + n);
            let mut name = &text[i..end];
            for suffix in ["_bucket", "_sum", "_count"] {
                name = name.strip_suffix(suffix).unwrap_or(name);
            }
            names.insert(name.to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn alerts_and_dashboard_query_only_metrics_cellgate_exports() {
    let documented = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    for file in [
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/cellgate.json",
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        // Only the queries: the alerts' `expr`s, the dashboard's `expr`s.
        let exprs: String = text
            .lines()
            .filter(|l| l.trim_start().starts_with("expr") || l.contains("\"expr\""))
            .collect::<Vec<_>>()
            .join("\n");
        let names = metric_names(&exprs);
        assert!(names.len() >= 5, "{file}: {names:?}");
        for name in names {
            assert!(
                documented.contains(&format!("`{name}`")),
                "{file} queries {name}, which docs/metrics.md does not list"
            );
        }
    }
}
