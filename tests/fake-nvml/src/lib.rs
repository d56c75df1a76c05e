//! A fake `libnvidia-ml.so`: exports the NVML C functions gpufleet's agent
//! calls (through nvml-wrapper) and answers them from a JSON file, so the
//! agent's real `nvml` backend runs in CI without a GPU.
//!
//! The file is named by `GPUFLEET_FAKE_NVML_CONFIG`, else it is
//! `fake-nvml.json` in the directory the library was loaded from (so tests
//! in one process, which cannot set environment variables safely, each copy
//! the library into their own directory). It is re-read whenever it
//! changes (inode, size or mtime), so a test can rewrite it — best by
//! writing a temporary file and renaming it over — to change values or
//! inject XIDs while the agent runs. Format ([`FakeConfig`]):
//!
//! ```json
//! { "driver_version": "550.54.15", "cuda_driver_version": 12040,
//!   "gpus": [ { "uuid": "GPU-…", "name": "NVIDIA H100 80GB HBM3",
//!               "pci_bus_id": "00000000:18:00.0", "serial": "1650923000001",
//!               "values": { "gpu_util": 97, "memory_total": 85899345920, … },
//!               "processes": [ { "pid": 1234, "used_memory": 1073741824 } ],
//!               "xids": [79], "lost": false } ] }
//! ```
//!
//! NVLink data counters (`NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX/RX`, KiB)
//! come from `"nvlink": [ { "tx_kib": …, "rx_kib": … }, … ]`, one entry per
//! link, and honour the field value's `scopeId` as NVML does: a link index
//! reads that link (an index past the list is `NVML_ERROR_INVALID_ARGUMENT`),
//! `UINT_MAX` reads the sum over all links. `"nvlink_scope_all_unsupported":
//! true` makes `UINT_MAX` an invalid argument, like a driver that only
//! knows per-link scopes. A GPU without `nvlink` entries answers
//! `NVML_ERROR_NOT_SUPPORTED` for every scope.
//!
//! A key missing from `values` makes the matching NVML call return
//! `NVML_ERROR_NOT_SUPPORTED`, which is how tests check that an unsupported
//! field is absent. `xids` is a log: each event set delivers every entry
//! once, in order (append to inject another). `lost: true` makes every call
//! for that GPU fail with `NVML_ERROR_GPU_IS_LOST`.
//!
//! MIG and GPM (`"mig_instances"`, `"gpm"`, `"sm_count"`): see [`mig`],
//! [`mig_layout`] (creating and destroying instances) and [`gpm`].
//!
//! nvml-wrapper resolves symbols lazily (a missing one fails only the call
//! that needs it), so only the functions the agent uses are exported.

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_uint, c_ulonglong, c_void};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

pub mod gpm;
pub mod mig;
pub mod mig_layout;

pub use mig::FakeMigInstance;

/// Environment variable naming the JSON file.
pub const CONFIG_ENV: &str = "GPUFLEET_FAKE_NVML_CONFIG";

/// The whole fake machine.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeConfig {
    #[serde(default)]
    pub driver_version: String,
    /// CUDA version as NVML encodes it: 12.4 = 12040.
    #[serde(default)]
    pub cuda_driver_version: i32,
    #[serde(default)]
    pub gpus: Vec<FakeGpu>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeGpu {
    pub uuid: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub pci_bus_id: String,
    /// Absent: `nvmlDeviceGetSerial` is not supported.
    pub serial: Option<String>,
    /// Value keys: see [`FIELD_KEYS`] and the functions below.
    #[serde(default)]
    pub values: HashMap<String, f64>,
    #[serde(default)]
    pub processes: Vec<FakeProcess>,
    /// NVLink data counters per link; empty: the GPU has no NVLink.
    #[serde(default)]
    pub nvlink: Vec<FakeNvLink>,
    /// The all-links scope (`UINT_MAX`) is rejected, as by older drivers.
    #[serde(default)]
    pub nvlink_scope_all_unsupported: bool,
    #[serde(default)]
    pub xids: Vec<u64>,
    #[serde(default)]
    pub lost: bool,
    /// MIG compute instances (shown when `values.mig_mode` is 1).
    #[serde(default)]
    pub mig_instances: Vec<FakeMigInstance>,
    /// GPM metrics by key ([`gpm::METRIC_KEYS`]); absent: no GPM (pre-Hopper).
    pub gpm: Option<HashMap<String, f64>>,
}

