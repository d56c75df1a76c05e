//! The etcd backend of [`Store`], for three controllers that share their
//! state (docs/ha.md).
//!
//! **Why our own client.** The `etcd-client` crate generates its bindings
//! in a build script with `tonic-build`, which runs the system `protoc`
//! (forbidden here: a fresh machine builds with cargo alone), and each of
//! its releases pins one tonic/prost line, so the workspace could not move
//! to a new tonic before it does. We need five calls (range, txn, lease
//! grant/keep-alive/revoke, status, authenticate), so the proto crate
//! compiles that subset of etcd's v3 protos with protox, like our own
//! (`proto/proto/etcd/`), and [`client`] is a small tonic client over it:
//! endpoints tried in turn, TLS, auth tokens.
//!
//! **Layout.** Every key is `<prefix>s/<keyspace prefix><id>` (the
//! keyspace prefixes of [`Keyspace`]), values the same prost bytes as in
//! sled, so a keyspace is one etcd key range and today's range scans are
//! etcd range reads. The leader key (`<prefix>leader`, [`election`]) is
//! outside the state range.
//!
//! **Atomicity and fencing.** One [`WriteBatch`] is one etcd transaction
//! (a key written twice keeps its last write, as etcd refuses a key twice
//! in one transaction). When a [`Fence`] is set (a leader's), the
//! transaction also compares the leader key's create revision with the
//! one this controller created: once its lease lapsed and the key is gone
//! or another controller's, the write fails with [`StoreError::Fenced`]
//! and nothing of it is applied. `apply` returns only after etcd
//! acknowledged the transaction (a quorum has it in its log), which is
//! what write-first-then-act needs.
//!
//! **Scans** read pages of [`PAGE`] keys, all at the revision of the
//! first page, so a walk sees one consistent snapshot without holding a
//! keyspace in memory.

pub mod client;
pub mod election;
pub mod migrate;
pub mod test_cluster;

use std::sync::{Arc, RwLock};

use gpufleet_proto::etcd::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use gpufleet_proto::etcd::etcdserverpb::range_request::{SortOrder, SortTarget};
use gpufleet_proto::etcd::etcdserverpb::request_op::Request;
use gpufleet_proto::etcd::etcdserverpb::{
    Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

pub use self::client::{EtcdAuth, EtcdClient, EtcdOptions, EtcdTls};

use super::{IdRange, Keyspace, Store, StoreError, WriteBatch};

/// Keys per range read of a scan.
const PAGE: i64 = 512;

/// The most writes the controller puts in one transaction: etcd must run
/// with `--max-txn-ops` at least this (docs/ha.md; its default is 128).
pub const MAX_TXN_OPS: usize = 10_000;

/// The leader's claim every write is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: Vec<u8>,
    /// The leader key's create revision when this controller created it.
    pub create_revision: i64,
}

/// The controller's state in etcd.
#[derive(Debug, Clone)]
pub struct EtcdStore {
    client: Arc<EtcdClient>,
    /// `<prefix>s/`.
    root: Vec<u8>,
    fence: Arc<RwLock<Option<Fence>>>,
    /// Flips to true on the first write refused by the fence.
    fenced: Arc<tokio::sync::watch::Sender<bool>>,
}

