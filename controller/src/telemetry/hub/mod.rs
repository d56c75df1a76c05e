//! The hub: the latest sample of every GPU in memory, validation of what
//! agents send (bad samples are dropped and counted per node), and the
//! folding of samples into per-minute rollups that a paced flush writes
//! to the [`RollupStore`].
//!
//! The ingest path takes one per-node lock and never touches the disk:
//! finished minutes queue in memory and a background flush writes them in
//! chunks. Time is always passed in (`now`), so tests run on virtual time.

mod live;
mod pending;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gpufleet_proto::v1::{GetHistoryResponse, GpuSample, NodeTelemetryStats};

use self::live::{CurrentMinute, GpuTelemetry, NodeTelemetry};
use self::pending::Pending;
use super::catalogue::Metric;
use super::codec::NodeMinute;
use super::history::{self, HistoryPlan};
use super::rollup::{FinishedRollup, Rollup};
use super::store::{RollupDiskUsage, RollupStore, merge_minute, place_gpus};
use super::time::{minute_of, system_nanos, ts_nanos};
use super::validation::{DROP_REASONS, DropReason, MAX_FUTURE_SKEW, check_values};
use crate::error::Result;
use crate::store::StoreError;

/// What one `ingest` call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IngestOutcome {
    pub accepted: usize,
    pub dropped: usize,
}

/// Finished minutes waiting for the next flush are bounded; beyond this the
/// oldest are dropped (and counted) rather than growing without limit when
/// the disk stalls.
const MAX_PENDING_ROLLUPS: usize = 1_000_000;

/// Node-minute records per store write (one append and sync each).
const ROLLUP_WRITE_CHUNK: usize = 100;

/// The periodic flush writes a queue over this many calls (at least a
/// chunk per call), so a fleet's minute reaches the store spread over
/// that many flush intervals instead of in one burst.
const ROLLUP_DRAIN_CALLS: usize = 20;

/// Records the periodic flush writes per call for `queued` waiting: a
/// share of the queue, so that a larger fleet's minute drains in the same
/// number of calls and a backlog cannot outgrow the pace.
pub fn paced_flush_budget(queued: usize) -> usize {
    queued.div_ceil(ROLLUP_DRAIN_CALLS).max(ROLLUP_WRITE_CHUNK)
}

/// The controller's telemetry: latest samples, counters and rollups.
pub struct TelemetryHub {
    nodes: RwLock<HashMap<String, Arc<Mutex<NodeTelemetry>>>>,
    pending: Mutex<Pending>,
    store: Arc<dyn RollupStore>,
    retention: Duration,
    rollups_dropped: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Telemetry is best effort: a panic elsewhere must not stop ingest.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TelemetryHub {
    pub fn new(store: Arc<dyn RollupStore>, retention: Duration) -> Self {
        Self {
            nodes: RwLock::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            store,
            retention,
            rollups_dropped: AtomicU64::new(0),
        }
    }

    pub fn retention(&self) -> Duration {
        self.retention
    }

    fn node(&self, node_id: &str) -> Option<Arc<Mutex<NodeTelemetry>>> {
        self.nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node_id)
            .cloned()
    }

    /// Sets the GPUs a node may report (from its hello). GPUs it no longer
    /// has are forgotten; their unfinished minute is kept for the flush.
    pub fn register_node(&self, node_id: &str, uuids: &[String]) {
        let node = {
            let mut nodes = self.nodes.write().unwrap_or_else(|p| p.into_inner());
            nodes
                .entry(node_id.to_string())
                .or_insert_with(|| {
                    Arc::new(Mutex::new(NodeTelemetry {
                        node_id: node_id.into(),
                        gpus: Vec::new(),
                        accepted: 0,
                        dropped: [0; DROP_REASONS.len()],
                    }))
                })
                .clone()
        };
        let mut node = lock(&node);
        let mut old = std::mem::take(&mut node.gpus);
        let mut gpus = Vec::with_capacity(uuids.len());
        for uuid in uuids {
            match old.iter().position(|g| &*g.uuid == uuid.as_str()) {
                Some(i) => gpus.push(old.swap_remove(i)),
                None => gpus.push(GpuTelemetry::new(uuid.as_str().into())),
            }
        }
        node.gpus = gpus;
        let finished = old
            .into_iter()
            .filter_map(|gpu| {
                Some(FinishedRollup {
                    node_id: node.node_id.clone(),
                    uuid: gpu.uuid,
                    rollup: gpu.current?.to_rollup(),
                })
            })
            .collect();
        drop(node);
        self.queue(finished);
    }