/// One NVLink's data counters, KiB since the (fake) driver loaded.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeNvLink {
    pub tx_kib: u64,
    pub rx_kib: u64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeProcess {
    pub pid: u32,
    pub used_memory: u64,
    /// The MIG instance it runs in (`NVML` reports `UINT_MAX` outside MIG).
    pub gpu_instance_id: Option<u32>,
    pub compute_instance_id: Option<u32>,
}

/// NVML field ids served by `nvmlDeviceGetFieldValues`, and their keys.
pub const FIELD_KEYS: [(u32, &str); 16] = [
    (82, "memory_temp"),
    (94, "pcie_replay"),
    (3, "ecc_sbe_volatile"),
    (4, "ecc_dbe_volatile"),
    (5, "ecc_sbe_aggregate"),
    (6, "ecc_dbe_aggregate"),
    (29, "retired_sbe"),
    (30, "retired_dbe"),
    (31, "retired_pending"),
    (142, "remapped_correctable"),
    (143, "remapped_uncorrectable"),
    (144, "remap_pending"),
    (145, "remap_failure"),
    (38, "nvlink_crc_flit_errors"),
    (52, "nvlink_replay_errors"),
    (59, "nvlink_recovery_errors"),
];

/// `NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX` and `_RX`: scoped by link.
const FIELD_NVLINK_DATA_TX: c_uint = 138;
const FIELD_NVLINK_DATA_RX: c_uint = 139;
/// The scope id that asks for the sum over all links.
const SCOPE_ALL_LINKS: c_uint = c_uint::MAX;

pub(crate) type Ret = c_uint;
pub(crate) const SUCCESS: Ret = 0;
pub(crate) const ERROR_UNINITIALIZED: Ret = 1;
pub(crate) const ERROR_INVALID_ARGUMENT: Ret = 2;
pub(crate) const ERROR_NOT_SUPPORTED: Ret = 3;
pub(crate) const ERROR_NOT_FOUND: Ret = 6;
pub(crate) const ERROR_INSUFFICIENT_SIZE: Ret = 7;
pub(crate) const ERROR_TIMEOUT: Ret = 10;
pub(crate) const ERROR_GPU_IS_LOST: Ret = 15;
const EVENT_TYPE_XID_CRITICAL_ERROR: c_ulonglong = 8;
const VALUE_TYPE_UNSIGNED_LONG_LONG: c_uint = 3;

/// A device handle is its index + 1 (never null).
pub(crate) type Device = *mut c_void;

pub(crate) fn handle(index: usize) -> Device {
    (index + 1) as Device
}

// ---------------------------------------------------------------- config

type CacheKey = (u64, u64, Option<SystemTime>);
static CACHE: Mutex<Option<(CacheKey, Arc<FakeConfig>)>> = Mutex::new(None);

/// Where this library was loaded from: the `/proc/self/maps` entry that
/// holds one of its functions.
fn own_path() -> Option<std::path::PathBuf> {
    let here = own_path as *const () as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let mut cols = line.split_whitespace();
        let (lo, hi) = cols.next()?.split_once('-')?;
        let (lo, hi) = (
            usize::from_str_radix(lo, 16).ok()?,
            usize::from_str_radix(hi, 16).ok()?,
        );
        let path = cols.nth(4)?;
        (lo <= here && here < hi && path.starts_with('/')).then(|| path.into())
    })
}

fn config_path() -> Option<std::path::PathBuf> {
    static NEXT_TO_LIBRARY: std::sync::OnceLock<Option<std::path::PathBuf>> =
        std::sync::OnceLock::new();
    std::env::var_os(CONFIG_ENV).map(Into::into).or_else(|| {
        NEXT_TO_LIBRARY
            .get_or_init(|| Some(own_path()?.parent()?.join("fake-nvml.json")))
            .clone()
    })
}

/// The current config; re-parsed only when the file changed. A missing or
/// malformed file reads as a machine with no GPUs (the error goes to stderr
/// once per change, for whoever debugs the test).
pub(crate) fn config() -> Arc<FakeConfig> {
    let Some(path) = config_path() else {
        return Arc::new(FakeConfig::default());
    };
    let key = std::fs::metadata(&path)
        .map(|m| (m.ino(), m.len(), m.modified().ok()))
        .unwrap_or((0, 0, None));
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((k, c)) = cache.as_ref()
        && *k == key
    {
        return c.clone();
    }
    let parsed = std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str::<FakeConfig>(&t).map_err(|e| e.to_string()));
    let config = Arc::new(parsed.unwrap_or_else(|e| {
        eprintln!("fake NVML: cannot use {}: {e}", path.to_string_lossy());
        FakeConfig::default()
    }));
    *cache = Some((key, config.clone()));
    config
}

