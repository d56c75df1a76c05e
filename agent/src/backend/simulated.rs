//! Simulated GPUs built from catalog declarations. Utilisation, memory,
//! power, temperature and (on Hopper and newer) GPM profiling metrics
//! follow the workloads the supervisor runs on them, ramping between
//! samples so dashboards look alive.
//!
//! A declaration may split its GPUs into MIG instances:
//! `1xH100-SXM-80GB:mig=3g.40gb+2g.20gb+1g.10gb+1g.10gb`. Each instance gets
//! a stable `MIG-…` UUID and its own memory and profiling values, busy
//! when a workload holds its UUID.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::SystemTime;

use gpufleet_proto::v1::{
    GpmMetrics, GpuGeneration, GpuInfo, GpuProcess, GpuSample, MigInstance, MigSample, NvLinkPeer,
};
use rand::Rng;

use super::GpuBackend;
use super::mig::{self, MigProfile};
use super::nvml::throttle_reason_names;
use crate::health::RawXid;
use gpufleet_core::catalog::{self, CatalogError, ModelSpec};

/// A little idle PCIe traffic (KiB/s), so idle GPUs are not flat zero.
fn rng_small(base: f64) -> u32 {
    (base * rand::rng().random_range(0.0..0.0001)) as u32
}

/// PCI buses of the GPUs in a typical 8-GPU HGX board, so ids look familiar.
const PCI_BUSES: [u8; 8] = [0x18, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb];
const IDLE_TEMP_C: f64 = 32.0;
const SIM_DRIVER: &str = "550.54.15-simulated";

/// Why a simulated GPU declaration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeclarationError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("invalid MIG layout in {decl:?}: {reason}")]
    Mig { decl: String, reason: String },
}

/// A fault the simulated backend can be told to show, for tests and demos.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimFault {
    /// The driver reports this XID for the GPU.
    Xid(u32),
    /// Adds to the volatile and aggregate ECC counts.
    Ecc { corrected: u64, uncorrected: u64 },
    /// A row remap is pending (cleared by `Clear`).
    RemapPending,
    /// These clock-throttle reason bits are set (see `nvml::THROTTLE_REASONS`).
    Throttle(u64),
    /// The GPU no longer answers: its sample carries an error and the
    /// driver sees one GPU fewer.
    Lost,
    /// Removes the remap, throttle and lost faults (counters stay).
    Clear,
}

#[derive(Debug, Default)]
struct SimFaults {
    sbe: u64,
    dbe: u64,
    remap_pending: bool,
    throttle: u64,
    lost: bool,
}

/// One simulated MIG instance and its current values.
struct SimMig {
    info: MigInstance,
    busy: bool,
    util: f64,
    mem_frac: f64,
    busy_mem_frac: f64,
    tensor: f64,
}

struct SimGpu {
    info: GpuInfo,
    mig: Vec<SimMig>,
    /// How much of its work a busy period runs on tensor cores (0–1),
    /// picked once per busy period like its memory.
    tensor: f64,
    spec: &'static ModelSpec,
    busy: bool,
    faults: SimFaults,
    /// Workload processes on the GPU (pids), as the agent started them.
    pids: Vec<u32>,
    energy_mj: f64,
    pcie_replays: u64,
    // Current values, ramped towards targets on every sample.
    util: f64,
    mem_frac: f64,
    power_w: f64,
    temp_c: f64,
    // Memory share a workload holds, picked once per busy period.
    busy_mem_frac: f64,
}

/// GPUs that exist only in memory.
pub struct SimulatedBackend {
    /// For the UUIDs of MIG instances made by `apply_mig_layout`.
    node_id: String,
    gpus: Mutex<Vec<SimGpu>>,
    xids: Mutex<Vec<RawXid>>,
    last_sample: Mutex<Option<SystemTime>>,
}

impl std::fmt::Debug for SimulatedBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedBackend").finish_non_exhaustive()
    }
}

