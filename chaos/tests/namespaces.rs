//! A drill's network namespaces (root only): a server in a cell's
//! namespace is reached from the drill's own; a partition makes it
//! unreachable (packets dropped: a connect times out, an open connection
//! hangs) and healing it brings it back; removing them leaves nothing.
//! The server is this test binary run again inside the namespace.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use chaos::topology::{is_root, Namespaces};

const LISTEN: &str = "NAMESPACES_TEST_LISTEN";

/// Run again inside a namespace with `NAMESPACES_TEST_LISTEN=ADDR`: an
/// echo server there (a thread per connection, until killed). Otherwise
/// nothing.
#[test]
fn echo_server_child() {
    let Ok(addr) = std::env::var(LISTEN) else {
        return;
    };
    let l = TcpListener::bind(addr).unwrap();
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
}

/// The server, killed when dropped (also when an assertion fails).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve_in(ns: &str, addr: SocketAddr) -> Server {
    Server(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "echo_server_child", "--nocapture"])
            .env(LISTEN, addr.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn echo(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got)?;
    Ok(got)
}

fn connect(addr: SocketAddr, within: Duration) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, within)?;
    s.set_read_timeout(Some(within))?;
    Ok(s)
}

fn netns_names() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned()
}

#[test]
fn a_partition_drops_a_cells_packets_until_it_heals() {
    let cells = vec!["cell-a".to_string(), "cell-b".to_string()];
    if !is_root() {
        let e = Namespaces::create(&cells).unwrap_err().to_string();
        assert!(e.contains("needs root"), "{e}");
        eprintln!("not root: only the error was checked ({e})");
        return;
    }
    let mut ns = Namespaces::create(&cells).unwrap();
    let prefix = ns.of("");
    assert!(netns_names().contains(&ns.of("cell-a")));
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = SocketAddr::new(ns.cell_ip("cell-a"), port);
    assert!(ns.owns(addr.ip()) && !ns.owns("127.0.0.1".parse().unwrap()));
    let server = serve_in(&ns.of("cell-a"), addr);

    // Reached from the drill's namespace once it listens.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut open = loop {
        match connect(addr, Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("the server in the namespace was not reachable: {e}"),
        }
    };
    assert_eq!(echo(&mut open, b"before").unwrap(), b"before");

    // Cut off: the open connection hangs, a new one times out (dropped,
    // not refused).
    ns.cut("cell-a").unwrap();
    assert!(
        echo(&mut open, b"during").is_err(),
        "an open connection went on through a partition"
    );
    let e = connect(addr, Duration::from_millis(500)).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
        ),
        "a connect during a partition was not dropped but {e}"
    );
    // Cutting twice is one partition; healing it once joins it again.
    ns.cut("cell-a").unwrap();
    ns.join("cell-a").unwrap();
    let mut again = connect(addr, Duration::from_secs(2)).unwrap();
    assert_eq!(echo(&mut again, b"after").unwrap(), b"after");
    // Joining a cell that is not cut off changes nothing.
    ns.join("cell-b").unwrap();

    drop(server);
    ns.remove();
    let left = netns_names();
    assert!(!left.contains(&prefix), "namespaces left: {left}");
}
