//! The real backend: NVIDIA's management library through nvml-wrapper.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use gpufleet_proto::v1::{GpmMetrics, GpuInfo, GpuProcess, GpuSample, MigSample, NvLinkPeer};
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, PcieUtilCounter, TemperatureSensor};
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id;
use nvml_wrapper::{Device, Nvml};
use tracing::{debug, warn};

use super::gpm::{GpmKey, GpmTracker};
use super::{GpuBackend, mig, now_timestamp};
use crate::health::RawXid;
use gpufleet_core::catalog;

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
    nvml: Arc<Nvml>,
    /// Static facts, except the MIG layout, which every sample refreshes
    /// (an operator may reconfigure an idle GPU while the agent runs).
    gpus: Mutex<Vec<GpuInfo>>,
    /// Per GPU (as `gpus`): NVML said it supports GPM (Hopper and newer).
    gpm_supported: Vec<bool>,
    /// Previous GPM samples, to compute metrics over each interval.
    gpm: GpmTracker,
    driver_version: String,
    /// XIDs the event thread received since the last `drain_xids`.
    xids: Arc<Mutex<Vec<RawXid>>>,
    /// Tells the event thread to end (it notices within one wait).
    stop: Arc<AtomicBool>,
    /// Per GPU (as `gpus`): samples left before NVLink data counters are
    /// asked for again, after a GPU reported none (no NVLink). Asking costs
    /// two field-value calls, one of them for every link.
    nvlink_data_skip: Vec<AtomicU32>,
}

/// Samples between retries of NVLink data counters on a GPU without them.
const NVLINK_DATA_RETRY_SAMPLES: u32 = 60;

impl std::fmt::Debug for NvmlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlBackend")
            .field("gpus", &self.gpm_supported.len())
            .finish_non_exhaustive()
    }
}

impl Drop for NvmlBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // GPM samples must go back to NVML before it shuts down.
        self.gpm.release(&self.nvml, |_| false);
    }
}

fn one_line(s: impl std::fmt::Display) -> String {
    s.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// NVML's clocks-event (throttle) reason bits, by stable name.
pub const THROTTLE_REASONS: [(u64, &str); 9] = [
    (0x1, "gpu_idle"),
    (0x2, "applications_clocks_setting"),
    (0x4, "sw_power_cap"),
    (0x8, "hw_slowdown"),
    (0x10, "sync_boost"),
    (0x20, "sw_thermal_slowdown"),
    (0x40, "hw_thermal_slowdown"),
    (0x80, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
];

/// The names of the bits set in `mask`.
pub fn throttle_reason_names(mask: u64) -> Vec<String> {
    THROTTLE_REASONS
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, name)| (*name).to_string())
        .collect()
}

/// Field values read in one `nvmlDeviceGetFieldValues` call per sample:
/// each comes back with its own status, so an unsupported one is simply
/// absent.
const FIELDS: [u32; 16] = [
    field_id::NVML_FI_DEV_MEMORY_TEMP,
    field_id::NVML_FI_DEV_PCIE_REPLAY_COUNTER,
    field_id::NVML_FI_DEV_ECC_SBE_VOL_TOTAL,
    field_id::NVML_FI_DEV_ECC_DBE_VOL_TOTAL,
    field_id::NVML_FI_DEV_ECC_SBE_AGG_TOTAL,
    field_id::NVML_FI_DEV_ECC_DBE_AGG_TOTAL,
    field_id::NVML_FI_DEV_RETIRED_SBE,
    field_id::NVML_FI_DEV_RETIRED_DBE,
    field_id::NVML_FI_DEV_RETIRED_PENDING,
    field_id::NVML_FI_DEV_REMAPPED_COR,
    field_id::NVML_FI_DEV_REMAPPED_UNC,
    field_id::NVML_FI_DEV_REMAPPED_PENDING,
    field_id::NVML_FI_DEV_REMAPPED_FAILURE,
    field_id::NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL,
    field_id::NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL,
    field_id::NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL,
];
/// NVML has at most this many NVLinks per GPU (NVML_NVLINK_MAX_LINKS).
const NVLINK_MAX_LINKS: u32 = 18;
/// NVLink data counters, KiB since the driver loaded (nvml.h:
/// `NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX/RX`). Their `scopeId` selects a
/// link; `UINT_MAX` asks for the sum over all links.
const NVLINK_DATA_FIELDS: [u32; 2] = [
    field_id::NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
    field_id::NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX,
];
const SCOPE_ALL_LINKS: u32 = u32::MAX;

