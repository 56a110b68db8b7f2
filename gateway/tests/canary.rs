//! Canary pipelines through real gateways: two gateways follow one rules
//! file, real backends stand in for a cell's blue and green releases, a
//! load of many users runs through the gateways, and the pipeline
//! (`routing_rules::canary::driver`, what `cellctl canary run` drives)
//! steps cell-a's green share, judging from the gateways' own /metrics.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use routing_rules::canary::driver::{self, Ending, RunRequest, Where};
use routing_rules::canary::{Event, Hooks, Plan, Status, Thresholds, Verdict};
use support::*;

struct Setup {
    topo: Topology,
    _dir: TempDir,
    rules: PathBuf,
    proxies: Vec<std::net::SocketAddr>,
    metrics: Vec<String>,
    _gateways: Vec<gateway::RunningGateway>,
}

async fn setup(tag: &str) -> Setup {
    let topo = Topology::start(1).await;
    let dir = TempDir::new(tag);
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, topo.rules([0, 0, 0], "")).unwrap();
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let cfg = fast_config(rules.clone());
        gateways.push(
            gateway::start(cfg, prometheus::Registry::new())
                .await
                .unwrap(),
        );
    }
    Setup {
        proxies: gateways.iter().map(|g| g.proxy_addr).collect(),
        metrics: gateways
            .iter()
            .map(|g| format!("http://{}/metrics", g.admin_addr))
            .collect(),
        topo,
        _dir: dir,
        rules,
        _gateways: gateways,
    }
}

/// Users whose home is cell-a.
fn users_of_a(rules: &str, n: usize) -> Vec<String> {
    let t = routing_rules::RoutingTable::compile(routing_rules::parse_rules(rules).unwrap(), 0)
        .unwrap();
    (0..)
        .map(|i| format!("user-{i}"))
        .filter(|u| {
            let d = t
                .route(
                    Some(u.as_bytes()),
                    &Default::default(),
                    &routing_rules::AllHealthy,
                )
                .unwrap();
            t.cell_name(d.home_cell) == "cell-a"
        })
        .take(n)
        .collect()
}

/// Clients through both gateways, every user in turn, until `stop` (at
/// most 60 s).
fn load(s: &Setup, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    let users = users_of_a(&std::fs::read_to_string(&s.rules).unwrap(), 2000);
    load_through(&s.proxies, users, stop)
}

fn load_through(
    proxies: &[std::net::SocketAddr],
    users: Vec<String>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let users = Arc::new(users);
    (0..16)
        .map(|i| {
            let (users, stop, proxies) = (users.clone(), stop.clone(), proxies.to_vec());
            tokio::spawn(async move {
                let client = client();
                let t0 = Instant::now();
                let mut n = i;
                while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
                    let proxy = proxies[n % proxies.len()];
                    let _ = get_user(&client, proxy, &users[n % users.len()]).await;
                    n += 16;
                }
            })
        })
        .collect()
}

fn request(s: &Setup, steps: &str, hooks: Hooks) -> RunRequest {
    RunRequest {
        place: Where::file(&s.rules),
        cell: "cell-a".into(),
        plan: Plan {
            steps: Plan::parse_steps(steps).unwrap(),
            hold_ms: 1000,
            interval_ms: 250,
            thresholds: Thresholds {
                min_requests: 100,
                ..Thresholds::default()
            },
            max_wait_ms: 20_000,
        },
        metrics: s.metrics.clone(),
        prometheus: None,
        hooks,
    }
}

/// Runs a pipeline under load; how it ended and its events.
async fn canary(s: &Setup, steps: &str, hooks: Hooks) -> (Ending, Vec<Event>) {
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(s, &stop);
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut emit = {
        let events = events.clone();
        move |e: &Event| events.lock().unwrap().push(e.clone())
    };
    let ending = driver::run(request(s, steps, hooks), &mut emit)
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let events = events.lock().unwrap().clone();
    (ending, events)
}

/// A webhook receiver on loopback: records every POST (path, JSON body);
/// `/gate` answers 503 to its first `refusals` calls, then 200.
struct HookServer {
    addr: std::net::SocketAddr,
    got: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
}

