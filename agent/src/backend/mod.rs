//! GPU discovery and telemetry behind one trait: the real NVML backend and a
//! simulated one for development, demos and tests.

pub mod catalog;
pub mod nvml;
pub mod simulated;

use std::collections::HashSet;
use std::sync::Arc;

use gpufleet_proto::v1::{GpuInfo, GpuSample};

use crate::config::{AgentConfig, GpuBackendKind};

/// A source of GPU facts and samples. Calls may block briefly (NVML), so
/// async callers use `spawn_blocking` for `sample`.
pub trait GpuBackend: Send + Sync {
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
}

/// Builds the backend the config asks for.
pub fn build(config: &AgentConfig, node_id: &str) -> anyhow::Result<Arc<dyn GpuBackend>> {
    Ok(match config.gpu_backend {
        GpuBackendKind::Nvml => Arc::new(nvml::NvmlBackend::new(None)?),
        GpuBackendKind::Simulated => Arc::new(simulated::SimulatedBackend::new(
            node_id,
            &config.simulated_gpus,
        )?),
    })
}

pub(crate) fn now_timestamp() -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now())
}