fn sample_value_u64(v: &SampleValue) -> Option<u64> {
    match *v {
        SampleValue::U32(x) => Some(u64::from(x)),
        SampleValue::U64(x) => Some(x),
        SampleValue::I64(x) => u64::try_from(x).ok(),
        SampleValue::F64(x) if x.is_finite() && x >= 0.0 => Some(x as u64),
        SampleValue::F64(_) => None,
    }
}

fn cuda_version_string(v: i32) -> String {
    // NVML encodes 12.4 as 12040.
    if v <= 0 {
        String::new()
    } else {
        format!("{}.{}", v / 1000, (v % 1000) / 10)
    }
}

/// `nvmlDeviceGetFieldValues` with a scope id per field, which
/// nvml-wrapper's `field_values_for` always leaves at 0. One entry per
/// `(field id, scope id)` request: the value, or `None` when NVML answered
/// that field with an error (e.g. not supported). `Err` when the call as a
/// whole failed. Pass field ids outside 251..=273 only: nvml-wrapper
/// renumbers those for newer drivers and this call does not.
#[allow(unsafe_code)]
fn scoped_field_values(
    device: &Device<'_>,
    requests: &[(u32, u32)],
) -> Result<Vec<Option<u64>>, NvmlError> {
    use nvml_wrapper_sys::bindings::{
        nvmlFieldValue_t, nvmlReturn_enum_NVML_SUCCESS as SUCCESS,
        nvmlValueType_enum_NVML_VALUE_TYPE_DOUBLE as DOUBLE,
        nvmlValueType_enum_NVML_VALUE_TYPE_SIGNED_INT as SIGNED_INT,
        nvmlValueType_enum_NVML_VALUE_TYPE_SIGNED_LONG_LONG as SIGNED_LONG_LONG,
        nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_INT as UNSIGNED_INT,
        nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG as UNSIGNED_LONG,
        nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG as UNSIGNED_LONG_LONG,
        nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_SHORT as UNSIGNED_SHORT,
    };
    let get_field_values = device
        .nvml()
        .lib()
        .nvmlDeviceGetFieldValues
        .as_ref()
        .map_err(|e| NvmlError::FailedToLoadSymbol(e.to_string()))?;
    let count = std::ffi::c_int::try_from(requests.len()).map_err(|_| NvmlError::InvalidArg)?;
    let mut values: Vec<nvmlFieldValue_t> = requests
        .iter()
        .map(|&(field, scope)| {
            // SAFETY: nvmlFieldValue_t is plain C data (integers and a
            // union of numbers), for which all-zero bytes are a valid value.
            let mut v: nvmlFieldValue_t = unsafe { std::mem::zeroed() };
            v.fieldId = field;
            v.scopeId = scope;
            v
        })
        .collect();
    // SAFETY: the handle belongs to `device`, which borrows a live `Nvml`
    // for the whole call; `values` holds `count` initialised entries that
    // NVML fills in place and does not keep.
    let ret = unsafe { get_field_values(device.handle(), count, values.as_mut_ptr()) };
    nvml_wrapper::error::nvml_try(ret)?;
    Ok(values
        .iter()
        .map(|v| {
            if v.nvmlReturn != SUCCESS {
                return None;
            }
            // SAFETY: NVML wrote the union member that `valueType` names.
            let value = unsafe {
                match v.valueType {
                    DOUBLE => SampleValue::F64(v.value.dVal),
                    UNSIGNED_INT => SampleValue::U32(v.value.uiVal),
                    // c_ulong is 64 bits here, 32 on some other targets.
                    #[allow(clippy::useless_conversion)]
                    UNSIGNED_LONG => SampleValue::U64(u64::from(v.value.ulVal)),
                    UNSIGNED_LONG_LONG => SampleValue::U64(v.value.ullVal),
                    SIGNED_LONG_LONG => SampleValue::I64(v.value.sllVal),
                    SIGNED_INT => SampleValue::I64(i64::from(v.value.siVal)),
                    UNSIGNED_SHORT => SampleValue::U32(u32::from(v.value.usVal)),
                    _ => return None,
                }
            };
            sample_value_u64(&value)
        })
        .collect())
}

