//! `cellctl status`: the registrations of gateways and instances, and
//! which rules revision each runs.

use super::*;

/// What `cellctl status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// Cluster name.
    pub cluster: String,
    /// Latest applied revision (0 = none).
    pub revision: u64,
    /// Registered gateways.
    pub gateways: Vec<GatewayStatus>,
    /// Registered instances per `cell/colour`, and the static ones in the rules.
    pub cells: std::collections::BTreeMap<String, CellColourStatus>,
    /// Instance health as the gateways see it (from their `/admin/health`):
    /// per `cell/colour`, per address, how many gateways see it up.
    pub health:
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, InstanceHealth>>,
    /// Gateways whose admin API could not be read.
    pub unreachable_gateways: Vec<String>,
}

/// One instance's health across gateways.
#[derive(Debug, Clone, Default, Serialize)]
pub struct InstanceHealth {
    /// Gateways that see it up.
    pub up_in: usize,
    /// Gateways that report it.
    pub seen_by: usize,
}

/// One gateway's registration.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayStatus {
    /// Id.
    pub id: String,
    /// Revision it runs.
    pub revision: u64,
    /// Milliseconds since it applied that revision.
    pub applied_ms_ago: u64,
    /// Whether it runs the latest revision.
    pub current: bool,
    /// Its registration, as stored.
    pub registration: serde_json::Value,
}

/// Instances of one cell and colour.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CellColourStatus {
    /// Addresses registered under live leases.
    pub registered: Vec<String>,
    /// Static addresses in the rules.
    pub static_instances: Vec<String>,
}

impl ClusterStatus {
    /// Every registered gateway runs the latest revision.
    pub fn all_current(&self) -> bool {
        self.gateways.iter().all(|g| g.current)
    }

    /// Text for humans.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "cluster {}: rules revision {}",
            self.cluster, self.revision
        );
        let _ = writeln!(s, "gateways ({}):", self.gateways.len());
        for g in &self.gateways {
            let _ = writeln!(
                s,
                "  {:<24} revision {:<6} applied {:.1} s ago{}",
                g.id,
                g.revision,
                g.applied_ms_ago as f64 / 1000.0,
                if g.current { "" } else { "  BEHIND" }
            );
        }
        let _ = writeln!(
            s,
            "instances (registered = holds a live lease; up = passes the gateways' health checks):"
        );
        for (cc, st) in &self.cells {
            let _ = writeln!(
                s,
                "  {cc:<20} registered [{}]  static [{}]",
                st.registered.join(", "),
                st.static_instances.join(", ")
            );
            if let Some(h) = self.health.get(cc) {
                for (addr, ih) in h {
                    let _ = writeln!(
                        s,
                        "    {addr:<22} up in {}/{} gateways",
                        ih.up_in, ih.seen_by
                    );
                }
            }
        }
        for g in &self.unreachable_gateways {
            let _ = writeln!(
                s,
                "  (gateway {g}: admin API unreachable; its view of health is missing)"
            );
        }
        let _ = writeln!(
            s,
            "{}",
            if self.all_current() {
                format!(
                    "cluster {}: every gateway runs the latest revision",
                    self.cluster
                )
            } else {
                format!(
                    "cluster {}: NOT every gateway runs the latest revision yet",
                    self.cluster
                )
            }
        );
        s
    }
}

impl ControlPlane {
    /// Registrations of gateways and instances, and the live revision.
    pub async fn status(&mut self) -> Result<ClusterStatus, ControlError> {
        let stored = self.get().await?;
        let revision = stored.as_ref().map(|s| s.revision).unwrap_or(0);
        let now = now_ms();
        let mut gateways = Vec::new();
        let resp = self
            .client
            .get(
                self.keys.gateways_prefix(),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| self.err(e))?;
        for kv in resp.kvs() {
            let v: serde_json::Value = serde_json::from_slice(kv.value()).unwrap_or_default();
            let rev = v["revision"].as_u64().unwrap_or(0);
            gateways.push(GatewayStatus {
                id: v["id"].as_str().unwrap_or("?").to_string(),
                revision: rev,
                applied_ms_ago: now.saturating_sub(v["applied_at_ms"].as_u64().unwrap_or(now)),
                current: rev == revision,
                registration: v,
            });
        }
        let mut cells: std::collections::BTreeMap<String, CellColourStatus> = Default::default();
        if let Some(s) = &stored {
            if let Ok(rules) = parse_rules(&s.document) {
                for (name, cell) in &rules.cells {
                    for (colour, list) in [("blue", &cell.blue), ("green", &cell.green)] {
                        cells
                            .entry(format!("{name}/{colour}"))
                            .or_default()
                            .static_instances = list.clone();
                    }
                }
            }
        }
        let resp = self
            .client
            .get(
                self.keys.instances_prefix(),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| self.err(e))?;
        for kv in resp.kvs() {
            let v: serde_json::Value = serde_json::from_slice(kv.value()).unwrap_or_default();
            let key = format!(
                "{}/{}",
                v["cell"].as_str().unwrap_or("?"),
                v["colour"].as_str().unwrap_or("?")
            );
            cells
                .entry(key)
                .or_default()
                .registered
                .push(v["address"].as_str().unwrap_or("?").to_string());
        }
        Ok(ClusterStatus {
            cluster: self
                .keys
                .prefix
                .trim_start_matches("/cellgate/")
                .trim_end_matches('/')
                .to_string(),
            revision,
            gateways,
            cells,
            health: Default::default(),
            unreachable_gateways: Vec::new(),
        })
    }
}

impl ClusterStatus {
    /// Asks every registered gateway's admin API (`/admin/health`, with
    /// `token` as bearer token when given) how it sees each instance.
    pub async fn add_health(&mut self, token: Option<&str>) {
        use http_body_util::BodyExt;
        let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        for g in &self.gateways {
            let Some(admin) = g.registration["admin"].as_str() else {
                self.unreachable_gateways.push(g.id.clone());
                continue;
            };
            let mut req = http::Request::get(format!("http://{admin}/admin/health"));
            if let Some(t) = token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            let Ok(req) = req.body(http_body_util::Empty::new()) else {
                continue;
            };
            let fetched = async {
                let resp = client.request(req).await.ok()?;
                if !resp.status().is_success() {
                    return None;
                }
                let body = resp.into_body().collect().await.ok()?.to_bytes();
                serde_json::from_slice::<serde_json::Value>(&body).ok()
            };
            match tokio::time::timeout(std::time::Duration::from_secs(2), fetched).await {
                Ok(Some(v)) => {
                    for i in v["instances"].as_array().into_iter().flatten() {
                        let cc = format!(
                            "{}/{}",
                            i["cell"].as_str().unwrap_or("?"),
                            i["colour"].as_str().unwrap_or("?")
                        );
                        let e = self
                            .health
                            .entry(cc)
                            .or_default()
                            .entry(i["address"].as_str().unwrap_or("?").to_string())
                            .or_default();
                        e.seen_by += 1;
                        if i["up"].as_bool() == Some(true) {
                            e.up_in += 1;
                        }
                    }
                }
                _ => self.unreachable_gateways.push(g.id.clone()),
            }
        }
    }
}
