//! `--auto-failover`: when the active health checks see every instance of
//! a cell down (both colours, for `--auto-failover-after-ms` more), and the
//! cell holds a replicated shard whose standby is up and whose failover
//! policy is `auto`, the gateway fails the shard over to its standby with
//! its data — exactly as `cellctl failover` does, with the same guard: only
//! if the shard's replication record says the standby is in sync. Several
//! gateways may try at once; the rules' lock (file) or transaction (etcd)
//! lets one win and the others find nothing to do.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use routing_rules::auth::ClusterSecret;
use routing_rules::switchover::{failover, EtcdTarget, FailoverRequest};
use routing_rules::{FailoverPolicy, HealthView};
use tokio::sync::watch;

use crate::control::Control;

/// What the watcher needs.
pub struct AutoFailover {
    /// The rules file (embedded mode).
    pub rules: Option<PathBuf>,
    /// Or the etcd control plane.
    pub etcd: Option<EtcdTarget>,
    /// The cells' shared secret.
    pub secret: ClusterSecret,
    /// How long a cell stays down (after the health checks said so) before
    /// its shard is failed over.
    pub after: Duration,
    /// How often health is looked at.
    pub every: Duration,
}

/// Runs until `stop`.
pub async fn run(control: Arc<Control>, cfg: AutoFailover, mut stop: watch::Receiver<bool>) {
    let mut down_since: HashMap<String, Instant> = HashMap::new();
    let mut next_try: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(cfg.every) => {}
            _ = stop.changed() => return,
        }
        let gen = control.current();
        let table = gen.table.clone();
        let health = gen.health();
        let rules = table.rules();
        for (idx, cell) in table.cells().iter().enumerate() {
            let name = cell.name.to_string();
            if health.cell_up(idx as routing_rules::CellIdx) {
                down_since.remove(&name);
                continue;
            }
            let since = *down_since.entry(name.clone()).or_insert_with(Instant::now);
            if since.elapsed() < cfg.after
                || next_try.get(&name).is_some_and(|t| Instant::now() < *t)
            {
                continue;
            }
            // Every shard this cell holds, whose standby is up.
            for shard in rules.shards_of(&name) {
                let Some(standby) = rules.standby_of(shard) else {
                    continue;
                };
                let auto = rules
                    .cells
                    .get(shard)
                    .is_some_and(|c| c.failover_policy == FailoverPolicy::Auto);
                let standby_up = table.cell_index(standby).is_some_and(|i| health.cell_up(i));
                if !auto || !standby_up || standby == name {
                    continue;
                }
                let req = FailoverRequest {
                    rules: cfg.rules.clone().unwrap_or_default(),
                    cell: shard.to_string(),
                    to: standby.to_string(),
                    force: false,
                    etcd: cfg.etcd.clone(),
                };
                tracing::warn!(cell = %name, %shard, %standby, down_ms = since.elapsed().as_millis() as u64, "every instance of the cell is down: failing its shard over to its standby");
                match failover(&req, cfg.secret.clone()).await {
                    Ok(out) => {
                        control
                            .metrics()
                            .auto_failovers
                            .with_label_values(&["ok"])
                            .inc();
                        tracing::warn!(%shard, host = %standby, revision = ?out.revision, ms = out.stall_ms, "automatic failover done");
                    }
                    Err(e) => {
                        let e = format!("{e:#}");
                        let outcome = if e.contains("nothing to do") {
                            "done_elsewhere"
                        } else {
                            "refused"
                        };
                        control
                            .metrics()
                            .auto_failovers
                            .with_label_values(&[outcome])
                            .inc();
                        if outcome == "refused" {
                            tracing::error!(%shard, %standby, error = %e, "automatic failover not done");
                        }
                    }
                }
            }
            next_try.insert(name, Instant::now() + Duration::from_secs(5));
        }
    }
}