/// NVLink data sent and received, KiB since the driver loaded, summed over
/// the GPU's links; `None` for a direction NVML does not report (a GPU
/// without NVLink). Asks for the all-links sum first; a driver that does
/// not know that scope is asked link by link and the answers are added.
fn nvlink_data_kib(device: &Device<'_>) -> [Option<u64>; 2] {
    let all_links: Vec<(u32, u32)> = NVLINK_DATA_FIELDS
        .iter()
        .map(|&field| (field, SCOPE_ALL_LINKS))
        .collect();
    let mut totals = [None; 2];
    if let Ok(values) = scoped_field_values(device, &all_links) {
        for (total, value) in totals.iter_mut().zip(values) {
            *total = value;
        }
    }
    if totals.iter().all(Option::is_some) {
        return totals;
    }
    let per_link: Vec<(u32, u32)> = (0..NVLINK_MAX_LINKS)
        .flat_map(|link| NVLINK_DATA_FIELDS.map(|field| (field, link)))
        .collect();
    let Ok(values) = scoped_field_values(device, &per_link) else {
        return totals;
    };
    for (direction, total) in totals.iter_mut().enumerate() {
        if total.is_some() {
            continue;
        }
        // Links that do not exist answer with an error and add nothing.
        *total = values
            .iter()
            .skip(direction)
            .step_by(NVLINK_DATA_FIELDS.len())
            .flatten()
            .copied()
            .reduce(u64::saturating_add);
    }
    totals
}

