//! MIG in the fake: a GPU whose `values.mig_mode` is 1 shows the compute
//! instances listed in its `"mig_instances"`, each as NVML shows one — a
//! MIG device handle with its own UUID, name (`"<GPU name> MIG <profile>"`),
//! memory, SM count and GPU/compute instance ids:
//!
//! ```json
//! "mig_instances": [ { "uuid": "MIG-…", "profile": "1g.10gb",
//!     "gpu_instance_id": 9, "compute_instance_id": 0,
//!     "memory_total": 10200547328, "memory_used": 0, "sm_count": 16,
//!     "gpm": { "sm_util": 40.0, "any_tensor_util": 25.0 } } ]
//! ```
//!
//! The parent's SM count is `values.sm_count` (NVML's device attributes).
//! A process runs in an instance when its `gpu_instance_id` (and
//! `compute_instance_id`, default 0) match.

use std::collections::HashMap;
use std::ffi::{c_uint, c_ulonglong};

use serde::Deserialize;

use crate::{
    Device, ERROR_INVALID_ARGUMENT, ERROR_NOT_FOUND, ERROR_NOT_SUPPORTED, FakeGpu, Ret, config,
    put, value, with_gpu,
};

/// One MIG compute instance.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeMigInstance {
    pub uuid: String,
    pub profile: String,
    pub gpu_instance_id: u32,
    #[serde(default)]
    pub compute_instance_id: u32,
    #[serde(default)]
    pub memory_total: u64,
    #[serde(default)]
    pub memory_used: u64,
    #[serde(default)]
    pub sm_count: u32,
    /// GPM metrics of the instance's GPU instance; absent: none.
    pub gpm: Option<HashMap<String, f64>>,
}

/// The most MIG devices one GPU can hold (an A100/H100 has 7 slices).
const MAX_MIG_DEVICES: c_uint = 7;

/// MIG handles live above every GPU handle: bit 32 set, the GPU index in
/// bits 8.., the instance index in bits 0..8.
const MIG_BIT: usize = 1 << 32;

fn mig_handle(gpu: usize, instance: usize) -> Device {
    (MIG_BIT | (gpu << 8) | instance) as Device
}

pub(crate) fn is_mig_handle(device: Device) -> bool {
    device as usize & MIG_BIT != 0
}

/// (compute slices, GPU instance slices) of a profile name such as
/// `1c.3g.40gb` or `3g.40gb` (1, 1 for anything else).
pub(crate) fn parse_slices(profile: &str) -> (u32, u32) {
    let number = |s: &str, suffix: &str| s.strip_suffix(suffix)?.parse::<u32>().ok();
    let parts: Vec<&str> = profile.split('.').collect();
    match parts.as_slice() {
        [g, _] => number(g, "g").map_or((1, 1), |g| (g, g)),
        [c, g, _] => match (number(c, "c"), number(g, "g")) {
            (Some(c), Some(g)) => (c, g),
            _ => (1, 1),
        },
        _ => (1, 1),
    }
}

fn mig_enabled(g: &FakeGpu) -> bool {
    value(g, "mig_mode") == Some(1.0)
}

/// Runs `f` with the instance behind a MIG handle (and its GPU).
pub(crate) fn with_mig(device: Device, f: impl FnOnce(&FakeGpu, &FakeMigInstance) -> Ret) -> Ret {
    let raw = device as usize;
    if raw & MIG_BIT == 0 {
        return ERROR_INVALID_ARGUMENT;
    }
    let (gpu, instance) = ((raw & !MIG_BIT) >> 8, raw & 0xff);
    let c = config();
    let Some(g) = c.gpus.get(gpu) else {
        return ERROR_INVALID_ARGUMENT;
    };
    if g.lost {
        return crate::ERROR_GPU_IS_LOST;
    }
    match crate::mig_layout::instances(g).get(instance) {
        Some(m) if mig_enabled(g) => f(g, m),
        _ => ERROR_INVALID_ARGUMENT,
    }
}

/// # Safety
/// `count` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(device: Device, count: *mut c_uint) -> Ret {
    with_gpu(device, |g| {
        if value(g, "mig_mode").is_none() {
            return ERROR_NOT_SUPPORTED;
        }
        // SAFETY: forwarded contract.
        unsafe { put(count, Some(MAX_MIG_DEVICES)) }
    })
}

/// # Safety
/// `out` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: Device,
    index: c_uint,
    out: *mut Device,
) -> Ret {
    let gpu = (device as usize).wrapping_sub(1);
    with_gpu(device, |g| {
        if value(g, "mig_mode").is_none() {
            return ERROR_NOT_SUPPORTED;
        }
        if index >= MAX_MIG_DEVICES {
            return ERROR_INVALID_ARGUMENT;
        }
        if !mig_enabled(g) || index as usize >= crate::mig_layout::instances(g).len() {
            return ERROR_NOT_FOUND;
        }
        // SAFETY: forwarded contract.
        unsafe { put(out, Some(mig_handle(gpu, index as usize))) }
    })
}

/// # Safety
/// `out` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    device: Device,
    out: *mut Device,
) -> Ret {
    let gpu = ((device as usize) & !MIG_BIT) >> 8;
    // SAFETY: forwarded contract.
    with_mig(device, |_, _| unsafe { put(out, Some(crate::handle(gpu))) })
}

/// # Safety
/// `out` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(device: Device, out: *mut c_uint) -> Ret {
    // SAFETY: forwarded contract.
    unsafe { put(out, Some(c_uint::from(is_mig_handle(device)))) }
}

/// # Safety
/// `id` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceId(device: Device, id: *mut c_uint) -> Ret {
    // SAFETY: forwarded contract.
    with_mig(device, |_, m| unsafe { put(id, Some(m.gpu_instance_id)) })
}

/// # Safety
/// `id` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeInstanceId(device: Device, id: *mut c_uint) -> Ret {
    // SAFETY: forwarded contract.
    with_mig(device, |_, m| unsafe {
        put(id, Some(m.compute_instance_id))
    })
}

#[repr(C)]
pub struct Attributes {
    multiprocessor_count: c_uint,
    shared_copy_engine_count: c_uint,
    shared_decoder_count: c_uint,
    shared_encoder_count: c_uint,
    shared_jpeg_count: c_uint,
    shared_ofa_count: c_uint,
    gpu_instance_slice_count: c_uint,
    compute_instance_slice_count: c_uint,
    memory_size_mb: c_ulonglong,
}

fn attributes(sm_count: u32, memory_bytes: u64) -> Attributes {
    Attributes {
        multiprocessor_count: sm_count,
        shared_copy_engine_count: 0,
        shared_decoder_count: 0,
        shared_encoder_count: 0,
        shared_jpeg_count: 0,
        shared_ofa_count: 0,
        gpu_instance_slice_count: 0,
        compute_instance_slice_count: 0,
        memory_size_mb: memory_bytes >> 20,
    }
}

/// # Safety
/// `out` valid for a write of `nvmlDeviceAttributes_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetAttributes_v2(device: Device, out: *mut Attributes) -> Ret {
    if is_mig_handle(device) {
        return with_mig(device, |_, m| {
            // SAFETY: forwarded contract.
            unsafe { put(out, Some(attributes(m.sm_count, m.memory_total))) }
        });
    }
    with_gpu(device, |g| {
        let Some(sm) = value(g, "sm_count") else {
            return ERROR_NOT_SUPPORTED;
        };
        let memory = value(g, "memory_total").unwrap_or(0.0);
        // SAFETY: forwarded contract.
        unsafe { put(out, Some(attributes(sm as u32, memory as u64))) }
    })
}
