//! The agent's sled database, `data_dir/db`: opened once at start and
//! shared by what the agent keeps across restarts (the outbox's tree).

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