    /// Validates and folds in one batch of a node's samples. Bad samples
    /// are counted under the node and otherwise ignored.
    pub fn ingest(&self, node_id: &str, samples: Vec<GpuSample>, now: SystemTime) -> IngestOutcome {
        let Some(node) = self.node(node_id) else {
            return IngestOutcome {
                accepted: 0,
                dropped: samples.len(),
            };
        };
        let now_nanos = system_nanos(now);
        let future_limit = now_nanos + MAX_FUTURE_SKEW.as_nanos() as i128;
        let oldest = system_nanos(now.checked_sub(self.retention).unwrap_or(UNIX_EPOCH));
        let mut outcome = IngestOutcome::default();
        let mut finished = Vec::new();
        let mut late: BTreeMap<(Arc<str>, u64), Rollup> = BTreeMap::new();
        let mut guard = lock(&node);
        let node = &mut *guard;
        let owner = node.node_id.clone();
        for sample in samples {
            let at = ts_nanos(sample.sampled_at.as_ref());
            let verdict = match (node.gpu_mut(&sample.uuid), at) {
                (None, _) => Err(DropReason::UnknownGpu),
                (Some(_), None) => Err(DropReason::BadTimestamp),
                (Some(_), Some(at)) if at > future_limit => Err(DropReason::Future),
                (Some(_), Some(at)) if at < oldest => Err(DropReason::TooOld),
                (Some(gpu), Some(at)) if gpu.has_latest() && at == i128::from(gpu.last_at) => {
                    Err(DropReason::Stale)
                }
                (Some(_), Some(at)) => check_values(&sample).map(|()| at),
            };
            let at = match verdict {
                Ok(at) => at,
                Err(reason) => {
                    node.dropped[reason.index()] += 1;
                    outcome.dropped += 1;
                    continue;
                }
            };
            node.accepted += 1;
            outcome.accepted += 1;
            let Some(gpu) = node.gpu_mut(&sample.uuid) else {
                continue;
            };
            let minute = (at / 60_000_000_000) as u64;
            if gpu.has_latest() && at < i128::from(gpu.last_at) {
                // Late (replayed after a partition): it belongs in the
                // history of its minute but must not move "latest"
                // back. A minute already written is merged, not
                // overwritten, by the store.
                match &mut gpu.current {
                    Some(current) if current.takes(minute) => current.add(&sample),
                    _ => late
                        .entry((gpu.uuid.clone(), minute))
                        .or_insert_with(|| Rollup::new(minute))
                        .add(&sample),
                }
                continue;
            }
            match &mut gpu.current {
                Some(current) if current.takes(minute) => current.add(&sample),
                slot => {
                    let mut fresh = CurrentMinute::new(minute);
                    fresh.add(&sample);
                    if let Some(done) = slot.replace(fresh) {
                        finished.push(FinishedRollup {
                            node_id: owner.clone(),
                            uuid: gpu.uuid.clone(),
                            rollup: done.to_rollup(),
                        });
                    }
                }
            }
            gpu.last_at = i64::try_from(at).unwrap_or(i64::MAX);
            gpu.set_latest(sample);
        }
        finished.extend(late.into_iter().map(|((uuid, _), rollup)| FinishedRollup {
            node_id: owner.clone(),
            uuid,
            rollup,
        }));
        drop(guard);
        self.queue(finished);
        outcome
    }

