//! Durable state. The `Store` trait is deliberately narrow (typed keyspaces of
//! prost messages, atomic batches, ordered range scans) so that an etcd
//! implementation can follow the embedded sled one: nothing in it names a
//! backend, and [`conformance`] is the contract every backend passes.
//!
//! - [`SledStore`] (`sled_store.rs`): the embedded default, one sled tree.
//! - [`EtcdStore`] (`etcd/`): etcd, for three controllers with leader
//!   election (docs/ha.md).
//! - [`MemoryStore`] (`memory.rs`): a `BTreeMap`, for tests and tools.
//!
//! Per-GPU telemetry rollups are not in it (see `crate::telemetry`).

pub mod etcd;
mod health;
mod memory;
mod sled_store;
mod traffic;

pub use self::etcd::EtcdStore;
pub use self::health::{Degraded, StoreHealth, StorePart, describe};
pub use self::memory::MemoryStore;
pub use self::sled_store::{DEFAULT_CACHE_BYTES, SledStore};
pub use self::traffic::{StoreTraffic, TrafficSnapshot};

use prost::Message;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the store in {path}: {source}; is another controller using this data dir?"
    )]
    Open {
        path: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The backend failed a read or a write.
    #[error("store I/O failed: {0}")]
    Io(Box<dyn std::error::Error + Send + Sync>),
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
    #[error("{0}; nothing was lost, retrying")]
    NotDurable(String),
    /// A write of a controller that is no longer the leader (its etcd
    /// lease lapsed, or another controller took over): refused by etcd,
    /// nothing of it applied.
    #[error("this controller is no longer the leader; its write was refused")]
    Fenced,
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
    /// Prices in force from the price sources, by price key
    /// (`provider/region/model/capacity`, `*` for any) → `PriceEntry`.
    Prices,
    /// Every price change: `<at ms, 13 digits>/<price key>` → `PriceChange`.
    PriceHistory,
    /// Spot interruption notices: `<noticed ms, 13 digits>/<node id>` →
    /// `Interruption`.
    Interruptions,
}

impl Keyspace {
    /// Every keyspace (a migration copies them all); `prefix` is an
    /// exhaustive match, and a test checks every prefix it names is here.
    pub const ALL: [Keyspace; 14] = [
        Keyspace::Nodes,
        Keyspace::Jobs,
        Keyspace::Usage,
        Keyspace::Market,
        Keyspace::Tokens,
        Keyspace::NodeIdentities,
        Keyspace::Settings,
        Keyspace::AgentSeq,
        Keyspace::JobsByCreated,
        Keyspace::JobsByFinished,
        Keyspace::UsageByEnd,
        Keyspace::Prices,
        Keyspace::PriceHistory,
        Keyspace::Interruptions,
    ];

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
            Keyspace::Prices => "price/",
            Keyspace::PriceHistory => "price-history/",
            Keyspace::Interruptions => "interruption/",
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

    /// The same writes with only the last write of each key, in key order:
    /// applying it leaves what applying this batch leaves.
    pub(crate) fn coalesced(self) -> WriteBatch {
        let mut last = std::collections::BTreeMap::new();
        for (key, value) in self.ops {
            last.insert(key, value);
        }
        WriteBatch {
            ops: last.into_iter().collect(),
        }
    }

    /// Bytes of keys plus values.
    pub(crate) fn bytes(&self) -> usize {
        self.ops
            .iter()
            .map(|(key, value)| key.len() + value.as_ref().map_or(0, Vec::len))
            .sum()
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

/// The controller's durable state. Keys are `Keyspace` prefix + id, values
/// encoded prost messages (or raw bytes), ids within a keyspace ordered
/// bytewise.
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
    /// Called after a failed `apply`, before it is retried: a backend that
    /// cannot write again in place after an I/O error (sled refuses every
    /// later write once one failed) reopens itself here, and says so
    /// (true). An error means "not yet": it is called again before the
    /// next retry. Reads must keep working while it fails.
    fn recover(&self) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// The most writes one `apply` may carry (etcd refuses larger
    /// transactions); None: no bound. The group commit splits its rounds
    /// at batch boundaries to stay within it.
    fn max_batch_ops(&self) -> Option<usize> {
        None
    }
}

/// Feeds `entries` to `step` in order, or reversed, until it returns
/// `Ok(false)` or fails: the walk every backend's `visit_raw` does.
pub(crate) fn walk<T, E>(
    entries: impl DoubleEndedIterator<Item = T>,
    reverse: bool,
    mut step: impl FnMut(T) -> Result<bool, E>,
) -> Result<(), E> {
    if reverse {
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

#[cfg(test)]
pub(crate) mod conformance;

#[cfg(test)]
mod tests {
    use super::{Keyspace, WriteBatch};

    #[test]
    fn a_coalesced_batch_keeps_the_last_write_of_each_key_in_key_order() {
        let mut batch = WriteBatch::default();
        batch.put_raw(Keyspace::Jobs, "b", vec![1]);
        batch.put_raw(Keyspace::Jobs, "a", vec![2]);
        batch.delete(Keyspace::Jobs, "b");
        batch.put_raw(Keyspace::Jobs, "a", vec![3, 4]);
        let batch = batch.coalesced();
        assert_eq!(
            batch.ops(),
            [
                (Keyspace::Jobs.key("a"), Some(vec![3, 4])),
                (Keyspace::Jobs.key("b"), None),
            ]
        );
        assert_eq!(batch.bytes(), "job/a".len() + 2 + "job/b".len());
    }

    /// `Keyspace::ALL` must list every keyspace, or a migration to etcd
    /// silently leaves one behind: the source of `prefix` is read, and every
    /// prefix it names must belong to a listed keyspace.
    #[test]
    fn all_lists_every_keyspace() {
        let source = include_str!("mod.rs");
        let start = source.find("fn prefix(self)").expect("prefix()");
        let body = &source[start..start + source[start..].find("\n    }\n").expect("its end")];
        let named = body.matches("=> \"").count();
        let listed: std::collections::HashSet<&str> =
            Keyspace::ALL.iter().map(|k| k.prefix()).collect();
        assert_eq!(
            listed.len(),
            Keyspace::ALL.len(),
            "a keyspace is listed twice"
        );
        assert_eq!(
            named,
            Keyspace::ALL.len(),
            "Keyspace::ALL misses a keyspace"
        );
    }
}
