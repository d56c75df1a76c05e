//! Fleet telemetry: the latest sample of every GPU in memory, validation of
//! what agents send (bad samples are dropped and counted per node), and
//! per-minute rollups (count, sum and max of each metric per GPU) persisted
//! with bounded retention, plus the history and aggregate queries over them.
//!
//! The ingest path takes one per-node lock and never touches the disk:
//! finished minutes queue in memory and a background flush writes them in
//! one batch. Time is always passed in (`now`), so tests run on virtual time.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gpufleet_proto::v1::{
    CapacityDimension, GetAggregatesResponse, GetHistoryResponse, GetLatestRequest,
    GetLatestResponse, GpuHealth, GpuLatest, GpuSample, HistoryPoint, HistorySeries, Node,
    NodeState, NodeTelemetryStats, TelemetryGroup,
};
use prost::Message;
use prost_types::Timestamp;

use crate::error::{ControllerError, Result};
use crate::store::StoreError;

// ------------------------------------------------------------------ metrics

/// One numeric field of `GpuSample` that is validated, rolled up and
/// queryable. Adding a metric is one entry in `METRICS`.
#[derive(Debug)]
pub struct Metric {
    /// Stable id in stored rollups: never reuse or renumber.
    pub id: u8,
    pub name: &'static str,
    pub unit: &'static str,
    /// Short names accepted by queries.
    pub aliases: &'static [&'static str],
    /// Largest plausible value; a sample above it is dropped as out of range.
    pub max_valid: f64,
    pub extract: fn(&GpuSample) -> Option<f64>,
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

pub const METRICS: &[Metric] = &[
    Metric {
        id: 1,
        name: "gpu_utilization_percent",
        unit: "percent",
        aliases: &["util", "gpu_util", "utilization"],
        max_valid: 100.0,
        extract: |s| s.gpu_utilization_percent.map(f64::from),
    },
    Metric {
        id: 2,
        name: "memory_utilization_percent",
        unit: "percent",
        aliases: &["mem_util"],
        max_valid: 100.0,
        extract: |s| s.memory_utilization_percent.map(f64::from),
    },
    Metric {
        id: 3,
        name: "memory_used_bytes",
        unit: "bytes",
        aliases: &["mem", "memory"],
        // Far above any GPU made (B200: 192 GB), far below nonsense.
        max_valid: 4096.0 * GIB,
        extract: |s| s.memory_used_bytes.map(|v| v as f64),
    },
    Metric {
        id: 4,
        name: "memory_total_bytes",
        unit: "bytes",
        aliases: &[],
        max_valid: 4096.0 * GIB,
        extract: |s| s.memory_total_bytes.map(|v| v as f64),
    },
    Metric {
        id: 5,
        name: "temperature_celsius",
        unit: "celsius",
        aliases: &["temp", "temperature"],
        max_valid: 150.0,
        extract: |s| s.temperature_celsius.map(f64::from),
    },
    Metric {
        id: 6,
        name: "power_usage_milliwatts",
        unit: "milliwatts",
        aliases: &["power"],
        // 5 kW per GPU: twice the largest board power announced so far.
        max_valid: 5_000_000.0,
        extract: |s| s.power_usage_milliwatts.map(f64::from),
    },
    Metric {
        id: 7,
        name: "power_limit_milliwatts",
        unit: "milliwatts",
        aliases: &["power_limit"],
        max_valid: 5_000_000.0,
        extract: |s| s.power_limit_milliwatts.map(f64::from),
    },
    Metric {
        id: 8,
        name: "sm_clock_mhz",
        unit: "MHz",
        aliases: &["sm_clock", "clock"],
        max_valid: 10_000.0,
        extract: |s| s.sm_clock_mhz.map(f64::from),
    },
    Metric {
        id: 9,
        name: "memory_clock_mhz",
        unit: "MHz",
        aliases: &["mem_clock"],
        max_valid: 20_000.0,
        extract: |s| s.memory_clock_mhz.map(f64::from),
    },
];

const METRIC_COUNT: usize = METRICS.len();

/// Finds a metric by name or alias.
pub fn metric(name: &str) -> Result<&'static Metric> {
    METRICS
        .iter()
        .find(|m| m.name == name || m.aliases.contains(&name))
        .ok_or_else(|| {
            let known: Vec<&str> = METRICS.iter().map(|m| m.name).collect();
            ControllerError::invalid(
                "metric",
                format!(
                    "{name:?} is not a metric; known metrics: {}",
                    known.join(", ")
                ),
            )
        })
}

// --------------------------------------------------------------- validation

/// Why a sample was dropped. The label values are part of `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// The UUID is not one of the GPUs the node announced.
    UnknownGpu,
    /// `sampled_at` missing or not a valid time.
    BadTimestamp,
    /// `sampled_at` more than `MAX_FUTURE_SKEW` ahead of the controller.
    Future,
    /// `sampled_at` equal to the GPU's latest accepted sample: the same
    /// sample again. (Earlier samples, e.g. replayed from an agent's
    /// outbox after a partition, are accepted into their minute's rollup.)
    Stale,
    /// Older than the rollup retention: nothing could be kept of it.
    TooOld,
    /// A value outside what any GPU can report (e.g. utilisation > 100 %,
    /// memory used > total).
    OutOfRange,
}

pub const DROP_REASONS: [DropReason; 6] = [
    DropReason::UnknownGpu,
    DropReason::BadTimestamp,
    DropReason::Future,
    DropReason::Stale,
    DropReason::TooOld,
    DropReason::OutOfRange,
];

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownGpu => "unknown_gpu",
            DropReason::BadTimestamp => "bad_timestamp",
            DropReason::Future => "future",
            DropReason::Stale => "stale",
            DropReason::TooOld => "too_old",
            DropReason::OutOfRange => "out_of_range",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Agent clocks drift; more than this ahead is a broken clock.
pub const MAX_FUTURE_SKEW: Duration = Duration::from_secs(300);

/// Nanoseconds since the epoch, or `None` for a missing/invalid timestamp.
fn ts_nanos(ts: Option<&Timestamp>) -> Option<i128> {
    let ts = ts?;
    if !(0..1_000_000_000).contains(&ts.nanos) || ts.seconds < 0 {
        return None;
    }
    Some(ts.seconds as i128 * 1_000_000_000 + ts.nanos as i128)
}

fn system_nanos(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Minutes since the epoch.
pub fn minute_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 60)
        .unwrap_or(0)
}

fn minute_to_ts(minute: u64) -> Timestamp {
    Timestamp {
        seconds: (minute * 60) as i64,
        nanos: 0,
    }
}

/// Checks one sample's values on their own (not its GPU or time).
pub fn check_values(sample: &GpuSample) -> std::result::Result<(), DropReason> {
    for m in METRICS {
        if let Some(v) = (m.extract)(sample)
            && !(v.is_finite() && v >= 0.0 && v <= m.max_valid)
        {
            return Err(DropReason::OutOfRange);
        }
    }
    if let (Some(used), Some(total)) = (sample.memory_used_bytes, sample.memory_total_bytes)
        && used > total
    {
        return Err(DropReason::OutOfRange);
    }
    Ok(())
}

// ------------------------------------------------------------------ rollups

/// Count, sum and max of one metric over one minute (or one step).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Acc {
    pub count: u32,
    pub sum: f64,
    pub max: f64,
}

impl Acc {
    pub fn add(&mut self, v: f64) {
        self.max = if self.count == 0 { v } else { self.max.max(v) };
        self.count += 1;
        self.sum += v;
    }

    pub fn merge(&mut self, other: &Acc) {
        if other.count == 0 {
            return;
        }
        self.max = if self.count == 0 {
            other.max
        } else {
            self.max.max(other.max)
        };
        self.count += other.count;
        self.sum += other.sum;
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// Every metric of one GPU over one minute.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    pub minute: u64,
    pub metrics: [Acc; METRIC_COUNT],
}

/// Format byte of the per-GPU records of the first rollup tree
/// ([`LEGACY_ROLLUP_TREE`]), read (and pruned) but no longer written.
const ROLLUP_FORMAT_V1: u8 = 1;
/// id (1) + count (4) + sum (8) + max (8).
const ROLLUP_ENTRY_BYTES_V1: usize = 21;
/// Format byte of a node-minute record ([`ROLLUP_TREE`]).
const NODE_MINUTE_FORMAT: u8 = 2;

impl Rollup {
    pub fn new(minute: u64) -> Self {
        Self {
            minute,
            metrics: [Acc::default(); METRIC_COUNT],
        }
    }

    pub fn add(&mut self, sample: &GpuSample) {
        for (acc, m) in self.metrics.iter_mut().zip(METRICS) {
            if let Some(v) = (m.extract)(sample) {
                acc.add(v);
            }
        }
    }

    pub fn merge(&mut self, other: &Rollup) {
        for (a, b) in self.metrics.iter_mut().zip(&other.metrics) {
            a.merge(b);
        }
    }

