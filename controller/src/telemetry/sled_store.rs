//! Rollups in a sled tree, one node-minute record per key, keyed minute
//! first (`telemetry.v3`). Controllers before segment files
//! ([`super::segments`]) stored rollups this way; the controller no longer
//! opens it. It stays as the baseline `gpufleet-bench telemetry-history`
//! measures segment files against in the same run.
//!
//! Why per node and not per GPU: sled's memory grows with the number of
//! keys written, not just their bytes; a node-minute record holds all of
//! a node's GPUs (8 on a typical host) in one compact value.
//!
//! Why minute first: every minute the whole fleet's records are written at
//! once. Keyed by minute they land together on the newest pages of the
//! tree. Keyed node first each went to the end of its node's run of keys,
//! so each minute's write touched one leaf per node across the whole
//! tree: with 1,000 nodes that pulled some 1,000 leaves of up to 16
//! records each through sled's page cache every minute, and the
//! controller's resident memory ratcheted up by about 1.5 MiB a minute
//! although its live heap stayed level (`load` in BENCHMARKS.md). A
//! history query for one GPU seeks once per stored minute instead of
//! scanning one range, and retention deletes one range.

use std::collections::BTreeMap;

use super::codec::{NodeMinute, decode_node_minute, encode_node_minute};
use super::rollup::Rollup;
use super::store::{RollupStore, place_gpus};
use crate::store::StoreError;

/// The tree: one record per node-minute, key `<minute: 8 bytes BE><node
/// id>`.
pub const ROLLUP_TREE: &str = "telemetry.v3";

/// Records deleted per sled batch when retention prunes the rollups.
const PRUNE_BATCH: usize = 10_000;

/// Rollups in one sled tree ([`ROLLUP_TREE`] by convention).
pub struct SledRollupStore {
    tree: sled::Tree,
}

/// `<minute: 8 bytes BE><node id>`.
fn minute_first_key(minute: u64, node_id: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + node_id.len());
    key.extend_from_slice(&minute.to_be_bytes());
    key.extend_from_slice(node_id);
    key
}

/// Splits a `minute_first_key`; `None` for a key too short to be one.
fn split_minute_first(key: &[u8]) -> Option<(u64, &[u8])> {
    let (minute, node) = key.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*minute), node))
}

fn corrupt(tree: &str, key: &[u8], message: String) -> StoreError {
    StoreError::CorruptRecord {
        key: format!("{tree}/{}", String::from_utf8_lossy(key)),
        message,
    }
}

impl SledRollupStore {
    pub fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    /// Folds `node_id`'s records in `telemetry.v3` for `start <= minute <
    /// end` into `by_gpu`: one seek per stored minute, to this node's key
    /// of the minute or past it to the next minute that has any record,
    /// and each record decoded once for all the GPUs asked for.
    fn fold_minute_first(
        &self,
        node_id: &str,
        uuids: &[&str],
        start: u64,
        end: u64,
        by_gpu: &mut [BTreeMap<u64, Rollup>],
    ) -> std::result::Result<(), StoreError> {
        let node = node_id.as_bytes();
        let end_key = minute_first_key(end, b"");
        let mut minute = start;
        while minute < end {
            let Some(entry) = self
                .tree
                .range(minute_first_key(minute, node)..end_key.clone())
                .next()
            else {
                break;
            };
            let (key, value) = entry?;
            let Some((key_minute, key_node)) = split_minute_first(&key) else {
                minute += 1;
                continue;
            };
            if key_minute > minute {
                minute = key_minute;
                continue;
            }
            if key_node == node {
                let gpus = decode_node_minute(key_minute, &value)
                    .map_err(|m| corrupt(ROLLUP_TREE, &key, m))?;
                place_gpus(uuids, by_gpu, key_minute, gpus);
            }
            // This minute is done: its record read, or none for this node.
            minute = key_minute.saturating_add(1);
        }
        Ok(())
    }
}

