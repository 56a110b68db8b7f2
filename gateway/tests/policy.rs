//! Retries, ejection and health under failing upstreams: bad moments must
//! not get worse. Real backends over real sockets.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use routing_rules::{parse_rules, AllHealthy, Colour, RouteAttrs, RoutingTable};
use support::*;

/// A user served by `cell` in `colour` under `rules`.
fn user_in(rules: &str, cell: &str, colour: Colour) -> String {
    let t = RoutingTable::compile(parse_rules(rules).unwrap(), 0).unwrap();
    (0..10_000)
        .map(|i| format!("p{i}"))
        .find(|u| {
            let d = t
                .route(Some(u.as_bytes()), &RouteAttrs::default(), &AllHealthy)
                .unwrap();
            t.cell_name(d.serving_cell) == cell && d.colour == colour
        })
        .unwrap()
}

async fn start(
    topo: &Topology,
    dir: &TempDir,
    tweak: impl FnOnce(&mut gateway::ServeConfig),
) -> (gateway::RunningGateway, String) {
    let path = dir.0.join("rules.toml");
    let rules = topo.rules([0, 0, 0], "");
    std::fs::write(&path, &rules).unwrap();
    let mut cfg = fast_config(path);
    cfg.eject_5xx_streak = 3;
    cfg.eject_base_ms = 300;
    tweak(&mut cfg);
    let gw = gateway::start(cfg, prometheus::Registry::new())
        .await
        .unwrap();
    (gw, rules)
}

fn ejected(gw: &gateway::RunningGateway, cell: &str) -> Vec<(Colour, bool)> {
    let gen = gw.control.current();
    let idx = gen.table.cell_index(cell).unwrap() as usize;
    let now = gateway::upstream::now_ms();
    gen.cells[idx]
        .colours
        .iter()
        .flat_map(|g| g.instances.iter())
        .map(|i| (i.colour, i.is_ejected(now)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_streak_ejects_an_instance_and_it_recovers() {
    let topo = Topology::start(2).await;
    let dir = TempDir::new("streak");
    let (gw, rules) = start(&topo, &dir, |_| {}).await;
    let user = user_in(&rules, "cell-a", Colour::Blue);
    let client = client();
    let blues: Vec<&Backend> = topo.of("cell-a").filter(|b| b.colour == "blue").collect();
    blues[0].mode.store(FAIL_500, Ordering::SeqCst);
    // Round-robin sends every other request to the failing instance until
    // its streak ejects it.
    for _ in 0..12 {
        get_user(&client, gw.proxy_addr, &user).await.unwrap();
    }
    assert!(
        ejected(&gw, "cell-a").contains(&(Colour::Blue, true)),
        "ejected"
    );
    let before = blues[0].requests.load(Ordering::SeqCst);
    for _ in 0..5 {
        let r = get_user(&client, gw.proxy_addr, &user).await.unwrap();
        assert_eq!(r.status, 200, "the other instance serves");
    }
    assert_eq!(
        blues[0].requests.load(Ordering::SeqCst),
        before,
        "no traffic while ejected"
    );
    // Healthy again: after the ejection it gets traffic back.
    blues[0].mode.store(NORMAL, Ordering::SeqCst);
    wait_until("the instance to come back", Duration::from_secs(5), || {
        let (client, user) = (client.clone(), user.clone());
        let (n, addr) = (blues[0].requests.clone(), gw.proxy_addr);
        async move {
            let _ = get_user(&client, addr, &user).await;
            n.load(Ordering::SeqCst) > before
        }
    })
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ejection_cap_holds_when_every_instance_fails_and_no_cell_moves() {
    let topo = Topology::start(2).await;
    let dir = TempDir::new("cap");
    let (gw, rules) = start(&topo, &dir, |_| {}).await;
    for b in topo.of("cell-a") {
        b.mode.store(FAIL_500, Ordering::SeqCst);
    }
    let client = client();
    let blue = user_in(&rules, "cell-a", Colour::Blue);
    for _ in 0..60 {
        let r = get_user(&client, gw.proxy_addr, &blue).await.unwrap();
        assert_eq!(r.json["cell"], "cell-a", "the users stay in their cell");
        let states = ejected(&gw, "cell-a");
        let out = states.iter().filter(|(_, e)| *e).count();
        assert!(
            out <= 2,
            "at most 50% of the cell's 4 instances ejected: {states:?}"
        );
        for colour in [Colour::Blue, Colour::Green] {
            assert!(
                states.iter().any(|(c, e)| *c == colour && !e),
                "the last {colour} instance is never ejected: {states:?}"
            );
        }
    }
    let text = gw.control.metrics().encode();
    assert!(!text.contains("cellgate_failovers_total{"), "{text}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_bounds_upstream_attempts() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("budget");
    let (gw, rules) = start(&topo, &dir, |cfg| {
        cfg.retry_budget_percent = 0;
        cfg.retry_min_per_s = 1;
        cfg.eject_5xx_streak = 1_000;
    })
    .await;
    // Every instance of cell-a drops the connection after reading the request.
    for b in topo.of("cell-a") {
        b.mode.store(RESET, Ordering::SeqCst);
    }
    let client = client();
    let user = user_in(&rules, "cell-a", Colour::Blue);
    let requests = 100;
    for _ in 0..requests {
        let r = get_user(&client, gw.proxy_addr, &user).await.unwrap();
        assert_eq!(r.status, 502);
    }
    let attempts: usize = topo
        .of("cell-a")
        .map(|b| b.requests.load(Ordering::SeqCst))
        .sum();
    // Without a budget: 3 attempts each (300). With it: one each, plus the
    // reserve of min-per-second x 10 s.
    assert!(
        attempts <= requests + 12,
        "{attempts} upstream attempts for {requests} requests"
    );
    let text = gw.control.metrics().encode();
    let denied = text
        .lines()
        .find(|l| l.starts_with("cellgate_retries_denied_total "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(denied > 50.0, "{text}");
    gw.shutdown().await;
}