    pub fn get(&self, metric: &Metric) -> Acc {
        METRICS
            .iter()
            .position(|m| m.id == metric.id)
            .map(|i| self.metrics[i])
            .unwrap_or_default()
    }

    /// The first (per-GPU) record format: fixed-width little-endian
    /// entries. Only tests write it now, to check that old data still reads.
    #[cfg(test)]
    fn encode_v1(&self) -> Vec<u8> {
        let mut out = vec![ROLLUP_FORMAT_V1];
        for (acc, m) in self.metrics.iter().zip(METRICS) {
            if acc.count == 0 {
                continue;
            }
            out.push(m.id);
            out.extend_from_slice(&acc.count.to_le_bytes());
            out.extend_from_slice(&acc.sum.to_le_bytes());
            out.extend_from_slice(&acc.max.to_le_bytes());
        }
        out
    }

    /// Reads a first-format record. Unknown metric ids (written by a newer
    /// controller) are skipped.
    pub fn decode_v1(minute: u64, bytes: &[u8]) -> std::result::Result<Self, String> {
        let Some((&format, mut rest)) = bytes.split_first() else {
            return Err("empty rollup record".into());
        };
        if format != ROLLUP_FORMAT_V1 {
            return Err(format!("rollup record format {format} is not supported"));
        }
        let mut rollup = Rollup::new(minute);
        while !rest.is_empty() {
            if rest.len() < ROLLUP_ENTRY_BYTES_V1 {
                return Err("rollup record is truncated".into());
            }
            let (entry, tail) = rest.split_at(ROLLUP_ENTRY_BYTES_V1);
            rest = tail;
            let word = |range: std::ops::Range<usize>| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&entry[range]);
                b
            };
            let mut count = [0u8; 4];
            count.copy_from_slice(&entry[1..5]);
            if let Some(i) = METRICS.iter().position(|m| m.id == entry[0]) {
                rollup.metrics[i] = Acc {
                    count: u32::from_le_bytes(count),
                    sum: f64::from_le_bytes(word(5..13)),
                    max: f64::from_le_bytes(word(13..21)),
                };
            }
        }
        Ok(rollup)
    }

    /// Compact form inside a node-minute record: the number of metrics
    /// present, then per metric its id, count, sum and max as varints
    /// ([`put_number`]). Every metric today comes from an integer field,
    /// so a typical GPU-minute takes about 80 bytes instead of 190.
    fn encode_compact(&self, out: &mut Vec<u8>) {
        let present = self.metrics.iter().filter(|a| a.count > 0).count();
        // METRIC_COUNT is far below 256 (ids are one byte).
        out.push(present as u8);
        for (acc, m) in self.metrics.iter().zip(METRICS) {
            if acc.count == 0 {
                continue;
            }
            out.push(m.id);
            put_varint(out, u64::from(acc.count));
            put_number(out, acc.sum);
            put_number(out, acc.max);
        }
    }

    /// Reads what `encode_compact` wrote from the front of `bytes`,
    /// advancing it. Unknown metric ids are skipped.
    fn decode_compact(minute: u64, bytes: &mut &[u8]) -> Option<Self> {
        let (&present, rest) = bytes.split_first()?;
        *bytes = rest;
        let mut rollup = Rollup::new(minute);
        for _ in 0..present {
            let (&id, rest) = bytes.split_first()?;
            *bytes = rest;
            let count = u32::try_from(get_varint(bytes)?).ok()?;
            let sum = get_number(bytes)?;
            let max = get_number(bytes)?;
            if let Some(i) = METRICS.iter().position(|m| m.id == id) {
                rollup.metrics[i] = Acc { count, sum, max };
            }
        }
        Some(rollup)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Integers below 2^53 are exact in an f64 and are what every metric's
/// sum and max are today.
const EXACT_INTEGER_LIMIT: f64 = 9_007_199_254_740_992.0;

/// Lossless and short for integers: an exact non-negative integer `n` is
/// the varint `2n`; anything else is the varint `1` followed by the eight
/// bytes of the f64.
fn put_number(out: &mut Vec<u8>, v: f64) {
    if (0.0..EXACT_INTEGER_LIMIT).contains(&v) && v.fract() == 0.0 {
        put_varint(out, (v as u64) << 1);
    } else {
        put_varint(out, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

fn get_number(bytes: &mut &[u8]) -> Option<f64> {
    match get_varint(bytes)? {
        1 => {
            let (raw, rest) = bytes.split_first_chunk::<8>()?;
            *bytes = rest;
            Some(f64::from_le_bytes(*raw))
        }
        tag if tag & 1 == 0 => Some((tag >> 1) as f64),
        _ => None,
    }
}

/// One node-minute record: every GPU of the node that reported in that
/// minute. Format byte, then per GPU: UUID length (varint), UUID, rollup.
fn encode_node_minute(gpus: &[(String, Rollup)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + gpus.len() * 128);
    out.push(NODE_MINUTE_FORMAT);
    for (uuid, rollup) in gpus {
        put_uuid(&mut out, uuid);
        rollup.encode_compact(&mut out);
    }
    out
}

/// NVML's GPU UUID: "GPU-" and 32 lowercase hex digits in 8-4-4-4-12 groups.
const GPU_UUID_PREFIX: &str = "GPU-";
const GPU_UUID_GROUPS: [usize; 5] = [8, 4, 4, 4, 12];

/// The 16 bytes of a GPU UUID in NVML's canonical spelling; `None` for
/// any other spelling (MIG devices, upper case, a test's short name).
fn gpu_uuid_bytes(uuid: &str) -> Option<[u8; 16]> {
    let mut groups = uuid.strip_prefix(GPU_UUID_PREFIX)?.split('-');
    let mut hex = String::with_capacity(32);
    for want in GPU_UUID_GROUPS {
        let group = groups.next()?;
        if group.len() != want
            || !group
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return None;
        }
        hex.push_str(group);
    }
    if groups.next().is_some() {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(bytes)
}

fn gpu_uuid_string(bytes: &[u8; 16]) -> String {
    let mut out = String::with_capacity(40);
    out.push_str(GPU_UUID_PREFIX);
    let mut at = 0;
    for (i, len) in GPU_UUID_GROUPS.into_iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        for byte in &bytes[at..at + len / 2] {
            out.push_str(&format!("{byte:02x}"));
        }
        at += len / 2;
    }
    out
}

/// A canonical GPU UUID as a 0 length and its 16 bytes (17 bytes instead
/// of 41: a quarter of a GPU-minute); anything else as length + bytes
/// (never empty: the controller rejects empty UUIDs at registration).
fn put_uuid(out: &mut Vec<u8>, uuid: &str) {
    match gpu_uuid_bytes(uuid) {
        Some(bytes) => {
            out.push(0);
            out.extend_from_slice(&bytes);
        }
        None => {
            put_varint(out, uuid.len() as u64);
            out.extend_from_slice(uuid.as_bytes());
        }
    }
}

fn get_uuid(bytes: &mut &[u8]) -> std::result::Result<String, String> {
    let truncated = || "node-minute record is truncated".to_string();
    let len = get_varint(bytes).ok_or_else(truncated)? as usize;
    if len == 0 {
        let (raw, rest) = bytes.split_first_chunk::<16>().ok_or_else(truncated)?;
        *bytes = rest;
        return Ok(gpu_uuid_string(raw));
    }
    if bytes.len() < len {
        return Err(truncated());
    }
    let (uuid, rest) = bytes.split_at(len);
    *bytes = rest;
    String::from_utf8(uuid.to_vec())
        .map_err(|_| "node-minute record holds a GPU UUID that is not UTF-8".to_string())
}

pub(crate) fn decode_node_minute(
    minute: u64,
    bytes: &[u8],
) -> std::result::Result<Vec<(String, Rollup)>, String> {
    let Some((&format, mut rest)) = bytes.split_first() else {
        return Err("empty rollup record".into());
    };
    if format != NODE_MINUTE_FORMAT {
        return Err(format!(
            "node-minute record format {format} is not supported"
        ));
    }
    let truncated = || "node-minute record is truncated".to_string();
    let mut gpus = Vec::new();
    while !rest.is_empty() {
        let uuid = get_uuid(&mut rest)?;
        let rollup = Rollup::decode_compact(minute, &mut rest).ok_or_else(truncated)?;
        gpus.push((uuid, rollup));
    }
    Ok(gpus)
}

/// A finished minute of one GPU, on its way to the store.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedRollup {
    pub node_id: Arc<str>,
    pub uuid: Arc<str>,
    pub rollup: Rollup,
}

/// The finished minutes of one node's GPUs in one minute, in their stored
/// form (a node-minute record): what waits for the flush and what the
/// store merges. Kept encoded so that the queue between flushes costs ~90
/// bytes per GPU-minute instead of a ~260-byte struct.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeMinute {
    pub node_id: Arc<str>,
    pub minute: u64,
    /// GPU-minutes in `record` (a GPU may appear more than once: late
    /// samples of a minute already queued; readers merge them).
    pub gpu_minutes: usize,
    /// Format byte, then per GPU: UUID length, UUID, compact rollup.
    pub record: Vec<u8>,
}

impl NodeMinute {
    fn new(node_id: Arc<str>, minute: u64) -> Self {
        Self {
            node_id,
            minute,
            gpu_minutes: 0,
            record: vec![NODE_MINUTE_FORMAT],
        }
    }

    fn push(&mut self, uuid: &str, rollup: &Rollup) {
        put_uuid(&mut self.record, uuid);
        rollup.encode_compact(&mut self.record);
        self.gpu_minutes += 1;
    }

    /// Appends another record of the same node-minute.
    fn append(&mut self, other: &NodeMinute) {
        self.record.extend_from_slice(&other.record[1..]);
        self.gpu_minutes += other.gpu_minutes;
    }

    /// The GPUs of the record, a GPU that appears twice merged into one.
    pub fn gpus(&self) -> std::result::Result<Vec<(String, Rollup)>, String> {
        let mut merged: Vec<(String, Rollup)> = Vec::new();
        for (uuid, rollup) in decode_node_minute(self.minute, &self.record)? {
            match merged.iter_mut().find(|(u, _)| *u == uuid) {
                Some((_, existing)) => existing.merge(&rollup),
                None => merged.push((uuid, rollup)),
            }
        }
        Ok(merged)
    }

    /// Groups finished GPU-minutes into node-minute records.
    pub fn group(finished: &[FinishedRollup]) -> Vec<NodeMinute> {
        let mut records: BTreeMap<(u64, Arc<str>), NodeMinute> = BTreeMap::new();
        for f in finished {
            records
                .entry((f.rollup.minute, f.node_id.clone()))
                .or_insert_with(|| NodeMinute::new(f.node_id.clone(), f.rollup.minute))
                .push(&f.uuid, &f.rollup);
        }
        records.into_values().collect()
    }
}

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

/// The sled tree controllers before segment files
/// ([`crate::segments`]) wrote rollups to: one record per node-minute, key
/// `<minute: 8 bytes BE><node id>`. Still read by history queries and
/// pruned by retention.
pub const ROLLUP_TREE: &str = "telemetry.v3";
/// The same records keyed node first (`<node id length: 4 bytes BE><node
/// id><minute: 8 bytes BE>`), written by controllers before `telemetry.v3`.
/// Still read by history queries and pruned by retention, so it empties
/// itself within one retention period.
pub const NODE_FIRST_ROLLUP_TREE: &str = "telemetry.v2";
/// The tree of the first format (one record per GPU-minute), written by
/// controllers before `telemetry.v2`. Read and pruned the same way.
pub const LEGACY_ROLLUP_TREE: &str = "telemetry";

/// Records deleted per sled batch when retention prunes the rollups.
const PRUNE_BATCH: usize = 10_000;

/// Rollups in sled, one record per node-minute, keyed minute first: how
/// controllers before segment files stored them; the controller now only
/// reads and prunes them (tests and benchmarks still write them).
///
/// Why per node and not per GPU: sled's memory grows with the number of
/// keys written, not just their bytes; a node-minute record holds all of
/// a node's GPUs (8 on a typical host) in one compact value.
///
/// Why minute first: every minute the whole fleet's records are written at
/// once. Keyed by minute they land together on the newest pages of the
/// tree. Keyed node first (`telemetry.v2`) each went to the end of its
/// node's run of keys, so each minute's write touched one leaf per node
/// across the whole tree: with 1,000 nodes that pulled some 1,000 leaves of
/// up to 16 records each through sled's page cache every minute, and the
/// controller's resident memory ratcheted up by about 1.5 MiB a minute
/// although its live heap stayed level (`load` in BENCHMARKS.md). A history
/// query for one GPU now seeks once per stored minute instead of scanning
/// one range, and retention deletes one range.
pub struct SledRollupStore {
    tree: sled::Tree,
    /// [`NODE_FIRST_ROLLUP_TREE`]: read and pruned, never written.
    node_first: Option<sled::Tree>,
    /// The first format's tree (key `<uuid length><uuid><minute>`, one
    /// record per GPU-minute), read and pruned, never written.
    legacy: Option<sled::Tree>,
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

/// `<name length: 4 bytes BE><name><minute: 8 bytes BE>`.
fn length_prefixed_key(name: &[u8], minute: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + 12);
    key.extend_from_slice(&(name.len() as u32).to_be_bytes());
    key.extend_from_slice(name);
    key.extend_from_slice(&minute.to_be_bytes());
    key
}

/// Splits a `length_prefixed_key`; `None` for a key of another shape.
fn split_key(key: &[u8]) -> Option<(&[u8], u64)> {
    let (len, rest) = key.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*len) as usize;
    if rest.len() != len.checked_add(8)? {
        return None;
    }
    let (name, minute) = rest.split_at(len);
    Some((name, u64::from_be_bytes(minute.try_into().ok()?)))
}

