//! Enforcement of shared GPU allocations (`Allocation.gpu_share_milli`,
//! `gpu_memory_limit_bytes`): what the platform lets the agent guarantee.
//!
//! - **CUDA MPS** (the node runs `nvidia-cuda-mps-control -d`): the workload
//!   gets `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` (its share of the SMs) and
//!   `CUDA_MPS_PINNED_DEVICE_MEM_LIMIT` (its memory), which the driver
//!   enforces: compute is capped, an allocation past the limit fails.
//! - **Time-slicing** (no MPS): the GPU's scheduler interleaves the
//!   workloads, so compute is not capped; memory is enforced by watching
//!   each workload's processes through the `GpuBackend` and stopping one
//!   that holds more than its limit, with the reason in its status.
//!
//! The memory watch runs in both modes (under MPS it is a backstop). MIG
//! allocations need neither: the instance is the limit, and the workload
//! sees only its `MIG-…` UUID.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use gpufleet_proto::v1::{Allocation, GpuSample};

/// Where `nvidia-cuda-mps-control` puts its pipes by default.
pub const DEFAULT_MPS_PIPE_DIRECTORY: &str = "/tmp/nvidia-mps";

/// The `gpu_sharing` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SharingMode {
    /// MPS when its control pipe exists at start, else time-slicing.
    #[default]
    Auto,
    Mps,
    TimeSlicing,
}

impl std::str::FromStr for SharingMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "mps" => Ok(Self::Mps),
            "time-slicing" => Ok(Self::TimeSlicing),
            other => Err(format!(
                "{other:?} is not a GPU sharing mode; use auto, mps or time-slicing"
            )),
        }
    }
}

/// How this node shares a GPU between allocations.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GpuSharing {
    /// An MPS control daemon serves clients through this pipe directory.
    Mps { pipe_directory: PathBuf },
    #[default]
    TimeSlicing,
}

impl GpuSharing {
    /// Resolves `mode`: `auto` looks for the MPS daemon's control pipe
    /// (`<pipe_directory>/control`).
    pub fn detect(mode: SharingMode, pipe_directory: &Path) -> Self {
        let mps = Self::Mps {
            pipe_directory: pipe_directory.to_path_buf(),
        };
        match mode {
            SharingMode::Mps => mps,
            SharingMode::TimeSlicing => Self::TimeSlicing,
            SharingMode::Auto if pipe_directory.join("control").exists() => mps,
            SharingMode::Auto => Self::TimeSlicing,
        }
    }

    /// A name for logs and docs: `mps` or `time-slicing`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Mps { .. } => "mps",
            Self::TimeSlicing => "time-slicing",
        }
    }

    /// The environment a shared allocation's workload gets (after its own,
    /// so it cannot lift its limits). Empty for a whole GPU or a MIG
    /// instance. Always: `GPUFLEET_GPU_SHARE_MILLI` and, with a limit,
    /// `GPUFLEET_GPU_MEMORY_LIMIT_BYTES`, so a framework can size itself
    /// (e.g. PyTorch's `set_per_process_memory_fraction`). Under MPS also
    /// the MPS client limits: thread percentage rounded up (a 1/1000 share
    /// still gets 1 %), memory per visible device ordinal in MiB.
    pub fn env(&self, allocation: &Allocation) -> Vec<(String, String)> {
        let share = allocation.gpu_share_milli;
        let limit = allocation.gpu_memory_limit_bytes;
        if share == 0 && limit == 0 {
            return Vec::new();
        }
        let mut env = Vec::new();
        if share > 0 {
            env.push(("GPUFLEET_GPU_SHARE_MILLI".into(), share.to_string()));
        }
        if limit > 0 {
            env.push(("GPUFLEET_GPU_MEMORY_LIMIT_BYTES".into(), limit.to_string()));
        }
        if let Self::Mps { pipe_directory } = self {
            env.push((
                "CUDA_MPS_PIPE_DIRECTORY".into(),
                pipe_directory.to_string_lossy().into_owned(),
            ));
            if share > 0 {
                let percent = share.min(1000).div_ceil(10).max(1);
                env.push((
                    "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE".into(),
                    percent.to_string(),
                ));
            }
            if limit > 0 {
                // Ordinals as the workload sees them: CUDA_VISIBLE_DEVICES
                // renumbers its GPUs from 0. Rounded down: never above the
                // limit.
                let mib = (limit >> 20).max(1);
                let per_device: Vec<String> = (0..allocation.gpu_uuids.len().max(1))
                    .map(|ordinal| format!("{ordinal}={mib}M"))
                    .collect();
                env.push((
                    "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT".into(),
                    per_device.join(","),
                ));
            }
        }
        env
    }
}

