//! The embedded default store: one sled tree, keyspaces by key prefix, so
//! one `sled::Batch` is atomic across record kinds.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{IdRange, Keyspace, Store, StoreError, WriteBatch};

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(Box::new(e))
    }
}

/// The embedded default store.
///
/// After an I/O error (a full disk) sled 0.34 sets a global error and
/// refuses every later write until the database is opened again (its
/// `PageCache::start` is the only place that clears it); reads go on
/// working. So a failed write marks the store poisoned, and
/// [`Store::recover`] reopens it once a test write shows the disk has room.
pub struct SledStore {
    dir: PathBuf,
    cache_bytes: u64,
    open: RwLock<Option<Opened>>,
    poisoned: AtomicBool,
}

struct Opened {
    db: sled::Db,
    tree: sled::Tree,
}

/// The default page cache. sled counts it in on-disk bytes and holds 1.5-2
/// times as much heap (`gpufleet-bench store-growth`: +7 MiB for 4 MiB,
/// +26 MiB for 16 MiB). Live jobs are in the controller's own memory and
/// new keys (time-ordered job ids) land on the newest pages, so the cache
/// only serves history reads, which the OS page cache also holds; a small
/// one fills within the first minute of load instead of growing the
/// controller for minutes.
pub const DEFAULT_CACHE_BYTES: u64 = 4 << 20;

/// The test write before a reopen: about two of sled's segments (512 KiB
/// each by default), so a reopened store can at least start a segment.
const PROBE_BYTES: usize = 1 << 20;

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let opened = open_db(dir, cache_bytes)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            cache_bytes,
            open: RwLock::new(Some(opened)),
            poisoned: AtomicBool::new(false),
        })
    }

    /// Another tree of the same database, for data outside the `Store`
    /// trait's keyspaces (telemetry rollups). Not reopened by
    /// [`Store::recover`]: for tools and benchmarks.
    pub fn open_tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        self.with(|opened| Ok(opened.db.open_tree(name)?))
    }

    fn with<T>(&self, f: impl FnOnce(&Opened) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let open = self.open.read().unwrap_or_else(|p| p.into_inner());
        match open.as_ref() {
            Some(opened) => f(opened),
            None => Err(StoreError::Io(
                "the store is closed while it is being reopened after a write failure".into(),
            )),
        }
    }

    /// Writes and syncs [`PROBE_BYTES`] beside the store, then removes them.
    fn probe_room(&self) -> Result<(), StoreError> {
        let path = self.dir.join("store.probe");
        let written = (|| {
            let mut file = std::fs::File::create(&path)?;
            file.write_all(&vec![0u8; PROBE_BYTES])?;
            file.sync_all()
        })();
        let _ = std::fs::remove_file(&path);
        written.map_err(|source| StoreError::File {
            path: path.display().to_string(),
            what: "write a test file to".into(),
            source,
        })
    }
}

fn open_db(dir: &Path, cache_bytes: u64) -> Result<Opened, StoreError> {
    let path = dir.join("store");
    // sled's background flusher may hold the file lock for a moment
    // after a previous handle in this process was dropped (a restart or
    // a reopen): retry briefly before calling the directory busy.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let db = loop {
        let opened = sled::Config::new()
            .path(&path)
            // Bounded page cache (sled's default is 1 GiB).
            .cache_capacity(cache_bytes)
            .open();
        match opened {
            Ok(db) => break db,
            Err(sled::Error::Io(e))
                if (e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock"))
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(source) => {
                return Err(StoreError::Open {
                    path: path.display().to_string(),
                    source: Box::new(source),
                });
            }
        }
    };
    let tree = db.open_tree("state")?;
    Ok(Opened { db, tree })
}

impl Store for SledStore {
    fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut sled_batch = sled::Batch::default();
        for (key, value) in batch.ops() {
            match value {
                Some(value) => sled_batch.insert(key.as_slice(), value.as_slice()),
                None => sled_batch.remove(key.as_slice()),
            }
        }
        let applied = self.with(|opened| {
            opened.tree.apply_batch(sled_batch)?;
            // Write first, then act: callers announce a change only after this.
            opened.db.flush()?;
            Ok(())
        });
        if applied.is_err() {
            self.poisoned.store(true, Ordering::SeqCst);
        }
        applied
    }

    fn get_raw(&self, space: Keyspace, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|opened| Ok(opened.tree.get(space.key(id))?.map(|v| v.to_vec())))
    }

    fn visit_raw(
        &self,
        space: Keyspace,
        range: IdRange<'_>,
        visit: &mut dyn FnMut(&str, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let Some((start, end)) = space.bounds(range) else {
            return Ok(());
        };
        self.with(|opened| {
            let entries = opened.tree.range(start..end);
            let mut step =
                |entry: sled::Result<(sled::IVec, sled::IVec)>| -> Result<bool, StoreError> {
                    let (key, value) = entry?;
                    Ok(visit(&space.id_of(&key), &value))
                };
            super::walk(entries, range.reverse, &mut step)
        })
    }

    /// Reopens a store that a failed write poisoned, once the disk has
    /// room: what the failed writes left on disk is recovered by sled as
    /// on a restart (an incomplete batch is discarded), and the caller
    /// applies them again.
    fn recover(&self) -> Result<bool, StoreError> {
        if !self.poisoned.load(Ordering::SeqCst) {
            return Ok(false);
        }
        // Until the disk has room the old handle keeps serving reads.
        self.probe_room()?;
        let mut open = self.open.write().unwrap_or_else(|p| p.into_inner());
        // The old database must be gone (its file lock released) first.
        drop(open.take());
        *open = Some(open_db(&self.dir, self.cache_bytes)?);
        self.poisoned.store(false, Ordering::SeqCst);
        tracing::info!(dir = %self.dir.display(), "reopened the store after a write failure");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::load_all;
    use gpufleet_proto::v1::Job;

    #[test]
    fn batch_survives_reopen_and_delete_removes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            let mut batch = WriteBatch::default();
            for id in ["job-a", "job-b"] {
                let job = Job {
                    id: id.to_string(),
                    ..Default::default()
                };
                batch.put(Keyspace::Jobs, id, &job);
            }
            store.apply(batch).unwrap();
            let mut batch = WriteBatch::default();
            batch.delete(Keyspace::Jobs, "job-a");
            store.apply(batch).unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        let jobs: Vec<Job> = load_all(&store, Keyspace::Jobs).unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].id, "job-b");
        let nodes: Vec<Job> = load_all(&store, Keyspace::Nodes).unwrap();
        assert!(nodes.is_empty());
    }
}
