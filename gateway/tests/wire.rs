//! HTTP/1.1 on the wire, through the lean path and the hyper hand-over:
//! raw client sockets against the gateway and a scripted raw backend, so
//! every byte of framing is under the test's control.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gateway::h1::{BodyDecoder, Framing};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::{fast_config, TempDir};

const BIG: usize = 1 << 20;

/// A backend speaking raw HTTP/1.1; the path picks the response shape.
struct RawBackend {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, String, usize)> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = req.parse(buf) {
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            let path = req.path.unwrap_or("").to_string();
            let mut framing = Framing::Empty;
            for h in req.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    framing = Framing::Length(std::str::from_utf8(h.value).ok()?.parse().ok()?);
                }
                if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    framing = Framing::Chunked;
                }
            }
            buf.drain(..n);
            let mut d = BodyDecoder::new(framing);
            let mut body_len = 0;
            while !d.is_done() {
                let step = d.feed(buf).ok()?;
                if let Some(r) = step.data {
                    body_len += r.len();
                }
                buf.drain(..step.consumed);
                if step.consumed == 0 && !d.is_done() {
                    let mut tmp = [0u8; 65536];
                    let n = s.read(&mut tmp).await.ok()?;
                    if n == 0 {
                        return None;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                }
            }
            return Some((head, path, body_len));
        }
        let mut tmp = [0u8; 65536];
        let n = s.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

impl RawBackend {
    async fn start() -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some((head, path, body_len)) = read_request(&mut s, &mut buf).await {
                        if path != "/readyz" {
                            counter.fetch_add(1, Ordering::SeqCst);
                        }
                        let is_head = head.starts_with("HEAD ");
                        let echo = format!("body_len={body_len}\n{head}");
                        let out: Vec<u8> = match path.as_str() {
                            "/both" => b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
                            "/chunked" => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n".to_vec(),
                            "/until-close" => {
                                let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil-close").await;
                                return;
                            }
                            "/closes-after" => {
                                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                                return;
                            }
                            "/stall-body" => {
                                // Half the body, then silence.
                                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello").await;
                                tokio::time::sleep(Duration::from_secs(30)).await;
                                return;
                            }
                            "/slow" => {
                                tokio::time::sleep(Duration::from_millis(300)).await;
                                b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow".to_vec()
                            }
                            "/hop" => b"HTTP/1.1 200 OK\r\nconnection: x-secret\r\nx-secret: 1\r\nkeep-alive: timeout=5\r\nx-request-id: upstream\r\nx-kept: yes\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                            "/early" => b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal".to_vec(),
                            "/big" => {
                                let mut v = format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n").into_bytes();
                                v.extend(std::iter::repeat_n(b'x', BIG));
                                v
                            }
                            _ if is_head => b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n".to_vec(),
                            _ => format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{echo}", echo.len()).into_bytes(),
                        };
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        RawBackend { addr, requests }
    }
}

fn one_cell_rules(backend: SocketAddr) -> String {
    format!(
        "revision = {}\nslots = 16\n[cells.c1]\nblue = [\"{backend}\"]\ngreen = []\n[[ranges]]\nfrom = 0\nto = 15\ncell = \"c1\"\n",
        support::next_revision()
    )
}

async fn gateway_for(dir: &TempDir, backend: SocketAddr) -> gateway::RunningGateway {
    gateway_with(dir, backend, |_| {}).await
}

/// A gateway over one cell on `backend`, its config adjusted by `tweak`.
async fn gateway_with(
    dir: &TempDir,
    backend: SocketAddr,
    tweak: impl FnOnce(&mut gateway::ServeConfig),
) -> gateway::RunningGateway {
    let path = dir.0.join("rules.toml");
    std::fs::write(&path, one_cell_rules(backend)).unwrap();
    let mut cfg = fast_config(path);
    tweak(&mut cfg);
    gateway::start(cfg, prometheus::Registry::new())
        .await
        .unwrap()
}