impl HookServer {
    async fn start(refusals: usize) -> HookServer {
        use http_body_util::BodyExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
        let seen = got.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let seen = seen.clone();
                            async move {
                                let path = req.uri().path().to_string();
                                let body = req.into_body().collect().await.unwrap().to_bytes();
                                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                                let gates = {
                                    let mut g = seen.lock().unwrap();
                                    g.push((path.clone(), v));
                                    g.iter().filter(|(p, _)| p == "/gate").count()
                                };
                                let status = if path == "/gate" && gates <= refusals {
                                    503
                                } else {
                                    200
                                };
                                let mut resp = http::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::new(),
                                ));
                                *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        HookServer { addr, got }
    }

    fn url(&self, path: &str) -> Option<String> {
        Some(format!("http://{}{path}", self.addr))
    }

    fn events(&self, path: &str) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, v)| v["event"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

fn green_share(s: &Setup) -> u32 {
    routing_rules::parse_rules(&std::fs::read_to_string(&s.rules).unwrap())
        .unwrap()
        .cells["cell-a"]
        .split
        .green
}

async fn recorded(s: &Setup) -> routing_rules::canary::Pipeline {
    driver::status(&Where::file(&s.rules), "cell-a")
        .await
        .unwrap()
}

fn aborted_within_a_second(events: &[Event]) {
    let ms = events.iter().find_map(|e| match e {
        Event::Aborted { propagation_ms, .. } => Some(*propagation_ms),
        _ => None,
    });
    let ms = ms
        .expect("an abort event")
        .expect("its propagation measured");
    eprintln!("abort reached every gateway after {ms} ms");
    assert!(ms < 1000, "green 0 % reached every gateway after {ms} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_green_failing_five_percent_is_aborted_at_the_first_step() {
    let s = setup("canary-errors").await;
    for b in s.topo.of("cell-a").filter(|b| b.colour == "green") {
        b.fail_every.store(20, Ordering::Relaxed);
    }
    let (ending, events) = canary(&s, "10,50,100", Hooks::default()).await;
    let Ending::Aborted(why) = ending else {
        panic!("promoted: {events:#?}");
    };
    assert!(
        why.contains("error ratio") && why.contains("green 10%"),
        "{why}"
    );
    assert!(
        !events.iter().any(|e| matches!(e, Event::Passed { .. })),
        "no step passed"
    );
    let failed = events
        .iter()
        .find_map(|e| match e {
            Event::Judged { judgement, .. } if judgement.verdict == Verdict::Failed => {
                Some(judgement.clone())
            }
            _ => None,
        })
        .unwrap();
    assert!(failed.green.error_ratio > 0.03, "{failed:?}");
    assert_eq!(failed.blue.errors, 0, "{failed:?}");
    assert_eq!(green_share(&s), 0);
    aborted_within_a_second(&events);
    assert_eq!(recorded(&s).await.status, Status::Aborted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_green_30ms_slower_is_aborted_on_latency() {
    let s = setup("canary-latency").await;
    for b in s.topo.of("cell-a").filter(|b| b.colour == "green") {
        b.delay_ms.store(30, Ordering::Relaxed);
    }
    let (ending, events) = canary(&s, "10,50,100", Hooks::default()).await;
    let Ending::Aborted(why) = ending else {
        panic!("promoted: {events:#?}");
    };
    assert!(why.contains("p99"), "{why}");
    assert_eq!(green_share(&s), 0);
    aborted_within_a_second(&events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_green_is_promoted_through_every_step() {
    let s = setup("canary-healthy").await;
    let (ending, events) = canary(&s, "10,50,100", Hooks::default()).await;
    assert_eq!(ending, Ending::Promoted, "{events:#?}");
    assert_eq!(green_share(&s), 10_000);
    let p = recorded(&s).await;
    assert_eq!((p.status, p.lease), (Status::Promoted, None));
    // Each step's requests split as its share says (2000 users: within
    // 5 points; the 100k-user bound of one point is the exposure test's).
    for (share, want) in [("10%", 0.10), ("50%", 0.50)] {
        let step = events
            .iter()
            .position(|e| matches!(e, Event::StepStarted { green, .. } if green == share))
            .unwrap();
        // The step's last judgement: its whole window.
        let j = events[step..]
            .iter()
            .take_while(|e| !matches!(e, Event::Passed { .. }))
            .filter_map(|e| match e {
                Event::Judged { judgement, .. } => Some(judgement.clone()),
                _ => None,
            })
            .last()
            .unwrap();
        assert_eq!(j.verdict, Verdict::Healthy, "{j:?}");
        let got = j.green.requests as f64 / (j.green.requests + j.blue.requests) as f64;
        assert!(
            (got - want).abs() < 0.05,
            "step {share}: green took {got:.3}"
        );
    }
    assert!(matches!(events.last(), Some(Event::Finished { green, .. }) if green == "100%"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_hear_every_step_and_a_refusing_gate_holds_the_step() {
    let s = setup("canary-hooks").await;
    let hooks = HookServer::start(2).await;
    let (ending, events) = canary(
        &s,
        "10,100",
        Hooks {
            on_step: hooks.url("/step"),
            on_abort: hooks.url("/abort"),
            gate: hooks.url("/gate"),
        },
    )
    .await;
    assert_eq!(ending, Ending::Promoted, "{events:#?}");
    // The gate said no twice: the first step waited, then went on.
    let gated = events
        .iter()
        .filter(|e| matches!(e, Event::Gated { .. }))
        .count();
    assert_eq!(gated, 2, "{events:#?}");
    assert_eq!(
        hooks.events("/gate").len(),
        4,
        "asked twice in vain, then once per step"
    );
    assert_eq!(
        hooks.events("/step"),
        ["step_started", "passed", "step_started", "passed"]
    );
    assert!(hooks.events("/abort").is_empty());

    // A failing green: the abort hook hears the abort, with its reason.
    for b in s.topo.of("cell-a").filter(|b| b.colour == "green") {
        b.fail_every.store(10, Ordering::Relaxed);
    }
    routing_rules::switchover::edit_rules_file(&s.rules, |t| {
        Ok(routing_rules::edit::set_split(t, "cell-a", 0)?)
    })
    .unwrap();
    let abort = HookServer::start(0).await;
    let (ending, _) = canary(
        &s,
        "10,100",
        Hooks {
            on_abort: abort.url("/abort"),
            ..Hooks::default()
        },
    )
    .await;
    assert!(matches!(ending, Ending::Aborted(_)));
    let got = abort.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1["event"], "aborted");
    assert!(
        got[0].1["reason"].as_str().unwrap().contains("error ratio"),
        "{got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pipeline_is_shown_refuses_a_second_run_and_resumes() {
    let s = setup("canary-resume").await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(&s, &stop);
    // The first driver passes its first step, then dies (its task is
    // dropped mid-step: no cleanup, as with kill -9).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let req = request(&s, "10,50,100", Hooks::default());
    let first = tokio::spawn(async move {
        let mut emit = move |e: &Event| {
            let _ = tx.send(e.clone());
        };
        driver::run(req, &mut emit).await
    });
    while let Some(e) = rx.recv().await {
        if matches!(e, Event::Passed { .. }) {
            break;
        }
    }
    first.abort();
    let _ = first.await;
    // Its lease is still live: a second run is refused, nothing changes.
    let before = std::fs::read_to_string(&s.rules).unwrap();
    let mut ignore = |_: &Event| {};
    let e = driver::run(request(&s, "10,100", Hooks::default()), &mut ignore)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already running"), "{e}");
    assert_eq!(std::fs::read_to_string(&s.rules).unwrap(), before);
    let p = recorded(&s).await;
    assert_eq!((p.status, p.step), (Status::Running, 1));
    // The lease runs out; status tells, resume finishes it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while recorded(&s)
        .await
        .leased(routing_rules::canary::store::now_ms())
    {
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let summary = recorded(&s)
        .await
        .summary(routing_rules::canary::store::now_ms());
    assert!(summary.contains("resume cell-a"), "{summary}");
    let ended = driver::resume(&Where::file(&s.rules), "cell-a", &mut ignore)
        .await
        .unwrap();
    assert_eq!(ended, Some(Ending::Promoted));
    assert_eq!(green_share(&s), 10_000);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
}

/// A real Prometheus (Debian's `prometheus`, installed for promtool)
/// scraping both gateways every 500 ms, on a free loopback port; killed on
/// drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: TempDir,
}

impl Prometheus {
    async fn start(targets: &[String]) -> Prometheus {
        let dir = TempDir::new("canary-prometheus");
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 500ms\n  evaluation_interval: 500ms\nscrape_configs:\n  - job_name: gateways\n    static_configs:\n      - targets: [{}]\n",
                targets
                    .iter()
                    .map(|t| format!("'{t}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus (Debian package `prometheus`)");
        let url = format!("http://127.0.0.1:{port}");
        let client = client();
        wait_until("prometheus ready", Duration::from_secs(30), || {
            let (client, ready) = (client.clone(), format!("{url}/-/ready"));
            async move {
                get(&client, ready, &[])
                    .await
                    .is_ok_and(|r| r.status == 200)
            }
        })
        .await;
        Prometheus {
            child,
            url,
            _dir: dir,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With `--prometheus`: the gateways' series read from a real Prometheus
/// server's federation endpoint (every gateway summed) instead of the
/// gateways themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn judged_from_a_prometheus_server_a_failing_green_is_aborted() {
    let s = setup("canary-prom").await;
    let targets: Vec<String> = s
        .metrics
        .iter()
        .map(|m| {
            m.trim_start_matches("http://")
                .trim_end_matches("/metrics")
                .to_string()
        })
        .collect();
    let prom = Prometheus::start(&targets).await;
    for b in s.topo.of("cell-a").filter(|b| b.colour == "green") {
        b.fail_every.store(20, Ordering::Relaxed);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(&s, &stop);
    let mut req = request(&s, "10,100", Hooks::default());
    req.metrics = vec![];
    req.prometheus = Some(prom.url.clone());
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut emit = {
        let events = events.clone();
        move |e: &Event| events.lock().unwrap().push(e.clone())
    };
    let ending = driver::run(req, &mut emit).await.unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let events = events.lock().unwrap().clone();
    let Ending::Aborted(why) = ending else {
        panic!("promoted: {events:#?}");
    };
    assert!(why.contains("error ratio"), "{why}");
    // The judge saw both colours' series through the federation endpoint.
    let judged = events
        .iter()
        .find_map(|e| match e {
            Event::Judged { judgement, .. } => Some(judgement.clone()),
            _ => None,
        })
        .unwrap();
    assert!(
        judged.blue.requests > 0 && judged.green.requests > 0,
        "{judged:?}"
    );
    assert_eq!(green_share(&s), 0);
}

/// With the rules in etcd: the pipeline finds the gateways by their
/// registrations, edits the rules by compare-and-swap and keeps its state
/// in etcd; `abort` rolls green back there.
#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_the_registered_gateways_are_judged_and_the_state_lives_in_etcd() {
    use routing_rules::etcd::testing::EtcdServer;
    use routing_rules::etcd::ControlPlane;
    let topo = Topology::start(1).await;
    let etcd = EtcdServer::start();
    let mut cp = ControlPlane::connect(std::slice::from_ref(&etcd.url), "gw-test")
        .await
        .unwrap();
    let text = topo.rules([0, 0, 0], "");
    cp.apply(&text, 0, "test", "v1").await.unwrap();
    let dirs = [TempDir::new("canary-etcd-1"), TempDir::new("canary-etcd-2")];
    let mut gateways = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        gateways.push(
            gateway::start(
                etcd_config(&etcd, &d.0, &format!("g{i}")),
                prometheus::Registry::new(),
            )
            .await
            .unwrap(),
        );
    }
    let place = Where {
        rules: None,
        etcd: Some(routing_rules::switchover::EtcdTarget {
            endpoints: vec![etcd.url.clone()],
            cluster: "gw-test".into(),
        }),
    };
    // Both gateways registered (with their admin addresses).
    wait_until("two gateways registered", Duration::from_secs(10), || {
        let url = etcd.url.clone();
        async move {
            let mut cp = ControlPlane::connect(&[url], "gw-test").await.unwrap();
            cp.status().await.unwrap().gateways.len() == 2
        }
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let proxies: Vec<_> = gateways.iter().map(|g| g.proxy_addr).collect();
    let clients = load_through(&proxies, users_of_a(&text, 2000), &stop);
    let mut req = RunRequest {
        place: place.clone(),
        cell: "cell-a".into(),
        plan: Plan {
            steps: Plan::parse_steps("10,100").unwrap(),
            hold_ms: 1000,
            interval_ms: 250,
            thresholds: Thresholds {
                min_requests: 100,
                ..Thresholds::default()
            },
            max_wait_ms: 20_000,
        },
        metrics: vec![],
        prometheus: None,
        hooks: Hooks::default(),
    };
    let events = Arc::new(Mutex::new(Vec::new()));
    let mut emit = {
        let events = events.clone();
        move |e: &Event| events.lock().unwrap().push(e.clone())
    };
    let ending = driver::run(req.clone(), &mut emit).await.unwrap();
    let events = events.lock().unwrap().clone();
    assert_eq!(ending, Ending::Promoted, "{events:#?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Propagated { gateways: 2, .. })),
        "both registered gateways were read: {events:#?}"
    );
    let stored = cp.get().await.unwrap().unwrap();
    let green = |doc: &str| {
        routing_rules::parse_rules(doc).unwrap().cells["cell-a"]
            .split
            .green
    };
    assert_eq!(green(&stored.document), 10_000);
    let p = driver::status(&place, "cell-a").await.unwrap();
    assert_eq!(p.status, Status::Promoted);
    // The history says who moved the share.
    let history = cp.history().await.unwrap();
    assert!(history
        .iter()
        .any(|h| h.message == "canary: cell cell-a green 10%"));
    // Abort through etcd: green 0 % at once, seen by both gateways.
    let (revision, ms) = driver::abort(&place, "cell-a", "test").await.unwrap();
    assert_eq!(revision, Some(stored.revision + 1));
    assert!(ms.is_some_and(|ms| ms < 1000), "{ms:?}");
    assert_eq!(green(&cp.get().await.unwrap().unwrap().document), 0);
    assert_eq!(
        driver::status(&place, "cell-a").await.unwrap().status,
        Status::Aborted
    );
    // A bad plan against etcd changes nothing either.
    req.cell = "nope".into();
    let before = cp.get().await.unwrap().unwrap().revision;
    let mut ignore = |_: &Event| {};
    assert!(driver::run(req, &mut ignore).await.is_err());
    assert_eq!(cp.get().await.unwrap().unwrap().revision, before);
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
}

/// The figures of docs/benchmarks.md ("Canary abort propagation"): how
/// long after the rules file is written with green 0 % every one of two
/// gateways (the default `--reload-interval-ms 200`) runs it, over 50
/// aborts. `cargo test --release -p gateway --test canary -- --ignored
/// --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run by hand for docs/benchmarks.md"]
async fn abort_propagation_figures() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("canary-propagation");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, topo.rules([0, 0, 0], "")).unwrap();
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let mut cfg = fast_config(rules.clone());
        cfg.reload_interval_ms = 200;
        gateways.push(
            gateway::start(cfg, prometheus::Registry::new())
                .await
                .unwrap(),
        );
    }
    let metrics: Vec<String> = gateways
        .iter()
        .map(|g| format!("http://{}/metrics", g.admin_addr))
        .collect();
    let sources = routing_rules::canary::sources::Sources::new("cell-a", &metrics, None).unwrap();
    let mut ms = Vec::new();
    for i in 0..100 {
        let share = if i % 2 == 0 { 500 } else { 0 };
        let t0 = Instant::now();
        let rev = routing_rules::switchover::edit_rules_file(&rules, |t| {
            Ok(routing_rules::edit::set_split(t, "cell-a", share)?)
        })
        .unwrap()
        .unwrap();
        loop {
            if sources.read().await.unwrap().revision >= Some(rev) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if share == 0 {
            ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        // Not in step with the gateways' polling.
        tokio::time::sleep(Duration::from_millis(37 + (i * 13 % 97) as u64)).await;
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).min(ms.len()) - 1];
    println!(
        "abort → every gateway runs green 0 %: n={} p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        ms.len(),
        at(0.5),
        at(0.99),
        ms[ms.len() - 1]
    );
    assert!(at(0.99) < 1000.0);
}
