//! The real backend: NVIDIA's management library through nvml-wrapper.

use std::ffi::OsStr;

use gpufleet_proto::v1::{GpuInfo, GpuSample};
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{Clock, TemperatureSensor};
use nvml_wrapper::error::NvmlError;

use super::catalog;
use super::{GpuBackend, now_timestamp};

/// The soname the driver package installs; the unversioned `.so` (the
/// nvml-wrapper default) exists only with development packages.
pub const NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// Why NVML could not be started. The message is one line a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum NvmlInitError {
    #[error(
        "cannot load the NVIDIA management library ({library}): {cause}; on a machine without NVIDIA GPUs run with --gpu-backend simulated"
    )]
    Load { library: String, cause: String },
    #[error(
        "the NVIDIA management library failed to initialise: {0}; check that the NVIDIA driver is loaded (nvidia-smi), or run with --gpu-backend simulated"
    )]
    Init(String),
    #[error("cannot enumerate GPUs through NVML: {0}")]
    Enumerate(String),
}

/// GPUs as the driver reports them.
pub struct NvmlBackend {
    nvml: Nvml,
    gpus: Vec<GpuInfo>,
    driver_version: String,
}

impl std::fmt::Debug for NvmlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlBackend")
            .field("gpus", &self.gpus.len())
            .finish_non_exhaustive()
    }
}

fn one_line(s: impl std::fmt::Display) -> String {
    s.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

impl NvmlBackend {
    /// Loads NVML from `library` (default [`NVML_LIBRARY`]; tests point it at
    /// a fake library) and reads the static facts of every GPU.
    pub fn new(library: Option<&OsStr>) -> Result<Self, NvmlInitError> {
        let library = library.unwrap_or(OsStr::new(NVML_LIBRARY));
        let nvml = Nvml::builder()
            .lib_path(library)
            .init()
            .map_err(|e| match e {
                NvmlError::LibloadingError(cause) => NvmlInitError::Load {
                    library: library.to_string_lossy().into_owned(),
                    cause: one_line(cause),
                },
                NvmlError::FailedToLoadSymbol(cause) => NvmlInitError::Load {
                    library: library.to_string_lossy().into_owned(),
                    cause: one_line(cause),
                },
                other => NvmlInitError::Init(one_line(other)),
            })?;
        let count = nvml
            .device_count()
            .map_err(|e| NvmlInitError::Enumerate(one_line(e)))?;
        let mut gpus = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = nvml
                .device_by_index(index)
                .map_err(|e| NvmlInitError::Enumerate(format!("GPU {index}: {}", one_line(e))))?;
            // Without a UUID a GPU cannot be allocated, so that one is fatal.
            let uuid = device.uuid().map_err(|e| {
                NvmlInitError::Enumerate(format!("GPU {index} UUID: {}", one_line(e)))
            })?;
            let name = device.name().unwrap_or_default();
            let memory_bytes = device.memory_info().map(|m| m.total).unwrap_or(0);
            let cc = device.cuda_compute_capability().ok();
            let spec = catalog::model_from_nvml_name(&name, memory_bytes);
            gpus.push(GpuInfo {
                index,
                uuid,
                model: spec.map(|s| s.model.to_string()).unwrap_or_default(),
                generation: spec.map_or(0, |s| s.generation as i32),
                memory_bytes,
                compute_capability_major: cc.as_ref().map_or(0, |c| c.major.max(0) as u32),
                compute_capability_minor: cc.as_ref().map_or(0, |c| c.minor.max(0) as u32),
                pci_bus_id: device.pci_info().map(|p| p.bus_id).unwrap_or_default(),
                name,
            });
        }
        let driver_version = nvml.sys_driver_version().unwrap_or_default();
        Ok(Self {
            nvml,
            gpus,
            driver_version,
        })
    }
}

impl GpuBackend for NvmlBackend {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn driver_version(&self) -> String {
        self.driver_version.clone()
    }

    fn gpus(&self) -> Vec<GpuInfo> {
        self.gpus.clone()
    }

    fn sample(&self) -> Vec<GpuSample> {
        let now = now_timestamp();
        self.gpus
            .iter()
            .map(|info| {
                let mut sample = GpuSample {
                    uuid: info.uuid.clone(),
                    index: info.index,
                    sampled_at: Some(now),
                    ..Default::default()
                };
                // Each field is read on its own: one unsupported or failing
                // query leaves that field absent and keeps the rest.
                let Ok(device) = self.nvml.device_by_uuid(info.uuid.as_str()) else {
                    return sample;
                };
                if let Ok(u) = device.utilization_rates() {
                    sample.gpu_utilization_percent = Some(u.gpu);
                    sample.memory_utilization_percent = Some(u.memory);
                }
                if let Ok(m) = device.memory_info() {
                    sample.memory_used_bytes = Some(m.used);
                    sample.memory_total_bytes = Some(m.total);
                }
                sample.temperature_celsius = device.temperature(TemperatureSensor::Gpu).ok();
                sample.power_usage_milliwatts = device.power_usage().ok();
                sample.power_limit_milliwatts = device.enforced_power_limit().ok();
                sample.sm_clock_mhz = device.clock_info(Clock::SM).ok();
                sample.memory_clock_mhz = device.clock_info(Clock::Memory).ok();
                sample
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_names_the_fix() {
        // A library that cannot exist, so this holds on GPU hosts too.
        let err =
            NvmlBackend::new(Some(OsStr::new("libnvidia-ml-does-not-exist.so.1"))).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("--gpu-backend simulated"), "{msg}");
        assert!(
            msg.contains("cannot load the NVIDIA management library"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "{msg}");
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn real_gpus_report_samples() {
        let backend = NvmlBackend::new(None).unwrap();
        assert!(!backend.gpus().is_empty());
        let samples = backend.sample();
        assert_eq!(samples.len(), backend.gpus().len());
        assert!(samples[0].memory_total_bytes.is_some());
    }
}
