//! Deletes the directories of finished allocations once they are older than
//! `log_retention`, so an agent that runs many jobs does not fill its disk
//! with their logs.
//!
//! An allocation directory (`data_dir/allocations/<id>/`) holds the
//! workload's `output.log` and is its `HOME` and default working
//! directory. Each is capped (`log_max_bytes`), but there is one per job
//! ever run here. A directory goes when nothing has been written to it or
//! its log for `log_retention` and its workload is not running or starting
//! on this agent (a job that runs for weeks without output keeps its own).
//!
//! A pass first moves each expired directory, under the supervisor's lock,
//! to `data_dir/pruning/`, then deletes it there: a start of the same id
//! cannot race the check, and a deletion cut short (a crash, a file the
//! agent may not remove) is finished by the next pass. Symbolic links a
//! workload left are removed, never followed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::supervisor::{Supervisor, validate_allocation_id};
use crate::workload_store as store;

/// Where expired directories are moved before they are deleted.
pub(crate) const PRUNING_DIR: &str = "pruning";
/// Shortest and longest time between two passes.
const MIN_PASS_INTERVAL: Duration = Duration::from_secs(60);
const MAX_PASS_INTERVAL: Duration = Duration::from_secs(3600);

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// Ids of the allocation directories deleted.
    pub removed: Vec<String>,
    /// Directories (or leftovers of an earlier pass) that could not be
    /// moved or deleted, with why; tried again next pass.
    pub failed: Vec<String>,
}

/// Totals for `/metrics`, since the agent started.
#[derive(Debug, Default)]
pub struct RetentionStats {
    deleted: AtomicU64,
    failing: AtomicU64,
}

impl RetentionStats {
    /// Allocation directories deleted.
    pub fn deleted(&self) -> u64 {
        self.deleted.load(Ordering::Relaxed)
    }

    /// Directories the last pass could not move or delete.
    pub fn failing(&self) -> u64 {
        self.failing.load(Ordering::Relaxed)
    }

    /// Counts one pass.
    pub fn record(&self, pruned: &Pruned) {
        self.deleted
            .fetch_add(pruned.removed.len() as u64, Ordering::Relaxed);
        self.failing
            .store(pruned.failed.len() as u64, Ordering::Relaxed);
    }
}

/// Time between passes: a tenth of the retention, from a minute to an hour,
/// so a directory outlives its retention by at most that.
pub fn pass_interval(retention: Duration) -> Duration {
    (retention / 10).clamp(MIN_PASS_INTERVAL, MAX_PASS_INTERVAL)
}

/// Deletes every allocation directory of `supervisor` last written more than
/// `retention` before `now` whose workload is not running or starting.
pub fn prune(supervisor: &Supervisor, retention: Duration, now: SystemTime) -> Pruned {
    let mut pruned = Pruned::default();
    let data_dir = supervisor.data_dir();
    let pruning = data_dir.join(PRUNING_DIR);
    // Leftovers of a pass that was cut short.
    delete_all_in(&pruning, &mut pruned.failed);
    let root = data_dir.join("allocations");
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return pruned,
        Err(e) => {
            pruned.failed.push(format!("{}: {e}", root.display()));
            return pruned;
        }
    };
    for entry in entries.flatten() {
        let Ok(id) = entry.file_name().into_string() else {
            continue;
        };
        // Only what the agent itself creates: a directory named by an id.
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        if !is_dir || validate_allocation_id(&id).is_err() {
            continue;
        }
        let dir = entry.path();
        if !expired(&dir, retention, now) {
            continue;
        }
        if let Err(e) = std::fs::create_dir_all(&pruning) {
            pruned.failed.push(format!("{}: {e}", pruning.display()));
            return pruned;
        }
        let moved_to = pruning.join(&id);
        // Checked again under the supervisor's lock: a workload of this id
        // may have started and ended since.
        let still_expired = || expired(&dir, retention, now);
        match supervisor.retire_allocation_dir(&id, &moved_to, still_expired) {
            Ok(false) => {}
            Ok(true) => match std::fs::remove_dir_all(&moved_to) {
                Ok(()) => pruned.removed.push(id),
                Err(e) => pruned.failed.push(format!("{}: {e}", moved_to.display())),
            },
            Err(e) => pruned.failed.push(format!("{}: {e}", dir.display())),
        }
    }
    pruned
}

