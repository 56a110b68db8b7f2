//! Test helpers shared by the workspace's integration tests: real
//! backend servers on loopback ports standing in for cell instances, a
//! rules file written for them, temporary directories, an HTTP client,
//! wait loops and a Prometheus text parser. (The etcd launcher is
//! `routing_rules::etcd::testing`.)

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How a backend answers.
pub const NORMAL: u8 = 0;
/// Answer 500.
pub const FAIL_500: u8 = 1;
/// Close the connection without answering (after reading the request).
pub const RESET: u8 = 2;
/// Answer 421 Misdirected (this user's data is not here).
pub const MISDIRECTED: u8 = 3;
/// Frozen (a SIGSTOPped process): nothing is answered, health checks
/// included, until the mode changes; then it answers as `NORMAL`.
pub const FROZEN: u8 = 4;

/// Waits while `mode` is [`FROZEN`] (the backend's model of a stopped
/// process; polled, as a stopped process has no events to give).
async fn thawed(mode: &AtomicU8) {
    while mode.load(Ordering::Relaxed) == FROZEN {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A real HTTP backend standing in for one instance of a (cell, colour).
pub struct Backend {
    /// The cell it stands in for.
    pub cell: String,
    /// Its colour.
    pub colour: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Added to every answer, ms.
    pub delay_ms: Arc<AtomicU64>,
    /// How it answers ([`NORMAL`], [`FAIL_500`], [`RESET`], [`MISDIRECTED`],
    /// [`FROZEN`]).
    pub mode: Arc<AtomicU8>,
    /// Requests served (health checks not counted).
    pub requests: Arc<AtomicUsize>,
    /// When > 0, `GET /big` answers a body of this many bytes.
    pub body_size: Arc<AtomicU64>,
    /// When n > 0, every n-th request is answered 500 (a release that
    /// fails some requests).
    pub fail_every: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
}

impl Backend {
    /// Starts one on a free loopback port.
    pub async fn start(cell: &str, colour: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        Self::serve(cell, colour, listener, addr)
    }

    /// Restarts a stopped backend on the same address.
    pub async fn restart(&self) -> Backend {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        Self::serve(&self.cell, &self.colour, listener, self.addr)
    }

    fn serve(cell: &str, colour: &str, listener: TcpListener, addr: SocketAddr) -> Backend {
        let (stop, stop_rx) = watch::channel(false);
        let delay_ms = Arc::new(AtomicU64::new(0));
        let mode = Arc::new(AtomicU8::new(NORMAL));
        let requests = Arc::new(AtomicUsize::new(0));
        let body_size = Arc::new(AtomicU64::new(0));
        let fail_every = Arc::new(AtomicU64::new(0));
        let b = Backend {
            fail_every: fail_every.clone(),
            body_size: body_size.clone(),
            cell: cell.into(),
            colour: colour.into(),
            addr,
            delay_ms: delay_ms.clone(),
            mode: mode.clone(),
            requests: requests.clone(),
            stop,
        };
        let (cell, colour) = (cell.to_string(), colour.to_string());
        tokio::spawn(async move {
            let mut stop_accept = stop_rx.clone();
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stop_accept.changed() => return,
                };
                let (cell, colour) = (cell.clone(), colour.clone());
                let (delay_ms, mode, requests) = (delay_ms.clone(), mode.clone(), requests.clone());
                let (body_size, fail_every) = (body_size.clone(), fail_every.clone());
                let mut stop_conn = stop_rx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (cell, colour) = (cell.clone(), colour.clone());
                        let (delay_ms, mode, requests) =
                            (delay_ms.clone(), mode.clone(), requests.clone());
                        let big = body_size.load(Ordering::Relaxed) as usize;
                        let every = fail_every.load(Ordering::Relaxed) as usize;
                        async move {
                            thawed(&mode).await;
                            if big > 0 && req.uri().path() == "/big" {
                                requests.fetch_add(1, Ordering::SeqCst);
                                return Ok(Response::new(Full::new(Bytes::from(vec![b'x'; big]))));
                            }
                            if req.uri().path() == "/readyz" {
                                return Ok::<_, std::io::Error>(Response::new(Full::new(
                                    Bytes::from("ok"),
                                )));
                            }
                            let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            if mode.load(Ordering::Relaxed) == RESET {
                                // hyper closes the connection without an answer.
                                return Err(std::io::Error::other("backend reset"));
                            }
                            let d = delay_ms.load(Ordering::Relaxed);
                            if d > 0 {
                                tokio::time::sleep(Duration::from_millis(d)).await;
                            }
                            let h = |n: &str| {
                                parts
                                    .headers
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_string)
                            };
                            let echo = json!({
                                "cell": cell, "colour": colour,
                                "method": parts.method.as_str(), "path": parts.uri.to_string(),
                                "stamp_slot": h("x-cellgate-slot"), "stamp_cell": h("x-cellgate-cell"),
                                "stamp_home": h("x-cellgate-home"), "stamp_colour": h("x-cellgate-colour"),
                                "stamp_rev": h("x-cellgate-rev"), "stamp_epoch": h("x-cellgate-epoch"),
                                "xff": h("x-forwarded-for"),
                                "request_id": h("x-request-id"), "connection": h("connection"),
                                "x_custom_hop": h("x-custom-hop"), "body_len": body.len(),
                            });
                            let mut resp = Response::new(Full::new(Bytes::from(echo.to_string())));
                            resp.headers_mut().insert("x-cell", cell.parse().unwrap());
                            resp.headers_mut()
                                .insert("x-colour", colour.parse().unwrap());
                            match mode.load(Ordering::Relaxed) {
                                _ if every > 0 && n % every == 0 => {
                                    *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR
                                }
                                FAIL_500 => *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
                                MISDIRECTED => *resp.status_mut() = StatusCode::MISDIRECTED_REQUEST,
                                _ => {}
                            }
                            Ok(resp)
                        }
                    });
                    let io = TokioIo::new(stream);
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = &mut conn => {}
                        _ = stop_conn.changed() => {}
                    }
                });
            }
        });
        b
    }

    /// Stops the backend: the listener closes and open connections drop.
    pub fn kill(&self) {
        let _ = self.stop.send(true);
    }
}

