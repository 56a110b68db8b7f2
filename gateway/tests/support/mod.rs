//! The shared helpers (crate `test-util`) and the gateway's test settings.
#![allow(dead_code)]

use std::path::PathBuf;

pub use test_util::*;

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
