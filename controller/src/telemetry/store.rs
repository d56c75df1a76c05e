//! Where rollups are persisted: the `RollupStore` trait the hub writes
//! finished minutes through and history queries read from, the helpers
//! its implementations share, and an in-memory store for tests and
//! benchmarks. The controller's store is segment files
//! ([`super::segments`]).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use super::codec::NodeMinute;
use super::rollup::Rollup;
use std::sync::Arc;

use crate::store::{StoreError, StoreHealth, StorePart};

/// Where rollups are persisted.
pub trait RollupStore: Send + Sync + 'static {
    /// Merges each node-minute record into what is stored for its GPUs and
    /// minute: durable when it returns, and nothing of the call stored when
    /// it fails (the hub retries it whole). The hub calls it every flush
    /// interval with what finished since, in chunks of up to 100
    /// node-minutes, so one disk sync per call is cheap; per GPU-minute it
    /// would not be.
    fn merge(&self, records: &[NodeMinute]) -> std::result::Result<(), StoreError>;
    /// Rollups of several GPUs of one node (reported by `node_id`) with
    /// `start <= minute < end`: one list per uuid, in the order given, each
    /// in minute order. A store that keeps a node's GPUs in one record
    /// reads each record once for all of them.
    fn range_gpus(
        &self,
        node_id: &str,
        uuids: &[&str],
        start: u64,
        end: u64,
    ) -> std::result::Result<Vec<Vec<Rollup>>, StoreError>;
    /// [`RollupStore::range_gpus`] of one GPU.
    fn range(
        &self,
        node_id: &str,
        uuid: &str,
        start: u64,
        end: u64,
    ) -> std::result::Result<Vec<Rollup>, StoreError> {
        let mut one = self.range_gpus(node_id, &[uuid], start, end)?;
        Ok(one.pop().unwrap_or_default())
    }
    /// Deletes every rollup older than `minute`; returns how many stored
    /// records went (one record may hold several GPUs).
    fn prune_before(&self, minute: u64) -> std::result::Result<u64, StoreError>;
    /// Files and bytes the rollups take on disk, for a store that keeps
    /// them in files of its own (`/metrics`).
    fn disk_usage(&self) -> Option<RollupDiskUsage> {
        None
    }
}

/// A rollup store whose write failures and recoveries are reported to a
/// [`StoreHealth`] (the segment files recover in place: the hub keeps what
/// failed and the retry writes it at the same offset).
pub struct ReportingRollups {
    inner: Arc<dyn RollupStore>,
    health: Arc<StoreHealth>,
}

impl ReportingRollups {
    pub fn new(inner: Arc<dyn RollupStore>, health: Arc<StoreHealth>) -> Self {
        Self { inner, health }
    }

    fn report<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        match &result {
            Ok(_) => self.health.recovered(StorePart::Rollups),
            Err(e) => self.health.failed(StorePart::Rollups, e),
        }
        result
    }
}

impl RollupStore for ReportingRollups {
    fn merge(&self, records: &[NodeMinute]) -> Result<(), StoreError> {
        self.report(self.inner.merge(records))
    }

    fn range_gpus(
        &self,
        node_id: &str,
        uuids: &[&str],
        start: u64,
        end: u64,
    ) -> Result<Vec<Vec<Rollup>>, StoreError> {
        self.inner.range_gpus(node_id, uuids, start, end)
    }

    fn prune_before(&self, minute: u64) -> Result<u64, StoreError> {
        self.report(self.inner.prune_before(minute))
    }

    fn disk_usage(&self) -> Option<RollupDiskUsage> {
        self.inner.disk_usage()
    }
}

/// What [`RollupStore::disk_usage`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RollupDiskUsage {
    /// Segment files, the one being written included.
    pub segments: u64,
    /// Bytes of the segment files and their indexes.
    pub bytes: u64,
}

/// Adds `rollup` to `minutes`, merged with what its minute already has.
pub(crate) fn merge_minute(minutes: &mut BTreeMap<u64, Rollup>, rollup: Rollup) {
    match minutes.entry(rollup.minute) {
        std::collections::btree_map::Entry::Occupied(mut held) => held.get_mut().merge(&rollup),
        std::collections::btree_map::Entry::Vacant(slot) => {
            slot.insert(rollup);
        }
    }
}

/// Merges a decoded node-minute record's GPUs into the per-GPU maps of
/// the `uuids` asked for; other GPUs are skipped.
pub(crate) fn place_gpus(
    uuids: &[&str],
    by_gpu: &mut [BTreeMap<u64, Rollup>],
    minute: u64,
    gpus: Vec<(String, Rollup)>,
) {
    for (uuid, rollup) in gpus {
        if let Some(i) = uuids.iter().position(|u| *u == uuid) {
            merge_minute(&mut by_gpu[i], Rollup { minute, ..rollup });
        }
    }
}