impl SimulatedBackend {
    /// Builds GPUs from declarations like `8xH100-SXM-80GB`, indexed in
    /// order. UUIDs derive from `node_id` and the index, so they are stable
    /// across restarts of the same node.
    pub fn new(node_id: &str, declarations: &[String]) -> Result<Self, DeclarationError> {
        let mut gpus = Vec::new();
        for decl in declarations {
            let (count, spec, layout) = parse_declaration(decl)?;
            for _ in 0..count {
                let index = gpus.len() as u32;
                let info = GpuInfo {
                    index,
                    uuid: simulated_uuid(node_id, index),
                    name: spec.nvml_name.to_string(),
                    model: spec.model.to_string(),
                    generation: spec.generation as i32,
                    memory_bytes: spec.memory_bytes,
                    compute_capability_major: spec.compute_capability.0,
                    compute_capability_minor: spec.compute_capability.1,
                    pci_bus_id: pci_bus_id(index),
                    serial: format!("{}", 1_650_923_000_000u64 + u64::from(index)),
                    driver_version: SIM_DRIVER.to_string(),
                    cuda_driver_version: "12.4".to_string(),
                    persistence_mode: Some(true),
                    numa_node: Some(if index < 4 { 0 } else { 1 }),
                    nvlink_peers: Vec::new(),
                    ..GpuInfo::default()
                };
                let mig = mig_instances(node_id, index, spec, &layout);
                let info = GpuInfo {
                    mig_enabled: !layout.is_empty(),
                    mig_instances: mig.iter().map(|m| m.info.clone()).collect(),
                    ..info
                };
                gpus.push(SimGpu {
                    info,
                    mig,
                    tensor: 0.5,
                    spec,
                    busy: false,
                    util: 0.0,
                    mem_frac: 0.0,
                    power_w: f64::from(spec.idle_watts),
                    temp_c: IDLE_TEMP_C,
                    busy_mem_frac: 0.75,
                    faults: SimFaults::default(),
                    pids: Vec::new(),
                    energy_mj: 0.0,
                    pcie_replays: 0,
                });
            }
        }
        // Datacenter parts of one model are fully NVLinked (an HGX board):
        // one link to every other GPU of the same model.
        let peers: Vec<Vec<NvLinkPeer>> = gpus
            .iter()
            .map(|g| {
                if !g.spec.model.contains("SXM") {
                    return Vec::new();
                }
                gpus.iter()
                    .filter(|o| o.info.index != g.info.index && o.spec.model == g.spec.model)
                    .enumerate()
                    .map(|(link, o)| NvLinkPeer {
                        link: link as u32,
                        remote_pci_bus_id: o.info.pci_bus_id.clone(),
                        remote_gpu_uuid: o.info.uuid.clone(),
                    })
                    .collect()
            })
            .collect();
        for (g, p) in gpus.iter_mut().zip(peers) {
            g.info.nvlink_peers = p;
        }
        Ok(Self {
            node_id: node_id.to_string(),
            gpus: Mutex::new(gpus),
            xids: Mutex::new(Vec::new()),
            last_sample: Mutex::new(None),
        })
    }

