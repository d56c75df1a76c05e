//! MIG reconfiguration in the fake: GPU instances and compute instances
//! created and destroyed through NVML's calls, as `nvidia-smi mig` does.
//! The first change to a GPU copies its `"mig_instances"` from the file
//! into memory; from then on the in-memory layout is what the GPU shows
//! (the file's list for that GPU is ignored, its other values are not).
//!
//! GPU instance profiles, scaled to the GPU's `memory_total` in eighths
//! (an 80 GiB H100: `1g.10gb` … `7g.80gb`, and `1g.20gb`), by NVML's
//! profile index: see [`GI_PROFILES`]. Compute instance profiles: 1, 2, 3,
//! 4, 7 slices at NVML's indexes 0–4, within their GPU instance.

use std::collections::HashMap;
use std::ffi::c_uint;
use std::sync::Mutex;

use crate::mig::{FakeMigInstance, parse_slices};
use crate::{
    Device, ERROR_INVALID_ARGUMENT, ERROR_NOT_FOUND, ERROR_NOT_SUPPORTED, FakeGpu, Ret, SUCCESS,
    put, value, with_gpu,
};

/// `NVML_ERROR_IN_USE`, `NVML_ERROR_INSUFFICIENT_RESOURCES`.
const ERROR_IN_USE: Ret = 19;
const ERROR_INSUFFICIENT_RESOURCES: Ret = 23;

/// (NVML GPU instance profile index, slices, eighths of the memory).
pub const GI_PROFILES: [(c_uint, u32, u32); 6] = [
    (0, 1, 1),
    (1, 2, 2),
    (2, 3, 4),
    (3, 4, 4),
    (4, 7, 8),
    (9, 1, 2),
];
/// (NVML compute instance profile index, slices).
const CI_PROFILES: [(c_uint, u32); 5] = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 7)];
/// Compute slices of a MIG-capable GPU.
const SLICES: u32 = 7;

#[derive(Debug, Clone)]
struct Ci {
    id: u32,
    slices: u32,
    uuid: String,
}

#[derive(Debug, Clone)]
struct Gi {
    id: u32,
    profile: c_uint,
    slices: u32,
    eighths: u32,
    cis: Vec<Ci>,
}

/// GPU uuid → its layout once changed through NVML.
static LAYOUTS: Mutex<Option<HashMap<String, Vec<Gi>>>> = Mutex::new(None);
/// Makes every created instance's UUID new, as the driver does.
static NEXT_UUID: Mutex<u64> = Mutex::new(1);

const GI_BIT: usize = 1 << 33;
const CI_BIT: usize = 1 << 34;

fn gib_total(g: &FakeGpu) -> u64 {
    (value(g, "memory_total").unwrap_or(0.0) as u64 >> 30).max(8)
}

fn profile_name(g: &FakeGpu, gi: &Gi, ci: &Ci) -> String {
    let gb = gib_total(g) * u64::from(gi.eighths) / 8;
    if ci.slices == gi.slices {
        format!("{}g.{gb}gb", gi.slices)
    } else {
        format!("{}c.{}g.{gb}gb", ci.slices, gi.slices)
    }
}

/// The file's instances as GPU instances (the layout before any change).
fn from_file(g: &FakeGpu) -> Vec<Gi> {
    let mut gis: Vec<Gi> = Vec::new();
    for m in &g.mig_instances {
        let (ci_slices, gi_slices) = parse_slices(&m.profile);
        let eighths = ((m.memory_total >> 30) * 8 / gib_total(g)).max(1) as u32;
        let ci = Ci {
            id: m.compute_instance_id,
            slices: ci_slices,
            uuid: m.uuid.clone(),
        };
        match gis.iter_mut().find(|gi| gi.id == m.gpu_instance_id) {
            Some(gi) => gi.cis.push(ci),
            None => gis.push(Gi {
                id: m.gpu_instance_id,
                profile: GI_PROFILES
                    .iter()
                    .find(|(_, s, e)| *s == gi_slices && *e == eighths)
                    .map_or(0, |p| p.0),
                slices: gi_slices,
                eighths,
                cis: vec![ci],
            }),
        }
    }
    gis
}