fn corrupt(tree: &str, key: &[u8], message: String) -> StoreError {
    StoreError::CorruptRecord {
        key: format!("{tree}/{}", String::from_utf8_lossy(key)),
        message,
    }
}

/// Deletes the records of `tree` older than `minute`, name by name: one
/// name's old range, then a jump past all of its keys, so the cost
/// follows names (nodes, or GPUs in the legacy tree), not stored rows.
fn prune_by_name(tree: &sled::Tree, minute: u64) -> std::result::Result<u64, StoreError> {
    let mut removed = 0;
    let mut from: Vec<u8> = Vec::new();
    loop {
        let Some((key, _)) = tree.range(from.clone()..).next().transpose()? else {
            break;
        };
        let Some((name, _)) = split_key(&key) else {
            // Foreign key: step over it.
            from = key.to_vec();
            from.push(0);
            continue;
        };
        let name = name.to_vec();
        let mut batch = sled::Batch::default();
        for entry in tree.range(length_prefixed_key(&name, 0)..length_prefixed_key(&name, minute)) {
            let (old, _) = entry?;
            batch.remove(old);
            removed += 1;
        }
        tree.apply_batch(batch)?;
        from = length_prefixed_key(&name, u64::MAX);
        from.push(0);
    }
    Ok(removed)
}

impl SledRollupStore {
    /// Rollups in `tree` only (tests; a controller uses [`Self::open`]).
    pub fn new(tree: sled::Tree) -> Self {
        Self {
            tree,
            node_first: None,
            legacy: None,
        }
    }

    /// The controller's rollups: [`ROLLUP_TREE`], plus
    /// [`NODE_FIRST_ROLLUP_TREE`] and [`LEGACY_ROLLUP_TREE`] for reading
    /// what older controllers wrote.
    pub fn open(store: &crate::store::SledStore) -> std::result::Result<Self, StoreError> {
        Ok(Self {
            tree: store.open_tree(ROLLUP_TREE)?,
            node_first: Some(store.open_tree(NODE_FIRST_ROLLUP_TREE)?),
            legacy: Some(store.open_tree(LEGACY_ROLLUP_TREE)?),
        })
    }

    /// Also reads (and prunes) node-first records from `node_first`.
    pub fn with_node_first(mut self, node_first: sled::Tree) -> Self {
        self.node_first = Some(node_first);
        self
    }

