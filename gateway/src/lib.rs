//! cellgate's edge data plane: routes every request to the home cell and
//! colour of its user (with the `routing-rules` engine), stamps it, proxies
//! it over pooled keep-alive connections, fails over on health, and exposes
//! Prometheus metrics and a read-only admin API.
//!
//! Plain HTTP/1.x requests take a lean path (`fast`, `h1`); HTTP/2 and
//! everything unusual go through hyper + tower. See docs/gateway.md for the
//! phases of a request.

pub mod access_log;
pub mod admin;
pub mod auto_failover;
pub mod config;
pub mod conn_watch;
pub mod control;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod fast;
pub mod h1;
pub mod health;
pub mod internal_path;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod upstream;

pub use config::ServeConfig;
pub use server::{start, RunningGateway};