/// The instances a GPU shows: its in-memory layout once changed, else
/// the file's.
pub(crate) fn instances(g: &FakeGpu) -> Vec<FakeMigInstance> {
    let layouts = LAYOUTS.lock().unwrap_or_else(|e| e.into_inner());
    let Some(gis) = layouts.as_ref().and_then(|l| l.get(&g.uuid)) else {
        return g.mig_instances.clone();
    };
    let sm_per_slice = value(g, "sm_count").unwrap_or(0.0) as u32 / SLICES;
    gis.iter()
        .flat_map(|gi| {
            gi.cis.iter().map(move |ci| FakeMigInstance {
                uuid: ci.uuid.clone(),
                profile: profile_name(g, gi, ci),
                gpu_instance_id: gi.id,
                compute_instance_id: ci.id,
                memory_total: (gib_total(g) << 30) * u64::from(gi.eighths) / 8,
                memory_used: 0,
                sm_count: sm_per_slice * ci.slices,
                gpm: None,
            })
        })
        .collect()
}

/// Runs `f` on the in-memory layout of the GPU behind `device` (a parent
/// GPU handle), copying it from the file first.
fn with_layout(device: Device, f: impl FnOnce(&FakeGpu, usize, &mut Vec<Gi>) -> Ret) -> Ret {
    let gpu = (device as usize).wrapping_sub(1);
    with_gpu(device, |g| {
        if value(g, "mig_mode") != Some(1.0) {
            return ERROR_NOT_SUPPORTED;
        }
        let mut layouts = LAYOUTS.lock().unwrap_or_else(|e| e.into_inner());
        let gis = layouts
            .get_or_insert_with(HashMap::new)
            .entry(g.uuid.clone())
            .or_insert_with(|| from_file(g));
        f(g, gpu, gis)
    })
}

/// Runs `f` with the GPU instance behind a GI handle.
fn with_gi(handle: *mut std::ffi::c_void, f: impl FnOnce(&FakeGpu, &mut Gi) -> Ret) -> Ret {
    let raw = handle as usize;
    if raw & GI_BIT == 0 {
        return ERROR_INVALID_ARGUMENT;
    }
    let (gpu, id) = ((raw & !GI_BIT) >> 16, (raw & 0xffff) as u32);
    with_layout(crate::handle(gpu), |g, _, gis| {
        match gis.iter_mut().find(|gi| gi.id == id) {
            Some(gi) => f(g, gi),
            None => ERROR_INVALID_ARGUMENT,
        }
    })
}

fn new_uuid() -> String {
    let mut next = NEXT_UUID.lock().unwrap_or_else(|e| e.into_inner());
    *next += 1;
    format!("MIG-f0000000-0000-0000-0000-{:012x}", *next)
}

#[repr(C)]
pub struct GiProfileInfo {
    id: c_uint,
    is_p2p_supported: c_uint,
    slice_count: c_uint,
    instance_count: c_uint,
    multiprocessor_count: c_uint,
    copy_engine_count: c_uint,
    decoder_count: c_uint,
    encoder_count: c_uint,
    jpeg_count: c_uint,
    ofa_count: c_uint,
    memory_size_mb: u64,
}