/// Runs `f` with the GPU behind `device`, mapping a bad handle and a lost
/// GPU to NVML's errors.
pub(crate) fn with_gpu(device: Device, f: impl FnOnce(&FakeGpu) -> Ret) -> Ret {
    if mig::is_mig_handle(device) {
        // NVML answers most device queries on a MIG handle this way.
        return ERROR_NOT_SUPPORTED;
    }
    let c = config();
    let index = (device as usize).wrapping_sub(1);
    match c.gpus.get(index) {
        None => ERROR_INVALID_ARGUMENT,
        Some(g) if g.lost => ERROR_GPU_IS_LOST,
        Some(g) => f(g),
    }
}

/// An NVLink data counter for `scope` (a link index, or all links).
fn nvlink_data(g: &FakeGpu, field: c_uint, scope: c_uint) -> Result<u64, Ret> {
    if g.nvlink.is_empty() {
        return Err(ERROR_NOT_SUPPORTED);
    }
    let pick = |link: &FakeNvLink| {
        if field == FIELD_NVLINK_DATA_TX {
            link.tx_kib
        } else {
            link.rx_kib
        }
    };
    if scope == SCOPE_ALL_LINKS {
        if g.nvlink_scope_all_unsupported {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        return Ok(g.nvlink.iter().map(pick).sum());
    }
    g.nvlink
        .get(scope as usize)
        .map(pick)
        .ok_or(ERROR_INVALID_ARGUMENT)
}

pub(crate) fn value(g: &FakeGpu, key: &str) -> Option<f64> {
    g.values.get(key).copied().filter(|v| v.is_finite())
}

/// Writes `v` through `out` when the GPU has `key`.
///
/// # Safety
/// `out` must be null or valid for a write of `T`.
pub(crate) unsafe fn put<T>(out: *mut T, v: Option<T>) -> Ret {
    match v {
        None => ERROR_NOT_SUPPORTED,
        Some(_) if out.is_null() => ERROR_INVALID_ARGUMENT,
        Some(v) => {
            // SAFETY: non-null and valid per the caller's contract.
            unsafe { out.write(v) };
            SUCCESS
        }
    }
}

/// Copies `s` NUL-terminated into `buf` of `len` bytes.
///
/// # Safety
/// `buf` must be null or valid for `len` bytes.
pub(crate) unsafe fn put_str(buf: *mut c_char, len: c_uint, s: &str) -> Ret {
    if buf.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let bytes = s.as_bytes();
    if bytes.len() + 1 > len as usize {
        return ERROR_INSUFFICIENT_SIZE;
    }
    // SAFETY: the length check above keeps both writes inside `buf`.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buf, bytes.len());
        buf.add(bytes.len()).write(0);
    }
    SUCCESS
}

// ---------------------------------------------------------------- system

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> Ret {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> Ret {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> Ret {
    SUCCESS
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(result: Ret) -> *const c_char {
    let s: &'static CStr = match result {
        SUCCESS => c"Success",
        ERROR_UNINITIALIZED => c"Uninitialized",
        ERROR_INVALID_ARGUMENT => c"Invalid Argument",
        ERROR_NOT_SUPPORTED => c"Not Supported",
        ERROR_NOT_FOUND => c"Not Found",
        ERROR_INSUFFICIENT_SIZE => c"Insufficient Size",
        ERROR_TIMEOUT => c"Timeout",
        ERROR_GPU_IS_LOST => c"GPU is lost",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

/// # Safety
/// NVML's contract: `version` valid for `length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> Ret {
    // SAFETY: forwarded contract.
    unsafe { put_str(version, length, &config().driver_version) }
}

/// # Safety
/// `version` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(version: *mut c_int) -> Ret {
    let v = config().cuda_driver_version;
    // SAFETY: forwarded contract.
    unsafe { put(version, (v > 0).then_some(v)) }
}

/// # Safety
/// `count` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> Ret {
    let c = config();
    let visible = c.gpus.iter().filter(|g| !g.lost).count() as c_uint;
    // SAFETY: forwarded contract.
    unsafe { put(count, Some(visible)) }
}

/// # Safety
/// `device` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, device: *mut Device) -> Ret {
    let c = config();
    match c.gpus.get(index as usize) {
        None => ERROR_INVALID_ARGUMENT,
        Some(g) if g.lost => ERROR_GPU_IS_LOST,
        // SAFETY: forwarded contract.
        Some(_) => unsafe { put(device, Some(handle(index as usize))) },
    }
}