    /// Also reads (and prunes) first-format records from `legacy`.
    pub fn with_legacy(mut self, legacy: sled::Tree) -> Self {
        self.legacy = Some(legacy);
        self
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

    /// Hands `visit` each record that `name` has in a length-prefixed
    /// tree (node first or the first format) for `start <= minute < end`,
    /// with its minute; an error from `visit` is that record's corruption.
    fn fold_length_prefixed(
        tree: &sled::Tree,
        tree_name: &str,
        name: &str,
        start: u64,
        end: u64,
        mut visit: impl FnMut(u64, &[u8]) -> std::result::Result<(), String>,
    ) -> std::result::Result<(), StoreError> {
        let (from, to) = (
            length_prefixed_key(name.as_bytes(), start),
            length_prefixed_key(name.as_bytes(), end),
        );
        for entry in tree.range(from..to) {
            let (key, value) = entry?;
            let Some((key_name, minute)) = split_key(&key) else {
                continue;
            };
            if key_name != name.as_bytes() {
                continue;
            }
            visit(minute, &value).map_err(|m| corrupt(tree_name, &key, m))?;
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
            if let Some(node_first) = &self.node_first {
                Self::fold_length_prefixed(
                    node_first,
                    NODE_FIRST_ROLLUP_TREE,
                    node_id,
                    start,
                    end,
                    |minute, value| {
                        place_gpus(
                            uuids,
                            &mut by_gpu,
                            minute,
                            decode_node_minute(minute, value)?,
                        );
                        Ok(())
                    },
                )?;
            }
            if let Some(legacy) = &self.legacy {
                // The first format is keyed per GPU.
                for (uuid, minutes) in uuids.iter().zip(by_gpu.iter_mut()) {
                    Self::fold_length_prefixed(
                        legacy,
                        LEGACY_ROLLUP_TREE,
                        uuid,
                        start,
                        end,
                        |minute, value| {
                            merge_minute(minutes, Rollup::decode_v1(minute, value)?);
                            Ok(())
                        },
                    )?;
                }
            }
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
        if let Some(node_first) = &self.node_first {
            removed += prune_by_name(node_first, minute)?;
        }
        if let Some(legacy) = &self.legacy {
            removed += prune_by_name(legacy, minute)?;
        }
        Ok(removed)
    }
}

// --------------------------------------------------------------------- hub

/// The unfinished minute of one GPU: what a `Rollup` holds, as arrays and
/// with 16-bit counts, so 176 bytes instead of 224 (the controller keeps
/// one per GPU). A count about to overflow finishes the minute so far
/// early and begins another for the same minute; the store merges them.
#[derive(Debug, Clone)]
struct CurrentMinute {
    minute: u64,
    counts: [u16; METRIC_COUNT],
    sums: [f64; METRIC_COUNT],
    maxes: [f64; METRIC_COUNT],
}

impl CurrentMinute {
    fn new(minute: u64) -> Self {
        Self {
            minute,
            counts: [0; METRIC_COUNT],
            sums: [0.0; METRIC_COUNT],
            maxes: [0.0; METRIC_COUNT],
        }
    }

    /// Whether `add` may be called for `minute`.
    fn takes(&self, minute: u64) -> bool {
        self.minute == minute && self.counts.iter().all(|&c| c < u16::MAX)
    }

    fn add(&mut self, sample: &GpuSample) {
        for (i, m) in METRICS.iter().enumerate() {
            if let Some(v) = (m.extract)(sample) {
                self.maxes[i] = if self.counts[i] == 0 {
                    v
                } else {
                    self.maxes[i].max(v)
                };
                self.counts[i] += 1;
                self.sums[i] += v;
            }
        }
    }

    fn to_rollup(&self) -> Rollup {
        Rollup {
            minute: self.minute,
            metrics: std::array::from_fn(|i| Acc {
                count: u32::from(self.counts[i]),
                sum: self.sums[i],
                max: self.maxes[i],
            }),
        }
    }
}

/// One GPU's live telemetry. Kept small: a controller holds one per GPU
/// of the fleet.
struct GpuTelemetry {
    uuid: Arc<str>,
    /// The latest accepted sample, protobuf-encoded with its UUID left
    /// out (it is `uuid`); empty until the first. Encoded, a full sample
    /// takes about 150 bytes; decoded, a `GpuSample` is about 600 bytes of
    /// mostly empty optional fields before any of its strings.
    latest: Vec<u8>,
    /// `sampled_at` of `latest`, in nanoseconds since the epoch (an i64
    /// lasts until 2262; accepted samples are never far in the future).
    last_at: i64,
    current: Option<CurrentMinute>,
}

impl GpuTelemetry {
    fn new(uuid: Arc<str>) -> Self {
        Self {
            uuid,
            latest: Vec::new(),
            last_at: 0,
            current: None,
        }
    }

    fn has_latest(&self) -> bool {
        !self.latest.is_empty()
    }

    fn set_latest(&mut self, mut sample: GpuSample) {
        sample.uuid = String::new();
        self.latest.clear();
        // Exactly the size needed the first time (growing by doubling would
        // leave up to half unused, per GPU); later samples of a GPU have
        // about the same size and reuse the buffer without measuring first.
        if self.latest.capacity() == 0 {
            self.latest.reserve_exact(sample.encoded_len());
        }
        // Encoding into a Vec cannot fail: it grows as needed.
        let _ = sample.encode(&mut self.latest);
        // One huge sample (say, hundreds of processes) must not pin its
        // buffer for good.
        if self.latest.capacity() > 2 * self.latest.len() + 64 {
            self.latest.shrink_to_fit();
        }
    }

    fn latest(&self) -> Option<GpuSample> {
        if !self.has_latest() {
            return None;
        }
        let mut sample = GpuSample::decode(self.latest.as_slice()).ok()?;
        sample.uuid = self.uuid.to_string();
        Some(sample)
    }
}

struct NodeTelemetry {
    node_id: Arc<str>,
    /// In the order the node announced them; a node has a handful of
    /// GPUs, so a scan is as fast as a map and much smaller.
    gpus: Vec<GpuTelemetry>,
    accepted: u64,
    dropped: [u64; DROP_REASONS.len()],
}

impl NodeTelemetry {
    fn gpu_mut(&mut self, uuid: &str) -> Option<&mut GpuTelemetry> {
        self.gpus.iter_mut().find(|g| &*g.uuid == uuid)
    }
}

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

/// Finished minutes waiting for the next flush, already encoded, by
/// (minute, node) so that the oldest go first when the queue is full.
#[derive(Default)]
struct Pending {
    records: BTreeMap<(u64, Arc<str>), NodeMinute>,
    gpu_minutes: usize,
}

impl Pending {
    fn add(&mut self, record: NodeMinute) {
        self.gpu_minutes += record.gpu_minutes;
        match self.records.entry((record.minute, record.node_id.clone())) {
            std::collections::btree_map::Entry::Occupied(mut queued) => {
                queued.get_mut().append(&record)
            }
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(record);
            }
        }
    }

    /// Drops the oldest records beyond `limit` GPU-minutes; returns how
    /// many GPU-minutes went.
    fn trim(&mut self, limit: usize) -> usize {
        let mut dropped = 0;
        while self.gpu_minutes > limit
            && let Some((_, oldest)) = self.records.pop_first()
        {
            self.gpu_minutes -= oldest.gpu_minutes;
            dropped += oldest.gpu_minutes;
        }
        dropped
    }

    /// Removes and returns up to `limit` records, oldest minute first.
    fn take_oldest(&mut self, limit: usize) -> Vec<NodeMinute> {
        if limit >= self.records.len() {
            self.gpu_minutes = 0;
            return std::mem::take(&mut self.records).into_values().collect();
        }
        let mut taken = Vec::with_capacity(limit);
        while taken.len() < limit
            && let Some((_, record)) = self.records.pop_first()
        {
            self.gpu_minutes -= record.gpu_minutes;
            taken.push(record);
        }
        taken
    }
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

    /// Finished minutes lost because the store could not keep up.
    /// What the rollups take on disk, when the store keeps them in files.
    pub fn disk_usage(&self) -> Option<RollupDiskUsage> {
        self.store.disk_usage()
    }

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
        // A node's GPUs share its records: read them once per node.
        let mut by_node: Vec<(&str, Vec<usize>)> = Vec::new();
        let mut slot_of: HashMap<&str, usize> = HashMap::new();
        for (i, (node_id, _)) in gpus.iter().enumerate() {
            let slot = *slot_of.entry(node_id).or_insert_with(|| {
                by_node.push((node_id, Vec::new()));
                by_node.len() - 1
            });
            by_node[slot].1.push(i);
        }
        let mut points: Vec<Vec<HistoryPoint>> = vec![Vec::new(); gpus.len()];
        for (node_id, members) in by_node {
            let uuids: Vec<&str> = members.iter().map(|&i| gpus[i].1.as_str()).collect();
            let minutes = self.node_minutes(node_id, &uuids, plan.start_minute, plan.end_minute)?;
            for (&i, minutes) in members.iter().zip(minutes) {
                points[i] = bucket(&minutes, metric, plan);
            }
        }
        let series = gpus
            .iter()
            .zip(points)
            .map(|((node_id, uuid), points)| HistorySeries {
                gpu_uuid: uuid.clone(),
                node_id: node_id.clone(),
                points,
            })
            .collect();
        Ok(GetHistoryResponse {
            metric: metric.name.to_string(),
            unit: metric.unit.to_string(),
            step_seconds: plan.step_minutes as u32 * 60,
            start: Some(minute_to_ts(plan.start_minute)),
            end: Some(minute_to_ts(plan.end_minute)),
            series,
        })
    }
}

// ------------------------------------------------------------------ history

/// Most points one history series may have.
pub const MAX_HISTORY_POINTS: u64 = 10_000;
/// Points a series gets when the caller leaves the step to the controller.
pub const AUTO_HISTORY_POINTS: u64 = 500;

/// A validated history query, in whole minutes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPlan {
    pub start_minute: u64,
    pub end_minute: u64,
    pub step_minutes: u64,
}

