//! A small TCP fault proxy for one link (gateway → instance, primary →
//! standby, agent → etcd): a drill points the link's client at
//! [`FaultProxy::addr`] instead of the real server, then turns faults on
//! and off while traffic flows. Needs no root (unlike `tc` and network
//! namespaces); loopback only.
//!
//! Faults ([`Fault`]): pass; latency added to every chunk in both
//! directions; a blackhole (connections accepted, nothing forwarded —
//! what a partition looks like to a client with no timeout); resets (every
//! open connection aborted with a TCP RST, new ones reset at once).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to the link now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything as it comes.
    Pass,
    /// Forward everything, each chunk delayed by this much.
    Latency(Duration),
    /// Accept and hold connections; forward nothing.
    Blackhole,
    /// Abort every connection with a reset, and every new one at once.
    Reset,
}

/// What the proxy has seen.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Bytes forwarded (both directions).
    pub bytes: AtomicU64,
    /// Connections it reset.
    pub resets: AtomicU64,
}

/// A running proxy; dropping it stops accepting (open connections end when
/// their peers close, or at the next reset).
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    fault: watch::Sender<Fault>,
    counters: Arc<Counters>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `target` (which
    /// must be a loopback address).
    pub async fn start(target: SocketAddr) -> std::io::Result<FaultProxy> {
        if !target.ip().is_loopback() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{target}: the fault proxy only forwards to loopback addresses"),
            ));
        }
        let listener = TcpListener::bind((target.ip(), 0)).await?;
        let addr = listener.local_addr()?;
        let (fault, rx) = watch::channel(Fault::Pass);
        let counters = Arc::new(Counters::default());
        let accept = tokio::spawn(accept_loop(listener, target, rx, counters.clone()));
        Ok(FaultProxy {
            addr,
            target,
            fault,
            counters,
            accept,
        })
    }

    /// Where clients of the link connect instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The real server.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Turns `fault` on (replacing the current one); applies to open
    /// connections at once.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// The fault on now.
    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// What it has seen so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    fault: watch::Receiver<Fault>,
    counters: Arc<Counters>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let (fault, counters) = (fault.clone(), counters.clone());
        tokio::spawn(async move {
            if *fault.borrow() == Fault::Reset {
                reset(&client, &counters);
                return;
            }
            let Ok(server) = TcpStream::connect(target).await else {
                reset(&client, &counters);
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            link(client, server, fault, counters).await;
        });
    }
}

/// Aborts `s` with a reset when it is dropped.
fn reset(s: &TcpStream, counters: &Counters) {
    let _ = s.set_zero_linger();
    counters.resets.fetch_add(1, Ordering::Relaxed);
}

/// Forwards both ways until either side closes or a reset is ordered.
async fn link(
    client: TcpStream,
    server: TcpStream,
    fault: watch::Receiver<Fault>,
    counters: Arc<Counters>,
) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, fault.clone(), counters.clone());
    let down = pump(sr, cw, fault, counters);
    // Each socket closes when both of its halves are dropped: normally
    // after a clean end, with a reset when one was ordered.
    tokio::join!(up, down);
}

/// Aborts both sockets of a pump: a reset when they close (the write half
/// is let go without the FIN a dropped write half would send first).
fn abort(
    from: &tokio::net::tcp::OwnedReadHalf,
    to: tokio::net::tcp::OwnedWriteHalf,
    counters: &Counters,
) {
    let _ = from.as_ref().set_zero_linger();
    let _ = to.as_ref().set_zero_linger();
    to.forget();
    counters.resets.fetch_add(1, Ordering::Relaxed);
}

/// Copies `from` → `to`, applying the fault of the moment to each chunk.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
    counters: Arc<Counters>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => n,
            },
            changed = fault.changed() => {
                if changed.is_err() || *fault.borrow() == Fault::Reset {
                    abort(&from, to, &counters);
                    return;
                }
                continue;
            }
        };
        // This chunk: passed, delayed, or lost in a blackhole.
        let lost = loop {
            let now = *fault.borrow_and_update();
            match now {
                Fault::Pass => break false,
                Fault::Blackhole => break true,
                Fault::Latency(d) => {
                    tokio::select! {
                        _ = tokio::time::sleep(d) => break false,
                        _ = fault.changed() => continue,
                    }
                }
                Fault::Reset => {
                    abort(&from, to, &counters);
                    return;
                }
            }
        };
        if lost {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
}