impl NvmlBackend {
    /// Loads NVML from `library` (default [`NVML_LIBRARY`]; tests point it at
    /// a fake library), reads the static facts of every GPU and starts the
    /// XID event thread.
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
        let driver_version = nvml.sys_driver_version().unwrap_or_default();
        let cuda_driver_version = nvml
            .sys_cuda_driver_version()
            .map(cuda_version_string)
            .unwrap_or_default();
        let mut gpus = Vec::with_capacity(count as usize);
        let mut gpm_supported = Vec::with_capacity(count as usize);
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
            let nvlink_peers = (0..NVLINK_MAX_LINKS)
                .filter_map(|link| {
                    let l = device.link_wrapper_for(link);
                    if !l.is_active().ok()? {
                        return None;
                    }
                    Some(NvLinkPeer {
                        link,
                        remote_pci_bus_id: l.remote_pci_info().ok()?.bus_id,
                        remote_gpu_uuid: String::new(),
                    })
                })
                .collect();
            let mig = mig::discover(&device);
            gpm_supported.push(device.gpm_support().unwrap_or(false));
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
                serial: device.serial().unwrap_or_default(),
                driver_version: driver_version.clone(),
                cuda_driver_version: cuda_driver_version.clone(),
                persistence_mode: device.is_in_persistent_mode().ok(),
                numa_node: device.numa_node_id().ok(),
                nvlink_peers,
                mig_enabled: mig.enabled,
                mig_instances: mig.instances,
            });
        }
        resolve_nvlink_peers(&mut gpus);
        let nvml = Arc::new(nvml);
        let xids = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (nvml, xids, stop) = (nvml.clone(), xids.clone(), stop.clone());
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
            let spawned = std::thread::Builder::new()
                .name("nvml-xid-events".into())
                .spawn(move || xid_event_loop(&nvml, &xids, &stop, ready_tx));
            match spawned {
                // Wait for the registration so that every XID after `new`
                // returns is seen (NVML reports only later events).
                Ok(_) => {
                    let _ = ready_rx.recv_timeout(REGISTRATION_TIMEOUT);
                }
                Err(e) => {
                    warn!(error = %e, "cannot start the NVML XID event thread; XIDs come from kernel messages only");
                }
            }
        }
        Ok(Self {
            nvml,
            nvlink_data_skip: gpus.iter().map(|_| AtomicU32::new(0)).collect(),
            gpus: Mutex::new(gpus),
            gpm_supported,
            gpm: GpmTracker::default(),
            driver_version,
            xids,
            stop,
        })
    }

    /// One GPU's sample, and its MIG state as NVML shows it now.
    fn sample_one(
        &self,
        info: &GpuInfo,
        gpm_supported: bool,
        nvlink_data_skip: &AtomicU32,
        now: prost_types::Timestamp,
    ) -> (GpuSample, Option<mig::MigState>) {
        let mut sample = GpuSample {
            uuid: info.uuid.clone(),
            index: info.index,
            sampled_at: Some(now),
            ..Default::default()
        };
        // Each field is read on its own: one unsupported or failing query
        // leaves that field absent and keeps the rest.
        let device = match self.nvml.device_by_uuid(info.uuid.as_str()) {
            Ok(d) => d,
            Err(e) => {
                sample.sample_error = one_line(e);
                return (sample, None);
            }
        };
        if let Ok(u) = device.utilization_rates() {
            sample.gpu_utilization_percent = Some(u.gpu);
            sample.memory_utilization_percent = Some(u.memory);
        }
        sample.encoder_utilization_percent =
            device.encoder_utilization().ok().map(|u| u.utilization);
        sample.decoder_utilization_percent =
            device.decoder_utilization().ok().map(|u| u.utilization);
        if let Ok(m) = device.memory_info() {
            sample.memory_used_bytes = Some(m.used);
            sample.memory_free_bytes = Some(m.free);
            sample.memory_total_bytes = Some(m.total);
        }
        sample.temperature_celsius = device.temperature(TemperatureSensor::Gpu).ok();
        sample.power_usage_milliwatts = device.power_usage().ok();
        sample.power_limit_milliwatts = device.enforced_power_limit().ok();
        sample.total_energy_millijoules = device.total_energy_consumption().ok();
        sample.sm_clock_mhz = device.clock_info(Clock::SM).ok();
        sample.memory_clock_mhz = device.clock_info(Clock::Memory).ok();
        if let Ok(reasons) = device.current_throttle_reasons() {
            sample.throttle_reasons_mask = Some(reasons.bits());
            sample.throttle_reasons = throttle_reason_names(reasons.bits());
        }
        sample.pcie_tx_kib_per_second = device.pcie_throughput(PcieUtilCounter::Send).ok();
        sample.pcie_rx_kib_per_second = device.pcie_throughput(PcieUtilCounter::Receive).ok();
        sample.mig_enabled = device.mig_mode().ok().map(|m| m.current == 1);
        let mig = mig::discover(&device);
        let instance_gpm = if gpm_supported {
            self.sample_gpm(&device, info.index, &mig, &mut sample)
        } else {
            HashMap::new()
        };
        sample.mig_samples = mig
            .instances
            .iter()
            .zip(&mig.memory_used)
            .map(|(m, used)| MigSample {
                uuid: m.uuid.clone(),
                gpu_instance_id: m.gpu_instance_id,
                compute_instance_id: m.compute_instance_id,
                profile: m.profile.clone(),
                memory_used_bytes: *used,
                memory_total_bytes: Some(m.memory_bytes),
                gpm: instance_gpm.get(&m.gpu_instance_id).copied().flatten(),
            })
            .collect();
        if let Ok(processes) = device.running_compute_processes() {
            sample.processes = processes
                .into_iter()
                .map(|p| GpuProcess {
                    pid: p.pid,
                    used_memory_bytes: match p.used_gpu_memory {
                        UsedGpuMemory::Used(b) => Some(b),
                        UsedGpuMemory::Unavailable => None,
                    },
                    ..Default::default()
                })
                .collect();
        }
        let ids: Vec<FieldId> = FIELDS.iter().map(|&f| FieldId(f)).collect();
        if let Ok(values) = device.field_values_for(&ids) {
            let mut crc = None::<u64>;
            for v in values.into_iter().flatten() {
                let Some(x) = v.value.as_ref().ok().and_then(sample_value_u64) else {
                    continue;
                };
                match v.field.0 {
                    field_id::NVML_FI_DEV_MEMORY_TEMP => {
                        sample.memory_temperature_celsius = u32::try_from(x).ok();
                    }
                    field_id::NVML_FI_DEV_PCIE_REPLAY_COUNTER => sample.pcie_replay_count = Some(x),
                    field_id::NVML_FI_DEV_ECC_SBE_VOL_TOTAL => sample.ecc_sbe_volatile = Some(x),
                    field_id::NVML_FI_DEV_ECC_DBE_VOL_TOTAL => sample.ecc_dbe_volatile = Some(x),
                    field_id::NVML_FI_DEV_ECC_SBE_AGG_TOTAL => sample.ecc_sbe_aggregate = Some(x),
                    field_id::NVML_FI_DEV_ECC_DBE_AGG_TOTAL => sample.ecc_dbe_aggregate = Some(x),
                    field_id::NVML_FI_DEV_RETIRED_SBE => sample.retired_pages_sbe = Some(x),
                    field_id::NVML_FI_DEV_RETIRED_DBE => sample.retired_pages_dbe = Some(x),
                    field_id::NVML_FI_DEV_RETIRED_PENDING => {
                        sample.retired_pages_pending = Some(x != 0);
                    }
                    field_id::NVML_FI_DEV_REMAPPED_COR => {
                        sample.remapped_rows_correctable = Some(x);
                    }
                    field_id::NVML_FI_DEV_REMAPPED_UNC => {
                        sample.remapped_rows_uncorrectable = Some(x);
                    }
                    field_id::NVML_FI_DEV_REMAPPED_PENDING => {
                        sample.row_remap_pending = Some(x != 0);
                    }
                    field_id::NVML_FI_DEV_REMAPPED_FAILURE => {
                        sample.row_remap_failure = Some(x != 0);
                    }
                    field_id::NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL => crc = Some(x),
                    field_id::NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL => {
                        sample.nvlink_replay_errors = Some(x);
                    }
                    field_id::NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL => {
                        sample.nvlink_recovery_errors = Some(x);
                    }
                    _ => {}
                }
            }
            sample.nvlink_crc_errors = crc;
        }
        let skip = nvlink_data_skip.load(Ordering::Relaxed);
        if skip > 0 {
            nvlink_data_skip.store(skip - 1, Ordering::Relaxed);
        } else {
            [sample.nvlink_tx_kib, sample.nvlink_rx_kib] = nvlink_data_kib(&device);
            if sample.nvlink_tx_kib.is_none() && sample.nvlink_rx_kib.is_none() {
                nvlink_data_skip.store(NVLINK_DATA_RETRY_SAMPLES, Ordering::Relaxed);
            }
        }
        (sample, Some(mig))
    }

    /// GPM metrics of the whole GPU (into `sample`), or per GPU instance
    /// of a GPU in MIG mode (NVML samples GPM per GPU instance there).
    fn sample_gpm(
        &self,
        device: &Device<'_>,
        gpu_index: u32,
        mig: &mig::MigState,
        sample: &mut GpuSample,
    ) -> HashMap<u32, Option<GpmMetrics>> {
        let nvml: &Nvml = &self.nvml;
        if !mig.enabled {
            let key = GpmKey {
                gpu_index,
                gpu_instance_id: None,
            };
            sample.gpm = self.gpm.measure(nvml, key, || device.gpm_sample());
            return HashMap::new();
        }
        let mut by_instance = HashMap::new();
        for instance in &mig.instances {
            let gi = instance.gpu_instance_id;
            // Compute instances of one GPU instance share its metrics.
            by_instance.entry(gi).or_insert_with(|| {
                let key = GpmKey {
                    gpu_index,
                    gpu_instance_id: Some(gi),
                };
                self.gpm.measure(nvml, key, || device.gpm_mig_sample(gi))
            });
        }
        // Samples of GPU instances that no longer exist are freed.
        self.gpm.release(nvml, |k| {
            k.gpu_index != gpu_index
                || k.gpu_instance_id
                    .is_none_or(|gi| by_instance.contains_key(&gi))
        });
        by_instance
    }
}