    /// Makes GPU `index` show `fault` from the next sample on.
    pub fn inject(&self, index: u32, fault: SimFault) -> Result<(), String> {
        let mut gpus = self.lock();
        let count = gpus.len();
        let g = gpus
            .get_mut(index as usize)
            .ok_or_else(|| format!("no simulated GPU {index}; this node has {count}"))?;
        match fault {
            SimFault::Xid(xid) => {
                self.xids
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(RawXid {
                        gpu_uuid: g.info.uuid.clone(),
                        xid,
                        at: SystemTime::now(),
                        source: "simulated",
                    });
            }
            SimFault::Ecc {
                corrected,
                uncorrected,
            } => {
                g.faults.sbe += corrected;
                g.faults.dbe += uncorrected;
            }
            SimFault::RemapPending => g.faults.remap_pending = true,
            SimFault::Throttle(mask) => g.faults.throttle = mask,
            SimFault::Lost => g.faults.lost = true,
            SimFault::Clear => {
                g.faults.remap_pending = false;
                g.faults.throttle = 0;
                g.faults.lost = false;
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<SimGpu>> {
        // A panic while holding this lock cannot leave the numbers invalid.
        self.gpus.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` from a fixed hash (FNV-1a,
/// not std's `DefaultHasher`, whose output may change between Rust releases).
pub fn simulated_uuid(node_id: &str, index: u32) -> String {
    let key = format!("gpufleet-sim/{node_id}/{index}");
    let hi = fnv1a64(key.as_bytes(), 0xcbf2_9ce4_8422_2325);
    let lo = fnv1a64(key.as_bytes(), 0x8422_2325_cbf2_9ce4 ^ hi);
    let h = format!("{hi:016x}{lo:016x}");
    format!(
        "GPU-{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn fnv1a64(data: &[u8], seed: u64) -> u64 {
    let mut hash = seed;
    for &b in data {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche (splitmix64) so that similar keys differ in every digit.
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// A declaration taken apart: `2xH100-SXM-80GB:mig=3g.40gb+1g.10gb` is two
/// H100s, each split into those MIG instances (empty layout: no MIG).
pub fn parse_declaration(
    decl: &str,
) -> Result<(u32, &'static ModelSpec, Vec<String>), DeclarationError> {
    let (gpus, layout) = match decl.split_once(":mig=") {
        Some((gpus, layout)) => (gpus, layout.split('+').map(String::from).collect()),
        None => (decl, Vec::new()),
    };
    let (count, spec) = catalog::parse_gpu_declaration(gpus)?;
    if !layout.is_empty() {
        mig::check_layout(&layout, spec.model, spec.memory_bytes).map_err(|reason| {
            DeclarationError::Mig {
                decl: decl.to_string(),
                reason,
            }
        })?;
    }
    Ok((count, spec, layout))
}

/// The MIG instances of simulated GPU `index`, with stable UUIDs; GPU
/// instance ids count from 1 in the declared order.
fn mig_instances(node_id: &str, index: u32, spec: &ModelSpec, layout: &[String]) -> Vec<SimMig> {
    let gib = spec.memory_bytes >> 30;
    layout
        .iter()
        .enumerate()
        .filter_map(|(i, profile)| {
            let parsed: MigProfile = mig::parse_profile(profile)?;
            let eighths = u64::from(mig::memory_slices(parsed, gib));
            let gi = i as u32 + 1;
            // The profile is part of the name: a new layout makes new
            // instances, as the driver does.
            let uuid = simulated_uuid(&format!("{node_id}/mig/{index}/{profile}"), gi)
                .replacen("GPU-", "MIG-", 1);
            Some(SimMig {
                info: MigInstance {
                    uuid,
                    profile: profile.clone(),
                    memory_bytes: spec.memory_bytes / 8 * eighths,
                    sm_share_milli: mig::sm_share_milli(None, None, profile),
                    gpu_instance_id: gi,
                    compute_instance_id: 0,
                },
                busy: false,
                util: 0.0,
                mem_frac: 0.0,
                busy_mem_frac: 0.75,
                tensor: 0.5,
            })
        })
        .collect()
}

/// GPM-like values for a GPU (or instance) at `activity` (0–1) whose work
/// is `tensor` tensor-bound, holding `mem_frac` of its memory: SM activity
/// tracks utilisation a little below it, as on real parts, and the pipes
/// split what the SMs do.
fn simulated_gpm(
    activity: f64,
    tensor: f64,
    mem_frac: f64,
    pcie: impl Fn(f64) -> Option<u32>,
    nvlink: bool,
) -> GpmMetrics {
    let a = activity.clamp(0.0, 1.0);
    let kib = |base: f64| pcie(base).map(|k| u64::from(k) * 1024);
    GpmMetrics {
        gr_engine_active: Some(a),
        sm_active: Some(a * 0.92),
        sm_occupancy: Some(a * (0.25 + 0.3 * mem_frac)),
        tensor_active: Some(a * tensor),
        dram_active: Some(a * (0.2 + 0.5 * mem_frac)),
        fp16_active: Some(a * tensor * 0.6),
        fp32_active: Some(a * (1.0 - tensor) * 0.4),
        fp64_active: Some(0.0),
        pcie_tx_bytes_per_second: kib(12_000_000.0),
        pcie_rx_bytes_per_second: kib(14_000_000.0),
        nvlink_tx_bytes_per_second: nvlink.then_some((a * 180e9) as u64),
        nvlink_rx_bytes_per_second: nvlink.then_some((a * 180e9) as u64),
    }
}

/// One MIG instance's sample: its own memory and profiling values, which
/// ramp towards its workload like a whole GPU's.
fn sample_mig(m: &mut SimMig, has_gpm: bool, rng: &mut impl Rng) -> MigSample {
    let (util_t, mem_t) = if m.busy {
        (rng.random_range(0.85..1.0), m.busy_mem_frac)
    } else {
        (0.0, 0.0)
    };
    m.util += (util_t - m.util) * 0.5;
    m.mem_frac += (mem_t - m.mem_frac) * 0.5;
    let total = m.info.memory_bytes;
    MigSample {
        uuid: m.info.uuid.clone(),
        gpu_instance_id: m.info.gpu_instance_id,
        compute_instance_id: m.info.compute_instance_id,
        profile: m.info.profile.clone(),
        memory_used_bytes: Some((total as f64 * m.mem_frac) as u64),
        memory_total_bytes: Some(total),
        // A MIG instance has no PCIe or NVLink rates of its own in GPM.
        gpm: has_gpm.then(|| simulated_gpm(m.util, m.tensor, m.mem_frac, |_| None, false)),
    }
}

fn pci_bus_id(index: u32) -> String {
    let bus = PCI_BUSES
        .get(index as usize)
        .map_or(0x10 + index, |&b| u32::from(b));
    format!("00000000:{bus:02X}:00.0")
}

impl GpuBackend for SimulatedBackend {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn driver_version(&self) -> String {
        SIM_DRIVER.to_string()
    }

    fn gpus(&self) -> Vec<GpuInfo> {
        self.lock().iter().map(|g| g.info.clone()).collect()
    }

    fn sample(&self) -> Vec<GpuSample> {
        let mut rng = rand::rng();
        let now_sys = SystemTime::now();
        let now = prost_types::Timestamp::from(now_sys);
        let interval_s = {
            let mut last = self.last_sample.lock().unwrap_or_else(|e| e.into_inner());
            let dt = last.and_then(|l| now_sys.duration_since(l).ok());
            *last = Some(now_sys);
            dt.map(|d| d.as_secs_f64())
        };
        let mut gpus = self.lock();
        gpus.iter_mut()
            .map(|g| {
                let tdp = f64::from(g.spec.tdp_watts);
                let idle = f64::from(g.spec.idle_watts);
                let (util_t, mem_t, power_t, temp_t) = if g.busy {
                    let util = rng.random_range(85.0..100.0);
                    (
                        util,
                        g.busy_mem_frac,
                        idle + (tdp - idle) * (0.8 + 0.15 * util / 100.0),
                        68.0 + 10.0 * util / 100.0,
                    )
                } else {
                    (0.0, 0.0, idle, IDLE_TEMP_C + rng.random_range(0.0..3.0))
                };
                // Move halfway to the target each sample: a smooth ramp.
                g.util += (util_t - g.util) * 0.5;
                g.mem_frac += (mem_t - g.mem_frac) * 0.5;
                g.power_w += (power_t - g.power_w) * 0.5 + rng.random_range(-0.01..0.01) * tdp;
                g.temp_c += (temp_t - g.temp_c) * 0.3;
                g.power_w = g.power_w.clamp(idle * 0.9, tdp);
                let util = g.util.round().clamp(0.0, 100.0) as u32;
                let total = g.spec.memory_bytes;
                let used = (total as f64 * g.mem_frac) as u64;
                let busy = g.busy || util > 0;
                let dt = interval_s.unwrap_or(0.0);
                g.energy_mj += g.power_w * 1000.0 * dt;
                if busy && rng.random_bool(0.01) {
                    g.pcie_replays += 1;
                }
                if g.faults.lost {
                    return GpuSample {
                        uuid: g.info.uuid.clone(),
                        index: g.info.index,
                        sampled_at: Some(now),
                        sample_error: "GPU is lost".to_string(),
                        ..Default::default()
                    };
                }
                let throttle = g.faults.throttle | if busy { 0x4 } else { 0x1 };
                let has_gpm = g.spec.generation as i32 >= GpuGeneration::Hopper as i32;
                let pcie = |base: f64| {
                    if busy {
                        Some((base * (0.5 + g.util / 200.0)) as u32)
                    } else {
                        Some(rng_small(base))
                    }
                };
                let nvlink = !g.info.nvlink_peers.is_empty();
                let nvlink_kib = g.energy_mj / 10.0;
                let share = if g.pids.is_empty() {
                    0
                } else {
                    used / g.pids.len() as u64
                };
                GpuSample {
                    uuid: g.info.uuid.clone(),
                    index: g.info.index,
                    sampled_at: Some(now),
                    gpu_utilization_percent: Some(util),
                    memory_utilization_percent: Some((f64::from(util) * 0.6).round() as u32),
                    memory_used_bytes: Some(used),
                    memory_free_bytes: Some(total - used),
                    memory_total_bytes: Some(total),
                    temperature_celsius: Some(g.temp_c.round() as u32),
                    memory_temperature_celsius: Some((g.temp_c + 4.0).round() as u32),
                    power_usage_milliwatts: Some((g.power_w * 1000.0) as u32),
                    power_limit_milliwatts: Some(g.spec.tdp_watts * 1000),
                    total_energy_millijoules: Some(g.energy_mj as u64),
                    sm_clock_mhz: Some(if busy { g.spec.max_sm_clock_mhz } else { 345 }),
                    memory_clock_mhz: Some(if busy { g.spec.max_mem_clock_mhz } else { 405 }),
                    encoder_utilization_percent: Some(0),
                    decoder_utilization_percent: Some(0),
                    throttle_reasons_mask: Some(throttle),
                    throttle_reasons: throttle_reason_names(throttle),
                    pcie_tx_kib_per_second: pcie(12_000_000.0),
                    pcie_rx_kib_per_second: pcie(14_000_000.0),
                    pcie_replay_count: Some(g.pcie_replays),
                    ecc_sbe_volatile: Some(g.faults.sbe),
                    ecc_dbe_volatile: Some(g.faults.dbe),
                    ecc_sbe_aggregate: Some(g.faults.sbe),
                    ecc_dbe_aggregate: Some(g.faults.dbe),
                    retired_pages_sbe: Some(0),
                    retired_pages_dbe: Some(0),
                    retired_pages_pending: Some(false),
                    remapped_rows_correctable: Some(0),
                    remapped_rows_uncorrectable: Some(u64::from(g.faults.dbe > 0)),
                    row_remap_pending: Some(g.faults.remap_pending),
                    row_remap_failure: Some(false),
                    nvlink_tx_kib: nvlink.then_some(nvlink_kib as u64),
                    nvlink_rx_kib: nvlink.then_some(nvlink_kib as u64),
                    nvlink_crc_errors: nvlink.then_some(0),
                    nvlink_replay_errors: nvlink.then_some(0),
                    nvlink_recovery_errors: nvlink.then_some(0),
                    processes: g
                        .pids
                        .iter()
                        .map(|&pid| GpuProcess {
                            pid,
                            used_memory_bytes: Some(share),
                            ..Default::default()
                        })
                        .collect(),
                    mig_enabled: Some(!g.mig.is_empty()),
                    gpm: (has_gpm && g.mig.is_empty())
                        .then(|| simulated_gpm(g.util / 100.0, g.tensor, g.mem_frac, pcie, nvlink)),
                    mig_samples: g
                        .mig
                        .iter_mut()
                        .map(|m| sample_mig(m, has_gpm, &mut rng))
                        .collect(),
                    ..Default::default()
                }
            })
            .collect()
    }

    fn visible_gpu_count(&self) -> Option<u32> {
        u32::try_from(self.lock().iter().filter(|g| !g.faults.lost).count()).ok()
    }

    fn drain_xids(&self) -> Vec<RawXid> {
        std::mem::take(&mut *self.xids.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn set_workload_pids(&self, pids: &HashMap<String, Vec<u32>>) {
        for g in self.lock().iter_mut() {
            // A MIG GPU's processes are those of its instances.
            g.pids = std::iter::once(&g.info.uuid)
                .chain(g.mig.iter().map(|m| &m.info.uuid))
                .filter_map(|u| pids.get(u))
                .flatten()
                .copied()
                .collect();
        }
    }

    fn as_simulated(&self) -> Option<&SimulatedBackend> {
        Some(self)
    }

    /// Lasts until the agent restarts (the declaration's layout comes
    /// back; the controller's wish, sent again, re-applies it).
    fn apply_mig_layout(&self, gpu_uuid: &str, profiles: &[String]) -> Result<(), String> {
        let mut gpus = self.lock();
        let g = gpus
            .iter_mut()
            .find(|g| g.info.uuid == gpu_uuid)
            .ok_or_else(|| format!("no simulated GPU {gpu_uuid}"))?;
        mig::check_layout(profiles, g.spec.model, g.spec.memory_bytes)?;
        g.mig = mig_instances(&self.node_id, g.info.index, g.spec, profiles);
        g.info.mig_enabled = true;
        g.info.mig_instances = g.mig.iter().map(|m| m.info.clone()).collect();
        Ok(())
    }

    fn set_busy(&self, busy_uuids: &HashSet<String>) {
        let mut rng = rand::rng();
        for g in self.lock().iter_mut() {
            for m in &mut g.mig {
                let busy = busy_uuids.contains(&m.info.uuid);
                if busy && !m.busy {
                    m.busy_mem_frac = rng.random_range(0.6..0.9);
                    m.tensor = rng.random_range(0.1..0.8);
                }
                m.busy = busy;
            }
            // A MIG GPU is busy while any of its instances is.
            let busy = busy_uuids.contains(&g.info.uuid) || g.mig.iter().any(|m| m.busy);
            if busy && !g.busy {
                g.busy_mem_frac = rng.random_range(0.6..0.9);
                g.tensor = rng.random_range(0.1..0.8);
            }
            g.busy = busy;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_stable_distinct_and_well_formed() {
        let a = simulated_uuid("node-a", 0);
        assert_eq!(a, simulated_uuid("node-a", 0));
        assert_ne!(a, simulated_uuid("node-a", 1));
        assert_ne!(a, simulated_uuid("node-b", 0));
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts[0], "GPU");
        let lens: Vec<usize> = parts[1..].iter().map(|p| p.len()).collect();
        assert_eq!(lens, [8, 4, 4, 4, 12]);
    }

    #[test]
    fn declarations_build_indexed_gpus() {
        let b = SimulatedBackend::new("n1", &["2xL4".into(), "1xT4".into()]).unwrap();
        let gpus = b.gpus();
        assert_eq!(gpus.len(), 3);
        assert_eq!(gpus.iter().map(|g| g.index).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(gpus[2].model, "T4");
        assert_eq!(gpus[0].pci_bus_id, "00000000:18:00.0");
        assert!(SimulatedBackend::new("n1", &["2xQ9000".into()]).is_err());
    }

    #[test]
    fn mig_declarations_make_instances_whose_values_follow_their_workloads() {
        let decl = "1xH100-SXM-80GB:mig=3g.40gb+2g.20gb+1g.10gb+1g.10gb".to_string();
        let b = SimulatedBackend::new("n1", &[decl.clone(), "1xA100-SXM-80GB".into()]).unwrap();
        let gpus = b.gpus();
        assert!(gpus[0].mig_enabled);
        let profiles: Vec<&str> = gpus[0]
            .mig_instances
            .iter()
            .map(|m| m.profile.as_str())
            .collect();
        assert_eq!(profiles, ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]);
        let one = &gpus[0].mig_instances[2];
        assert!(one.uuid.starts_with("MIG-"), "{one:?}");
        assert_eq!(one.memory_bytes, gpus[0].memory_bytes / 8);
        assert_eq!(one.sm_share_milli, 142);
        // Stable across restarts, distinct per instance.
        let again = SimulatedBackend::new("n1", &[decl]).unwrap();
        assert_eq!(again.gpus()[0].mig_instances, gpus[0].mig_instances);
        assert_ne!(gpus[0].mig_instances[2].uuid, gpus[0].mig_instances[3].uuid);
        assert!(!gpus[1].mig_enabled);

        b.set_busy(&HashSet::from([one.uuid.clone()]));
        let mut last = Vec::new();
        for _ in 0..10 {
            last = b.sample();
        }
        let mig = &last[0].mig_samples;
        assert_eq!(mig.len(), 4);
        let busy = mig[2].gpm.unwrap();
        assert!(busy.sm_active.unwrap() > 0.7, "{busy:?}");
        assert!(busy.tensor_active.unwrap() > 0.0);
        assert!(mig[2].memory_used_bytes.unwrap() > mig[2].memory_total_bytes.unwrap() / 2);
        let idle = mig[3].gpm.unwrap();
        assert!(idle.sm_active.unwrap() < 0.01, "{idle:?}");
        assert_eq!(last[0].gpm, None, "a MIG GPU reports GPM per instance");
        // The A100 (Ampere) has no GPM: absent, never zero.
        assert_eq!(last[1].gpm, None);
    }

    #[test]
    fn whole_hopper_gpus_report_gpm_following_their_workload() {
        let b = SimulatedBackend::new("n1", &["2xH100-SXM-80GB".into()]).unwrap();
        b.set_busy(&HashSet::from([b.gpus()[0].uuid.clone()]));
        let mut last = Vec::new();
        for _ in 0..10 {
            last = b.sample();
        }
        let busy = last[0].gpm.unwrap();
        let idle = last[1].gpm.unwrap();
        assert!(busy.sm_active.unwrap() > 0.7 && busy.sm_active.unwrap() <= 1.0);
        assert!(busy.tensor_active.unwrap() > 0.05);
        assert!(busy.nvlink_tx_bytes_per_second.unwrap() > 0);
        assert!(idle.sm_active.unwrap() < 0.01);
    }

    #[test]
    fn bad_mig_layouts_name_the_problem() {
        for (decl, want) in [
            ("1xL4:mig=1g.10gb", "does not support MIG"),
            ("1xH100-SXM-80GB:mig=4g.40gb+4g.40gb", "compute slices"),
            ("1xH100-SXM-80GB:mig=1g.10", "not a MIG profile"),
        ] {
            let err = SimulatedBackend::new("n", &[decl.into()])
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{decl}: {err}");
        }
    }

    #[test]
    fn utilisation_follows_busy_gpus() {
        let b = SimulatedBackend::new("n1", &["2xH100-SXM-80GB".into()]).unwrap();
        let busy_uuid = b.gpus()[0].uuid.clone();
        b.set_busy(&HashSet::from([busy_uuid]));
        let mut last = Vec::new();
        for _ in 0..10 {
            last = b.sample();
        }
        let busy = &last[0];
        let idle = &last[1];
        assert!(busy.gpu_utilization_percent.unwrap() >= 80, "{busy:?}");
        assert!(busy.power_usage_milliwatts.unwrap() > 500_000, "{busy:?}");
        assert!(busy.memory_used_bytes.unwrap() > busy.memory_total_bytes.unwrap() / 2);
        assert_eq!(idle.gpu_utilization_percent, Some(0));
        assert!(idle.temperature_celsius.unwrap() < 40, "{idle:?}");
    }
}