/// Checks a history range and step and rounds them to whole minutes
/// (start down, end up). `step_seconds == 0` picks one.
pub fn plan_history(
    start: Option<&Timestamp>,
    end: Option<&Timestamp>,
    step_seconds: u32,
    now: SystemTime,
) -> Result<HistoryPlan> {
    let start = ts_nanos(start).ok_or_else(|| {
        ControllerError::invalid("start", "is required and must be a valid time after 1970")
    })?;
    let end = match end {
        None => system_nanos(now),
        Some(ts) => ts_nanos(Some(ts))
            .ok_or_else(|| ControllerError::invalid("end", "must be a valid time after 1970"))?,
    };
    if end <= start {
        return Err(ControllerError::invalid(
            "end",
            "must be after start (the range is [start, end))",
        ));
    }
    const MINUTE: i128 = 60_000_000_000;
    let start_minute = (start / MINUTE) as u64;
    let end_minute = ((end + MINUTE - 1) / MINUTE) as u64;
    let span = end_minute - start_minute;
    let step_minutes = if step_seconds == 0 {
        span.div_ceil(AUTO_HISTORY_POINTS).max(1)
    } else {
        if step_seconds < 60 || !step_seconds.is_multiple_of(60) {
            return Err(ControllerError::invalid(
                "step",
                format!(
                    "is {step_seconds}s; rollups are per minute, so the step must be a whole number of minutes (at least 60s)"
                ),
            ));
        }
        u64::from(step_seconds / 60)
    };
    let points = span.div_ceil(step_minutes);
    if points > MAX_HISTORY_POINTS {
        let least = span.div_ceil(MAX_HISTORY_POINTS);
        return Err(ControllerError::invalid(
            "step",
            format!(
                "a {}m step over {} gives {points} points; at most {MAX_HISTORY_POINTS} are returned: use a step of at least {least}m or a shorter range",
                step_minutes,
                humantime::format_duration(Duration::from_secs(span * 60)),
            ),
        ));
    }
    Ok(HistoryPlan {
        start_minute,
        end_minute,
        step_minutes,
    })
}

/// Folds per-minute rollups into steps; steps without samples are left out.
pub fn bucket(
    minutes: &BTreeMap<u64, Rollup>,
    metric: &Metric,
    plan: &HistoryPlan,
) -> Vec<HistoryPoint> {
    let mut steps: BTreeMap<u64, Acc> = BTreeMap::new();
    for (minute, rollup) in minutes.range(plan.start_minute..plan.end_minute) {
        let acc = rollup.get(metric);
        if acc.count == 0 {
            continue;
        }
        let step = plan.start_minute
            + (minute - plan.start_minute) / plan.step_minutes * plan.step_minutes;
        steps.entry(step).or_default().merge(&acc);
    }
    steps
        .into_iter()
        .filter_map(|(step, acc)| {
            Some(HistoryPoint {
                time: Some(minute_to_ts(step)),
                mean: acc.mean()?,
                max: acc.max,
                samples: u64::from(acc.count),
            })
        })
        .collect()
}

// ------------------------------------------------------- latest, aggregates

/// Flattens nodes (with their GPUs' latest samples) into the GPUs matching
/// the filter, with the counters of the nodes that appear.
pub fn latest(
    nodes: &[Node],
    filter: &GetLatestRequest,
    stats: impl Fn(&str) -> NodeTelemetryStats,
    now: SystemTime,
) -> GetLatestResponse {
    let mut response = GetLatestResponse {
        as_of: Some(Timestamp::from(now)),
        ..Default::default()
    };
    for node in nodes {
        let identity = node.identity.clone().unwrap_or_default();
        if (!filter.node_id.is_empty() && identity.node_id != filter.node_id)
            || (!filter.provider.is_empty() && identity.provider != filter.provider)
            || (!filter.region.is_empty() && identity.region != filter.region)
        {
            continue;
        }
        let before = response.gpus.len();
        for gpu in &node.gpus {
            let info = gpu.info.clone().unwrap_or_default();
            if (!filter.gpu_uuid.is_empty() && info.uuid != filter.gpu_uuid)
                || (filter.generation != 0 && info.generation != filter.generation)
                || (!filter.model.is_empty() && info.model != filter.model)
            {
                continue;
            }
            response.gpus.push(GpuLatest {
                node_id: identity.node_id.clone(),
                provider: identity.provider.clone(),
                region: identity.region.clone(),
                node_state: node.state,
                info: Some(info),
                health: gpu.health,
                job_id: gpu.job_id.clone(),
                allocation_id: gpu.allocation_id.clone(),
                sample: gpu.latest.as_deref().cloned(),
            });
        }
        if response.gpus.len() > before {
            response.nodes.push(stats(&identity.node_id));
        }
    }
    response
}

/// Sums of one group before the means are taken.
#[derive(Default)]
struct GroupSums {
    group: TelemetryGroup,
    util_sum: f64,
    util_count: u32,
    power_sum_mw: f64,
    power_count: u32,
}

impl GroupSums {
    fn finish(mut self) -> TelemetryGroup {
        if self.util_count > 0 {
            self.group.mean_gpu_utilization_percent = self.util_sum / f64::from(self.util_count);
        }
        if self.power_count > 0 {
            self.group.mean_power_watts = self.power_sum_mw / 1000.0 / f64::from(self.power_count);
        }
        self.group.total_power_watts = self.power_sum_mw / 1000.0;
        self.group
    }
}

/// Groups every GPU of non-Lost nodes. Samples count only from Ready nodes:
/// a silent node's last sample says nothing about now.
pub fn aggregates(
    nodes: &[Node],
    group_by: &[CapacityDimension],
    now: SystemTime,
) -> Result<GetAggregatesResponse> {
    for (i, dim) in group_by.iter().enumerate() {
        if *dim == CapacityDimension::Unspecified {
            return Err(ControllerError::invalid(
                format!("group_by[{i}]"),
                "accepted dimensions: provider, region, generation, model",
            ));
        }
    }
    let has = |d: CapacityDimension| group_by.contains(&d);
    let mut groups: BTreeMap<(String, String, i32, String), GroupSums> = BTreeMap::new();
    let mut total = GroupSums::default();
    for node in nodes {
        if node.state() == NodeState::Lost {
            continue;
        }
        let identity = node.identity.clone().unwrap_or_default();
        let ready = node.state() == NodeState::Ready;
        for gpu in &node.gpus {
            let info = gpu.info.clone().unwrap_or_default();
            let key = (
                if has(CapacityDimension::Provider) {
                    identity.provider.clone()
                } else {
                    String::new()
                },
                if has(CapacityDimension::Region) {
                    identity.region.clone()
                } else {
                    String::new()
                },
                if has(CapacityDimension::Generation) {
                    info.generation
                } else {
                    0
                },
                if has(CapacityDimension::Model) {
                    info.model.clone()
                } else {
                    String::new()
                },
            );
            let group = groups.entry(key.clone()).or_insert_with(|| GroupSums {
                group: TelemetryGroup {
                    provider: key.0.clone(),
                    region: key.1.clone(),
                    generation: key.2,
                    model: key.3.clone(),
                    ..Default::default()
                },
                ..Default::default()
            });
            for sums in [&mut *group, &mut total] {
                sums.group.gpus += 1;
                sums.group.unhealthy_gpus += u32::from(gpu.health() == GpuHealth::Unhealthy);
                let Some(sample) = gpu.latest.as_ref().filter(|_| ready) else {
                    continue;
                };
                sums.group.reporting_gpus += 1;
                if let Some(util) = sample.gpu_utilization_percent {
                    sums.util_sum += f64::from(util);
                    sums.util_count += 1;
                }
                if let Some(power) = sample.power_usage_milliwatts {
                    sums.power_sum_mw += f64::from(power);
                    sums.power_count += 1;
                }
                sums.group.memory_used_bytes += sample.memory_used_bytes.unwrap_or(0);
                sums.group.memory_total_bytes +=
                    sample.memory_total_bytes.unwrap_or(info.memory_bytes);
            }
        }
    }
    Ok(GetAggregatesResponse {
        groups: if group_by.is_empty() {
            Vec::new()
        } else {
            groups.into_values().map(GroupSums::finish).collect()
        },
        total: Some(total.finish()),
        as_of: Some(Timestamp::from(now)),
    })
}

// ------------------------------------------------- controller-facing queries

/// `Telemetry.GetLatest`.
pub fn get_latest(
    controller: &crate::state::Controller,
    filter: GetLatestRequest,
) -> Result<GetLatestResponse> {
    if !filter.node_id.is_empty() {
        crate::validate::node_id("node_id", &filter.node_id)?;
    }
    let nodes = controller.list_nodes(&filter.provider, &filter.region, &[]);
    let hub = controller.telemetry();
    Ok(latest(
        &nodes,
        &filter,
        |id| hub.stats(id),
        SystemTime::now(),
    ))
}

