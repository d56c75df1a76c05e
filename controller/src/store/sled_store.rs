//! The embedded default store: one sled tree, keyspaces by key prefix, so
//! one `sled::Batch` is atomic across record kinds.

use std::path::Path;

use super::{IdRange, Keyspace, Store, StoreError, WriteBatch};

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(Box::new(e))
    }
}

/// The embedded default store.
pub struct SledStore {
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

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let path = dir.join("store");
        // sled's background flusher may hold the file lock for a moment
        // after a previous handle in this process was dropped (a restart):
        // retry briefly before calling the directory busy.
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
        Ok(Self { db, tree })
    }

    /// Another tree of the same database, for data outside the `Store`
    /// trait's keyspaces (telemetry rollups).
    pub fn open_tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }
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
        self.tree.apply_batch(sled_batch)?;
        // Write first, then act: callers announce a change only after this.
        self.db.flush()?;
        Ok(())
    }

    fn get_raw(&self, space: Keyspace, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(space.key(id))?.map(|v| v.to_vec()))
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
        let entries = self.tree.range(start..end);
        let mut step = |entry: sled::Result<(sled::IVec, sled::IVec)>| -> Result<bool, StoreError> {
            let (key, value) = entry?;
            Ok(visit(&space.id_of(&key), &value))
        };
        if range.reverse {
            for entry in entries.rev() {
                if !step(entry)? {
                    break;
                }
            }
        } else {
            for entry in entries {
                if !step(entry)? {
                    break;
                }
            }
        }
        Ok(())
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
