//! The gateway over real sockets: real backend servers, a real rules file,
//! a real HTTP client.

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use routing_rules::{parse_rules, AllHealthy, Colour, RouteAttrs, RoutingTable};
use support::*;

async fn gateway_for(dir: &TempDir, rules: &str) -> gateway::RunningGateway {
    let path = dir.0.join("rules.toml");
    std::fs::write(&path, rules).unwrap();
    gateway::start(fast_config(path), prometheus::Registry::new())
        .await
        .unwrap()
}

fn table(rules: &str) -> RoutingTable {
    RoutingTable::compile(parse_rules(rules).unwrap(), 0).unwrap()
}

fn key(i: usize) -> String {
    // Deterministic pseudo-random user ids.
    let x = (i as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(17);
    format!("u{x:016x}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_reaches_the_cell_and_colour_the_engine_decides() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("route");
    let rules = topo.rules(
        [2500, 5000, 0],
        "[overrides]\n\"vip\" = { cell = \"cell-c\", colour = \"green\" }\n",
    );
    let gw = gateway_for(&dir, &rules).await;
    let t = table(&rules);
    let client = client();
    let addr = gw.proxy_addr;
    let rev = gw.control.current().table.revision().to_string();
    let keys: Vec<String> = (0..10_000).map(key).chain(["vip".to_string()]).collect();
    let mut tasks = Vec::new();
    for chunk in keys.chunks(keys.len() / 16 + 1) {
        let chunk = chunk.to_vec();
        let (client, t, rev) = (client.clone(), t.clone(), rev.clone());
        tasks.push(tokio::spawn(async move {
            for k in chunk {
                let d = t
                    .route(Some(k.as_bytes()), &RouteAttrs::default(), &AllHealthy)
                    .unwrap();
                let r = get_user(&client, addr, &k).await.unwrap();
                assert_eq!(r.status, StatusCode::OK, "{k}");
                assert_eq!(r.json["cell"], t.cell_name(d.serving_cell), "{k}");
                assert_eq!(r.json["colour"], d.colour.as_str(), "{k}");
                assert_eq!(r.json["stamp_slot"], d.slot.unwrap().to_string(), "{k}");
                assert_eq!(r.json["stamp_home"], t.cell_name(d.home_cell), "{k}");
                assert_eq!(r.json["stamp_cell"], t.cell_name(d.serving_cell), "{k}");
                assert_eq!(r.json["stamp_colour"], d.colour.as_str(), "{k}");
                assert_eq!(r.json["stamp_rev"], rev.as_str(), "{k}");
                let epoch = d.slot.map(|s| t.slot_epoch(s).to_string());
                assert_eq!(r.json["stamp_epoch"].as_str(), epoch.as_deref(), "{k}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_split_holds_its_share_and_users_keep_their_colour() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("split");
    // Every cell at 30 % green.
    let rules = topo.rules([3000, 3000, 3000], "");
    let gw = gateway_for(&dir, &rules).await;
    let client = client();
    let addr = gw.proxy_addr;
    let n = 100_000usize;
    let workers = 32;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut colours = Vec::new();
            for i in (w..n).step_by(workers) {
                let r = get_user(&client, addr, &key(i)).await.unwrap();
                colours.push((i, r.json["colour"] == "green"));
            }
            colours
        }));
    }
    let mut green = vec![false; n];
    for t in tasks {
        for (i, g) in t.await.unwrap() {
            green[i] = g;
        }
    }
    let share = green.iter().filter(|g| **g).count() as f64 / n as f64;
    assert!((share - 0.30).abs() <= 0.01, "green share {share}");
    // Unchanged split: a second pass puts every user on the same colour.
    for i in (0..n).step_by(50) {
        let r = get_user(&client, addr, &key(i)).await.unwrap();
        assert_eq!(
            r.json["colour"] == "green",
            green[i],
            "user {} changed colour",
            key(i)
        );
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_cell_fails_over_once_health_detects_it() {
    let topo = Topology::start(2).await;
    let dir = TempDir::new("failover");
    let rules = topo.rules([5000, 5000, 5000], "");
    let gw = gateway_for(&dir, &rules).await;
    let t = table(&rules);
    let client = client();
    let a_keys: Vec<String> = (0..2000)
        .map(key)
        .filter(|k| {
            let d = t
                .route(Some(k.as_bytes()), &RouteAttrs::default(), &AllHealthy)
                .unwrap();
            t.cell_name(d.home_cell) == "cell-a"
        })
        .take(200)
        .collect();
    for k in &a_keys[..20] {
        assert_eq!(
            get_user(&client, gw.proxy_addr, k).await.unwrap().json["cell"],
            "cell-a"
        );
    }
    for b in topo.of("cell-a") {
        b.kill();
    }
    // Wait for the health checks to notice (an event, observed on the admin API).
    let admin = format!("http://{}/admin/health", gw.admin_addr);
    wait_until("cell-a to be reported down", Duration::from_secs(5), || {
        let (client, admin) = (client.clone(), admin.clone());
        async move {
            let r = get(&client, admin, &[]).await.unwrap();
            r.json["cells"]["cell-a"]["serving_cell"] == "cell-b"
        }
    })
    .await;
    for k in &a_keys {
        let r = get_user(&client, gw.proxy_addr, k).await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{k}: {:?}", r.json);
        assert_eq!(r.json["cell"], "cell-b");
        assert_eq!(r.json["stamp_home"], "cell-a");
        assert_eq!(r.json["stamp_cell"], "cell-b");
    }
    let text = metrics_text(&client, gw.admin_addr).await;
    let m = parse_metrics(&text);
    assert!(
        m.get("cellgate_failovers_total{from=\"cell-a\",to=\"cell-b\"}")
            .copied()
            .unwrap_or(0.0)
            >= a_keys.len() as f64,
        "{text}"
    );
    let a_blue = topo.of("cell-a").find(|b| b.colour == "blue").unwrap().addr;
    let series =
        format!("cellgate_instance_up{{cell=\"cell-a\",colour=\"blue\",instance=\"{a_blue}\"}}");
    assert_eq!(m.get(&series), Some(&0.0), "{text}");
    gw.shutdown().await;
}

async fn metrics_text(client: &HttpClient, admin: std::net::SocketAddr) -> String {
    use http_body_util::BodyExt;
    let resp = client
        .request(
            Request::get(format!("http://{admin}/metrics"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(b.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_request_and_bad_rules_are_rejected() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("reload");
    let path = dir.0.join("rules.toml");
    let gw = gateway_for(&dir, &topo.rules([0, 0, 0], "")).await;
    let client = client();
    let addr = gw.proxy_addr;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..8 {
        let (client, stop) = (client.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, Vec::new());
            let mut i = w;
            // Bounded: stops when told, or after 20,000 requests per worker.
            while !stop.load(Ordering::Relaxed) && i < 160_000 {
                match get_user(&client, addr, &key(i)).await {
                    Ok(r) if r.status == StatusCode::OK => ok += 1,
                    Ok(r) => failed.push(format!("{}: {}", r.status, r.json)),
                    Err(e) => failed.push(e),
                }
                i += 8;
            }
            (ok, failed)
        }));
    }
    // Ten valid reloads with different splits, each awaited via the revision.
    for step in 1..=10u32 {
        let before = gw.control.current().table.revision();
        let g = step * 1000;
        std::fs::write(&path, topo.rules([g, 10_000 - g, g / 2], "")).unwrap();
        let control = gw.control.clone();
        wait_until("the reload", Duration::from_secs(5), || {
            let c = control.clone();
            async move { c.current().table.revision() > before }
        })
        .await;
        assert_eq!(
            gw.control.current().table.rules().cells["cell-a"]
                .split
                .green,
            g
        );
    }
    // An invalid document: rejected, counted, routing unchanged.
    let good = gw.control.current();
    let good_rules = good.table.rules().clone();
    std::fs::write(&path, topo.rules([20_000, 0, 0], "")).unwrap();
    wait_until(
        "the rejection to be counted",
        Duration::from_secs(5),
        || {
            let client = client.clone();
            async move {
                parse_metrics(&metrics_text(&client, gw.admin_addr).await)
                    .get("cellgate_rules_reloads_total{result=\"error\"}")
                    .copied()
                    .unwrap_or(0.0)
                    >= 1.0
            }
        },
    )
    .await;
    assert_eq!(gw.control.current().table.revision(), good.table.revision());
    assert_eq!(*gw.control.current().table.rules(), good_rules);
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for l in load {
        let (ok, failed) = l.await.unwrap();
        assert!(
            failed.is_empty(),
            "failed requests during reloads: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 100, "the load ran ({total} requests)");
    let m = parse_metrics(&metrics_text(&client, gw.admin_addr).await);
    assert_eq!(m["cellgate_rules_reloads_total{result=\"ok\"}"], 11.0);
    assert_eq!(
        m["cellgate_rules_revision"],
        gw.control.current().table.revision() as f64
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_cell_does_not_slow_the_others() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("isolation");
    let rules = topo.rules([0, 0, 0], "");
    let path = dir.0.join("rules.toml");
    std::fs::write(&path, &rules).unwrap();
    let mut cfg = fast_config(path);
    cfg.cell_max_inflight = 16;
    let gw = gateway::start(cfg, prometheus::Registry::new())
        .await
        .unwrap();
    let t = table(&rules);
    let in_cell = |cell: &str, n: usize| -> Vec<String> {
        (0..100_000)
            .map(key)
            .filter(|k| {
                let d = t
                    .route(Some(k.as_bytes()), &RouteAttrs::default(), &AllHealthy)
                    .unwrap();
                t.cell_name(d.serving_cell) == cell
            })
            .take(n)
            .collect()
    };
    for b in topo.of("cell-a") {
        b.delay_ms.store(1500, Ordering::Relaxed);
    }
    let client = client();
    let addr = gw.proxy_addr;
    // 64 concurrent requests pile onto slow cell-a.
    let mut slow = Vec::new();
    for k in in_cell("cell-a", 64) {
        let client = client.clone();
        slow.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = get_user(&client, addr, &k).await.unwrap();
            (
                r.status,
                r.headers.get("retry-after").is_some(),
                t0.elapsed(),
            )
        }));
    }
    // Meanwhile cell-b answers as fast as ever.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut worst = Duration::ZERO;
    for k in in_cell("cell-b", 100) {
        let t0 = Instant::now();
        let r = get_user(&client, addr, &k).await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        worst = worst.max(t0.elapsed());
    }
    let (mut ok, mut shed) = (0, 0);
    for s in slow {
        let (status, retry_after, took) = s.await.unwrap();
        match status {
            StatusCode::OK => {
                ok += 1;
                assert!(took >= Duration::from_millis(1500));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                shed += 1;
                assert!(retry_after, "503 without Retry-After");
                assert!(
                    took < Duration::from_millis(500),
                    "shedding was slow: {took:?}"
                );
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ok, 16, "exactly the cell's in-flight cap was admitted");
    assert_eq!(shed, 48);
    assert!(
        worst < Duration::from_millis(500),
        "cell-b slowed to {worst:?} while cell-a was stuck"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_errors_and_admin_api() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("headers");
    let gw = gateway_for(&dir, &topo.rules([0, 0, 0], "")).await;
    let client = client();
    let url = format!("http://{}/v1/accounts/x?y=1", gw.proxy_addr);

    // Missing key: 400 with a JSON body.
    let r = get(&client, url.clone(), &[]).await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json["error"], "missing_key");
    assert!(r.json["message"].is_string());
    let r = get(&client, url.clone(), &[("x-user-id", "")])
        .await
        .unwrap();
    assert_eq!(r.json["error"], "malformed_key");

    // Client-sent stamps are replaced; hop-by-hop headers are dropped;
    // x-forwarded-for and x-request-id are added.
    let r = get(
        &client,
        url.clone(),
        &[
            ("x-user-id", "alice"),
            ("x-cellgate-rev", "999999999999999"),
            ("x-cellgate-epoch", "999"),
            ("x-cellgate-cell", "cell-evil"),
            ("connection", "x-custom-hop"),
            ("x-custom-hop", "secret"),
            ("x-forwarded-for", "203.0.113.9"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json["stamp_rev"],
        gw.control.current().table.revision().to_string()
    );
    assert_ne!(r.json["stamp_cell"], "cell-evil");
    assert_eq!(
        r.json["stamp_epoch"], "1",
        "the slot's epoch, not the client's"
    );
    assert_eq!(r.json["x_custom_hop"], serde_json::Value::Null);
    assert_eq!(r.json["xff"], "203.0.113.9, 127.0.0.1");
    let id = r.json["request_id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(r.headers["x-request-id"], id.as_str());
    assert!(
        r.headers.get("x-cellgate-cell").is_none(),
        "debug headers are off by default"
    );
    // A client's request id is kept.
    let r = get(
        &client,
        url.clone(),
        &[("x-user-id", "alice"), ("x-request-id", "abc-123")],
    )
    .await
    .unwrap();
    assert_eq!(r.json["request_id"], "abc-123");
    // Tester header (enabled in these rules) picks the colour.
    for c in ["green", "blue"] {
        let r = get(
            &client,
            url.clone(),
            &[("x-user-id", "alice"), ("x-cellgate-test-colour", c)],
        )
        .await
        .unwrap();
        assert_eq!(r.json["colour"], c);
    }

    // Admin API.
    let admin = |p: &str| format!("http://{}{p}", gw.admin_addr);
    let r = get(&client, admin("/admin/route?key=alice"), &[])
        .await
        .unwrap();
    for f in [
        "key",
        "slot",
        "slots",
        "home_cell",
        "serving_cell",
        "colour",
        "reason",
    ] {
        assert!(r.json.get(f).is_some(), "{f} missing in {}", r.json);
    }
    let r = get(&client, admin("/admin/rules"), &[]).await.unwrap();
    assert_eq!(r.json["slots"], 100);
    assert_eq!(r.json["cells"]["cell-a"]["slots"], 33);
    let r = get(&client, admin("/admin/health"), &[]).await.unwrap();
    assert_eq!(r.json["instances"].as_array().unwrap().len(), 6);
    assert_eq!(
        get(&client, admin("/healthz"), &[]).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        get(&client, admin("/readyz"), &[]).await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        get(&client, admin("/nope"), &[]).await.unwrap().status,
        StatusCode::NOT_FOUND
    );
    let text = metrics_text(&client, gw.admin_addr).await;
    for name in [
        "cellgate_requests_total",
        "cellgate_request_duration_seconds_bucket",
        "cellgate_rules_revision",
        "cellgate_rules_reloads_total",
        "cellgate_instance_up",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    assert!(!text.contains("alice"), "a user id leaked into metrics");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_is_required_when_set() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("token");
    let path = dir.0.join("rules.toml");
    std::fs::write(&path, topo.rules([0, 0, 0], "")).unwrap();
    let mut cfg = fast_config(path);
    cfg.admin_token = Some("s3cret".into());
    let gw = gateway::start(cfg, prometheus::Registry::new())
        .await
        .unwrap();
    let client = client();
    let url = format!("http://{}/admin/rules", gw.admin_addr);
    assert_eq!(
        get(&client, url.clone(), &[]).await.unwrap().status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&client, url.clone(), &[("authorization", "Bearer nope")])
            .await
            .unwrap()
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(&client, url, &[("authorization", "Bearer s3cret")])
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    assert_eq!(
        get(&client, format!("http://{}/healthz", gw.admin_addr), &[])
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    gw.shutdown().await;
}

fn post(gw: std::net::SocketAddr, user: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(format!("http://{gw}/v1/orders"))
        .header("x-user-id", user)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_only_when_no_effect_can_be_duplicated() {
    let topo = Topology::start(2).await;
    let dir = TempDir::new("retry");
    let rules = topo.rules([0, 0, 0], "");
    let mut cfg = fast_config(dir.0.join("rules.toml"));
    std::fs::write(cfg.rules.as_ref().unwrap(), &rules).unwrap();
    // Slow active checks so that passive behaviour is what is tested.
    cfg.health_interval_ms = 60_000;
    let gw = gateway::start(cfg, prometheus::Registry::new())
        .await
        .unwrap();
    let t = table(&rules);
    let user = (0..1000)
        .map(key)
        .find(|k| {
            let d = t
                .route(Some(k.as_bytes()), &RouteAttrs::default(), &AllHealthy)
                .unwrap();
            t.cell_name(d.serving_cell) == "cell-a" && d.colour == Colour::Blue
        })
        .unwrap();
    let client = client();
    let blues: Vec<&Backend> = topo.of("cell-a").filter(|b| b.colour == "blue").collect();

    // 1. One blue instance refuses connections: POSTs (with bodies) still
    //    succeed, on the other instance, and are never duplicated.
    blues[0].kill();
    for _ in 0..10 {
        let r = send(&client, post(gw.proxy_addr, &user, "{\"amount\":5}"))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json["body_len"], 12);
    }
    assert_eq!(blues[1].requests.load(Ordering::SeqCst), 10);

    // 2. The live instance drops connections after reading the request: a
    //    POST reached an upstream, so it is not retried (502, seen once).
    blues[1].mode.store(RESET, Ordering::SeqCst);
    let seen = blues[1].requests.load(Ordering::SeqCst);
    let r = send(&client, post(gw.proxy_addr, &user, "{\"amount\":5}"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json["error"], "upstream_failed");
    assert_eq!(
        blues[1].requests.load(Ordering::SeqCst),
        seen + 1,
        "the POST was sent twice"
    );

    // 3. A GET in the same situation is retried elsewhere (green, or cell-b).
    let r = get_user(&client, gw.proxy_addr, &user).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    let topo = Topology::start(1).await;
    for b in &topo.backends {
        b.delay_ms.store(300, Ordering::Relaxed);
    }
    let dir = TempDir::new("drain");
    let gw = gateway_for(&dir, &topo.rules([0, 0, 0], "")).await;
    let client = client();
    let addr = gw.proxy_addr;
    let inflight = tokio::spawn({
        let client = client.clone();
        async move { get_user(&client, addr, "alice").await }
    });
    // Wait until the request is in flight at a backend.
    wait_until(
        "the request to reach a backend",
        Duration::from_secs(5),
        || {
            let n: usize = topo
                .backends
                .iter()
                .map(|b| b.requests.load(Ordering::SeqCst))
                .sum();
            async move { n == 1 }
        },
    )
    .await;
    let clean = gw.shutdown().await;
    assert!(clean, "drain deadline hit");
    let r = inflight.await.unwrap().unwrap();
    assert_eq!(r.status, StatusCode::OK);
    // The listener is closed.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_served_over_http1_upstreams() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("h2");
    let rules = topo.rules([0, 0, 0], "");
    let gw = gateway_for(&dir, &rules).await;
    let t = table(&rules);
    let h2: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    for k in ["alice", "bob", "carol"] {
        let req = Request::get(format!("http://{}/v1/accounts/{k}", gw.proxy_addr))
            .header("x-user-id", k)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = send(&h2, req).await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        let d = t
            .route(Some(k.as_bytes()), &RouteAttrs::default(), &AllHealthy)
            .unwrap();
        assert_eq!(r.json["cell"], t.cell_name(d.serving_cell));
        assert_eq!(r.json["path"], format!("/v1/accounts/{k}"));
    }
    gw.shutdown().await;
}