impl RollupStore for SledRollupStore {
    fn merge(&self, records: &[NodeMinute]) -> std::result::Result<(), StoreError> {
        // Records of one node-minute (a retried flush) are folded first.
        let mut by_key: BTreeMap<Vec<u8>, NodeMinute> = BTreeMap::new();
        for record in records {
            let key = minute_first_key(record.minute, record.node_id.as_bytes());
            match by_key.get_mut(&key) {
                Some(existing) => existing.append(record),
                None => {
                    by_key.insert(key, record.clone());
                }
            }
        }
        let mut batch = sled::Batch::default();
        for (key, record) in by_key {
            let stored = self.tree.get(&key)?;
            let unique = record.gpus().map_err(|m| corrupt(ROLLUP_TREE, &key, m))?;
            if stored.is_none() && unique.len() == record.gpu_minutes {
                // The common case: a new minute, each GPU once.
                batch.insert(key, record.record);
                continue;
            }
            let mut gpus = unique;
            // A minute written before (late samples, a retried flush) is
            // merged. A corrupt old record is replaced rather than blocking
            // every later write of this minute.
            if let Some(stored) = stored
                && let Ok(stored) = decode_node_minute(record.minute, &stored)
            {
                for (uuid, old) in stored {
                    match gpus.iter_mut().find(|(u, _)| *u == uuid) {
                        Some((_, fresh)) => fresh.merge(&old),
                        None => gpus.push((uuid, old)),
                    }
                }
            }
            batch.insert(key, encode_node_minute(&gpus));
        }
        self.tree.apply_batch(batch)?;
        // One flush per call (up to 100 node-minutes), not per GPU-minute:
        // it makes the records durable and lets sled write out and free its
        // log buffers, which otherwise hold every record written since its
        // last background flush (about 700 bytes per GPU in
        // `gpufleet-bench ingest`).
        self.tree.flush()?;
        Ok(())
    }

    fn range_gpus(
        &self,
        node_id: &str,
        uuids: &[&str],
        start: u64,
        end: u64,
    ) -> std::result::Result<Vec<Vec<Rollup>>, StoreError> {
        let mut by_gpu: Vec<BTreeMap<u64, Rollup>> = vec![BTreeMap::new(); uuids.len()];
        if start < end && !uuids.is_empty() {
            self.fold_minute_first(node_id, uuids, start, end, &mut by_gpu)?;
        }
        Ok(by_gpu
            .into_iter()
            .map(|minutes| minutes.into_values().collect())
            .collect())
    }

    fn prune_before(&self, minute: u64) -> std::result::Result<u64, StoreError> {
        // The oldest minutes are the tree's first keys: one range, deleted
        // a bounded batch at a time.
        let mut removed = 0;
        let end = minute_first_key(minute, b"");
        loop {
            let mut batch = sled::Batch::default();
            let mut in_batch = 0;
            for entry in self.tree.range(..end.clone()).take(PRUNE_BATCH) {
                let (key, _) = entry?;
                batch.remove(key);
                in_batch += 1;
            }
            if in_batch == 0 {
                break;
            }
            self.tree.apply_batch(batch)?;
            removed += in_batch as u64;
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::rollup::FinishedRollup;
    use crate::telemetry::store::MemoryRollupStore;
    use crate::telemetry::test_support::{finished, sample, t0, util};

    #[test]
    fn sled_merge_folds_a_minute_written_twice() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let store = SledRollupStore::new(db.open_tree(ROLLUP_TREE).unwrap());
        let mut a = Rollup::new(5);
        a.add(&sample("GPU-a", t0(), 10, 1));
        let mut b = Rollup::new(5);
        b.add(&sample("GPU-a", t0(), 30, 1));
        store
            .merge(&NodeMinute::group(&[finished("n1", "GPU-a", &a)]))
            .unwrap();
        // One record where GPU-a appears twice, as late samples queue it.
        store
            .merge(&NodeMinute::group(&[
                finished("n1", "GPU-a", &b),
                finished("n1", "GPU-b", &b),
                finished("n1", "GPU-a", &b),
            ]))
            .unwrap();
        let rows = store.range("n1", "GPU-a", 0, 10).unwrap();
        assert_eq!(rows.len(), 1);
        let acc = rows[0].get(util());
        assert_eq!((acc.count, acc.sum, acc.max), (3, 70.0, 30.0));
        let rows = store.range("n1", "GPU-b", 0, 10).unwrap();
        assert_eq!(rows[0].get(util()).count, 1);
        // Another node's GPU of the same name is another series.
        assert!(store.range("n2", "GPU-a", 0, 10).unwrap().is_empty());
    }

    #[test]
    fn a_nodes_gpus_read_together_match_each_read_alone_and_the_memory_store() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let rollup = |minute: u64, util: u32| {
            let mut r = Rollup::new(minute);
            r.add(&sample("GPU-x", t0(), util, 1));
            r
        };
        let store = SledRollupStore::new(db.open_tree(ROLLUP_TREE).unwrap());
        let mut finished_minutes = Vec::new();
        for minute in 4..7 {
            for (uuid, util) in [("GPU-a", 100), ("GPU-b", 200), ("GPU-c", 300)] {
                finished_minutes.push(finished("n1", uuid, &rollup(minute, util + minute as u32)));
            }
            // Another node's records, a GPU of the same name included, sit
            // between n1's minutes.
            finished_minutes.push(finished("n2", "GPU-a", &rollup(minute, 9)));
        }
        store.merge(&NodeMinute::group(&finished_minutes)).unwrap();

        let sums = |rollups: &[Rollup]| -> Vec<(u64, f64)> {
            rollups
                .iter()
                .map(|r| (r.minute, r.get(util()).sum))
                .collect()
        };
        let together = store
            .range_gpus("n1", &["GPU-c", "GPU-a", "GPU-zz"], 0, u64::MAX)
            .unwrap();
        assert_eq!(together.len(), 3);
        assert_eq!(sums(&together[0]), [(4, 304.0), (5, 305.0), (6, 306.0)]);
        assert_eq!(sums(&together[1]), [(4, 104.0), (5, 105.0), (6, 106.0)]);
        assert!(together[2].is_empty());
        for (uuid, got) in ["GPU-c", "GPU-a", "GPU-zz"].iter().zip(&together) {
            assert_eq!(
                &store.range("n1", uuid, 0, u64::MAX).unwrap(),
                got,
                "{uuid}"
            );
        }
        let window = store.range_gpus("n1", &["GPU-b", "GPU-a"], 4, 6).unwrap();
        assert_eq!(sums(&window[0]), [(4, 204.0), (5, 205.0)]);
        assert_eq!(sums(&window[1]), [(4, 104.0), (5, 105.0)]);
        // The memory store keys by GPU alone: given n1's records only, it
        // reads the same.
        let memory = MemoryRollupStore::default();
        let n1: Vec<FinishedRollup> = finished_minutes
            .into_iter()
            .filter(|f| &*f.node_id == "n1")
            .collect();
        memory.merge(&NodeMinute::group(&n1)).unwrap();
        let by_memory = memory.range_gpus("n1", &["GPU-b", "GPU-a"], 4, 6).unwrap();
        assert_eq!(by_memory, window);
    }

