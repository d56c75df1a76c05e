//! Helpers the telemetry modules' tests share.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gpufleet_proto::v1::GpuSample;
use prost_types::Timestamp;

use super::catalogue::{Metric, metric};
use super::hub::TelemetryHub;
use super::rollup::{FinishedRollup, Rollup};
use super::store::MemoryRollupStore;

/// A fixed virtual "now": 2025-01-01T00:00:00Z.
pub(crate) fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_735_689_600)
}

pub(crate) fn sample(uuid: &str, at: SystemTime, util: u32, power_mw: u32) -> GpuSample {
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

pub(crate) fn hub() -> (Arc<MemoryRollupStore>, TelemetryHub) {
    let store = Arc::new(MemoryRollupStore::default());
    let hub = TelemetryHub::new(store.clone(), Duration::from_secs(3600));
    hub.register_node("n1", &["GPU-a".into(), "GPU-b".into()]);
    (store, hub)
}

pub(crate) fn util() -> &'static Metric {
    metric("util").unwrap()
}

pub(crate) fn finished(node: &str, uuid: &str, rollup: &Rollup) -> FinishedRollup {
    FinishedRollup {
        node_id: node.into(),
        uuid: uuid.into(),
        rollup: rollup.clone(),
    }
}