/// # Safety
/// `info` valid for a write of `nvmlGpuInstanceProfileInfo_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceProfileInfo(
    device: Device,
    profile: c_uint,
    info: *mut GiProfileInfo,
) -> Ret {
    with_gpu(device, |g| {
        if value(g, "mig_mode").is_none() {
            return ERROR_NOT_SUPPORTED;
        }
        let Some(&(id, slices, eighths)) = GI_PROFILES.iter().find(|p| p.0 == profile) else {
            return ERROR_NOT_SUPPORTED;
        };
        let sm = value(g, "sm_count").unwrap_or(0.0) as u32 / SLICES * slices;
        // SAFETY: forwarded contract.
        unsafe {
            put(
                info,
                Some(GiProfileInfo {
                    id,
                    is_p2p_supported: 0,
                    slice_count: slices,
                    instance_count: SLICES / slices,
                    multiprocessor_count: sm,
                    copy_engine_count: 0,
                    decoder_count: 0,
                    encoder_count: 0,
                    jpeg_count: 0,
                    ofa_count: 0,
                    memory_size_mb: (gib_total(g) << 10) * u64::from(eighths) / 8,
                }),
            )
        }
    })
}

/// # Safety
/// `gis` valid for 7 handles, `count` for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstances(
    device: Device,
    profile: c_uint,
    gis: *mut *mut std::ffi::c_void,
    count: *mut c_uint,
) -> Ret {
    if gis.is_null() || count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    with_layout(device, |_, gpu, layout| {
        let of_profile: Vec<&Gi> = layout.iter().filter(|gi| gi.profile == profile).collect();
        for (i, gi) in of_profile.iter().take(SLICES as usize).enumerate() {
            // SAFETY: at most 7 entries, the caller's array per contract.
            unsafe {
                gis.add(i)
                    .write((GI_BIT | (gpu << 16) | gi.id as usize) as *mut _)
            };
        }
        // SAFETY: non-null per the check above.
        unsafe { count.write(of_profile.len().min(SLICES as usize) as c_uint) };
        SUCCESS
    })
}

/// # Safety
/// `gi` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceCreateGpuInstance(
    device: Device,
    profile: c_uint,
    gi: *mut *mut std::ffi::c_void,
) -> Ret {
    let Some(&(profile, slices, eighths)) = GI_PROFILES.iter().find(|p| p.0 == profile) else {
        return ERROR_INVALID_ARGUMENT;
    };
    with_layout(device, |_, gpu, layout| {
        let used: u32 = layout.iter().map(|g| g.slices).sum();
        let memory: u32 = layout.iter().map(|g| g.eighths).sum();
        if used + slices > SLICES || memory + eighths > 8 {
            return ERROR_INSUFFICIENT_RESOURCES;
        }
        let id = (1..)
            .find(|id| layout.iter().all(|g| g.id != *id))
            .unwrap_or(1);
        layout.push(Gi {
            id,
            profile,
            slices,
            eighths,
            cis: Vec::new(),
        });
        // SAFETY: forwarded contract.
        unsafe { put(gi, Some((GI_BIT | (gpu << 16) | id as usize) as *mut _)) }
    })
}

/// # Safety
/// `gi` from this library.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceDestroy(gi: *mut std::ffi::c_void) -> Ret {
    let raw = gi as usize;
    if raw & GI_BIT == 0 {
        return ERROR_INVALID_ARGUMENT;
    }
    let (gpu, id) = ((raw & !GI_BIT) >> 16, (raw & 0xffff) as u32);
    with_layout(crate::handle(gpu), |_, _, layout| {
        match layout.iter().position(|g| g.id == id) {
            None => ERROR_NOT_FOUND,
            Some(i) if !layout[i].cis.is_empty() => ERROR_IN_USE,
            Some(i) => {
                layout.remove(i);
                SUCCESS
            }
        }
    })
}

#[repr(C)]
pub struct CiProfileInfo {
    id: c_uint,
    slice_count: c_uint,
    instance_count: c_uint,
    multiprocessor_count: c_uint,
    shared_copy_engine_count: c_uint,
    shared_decoder_count: c_uint,
    shared_encoder_count: c_uint,
    shared_jpeg_count: c_uint,
    shared_ofa_count: c_uint,
}

