//! Seeding a cell's own file again while its agents run (the failback of
//! a shard that was failed over away from it).
//!
//! The own file (`--db`) is open by both colours' stores, so it is never
//! replaced as a file: the received snapshot is copied into it page by page
//! with SQLite's online backup, in one write transaction. Every other
//! connection sees the old content or the new, never a mix, and goes on
//! with the new one (its prepared statements are prepared again). Only a
//! replica is replaced: a copy that still says primary (its shard not
//! failed over, or not fenced yet) never is. Its previous content — the
//! failed-over primary's unacknowledged tail — is kept aside as
//! `FILE.discarded-<unix ms>` for inspection.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::replica::{copy_into, ReplicaError};
use super::shard::{self, Role};

/// How long the copy may wait for the file's write lock.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// Replaces the content of the replica file `home` (open elsewhere) by
/// the checked snapshot `incoming`; returns where the old content was
/// kept.
pub(super) fn install_home(home: &Path, incoming: &Path) -> Result<PathBuf, ReplicaError> {
    let mut dst = super::open(home, false)?;
    if shard::role(&dst)? == Role::Primary {
        return Err(ReplicaError::Row {
            lsn: 0,
            message: format!(
                "{} is the primary copy of its shard; a snapshot never replaces it",
                home.display()
            ),
        });
    }
    let aside = PathBuf::from(format!("{}.discarded-{}", home.display(), super::unix_ms()));
    copy_into(&dst, &aside)?;
    let src = Connection::open_with_flags(incoming, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let deadline = Instant::now() + LOCK_WAIT;
    let backup = Backup::new(&src, &mut dst)?;
    loop {
        match backup.step(-1)? {
            StepResult::Done => break,
            StepResult::Busy | StepResult::Locked if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            StepResult::Busy | StepResult::Locked => {
                return Err(ReplicaError::Row {
                    lsn: 0,
                    message: format!(
                        "{} stayed locked for {LOCK_WAIT:?}; the snapshot was not installed",
                        home.display()
                    ),
                })
            }
            _ => {}
        }
    }
    tracing::warn!(
        file = %home.display(),
        aside = %aside.display(),
        "this cell's own copy of its shard was seeded again from its host's snapshot; its previous content is kept aside"
    );
    Ok(aside)
}
