//! Where a pipeline reads and writes: the rules (its green share) and its
//! own state. In the embedded mode the rules file, and a state file next
//! to it (`RULES.canary/CELL.json`) changed under its own advisory lock
//! (`CELL.json.lock`); with etcd, the rules by compare-and-swap and the
//! state under `/cellgate/CLUSTER/canary/CELL`, changed by
//! compare-and-swap on its version. Either way a driver's renewal, an
//! operator's pause and an abort never overwrite each other.
//!
//! The driver holds a lease in the state ([`super::Lease`]), checks it every
//! tick and extends it once half of it is gone: a second `run` finds it live and is refused; a driver that
//! died leaves it to expire, and then anyone may `resume` (taking the
//! lease) or `abort`. (The lease is a deadline in the state: drivers on
//! other hosts rely on clocks agreeing to well within its 5 s.)

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{Lease, Pipeline, Status};
use crate::switchover::EtcdTarget;

/// How long a lease lasts unless renewed, ms.
pub const LEASE_MS: i64 = 5_000;

/// Unix time, ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Lease {
    /// `holder`'s lease from now for [`LEASE_MS`].
    fn fresh(holder: &str) -> Lease {
        Lease {
            holder: holder.to_string(),
            expires_ms: now_ms() + LEASE_MS,
        }
    }
}

/// A driver's name in a lease: host, pid and a random part.
pub fn holder_name() -> String {
    let mut raw = [0u8; 4];
    let _ = getrandom::fill(&mut raw);
    format!(
        "{}:{}:{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
        std::process::id(),
        hex::encode(raw)
    )
}

/// The control plane a pipeline runs against.
pub enum Place {
    /// A rules file and the files next to it.
    File(PathBuf),
    /// etcd.
    #[cfg(feature = "etcd")]
    Etcd(Box<crate::etcd::ControlPlane>),
}

impl std::fmt::Debug for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Place {
    /// The rules file `rules`, or (without one) the etcd cluster `etcd`.
    pub async fn open(rules: Option<&Path>, etcd: Option<&EtcdTarget>) -> Result<Place> {
        match (rules, etcd) {
            (Some(r), _) => Ok(Place::File(r.to_path_buf())),
            #[cfg(feature = "etcd")]
            (None, Some(t)) => {
                let cp = crate::etcd::ControlPlane::connect(&t.endpoints, &t.cluster)
                    .await
                    .with_context(|| format!("cannot reach etcd at {}", t.endpoints.join(",")))?;
                Ok(Place::Etcd(Box::new(cp)))
            }
            #[cfg(not(feature = "etcd"))]
            (None, Some(_)) => {
                bail!("this build has no etcd support (it was built with --no-default-features)")
            }
            (None, None) => {
                bail!("no rules: give --rules FILE, or --etcd URL (env CELLGATE_ETCD) for the rules in etcd")
            }
        }
    }

    /// For messages.
    pub fn describe(&self) -> String {
        match self {
            Place::File(p) => p.display().to_string(),
            #[cfg(feature = "etcd")]
            Place::Etcd(cp) => format!("etcd ({})", cp.keys().rules()),
        }
    }

    /// The rules document and its revision.
    pub async fn rules(&mut self) -> Result<(String, u64)> {
        match self {
            Place::File(p) => crate::switchover::plane::rules_in_file(p),
            #[cfg(feature = "etcd")]
            Place::Etcd(cp) => crate::switchover::plane::rules_in_etcd(cp).await,
        }
    }