/// # Safety
/// `info` valid for a write of `nvmlComputeInstanceProfileInfo_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceGetComputeInstanceProfileInfo(
    gi: *mut std::ffi::c_void,
    profile: c_uint,
    _engine_profile: c_uint,
    info: *mut CiProfileInfo,
) -> Ret {
    with_gi(gi, |g, gi| {
        let Some(&(id, slices)) = CI_PROFILES
            .iter()
            .find(|p| p.0 == profile && p.1 <= gi.slices)
        else {
            return ERROR_NOT_SUPPORTED;
        };
        // SAFETY: forwarded contract.
        unsafe {
            put(
                info,
                Some(CiProfileInfo {
                    id,
                    slice_count: slices,
                    instance_count: gi.slices / slices,
                    multiprocessor_count: value(g, "sm_count").unwrap_or(0.0) as u32 / SLICES
                        * slices,
                    shared_copy_engine_count: 0,
                    shared_decoder_count: 0,
                    shared_encoder_count: 0,
                    shared_jpeg_count: 0,
                    shared_ofa_count: 0,
                }),
            )
        }
    })
}

/// # Safety
/// `ci` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceCreateComputeInstance(
    gi: *mut std::ffi::c_void,
    profile: c_uint,
    ci: *mut *mut std::ffi::c_void,
) -> Ret {
    let raw = gi as usize;
    with_gi(gi, |_, gi| {
        let Some(&(_, slices)) = CI_PROFILES.iter().find(|p| p.0 == profile) else {
            return ERROR_INVALID_ARGUMENT;
        };
        let used: u32 = gi.cis.iter().map(|c| c.slices).sum();
        if used + slices > gi.slices {
            return ERROR_INSUFFICIENT_RESOURCES;
        }
        let id = (0..)
            .find(|id| gi.cis.iter().all(|c| c.id != *id))
            .unwrap_or(0);
        gi.cis.push(Ci {
            id,
            slices,
            uuid: new_uuid(),
        });
        let handle = CI_BIT | ((raw & !GI_BIT) & !0xffff) | ((gi.id as usize) << 8) | id as usize;
        // SAFETY: forwarded contract.
        unsafe { put(ci, Some(handle as *mut _)) }
    })
}

/// # Safety
/// `cis` valid for 7 handles, `count` for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpuInstanceGetComputeInstances(
    gi: *mut std::ffi::c_void,
    profile: c_uint,
    cis: *mut *mut std::ffi::c_void,
    count: *mut c_uint,
) -> Ret {
    if cis.is_null() || count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let raw = gi as usize;
    with_gi(gi, |_, gi| {
        let slices = CI_PROFILES
            .iter()
            .find(|p| p.0 == profile)
            .map_or(0, |p| p.1);
        let of_profile: Vec<&Ci> = gi.cis.iter().filter(|c| c.slices == slices).collect();
        for (i, c) in of_profile.iter().take(SLICES as usize).enumerate() {
            let handle =
                CI_BIT | ((raw & !GI_BIT) & !0xffff) | ((gi.id as usize) << 8) | c.id as usize;
            // SAFETY: at most 7 entries, the caller's array per contract.
            unsafe { cis.add(i).write(handle as *mut _) };
        }
        // SAFETY: non-null per the check above.
        unsafe { count.write(of_profile.len().min(SLICES as usize) as c_uint) };
        SUCCESS
    })
}

/// # Safety
/// `ci` from this library.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlComputeInstanceDestroy(ci: *mut std::ffi::c_void) -> Ret {
    let raw = ci as usize;
    if raw & CI_BIT == 0 {
        return ERROR_INVALID_ARGUMENT;
    }
    let gpu = (raw & !CI_BIT) >> 16;
    let (gi_id, ci_id) = (((raw >> 8) & 0xff) as u32, (raw & 0xff) as u32);
    with_layout(crate::handle(gpu), |_, _, layout| {
        let Some(gi) = layout.iter_mut().find(|g| g.id == gi_id) else {
            return ERROR_NOT_FOUND;
        };
        match gi.cis.iter().position(|c| c.id == ci_id) {
            None => ERROR_NOT_FOUND,
            Some(i) => {
                gi.cis.remove(i);
                SUCCESS
            }
        }
    })
}