/// A workload over its GPU memory limit: which, and the reason its status
/// gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overrun {
    pub allocation_id: String,
    pub reason: String,
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Allocations whose processes hold more GPU memory on one of their GPUs
/// than `gpu_memory_limit_bytes`, from samples whose processes are already
/// attributed to allocations. A process NVML reports no memory for counts
/// 0 (the watch cannot see it; MPS or the driver still may).
pub fn memory_overruns(samples: &[GpuSample], running: &[&Allocation]) -> Vec<Overrun> {
    let limits: HashMap<&str, &Allocation> = running
        .iter()
        .filter(|a| a.gpu_memory_limit_bytes > 0)
        .map(|a| (a.allocation_id.as_str(), *a))
        .collect();
    let mut out = Vec::new();
    for sample in samples {
        let mut used: HashMap<&str, u64> = HashMap::new();
        for p in &sample.processes {
            if limits.contains_key(p.allocation_id.as_str()) {
                *used.entry(p.allocation_id.as_str()).or_default() +=
                    p.used_memory_bytes.unwrap_or(0);
            }
        }
        let mut over: Vec<(&str, u64)> = used
            .into_iter()
            .filter(|(id, bytes)| {
                limits
                    .get(id)
                    .is_some_and(|a| *bytes > a.gpu_memory_limit_bytes)
            })
            .collect();
        over.sort();
        for (id, bytes) in over {
            if out.iter().any(|o: &Overrun| o.allocation_id == id) {
                continue;
            }
            let limit = limits.get(id).map_or(0, |a| a.gpu_memory_limit_bytes);
            out.push(Overrun {
                allocation_id: id.to_string(),
                reason: format!(
                    "stopped by the agent: its processes used {} of GPU memory on {}, over its limit of {} (ask for more GPU memory, or make the workload use less)",
                    gib(bytes),
                    sample.uuid,
                    gib(limit)
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::GpuProcess;

    fn shared(id: &str, share: u32, limit: u64) -> Allocation {
        Allocation {
            allocation_id: id.into(),
            gpu_uuids: vec!["GPU-a".into()],
            gpu_share_milli: share,
            gpu_memory_limit_bytes: limit,
            ..Default::default()
        }
    }

    #[test]
    fn modes_parse_and_auto_looks_for_the_mps_control_pipe() {
        assert_eq!("time-slicing".parse(), Ok(SharingMode::TimeSlicing));
        assert!(
            "mps-ish"
                .parse::<SharingMode>()
                .unwrap_err()
                .contains("auto, mps or time-slicing")
        );
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            GpuSharing::detect(SharingMode::Auto, dir.path()),
            GpuSharing::TimeSlicing
        );
        std::fs::write(dir.path().join("control"), b"").unwrap();
        assert_eq!(
            GpuSharing::detect(SharingMode::Auto, dir.path()).name(),
            "mps"
        );
        assert_eq!(
            GpuSharing::detect(SharingMode::TimeSlicing, dir.path()),
            GpuSharing::TimeSlicing
        );
    }

    #[test]
    fn mps_gets_thread_percentage_and_pinned_memory() {
        let mps = GpuSharing::Mps {
            pipe_directory: "/run/mps".into(),
        };
        let env: HashMap<String, String> =
            mps.env(&shared("a", 470, 12 << 30)).into_iter().collect();
        assert_eq!(env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"], "47");
        assert_eq!(env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"], "0=12288M");
        assert_eq!(env["CUDA_MPS_PIPE_DIRECTORY"], "/run/mps");
        assert_eq!(env["GPUFLEET_GPU_SHARE_MILLI"], "470");
        let env: HashMap<String, String> = mps.env(&shared("b", 1, 0)).into_iter().collect();
        assert_eq!(env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"], "1");
        assert!(!env.contains_key("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"));
        // Whole GPUs and MIG instances: nothing.
        assert!(mps.env(&shared("c", 0, 0)).is_empty());
        let ts: HashMap<String, String> = GpuSharing::TimeSlicing
            .env(&shared("d", 500, 1 << 30))
            .into_iter()
            .collect();
        assert_eq!(ts.len(), 2, "{ts:?}");
        assert_eq!(
            ts["GPUFLEET_GPU_MEMORY_LIMIT_BYTES"],
            (1u64 << 30).to_string()
        );
    }

    #[test]
    fn a_workload_over_its_memory_limit_is_named_with_the_reason() {
        let process = |pid, id: &str, gib: u64| GpuProcess {
            pid,
            used_memory_bytes: Some(gib << 30),
            allocation_id: id.into(),
            ..Default::default()
        };
        let samples = [GpuSample {
            uuid: "GPU-a".into(),
            processes: vec![
                process(1, "small", 3),
                process(2, "small", 2),
                process(3, "fits", 4),
                process(4, "nolimit", 70),
                process(5, "", 9),
            ],
            ..Default::default()
        }];
        let (small, fits, nolimit) = (
            shared("small", 500, 4 << 30),
            shared("fits", 500, 4 << 30),
            shared("nolimit", 500, 0),
        );
        let over = memory_overruns(&samples, &[&small, &fits, &nolimit]);
        assert_eq!(over.len(), 1, "{over:?}");
        assert_eq!(over[0].allocation_id, "small");
        assert!(
            over[0].reason.contains("5.0 GiB") && over[0].reason.contains("limit of 4.0 GiB"),
            "{}",
            over[0].reason
        );
        assert!(memory_overruns(&samples, &[&fits]).is_empty());
    }
}