/// `Telemetry.GetHistory`: one metric of one GPU, or of each GPU of a node.
pub fn get_history(
    controller: &crate::state::Controller,
    request: gpufleet_proto::v1::GetHistoryRequest,
) -> Result<GetHistoryResponse> {
    let metric = metric(&request.metric)?;
    let now = SystemTime::now();
    let plan = plan_history(
        request.start.as_ref(),
        request.end.as_ref(),
        request.step_seconds,
        now,
    )?;
    let gpus: Vec<(String, String)> =
        match (request.gpu_uuid.is_empty(), request.node_id.is_empty()) {
            (false, true) => {
                let node = controller
                    .list_nodes("", "", &[])
                    .into_iter()
                    .find(|n| {
                        n.gpus
                            .iter()
                            .any(|g| g.info.as_ref().is_some_and(|i| i.uuid == request.gpu_uuid))
                    })
                    .ok_or_else(|| {
                        ControllerError::NotFound(format!(
                            "no registered node has GPU {}; list GPUs with `gpufleet top --once`",
                            request.gpu_uuid
                        ))
                    })?;
                let node_id = node.identity.map(|i| i.node_id).unwrap_or_default();
                vec![(node_id, request.gpu_uuid)]
            }
            (true, false) => {
                let node = controller.get_node(&request.node_id)?;
                node.gpus
                    .iter()
                    .filter_map(|g| g.info.as_ref())
                    .map(|i| (request.node_id.clone(), i.uuid.clone()))
                    .collect()
            }
            _ => {
                return Err(ControllerError::invalid(
                    "gpu_uuid",
                    "set exactly one of gpu_uuid and node_id",
                ));
            }
        };
    controller.telemetry().history(&gpus, metric, &plan)
}

