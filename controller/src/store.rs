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
    /// A file the store keeps outside sled (telemetry rollup segments).
    #[error("cannot {what} {path}: {source}")]
    File {
        path: String,
        what: String,
        source: std::io::Error,
    },
    /// A group commit (see [`crate::commit`]) could not be made durable.
    /// The change stays in memory and is retried; nothing that depends on
    /// it has been announced.
    #[error("store write failed: {0}; nothing that depends on it was announced (it is retried)")]
    NotDurable(String),
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
    /// Every job by creation time: `<created ns, 20 digits>/<job id>` →
    /// the job's tenant. Lists jobs newest first without holding finished
    /// jobs in memory.
    JobsByCreated,
    /// Finished jobs by end time: `<finished s, 12 digits>/<job id>` → the
    /// job's final state (an `i32` message). Finished-job retention walks it
    /// oldest first.
    JobsByFinished,
    /// Usage records by end time: `<ended ms, 13 digits>/<allocation id>` →
    /// empty. Record listings and ledger retention walk it.
    UsageByEnd,
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
            Keyspace::JobsByCreated => "job-created/",
            Keyspace::JobsByFinished => "job-finished/",
            Keyspace::UsageByEnd => "usage-end/",
        }
    }

    pub(crate) fn key(self, id: &str) -> Vec<u8> {
        let mut key = self.prefix().as_bytes().to_vec();
        key.extend_from_slice(id.as_bytes());
        key
    }

    /// The keys `range` covers: `[start, end)`, or None when empty.
    pub(crate) fn bounds(self, range: IdRange<'_>) -> Option<(Vec<u8>, Vec<u8>)> {
        let start = self.key(range.from);
        let end = match range.to {
            Some(to) => self.key(to),
            // Every prefix ends in '/', so '/' + 1 bounds the keyspace.
            None => {
                let mut end = self.prefix().as_bytes().to_vec();
                if let Some(last) = end.last_mut() {
                    *last += 1;
                }
                end
            }
        };
        (start < end).then_some((start, end))
    }

    /// The id of a key of this keyspace.
    pub(crate) fn id_of(self, key: &[u8]) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(key.get(self.prefix().len()..).unwrap_or_default())
    }
}

/// Writes applied all together or not at all.
#[derive(Debug, Default, Clone)]
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

    /// The writes in order, as (key, value; None = delete).
    pub(crate) fn ops(&self) -> &[(Vec<u8>, Option<Vec<u8>>)] {
        &self.ops
    }

    /// Appends `other`'s writes after this batch's: a later write of a key
    /// wins, as if the batches were applied one after the other.
    pub(crate) fn append(&mut self, other: WriteBatch) {
        self.ops.extend(other.ops);
    }
}

/// Which ids of a keyspace a [`Store::visit_raw`] walks, and in which order.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdRange<'a> {
    /// Inclusive lower bound ("" = the keyspace's first id).
    pub from: &'a str,
    /// Exclusive upper bound (None = past the keyspace's last id).
    pub to: Option<&'a str>,
    /// Highest id first.
    pub reverse: bool,
}

impl<'a> IdRange<'a> {
    /// Every id below `to`, ascending (oldest first, for time-ordered ids).
    pub fn below(to: &'a str) -> Self {
        Self {
            from: "",
            to: Some(to),
            reverse: false,
        }
    }

    /// Every id that starts with `prefix`, ascending.
    pub fn prefixed(prefix: &'a str) -> Self {
        Self {
            from: prefix,
            to: None,
            reverse: false,
        }
    }
}

/// Writes a long run of records (a one-off rewrite such as a migration) in
/// batches of bounded size instead of one batch the size of the store.
pub struct ChunkedWriter<'a> {
    store: &'a dyn Store,
    batch: WriteBatch,
    records: usize,
}

impl<'a> ChunkedWriter<'a> {
    const RECORDS_PER_BATCH: usize = 10_000;

    pub fn new(store: &'a dyn Store) -> Self {
        Self {
            store,
            batch: WriteBatch::default(),
            records: 0,
        }
    }

    /// The batch the next record's writes go to.
    pub fn batch(&mut self) -> &mut WriteBatch {
        &mut self.batch
    }

    /// Counts one record written to [`Self::batch`]; applies the batch
    /// when it is full.
    pub fn record_done(&mut self) -> Result<(), StoreError> {
        self.records += 1;
        if self.records.is_multiple_of(Self::RECORDS_PER_BATCH) {
            self.store.apply(std::mem::take(&mut self.batch))?;
        }
        Ok(())
    }

    /// Applies what is left; returns how many records were written.
    pub fn finish(self) -> Result<usize, StoreError> {
        self.store.apply(self.batch)?;
        Ok(self.records)
    }
}

pub trait Store: Send + Sync + 'static {
    /// Applies the batch atomically and durably (flushed before returning).
    fn apply(&self, batch: WriteBatch) -> Result<(), StoreError>;
    /// Every record of a keyspace, as raw encoded messages keyed by id.
    /// For small keyspaces; large ones are walked with [`Store::visit_raw`].
    fn scan_raw(&self, space: Keyspace) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        self.visit_raw(space, IdRange::default(), &mut |id, value| {
            out.push((id.to_string(), value.to_vec()));
            true
        })?;
        Ok(out)
    }
    /// One record, raw.
    fn get_raw(&self, space: Keyspace, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Calls `visit` with each record in `range`, one at a time (nothing is
    /// collected), until it returns false.
    fn visit_raw(
        &self,
        space: Keyspace,
        range: IdRange<'_>,
        visit: &mut dyn FnMut(&str, &[u8]) -> bool,
    ) -> Result<(), StoreError>;
}

/// One decoded record, if present.
pub fn get<M: Message + Default>(
    store: &dyn Store,
    space: Keyspace,
    id: &str,
) -> Result<Option<M>, StoreError> {
    store
        .get_raw(space, id)?
        .map(|bytes| decode(space, id, &bytes))
        .transpose()
}

/// Decodes a record read from `space` under `id`.
pub fn decode<M: Message + Default>(
    space: Keyspace,
    id: &str,
    bytes: &[u8],
) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|source| StoreError::Corrupt {
        key: format!("{}{id}", space.prefix()),
        source,
    })
}

/// Calls `visit` with each decoded record in `range` until it returns
/// `Ok(false)`; a corrupt record or an error from `visit` stops the walk
/// and is returned.
pub fn visit<M: Message + Default>(
    store: &dyn Store,
    space: Keyspace,
    range: IdRange<'_>,
    mut visit: impl FnMut(&str, M) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let mut failed = None;
    store.visit_raw(
        space,
        range,
        &mut |id, bytes| match decode(space, id, bytes).and_then(|record| visit(id, record)) {
            Ok(more) => more,
            Err(e) => {
                failed = Some(e);
                false
            }
        },
    )?;
    failed.map_or(Ok(()), Err)
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
