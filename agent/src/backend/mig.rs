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
/// Memory slices of a MIG-capable GPU: a `1g` profile gets one eighth.
const MEMORY_SLICES: u32 = 8;
/// The most instances one GPU can be split into.
pub const MAX_INSTANCES: usize = 7;
/// The most MIG devices the agent lists per GPU (docs/limits.md).
pub const MAX_MIG_DEVICES: u32 = 16;

/// A MIG profile name taken apart: `1g.10gb` is one GPU-instance slice with
/// one compute slice and 10 GB; `1c.3g.40gb` is a one-slice compute
/// instance inside a three-slice GPU instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigProfile {
    pub compute_slices: u32,
    pub gpu_instance_slices: u32,
    pub memory_gb: u32,
}

/// Parses `<g>g.<m>gb` or `<c>c.<g>g.<m>gb`; `None` for anything else.
pub fn parse_profile(profile: &str) -> Option<MigProfile> {
    let parts: Vec<&str> = profile.split('.').collect();
    let number = |s: &str, suffix: &str| -> Option<u32> {
        let n = s.strip_suffix(suffix)?;
        (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .then(|| n.parse().ok())
            .flatten()
    };
    let (compute, gi, gb) = match parts.as_slice() {
        [g, m] => (number(g, "g")?, number(g, "g")?, number(m, "gb")?),
        [c, g, m] => (number(c, "c")?, number(g, "g")?, number(m, "gb")?),
        _ => return None,
    };
    (compute >= 1 && compute <= gi && gi <= FULL_GPU_SLICES && gb >= 1).then_some(MigProfile {
        compute_slices: compute,
        gpu_instance_slices: gi,
        memory_gb: gb,
    })
}

/// GPU-instance slices of a MIG-capable model (by its catalogue name),
/// `None` for a GPU without MIG.
pub fn model_slices(model: &str) -> Option<u32> {
    if model.starts_with("A30") {
        return Some(4);
    }
    ["A100", "H100", "H200", "H20-", "B200", "GH200", "GB200"]
        .iter()
        .any(|family| model.contains(family))
        .then_some(FULL_GPU_SLICES)
}

/// Checks that `profiles` fit one GPU of `model` with `memory_bytes`: a
/// MIG-capable model, at most its slices and its memory. The error names
/// the problem and what would fit.
pub fn check_layout(profiles: &[String], model: &str, memory_bytes: u64) -> Result<(), String> {
    let Some(slices) = model_slices(model) else {
        return Err(format!(
            "{model} does not support MIG (A30, A100, H100, H200, B200 do)"
        ));
    };
    if profiles.is_empty() || profiles.len() > MAX_INSTANCES {
        return Err(format!(
            "a layout lists 1 to {MAX_INSTANCES} profiles, e.g. 3g.40gb,2g.20gb,1g.10gb,1g.10gb"
        ));
    }
    let gib = (memory_bytes >> 30).max(1);
    let (mut used_slices, mut used_memory) = (0, 0);
    for p in profiles {
        let parsed = parse_profile(p).ok_or_else(|| {
            format!("{p:?} is not a MIG profile; write <slices>g.<memory>gb, e.g. 1g.10gb")
        })?;
        used_slices += parsed.gpu_instance_slices;
        used_memory += memory_slices(parsed, gib);
    }
    if used_slices > slices {
        return Err(format!(
            "the profiles need {used_slices} compute slices; a {model} has {slices}"
        ));
    }
    if used_memory > MEMORY_SLICES {
        return Err(format!(
            "the profiles need {used_memory} eighths of the memory; a {model} has {MEMORY_SLICES}"
        ));
    }
    Ok(())
}

/// Memory slices (eighths) a profile takes on a GPU of `gpu_gib`.
pub fn memory_slices(profile: MigProfile, gpu_gib: u64) -> u32 {
    let per_slice = (gpu_gib as f64 / f64::from(MEMORY_SLICES)).max(1.0);
    ((f64::from(profile.memory_gb) / per_slice).round() as u32).max(1)
}

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
    // NVML bounds this (7 on A100/H100); the cap keeps a confused driver
    // from making one sample unbounded.
    let slots = device.mig_device_count().unwrap_or(0).min(MAX_MIG_DEVICES);
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
    fn profiles_parse_and_layouts_must_fit() {
        assert_eq!(
            parse_profile("1c.3g.40gb"),
            Some(MigProfile {
                compute_slices: 1,
                gpu_instance_slices: 3,
                memory_gb: 40
            })
        );
        assert_eq!(parse_profile("3g.40gb").map(|p| p.compute_slices), Some(3));
        for bad in [
            "",
            "1g",
            "g.10gb",
            "8g.80gb",
            "2c.1g.10gb",
            "1g.0gb",
            "1g.10GB",
        ] {
            assert_eq!(parse_profile(bad), None, "{bad}");
        }
        let gb80 = 80 << 30;
        let layout = |s: &str| s.split(',').map(String::from).collect::<Vec<_>>();
        assert!(
            check_layout(
                &layout("3g.40gb,2g.20gb,1g.10gb,1g.10gb"),
                "H100-SXM-80GB",
                gb80
            )
            .is_ok()
        );
        assert!(
            check_layout(
                &layout("1g.10gb,1g.10gb,1g.10gb,1g.10gb,1g.10gb,1g.10gb,1g.10gb"),
                "H100-SXM-80GB",
                gb80
            )
            .is_ok()
        );
        let err = check_layout(&layout("4g.40gb,4g.40gb"), "H100-SXM-80GB", gb80).unwrap_err();
        assert!(err.contains("8 compute slices"), "{err}");
        let err =
            check_layout(&layout("3g.40gb,3g.40gb,1g.10gb"), "H100-SXM-80GB", gb80).unwrap_err();
        assert!(err.contains("9 eighths"), "{err}");
        let err = check_layout(&layout("1g.10gb"), "L4", 24 << 30).unwrap_err();
        assert!(err.contains("does not support MIG"), "{err}");
        assert!(check_layout(&layout("1g.6gb,1g.6gb,2g.12gb"), "A30-24GB", 24 << 30).is_ok());
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