/// # Safety
/// `uuid` a NUL-terminated string, `device` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut Device,
) -> Ret {
    if uuid.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: NUL-terminated per contract.
    let wanted = unsafe { CStr::from_ptr(uuid) }.to_string_lossy();
    let c = config();
    match c.gpus.iter().position(|g| g.uuid == wanted) {
        None => ERROR_NOT_FOUND,
        Some(i) if c.gpus[i].lost => ERROR_GPU_IS_LOST,
        // SAFETY: forwarded contract.
        Some(i) => unsafe { put(device, Some(handle(i))) },
    }
}

// ---------------------------------------------------------------- static facts

/// # Safety
/// `buf` valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(device: Device, buf: *mut c_char, len: c_uint) -> Ret {
    if mig::is_mig_handle(device) {
        // SAFETY: forwarded contract.
        return mig::with_mig(device, |_, m| unsafe { put_str(buf, len, &m.uuid) });
    }
    // SAFETY: forwarded contract.
    with_gpu(device, |g| unsafe { put_str(buf, len, &g.uuid) })
}

/// # Safety
/// `buf` valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(device: Device, buf: *mut c_char, len: c_uint) -> Ret {
    if mig::is_mig_handle(device) {
        // The driver names a MIG device "<GPU name> MIG <profile>".
        return mig::with_mig(device, |g, m| {
            let name = format!("{} MIG {}", g.name, m.profile);
            // SAFETY: forwarded contract.
            unsafe { put_str(buf, len, &name) }
        });
    }
    // SAFETY: forwarded contract.
    with_gpu(device, |g| unsafe { put_str(buf, len, &g.name) })
}

/// # Safety
/// `buf` valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSerial(device: Device, buf: *mut c_char, len: c_uint) -> Ret {
    with_gpu(device, |g| match &g.serial {
        // SAFETY: forwarded contract.
        Some(s) => unsafe { put_str(buf, len, s) },
        None => ERROR_NOT_SUPPORTED,
    })
}

#[repr(C)]
pub struct PciInfo {
    bus_id_legacy: [c_char; 16],
    domain: c_uint,
    bus: c_uint,
    device: c_uint,
    pci_device_id: c_uint,
    pci_sub_system_id: c_uint,
    bus_id: [c_char; 32],
}

/// # Safety
/// `pci` valid for a write of `nvmlPciInfo_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(device: Device, pci: *mut PciInfo) -> Ret {
    with_gpu(device, |g| {
        if pci.is_null() {
            return ERROR_INVALID_ARGUMENT;
        }
        let parts: Vec<u32> = g
            .pci_bus_id
            .split(['.', ':'])
            .map(|p| u32::from_str_radix(p, 16).unwrap_or(0))
            .collect();
        let mut info = PciInfo {
            bus_id_legacy: [0; 16],
            domain: parts.first().copied().unwrap_or(0),
            bus: parts.get(1).copied().unwrap_or(0),
            device: parts.get(2).copied().unwrap_or(0),
            pci_device_id: 0x2330_10de,
            pci_sub_system_id: 0x16c1_10de,
            bus_id: [0; 32],
        };
        for (dst, src) in info.bus_id.iter_mut().zip(g.pci_bus_id.bytes().take(31)) {
            *dst = src as c_char;
        }
        // SAFETY: non-null and valid per contract.
        unsafe { pci.write(info) };
        SUCCESS
    })
}

/// # Safety
/// `major` and `minor` valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCudaComputeCapability(
    device: Device,
    major: *mut c_int,
    minor: *mut c_int,
) -> Ret {
    with_gpu(device, |g| {
        match (value(g, "cc_major"), value(g, "cc_minor")) {
            // SAFETY: forwarded contract.
            (Some(a), Some(b)) => unsafe {
                put(major, Some(a as c_int));
                put(minor, Some(b as c_int))
            },
            _ => ERROR_NOT_SUPPORTED,
        }
    })
}