/// A temporary directory (tempfile), removed on drop; `.0` is its path.
pub struct TempDir(pub PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl TempDir {
    /// A new one, its name starting with `tag`.
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("cellgate-test-{tag}-"))
            .tempdir()
            .unwrap();
        TempDir(dir.path().to_path_buf(), dir)
    }

    /// `name` inside it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

/// Three cells (a, b, c) × two colours with `per_colour` backends each.
pub struct Topology {
    /// Every backend.
    pub backends: Vec<Backend>,
}

impl Topology {
    /// 3 cells x 2 colours x `per_colour` backends.
    pub async fn start(per_colour: usize) -> Topology {
        let mut backends = Vec::new();
        for cell in ["cell-a", "cell-b", "cell-c"] {
            for colour in ["blue", "green"] {
                for _ in 0..per_colour {
                    backends.push(Backend::start(cell, colour).await);
                }
            }
        }
        Topology { backends }
    }

    /// The quoted addresses of a (cell, colour), for a rules document.
    pub fn addrs(&self, cell: &str, colour: &str) -> Vec<String> {
        self.backends
            .iter()
            .filter(|b| b.cell == cell && b.colour == colour)
            .map(|b| format!("\"{}\"", b.addr))
            .collect()
    }

    /// The backends of a cell.
    pub fn of(&self, cell: &str) -> impl Iterator<Item = &Backend> {
        let cell = cell.to_string();
        self.backends.iter().filter(move |b| b.cell == cell)
    }

    /// A rules document over these backends; `green` is each cell's green
    /// share in basis points.
    pub fn rules(&self, green: [u32; 3], extra: &str) -> String {
        let mut s = format!(
            "revision = {}\nslots = 100\n[tester]\nenabled = true\n",
            next_revision()
        );
        let cells = ["cell-a", "cell-b", "cell-c"];
        let failover = [
            r#"["cell-b", "cell-c"]"#,
            r#"["cell-c", "cell-a"]"#,
            r#"["cell-a", "cell-b"]"#,
        ];
        for (i, c) in cells.iter().enumerate() {
            s.push_str(&format!(
                "[cells.{c}]\nfailover = {}\nblue = [{}]\ngreen = [{}]\nsplit = {{ green = {}, seed = {} }}\n",
                failover[i],
                self.addrs(c, "blue").join(", "),
                self.addrs(c, "green").join(", "),
                green[i],
                i + 1
            ));
        }
        s.push_str(extra);
        s.push_str(
            "[[ranges]]\nfrom = 0\nto = 32\ncell = \"cell-a\"\n[[ranges]]\nfrom = 33\nto = 65\ncell = \"cell-b\"\n[[ranges]]\nfrom = 66\nto = 99\ncell = \"cell-c\"\n",
        );
        s
    }
}

/// The next `revision` for a rules document of this test process: every
/// rewritten file moves forward.
pub fn next_revision() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A pooled HTTP/1.1 client.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A new [`HttpClient`].
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http()
}

/// Response status, headers and JSON body (Null when not JSON).
pub struct Reply {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: http::HeaderMap,
    /// Its body as JSON (`Null` when it is not JSON).
    pub json: Value,
}

/// Sends `req`; the answer, read in full.
pub async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Result<Reply, String> {
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        json: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    })
}

/// GET `url` with `headers`.
pub async fn get(
    client: &HttpClient,
    url: String,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(client, b.body(Full::new(Bytes::new())).unwrap()).await
}

/// GET `/v1/accounts/USER` through the gateway `gw` as `user`.
pub async fn get_user(client: &HttpClient, gw: SocketAddr, user: &str) -> Result<Reply, String> {
    get(
        client,
        format!("http://{gw}/v1/accounts/{user}"),
        &[("x-user-id", user)],
    )
    .await
}

/// Polls `f` every 20 ms until it returns true, or panics after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Parses the Prometheus text exposition into `name{labels}` → value.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// A user whose home is `cell` under the topology's rules.
pub fn user_of(rules: &str, cell: &str, skip: usize) -> String {
    users_of(rules, cell, skip + 1).remove(skip)
}

/// The first `n` users (`u0`, `u1`, ...) whose home is `cell` under
/// `rules`.
pub fn users_of(rules: &str, cell: &str, n: usize) -> Vec<String> {
    users_named(rules, cell, n, "u")
}

/// The first `n` users named `PREFIX0`, `PREFIX1`, ... whose home is
/// `cell` under `rules`.
pub fn users_named(rules: &str, cell: &str, n: usize, prefix: &str) -> Vec<String> {
    let t = routing_rules::RoutingTable::compile(routing_rules::parse_rules(rules).unwrap(), 0)
        .unwrap();
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .filter(|u| {
            let d = t
                .route(
                    Some(u.as_bytes()),
                    &Default::default(),
                    &routing_rules::AllHealthy,
                )
                .unwrap();
            t.cell_name(d.home_cell) == cell
        })
        .take(n)
        .collect()
}
