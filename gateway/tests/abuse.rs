//! Abusive clients over real sockets: bodiless POSTs, clients that never
//! read, idle HTTP/2 connections. None of them may move a cell, hold its
//! in-flight slots, or be counted against it.

mod support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

async fn metrics(gw: &gateway::RunningGateway) -> std::collections::HashMap<String, f64> {
    let r = get(&client(), format!("http://{}/metrics", gw.admin_addr), &[])
        .await
        .unwrap();
    let _ = r;
    let text = gw.control.metrics().encode();
    parse_metrics(&text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_posts_hold_nothing_and_move_no_cell() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("bodiless");
    let path = dir.0.join("rules.toml");
    let rules = topo.rules([0, 0, 0], "");
    std::fs::write(&path, &rules).unwrap();
    let mut cfg = fast_config(path);
    // A small pool makes the old behaviour (each stalled client holding an
    // upstream connection) show with few connections.
    cfg.max_conns_per_instance = 8;
    cfg.client_body_timeout_ms = 5_000;
    let gw = gateway::start(cfg, prometheus::Registry::new())
        .await
        .unwrap();
    let victim = user_of(&rules, "cell-c", 0);
    // 60 connections announce a body and never send it.
    let mut stalled = Vec::new();
    for _ in 0..60 {
        let mut s = TcpStream::connect(gw.proxy_addr).await.unwrap();
        s.write_all(
            format!(
                "POST /p HTTP/1.1\r\nhost: x\r\nx-user-id: {victim}\r\ncontent-length: 100\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        stalled.push(s);
    }
    // Other users of cell-c are served by cell-c, promptly.
    let client = client();
    for i in 0..20 {
        let user = user_of(&rules, "cell-c", i + 1);
        let t = Instant::now();
        let r = get_user(&client, gw.proxy_addr, &user).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.json);
        assert_eq!(r.json["cell"], "cell-c", "served by its own cell");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
    let m = metrics(&gw).await;
    let failovers: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("cellgate_failovers_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(failovers, 0.0, "no failover");
    let upstream_errors: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("cellgate_upstream_errors_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(upstream_errors, 0.0, "the clients' stall is not the cell's");
    drop(stalled);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturation_is_load_shedding_never_a_failover() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("saturated");
    let path = dir.0.join("rules.toml");
    let rules = topo.rules([0, 0, 0], "");
    std::fs::write(&path, &rules).unwrap();
    let mut cfg = fast_config(path);
    cfg.max_conns_per_instance = 2;
    cfg.connect_timeout_ms = 200;
    let gw = gateway::start(cfg, prometheus::Registry::new())
        .await
        .unwrap();
    // cell-c's blue instance answers slowly: two requests hold both of its
    // connections.
    let slow = topo.of("cell-c").find(|b| b.colour == "blue").unwrap();
    slow.delay_ms
        .store(1_500, std::sync::atomic::Ordering::Relaxed);
    let client = client();
    let mut holders = Vec::new();
    for i in 0..2 {
        let (client, user, gw_addr) = (client.clone(), user_of(&rules, "cell-c", i), gw.proxy_addr);
        holders.push(tokio::spawn(async move {
            get_user(&client, gw_addr, &user).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await; // let them take the connections
    let r = get_user(&client, gw.proxy_addr, &user_of(&rules, "cell-c", 5))
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.json);
    assert_eq!(r.json["error"], "cell_saturated");
    assert_eq!(r.headers["retry-after"], "1");
    for h in holders {
        assert_eq!(h.await.unwrap().unwrap().status, 200);
    }
    let m = metrics(&gw).await;
    assert!(
        !m.keys().any(|k| k.starts_with("cellgate_failovers_total")),
        "{m:?}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_cut_off_and_frees_the_cell() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("noread");
    let path = dir.0.join("rules.toml");
    let rules = topo.rules([0, 0, 0], "");
    std::fs::write(&path, &rules).unwrap();
    let mut cfg = fast_config(path);
    cfg.send_timeout_ms = 300;
    cfg.cell_max_inflight = 2;
    let gw = gateway::start(cfg, prometheus::Registry::new())
        .await
        .unwrap();
    // The backend's answer is big; the clients never read it.
    for b in topo.of("cell-c") {
        b.body_size
            .store(32 << 20, std::sync::atomic::Ordering::Relaxed);
    }
    let user = user_of(&rules, "cell-c", 0);
    let mut readers_that_do_not = Vec::new();
    for http2 in [false, true] {
        let s = TcpStream::connect(gw.proxy_addr).await.unwrap();
        let _ = s.set_nodelay(true);
        readers_that_do_not.push(if http2 {
            no_read_h2(s, &user).await
        } else {
            no_read_h1(s, &user).await
        });
    }
    // Both in-flight slots of cell-c are taken now; the send timeout must
    // free them.
    let client = client();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(
            &client,
            format!("http://{}/small/v1/accounts/{user}", gw.proxy_addr),
            &[("x-user-id", &user)],
        )
        .await
        .unwrap();
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503);
        assert!(
            Instant::now() < deadline,
            "the cell's slots were never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = metrics(&gw).await;
    assert!(
        m.get("cellgate_client_errors_total{kind=\"send_timeout\"}")
            .copied()
            .unwrap_or(0.0)
            >= 1.0,
        "{m:?}"
    );
    drop(readers_that_do_not);
    gw.shutdown().await;
}

async fn no_read_h1(mut s: TcpStream, user: &str) -> TcpStream {
    s.write_all(format!("GET /big HTTP/1.1\r\nhost: x\r\nx-user-id: {user}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    s
}

async fn no_read_h2(s: TcpStream, user: &str) -> TcpStream {
    // HTTP/2 prior knowledge: preface, an empty SETTINGS frame with a
    // small window, and one GET request; then no reads at all.
    let mut s = s;
    let mut out = Vec::new();
    out.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    // SETTINGS: INITIAL_WINDOW_SIZE (0x4) = 65535 (default), no ack needed.
    out.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]);
    // HEADERS (stream 1, END_STREAM | END_HEADERS) with literal fields.
    let mut block = Vec::new();
    for (n, v) in [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/big"),
        (":authority", "x"),
        ("x-user-id", user),
    ] {
        block.push(0x00);
        block.push(n.len() as u8);
        block.extend_from_slice(n.as_bytes());
        block.push(v.len() as u8);
        block.extend_from_slice(v.as_bytes());
    }
    let len = block.len();
    out.extend_from_slice(&[
        (len >> 16) as u8,
        (len >> 8) as u8,
        len as u8,
        0x1,
        0x5,
        0,
        0,
        0,
        1,
    ]);
    out.extend_from_slice(&block);
    s.write_all(&out).await.unwrap();
    // Read only the server's first frames (so its SETTINGS is seen), then stop.
    let mut buf = [0u8; 64];
    let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
    s
}

/// An HTTP/2 client that sends its preface and SETTINGS, then nothing.
async fn idle_h2(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    s
}

/// Reads until the peer closes; true when it did within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("h2idle");
    let path = dir.0.join("rules.toml");
    std::fs::write(&path, topo.rules([0, 0, 0], "")).unwrap();
    let mut cfg = fast_config(path);
    cfg.idle_timeout_ms = 300;
    let gw = gateway::start(cfg, prometheus::Registry::new())
        .await
        .unwrap();
    let mut conns = Vec::new();
    for _ in 0..5 {
        conns.push(idle_h2(gw.proxy_addr).await);
    }
    for c in &mut conns {
        assert!(
            closed_within(c, Duration::from_secs(5)).await,
            "an idle HTTP/2 connection stayed open"
        );
    }
    let m = metrics(&gw).await;
    assert!(
        m.get("cellgate_client_errors_total{kind=\"idle_timeout\"}")
            .copied()
            .unwrap_or(0.0)
            >= 5.0,
        "{m:?}"
    );
    gw.shutdown().await;
}
