//! Durable state. The `Store` trait is deliberately narrow (typed keyspaces of
//! prost messages, atomic batches, prefix scans) so that an etcd
//! implementation can follow the embedded sled one.

use std::path::Path;

use prost::Message;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the store in {path}: {source}; is another controller using this data dir?"
    )]
    Open { path: String, source: sled::Error },
    #[error("store I/O failed: {0}")]
    Io(#[from] sled::Error),
    #[error("stored record {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        source: prost::DecodeError,
    },
    #[error("stored record {key} is corrupt: {message}")]
    CorruptRecord { key: String, message: String },
}

/// A keyspace: every key of a record kind shares its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keyspace {
    Nodes,
    Jobs,
    /// Usage ledger records, by allocation id.
    Usage,
    /// Market signals, by `<minute>/<provider>/<region>/<generation>`.
    Market,
    /// Client tokens (hashed), by token id.
    Tokens,
    /// Node identity bindings (hashed node secrets), by node id.
    NodeIdentities,
    /// Single values, by name (e.g. the generated join token's digest).
    Settings,
    /// Highest sequence number applied from each agent (a `u64` message),
    /// by node id, so a restarted controller still drops replayed events
    /// it already applied.
    AgentSeq,
}

impl Keyspace {
    fn prefix(self) -> &'static str {
        match self {
            Keyspace::Nodes => "node/",
            Keyspace::Jobs => "job/",
            Keyspace::Usage => "usage/",
            Keyspace::Market => "market/",
            Keyspace::Tokens => "token/",
            Keyspace::NodeIdentities => "node-identity/",
            Keyspace::Settings => "setting/",
            Keyspace::AgentSeq => "agent_seq/",
        }
    }

    fn key(self, id: &str) -> Vec<u8> {
        let mut key = self.prefix().as_bytes().to_vec();
        key.extend_from_slice(id.as_bytes());
        key
    }
}

/// Writes applied all together or not at all.
#[derive(Debug, Default)]
pub struct WriteBatch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteBatch {
    pub fn put<M: Message>(&mut self, space: Keyspace, id: &str, record: &M) {
        self.ops.push((space.key(id), Some(record.encode_to_vec())));
    }

    /// A value that is not a message (e.g. a digest).
    pub fn put_raw(&mut self, space: Keyspace, id: &str, value: Vec<u8>) {
        self.ops.push((space.key(id), Some(value)));
    }

    pub fn delete(&mut self, space: Keyspace, id: &str) {
        self.ops.push((space.key(id), None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

pub trait Store: Send + Sync + 'static {
    /// Applies the batch atomically and durably (flushed before returning).
    fn apply(&self, batch: WriteBatch) -> Result<(), StoreError>;
    /// Every record of a keyspace, as raw encoded messages keyed by id.
    fn scan_raw(&self, space: Keyspace) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}

/// Decodes every record of a keyspace.
/// Every record of a keyspace with its id.
pub fn load_all_by_id<M: Message + Default>(
    store: &dyn Store,
    space: Keyspace,
) -> Result<Vec<(String, M)>, StoreError> {
    store
        .scan_raw(space)?
        .into_iter()
        .map(|(id, bytes)| {
            let record = M::decode(bytes.as_slice()).map_err(|source| StoreError::Corrupt {
                key: format!("{}{id}", space.prefix()),
                source,
            })?;
            Ok((id, record))
        })
        .collect()
}

pub fn load_all<M: Message + Default>(
    store: &dyn Store,
    space: Keyspace,
) -> Result<Vec<M>, StoreError> {
    store
        .scan_raw(space)?
        .into_iter()
        .map(|(id, bytes)| {
            M::decode(bytes.as_slice()).map_err(|source| StoreError::Corrupt {
                key: format!("{}{id}", space.prefix()),
                source,
            })
        })
        .collect()
}

/// The embedded default: one sled tree, keyspaces by key prefix, so one
/// `sled::Batch` is atomic across record kinds.
pub struct SledStore {
    db: sled::Db,
    tree: sled::Tree,
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("store");
        // sled's background flusher may hold the file lock for a moment
        // after a previous handle in this process was dropped (a restart):
        // retry briefly before calling the directory busy.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            let opened = sled::Config::new()
                .path(&path)
                // Bounded page cache (sled's default is 1 GiB).
                .cache_capacity(64 * 1024 * 1024)
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
                        source,
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
        for (key, value) in batch.ops {
            match value {
                Some(value) => sled_batch.insert(key, value),
                None => sled_batch.remove(key),
            }
        }
        self.tree.apply_batch(sled_batch)?;
        // Write first, then act: callers announce a change only after this.
        self.db.flush()?;
        Ok(())
    }

    fn scan_raw(&self, space: Keyspace) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = space.prefix();
        let mut out = Vec::new();
        for entry in self.tree.scan_prefix(prefix.as_bytes()) {
            let (key, value) = entry?;
            let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
            out.push((id, value.to_vec()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