/// Defines `fn NAME(device, out: *mut T)` answering `values[KEY]`.
macro_rules! scalar {
    ($name:ident, $key:literal, $t:ty) => {
        /// # Safety
        /// `out` valid for a write.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $name(device: Device, out: *mut $t) -> Ret {
            // SAFETY: forwarded contract.
            with_gpu(device, |g| unsafe {
                put(out, value(g, $key).map(|v| v as $t))
            })
        }
    };
}

scalar!(nvmlDeviceGetPersistenceMode, "persistence_mode", c_uint);
scalar!(nvmlDeviceGetNumaNodeId, "numa_node", c_uint);
scalar!(nvmlDeviceGetPowerUsage, "power_usage_mw", c_uint);
scalar!(nvmlDeviceGetEnforcedPowerLimit, "power_limit_mw", c_uint);
scalar!(
    nvmlDeviceGetTotalEnergyConsumption,
    "energy_mj",
    c_ulonglong
);
scalar!(
    nvmlDeviceGetCurrentClocksThrottleReasons,
    "throttle_reasons",
    c_ulonglong
);
scalar!(nvmlDeviceGetPcieReplayCounter, "pcie_replay", c_uint);

/// # Safety
/// `active` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetNvLinkState(
    device: Device,
    _link: c_uint,
    _active: *mut c_uint,
) -> Ret {
    // The fake has no NVLink topology.
    with_gpu(device, |_| ERROR_NOT_SUPPORTED)
}

// ---------------------------------------------------------------- samples

#[repr(C)]
pub struct MemoryV2 {
    version: c_uint,
    total: c_ulonglong,
    reserved: c_ulonglong,
    free: c_ulonglong,
    used: c_ulonglong,
}

/// # Safety
/// `memory` valid for a write of `nvmlMemory_v2_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(device: Device, memory: *mut MemoryV2) -> Ret {
    let answer = |total: u64, used: u64| {
        // SAFETY: forwarded contract.
        unsafe {
            put(
                memory,
                Some(MemoryV2 {
                    version: (std::mem::size_of::<MemoryV2>() | (2 << 24)) as c_uint,
                    total,
                    reserved: 0,
                    free: total.saturating_sub(used),
                    used,
                }),
            )
        }
    };
    if mig::is_mig_handle(device) {
        return mig::with_mig(device, |_, m| answer(m.memory_total, m.memory_used));
    }
    with_gpu(device, |g| {
        let (Some(total), Some(used)) = (value(g, "memory_total"), value(g, "memory_used")) else {
            return ERROR_NOT_SUPPORTED;
        };
        answer(total as u64, used as u64)
    })
}

#[repr(C)]
pub struct Utilization {
    gpu: c_uint,
    memory: c_uint,
}

/// # Safety
/// `out` valid for a write of `nvmlUtilization_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: Device,
    out: *mut Utilization,
) -> Ret {
    with_gpu(device, |g| {
        let v = match (value(g, "gpu_util"), value(g, "mem_util")) {
            (Some(a), Some(b)) => Some(Utilization {
                gpu: a as c_uint,
                memory: b as c_uint,
            }),
            _ => None,
        };
        // SAFETY: forwarded contract.
        unsafe { put(out, v) }
    })
}

/// # Safety
/// `util` and `period` valid for writes.
unsafe fn codec_util(device: Device, key: &str, util: *mut c_uint, period: *mut c_uint) -> Ret {
    with_gpu(device, |g| match value(g, key) {
        // SAFETY: forwarded contract.
        Some(v) => unsafe {
            put(period, Some(167_000));
            put(util, Some(v as c_uint))
        },
        None => ERROR_NOT_SUPPORTED,
    })
}

/// # Safety
/// `util` and `period` valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEncoderUtilization(
    device: Device,
    util: *mut c_uint,
    period: *mut c_uint,
) -> Ret {
    // SAFETY: forwarded contract.
    unsafe { codec_util(device, "enc_util", util, period) }
}

/// # Safety
/// `util` and `period` valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetDecoderUtilization(
    device: Device,
    util: *mut c_uint,
    period: *mut c_uint,
) -> Ret {
    // SAFETY: forwarded contract.
    unsafe { codec_util(device, "dec_util", util, period) }
}