/// A raw client connection and what it has read but not yet consumed.
struct Wire {
    c: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    async fn connect(addr: SocketAddr) -> Wire {
        Wire {
            c: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.c.write_all(bytes).await.unwrap();
    }

    /// The next response (head text, decoded body).
    async fn response(&mut self, head_request: bool) -> (String, Vec<u8>) {
        read_response(&mut self.c, &mut self.buf, head_request).await
    }

    async fn closed(&mut self) -> bool {
        closed(&mut self.c).await
    }
}

/// Reads one response from `s`: (status line + headers, body). Handles
/// content-length, chunked (decoded) and close-delimited bodies.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>, head_req: bool) -> (String, Vec<u8>) {
    loop {
        if let Ok(Some(h)) = gateway::h1::parse_response(buf, head_req) {
            let head = String::from_utf8_lossy(&buf[..h.len]).to_string();
            buf.drain(..h.len);
            let mut d = BodyDecoder::new(h.framing);
            let mut body = Vec::new();
            loop {
                while !buf.is_empty() && !d.is_done() {
                    let step = d.feed(buf).unwrap();
                    if let Some(r) = step.data {
                        body.extend_from_slice(&buf[r]);
                    }
                    buf.drain(..step.consumed);
                    if step.consumed == 0 {
                        break;
                    }
                }
                if d.is_done() {
                    return (head, body);
                }
                let mut tmp = [0u8; 65536];
                let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut tmp))
                    .await
                    .expect("response body in time")
                    .unwrap();
                if n == 0 {
                    assert!(d.until_close(), "connection closed mid-body");
                    return (head, body);
                }
                buf.extend_from_slice(&tmp[..n]);
            }
        }
        let mut tmp = [0u8; 65536];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut tmp))
            .await
            .expect("response head in time")
            .unwrap();
        assert!(
            n > 0,
            "connection closed before a response; got {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&tmp[..n]);
    }
}