/// Fills `remote_gpu_uuid` of links whose other end is a GPU of this host.
fn resolve_nvlink_peers(gpus: &mut [GpuInfo]) {
    let by_bus: HashMap<String, String> = gpus
        .iter()
        .map(|g| (g.pci_bus_id.to_ascii_lowercase(), g.uuid.clone()))
        .collect();
    for g in gpus.iter_mut() {
        for peer in &mut g.nvlink_peers {
            if let Some(uuid) = by_bus.get(&peer.remote_pci_bus_id.to_ascii_lowercase()) {
                peer.remote_gpu_uuid = uuid.clone();
            }
        }
    }
}

/// Longest wait in `new` for the event thread to register its GPUs.
const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one blocking wait lasts; only bounds how late shutdown is noticed.
const EVENT_WAIT_MS: u32 = 500;

/// Blocks on the NVML event set for critical-XID events of every GPU until
/// `stop`. Runs on its own thread: NVML's wait is a blocking call.
fn xid_event_loop(
    nvml: &Nvml,
    xids: &Mutex<Vec<RawXid>>,
    stop: &AtomicBool,
    ready: std::sync::mpsc::SyncSender<()>,
) {
    let mut set = match nvml.create_event_set() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %one_line(e), "NVML event sets unavailable; XIDs come from kernel messages only");
            return;
        }
    };
    let mut registered = 0;
    for index in 0..nvml.device_count().unwrap_or(0) {
        let Ok(device) = nvml.device_by_index(index) else {
            continue;
        };
        match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => {
                set = s;
                registered += 1;
            }
            Err(e) => {
                // A failed registration frees the set; start a new one for
                // the remaining GPUs.
                warn!(index, error = %one_line(e.error), "cannot watch XIDs of this GPU");
                match nvml.create_event_set() {
                    Ok(s) => set = s,
                    Err(_) => return,
                }
            }
        }
    }
    let _ = ready.send(());
    if registered == 0 {
        return;
    }
    while !stop.load(Ordering::Relaxed) {
        match set.wait(EVENT_WAIT_MS) {
            Ok(event) => {
                let xid = match event.event_data {
                    Some(XidError::Value(v)) => u32::try_from(v).unwrap_or(u32::MAX),
                    _ => continue,
                };
                let Ok(gpu_uuid) = event.device.uuid() else {
                    continue;
                };
                warn!(%gpu_uuid, xid, "XID error reported by NVML");
                xids.lock().unwrap_or_else(|e| e.into_inner()).push(RawXid {
                    gpu_uuid,
                    xid,
                    at: SystemTime::now(),
                    source: "nvml",
                });
            }
            Err(NvmlError::Timeout) => {}
            Err(e) => {
                // E.g. a GPU fell off the bus; do not spin on a broken set.
                debug!(error = %one_line(e), "NVML event wait failed");
                std::thread::sleep(Duration::from_millis(u64::from(EVENT_WAIT_MS)));
            }
        }
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
        self.gpus.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn sample(&self) -> Vec<GpuSample> {
        let now = now_timestamp();
        let infos = self.gpus();
        let mut samples = Vec::with_capacity(infos.len());
        let mut layouts = Vec::with_capacity(infos.len());
        for ((info, skip), &gpm) in infos
            .iter()
            .zip(&self.nvlink_data_skip)
            .zip(&self.gpm_supported)
        {
            let (sample, mig) = self.sample_one(info, gpm, skip, now);
            samples.push(sample);
            layouts.push(mig);
        }
        let mut gpus = self.gpus.lock().unwrap_or_else(|e| e.into_inner());
        for (info, mig) in gpus.iter_mut().zip(layouts) {
            if let Some(mig) = mig {
                info.mig_enabled = mig.enabled;
                info.mig_instances = mig.instances;
            }
        }
        samples
    }

    fn visible_gpu_count(&self) -> Option<u32> {
        self.nvml.device_count().ok()
    }

    fn drain_xids(&self) -> Vec<RawXid> {
        std::mem::take(&mut *self.xids.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Destroys the GPU's MIG instances and creates `profiles`
    /// (`mig_apply.rs`); the next sample reads the new layout.
    fn apply_mig_layout(&self, gpu_uuid: &str, profiles: &[String]) -> Result<(), String> {
        let info = self
            .gpus()
            .into_iter()
            .find(|g| g.uuid == gpu_uuid)
            .ok_or_else(|| format!("no GPU {gpu_uuid} on this node"))?;
        if !info.model.is_empty() {
            mig::check_layout(profiles, &info.model, info.memory_bytes)?;
        }
        let device = self.nvml.device_by_uuid(gpu_uuid).map_err(one_line)?;
        super::mig_apply::apply(&device, profiles)?;
        // Read the new layout now, so the hello that follows reports it.
        let state = mig::discover(&device);
        let mut gpus = self.gpus.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = gpus.iter_mut().find(|g| g.uuid == gpu_uuid) {
            g.mig_enabled = state.enabled;
            g.mig_instances = state.instances;
        }
        Ok(())
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

    /// On a GPU host: `cargo test -p gpufleet-agent --lib -- --ignored real_gpus`.
    /// Hopper and newer must report GPM ratios from the second sample on
    /// (older GPUs none); a GPU in MIG mode must list its instances with
    /// MIG UUIDs, profiles, memory and SM shares, and sample each.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn real_gpus_report_samples_gpm_and_mig_instances() {
        use gpufleet_proto::v1::GpuGeneration;
        let backend = NvmlBackend::new(None).unwrap();
        let gpus = backend.gpus();
        assert!(!gpus.is_empty());
        let samples = backend.sample();
        assert_eq!(samples.len(), gpus.len());
        assert!(samples[0].memory_total_bytes.is_some());
        // GPM compares two samples; give the counters time to move.
        std::thread::sleep(Duration::from_secs(1));
        let samples = backend.sample();
        for (g, s) in gpus.iter().zip(&samples) {
            let hopper = g.generation >= GpuGeneration::Hopper as i32;
            let ratio = |v: Option<f64>| v.is_some_and(|v| (0.0..=1.0).contains(&v));
            if g.mig_enabled {
                assert!(!g.mig_instances.is_empty(), "{g:?}");
                assert_eq!(s.mig_samples.len(), g.mig_instances.len(), "{s:?}");
                for m in &g.mig_instances {
                    assert!(m.uuid.starts_with("MIG-"), "{m:?}");
                    assert!(super::mig::parse_profile(&m.profile).is_some(), "{m:?}");
                    assert!(
                        m.memory_bytes > 0 && m.memory_bytes <= g.memory_bytes,
                        "{m:?}"
                    );
                    assert!((1..=1000).contains(&m.sm_share_milli), "{m:?}");
                }
                for m in &s.mig_samples {
                    assert!(m.memory_total_bytes.is_some(), "{m:?}");
                    if hopper {
                        let gpm = m.gpm.as_ref().expect("GPM per MIG instance on Hopper");
                        assert!(ratio(gpm.sm_active), "{gpm:?}");
                    }
                }
            } else if hopper {
                let gpm = s.gpm.as_ref().expect("GPM on Hopper and newer");
                assert!(ratio(gpm.sm_active) && ratio(gpm.tensor_active), "{gpm:?}");
                assert!(ratio(gpm.dram_active), "{gpm:?}");
            } else {
                assert_eq!(s.gpm, None, "no GPM before Hopper: absent, not zero");
            }
        }
    }
}