/// # Safety
/// `temp` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: Device,
    sensor: c_uint,
    temp: *mut c_uint,
) -> Ret {
    if sensor != 0 {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: forwarded contract.
    with_gpu(device, |g| unsafe {
        put(temp, value(g, "temperature").map(|v| v as c_uint))
    })
}

/// # Safety
/// `clock` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: Device,
    kind: c_uint,
    clock: *mut c_uint,
) -> Ret {
    let key = match kind {
        1 => "sm_clock",
        2 => "mem_clock",
        _ => return ERROR_NOT_SUPPORTED,
    };
    // SAFETY: forwarded contract.
    with_gpu(device, |g| unsafe {
        put(clock, value(g, key).map(|v| v as c_uint))
    })
}

/// # Safety
/// `out` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPcieThroughput(
    device: Device,
    counter: c_uint,
    out: *mut c_uint,
) -> Ret {
    let key = match counter {
        0 => "pcie_tx",
        1 => "pcie_rx",
        _ => return ERROR_INVALID_ARGUMENT,
    };
    // SAFETY: forwarded contract.
    with_gpu(device, |g| unsafe {
        put(out, value(g, key).map(|v| v as c_uint))
    })
}

/// # Safety
/// `current` and `pending` valid for writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: Device,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> Ret {
    with_gpu(device, |g| match value(g, "mig_mode") {
        // SAFETY: forwarded contract.
        Some(v) => unsafe {
            put(pending, Some(v as c_uint));
            put(current, Some(v as c_uint))
        },
        None => ERROR_NOT_SUPPORTED,
    })
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessInfo {
    pid: c_uint,
    used_gpu_memory: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// # Safety
/// `count` valid for read and write; `infos` null or valid for `*count`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: Device,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> Ret {
    if count.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let list = |g: &FakeGpu, only: Option<&FakeMigInstance>| {
        // A MIG handle lists only the processes in its instance; the
        // parent lists them all, each with its instance ids.
        let processes: Vec<&FakeProcess> = g
            .processes
            .iter()
            .filter(|p| {
                only.is_none_or(|m| {
                    p.gpu_instance_id == Some(m.gpu_instance_id)
                        && p.compute_instance_id.unwrap_or(0) == m.compute_instance_id
                })
            })
            .collect();
        let n = processes.len();
        // SAFETY: `count` non-null and valid per contract.
        let room = unsafe { count.read() } as usize;
        // SAFETY: as above.
        unsafe { count.write(n as c_uint) };
        if n == 0 {
            return SUCCESS;
        }
        if infos.is_null() || room < n {
            return ERROR_INSUFFICIENT_SIZE;
        }
        for (i, p) in processes.iter().enumerate() {
            // SAFETY: i < n <= room, the caller's buffer length.
            unsafe {
                infos.add(i).write(ProcessInfo {
                    pid: p.pid,
                    used_gpu_memory: p.used_memory,
                    gpu_instance_id: p.gpu_instance_id.unwrap_or(u32::MAX),
                    compute_instance_id: p.compute_instance_id.unwrap_or(u32::MAX),
                });
            }
        }
        SUCCESS
    };
    if mig::is_mig_handle(device) {
        return mig::with_mig(device, |g, m| list(g, Some(m)));
    }
    with_gpu(device, |g| list(g, None))
}

#[repr(C)]
pub struct FieldValue {
    field_id: c_uint,
    scope_id: c_uint,
    timestamp: i64,
    latency_usec: i64,
    value_type: c_uint,
    nvml_return: Ret,
    value: c_ulonglong,
}

/// # Safety
/// `values` valid for `count` entries.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetFieldValues(
    device: Device,
    count: c_int,
    values: *mut FieldValue,
) -> Ret {
    if values.is_null() || count < 0 {
        return ERROR_INVALID_ARGUMENT;
    }
    let now_us = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    with_gpu(device, |g| {
        for i in 0..count as usize {
            // SAFETY: i < count, the caller's buffer length.
            let fv = unsafe { &mut *values.add(i) };
            let v = match fv.field_id {
                FIELD_NVLINK_DATA_TX | FIELD_NVLINK_DATA_RX => {
                    nvlink_data(g, fv.field_id, fv.scope_id)
                }
                // Device-wide fields ignore the scope, as NVML's do.
                id => FIELD_KEYS
                    .iter()
                    .find(|(known, _)| *known == id)
                    .and_then(|(_, key)| value(g, key))
                    .map(|v| v as u64)
                    .ok_or(ERROR_NOT_SUPPORTED),
            };
            fv.timestamp = now_us;
            fv.latency_usec = 0;
            match v {
                Ok(v) => {
                    fv.value_type = VALUE_TYPE_UNSIGNED_LONG_LONG;
                    fv.nvml_return = SUCCESS;
                    fv.value = v as c_ulonglong;
                }
                Err(ret) => fv.nvml_return = ret,
            }
        }
        SUCCESS
    })
}

