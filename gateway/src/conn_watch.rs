//! A watchdog per client connection of the hyper front end (HTTP/2, and
//! HTTP/1 connections handed to hyper): closes a connection that has had
//! nothing in progress for the idle timeout (an HTTP/2 client that sent its
//! preface and then nothing is the case that matters), and one whose client
//! has not taken response bytes for the send timeout (nginx's
//! `send_timeout`) — so a client that never reads cannot keep a cell's
//! in-flight slot and upstream connection.
//!
//! The request path only touches atomics; the one timer per connection is
//! the watchdog's own.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::upstream::now_ms;

/// Why a connection is closed by its watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing in progress for the idle timeout.
    Idle,
    /// A response body made no progress toward the client for the send timeout.
    SendTimeout,
}

impl Verdict {
    /// Label of `cellgate_client_errors_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Idle => "idle_timeout",
            Verdict::SendTimeout => "send_timeout",
        }
    }
}

/// What is in progress on one connection.
#[derive(Debug)]
pub struct ConnWatch {
    /// Requests between arrival and their response head.
    handling: AtomicUsize,
    /// Response bodies being sent.
    streaming: AtomicUsize,
    /// Last arrival of a request or progress of a body ([`now_ms`]).
    progress_ms: AtomicU64,
}

impl Default for ConnWatch {
    fn default() -> Self {
        ConnWatch {
            handling: AtomicUsize::new(0),
            streaming: AtomicUsize::new(0),
            progress_ms: AtomicU64::new(now_ms()),
        }
    }
}

impl ConnWatch {
    #[inline]
    fn touch(&self) {
        self.progress_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// A request arrived.
    pub fn request_started(&self) {
        self.handling.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    /// Its answer was produced; `streaming` when a body follows.
    pub fn request_answered(&self, streaming: bool) {
        if streaming {
            self.streaming.fetch_add(1, Ordering::Relaxed);
        }
        self.handling.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }

    /// The client took (or asked for) more of a response body.
    #[inline]
    pub fn body_progress(&self) {
        self.touch();
    }

    /// A response body ended (or was dropped).
    pub fn body_done(&self) {
        self.streaming.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }

    /// Resolves when the connection should be closed.
    pub async fn verdict(&self, idle: Duration, send: Duration) -> Verdict {
        let idle_ms = idle.as_millis() as u64;
        let send_ms = send.as_millis() as u64;
        let tick = Duration::from_millis((idle_ms.min(send_ms) / 4).clamp(10, 1_000));
        loop {
            tokio::time::sleep(tick).await;
            let stale = now_ms().saturating_sub(self.progress_ms.load(Ordering::Relaxed));
            let streaming = self.streaming.load(Ordering::Relaxed);
            if streaming > 0 && stale > send_ms {
                return Verdict::SendTimeout;
            }
            if streaming == 0 && self.handling.load(Ordering::Relaxed) == 0 && stale > idle_ms {
                return Verdict::Idle;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_and_stuck_connections_get_their_verdict() {
        let w = ConnWatch::default();
        let t = std::time::Instant::now();
        assert_eq!(
            w.verdict(Duration::from_millis(60), Duration::from_secs(60))
                .await,
            Verdict::Idle
        );
        assert!(t.elapsed() >= Duration::from_millis(60));
        // A request waiting for its head is neither idle nor stuck.
        w.request_started();
        let r = tokio::time::timeout(
            Duration::from_millis(150),
            w.verdict(Duration::from_millis(40), Duration::from_millis(40)),
        )
        .await;
        assert!(r.is_err(), "a request in progress is not idle");
        w.request_answered(true);
        assert_eq!(
            w.verdict(Duration::from_secs(60), Duration::from_millis(40))
                .await,
            Verdict::SendTimeout
        );
        w.body_done();
    }
}
