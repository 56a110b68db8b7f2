//! A real etcd server for tests: Debian's `etcd` on free loopback ports
//! with a temporary data dir, killed (and the dir removed) on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) test etcd.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    /// Client URL, `http://127.0.0.1:PORT`.
    pub url: String,
    client_port: u16,
    peer_port: u16,
    dir: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

impl EtcdServer {
    /// Starts etcd on free ports and waits until it answers `/health`. A
    /// port picked free can be taken by another process before etcd binds
    /// it (tests run in parallel): then etcd exits and it starts again on
    /// other ports.
    pub fn start() -> EtcdServer {
        for _ in 0..4 {
            let mut e = EtcdServer::unstarted();
            if e.spawn_and_wait() {
                return e;
            }
        }
        panic!("etcd did not start on free loopback ports in 4 tries");
    }

    fn unstarted() -> EtcdServer {
        let dir = std::env::temp_dir().join(format!(
            "cellgate-etcd-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let (client_port, peer_port) = (free_port(), free_port());
        EtcdServer {
            child: None,
            url: format!("http://127.0.0.1:{client_port}"),
            client_port,
            peer_port,
            dir,
        }
    }

    /// Stops etcd (SIGKILL); the data dir is kept for [`EtcdServer::restart`].
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)starts etcd on the same ports and data dir and waits until it
    /// answers `/health`.
    pub fn restart(&mut self) {
        assert!(
            self.spawn_and_wait(),
            "etcd did not restart on {}",
            self.url
        );
    }

    /// Starts etcd; true once it reports itself healthy, false when it
    /// exited (e.g. a port was taken) or was not healthy within 20 s.
    fn spawn_and_wait(&mut self) -> bool {
        self.kill();
        let url = self.url.clone();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(&self.dir)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &format!("t={peer}"),
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd is installed (apt-get install etcd-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = self.child.as_mut() {
                if !matches!(c.try_wait(), Ok(None)) {
                    self.child = None;
                    return false;
                }
            }
            if healthy(self.client_port) {
                return true;
            }
            if Instant::now() >= deadline {
                self.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// etcd's own `GET /health` on its client port says `"health":"true"` (a
/// bare TCP connect could reach another process that holds the port).
fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains("\"health\":\"true\"")
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