    fn queue(&self, finished: Vec<FinishedRollup>) {
        if finished.is_empty() {
            return;
        }
        self.queue_records(NodeMinute::group(&finished));
    }

    fn queue_records(&self, records: Vec<NodeMinute>) {
        let mut pending = lock(&self.pending);
        for record in records {
            pending.add(record);
        }
        let dropped = pending.trim(MAX_PENDING_ROLLUPS);
        if dropped > 0 {
            self.rollups_dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
    }

    /// Writes every finished minute (queued, or a GPU's current minute
    /// once `now` is past it) to the store. Returns how many GPU-minutes.
    pub fn flush(&self, now: SystemTime) -> std::result::Result<usize, StoreError> {
        self.flush_oldest(now, usize::MAX)
    }

    /// Node-minute records waiting for a flush.
    pub fn queued_records(&self) -> usize {
        lock(&self.pending).records.len()
    }

    /// Queues every GPU minute that ended before `now`, then writes at
    /// most `max_records` node-minute records of the queue, oldest first;
    /// the rest wait for the next call (queries read them meanwhile).
    /// Returns how many GPU-minutes were written.
    ///
    /// A whole fleet's minute ends at once; the periodic flush spreads its
    /// writes over [`paced_flush_budget`]'s share per call rather than one
    /// burst of the whole fleet's records and their buffers.
    pub fn flush_oldest(
        &self,
        now: SystemTime,
        max_records: usize,
    ) -> std::result::Result<usize, StoreError> {
        self.finish_minutes_before(now);
        let mut batch = lock(&self.pending).take_oldest(max_records);
        if batch.is_empty() {
            return Ok(0);
        }
        let gpu_minutes = batch.iter().map(|r| r.gpu_minutes).sum();
        // In chunks, each written and synced before the next: a failure
        // leaves the chunks before it stored and the rest queued.
        let mut written = 0;
        while written < batch.len() {
            let end = (written + ROLLUP_WRITE_CHUNK).min(batch.len());
            if let Err(e) = self.store.merge(&batch[written..end]) {
                // Keep what was not written for the next try (bounded by
                // `queue_records`); the chunks before are stored.
                self.queue_records(batch.split_off(written));
                return Err(e);
            }
            written = end;
        }
        Ok(gpu_minutes)
    }

    /// Queues the current minute of every GPU whose minute ended before
    /// `now` (a GPU's minute otherwise ends with its next sample).
    fn finish_minutes_before(&self, now: SystemTime) {
        let now_minute = minute_of(now);
        let nodes: Vec<_> = self
            .nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut finished = Vec::new();
        for node in nodes {
            let mut node = lock(&node);
            let node = &mut *node;
            for gpu in &mut node.gpus {
                if gpu.current.as_ref().is_some_and(|c| c.minute < now_minute)
                    && let Some(done) = gpu.current.take()
                {
                    finished.push(FinishedRollup {
                        node_id: node.node_id.clone(),
                        uuid: gpu.uuid.clone(),
                        rollup: done.to_rollup(),
                    });
                }
            }
        }
        self.queue(finished);
    }

    /// Deletes rollups older than the retention.
    pub fn prune(&self, now: SystemTime) -> std::result::Result<u64, StoreError> {
        let cutoff = now.checked_sub(self.retention).unwrap_or(UNIX_EPOCH);
        self.store.prune_before(minute_of(cutoff))
    }

    /// Latest accepted sample of each GPU of a node.
    pub fn latest_for_node(&self, node_id: &str) -> HashMap<String, GpuSample> {
        let Some(node) = self.node(node_id) else {
            return HashMap::new();
        };
        let node = lock(&node);
        node.gpus
            .iter()
            .filter_map(|gpu| Some((gpu.uuid.to_string(), gpu.latest()?)))
            .collect()
    }

    pub fn stats(&self, node_id: &str) -> NodeTelemetryStats {
        let mut stats = NodeTelemetryStats {
            node_id: node_id.to_string(),
            ..Default::default()
        };
        if let Some(node) = self.node(node_id) {
            let node = lock(&node);
            stats.samples_accepted = node.accepted;
            for reason in DROP_REASONS {
                let count = node.dropped[reason.index()];
                stats.samples_dropped += count;
                if count > 0 {
                    stats
                        .dropped_by_reason
                        .insert(reason.as_str().to_string(), count);
                }
            }
        }
        stats
    }

    /// Every node's counters, by node id.
    pub fn all_stats(&self) -> Vec<NodeTelemetryStats> {
        let mut ids: Vec<String> = self
            .nodes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids.iter().map(|id| self.stats(id)).collect()
    }

    /// What the rollups take on disk, when the store keeps them in files.
    pub fn disk_usage(&self) -> Option<RollupDiskUsage> {
        self.store.disk_usage()
    }

    /// Finished minutes lost because the store could not keep up.
    pub fn rollups_dropped(&self) -> u64 {
        self.rollups_dropped.load(Ordering::Relaxed)
    }

    /// Per-minute rollups of one GPU over `[start, end)` minutes: stored,
    /// queued and the current (unfinished) minute together.
    #[cfg(test)]
    fn minutes(
        &self,
        node_id: &str,
        uuid: &str,
        start: u64,
        end: u64,
    ) -> Result<BTreeMap<u64, Rollup>> {
        let mut one = self.node_minutes(node_id, &[uuid], start, end)?;
        Ok(one.pop().unwrap_or_default())
    }

    /// [`TelemetryHub::minutes`] of several GPUs of one node, one map per
    /// uuid in the order given, each stored or queued record read once.
    fn node_minutes(
        &self,
        node_id: &str,
        uuids: &[&str],
        start: u64,
        end: u64,
    ) -> Result<Vec<BTreeMap<u64, Rollup>>> {
        let in_range = |minute: &u64| (start..end).contains(minute);
        let mut by_gpu: Vec<BTreeMap<u64, Rollup>> = self
            .store
            .range_gpus(node_id, uuids, start, end)?
            .into_iter()
            .map(|rollups| {
                let mut minutes = BTreeMap::new();
                for r in rollups.into_iter().filter(|r| in_range(&r.minute)) {
                    merge_minute(&mut minutes, r);
                }
                minutes
            })
            .collect();
        for record in lock(&self.pending).records.values() {
            if &*record.node_id != node_id || !in_range(&record.minute) {
                continue;
            }
            // Queued records were encoded here, so they decode; were one
            // not to, a missing minute beats a failed query.
            place_gpus(
                uuids,
                &mut by_gpu,
                record.minute,
                record.gpus().unwrap_or_default(),
            );
        }
        if let Some(node) = self.node(node_id) {
            let mut node = lock(&node);
            for (uuid, minutes) in uuids.iter().zip(by_gpu.iter_mut()) {
                if let Some(current) = node.gpu_mut(uuid).and_then(|g| g.current.as_ref())
                    && in_range(&current.minute)
                {
                    merge_minute(minutes, current.to_rollup());
                }
            }
        }
        Ok(by_gpu)
    }
    /// History of one metric for the given GPUs (node id, uuid).
    pub fn history(
        &self,
        gpus: &[(String, String)],
        metric: &'static Metric,
        plan: &HistoryPlan,
    ) -> Result<GetHistoryResponse> {
        history::read_history(gpus, metric, plan, |node_id, uuids, start, end| {
            self.node_minutes(node_id, uuids, start, end)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::sled_store::{ROLLUP_TREE, SledRollupStore};
    use crate::telemetry::store::MemoryRollupStore;
    use crate::telemetry::test_support::{hub, sample, t0, util};
    use prost_types::Timestamp;

    /// Fails its second `merge` call once, then behaves.
    struct FlakyStore {
        inner: MemoryRollupStore,
        calls: AtomicU64,
    }

    impl RollupStore for FlakyStore {
        fn merge(&self, records: &[NodeMinute]) -> std::result::Result<(), StoreError> {
            if self.calls.fetch_add(1, Ordering::Relaxed) == 1 {
                return Err(StoreError::CorruptRecord {
                    key: "test".into(),
                    message: "disk full".into(),
                });
            }
            self.inner.merge(records)
        }
        fn range_gpus(
            &self,
            node_id: &str,
            uuids: &[&str],
            start: u64,
            end: u64,
        ) -> std::result::Result<Vec<Vec<Rollup>>, StoreError> {
            self.inner.range_gpus(node_id, uuids, start, end)
        }
        fn prune_before(&self, minute: u64) -> std::result::Result<u64, StoreError> {
            self.inner.prune_before(minute)
        }
    }

    #[test]
    fn a_failed_chunk_and_the_rest_are_retried_without_writing_any_twice() {
        let store = Arc::new(FlakyStore {
            inner: MemoryRollupStore::default(),
            calls: AtomicU64::new(0),
        });
        let hub = TelemetryHub::new(store.clone(), Duration::from_secs(3600));
        // More node-minutes than one chunk holds: the flush takes 3 chunks.
        let nodes = 2 * ROLLUP_WRITE_CHUNK + 1;
        let at = t0();
        for n in 0..nodes {
            let (node, gpu) = (format!("n{n}"), format!("GPU-{n}"));
            hub.register_node(&node, std::slice::from_ref(&gpu));
            hub.ingest(&node, vec![sample(&gpu, at, 10, 1)], at);
        }
        let later = at + Duration::from_secs(60);
        // The first chunk is written, the second fails: it and the third
        // stay queued.
        assert!(hub.flush(later).is_err());
        assert_eq!(store.inner.len(), ROLLUP_WRITE_CHUNK);
        assert_eq!(hub.flush(later).unwrap(), ROLLUP_WRITE_CHUNK + 1);
        // Every GPU's minute once, with its one sample: none written twice.
        assert_eq!(store.inner.len(), nodes);
        let m = minute_of(at);
        for n in 0..nodes {
            let rows = store
                .inner
                .range(&format!("n{n}"), &format!("GPU-{n}"), m, m + 1)
                .unwrap();
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].get(util()).count, 1, "GPU-{n}");
        }
        assert_eq!(hub.rollups_dropped(), 0);
    }

    #[test]
    fn a_paced_flush_writes_the_oldest_minutes_and_queries_still_see_the_rest() {
        let store = Arc::new(MemoryRollupStore::default());
        let hub = TelemetryHub::new(store.clone(), Duration::from_secs(3600));
        let at = t0();
        let m = minute_of(at);
        for n in 0..3 {
            let (node, gpu) = (format!("n{n}"), format!("GPU-{n}"));
            hub.register_node(&node, std::slice::from_ref(&gpu));
            // A sample in minute m, then one in m + 1 that ends minute m.
            for (i, t) in [at, at + Duration::from_secs(60)].into_iter().enumerate() {
                hub.ingest(&node, vec![sample(&gpu, t, 10 + i as u32, 1)], t);
            }
        }
        let now = at + Duration::from_secs(120);
        // Minute m + 1 ends with `now`: 6 records queued, 2 written, the
        // two oldest (minute m, nodes n0 and n1).
        assert_eq!(hub.flush_oldest(now, 2).unwrap(), 2);
        assert_eq!(hub.queued_records(), 4);
        assert_eq!(store.range("n0", "GPU-0", m, m + 2).unwrap().len(), 1);
        assert_eq!(store.range("n1", "GPU-1", m, m + 2).unwrap().len(), 1);
        assert!(store.range("n2", "GPU-2", m, m + 2).unwrap().is_empty());
        // Queued minutes are read with the stored ones, none missing.
        let minutes = hub.minutes("n2", "GPU-2", m, m + 2).unwrap();
        let utils: Vec<f64> = minutes.values().map(|r| r.get(util()).sum).collect();
        assert_eq!(utils, [10.0, 11.0]);
        assert_eq!(hub.minutes("n0", "GPU-0", m, m + 2).unwrap().len(), 2);
        // The rest goes with the next calls; nothing is written twice.
        assert_eq!(hub.flush(now).unwrap(), 4);
        assert_eq!(hub.queued_records(), 0);
        assert_eq!(store.len(), 6);
        for n in 0..3 {
            let rows = store
                .range(&format!("n{n}"), &format!("GPU-{n}"), m, m + 2)
                .unwrap();
            assert_eq!(rows.iter().map(|r| r.get(util()).count).sum::<u32>(), 2);
        }
    }

    #[test]
    fn the_paced_budget_is_a_share_of_the_queue_and_at_least_a_chunk() {
        assert_eq!(paced_flush_budget(0), ROLLUP_WRITE_CHUNK);
        assert_eq!(paced_flush_budget(1_000), ROLLUP_WRITE_CHUNK);
        assert_eq!(paced_flush_budget(10_000), 500);
        assert_eq!(paced_flush_budget(10_001), 501);
        // A queue drains within ROLLUP_DRAIN_CALLS calls when nothing is added.
        let (mut queued, mut calls) = (123_457_usize, 0);
        let budget = paced_flush_budget(queued);
        while queued > 0 {
            queued = queued.saturating_sub(budget);
            calls += 1;
        }
        assert!(calls <= ROLLUP_DRAIN_CALLS, "{calls}");
    }

    #[test]
    fn a_minute_with_more_samples_than_a_16_bit_count_loses_none() {
        let (store, hub) = hub();
        let at = t0();
        let n = u64::from(u16::MAX) + 10;
        for i in 0..n {
            // Distinct timestamps within one minute (1 µs apart).
            let t = at + Duration::from_micros(i);
            let util = if i == 7 { 99 } else { 1 };
            assert_eq!(
                hub.ingest("n1", vec![sample("GPU-a", t, util, 1)], t)
                    .accepted,
                1
            );
        }
        hub.flush(at + Duration::from_secs(60)).unwrap();
        let m = minute_of(at);
        let rows = store.range("n1", "GPU-a", m, m + 1).unwrap();
        assert_eq!(rows.len(), 1);
        let acc = rows[0].get(util());
        assert_eq!(
            (u64::from(acc.count), acc.sum, acc.max),
            (n, (n - 1 + 99) as f64, 99.0)
        );
        // The per-GPU accumulator stays small.
        assert!(std::mem::size_of::<Option<CurrentMinute>>() <= 184);
    }

    #[test]
    fn bad_samples_are_dropped_and_counted_per_reason() {
        let (_, hub) = hub();
        let now = t0();
        let ok = sample("GPU-a", now, 50, 1000);
        let mut too_busy = sample("GPU-b", now, 101, 1000);
        too_busy.gpu_utilization_percent = Some(101);
        let mut overfull = sample("GPU-b", now, 50, 1000);
        overfull.memory_used_bytes = Some(101);
        let mut hot = sample("GPU-b", now, 50, 1000);
        hot.temperature_celsius = Some(4000);
        let mut no_time = sample("GPU-b", now, 50, 1000);
        no_time.sampled_at = None;
        let mut bad_nanos = sample("GPU-b", now, 50, 1000);
        bad_nanos.sampled_at = Some(Timestamp {
            seconds: 5,
            nanos: -1,
        });
        let outcome = hub.ingest(
            "n1",
            vec![
                ok.clone(),
                ok.clone(), // same time again: stale
                sample("GPU-zz", now, 50, 1000),
                sample("GPU-b", now + Duration::from_secs(3600), 50, 1000),
                sample("GPU-b", now - Duration::from_secs(7200), 50, 1000),
                too_busy,
                overfull,
                hot,
                no_time,
                bad_nanos,
            ],
            now,
        );
        assert_eq!(
            outcome,
            IngestOutcome {
                accepted: 1,
                dropped: 9
            }
        );
        let stats = hub.stats("n1");
        assert_eq!(stats.samples_accepted, 1);
        assert_eq!(stats.samples_dropped, 9);
        let by = |r: DropReason| {
            stats
                .dropped_by_reason
                .get(r.as_str())
                .copied()
                .unwrap_or(0)
        };
        assert_eq!(by(DropReason::Stale), 1);
        assert_eq!(by(DropReason::UnknownGpu), 1);
        assert_eq!(by(DropReason::Future), 1);
        assert_eq!(by(DropReason::TooOld), 1);
        assert_eq!(by(DropReason::OutOfRange), 3);
        assert_eq!(by(DropReason::BadTimestamp), 2);
        // Only the good sample is kept as latest; nothing was rolled up from the rest.
        let latest = hub.latest_for_node("n1");
        assert_eq!(latest.len(), 1);
        assert_eq!(latest["GPU-a"], ok);
        // Unknown node: counted as dropped, nothing kept.
        let outcome = hub.ingest("nobody", vec![sample("GPU-a", now, 1, 1)], now);
        assert_eq!(outcome.dropped, 1);
        assert!(hub.latest_for_node("nobody").is_empty());
    }

    #[test]
    fn late_samples_join_their_minute_without_moving_latest_back() {
        let (store, hub) = hub();
        let start = t0();
        let newest = sample("GPU-a", start + Duration::from_secs(70), 90, 1000);
        hub.ingest("n1", vec![sample("GPU-a", start, 10, 1000)], start);
        hub.ingest("n1", vec![newest.clone()], start + Duration::from_secs(70));
        // Minute 0 is finished and written.
        assert_eq!(hub.flush(start + Duration::from_secs(70)).unwrap(), 1);
        let m0 = minute_of(start);
        // Replayed after a partition: one for the written minute, one for
        // the current one.
        let now = start + Duration::from_secs(80);
        let outcome = hub.ingest(
            "n1",
            vec![
                sample("GPU-a", start + Duration::from_secs(30), 30, 1000),
                sample("GPU-a", start + Duration::from_secs(65), 70, 1000),
            ],
            now,
        );
        assert_eq!(
            outcome,
            IngestOutcome {
                accepted: 2,
                dropped: 0
            }
        );
        assert_eq!(hub.latest_for_node("n1")["GPU-a"], newest);
        assert_eq!(hub.flush(now).unwrap(), 1);
        // Merged into the stored minute: both samples count.
        let stored = &store.range("n1", "GPU-a", m0, m0 + 1).unwrap()[0];
        let acc = stored.get(util());
        assert_eq!((acc.count, acc.mean(), acc.max), (2, Some(20.0), 30.0));
        let current = hub.minutes("n1", "GPU-a", m0 + 1, m0 + 2).unwrap();
        let acc = current[&(m0 + 1)].get(util());
        assert_eq!((acc.count, acc.max), (2, 90.0));
        // The same instant as the latest is a repeat; older than retention
        // is still too old.
        let too_old = now - hub.retention() - Duration::from_secs(60);
        let outcome = hub.ingest(
            "n1",
            vec![newest.clone(), sample("GPU-a", too_old, 1, 1)],
            now,
        );
        assert_eq!(outcome.dropped, 2);
        let stats = hub.stats("n1");
        assert_eq!(stats.dropped_by_reason["stale"], 1);
        assert_eq!(stats.dropped_by_reason["too_old"], 1);
    }

    #[test]
    fn minutes_roll_into_the_store_only_when_finished() {
        let (store, hub) = hub();
        let start = t0();
        // 3 minutes of samples every 10 s on one GPU.
        for i in 0..18u64 {
            let at = start + Duration::from_secs(i * 10);
            let util = if i < 6 {
                10
            } else if i < 12 {
                50
            } else {
                90
            };
            hub.ingest("n1", vec![sample("GPU-a", at, util, 1000)], at);
        }
        // Two minutes are finished and queued; nothing touched the store yet.
        assert!(store.is_empty());
        assert_eq!(hub.flush(start + Duration::from_secs(170)).unwrap(), 2);
        assert_eq!(store.len(), 2);
        // The third minute is flushed once the clock passes it.
        assert_eq!(hub.flush(start + Duration::from_secs(170)).unwrap(), 0);
        assert_eq!(hub.flush(start + Duration::from_secs(180)).unwrap(), 1);
        let m0 = minute_of(start);
        let rows = store.range("n1", "GPU-a", m0, m0 + 3).unwrap();
        let means: Vec<f64> = rows.iter().filter_map(|r| r.get(util()).mean()).collect();
        assert_eq!(means, vec![10.0, 50.0, 90.0]);
        assert!(rows.iter().all(|r| r.get(util()).count == 6));
    }

    #[test]
    fn retention_prunes_old_rollups_in_memory_and_in_sled() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let sled_store: Arc<dyn RollupStore> =
            Arc::new(SledRollupStore::new(db.open_tree(ROLLUP_TREE).unwrap()));
        let memory: Arc<dyn RollupStore> = Arc::new(MemoryRollupStore::default());
        // (store, records one minute of the three GPUs takes)
        for (store, records_per_minute) in [(sled_store, 2), (memory, 3)] {
            let retention = Duration::from_secs(3600);
            let hub = TelemetryHub::new(store.clone(), retention);
            // "n1" is a prefix of "n1/x": keys of one must not leak into
            // the other's range or pruning.
            let nodes: [(&str, Vec<String>); 2] = [
                ("n1", vec!["GPU-a".into(), "GPU-b".into()]),
                ("n1/x", vec!["GPU-c".into()]),
            ];
            for (node, uuids) in &nodes {
                hub.register_node(node, uuids);
            }
            let start = t0();
            // Three hours of one sample a minute; `now` moves with them.
            for i in 0..180u64 {
                let at = start + Duration::from_secs(i * 60);
                for (node, uuids) in &nodes {
                    let batch = uuids.iter().map(|u| sample(u, at, 50, 1000)).collect();
                    assert_eq!(hub.ingest(node, batch, at).accepted, uuids.len());
                }
                if i % 30 == 0 {
                    hub.flush(at).unwrap();
                }
            }
            let now = start + Duration::from_secs(180 * 60);
            hub.flush(now).unwrap();
            let m0 = minute_of(start);
            for (node, uuids) in &nodes {
                for uuid in uuids {
                    let rows = store.range(node, uuid, 0, u64::MAX).unwrap();
                    assert_eq!(rows.len(), 180, "{uuid}");
                }
            }
            // Keep the last hour: minutes m0+120 .. m0+179.
            let removed = hub.prune(now).unwrap();
            assert_eq!(removed, records_per_minute * 120);
            for (node, uuids) in &nodes {
                for uuid in uuids {
                    let left = store.range(node, uuid, 0, u64::MAX).unwrap();
                    assert_eq!(left.len(), 60, "{uuid}");
                    assert_eq!(left[0].minute, m0 + 120);
                }
            }
            assert_eq!(hub.prune(now).unwrap(), 0);
        }
    }

    #[test]
    fn reregistering_forgets_removed_gpus_but_keeps_their_minute() {
        let (store, hub) = hub();
        let at = t0();
        hub.ingest("n1", vec![sample("GPU-b", at, 10, 1)], at);
        hub.register_node("n1", &["GPU-a".into()]);
        let outcome = hub.ingest(
            "n1",
            vec![sample("GPU-b", at + Duration::from_secs(1), 10, 1)],
            at,
        );
        assert_eq!(outcome.dropped, 1);
        hub.flush(at).unwrap();
        assert_eq!(store.len(), 1);
    }
}
