//! Simulated GPUs built from catalog declarations. Utilisation, memory,
//! power and temperature follow the workloads the supervisor runs on them,
//! ramping between samples so dashboards look alive.

use std::collections::HashSet;
use std::sync::Mutex;

use gpufleet_proto::v1::{GpuInfo, GpuSample};
use rand::Rng;

use super::catalog::{self, CatalogError, ModelSpec};
use super::{GpuBackend, now_timestamp};

/// PCI buses of the GPUs in a typical 8-GPU HGX board, so ids look familiar.
const PCI_BUSES: [u8; 8] = [0x18, 0x2a, 0x3a, 0x5d, 0x9a, 0xab, 0xba, 0xdb];
const IDLE_TEMP_C: f64 = 32.0;

struct SimGpu {
    info: GpuInfo,
    spec: &'static ModelSpec,
    busy: bool,
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
    gpus: Mutex<Vec<SimGpu>>,
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
    pub fn new(node_id: &str, declarations: &[String]) -> Result<Self, CatalogError> {
        let mut gpus = Vec::new();
        for decl in declarations {
            let (count, spec) = catalog::parse_gpu_declaration(decl)?;
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
                };
                gpus.push(SimGpu {
                    info,
                    spec,
                    busy: false,
                    util: 0.0,
                    mem_frac: 0.0,
                    power_w: f64::from(spec.idle_watts),
                    temp_c: IDLE_TEMP_C,
                    busy_mem_frac: 0.75,
                });
            }
        }
        Ok(Self {
            gpus: Mutex::new(gpus),
        })
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
        "550.54.15-simulated".to_string()
    }

    fn gpus(&self) -> Vec<GpuInfo> {
        self.lock().iter().map(|g| g.info.clone()).collect()
    }

    fn sample(&self) -> Vec<GpuSample> {
        let mut rng = rand::rng();
        let now = now_timestamp();
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
                GpuSample {
                    uuid: g.info.uuid.clone(),
                    index: g.info.index,
                    sampled_at: Some(now),
                    gpu_utilization_percent: Some(util),
                    memory_utilization_percent: Some((f64::from(util) * 0.6).round() as u32),
                    memory_used_bytes: Some(used),
                    memory_total_bytes: Some(total),
                    temperature_celsius: Some(g.temp_c.round() as u32),
                    power_usage_milliwatts: Some((g.power_w * 1000.0) as u32),
                    power_limit_milliwatts: Some(g.spec.tdp_watts * 1000),
                    sm_clock_mhz: Some(if busy { g.spec.max_sm_clock_mhz } else { 345 }),
                    memory_clock_mhz: Some(if busy { g.spec.max_mem_clock_mhz } else { 405 }),
                }
            })
            .collect()
    }

    fn set_busy(&self, busy_uuids: &HashSet<String>) {
        let mut rng = rand::rng();
        for g in self.lock().iter_mut() {
            let busy = busy_uuids.contains(&g.info.uuid);
            if busy && !g.busy {
                g.busy_mem_frac = rng.random_range(0.6..0.9);
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
