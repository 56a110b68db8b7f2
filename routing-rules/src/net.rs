//! Listen addresses as operators write them: `IP:PORT`, `HOST:PORT`
//! (resolved once, at start) or `:PORT` (every interface, as nginx's
//! `listen 8080` or Go's `:8080`).

use std::net::{SocketAddr, ToSocketAddrs};

/// Parses a listen address (a clap value parser).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?}: the port must be a number 0..=65535"))?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?}: give HOST:PORT, IP:PORT or :PORT"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!(
            "{s:?}: give HOST:PORT, IP:PORT or :PORT (port 0..=65535)"
        ));
    }
    let mut addrs = s
        .to_socket_addrs()
        .map_err(|e| format!("{s:?}: cannot resolve {host:?}: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{s:?}: {host:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_as_operators_write_them() {
        assert_eq!(parse_listen("127.0.0.1:8080").unwrap().port(), 8080);
        assert_eq!(parse_listen("[::1]:9").unwrap().port(), 9);
        assert_eq!(
            parse_listen(":7070").unwrap(),
            SocketAddr::from(([0, 0, 0, 0], 7070))
        );
        let local = parse_listen("localhost:8081").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 8081, "{local}");
        for bad in [
            "",
            "8080",
            ":x",
            "localhost:",
            "localhost:99999",
            "no-such-host.invalid:80",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
    }
}
