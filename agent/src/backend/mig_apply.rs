//! Applying a MIG layout through NVML, as `nvidia-smi mig -dci`, `-dgi`
//! and `-cgi … -C` do: destroy every compute and GPU instance of the GPU,
//! then create one GPU instance per profile (largest first, which places
//! best) with one compute instance of the profile's compute slices.
//! nvml-wrapper wraps none of these calls, so this module calls the C
//! functions through its loaded library. The GPU must already be in MIG
//! mode: turning it on may need a GPU reset, which the agent never does.

use std::ffi::c_uint;
use std::ptr;

use nvml_wrapper::Device;
use nvml_wrapper::error::{NvmlError, nvml_try};
use nvml_wrapper_sys::bindings::{
    NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED, NVML_COMPUTE_INSTANCE_PROFILE_COUNT,
    NVML_GPU_INSTANCE_PROFILE_COUNT, nvmlComputeInstance_t, nvmlComputeInstanceProfileInfo_t,
    nvmlGpuInstance_t, nvmlGpuInstanceProfileInfo_t,
};

use super::mig::{self, MigProfile};

/// Most GPU (or compute) instances NVML returns for one profile.
const MAX_PER_PROFILE: usize = 8;

fn symbol<T, E: std::fmt::Display>(s: &Result<T, E>) -> Result<&T, String> {
    s.as_ref()
        .map_err(|e| format!("this driver lacks a MIG call: {e}"))
}

fn nvml(what: &str, e: NvmlError) -> String {
    format!("{what}: {e}")
}

/// Destroys every instance of `device`, then creates `profiles`.
#[allow(unsafe_code)]
pub(crate) fn apply(device: &Device<'_>, profiles: &[String]) -> Result<(), String> {
    if !device.mig_mode().is_ok_and(|m| m.current == 1) {
        return Err(
            "MIG mode is off: enable it with `nvidia-smi -i <index> -mig 1` (it may need a GPU reset); the agent then applies the layout".into(),
        );
    }
    let wanted: Vec<(MigProfile, &String)> = profiles
        .iter()
        .map(|p| {
            mig::parse_profile(p)
                .map(|parsed| (parsed, p))
                .ok_or_else(|| format!("{p:?} is not a MIG profile"))
        })
        .collect::<Result<_, _>>()?;
    let lib = device.nvml().lib();
    let gi_info = symbol(&lib.nvmlDeviceGetGpuInstanceProfileInfo)?;
    let gi_list = symbol(&lib.nvmlDeviceGetGpuInstances)?;
    let gi_create = symbol(&lib.nvmlDeviceCreateGpuInstance)?;
    let gi_destroy = symbol(&lib.nvmlGpuInstanceDestroy)?;
    let ci_info = symbol(&lib.nvmlGpuInstanceGetComputeInstanceProfileInfo)?;
    let ci_list = symbol(&lib.nvmlGpuInstanceGetComputeInstances)?;
    let ci_create = symbol(&lib.nvmlGpuInstanceCreateComputeInstance)?;
    let ci_destroy = symbol(&lib.nvmlComputeInstanceDestroy)?;
    // SAFETY (every block below): `handle` belongs to `device`, which
    // borrows a live `Nvml` for the whole call; NVML writes only through
    // the pointers passed, each to a local of the type it expects (arrays
    // of MAX_PER_PROFILE handles, more than a GPU's 7 slices allow), and
    // GPU/compute instance handles are used only while NVML holds them.
    let handle = unsafe { device.handle() };

    // The GPU instance profiles this GPU offers: (id, slices, MiB).
    let mut offered = Vec::new();
    for p in 0..NVML_GPU_INSTANCE_PROFILE_COUNT {
        let mut info: nvmlGpuInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
        if nvml_try(unsafe { gi_info(handle, p, &mut info) }).is_ok() {
            offered.push((info.id, info.sliceCount, info.memorySizeMB));
        }
    }
    let mut plan = Vec::new();
    for (parsed, name) in &wanted {
        // Same slices, the memory closest to the profile's name (an H100
        // offers 1g.10gb and 1g.20gb).
        let best = offered
            .iter()
            .filter(|(_, slices, _)| *slices == parsed.gpu_instance_slices)
            .min_by_key(|(_, _, mib)| (mib / 1024).abs_diff(u64::from(parsed.memory_gb)))
            .ok_or_else(|| format!("this GPU offers no GPU instance profile like {name}"))?;
        plan.push((best.0, *parsed));
    }
    plan.sort_by_key(|(_, p)| std::cmp::Reverse(p.gpu_instance_slices));

    // Destroy what is there: compute instances first, then their GPU instances.
    for p in 0..NVML_GPU_INSTANCE_PROFILE_COUNT {
        let mut gis: [nvmlGpuInstance_t; MAX_PER_PROFILE] = [ptr::null_mut(); MAX_PER_PROFILE];
        let mut count: c_uint = 0;
        if nvml_try(unsafe { gi_list(handle, p, gis.as_mut_ptr(), &mut count) }).is_err() {
            continue;
        }
        for &gi in gis.iter().take((count as usize).min(MAX_PER_PROFILE)) {
            for c in 0..NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
                let mut cis: [nvmlComputeInstance_t; MAX_PER_PROFILE] =
                    [ptr::null_mut(); MAX_PER_PROFILE];
                let mut n: c_uint = 0;
                if nvml_try(unsafe { ci_list(gi, c, cis.as_mut_ptr(), &mut n) }).is_err() {
                    continue;
                }
                for &ci in cis.iter().take((n as usize).min(MAX_PER_PROFILE)) {
                    nvml_try(unsafe { ci_destroy(ci) })
                        .map_err(|e| nvml("destroying a compute instance", e))?;
                }
            }
            nvml_try(unsafe { gi_destroy(gi) })
                .map_err(|e| nvml("destroying a GPU instance", e))?;
        }
    }

    // Create the layout.
    for (gi_profile, parsed) in plan {
        let mut gi: nvmlGpuInstance_t = ptr::null_mut();
        nvml_try(unsafe { gi_create(handle, gi_profile, &mut gi) })
            .map_err(|e| nvml("creating a GPU instance", e))?;
        let mut ci_profile = None;
        for c in 0..NVML_COMPUTE_INSTANCE_PROFILE_COUNT {
            let mut info: nvmlComputeInstanceProfileInfo_t = unsafe { std::mem::zeroed() };
            let engine = NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED;
            if nvml_try(unsafe { ci_info(gi, c, engine, &mut info) }).is_ok()
                && info.sliceCount == parsed.compute_slices
            {
                ci_profile = Some(info.id);
                break;
            }
        }
        let ci_profile = ci_profile.ok_or_else(|| {
            format!(
                "no compute instance profile of {} slices in a {}-slice GPU instance",
                parsed.compute_slices, parsed.gpu_instance_slices
            )
        })?;
        let mut ci: nvmlComputeInstance_t = ptr::null_mut();
        nvml_try(unsafe { ci_create(gi, ci_profile, &mut ci) })
            .map_err(|e| nvml("creating a compute instance", e))?;
    }
    Ok(())
}
