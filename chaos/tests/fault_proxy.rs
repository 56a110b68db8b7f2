//! The fault proxy over real loopback sockets: an echo server behind it,
//! a client in front; each fault changes what the client sees, at once,
//! on connections already open.

use std::time::{Duration, Instant};

use chaos::fault_proxy::{Fault, FaultProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn echo_server() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Sends `msg`, waits up to `within` for its echo.
async fn round_trip(s: &mut TcpStream, msg: &[u8], within: Duration) -> Result<Vec<u8>, String> {
    s.write_all(msg).await.map_err(|e| e.to_string())?;
    let mut got = vec![0u8; msg.len()];
    match tokio::time::timeout(within, s.read_exact(&mut got)).await {
        Ok(Ok(_)) => Ok(got),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_fault_changes_the_link_at_once() {
    let proxy = FaultProxy::start(echo_server().await).await.unwrap();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    let second = Duration::from_secs(1);
    assert_eq!(round_trip(&mut c, b"ping", second).await.unwrap(), b"ping");

    // Latency: both directions delayed.
    proxy.set(Fault::Latency(Duration::from_millis(150)));
    let t = Instant::now();
    assert_eq!(round_trip(&mut c, b"slow", second).await.unwrap(), b"slow");
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );

    // Blackhole: nothing comes back, the connection stays open; what was
    // sent meanwhile is lost.
    proxy.set(Fault::Blackhole);
    assert_eq!(
        round_trip(&mut c, b"lost", Duration::from_millis(300)).await,
        Err("no answer".to_string())
    );
    proxy.set(Fault::Pass);
    assert_eq!(round_trip(&mut c, b"back", second).await.unwrap(), b"back");

    // Reset: the open connection is aborted, new ones are refused.
    proxy.set(Fault::Reset);
    let mut buf = [0u8; 4];
    let r = tokio::time::timeout(second, c.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    // A new connection is reset as soon as it is accepted (the connect
    // itself may already see it).
    if let Ok(mut fresh) = TcpStream::connect(proxy.addr()).await {
        assert!(round_trip(&mut fresh, b"x", second).await.is_err());
    }
    assert!(
        proxy
            .counters()
            .resets
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );

    proxy.set(Fault::Pass);
    let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut again, b"ok", second).await.unwrap(), b"ok");
    assert!(
        proxy
            .counters()
            .bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 16
    );
}

#[tokio::test]
async fn only_loopback_targets() {
    let err = FaultProxy::start("10.1.2.3:80".parse().unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
}