/// In-memory rollups by (GPU, minute), for tests and benchmarks.
#[derive(Default)]
pub struct MemoryRollupStore {
    rows: Mutex<BTreeMap<(String, u64), Rollup>>,
}

impl MemoryRollupStore {
    fn rows(&self) -> MutexGuard<'_, BTreeMap<(String, u64), Rollup>> {
        self.rows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stored GPU-minutes.
    pub fn len(&self) -> usize {
        self.rows().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl RollupStore for MemoryRollupStore {
    fn merge(&self, records: &[NodeMinute]) -> std::result::Result<(), StoreError> {
        let mut rows = self.rows();
        for record in records {
            let gpus = record.gpus().map_err(|message| StoreError::CorruptRecord {
                key: format!("queued rollups of node {}", record.node_id),
                message,
            })?;
            for (uuid, rollup) in gpus {
                rows.entry((uuid, record.minute))
                    .and_modify(|r| r.merge(&rollup))
                    .or_insert(rollup);
            }
        }
        Ok(())
    }

    fn range_gpus(
        &self,
        _node_id: &str,
        uuids: &[&str],
        start: u64,
        end: u64,
    ) -> std::result::Result<Vec<Vec<Rollup>>, StoreError> {
        let rows = self.rows();
        Ok(uuids
            .iter()
            .map(|uuid| {
                if start >= end {
                    return Vec::new();
                }
                rows.range((uuid.to_string(), start)..(uuid.to_string(), end))
                    .map(|(_, r)| r.clone())
                    .collect()
            })
            .collect())
    }

    fn prune_before(&self, minute: u64) -> std::result::Result<u64, StoreError> {
        let mut rows = self.rows();
        let before = rows.len();
        rows.retain(|(_, m), _| *m >= minute);
        Ok((before - rows.len()) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::test_support::{finished, sample, t0, util};

    fn rollup(minute: u64, util: u32) -> Rollup {
        let mut r = Rollup::new(minute);
        r.add(&sample("GPU-x", t0(), util, 1));
        r
    }

    #[test]
    fn the_memory_store_merges_minutes_reads_ranges_and_prunes() {
        let store = MemoryRollupStore::default();
        assert!(store.is_empty());
        store
            .merge(&NodeMinute::group(&[
                finished("n1", "GPU-a", &rollup(4, 10)),
                finished("n1", "GPU-b", &rollup(4, 20)),
                finished("n1", "GPU-a", &rollup(5, 30)),
            ]))
            .unwrap();
        // A minute written again is merged, not replaced.
        store
            .merge(&NodeMinute::group(&[finished(
                "n1",
                "GPU-a",
                &rollup(5, 50),
            )]))
            .unwrap();
        assert_eq!(store.len(), 3);
        let sums = |rollups: &[Rollup]| -> Vec<(u64, u32, f64)> {
            rollups
                .iter()
                .map(|r| (r.minute, r.get(util()).count, r.get(util()).sum))
                .collect()
        };
        let both = store.range_gpus("n1", &["GPU-b", "GPU-a"], 0, 10).unwrap();
        assert_eq!(sums(&both[0]), [(4, 1, 20.0)]);
        assert_eq!(sums(&both[1]), [(4, 1, 10.0), (5, 2, 80.0)]);
        assert_eq!(
            sums(&store.range("n1", "GPU-a", 5, 6).unwrap()),
            [(5, 2, 80.0)]
        );
        assert!(store.range("n1", "GPU-a", 6, 5).unwrap().is_empty());
        assert_eq!(store.prune_before(5).unwrap(), 2);
        assert_eq!(store.len(), 1);
        assert_eq!(store.disk_usage(), None);
    }

    #[test]
    fn placing_a_records_gpus_keeps_only_those_asked_for_and_merges_minutes() {
        let mut by_gpu = vec![BTreeMap::new(); 2];
        let gpus = vec![
            ("GPU-a".to_string(), rollup(0, 1)),
            ("GPU-zz".to_string(), rollup(0, 2)),
            ("GPU-b".to_string(), rollup(0, 3)),
        ];
        // The record's minute wins over what its rollups say.
        place_gpus(&["GPU-b", "GPU-a"], &mut by_gpu, 9, gpus.clone());
        place_gpus(&["GPU-b", "GPU-a"], &mut by_gpu, 9, gpus);
        assert_eq!(by_gpu[0][&9].get(util()).sum, 6.0);
        assert_eq!(by_gpu[1][&9].get(util()).sum, 2.0);
        assert_eq!(by_gpu[1][&9].minute, 9);
    }
}
