//! What the controller's library tests share: a controller over a store in
//! a directory, and an agent's hello.

// Each test file uses its own subset.
#![allow(dead_code)]

use std::sync::Arc;

use gpufleet_controller::store::{SledStore, Store};
use gpufleet_controller::telemetry::MemoryRollupStore;
use gpufleet_controller::{Controller, ControllerConfig};
use gpufleet_core::{SharedClock, SystemClock};
use gpufleet_proto::v1::{AgentHello, GpuInfo, NodeIdentity, WorkloadStatus};

pub(crate) const JOIN_TOKEN: &str = "library-test-join-token";

/// A controller over a sled store in `dir`; opening the same `dir` again
/// after dropping one is a restart (as after a SIGKILL: no shutdown).
pub(crate) fn open(dir: &std::path::Path) -> anyhow::Result<Controller> {
    open_with(dir, Box::new(SledStore::open(dir)?))
}

/// A controller over `store`, its other files in `dir`.
pub(crate) fn open_with(
    dir: &std::path::Path,
    store: Box<dyn Store>,
) -> anyhow::Result<Controller> {
    open_on_clock(dir, store, SystemClock::shared())
}

/// A controller over `store` that reads time from `clock`.
pub(crate) fn open_on_clock(
    dir: &std::path::Path,
    store: Box<dyn Store>,
    clock: SharedClock,
) -> anyhow::Result<Controller> {
    let mut config = ControllerConfig::for_data_dir(dir);
    config.join_token = JOIN_TOKEN.into();
    Ok(Controller::open_with_clock(
        config,
        store,
        Arc::new(MemoryRollupStore::default()),
        Vec::new(),
        clock,
    )?)
}

/// `count` GPUs of `model` on `node`, uuids `GPU-<node>-<index>`.
pub(crate) fn gpus(node: &str, model: &str, count: u32, memory_bytes: u64) -> Vec<GpuInfo> {
    (0..count)
        .map(|g| GpuInfo {
            index: g,
            uuid: format!("GPU-{node}-{g}"),
            model: model.into(),
            memory_bytes,
            ..Default::default()
        })
        .collect()
}

/// The hello of agent `node` (aws, us-east-1, $2/GPU-hour) with `gpus`,
/// reporting `workloads`; its node secret is the same across reconnects.
pub(crate) fn hello(node: &str, gpus: Vec<GpuInfo>, workloads: Vec<WorkloadStatus>) -> AgentHello {
    AgentHello {
        identity: Some(NodeIdentity {
            node_id: node.into(),
            provider: "aws".into(),
            region: "us-east-1".into(),
            price_per_gpu_hour_micro_usd: 2_000_000,
            ..Default::default()
        }),
        gpus,
        workloads,
        join_token: JOIN_TOKEN.into(),
        node_secret: format!("secret-of-{node}-0123456789"),
        ..Default::default()
    }
}