/// `Telemetry.GetAggregates`.
pub fn get_aggregates(
    controller: &crate::state::Controller,
    group_by: &[CapacityDimension],
) -> Result<GetAggregatesResponse> {
    aggregates(
        &controller.list_nodes("", "", &[]),
        group_by,
        SystemTime::now(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::{GpuGeneration, GpuInfo, GpuStatus, NodeIdentity};

    /// A fixed virtual "now": 2025-01-01T00:00:00Z.
    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_735_689_600)
    }

    fn sample(uuid: &str, at: SystemTime, util: u32, power_mw: u32) -> GpuSample {
        GpuSample {
            uuid: uuid.into(),
            sampled_at: Some(Timestamp::from(at)),
            gpu_utilization_percent: Some(util),
            power_usage_milliwatts: Some(power_mw),
            memory_used_bytes: Some(10),
            memory_total_bytes: Some(100),
            ..Default::default()
        }
    }

    fn hub() -> (Arc<MemoryRollupStore>, TelemetryHub) {
        let store = Arc::new(MemoryRollupStore::default());
        let hub = TelemetryHub::new(store.clone(), Duration::from_secs(3600));
        hub.register_node("n1", &["GPU-a".into(), "GPU-b".into()]);
        (store, hub)
    }

    fn util() -> &'static Metric {
        metric("util").unwrap()
    }

    #[test]
    fn metric_ids_and_names_are_unique() {
        let mut ids: Vec<u8> = METRICS.iter().map(|m| m.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), METRICS.len());
        let mut names: Vec<&str> = METRICS
            .iter()
            .flat_map(|m| std::iter::once(m.name).chain(m.aliases.iter().copied()))
            .collect();
        let all = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all, "a name or alias is used twice");
        let err = metric("wattage").unwrap_err().to_string();
        assert!(err.contains("gpu_utilization_percent"), "{err}");
    }

    #[test]
    fn rollup_mean_and_max_and_merge() {
        let mut r = Rollup::new(7);
        for (i, u) in [10, 30, 20].into_iter().enumerate() {
            r.add(&sample(
                "GPU-a",
                t0() + Duration::from_secs(i as u64),
                u,
                1000,
            ));
        }
        let acc = r.get(util());
        assert_eq!((acc.count, acc.sum, acc.max), (3, 60.0, 30.0));
        assert_eq!(acc.mean(), Some(20.0));
        // A metric the device did not report stays empty: absent, not zero.
        assert_eq!(r.get(metric("temp").unwrap()).count, 0);
        let mut other = Rollup::new(7);
        other.add(&sample("GPU-a", t0(), 90, 1000));
        r.merge(&other);
        let acc = r.get(util());
        assert_eq!((acc.count, acc.sum, acc.max), (4, 150.0, 90.0));
        // Merging an empty accumulator leaves max alone, even at zero.
        let mut zero = Acc::default();
        zero.add(0.0);
        zero.merge(&Acc::default());
        assert_eq!((zero.count, zero.max), (1, 0.0));
    }

    #[test]
    fn legacy_rollup_encoding_round_trips_and_rejects_garbage() {
        let mut r = Rollup::new(42);
        r.add(&sample("GPU-a", t0(), 55, 700_000));
        let bytes = r.encode_v1();
        assert_eq!(Rollup::decode_v1(42, &bytes).unwrap(), r);
        assert!(Rollup::decode_v1(42, &[]).is_err());
        assert!(Rollup::decode_v1(42, &[9]).is_err());
        assert!(Rollup::decode_v1(42, &bytes[..bytes.len() - 1]).is_err());
        // An id from a newer controller is skipped, the rest kept.
        let mut newer = bytes.clone();
        newer.push(250);
        newer.extend_from_slice(&[0; ROLLUP_ENTRY_BYTES_V1 - 1]);
        assert_eq!(Rollup::decode_v1(42, &newer).unwrap(), r);
    }

    #[test]
    fn node_minute_records_round_trip_losslessly_and_reject_garbage() {
        let mut a = Rollup::new(42);
        for util in [55, 0, 100] {
            a.add(&sample("GPU-a", t0(), util, 700_000));
        }
        // A non-integer sum and max (a future metric) survive exactly too.
        a.metrics[0].sum = 0.1;
        a.metrics[0].max = f64::MAX;
        let mut b = Rollup::new(42);
        b.add(&GpuSample {
            memory_used_bytes: Some(80 << 30),
            memory_total_bytes: Some(80 << 30),
            ..sample("GPU-b", t0(), 1, 1)
        });
        let gpus = vec![("GPU-a".to_string(), a), ("GPU-b".to_string(), b)];
        let bytes = encode_node_minute(&gpus);
        assert_eq!(decode_node_minute(42, &bytes).unwrap(), gpus);
        // Integers are short: a GPU-minute of the usual metrics is well
        // under the 190 bytes of the first format.
        let mut typical = Rollup::new(42);
        for i in 0..60 {
            typical.add(&GpuSample {
                memory_utilization_percent: Some(40),
                temperature_celsius: Some(60),
                power_limit_milliwatts: Some(700_000),
                sm_clock_mhz: Some(1980),
                memory_clock_mhz: Some(2619),
                ..sample("GPU-a", t0(), i, 500_000)
            });
        }
        let one = encode_node_minute(&[("GPU-a".to_string(), typical)]);
        assert!(one.len() < 100, "{} bytes", one.len());
        assert!(decode_node_minute(42, &[]).is_err());
        assert!(decode_node_minute(42, &[1]).is_err());
        // A cut record never decodes into wrong values: an error, or
        // (cut between two GPUs) the GPUs before the cut.
        for cut in 1..bytes.len() {
            match decode_node_minute(42, &bytes[..cut]) {
                Ok(some) => assert!(some.len() < gpus.len() && gpus.starts_with(&some)),
                Err(e) => assert!(e.contains("truncated"), "{e}"),
            }
        }
        assert!(decode_node_minute(42, &bytes[..10]).is_err());
    }

    #[test]
    fn gpu_uuids_are_stored_in_16_bytes_and_anything_else_verbatim() {
        let canonical = "GPU-5e9c6d95-1f3e-4a2b-8c7d-0123456789ab";
        let mut r = Rollup::new(1);
        r.add(&sample(canonical, t0(), 50, 1000));
        let uuids = [
            canonical,
            // Not NVML's canonical spelling: kept as they are.
            "GPU-5E9C6D95-1F3E-4A2B-8C7D-0123456789AB",
            "MIG-5e9c6d95-1f3e-4a2b-8c7d-0123456789ab",
            "GPU-5e9c6d95-1f3e-4a2b-8c7d-0123456789ab-",
            "GPU-5e9c6d95-1f3e-4a2b-8c7d0-123456789ab",
            "GPU-a",
        ];
        for uuid in uuids {
            let gpus = vec![(uuid.to_string(), r.clone())];
            let bytes = encode_node_minute(&gpus);
            assert_eq!(decode_node_minute(1, &bytes).unwrap(), gpus, "{uuid}");
        }
        let short = encode_node_minute(&[(canonical.to_string(), r.clone())]);
        let long = encode_node_minute(&[(uuids[1].to_string(), r)]);
        assert_eq!(long.len() - short.len(), 40 + 1 - 17);
    }

    #[test]
    fn a_full_queue_drops_its_oldest_minutes_first() {
        let mut pending = Pending::default();
        let r = |minute| {
            let mut r = Rollup::new(minute);
            r.add(&sample("GPU-a", t0(), 1, 1));
            r
        };
        for (node, minute) in [("n2", 7), ("n1", 5), ("n1", 6), ("n1", 5)] {
            let uuid = if minute == 5 && node == "n1" && pending.gpu_minutes > 0 {
                "GPU-b"
            } else {
                "GPU-a"
            };
            for record in NodeMinute::group(&[finished(node, uuid, &r(minute))]) {
                pending.add(record);
            }
        }
        // n1's minute 5 holds two GPUs, queued at different times.
        assert_eq!(pending.gpu_minutes, 4);
        assert_eq!(pending.trim(3), 2);
        assert_eq!(pending.gpu_minutes, 2);
        let oldest: Vec<(u64, String)> = pending
            .take_oldest(1)
            .iter()
            .map(|r| (r.minute, r.node_id.to_string()))
            .collect();
        assert_eq!(oldest, [(6, "n1".to_string())]);
        assert_eq!(pending.gpu_minutes, 1);
        let left: Vec<(u64, String)> = pending
            .take_oldest(usize::MAX)
            .iter()
            .map(|r| (r.minute, r.node_id.to_string()))
            .collect();
        assert_eq!(left, [(7, "n2".to_string())]);
        assert_eq!(pending.gpu_minutes, 0);
    }

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

    /// The plan of a query over `[start, end)` asked at `end`.
    fn plan_between(start: SystemTime, end: SystemTime, step_seconds: u32) -> HistoryPlan {
        plan_history(
            Some(&Timestamp::from(start)),
            Some(&Timestamp::from(end)),
            step_seconds,
            end,
        )
        .unwrap()
    }

    #[test]
    fn history_merges_store_queue_and_current_minute() {
        let (_, hub) = hub();
        let start = t0();
        for i in 0..30u64 {
            let at = start + Duration::from_secs(i * 10);
            // Minute k has utilisation 10 * (k + 1).
            let util = 10 * (i / 6 + 1) as u32;
            hub.ingest("n1", vec![sample("GPU-a", at, util, 1000)], at);
            if i == 13 {
                hub.flush(at).unwrap();
            }
        }
        let plan = plan_between(start, start + Duration::from_secs(295), 120);
        assert_eq!(plan.step_minutes, 2);
        let response = hub
            .history(&[("n1".into(), "GPU-a".into())], util(), &plan)
            .unwrap();
        assert_eq!(response.step_seconds, 120);
        let points = &response.series[0].points;
        // Minutes 0+1, 2+3, 4 (current, unfinished).
        let got: Vec<(f64, f64, u64)> = points.iter().map(|p| (p.mean, p.max, p.samples)).collect();
        assert_eq!(
            got,
            vec![(15.0, 20.0, 12), (35.0, 40.0, 12), (50.0, 50.0, 6)]
        );
        assert_eq!(points[1].time, Some(minute_to_ts(minute_of(start) + 2)));
        // A GPU without samples has an empty series, not an error.
        let response = hub
            .history(&[("n1".into(), "GPU-b".into())], util(), &plan)
            .unwrap();
        assert!(response.series[0].points.is_empty());
    }

    #[test]
    fn history_ranges_and_steps_are_checked_and_capped() {
        let now = t0();
        let ts = |secs_ago: u64| Timestamp::from(now - Duration::from_secs(secs_ago));
        let err = |r: Result<HistoryPlan>| r.unwrap_err().to_string();
        assert!(err(plan_history(None, None, 60, now)).starts_with("start"));
        assert!(err(plan_history(Some(&ts(0)), Some(&ts(60)), 60, now)).starts_with("end"));
        let tiny = err(plan_history(Some(&ts(3600)), None, 10, now));
        assert!(tiny.contains("at least 60s"), "{tiny}");
        assert!(err(plan_history(Some(&ts(3600)), None, 90, now)).contains("whole number"));
        // 7 days at 1 minute = 10,080 points: over the cap, and the error
        // names the cap and the smallest step that fits.
        let huge = err(plan_history(Some(&ts(7 * 86_400)), None, 60, now));
        assert!(huge.starts_with("step"), "{huge}");
        assert!(
            huge.contains("10080 points") && huge.contains("10000"),
            "{huge}"
        );
        assert!(huge.contains("at least 2m"), "{huge}");
        assert!(plan_history(Some(&ts(7 * 86_400)), None, 120, now).is_ok());
        // Exactly at the cap is fine.
        assert!(plan_history(Some(&ts(10_000 * 60)), None, 60, now).is_ok());
        // Automatic step: at most AUTO_HISTORY_POINTS points, whole minutes.
        let auto = plan_history(Some(&ts(7 * 86_400)), None, 0, now).unwrap();
        assert_eq!(auto.step_minutes, 21);
        let auto = plan_history(Some(&ts(3600)), None, 0, now).unwrap();
        assert_eq!(auto.step_minutes, 1);
        assert_eq!(auto.end_minute - auto.start_minute, 60);
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

    fn finished(node: &str, uuid: &str, rollup: &Rollup) -> FinishedRollup {
        FinishedRollup {
            node_id: node.into(),
            uuid: uuid.into(),
            rollup: rollup.clone(),
        }
    }

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
    fn node_first_rollups_of_older_controllers_are_read_merged_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        // What a controller before telemetry.v3 left: node-first keys, for
        // "n1" (minutes 4 and 5) and "n1/x", whose name "n1" prefixes.
        let node_first = db.open_tree(NODE_FIRST_ROLLUP_TREE).unwrap();
        let mut old = Rollup::new(4);
        old.add(&sample("GPU-a", t0(), 10, 1));
        for (node, minute) in [("n1", 4), ("n1", 5), ("n1/x", 5)] {
            let rollup = Rollup {
                minute,
                ..old.clone()
            };
            node_first
                .insert(
                    length_prefixed_key(node.as_bytes(), minute),
                    encode_node_minute(&[("GPU-a".to_string(), rollup)]),
                )
                .unwrap();
        }
        let store = SledRollupStore::new(db.open_tree(ROLLUP_TREE).unwrap())
            .with_node_first(node_first.clone());
        // The upgrade minute (5) gets more samples under the new key, and
        // minute 7 is new.
        let mut new = Rollup::new(5);
        new.add(&sample("GPU-a", t0(), 30, 1));
        let mut later = Rollup::new(7);
        later.add(&sample("GPU-a", t0(), 70, 1));
        store
            .merge(&NodeMinute::group(&[
                finished("n1", "GPU-a", &new),
                finished("n1", "GPU-a", &later),
            ]))
            .unwrap();
        let got = |node: &str| -> Vec<(u64, u32, f64)> {
            store
                .range(node, "GPU-a", 0, u64::MAX)
                .unwrap()
                .iter()
                .map(|r| (r.minute, r.get(util()).count, r.get(util()).sum))
                .collect()
        };
        assert_eq!(got("n1"), [(4, 1, 10.0), (5, 2, 40.0), (7, 1, 70.0)]);
        assert_eq!(got("n1/x"), [(5, 1, 10.0)]);
        // A window inside the stored minutes sees only its own.
        let window: Vec<u64> = store
            .range("n1", "GPU-a", 5, 7)
            .unwrap()
            .iter()
            .map(|r| r.minute)
            .collect();
        assert_eq!(window, [5]);
        // Retention empties both trees: minute 4 of n1 (node-first), then
        // minute 5 of both nodes (both trees) and 7.
        assert_eq!(store.prune_before(5).unwrap(), 1);
        assert_eq!(store.prune_before(8).unwrap(), 4);
        assert!(node_first.is_empty());
        assert!(got("n1").is_empty());
    }

    #[test]
    fn a_nodes_gpus_read_together_match_each_read_alone_across_all_three_trees() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let rollup = |minute: u64, util: u32| {
            let mut r = Rollup::new(minute);
            r.add(&sample("GPU-x", t0(), util, 1));
            r
        };
        // Minute 3 in the first format (per GPU), minute 4 node first,
        // minutes 4 (the upgrade minute, merged) to 6 minute first.
        let legacy = db.open_tree(LEGACY_ROLLUP_TREE).unwrap();
        for (uuid, util) in [("GPU-a", 1), ("GPU-c", 3)] {
            legacy
                .insert(
                    length_prefixed_key(uuid.as_bytes(), 3),
                    rollup(3, util).encode_v1(),
                )
                .unwrap();
        }
        let node_first = db.open_tree(NODE_FIRST_ROLLUP_TREE).unwrap();
        node_first
            .insert(
                length_prefixed_key(b"n1", 4),
                encode_node_minute(&[
                    ("GPU-a".to_string(), rollup(4, 10)),
                    ("GPU-b".to_string(), rollup(4, 20)),
                ]),
            )
            .unwrap();
        let store = SledRollupStore::new(db.open_tree(ROLLUP_TREE).unwrap())
            .with_node_first(node_first)
            .with_legacy(legacy);
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
        assert_eq!(
            sums(&together[0]),
            [(3, 3.0), (4, 304.0), (5, 305.0), (6, 306.0)]
        );
        assert_eq!(
            sums(&together[1]),
            [(3, 1.0), (4, 114.0), (5, 105.0), (6, 106.0)]
        );
        assert!(together[2].is_empty());
        for (uuid, got) in ["GPU-c", "GPU-a", "GPU-zz"].iter().zip(&together) {
            assert_eq!(
                &store.range("n1", uuid, 0, u64::MAX).unwrap(),
                got,
                "{uuid}"
            );
        }
        // A window, and the default (one read per GPU) agrees.
        let window = store.range_gpus("n1", &["GPU-b", "GPU-a"], 4, 6).unwrap();
        assert_eq!(sums(&window[0]), [(4, 224.0), (5, 205.0)]);
        assert_eq!(sums(&window[1]), [(4, 114.0), (5, 105.0)]);
        // (The memory store keys by GPU alone: n1's records only.)
        let memory = MemoryRollupStore::default();
        let n1: Vec<FinishedRollup> = finished_minutes
            .into_iter()
            .filter(|f| &*f.node_id == "n1")
            .collect();
        memory.merge(&NodeMinute::group(&n1)).unwrap();
        let by_default = memory.range_gpus("n1", &["GPU-b", "GPU-a"], 4, 6).unwrap();
        assert_eq!(sums(&by_default[0]), [(4, 204.0), (5, 205.0)]);
        assert_eq!(sums(&by_default[1]), [(4, 104.0), (5, 105.0)]);
    }

    #[test]
    fn history_of_several_nodes_gpus_keeps_the_order_asked_for() {
        let (_, hub) = hub();
        hub.register_node("n2", &["GPU-z".into()]);
        let start = t0();
        for i in 0..3u64 {
            let at = start + Duration::from_secs(i * 60);
            let util = 10 * (i as u32 + 1);
            hub.ingest(
                "n1",
                vec![
                    sample("GPU-a", at, util, 1),
                    sample("GPU-b", at, util + 1, 1),
                ],
                at,
            );
            hub.ingest("n2", vec![sample("GPU-z", at, util + 2, 1)], at);
            if i == 1 {
                // Minute 0 stored, minute 1 queued, minute 2 current.
                hub.flush(at).unwrap();
            }
        }
        let plan = plan_between(start, start + Duration::from_secs(150), 60);
        let gpus = [
            ("n1", "GPU-b"),
            ("n2", "GPU-z"),
            ("n1", "GPU-a"),
            ("n1", "GPU-gone"),
        ]
        .map(|(n, u)| (n.to_string(), u.to_string()));
        let response = hub.history(&gpus, util(), &plan).unwrap();
        let got: Vec<(String, Vec<f64>)> = response
            .series
            .iter()
            .map(|s| {
                (
                    s.gpu_uuid.clone(),
                    s.points.iter().map(|p| p.mean).collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("GPU-b".to_string(), vec![11.0, 21.0, 31.0]),
                ("GPU-z".to_string(), vec![12.0, 22.0, 32.0]),
                ("GPU-a".to_string(), vec![10.0, 20.0, 30.0]),
                ("GPU-gone".to_string(), vec![]),
            ]
        );
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

    #[test]
    fn rollups_of_the_first_format_are_still_read_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        // What a controller before telemetry.v2 left behind: per-GPU keys.
        let legacy = db.open_tree(LEGACY_ROLLUP_TREE).unwrap();
        let mut old = Rollup::new(5);
        old.add(&sample("GPU-a", t0(), 10, 1));
        for minute in [4, 5] {
            legacy
                .insert(
                    length_prefixed_key(b"GPU-a", minute),
                    Rollup {
                        minute,
                        ..old.clone()
                    }
                    .encode_v1(),
                )
                .unwrap();
        }
        let store =
            SledRollupStore::new(db.open_tree(ROLLUP_TREE).unwrap()).with_legacy(legacy.clone());
        // The upgrade minute has rows in both trees: they are merged.
        let mut new = Rollup::new(5);
        new.add(&sample("GPU-a", t0(), 30, 1));
        new.add(&sample("GPU-a", t0(), 50, 1));
        store
            .merge(&NodeMinute::group(&[finished("n1", "GPU-a", &new)]))
            .unwrap();
        let rows = store.range("n1", "GPU-a", 0, 10).unwrap();
        let got: Vec<(u64, u32, f64)> = rows
            .iter()
            .map(|r| (r.minute, r.get(util()).count, r.get(util()).sum))
            .collect();
        assert_eq!(got, vec![(4, 1, 10.0), (5, 3, 90.0)]);
        // Retention empties the old tree like the new one.
        assert_eq!(store.prune_before(5).unwrap(), 1);
        assert_eq!(store.prune_before(6).unwrap(), 2);
        assert!(legacy.is_empty());
        assert!(store.range("n1", "GPU-a", 0, 10).unwrap().is_empty());
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

    /// (model, generation, (utilisation, milliwatts) if reporting, health).
    type TestGpu = (&'static str, GpuGeneration, Option<(u32, u32)>, GpuHealth);

    fn node(id: &str, provider: &str, state: NodeState, gpus: &[TestGpu]) -> Node {
        Node {
            identity: Some(NodeIdentity {
                node_id: id.into(),
                provider: provider.into(),
                region: "r1".into(),
                ..Default::default()
            }),
            state: state as i32,
            gpus: gpus
                .iter()
                .map(|(model, generation, reading, health)| GpuStatus {
                    info: Some(GpuInfo {
                        uuid: format!("{id}-{model}"),
                        model: (*model).into(),
                        generation: *generation as i32,
                        memory_bytes: 80,
                        ..Default::default()
                    }),
                    health: *health as i32,
                    latest: reading.map(|(util, mw)| {
                        Box::new(GpuSample {
                            gpu_utilization_percent: Some(util),
                            power_usage_milliwatts: Some(mw),
                            memory_used_bytes: Some(8),
                            ..Default::default()
                        })
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn aggregates_group_and_average_over_reporting_gpus() {
        use GpuGeneration::{Ampere, Hopper};
        let nodes = vec![
            node(
                "a",
                "aws",
                NodeState::Ready,
                &[
                    ("H100", Hopper, Some((80, 700_000)), GpuHealth::Healthy),
                    ("H100b", Hopper, Some((40, 500_000)), GpuHealth::Unhealthy),
                ],
            ),
            node(
                "b",
                "gcp",
                NodeState::Ready,
                &[
                    ("A100", Ampere, Some((10, 300_000)), GpuHealth::Healthy),
                    ("A100b", Ampere, None, GpuHealth::Healthy),
                ],
            ),
            // NotReady: counted, but its stale samples are not.
            node(
                "c",
                "gcp",
                NodeState::NotReady,
                &[("A100", Ampere, Some((100, 400_000)), GpuHealth::Healthy)],
            ),
            // Lost: not counted at all.
            node(
                "d",
                "aws",
                NodeState::Lost,
                &[("H100", Hopper, Some((100, 1)), GpuHealth::Healthy)],
            ),
        ];
        let response = aggregates(&nodes, &[CapacityDimension::Provider], t0()).unwrap();
        let aws = &response.groups[0];
        assert_eq!(
            (
                aws.provider.as_str(),
                aws.gpus,
                aws.unhealthy_gpus,
                aws.reporting_gpus
            ),
            ("aws", 2, 1, 2)
        );
        assert_eq!(aws.mean_gpu_utilization_percent, 60.0);
        assert_eq!(aws.total_power_watts, 1200.0);
        assert_eq!(aws.mean_power_watts, 600.0);
        assert_eq!(aws.memory_used_bytes, 16);
        let gcp = &response.groups[1];
        assert_eq!((gcp.gpus, gcp.reporting_gpus), (3, 1));
        assert_eq!(gcp.mean_gpu_utilization_percent, 10.0);
        assert!(
            gcp.region.is_empty() && gcp.generation == 0,
            "only grouped-by fields are set"
        );
        let total = response.total.unwrap();
        assert_eq!((total.gpus, total.reporting_gpus), (5, 3));
        assert_eq!(total.total_power_watts, 1500.0);
        let by_gen = aggregates(&nodes, &[CapacityDimension::Generation], t0()).unwrap();
        assert_eq!(by_gen.groups.len(), 2);
        assert!(aggregates(&nodes, &[CapacityDimension::Unspecified], t0()).is_err());

        let filter = GetLatestRequest {
            provider: "gcp".into(),
            model: "A100".into(),
            ..Default::default()
        };
        let latest = latest(
            &nodes,
            &filter,
            |id| NodeTelemetryStats {
                node_id: id.into(),
                ..Default::default()
            },
            t0(),
        );
        let ids: Vec<&str> = latest.gpus.iter().map(|g| g.node_id.as_str()).collect();
        assert_eq!(ids, vec!["b", "c"]);
        assert_eq!(latest.nodes.len(), 2);
    }
}
