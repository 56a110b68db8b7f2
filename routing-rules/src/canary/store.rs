//! Where a pipeline's state lives: in the embedded mode a state file next
//! to the rules (`RULES.canary/CELL.json`), read and changed under its own
//! advisory lock (`CELL.json.lock`), so a driver's renewal, an operator's
//! pause and an abort never overwrite each other.
//!
//! The driver holds a lease in the state ([`super::Lease`]) and renews it
//! every tick: a second `run` finds it live and is refused; a driver that
//! died leaves it to expire, and then anyone may `resume` (taking the
//! lease) or `abort`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{Lease, Pipeline, Status};

/// How long a lease lasts unless renewed, ms.
pub const LEASE_MS: i64 = 5_000;

/// Unix time, ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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

/// The pipelines of the rules file at `rules`.
#[derive(Debug, Clone)]
pub struct FileStore {
    rules: PathBuf,
}

impl FileStore {
    /// The pipelines kept next to `rules`.
    pub fn new(rules: &Path) -> Self {
        FileStore {
            rules: rules.to_path_buf(),
        }
    }

    fn path(&self, cell: &str) -> PathBuf {
        crate::files::canary_path(&self.rules, cell)
    }

    fn lock(&self, cell: &str) -> Result<std::fs::File> {
        let dir = crate::files::canary_dir(&self.rules);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = PathBuf::from(format!("{}.lock", self.path(cell).display()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        fs4::FileExt::lock(&f).with_context(|| format!("cannot lock {}", path.display()))?;
        Ok(f)
    }

    fn read(&self, cell: &str) -> Result<Option<Pipeline>> {
        let path = self.path(cell);
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(Some(serde_json::from_str(&t).with_context(|| {
                format!("{} is not a canary state file", path.display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    fn write(&self, p: &Pipeline) -> Result<()> {
        crate::switchover::write_atomically(&self.path(&p.cell), &serde_json::to_string_pretty(p)?)
    }

    /// `cell`'s pipeline, if one was ever recorded.
    pub fn load(&self, cell: &str) -> Result<Option<Pipeline>> {
        let _l = self.lock(cell)?;
        self.read(cell)
    }

    /// Records a new pipeline with `holder`'s lease; refused while another
    /// is running or paused (whether its driver lives or not).
    pub fn begin(&self, mut p: Pipeline, holder: &str) -> Result<Pipeline> {
        let _l = self.lock(&p.cell)?;
        self.refuse_active(&p.cell)?;
        p.lease = Some(Lease {
            holder: holder.to_string(),
            expires_ms: now_ms() + LEASE_MS,
        });
        p.updated_ms = now_ms();
        self.write(&p)?;
        Ok(p)
    }

    /// Refuses when `cell` has a pipeline that is not over (running or
    /// paused, whether its driver lives or not).
    pub fn check_free(&self, cell: &str) -> Result<()> {
        let _l = self.lock(cell)?;
        self.refuse_active(cell)
    }

    fn refuse_active(&self, cell: &str) -> Result<()> {
        if let Some(old) = self.read(cell)? {
            if !old.status.is_final() {
                let now = now_ms();
                if old.leased(now) {
                    bail!(
                        "a canary of cell {} is already {} ({}): two pipelines never drive one cell",
                        cell,
                        old.status.as_str(),
                        old.summary(now)
                    );
                }
                bail!(
                    "a canary of cell {} was left {} by a driver that stopped: `cellctl canary resume {}` finishes it, `cellctl canary abort {}` rolls it back ({})",
                    cell,
                    old.status.as_str(),
                    cell,
                    cell,
                    old.summary(now)
                );
            }
        }
        Ok(())
    }

    /// Changes `cell`'s pipeline under the lock: `change` sees the recorded
    /// state and returns what to answer; the state is written back.
    pub fn update<T>(
        &self,
        cell: &str,
        change: impl FnOnce(&mut Pipeline) -> Result<T>,
    ) -> Result<T> {
        let _l = self.lock(cell)?;
        let Some(mut p) = self.read(cell)? else {
            bail!("no canary of cell {cell} is recorded");
        };
        let before = p.clone();
        let out = change(&mut p)?;
        if p != before {
            p.updated_ms = now_ms();
            self.write(&p)?;
        }
        Ok(out)
    }

    /// The driver `holder` renews its lease (and may change the state);
    /// refused when another holds it now.
    pub fn renew<T>(
        &self,
        cell: &str,
        holder: &str,
        change: impl FnOnce(&mut Pipeline) -> Result<T>,
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
            if !p.status.is_final() {
                p.lease = Some(Lease {
                    holder: holder.to_string(),
                    expires_ms: now_ms() + LEASE_MS,
                });
            }
            change(p)
        })
    }

    /// Takes over a pipeline whose driver stopped (`resume`): its lease
    /// must have expired. Returns the pipeline to drive, or `None` when a
    /// live driver holds it (then a paused one is just set running).
    pub fn take_over(&self, cell: &str, holder: &str) -> Result<Option<Pipeline>> {
        self.update(cell, |p| {
            if p.status.is_final() {
                bail!(
                    "the canary of cell {cell} is over ({}); nothing to resume",
                    p.status.as_str()
                );
            }
            if p.leased(now_ms()) {
                p.status = Status::Running;
                p.reason = None;
                return Ok(None);
            }
            p.status = Status::Running;
            p.reason = None;
            p.lease = Some(Lease {
                holder: holder.to_string(),
                expires_ms: now_ms() + LEASE_MS,
            });
            Ok(Some(p.clone()))
        })
    }
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

    #[test]
    fn one_driver_per_cell_and_a_stopped_one_can_be_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules.toml");
        let s = FileStore::new(&rules);
        s.begin(pipeline("a"), "one").unwrap();
        let e = s.begin(pipeline("a"), "two").unwrap_err().to_string();
        assert!(e.contains("already running"), "{e}");
        // Another cell is independent.
        s.begin(pipeline("b"), "two").unwrap();
        // A renewal by someone else is refused.
        let e = s.renew("a", "two", |_| Ok(())).unwrap_err().to_string();
        assert!(e.contains("driven by one"), "{e}");
        // The driver stops: its lease runs out; a new run is refused,
        // resume takes it over.
        s.update("a", |p| {
            p.lease.as_mut().unwrap().expires_ms = 0;
            Ok(())
        })
        .unwrap();
        let e = s.begin(pipeline("a"), "two").unwrap_err().to_string();
        assert!(e.contains("resume a"), "{e}");
        let p = s.take_over("a", "two").unwrap().unwrap();
        assert_eq!(p.lease.unwrap().holder, "two");
        assert!(s.renew("a", "one", |_| Ok(())).is_err());
        // Over: a new pipeline may start.
        s.renew("a", "two", |p| {
            p.status = Status::Promoted;
            p.lease = None;
            Ok(())
        })
        .unwrap();
        s.begin(pipeline("a"), "three").unwrap();
    }
}
