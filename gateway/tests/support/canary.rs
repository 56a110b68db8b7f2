//! Canary pipelines through real gateways: the shared setup (two gateways
//! following one rules file over real backends), the load, a webhook
//! receiver and a real Prometheus.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use routing_rules::canary::driver::{self, Ending, RunRequest, Where};
use routing_rules::canary::{Event, Hooks, Plan, Thresholds};

use super::*;

pub struct Setup {
    pub topo: Topology,
    pub _dir: TempDir,
    pub rules: PathBuf,
    pub proxies: Vec<std::net::SocketAddr>,
    pub metrics: Vec<String>,
    pub _gateways: Vec<gateway::RunningGateway>,
}

pub async fn setup(tag: &str) -> Setup {
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
pub fn users_of_a(rules: &str, n: usize) -> Vec<String> {
    users_of(rules, "cell-a", n)
}

/// Clients through both gateways, every user in turn, until `stop` (at
/// most 60 s).
pub fn load(s: &Setup, stop: &Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<()>> {
    let users = users_of_a(&std::fs::read_to_string(&s.rules).unwrap(), 2000);
    load_through(&s.proxies, users, stop)
}

pub fn load_through(
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

/// The tests' plan: `steps`, each held 1 s, judged every 250 ms on at
/// least 100 requests a colour.
pub fn plan(steps: &str) -> Plan {
    Plan {
        steps: Plan::parse_steps(steps).unwrap(),
        hold_ms: 1000,
        interval_ms: 250,
        thresholds: Thresholds {
            min_requests: 100,
            ..Thresholds::default()
        },
        max_wait_ms: 20_000,
    }
}

pub fn request(s: &Setup, steps: &str, hooks: Hooks) -> RunRequest {
    RunRequest {
        place: Where::file(&s.rules),
        cell: "cell-a".into(),
        plan: plan(steps),
        metrics: s.metrics.clone(),
        prometheus: None,
        hooks,
    }
}

/// Where a pipeline's events are kept, and the emitter that keeps them.
pub fn recorder() -> (Arc<Mutex<Vec<Event>>>, impl FnMut(&Event) + Send + Sync) {
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let keep = events.clone();
    (events, move |e: &Event| {
        keep.lock().unwrap().push(e.clone())
    })
}

/// Runs a pipeline under load; how it ended and its events.
pub async fn canary(s: &Setup, steps: &str, hooks: Hooks) -> (Ending, Vec<Event>) {
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(s, &stop);
    let (events, mut emit) = recorder();
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
pub struct HookServer {
    pub addr: std::net::SocketAddr,
    pub got: Arc<Mutex<Vec<(String, serde_json::Value)>>>,
}

impl HookServer {
    pub async fn start(refusals: usize) -> HookServer {
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

    pub fn url(&self, path: &str) -> Option<String> {
        Some(format!("http://{}{path}", self.addr))
    }

    pub fn events(&self, path: &str) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, v)| v["event"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

pub fn green_share(s: &Setup) -> u32 {
    routing_rules::parse_rules(&std::fs::read_to_string(&s.rules).unwrap())
        .unwrap()
        .cells["cell-a"]
        .split
        .green
}

pub async fn recorded(s: &Setup) -> routing_rules::canary::Pipeline {
    driver::status(&Where::file(&s.rules), "cell-a")
        .await
        .unwrap()
}

pub fn aborted_within_a_second(events: &[Event]) {
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

/// A real Prometheus (Debian's `prometheus`, installed for promtool)
/// scraping both gateways every 500 ms, on a free loopback port; killed on
/// drop.
pub struct Prometheus {
    pub child: std::process::Child,
    pub url: String,
    pub _dir: TempDir,
}

impl Prometheus {
    pub async fn start(targets: &[String]) -> Prometheus {
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
