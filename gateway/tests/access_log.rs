//! `cellgate serve --access-log`: one JSON line per request, through both
//! front ends (the lean HTTP/1.1 path and hyper's HTTP/2), for answers of
//! the cell and refusals of the gateway alike. Real sockets, real backends.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use support::*;

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_one_json_line_with_its_cell_slot_and_upstream() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("access-log");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, topo.rules([0, 0, 0], "")).unwrap();
    let log = dir.0.join("access.log");
    let mut cfg = fast_config(rules);
    cfg.access_log = Some(gateway::access_log::Target::File(log.clone()));
    let gw = gateway::start(cfg, prometheus::Registry::new())
        .await
        .unwrap();
    let client = client();
    // HTTP/1.1 (the lean path).
    let a = get_user(&client, gw.proxy_addr, "alice").await.unwrap();
    assert_eq!(a.status, 200);
    // HTTP/2 (hyper's front end).
    let h2: HttpClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let b = get_user(&h2, gw.proxy_addr, "bob").await.unwrap();
    assert_eq!(b.status, 200);
    // Refused by the gateway itself: the cells' internal API.
    let req = Request::get(format!("http://{}/v1/internal/journal?x=1", gw.proxy_addr))
        .header("x-user-id", "carol")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let c = send(&client, req).await.unwrap();
    assert_eq!(c.status, 404);

    wait_until("three access-log lines", Duration::from_secs(5), || {
        let log = log.clone();
        async move { lines(&log).len() >= 3 }
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("alice") && !text.contains("bob"),
        "user ids only hashed: {text}"
    );
    let all = lines(&log);
    assert_eq!(all.len(), 3, "{text}");
    for (entry, reply, user) in [(&all[0], &a, "alice"), (&all[1], &b, "bob")] {
        assert_eq!(entry["method"], "GET");
        assert_eq!(entry["path"], "/v1/accounts/{user}", "{user}: {entry}");
        assert_eq!(entry["status"], 200);
        assert_eq!(entry["cell"], reply.json["cell"], "{entry}");
        assert_eq!(entry["colour"], reply.json["colour"], "{entry}");
        assert_eq!(
            entry["slot"].as_u64().map(|s| s.to_string()),
            reply.json["stamp_slot"].as_str().map(str::to_string),
            "{entry}"
        );
        assert_eq!(entry["attempts"], 1, "{entry}");
        assert_eq!(
            entry["request_id"].as_str(),
            reply
                .headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok()),
            "{entry}"
        );
        let backend = topo
            .of(reply.json["cell"].as_str().unwrap())
            .find(|be| be.colour == reply.json["colour"].as_str().unwrap())
            .unwrap();
        assert_eq!(entry["upstream"], backend.addr.to_string(), "{entry}");
        assert_eq!(entry["user_hash"].as_str().unwrap().len(), 16, "{entry}");
        assert!(entry["duration_ms"].as_f64().unwrap() >= 0.0);
        assert!(entry["time"].as_str().unwrap().ends_with('Z'), "{entry}");
    }
    assert_ne!(all[0]["user_hash"], all[1]["user_hash"]);
    let refused = &all[2];
    assert_eq!(refused["status"], 404, "{refused}");
    assert_eq!(refused["error"], "not_found", "{refused}");
    assert_eq!(
        refused["path"], "/v1/internal/journal",
        "no query: {refused}"
    );
    assert_eq!(refused["attempts"], 0, "{refused}");
    assert!(
        refused["cell"].is_null(),
        "refused before routing: {refused}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_log_that_cannot_be_opened_stops_the_start() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("access-log-bad");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, topo.rules([0, 0, 0], "")).unwrap();
    let mut cfg = fast_config(rules);
    let bad = dir.0.join("no-such-dir").join("access.log");
    cfg.access_log = Some(gateway::access_log::Target::File(bad.clone()));
    let Err(err) = gateway::start(cfg, prometheus::Registry::new()).await else {
        panic!("started with an access log it cannot open");
    };
    let text = format!("{err:#}");
    assert!(text.contains(&bad.display().to_string()), "{text}");
}