    #[test]
    fn minute_first_history_seeks_past_minutes_and_nodes_without_records() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let store = SledRollupStore::new(db.open_tree(ROLLUP_TREE).unwrap());
        // "n2" reports in minutes 10, 11 and 1,000; "n1" and "n3" in every
        // minute from 10 to 20; nothing before 10 or between 21 and 999.
        let mut records = Vec::new();
        for minute in 10..=20 {
            for node in ["n1", "n3"] {
                let mut r = Rollup::new(minute);
                r.add(&sample("GPU-a", t0(), minute as u32, 1));
                records.push(finished(node, "GPU-a", &r));
            }
        }
        for minute in [10, 11, 1_000] {
            let mut r = Rollup::new(minute);
            r.add(&sample("GPU-b", t0(), 5, 1));
            records.push(finished("n2", "GPU-b", &r));
        }
        store.merge(&NodeMinute::group(&records)).unwrap();
        let minutes = |node: &str, uuid: &str, start: u64, end: u64| -> Vec<u64> {
            store
                .range(node, uuid, start, end)
                .unwrap()
                .iter()
                .map(|r| r.minute)
                .collect()
        };
        assert_eq!(minutes("n2", "GPU-b", 0, u64::MAX), [10, 11, 1_000]);
        assert_eq!(minutes("n2", "GPU-b", 11, 1_000), [11]);
        assert_eq!(minutes("n1", "GPU-a", 18, 30), [18, 19, 20]);
        assert_eq!(minutes("n3", "GPU-a", 0, 11), [10]);
        assert!(
            minutes("n1", "GPU-b", 0, u64::MAX).is_empty(),
            "no such GPU"
        );
        assert!(
            minutes("n0", "GPU-a", 0, u64::MAX).is_empty(),
            "no such node"
        );
        assert!(minutes("n1", "GPU-a", 21, 1_001).is_empty());
        assert_eq!(store.prune_before(11).unwrap(), 3);
        assert_eq!(minutes("n1", "GPU-a", 0, u64::MAX).len(), 10);
    }
}