impl EtcdStore {
    pub fn new(client: Arc<EtcdClient>) -> Self {
        let mut root = client.options().prefix.as_bytes().to_vec();
        root.extend_from_slice(b"s/");
        Self {
            client,
            root,
            fence: Arc::default(),
            fenced: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// The leader key's value (the leader's URL), if a controller leads.
    pub fn leader(&self) -> Result<Option<String>, StoreError> {
        let mut key = self.client.options().prefix.as_bytes().to_vec();
        key.extend_from_slice(b"leader");
        let client = Arc::clone(&self.client);
        let response = self.client.block(async move {
            client
                .call("leader read", |index| {
                    let mut kv = client.kv(index);
                    let request = RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    };
                    async move { kv.range(request).await }
                })
                .await
        })??;
        Ok(response
            .into_inner()
            .kvs
            .into_iter()
            .next()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    /// Resolves once a write was refused by the fence: another controller
    /// leads now.
    pub fn fenced(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut fenced = self.fenced.subscribe();
        async move {
            let _ = fenced.wait_for(|fenced| *fenced).await;
        }
    }

    pub fn client(&self) -> &Arc<EtcdClient> {
        &self.client
    }

    /// From now on every write must hold `fence` (None: no check, for tools
    /// such as the migration that run without a leader).
    pub fn set_fence(&self, fence: Option<Fence>) {
        *self.fence.write().unwrap_or_else(|p| p.into_inner()) = fence;
    }

    fn fence(&self) -> Option<Fence> {
        self.fence.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn full(&self, key: &[u8]) -> Vec<u8> {
        let mut full = self.root.clone();
        full.extend_from_slice(key);
        full
    }

    /// Builds the transaction of a batch: its last write of each key, in
    /// key order.
    fn txn(&self, batch: &WriteBatch) -> TxnRequest {
        let mut last: std::collections::BTreeMap<&[u8], &Option<Vec<u8>>> = Default::default();
        for (key, value) in batch.ops() {
            last.insert(key.as_slice(), value);
        }
        let success = last
            .into_iter()
            .map(|(key, value)| RequestOp {
                request: Some(match value {
                    Some(value) => Request::RequestPut(PutRequest {
                        key: self.full(key),
                        value: value.clone(),
                        ..Default::default()
                    }),
                    None => Request::RequestDeleteRange(DeleteRangeRequest {
                        key: self.full(key),
                        ..Default::default()
                    }),
                }),
            })
            .collect();
        let compare = self
            .fence()
            .map(|fence| Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: fence.key,
                target_union: Some(TargetUnion::CreateRevision(fence.create_revision)),
                range_end: Vec::new(),
            })
            .into_iter()
            .collect();
        TxnRequest {
            compare,
            success,
            failure: Vec::new(),
        }
    }
}

impl Store for EtcdStore {
    fn max_batch_ops(&self) -> Option<usize> {
        Some(MAX_TXN_OPS)
    }

    fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let txn = self.txn(&batch);
        let fenced = !txn.compare.is_empty();
        let client = Arc::clone(&self.client);
        let succeeded = self.client.block(async move {
            client
                .call("transaction", |index| {
                    let mut kv = client.kv(index);
                    let txn = txn.clone();
                    async move { kv.txn(txn).await }
                })
                .await
                .map(|response| response.into_inner().succeeded)
        })??;
        if fenced && !succeeded {
            self.fenced.send_replace(true);
            tracing::error!("a write was refused: another controller leads now");
            return Err(StoreError::Fenced);
        }
        Ok(())
    }

    fn get_raw(&self, space: Keyspace, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.full(&space.key(id));
        let client = Arc::clone(&self.client);
        let response = self.client.block(async move {
            client
                .call("read", |index| {
                    let mut kv = client.kv(index);
                    let request = RangeRequest {
                        key: key.clone(),
                        ..Default::default()
                    };
                    async move { kv.range(request).await }
                })
                .await
        })??;
        Ok(response
            .into_inner()
            .kvs
            .into_iter()
            .next()
            .map(|kv| kv.value))
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
        let (mut start, mut end) = (self.full(&start), self.full(&end));
        let root = self.root.len();
        let mut revision = 0;
        loop {
            let request = RangeRequest {
                key: start.clone(),
                range_end: end.clone(),
                limit: PAGE,
                revision,
                sort_order: if range.reverse {
                    SortOrder::Descend as i32
                } else {
                    SortOrder::Ascend as i32
                },
                sort_target: SortTarget::Key as i32,
                ..Default::default()
            };
            let client = Arc::clone(&self.client);
            let page = self.client.block(async move {
                client
                    .call("range read", |index| {
                        let mut kv = client.kv(index);
                        let request = request.clone();
                        async move { kv.range(request).await }
                    })
                    .await
            })??;
            let page = page.into_inner();
            if revision == 0 {
                revision = page.header.map(|h| h.revision).unwrap_or_default();
            }
            let Some(last) = page.kvs.last().map(|kv| kv.key.clone()) else {
                return Ok(());
            };
            for kv in &page.kvs {
                let key = kv.key.get(root..).unwrap_or_default();
                if !visit(&space.id_of(key), &kv.value) {
                    return Ok(());
                }
            }
            if !page.more {
                return Ok(());
            }
            if range.reverse {
                end = last;
            } else {
                start = last;
                start.push(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_is_one_transaction_with_the_last_write_of_each_key() {
        let client = EtcdClient::connect(EtcdOptions::new(
            vec!["unix:///nonexistent".into()],
            "fleet/",
        ))
        .unwrap();
        let store = EtcdStore::new(client);
        let mut batch = WriteBatch::default();
        batch.put_raw(Keyspace::Jobs, "a", vec![1]);
        batch.delete(Keyspace::Jobs, "a");
        batch.put_raw(Keyspace::Nodes, "n", vec![2]);
        let txn = store.txn(&batch);
        assert!(txn.compare.is_empty(), "no fence, no compare");
        assert_eq!(txn.success.len(), 2);
        assert!(matches!(
            &txn.success[0].request,
            Some(Request::RequestDeleteRange(d)) if d.key == b"fleet/s/job/a"
        ));
        store.set_fence(Some(Fence {
            key: b"fleet/leader".to_vec(),
            create_revision: 7,
        }));
        let txn = store.txn(&batch);
        assert_eq!(txn.compare.len(), 1);
        assert_eq!(
            txn.compare[0].target_union,
            Some(TargetUnion::CreateRevision(7))
        );
    }

    #[test]
    fn scans_page_through_long_ranges_in_both_directions() {
        let Some(store) = test_cluster::fresh_store() else {
            return;
        };
        let count = 3 * PAGE as usize + 7;
        let mut batch = WriteBatch::default();
        for n in 0..count {
            batch.put_raw(Keyspace::Usage, &format!("{n:05}"), vec![1]);
        }
        store.apply(batch).unwrap();
        let walk = |reverse| {
            let mut ids = Vec::new();
            let range = IdRange {
                reverse,
                ..IdRange::default()
            };
            store
                .visit_raw(Keyspace::Usage, range, &mut |id, _| {
                    ids.push(id.to_string());
                    true
                })
                .unwrap();
            ids
        };
        let forward = walk(false);
        let expected: Vec<String> = (0..count).map(|n| format!("{n:05}")).collect();
        assert_eq!(forward, expected);
        let mut backward = walk(true);
        backward.reverse();
        assert_eq!(backward, expected);
    }
}