/// Whether neither `dir` nor its log was written within `retention` of
/// `now`. A time in the future (a clock that went back) is not expired.
fn expired(dir: &Path, retention: Duration, now: SystemTime) -> bool {
    let modified = |path: &Path| std::fs::symlink_metadata(path).and_then(|m| m.modified());
    let Ok(mut last) = modified(dir) else {
        return false;
    };
    if let Ok(log) = modified(&dir.join(store::LOG_FILE)) {
        last = last.max(log);
    }
    now.duration_since(last).is_ok_and(|age| age > retention)
}

/// Deletes everything inside `dir` (not `dir`), noting failures.
fn delete_all_in(dir: &Path, failed: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path: PathBuf = entry.path();
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(e) = removed {
            failed.push(format!("{}: {e}", path.display()));
        }
    }
}

/// Prunes every [`pass_interval`] until `shutdown`, the first pass at once.
pub(crate) async fn run(
    supervisor: Supervisor,
    retention: Duration,
    stats: std::sync::Arc<RetentionStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let interval = pass_interval(retention);
    loop {
        let supervisor = supervisor.clone();
        let pass =
            tokio::task::spawn_blocking(move || prune(&supervisor, retention, SystemTime::now()))
                .await;
        match pass {
            Ok(pruned) => {
                stats.record(&pruned);
                if !pruned.removed.is_empty() {
                    info!(
                        deleted = pruned.removed.len(),
                        retention = %humantime::format_duration(retention),
                        "deleted the directories and logs of allocations that ended longer than log_retention ago"
                    );
                }
                if let Some(first) = pruned.failed.first() {
                    warn!(
                        failed = pruned.failed.len(),
                        first = %first,
                        "cannot delete some expired allocation directories; trying again next pass"
                    );
                }
            }
            Err(e) => warn!(error = %e, "the log retention pass panicked"),
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_come_a_tenth_of_the_retention_apart_within_bounds() {
        assert_eq!(pass_interval(Duration::from_secs(60)), MIN_PASS_INTERVAL);
        assert_eq!(
            pass_interval(Duration::from_secs(3000)),
            Duration::from_secs(300)
        );
        assert_eq!(
            pass_interval(Duration::from_secs(7 * 24 * 3600)),
            MAX_PASS_INTERVAL
        );
    }

    #[test]
    fn stats_add_deletions_and_keep_the_last_passes_failures() {
        let stats = RetentionStats::default();
        let pass = |removed: &[&str], failed: &[&str]| Pruned {
            removed: removed.iter().map(|s| s.to_string()).collect(),
            failed: failed.iter().map(|s| s.to_string()).collect(),
        };
        stats.record(&pass(&["a", "b"], &["c: denied"]));
        stats.record(&pass(&["c"], &[]));
        assert_eq!((stats.deleted(), stats.failing()), (3, 0));
        stats.record(&pass(&[], &["d: denied", "e: denied"]));
        assert_eq!((stats.deleted(), stats.failing()), (3, 2));
    }

    #[test]
    fn age_is_the_later_of_the_directory_and_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let alloc = dir.path().join("a");
        std::fs::create_dir(&alloc).unwrap();
        let log = std::fs::File::create(alloc.join(store::LOG_FILE)).unwrap();
        let t0 = SystemTime::now() - Duration::from_secs(3600);
        // The directory is old, the log was written 10 minutes ago.
        std::fs::File::open(&alloc)
            .unwrap()
            .set_modified(t0)
            .unwrap();
        log.set_modified(t0 + Duration::from_secs(3000)).unwrap();
        let now = t0 + Duration::from_secs(3600);
        assert!(!expired(&alloc, Duration::from_secs(900), now));
        assert!(expired(&alloc, Duration::from_secs(300), now));
        // A clock that went back never expires anything.
        assert!(!expired(&alloc, Duration::from_secs(1), t0));
    }
}
