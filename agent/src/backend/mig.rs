//! MIG discovery through NVML: whether a GPU is in MIG mode and the compute
//! instances it holds (UUID `MIG-…`, profile such as `1g.10gb`, memory, SM
//! share, GPU and compute instance ids), each a schedulable unit.

use gpufleet_proto::v1::MigInstance;
use nvml_wrapper::Device;
use nvml_wrapper::error::NvmlError;

/// What NVML says about one GPU's MIG state.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct MigState {
    pub enabled: bool,
    pub instances: Vec<MigInstance>,
    /// Memory in use per instance (as `instances`), when NVML reports it.
    pub memory_used: Vec<Option<u64>>,
}

/// The profile from a MIG device's name: the driver names one
/// `"<GPU name> MIG <profile>"` (e.g. `NVIDIA H100 80GB HBM3 MIG 1g.10gb`;
/// a compute instance smaller than its GPU instance is `1c.3g.40gb`).
pub fn profile_from_name(name: &str) -> Option<&str> {
    let (_, profile) = name.rsplit_once(" MIG ")?;
    let profile = profile.trim();
    (!profile.is_empty() && !profile.contains(' ')).then_some(profile)
}

/// Compute slices of a full MIG-capable GPU (A100, H100, H200, B200).
const FULL_GPU_SLICES: u32 = 7;

/// The instance's share of the GPU's SMs in thousandths: from SM counts
/// when NVML gives both, else from the profile's compute slices (`3g` of
/// the 7 a GPU has; `1c.3g` is one slice).
pub fn sm_share_milli(instance_sms: Option<u32>, gpu_sms: Option<u32>, profile: &str) -> u32 {
    if let (Some(mine), Some(all)) = (instance_sms, gpu_sms)
        && all > 0
        && mine > 0
    {
        return (u64::from(mine.min(all)) * 1000 / u64::from(all)) as u32;
    }
    let first = profile.split('.').next().unwrap_or("");
    first
        .strip_suffix('c')
        .or_else(|| first.strip_suffix('g'))
        .and_then(|n| n.parse::<u32>().ok())
        .filter(|&n| (1..=FULL_GPU_SLICES).contains(&n))
        .map_or(0, |n| n * 1000 / FULL_GPU_SLICES)
}

/// `nvmlDeviceGetGpuInstanceId` and `nvmlDeviceGetComputeInstanceId` of a
/// MIG device handle, which nvml-wrapper does not wrap.
#[allow(unsafe_code)]
fn instance_ids(device: &Device<'_>) -> Result<(u32, u32), NvmlError> {
    let lib = device.nvml().lib();
    let gi = lib
        .nvmlDeviceGetGpuInstanceId
        .as_ref()
        .map_err(|e| NvmlError::FailedToLoadSymbol(e.to_string()))?;
    let ci = lib
        .nvmlDeviceGetComputeInstanceId
        .as_ref()
        .map_err(|e| NvmlError::FailedToLoadSymbol(e.to_string()))?;
    let (mut gpu_instance, mut compute_instance) = (0u32, 0u32);
    // SAFETY: the handle belongs to `device`, which borrows a live `Nvml`
    // for the whole call; each call writes one c_uint through a pointer to
    // a local.
    unsafe {
        nvml_wrapper::error::nvml_try(gi(device.handle(), &mut gpu_instance))?;
        nvml_wrapper::error::nvml_try(ci(device.handle(), &mut compute_instance))?;
    }
    Ok((gpu_instance, compute_instance))
}

/// MIG mode and instances of `device`. A GPU without MIG support (or a
/// driver that cannot say) is "not enabled, no instances"; an instance
/// whose UUID cannot be read is left out (it cannot be allocated).
pub fn discover(device: &Device<'_>) -> MigState {
    let enabled = device.mig_mode().is_ok_and(|m| m.current == 1);
    if !enabled {
        return MigState::default();
    }
    let gpu_sms = device.attributes().ok().map(|a| a.multiprocessor_count);
    let slots = device.mig_device_count().unwrap_or(0);
    let mut instances = Vec::new();
    let mut memory_used = Vec::new();
    for index in 0..slots {
        // Empty slots answer NotFound.
        let Ok(mig) = device.mig_device_by_index(index) else {
            continue;
        };
        let Ok(uuid) = mig.uuid() else {
            continue;
        };
        let name = mig.name().unwrap_or_default();
        let profile = profile_from_name(&name).unwrap_or_default().to_string();
        let (gpu_instance_id, compute_instance_id) = instance_ids(&mig).unwrap_or_default();
        let instance_sms = mig.attributes().ok().map(|a| a.multiprocessor_count);
        let memory = mig.memory_info().ok();
        memory_used.push(memory.as_ref().map(|m| m.used));
        instances.push(MigInstance {
            uuid,
            sm_share_milli: sm_share_milli(instance_sms, gpu_sms, &profile),
            profile,
            memory_bytes: memory.map_or(0, |m| m.total),
            gpu_instance_id,
            compute_instance_id,
        });
    }
    MigState {
        enabled,
        instances,
        memory_used,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_come_from_the_device_name() {
        assert_eq!(
            profile_from_name("NVIDIA H100 80GB HBM3 MIG 1g.10gb"),
            Some("1g.10gb")
        );
        assert_eq!(
            profile_from_name("NVIDIA A100-SXM4-40GB MIG 1c.3g.20gb"),
            Some("1c.3g.20gb")
        );
        assert_eq!(profile_from_name("NVIDIA H100 80GB HBM3"), None);
        assert_eq!(profile_from_name("X MIG "), None);
    }

    #[test]
    fn sm_share_prefers_sm_counts_then_slices() {
        assert_eq!(sm_share_milli(Some(16), Some(132), "1g.10gb"), 121);
        assert_eq!(sm_share_milli(None, Some(132), "3g.40gb"), 428);
        assert_eq!(sm_share_milli(Some(16), None, "1c.3g.40gb"), 142);
        assert_eq!(sm_share_milli(None, None, "7g.80gb"), 1000);
        assert_eq!(sm_share_milli(None, None, "weird"), 0);
        assert_eq!(sm_share_milli(Some(0), Some(0), "9g.1gb"), 0);
    }
}