    /// Sets `cell`'s green share; the revision written, or `None` when it
    /// was that share already.
    pub async fn set_share(&mut self, cell: &str, green: u32) -> Result<Option<u64>> {
        match self {
            Place::File(p) => crate::switchover::edit_rules_file(p, |text| {
                Ok(crate::edit::set_split(text, cell, green)?)
            }),
            #[cfg(feature = "etcd")]
            Place::Etcd(cp) => loop {
                let (document, revision) = crate::switchover::plane::rules_in_etcd(cp).await?;
                let edited = crate::edit::set_split(&document, cell, green)?;
                if edited == document {
                    return Ok(None);
                }
                let message = format!(
                    "canary: cell {cell} green {}",
                    crate::model::format_percent(green)
                );
                match cp.apply(&edited, revision, &holder_name(), &message).await {
                    Ok(rev) => return Ok(Some(rev)),
                    // Someone else changed the rules meanwhile: edit theirs.
                    Err(crate::etcd::ControlError::Conflict { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            },
        }
    }

    /// The registered gateways' metrics URLs (etcd: from their
    /// registrations' admin address); a file knows of none.
    pub async fn gateways(&mut self) -> Result<Vec<String>> {
        match self {
            Place::File(p) => bail!(
                "with a rules file ({}) no gateway is registered: give --metrics URL,... (each gateway's http://ADMIN/metrics) or --prometheus URL",
                p.display()
            ),
            #[cfg(feature = "etcd")]
            Place::Etcd(cp) => {
                let status = cp.status().await?;
                let urls: Vec<String> = status
                    .gateways
                    .iter()
                    .filter_map(|g| g.registration["admin"].as_str())
                    .map(|a| format!("http://{a}/metrics"))
                    .collect();
                if urls.is_empty() {
                    bail!("no gateway with an admin address is registered in etcd: give --metrics URL,... or --prometheus URL");
                }
                Ok(urls)
            }
        }
    }

    /// Reads `cell`'s pipeline, lets `change` decide what to write (and
    /// what to answer), writes it unless someone changed it meanwhile (etcd:
    /// then `change` runs again on theirs).
    async fn modify<T>(
        &mut self,
        cell: &str,
        mut change: impl FnMut(Option<Pipeline>) -> Result<(Option<Pipeline>, T)>,
    ) -> Result<T> {
        match self {
            Place::File(rules) => {
                let dir = crate::files::canary_dir(rules);
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let path = crate::files::canary_path(rules, cell);
                let lock = PathBuf::from(format!("{}.lock", path.display()));
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock)
                    .with_context(|| format!("cannot open {}", lock.display()))?;
                fs4::FileExt::lock(&f)
                    .with_context(|| format!("cannot lock {}", lock.display()))?;
                let before = match std::fs::read_to_string(&path) {
                    Ok(t) => Some(parse(&t, &path.display().to_string())?),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => {
                        return Err(e).with_context(|| format!("cannot read {}", path.display()))
                    }
                };
                let (after, out) = change(before.clone())?;
                if let Some(p) = after.filter(|a| Some(a) != before.as_ref()) {
                    crate::switchover::write_atomically(&path, &serde_json::to_string_pretty(&p)?)?;
                }
                Ok(out)
            }
            #[cfg(feature = "etcd")]
            Place::Etcd(cp) => {
                let key = cp.keys().canary(cell);
                loop {
                    let (value, seen) = cp.get_versioned(&key).await?;
                    let before = match value {
                        Some(v) => Some(parse(&String::from_utf8_lossy(&v), &key)?),
                        None => None,
                    };
                    let (after, out) = change(before.clone())?;
                    let Some(p) = after.filter(|a| Some(a) != before.as_ref()) else {
                        return Ok(out);
                    };
                    if cp
                        .put_if_unchanged(&key, &serde_json::to_string_pretty(&p)?, seen)
                        .await?
                    {
                        return Ok(out);
                    }
                }
            }
        }
    }

    /// `cell`'s pipeline, if one was ever recorded.
    pub async fn load(&mut self, cell: &str) -> Result<Option<Pipeline>> {
        self.modify(cell, |p| Ok((None, p))).await
    }

    /// Refuses when `cell` has a pipeline that is not over (running or
    /// paused, whether its driver lives or not).
    pub async fn check_free(&mut self, cell: &str) -> Result<()> {
        self.modify(cell, |p| {
            refuse_active(cell, p.as_ref()).map(|()| (None, ()))
        })
        .await
    }

    /// Records a new pipeline with `holder`'s lease; refused while another
    /// is running or paused.
    pub async fn begin(&mut self, p: Pipeline, holder: &str) -> Result<Pipeline> {
        let cell = p.cell.clone();
        self.modify(&cell, |old| {
            refuse_active(&cell, old.as_ref())?;
            let mut p = p.clone();
            p.lease = Some(Lease::fresh(holder));
            p.updated_ms = now_ms();
            Ok((Some(p.clone()), p))
        })
        .await
    }

    /// Changes `cell`'s recorded pipeline: `change` sees it and returns
    /// what to answer; it is written back (stamped) when changed.
    pub async fn update<T>(
        &mut self,
        cell: &str,
        mut change: impl FnMut(&mut Pipeline) -> Result<T>,
    ) -> Result<T> {
        self.modify(cell, |p| {
            let Some(mut p) = p else {
                bail!("no canary of cell {cell} is recorded");
            };
            let before = p.clone();
            let out = change(&mut p)?;
            if p != before {
                p.updated_ms = now_ms();
            }
            Ok((Some(p), out))
        })
        .await
    }

    /// The driver `holder` renews its lease (and may change the state);
    /// refused when another holds it now.
    pub async fn renew<T>(
        &mut self,
        cell: &str,
        holder: &str,
        mut change: impl FnMut(&mut Pipeline) -> Result<T>,
    ) -> Result<T> {
        self.update(cell, |p| {
            match &p.lease {
                Some(l) if l.holder == holder => {}
                Some(l) => bail!(
                    "the canary of cell {cell} is driven by {} now; this driver stops",
                    l.holder
                ),
                None if p.status.is_final() => {}
                None => bail!("the canary of cell {cell} lost its driver's lease"),
            }
            // Extended once half of it is gone: a tick that finds it fresh
            // writes nothing (the state is read every tick, written only
            // when something changed).
            let due = p
                .lease
                .as_ref()
                .is_none_or(|l| l.expires_ms - now_ms() < LEASE_MS / 2);
            if !p.status.is_final() && due {
                p.lease = Some(Lease::fresh(holder));
            }
            change(p)
        })
        .await
    }

    /// Takes over a pipeline whose driver stopped (`resume`): its lease
    /// must have expired. Returns the pipeline to drive, or `None` when a
    /// live driver holds it (then a paused one is just set running).
    pub async fn take_over(&mut self, cell: &str, holder: &str) -> Result<Option<Pipeline>> {
        self.update(cell, |p| {
            if p.status.is_final() {
                bail!(
                    "the canary of cell {cell} is over ({}); nothing to resume",
                    p.status.as_str()
                );
            }
            p.status = Status::Running;
            p.reason = None;
            if p.leased(now_ms()) {
                return Ok(None);
            }
            p.lease = Some(Lease::fresh(holder));
            Ok(Some(p.clone()))
        })
        .await
    }
}

fn parse(text: &str, place: &str) -> Result<Pipeline> {
    serde_json::from_str(text).with_context(|| format!("{place} is not a canary state record"))
}

fn refuse_active(cell: &str, old: Option<&Pipeline>) -> Result<()> {
    let Some(old) = old.filter(|o| !o.status.is_final()) else {
        return Ok(());
    };
    let now = now_ms();
    if old.leased(now) {
        bail!(
            "a canary of cell {cell} is already {} ({}): two pipelines never drive one cell",
            old.status.as_str(),
            old.summary(now)
        );
    }
    bail!(
        "a canary of cell {cell} was left {} by a driver that stopped: `cellctl canary resume {cell}` finishes it, `cellctl canary abort {cell}` rolls it back ({})",
        old.status.as_str(),
        old.summary(now)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canary::{Hooks, Plan, Thresholds};

    fn pipeline(cell: &str) -> Pipeline {
        Pipeline {
            cell: cell.into(),
            plan: Plan {
                steps: vec![100, 10_000],
                hold_ms: 1000,
                interval_ms: 100,
                thresholds: Thresholds::default(),
                max_wait_ms: 10_000,
            },
            metrics: vec![],
            prometheus: None,
            hooks: Hooks::default(),
            step: 0,
            status: Status::Running,
            reason: None,
            revision: None,
            started_ms: 0,
            updated_ms: 0,
            lease: None,
        }
    }

    #[tokio::test]
    async fn one_driver_per_cell_and_a_stopped_one_can_be_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Place::File(dir.path().join("rules.toml"));
        s.begin(pipeline("a"), "one").await.unwrap();
        let e = s.begin(pipeline("a"), "two").await.unwrap_err().to_string();
        assert!(e.contains("already running"), "{e}");
        // Another cell is independent.
        s.begin(pipeline("b"), "two").await.unwrap();
        // A renewal by someone else is refused.
        let e = s
            .renew("a", "two", |_| Ok(()))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("driven by one"), "{e}");
        // The driver stops: its lease runs out; a new run is refused,
        // resume takes it over.
        s.update("a", |p| {
            p.lease.as_mut().unwrap().expires_ms = 0;
            Ok(())
        })
        .await
        .unwrap();
        let e = s.begin(pipeline("a"), "two").await.unwrap_err().to_string();
        assert!(e.contains("resume a"), "{e}");
        let p = s.take_over("a", "two").await.unwrap().unwrap();
        assert_eq!(p.lease.unwrap().holder, "two");
        assert!(s.renew("a", "one", |_| Ok(())).await.is_err());
        // Over: a new pipeline may start.
        s.renew("a", "two", |p| {
            p.status = Status::Promoted;
            p.lease = None;
            Ok(())
        })
        .await
        .unwrap();
        s.begin(pipeline("a"), "three").await.unwrap();
    }
}