// ---------------------------------------------------------------- events

/// An event set: which GPUs it watches and how many XIDs of each it has
/// delivered.
struct EventSet {
    registered: Mutex<HashMap<String, usize>>,
}

/// # Safety
/// `set` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut *mut c_void) -> Ret {
    let boxed = Box::new(EventSet {
        registered: Mutex::new(HashMap::new()),
    });
    // SAFETY: forwarded contract; freed by nvmlEventSetFree.
    unsafe { put(set, Some(Box::into_raw(boxed).cast::<c_void>())) }
}

/// # Safety
/// `set` from `nvmlEventSetCreate`, not freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: Device,
    types: c_ulonglong,
    set: *mut c_void,
) -> Ret {
    if set.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    if types & !EVENT_TYPE_XID_CRITICAL_ERROR != 0 {
        return ERROR_NOT_SUPPORTED;
    }
    // SAFETY: a live set per contract.
    let set = unsafe { &*set.cast::<EventSet>() };
    with_gpu(device, |g| {
        // Only XIDs injected after registration are delivered.
        set.registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(g.uuid.clone(), g.xids.len());
        SUCCESS
    })
}

#[repr(C)]
pub struct EventData {
    device: Device,
    event_type: c_ulonglong,
    event_data: c_ulonglong,
    gpu_instance_id: c_uint,
    compute_instance_id: c_uint,
}

/// Blocks until an XID was appended to a watched GPU's log, or `timeout_ms`.
///
/// # Safety
/// `set` live, `data` valid for a write of `nvmlEventData_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: *mut c_void,
    data: *mut EventData,
    timeout_ms: c_uint,
) -> Ret {
    if set.is_null() || data.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: a live set per contract.
    let set = unsafe { &*set.cast::<EventSet>() };
    let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
    loop {
        let c = config();
        {
            let mut registered = set.registered.lock().unwrap_or_else(|e| e.into_inner());
            for (index, g) in c.gpus.iter().enumerate() {
                let Some(delivered) = registered.get_mut(&g.uuid) else {
                    continue;
                };
                if let Some(&xid) = g.xids.get(*delivered) {
                    *delivered += 1;
                    // SAFETY: non-null, valid per contract.
                    unsafe {
                        data.write(EventData {
                            device: handle(index),
                            event_type: EVENT_TYPE_XID_CRITICAL_ERROR,
                            event_data: xid,
                            gpu_instance_id: u32::MAX,
                            compute_instance_id: u32::MAX,
                        });
                    }
                    return SUCCESS;
                }
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return ERROR_TIMEOUT;
        }
        // The real driver wakes on an interrupt; a file has none, so look
        // again shortly.
        std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
    }
}

/// # Safety
/// `set` from `nvmlEventSetCreate`, freed at most once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetFree(set: *mut c_void) -> Ret {
    if set.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: created by Box::into_raw in nvmlEventSetCreate.
    drop(unsafe { Box::from_raw(set.cast::<EventSet>()) });
    SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_strings_are_nul_terminated() {
        // SAFETY: static C strings.
        let s = unsafe { CStr::from_ptr(nvmlErrorString(ERROR_NOT_SUPPORTED)) };
        assert_eq!(s.to_str().ok(), Some("Not Supported"));
    }

    #[test]
    fn put_str_respects_the_buffer() {
        let mut buf = [1 as c_char; 4];
        // SAFETY: buf has 4 bytes.
        assert_eq!(
            unsafe { put_str(buf.as_mut_ptr(), 4, "abcd") },
            ERROR_INSUFFICIENT_SIZE
        );
        // SAFETY: as above.
        assert_eq!(unsafe { put_str(buf.as_mut_ptr(), 4, "abc") }, SUCCESS);
        assert_eq!(buf[3], 0);
    }
}
