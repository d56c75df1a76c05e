//! The agent's sled database, `data_dir/db`: opened once at start and
//! shared by what the agent keeps across restarts (the outbox's tree),
//! and the checks for a full disk the outbox and the process runtime share.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// sled's page cache (its default is 1 GiB; the agent shares the host
/// with workloads).
const CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// How long to wait for a lock a previous handle in this process still
/// holds: sled's flusher thread releases it a moment after the last handle
/// is dropped (an embedded agent restarted in place, as tests do).
const LOCK_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot open the agent's database {path} (is another agent using the same data_dir?): {source}"
)]
pub struct OpenError {
    path: PathBuf,
    source: sled::Error,
}

/// Opens (or creates) `data_dir/db`. Blocks; call it off the async workers.
pub fn open(data_dir: &Path) -> Result<sled::Db, OpenError> {
    let path = data_dir.join("db");
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new()
            .path(&path)
            .cache_capacity(CACHE_BYTES)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if (e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock"))
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(source) => return Err(OpenError { path, source }),
        }
    }
}

/// Bytes of the test write before the database is reopened after a write
/// failure: about two of sled's segments (512 KiB each by default), so a
/// reopened database can at least start one.
const PROBE_BYTES: usize = 1 << 20;

/// Writes and syncs [`PROBE_BYTES`] in `data_dir`, then removes them: shows
/// whether the disk takes writes again (sled itself cannot say: after one
/// failed write it refuses every later one until reopened).
pub fn probe_room(data_dir: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let path = data_dir.join("db.probe");
    let written = (|| {
        let mut file = std::fs::File::create(&path)?;
        file.write_all(&vec![0u8; PROBE_BYTES])?;
        file.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    written
}

/// Whether an error's text is ENOSPC or EDQUOT: errors reach the agent
/// through sled's and the shim's own messages, which do not all keep the
/// `io::Error`.
pub fn is_disk_full(text: &str) -> bool {
    text.contains("No space left on device")
        || text.contains("os error 28")
        || text.contains("Disk quota exceeded")
        || text.contains("os error 122")
}

/// `message` (which ends with the error), led by what an operator must do
/// when the error is a full disk.
pub fn name_full_disk(message: String) -> String {
    if is_disk_full(&message) {
        format!("the agent's disk is full (free space in its data_dir): {message}")
    } else {
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_named_and_other_errors_are_left_alone() {
        let full = std::io::Error::from_raw_os_error(28);
        let named = name_full_disk(format!("cannot record the workload: {full}"));
        assert!(named.starts_with("the agent's disk is full"), "{named}");
        let denied = std::io::Error::from_raw_os_error(13);
        let other = format!("cannot record the workload: {denied}");
        assert_eq!(name_full_disk(other.clone()), other);
    }

    #[test]
    fn the_probe_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        probe_room(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
