//! The shared helpers (crate `test-util`) and the gateway's test settings.
#![allow(dead_code)]

use std::path::PathBuf;

pub use test_util::*;

pub mod canary;

/// Fast health settings for tests.
pub fn fast_config(rules: PathBuf) -> gateway::ServeConfig {
    let mut cfg = gateway::ServeConfig::for_tests(rules);
    cfg.health_interval_ms = 50;
    cfg.health_timeout_ms = 200;
    cfg.health_rise = 1;
    cfg.health_fall = 2;
    cfg.reload_interval_ms = 20;
    cfg.connect_timeout_ms = 300;
    cfg
}

/// A gateway following cluster `gw-test` in `etcd`, its saved rules in
/// `state_dir`.
#[cfg(feature = "etcd")]
pub fn etcd_config(
    etcd: &routing_rules::etcd::testing::EtcdServer,
    state_dir: &std::path::Path,
    id: &str,
) -> gateway::ServeConfig {
    let mut cfg = fast_config("unused".into());
    cfg.rules = None;
    cfg.etcd = Some(etcd.url.clone());
    cfg.cluster = "gw-test".into();
    cfg.state_dir = Some(state_dir.to_path_buf());
    cfg.gateway_id = Some(id.into());
    cfg
}
