//! What the hub keeps per node and per GPU between samples: the latest
//! sample (encoded), the unfinished minute's accumulators and the node's
//! counters. Sized with care: a controller holds one of each per GPU.

use std::sync::Arc;

use gpufleet_proto::v1::GpuSample;
use prost::Message;

use crate::telemetry::catalogue::{METRIC_COUNT, METRICS};
use crate::telemetry::rollup::{Acc, Rollup};
use crate::telemetry::validation::DROP_REASONS;

/// The unfinished minute of one GPU: what a `Rollup` holds, as arrays and
/// with 16-bit counts, so 176 bytes instead of 224 (the controller keeps
/// one per GPU). A count about to overflow finishes the minute so far
/// early and begins another for the same minute; the store merges them.
#[derive(Debug, Clone)]
pub(super) struct CurrentMinute {
    pub(super) minute: u64,
    pub(super) counts: [u16; METRIC_COUNT],
    pub(super) sums: [f64; METRIC_COUNT],
    pub(super) maxes: [f64; METRIC_COUNT],
}

impl CurrentMinute {
    pub(super) fn new(minute: u64) -> Self {
        Self {
            minute,
            counts: [0; METRIC_COUNT],
            sums: [0.0; METRIC_COUNT],
            maxes: [0.0; METRIC_COUNT],
        }
    }

    /// Whether `add` may be called for `minute`.
    pub(super) fn takes(&self, minute: u64) -> bool {
        self.minute == minute && self.counts.iter().all(|&c| c < u16::MAX)
    }

    pub(super) fn add(&mut self, sample: &GpuSample) {
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

    pub(super) fn to_rollup(&self) -> Rollup {
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
pub(super) struct GpuTelemetry {
    pub(super) uuid: Arc<str>,
    /// The latest accepted sample, protobuf-encoded with its UUID left
    /// out (it is `uuid`); empty until the first. Encoded, a full sample
    /// takes about 150 bytes; decoded, a `GpuSample` is about 600 bytes of
    /// mostly empty optional fields before any of its strings.
    latest: Vec<u8>,
    /// `sampled_at` of `latest`, in nanoseconds since the epoch (an i64
    /// lasts until 2262; accepted samples are never far in the future).
    pub(super) last_at: i64,
    pub(super) current: Option<CurrentMinute>,
}

impl GpuTelemetry {
    pub(super) fn new(uuid: Arc<str>) -> Self {
        Self {
            uuid,
            latest: Vec::new(),
            last_at: 0,
            current: None,
        }
    }

    pub(super) fn has_latest(&self) -> bool {
        !self.latest.is_empty()
    }

    pub(super) fn set_latest(&mut self, mut sample: GpuSample) {
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

    pub(super) fn latest(&self) -> Option<GpuSample> {
        if !self.has_latest() {
            return None;
        }
        let mut sample = GpuSample::decode(self.latest.as_slice()).ok()?;
        sample.uuid = self.uuid.to_string();
        Some(sample)
    }
}

pub(super) struct NodeTelemetry {
    pub(super) node_id: Arc<str>,
    /// In the order the node announced them; a node has a handful of
    /// GPUs, so a scan is as fast as a map and much smaller.
    pub(super) gpus: Vec<GpuTelemetry>,
    pub(super) accepted: u64,
    pub(super) dropped: [u64; DROP_REASONS.len()],
}

impl NodeTelemetry {
    pub(super) fn gpu_mut(&mut self, uuid: &str) -> Option<&mut GpuTelemetry> {
        self.gpus.iter_mut().find(|g| &*g.uuid == uuid)
    }
}
