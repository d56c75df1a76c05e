//! GPU discovery and telemetry behind one trait: the real NVML backend and a
//! simulated one for development, demos and tests.

mod gpm;
pub mod mig;
mod mig_apply;
pub mod nvml;
pub mod simulated;

use std::collections::{HashMap, HashSet};

use gpufleet_proto::v1::{GpuInfo, GpuSample};

use crate::health::RawXid;

/// A source of GPU facts and samples. Calls may block briefly (NVML), so
/// async callers use `spawn_blocking` for `sample`.
pub trait GpuBackend: Send + Sync + std::fmt::Debug {
    /// Short backend name, e.g. `nvml` or `simulated`.
    fn name(&self) -> &'static str;
    fn driver_version(&self) -> String;
    /// Static facts about every GPU, in index order.
    fn gpus(&self) -> Vec<GpuInfo>;
    /// One sample per GPU; fields the device cannot report are absent.
    fn sample(&self) -> Vec<GpuSample>;
    /// Tells the backend which GPUs currently run workloads (the simulated
    /// backend makes their utilisation follow).
    fn set_busy(&self, _busy_uuids: &HashSet<String>) {}
    /// How many GPUs the driver sees now (`None`: cannot tell). Compared
    /// with `expected_gpu_count` to notice GPUs that fell off the bus.
    fn visible_gpu_count(&self) -> Option<u32> {
        u32::try_from(self.gpus().len()).ok()
    }
    /// XIDs the backend received since the last call (NVML event set,
    /// simulated fault injection).
    fn drain_xids(&self) -> Vec<RawXid> {
        Vec::new()
    }
    /// The agent's workload pids per GPU UUID, before each sample (the
    /// simulated backend reports them as the GPU's compute processes).
    fn set_workload_pids(&self, _pids: &HashMap<String, Vec<u32>>) {}
    /// Splits GPU `gpu_uuid` into MIG instances of `profiles` (e.g.
    /// `3g.40gb`), destroying the instances it has. The supervisor calls it
    /// only for a GPU no workload uses. `Err`: why not, one line.
    fn apply_mig_layout(&self, gpu_uuid: &str, _profiles: &[String]) -> Result<(), String> {
        Err(format!(
            "the {} GPU backend cannot change the MIG layout of {gpu_uuid}",
            self.name()
        ))
    }
    /// The simulated backend, for fault injection in tests and demos.
    fn as_simulated(&self) -> Option<&simulated::SimulatedBackend> {
        None
    }
}

pub(crate) fn now_timestamp() -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now())
}