async fn closed(s: &mut TcpStream) -> bool {
    let mut tmp = [0u8; 16];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_path_framing_keep_alive_and_pipelining() {
    let be = RawBackend::start().await;
    let dir = TempDir::new("wire");
    let gw = gateway_for(&dir, be.addr).await;
    let mut c = Wire::connect(gw.proxy_addr).await;

    // Two pipelined requests in one write come back in order.
    c.send(b"GET /one HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\n\r\nGET /two HTTP/1.1\r\nhost: x\r\nx-user-id: 2\r\n\r\n").await;
    let (h, b) = c.response(false).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    let b = String::from_utf8(b).unwrap();
    assert!(b.contains("GET /one HTTP/1.1"), "{b}");
    assert!(
        b.to_ascii_lowercase().contains("x-cellgate-cell: c1"),
        "{b}"
    );
    assert_eq!(header(&h, "x-request-id").map(str::len), Some(32));
    let (_, b) = c.response(false).await;
    assert!(String::from_utf8(b).unwrap().contains("GET /two"));

    // A chunked response passes through to an HTTP/1.1 client.
    c.send(b"GET /chunked HTTP/1.1\r\nhost: x\r\nx-user-id: 3\r\n\r\n")
        .await;
    let (h, b) = c.response(false).await;
    assert_eq!(header(&h, "transfer-encoding"), Some("chunked"));
    assert_eq!(b, b"hello world");

    // Hop-by-hop response headers (and those named by `connection`) are
    // dropped; the gateway's request id replaces the upstream's.
    c.send(b"GET /hop HTTP/1.1\r\nhost: x\r\nx-user-id: 4\r\nx-request-id: mine-1\r\n\r\n")
        .await;
    let (h, b) = c.response(false).await;
    assert_eq!(b, b"ok");
    assert_eq!(header(&h, "x-secret"), None, "{h}");
    assert_eq!(header(&h, "keep-alive"), None, "{h}");
    assert_eq!(header(&h, "connection"), None, "{h}");
    assert_eq!(header(&h, "x-kept"), Some("yes"));
    assert_eq!(header(&h, "x-request-id"), Some("mine-1"));

    // Several x-forwarded-for headers become one list, the client last.
    c.send(b"GET /xff HTTP/1.1\r\nhost: x\r\nx-user-id: 4\r\nx-forwarded-for: 203.0.113.9\r\nx-forwarded-for: 198.51.100.7, 192.0.2.1\r\n\r\n")
        .await;
    let (_, b) = c.response(false).await;
    let b = String::from_utf8(b).unwrap();
    assert!(
        b.contains("x-forwarded-for: 203.0.113.9, 198.51.100.7, 192.0.2.1, 127.0.0.1\r\n"),
        "{b}"
    );
    assert_eq!(b.matches("x-forwarded-for").count(), 1, "{b}");

    // Interim 1xx responses are not forwarded; the final one is.
    c.send(b"GET /early HTTP/1.1\r\nhost: x\r\nx-user-id: 5\r\n\r\n")
        .await;
    let (h, b) = c.response(false).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert_eq!(b, b"final");

    // HEAD: the length is kept, no body follows, the connection goes on.
    c.send(b"HEAD /x HTTP/1.1\r\nhost: x\r\nx-user-id: 6\r\n\r\n")
        .await;
    let (h, b) = c.response(true).await;
    assert_eq!(header(&h, "content-length"), Some("5"));
    assert!(b.is_empty());

    // A bad key is answered by the gateway and the connection stays usable.
    c.send(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let (h, b) = c.response(false).await;
    assert!(h.starts_with("HTTP/1.1 400"), "{h}");
    assert!(String::from_utf8(b).unwrap().contains("missing_key"));

    // A 1 MiB upload (content-length) and a 1 MiB download, streamed.
    let mut up =
        b"POST /up HTTP/1.1\r\nhost: x\r\nx-user-id: 7\r\ncontent-length: 1048576\r\n\r\n".to_vec();
    up.extend(std::iter::repeat_n(b'y', BIG));
    c.send(&up).await;
    let (_, b) = c.response(false).await;
    assert!(String::from_utf8(b)
        .unwrap()
        .starts_with("body_len=1048576\n"));
    c.send(b"GET /big HTTP/1.1\r\nhost: x\r\nx-user-id: 8\r\n\r\n")
        .await;
    let (_, b) = c.response(false).await;
    assert_eq!(b.len(), BIG);
    assert!(b.iter().all(|&x| x == b'x'));

    // A close-delimited response ends the client connection too.
    c.send(b"GET /until-close HTTP/1.1\r\nhost: x\r\nx-user-id: 9\r\n\r\n")
        .await;
    let (h, b) = c.response(false).await;
    assert_eq!(header(&h, "connection"), Some("close"));
    assert_eq!(b, b"until-close");
    assert!(c.closed().await);

    // `connection: close` from the client is honoured.
    let mut c = Wire::connect(gw.proxy_addr).await;
    c.send(b"GET /a HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\nconnection: close\r\n\r\n")
        .await;
    let (h, _) = c.response(false).await;
    assert_eq!(header(&h, "connection"), Some("close"));
    assert!(c.closed().await);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_clients_get_decoded_bodies_and_keep_alive_on_request() {
    let be = RawBackend::start().await;
    let dir = TempDir::new("wire10");
    let gw = gateway_for(&dir, be.addr).await;

    // Keep-alive asked for: kept, and said so.
    let mut c = Wire::connect(gw.proxy_addr).await;
    c.send(b"GET /a HTTP/1.0\r\nx-user-id: 1\r\nconnection: keep-alive\r\n\r\n")
        .await;
    let (h, b) = c.response(false).await;
    assert_eq!(header(&h, "connection"), Some("keep-alive"));
    // Upstreams always get HTTP/1.1.
    assert!(String::from_utf8(b).unwrap().contains("GET /a HTTP/1.1"));
    // A chunked upstream body is decoded for HTTP/1.0 and delimited by close.
    c.send(b"GET /chunked HTTP/1.0\r\nx-user-id: 1\r\nconnection: keep-alive\r\n\r\n")
        .await;
    let (h, b) = c.response(false).await;
    assert_eq!(header(&h, "transfer-encoding"), None);
    assert_eq!(header(&h, "connection"), Some("close"));
    assert_eq!(b, b"hello world");
    assert!(c.closed().await);

    // No keep-alive asked for: closed after the response.
    let mut c = Wire::connect(gw.proxy_addr).await;
    c.send(b"GET /a HTTP/1.0\r\nx-user-id: 1\r\n\r\n").await;
    c.response(false).await;
    assert!(c.closed().await);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_requests_are_handed_to_hyper() {
    let be = RawBackend::start().await;
    let dir = TempDir::new("wirehyper");
    let gw = gateway_for(&dir, be.addr).await;

    // A chunked request body: forwarded chunked, and the connection keeps
    // serving afterwards.
    let mut c = Wire::connect(gw.proxy_addr).await;
    c.send(b"POST /up HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n").await;
    let (h, b) = c.response(false).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    let b = String::from_utf8(b).unwrap();
    assert!(b.starts_with("body_len=7\n"), "{b}");
    assert!(b.contains("x-cellgate-cell: c1"), "{b}");
    c.send(b"GET /chunked HTTP/1.1\r\nhost: x\r\nx-user-id: 2\r\n\r\n")
        .await;
    let (_, b) = c.response(false).await;
    assert_eq!(b, b"hello world");

    // Expect: 100-continue gets its interim response from hyper.
    let mut c = Wire::connect(gw.proxy_addr).await;
    c.send(b"POST /up HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n").await;
    let mut tmp = [0u8; 256];
    let n = c.c.read(&mut tmp).await.unwrap();
    assert!(
        tmp[..n].starts_with(b"HTTP/1.1 100 Continue"),
        "{:?}",
        String::from_utf8_lossy(&tmp[..n])
    );
    c.buf.extend_from_slice(&tmp[..n]);
    let interim = c.buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    c.buf.drain(..interim);
    c.send(b"hello").await;
    let (h, b) = c.response(false).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert!(String::from_utf8(b).unwrap().starts_with("body_len=5\n"));

    // Content-Length and Transfer-Encoding together (a smuggling attempt):
    // never forwarded with the client's length. Either refused, or sent on
    // chunked as hyper decoded it.
    let mut c = Wire::connect(gw.proxy_addr).await;
    c.send(b"POST /up HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n").await;
    let (h, b) = c.response(false).await;
    if !h.starts_with("HTTP/1.1 400") {
        assert!(h.starts_with("HTTP/1.1 200"), "{h}");
        let b = String::from_utf8(b).unwrap().to_ascii_lowercase();
        assert!(b.starts_with("body_len=3\n"), "{b}");
        assert!(!b.contains("content-length"), "{b}");
        assert!(b.contains("transfer-encoding: chunked"), "{b}");
    }

    // A malformed head gets a 400 from hyper.
    let mut c = Wire::connect(gw.proxy_addr).await;
    c.send(b"GET /x HTTP/1.1\r\nhost: x\r\nbad header\r\n\r\n")
        .await;
    let (h, _) = c.response(false).await;
    assert!(h.starts_with("HTTP/1.1 400"), "{h}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_not_used() {
    let be = RawBackend::start().await;
    let dir = TempDir::new("wirestale");
    let gw = gateway_for(&dir, be.addr).await;
    let mut c = Wire::connect(gw.proxy_addr).await;
    // The backend closes every connection after answering (without saying
    // so); each following request must still be answered.
    for i in 0..20 {
        c.send(
            format!("GET /closes-after HTTP/1.1\r\nhost: x\r\nx-user-id: {i}\r\n\r\n").as_bytes(),
        )
        .await;
        let (h, b) = c.response(false).await;
        assert!(h.starts_with("HTTP/1.1 200"), "request {i}: {h}");
        assert_eq!(b, b"ok");
    }
    assert_eq!(be.requests.load(Ordering::SeqCst), 20);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_routes_each_request_with_the_current_rules() {
    let (a, b) = (RawBackend::start().await, RawBackend::start().await);
    let dir = TempDir::new("wirereload");
    let gw = gateway_for(&dir, a.addr).await;
    let mut c = Wire::connect(gw.proxy_addr).await;
    c.send(b"GET /x HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\n\r\n")
        .await;
    c.response(false).await;
    assert_eq!(a.requests.load(Ordering::SeqCst), 1);

    // The cell moves to another instance while the client connection idles.
    let before = gw.control.current().table.revision();
    std::fs::write(dir.0.join("rules.toml"), one_cell_rules(b.addr)).unwrap();
    support::wait_until("the reload", Duration::from_secs(5), || {
        let rev = gw.control.current().table.revision();
        async move { rev != before }
    })
    .await;
    c.send(b"GET /x HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\n\r\n")
        .await;
    c.response(false).await;
    assert_eq!(
        b.requests.load(Ordering::SeqCst),
        1,
        "routed with the old rules"
    );
    assert_eq!(a.requests.load(Ordering::SeqCst), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_the_clients_fault_and_never_reaches_the_cell() {
    let be = RawBackend::start().await;
    let dir = TempDir::new("wirestall");
    let gw = gateway_with(&dir, be.addr, |cfg| cfg.client_body_timeout_ms = 300).await;
    let mut c = Wire::connect(gw.proxy_addr).await;
    // Half of the announced body, then nothing.
    c.send(b"POST /up HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\ncontent-length: 10\r\n\r\nhello")
        .await;
    let (h, b) = c.response(false).await;
    assert!(h.starts_with("HTTP/1.1 408"), "{h}");
    assert!(String::from_utf8(b)
        .unwrap()
        .contains("client_body_timeout"));
    // The rest of the body was never read: the connection cannot go on.
    assert_eq!(header(&h, "connection"), Some("close"));
    assert!(c.closed().await);
    // The body never started: no upstream connection was held, and nothing
    // is counted against the cell.
    assert_eq!(be.requests.load(Ordering::SeqCst), 0);
    let text = metrics_text(&gw).await;
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("cellgate_upstream_errors_total")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == "cellgate_client_errors_total{kind=\"body_timeout\"} 1"),
        "{text}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_the_request_in_flight_then_closes() {
    let be = RawBackend::start().await;
    let dir = TempDir::new("wiredrain");
    let gw = gateway_for(&dir, be.addr).await;
    let mut c = Wire::connect(gw.proxy_addr).await;
    c.send(b"GET /slow HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\n\r\n")
        .await;
    let requests = be.requests.clone();
    support::wait_until(
        "the request to reach the backend",
        Duration::from_secs(5),
        || {
            let n = requests.load(Ordering::SeqCst);
            async move { n == 1 }
        },
    )
    .await;
    let drain = tokio::spawn(gw.shutdown());
    let (h, b) = c.response(false).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert_eq!(b, b"slow");
    assert_eq!(
        header(&h, "connection"),
        Some("close"),
        "the last response says so"
    );
    assert!(c.closed().await);
    assert!(drain.await.unwrap(), "drained within the deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_headers_on_responses_when_enabled() {
    let be = RawBackend::start().await;
    let dir = TempDir::new("wiredebug");
    let gw = gateway_with(&dir, be.addr, |cfg| cfg.debug_headers = true).await;
    let rev = gw.control.current().table.revision().to_string();
    let mut c = Wire::connect(gw.proxy_addr).await;
    // The lean path, then the hyper path (a chunked request body).
    c.send(b"GET /x HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\n\r\n")
        .await;
    let (lean, _) = c.response(false).await;
    c.send(b"POST /x HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n").await;
    let (hyper, _) = c.response(false).await;
    for h in [&lean, &hyper] {
        assert_eq!(header(h, "x-cellgate-cell"), Some("c1"), "{h}");
        assert_eq!(header(h, "x-cellgate-home"), Some("c1"), "{h}");
        assert_eq!(header(h, "x-cellgate-colour"), Some("blue"), "{h}");
        assert_eq!(header(h, "x-cellgate-rev"), Some(rev.as_str()), "{h}");
        let slot: u32 = header(h, "x-cellgate-slot").unwrap().parse().unwrap();
        assert!(slot < 16);
        assert_eq!(header(h, "x-cellgate-epoch"), Some("1"), "{h}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_stalls_is_cut_off_by_the_request_timeout() {
    let be = RawBackend::start().await;
    let dir = TempDir::new("wirestallbody");
    let gw = gateway_with(&dir, be.addr, |cfg| cfg.request_timeout_ms = 300).await;
    // The lean path, then the hyper path (a chunked request body).
    let requests: [&[u8]; 2] = [
        b"GET /stall-body HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\n\r\n",
        b"POST /stall-body HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
    ];
    for req in requests {
        let mut c = Wire::connect(gw.proxy_addr).await;
        c.send(req).await;
        let started = std::time::Instant::now();
        // Head and the first half arrive; then the connection ends early
        // (the client can tell from the content-length).
        let mut got = Vec::new();
        let mut tmp = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), c.c.read(&mut tmp)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got.extend_from_slice(&tmp[..n]),
                Err(_) => panic!("the stalled body was never cut off"),
            }
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("hello"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    let text = metrics_text(&gw).await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("cellgate_upstream_errors_total")
                && l.contains("kind=\"timeout\"")
                && l.ends_with(" 2")),
        "{text}"
    );
    gw.shutdown().await;
}

/// The admin listener's /metrics text.
async fn metrics_text(gw: &gateway::RunningGateway) -> String {
    let mut c = Wire::connect(gw.admin_addr).await;
    c.send(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let (_, b) = c.response(false).await;
    String::from_utf8(b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cells_internal_api_is_never_forwarded() {
    let dir = TempDir::new("internal");
    let backend = RawBackend::start().await;
    let gw = gateway_for(&dir, backend.addr).await;
    let body = r#"{"transfer_id":"x","from_cell":"cell-z","to":"1","amount":1000000000}"#;
    let paths = [
        "/v1/internal/credits",
        "/v1//internal/credits",
        "/v1/%69nternal/credits",
        "/V1/Internal/credits",
        "/x/../v1/internal/credits",
    ];
    for path in paths {
        let mut c = Wire::connect(gw.proxy_addr).await;
        // Lean path (content-length) and hyper path (chunked) alike.
        c.send(format!("POST {path} HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes()).await;
        let (head, b) = c.response(false).await;
        assert!(head.starts_with("HTTP/1.1 404"), "{path}: {head}");
        assert!(String::from_utf8_lossy(&b).contains("internal API"));
    }
    let mut h = Wire::connect(gw.proxy_addr).await;
    h.send(b"POST /v1/internal/credits HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n").await;
    let (head, _) = h.response(false).await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert_eq!(
        backend.requests.load(Ordering::SeqCst),
        0,
        "nothing reached the cell"
    );
    let text = metrics_text(&gw).await;
    let want = format!(
        "cellgate_rejected_total{{reason=\"internal_path\"}} {}",
        paths.len() + 1
    );
    assert!(text.lines().any(|l| l == want), "{text}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_reloads_are_counted_and_keep_the_running_rules() {
    let dir = TempDir::new("badreload");
    let backend = RawBackend::start().await;
    let gw = gateway_with(&dir, backend.addr, |cfg| cfg.max_rules_bytes = 4096).await;
    let path = dir.0.join("rules.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    let rev = gw.control.current().table.revision();
    assert!(rev > 0, "the document's own revision");
    let errors = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("cellgate_rules_reloads_total{result=\"error\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut seen = errors(&metrics_text(&gw).await);
    let not_bumped = good.replace("slots = 16", "# edited without a new revision\nslots = 16");
    type Act<'a> = Box<dyn Fn() + 'a>;
    let too_large = format!(
        "{}\n{}",
        good.replace(
            &format!("revision = {rev}"),
            &format!("revision = {}", rev + 1)
        ),
        "# padding\n".repeat(500)
    );
    // Each file is replaced atomically, as operators are told to: a reload
    // must never see half of it (the valid head of the oversized file would
    // be a valid, small document).
    let replace = |bytes: &[u8]| {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    let bad_cases: [(&str, Act); 4] = [
        (
            "larger than --max-rules-bytes",
            Box::new(|| replace(too_large.as_bytes())),
        ),
        (
            "same revision, new text",
            Box::new(|| replace(not_bumped.as_bytes())),
        ),
        (
            "not UTF-8",
            Box::new(|| replace(b"revision = 99\n\xff\xfe")),
        ),
        ("deleted", Box::new(|| std::fs::remove_file(&path).unwrap())),
    ];
    for (what, act) in bad_cases {
        act();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let now = errors(&metrics_text(&gw).await);
            if now > seen {
                seen = now;
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: not counted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(gw.control.current().table.revision(), rev, "{what}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_or_unforwardable_requests_are_refused_and_framing_is_the_gateways() {
    let be = RawBackend::start().await;
    let dir = TempDir::new("framing");
    let gw = gateway_for(&dir, be.addr).await;
    // 4. Content-length and chunked from the upstream: chunked only, on
    //    both front ends (hyper via a chunked request body).
    for req in [
        &b"GET /both HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\n\r\n"[..],
        b"POST /both HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\ntransfer-encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
    ] {
        let mut c = Wire::connect(gw.proxy_addr).await;
        c.send(req).await;
        let (h, b) = c.response(false).await;
        assert_eq!(header(&h, "content-length"), None, "{h}");
        assert_eq!(header(&h, "transfer-encoding"), Some("chunked"), "{h}");
        assert_eq!(b, b"hello");
    }
    let seen = be.requests.load(Ordering::SeqCst);
    // 5. A refusal to HEAD has no body: the pipelined next answer parses.
    let mut c = Wire::connect(gw.proxy_addr).await;
    c.send(b"HEAD /x HTTP/1.1\r\nhost: x\r\n\r\nGET /x HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let (h, b) = c.response(true).await;
    assert!(h.starts_with("HTTP/1.1 400"), "{h}");
    assert!(b.is_empty());
    let (h, b) = c.response(false).await;
    assert!(h.starts_with("HTTP/1.1 400"), "{h}");
    assert!(String::from_utf8(b).unwrap().contains("missing_key"));
    // 6-8. Refused and never forwarded.
    let cases: [(&[u8], &str); 9] = [
        (b"POST /x HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\ntransfer-encoding: gzip, chunked\r\n\r\n1\r\na\r\n0\r\n\r\n", "HTTP/1.1 501"),
        (b"CONNECT cell.example:443 HTTP/1.1\r\nhost: cell.example:443\r\nx-user-id: 1\r\n\r\n", "HTTP/1.1 405"),
        (b"GET /x HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\nx_cellgate_cell: c2\r\n\r\n", "HTTP/1.1 400"),
        (b"POST /x HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\ncontent-length: 2\r\nContent_Length: 5\r\n\r\nok", "HTTP/1.1 400"),
        (b"GET /x HTTP/1.1\r\nx-user-id: 1\r\n\r\n", "HTTP/1.1 400"),
        (b"GET /x HTTP/1.1\r\nhost: a\r\nhost: b\r\nx-user-id: 1\r\n\r\n", "HTTP/1.1 400"),
        (b"GET /x HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\nconnection: x-user-id\r\n\r\n", "HTTP/1.1 400"),
        (b"GET /x HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\nconnection: keep-alive, Content-Length\r\n\r\n", "HTTP/1.1 400"),
        (b"GET /x HTTP/1.1\r\nhost: x\r\nx-user-id: 1\r\nx-big: PAD\r\n\r\n", "HTTP/1.1 431"),
    ];
    for (req, want) in cases {
        let req = String::from_utf8_lossy(req).replace("PAD", &"p".repeat(70 * 1024));
        let mut c = Wire::connect(gw.proxy_addr).await;
        c.send(req.as_bytes()).await;
        let (h, _) = c.response(false).await;
        assert!(h.starts_with(want), "{}: {h}", &req[..req.len().min(80)]);
    }
    assert_eq!(
        be.requests.load(Ordering::SeqCst),
        seen,
        "nothing was forwarded"
    );
    gw.shutdown().await;
}
