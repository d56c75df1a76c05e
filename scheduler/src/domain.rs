//! The scheduler's vocabulary: GPU generations, locality, a job's
//! constraints and placement policy, the jobs it is asked to place and the
//! outcomes it returns. Plain data, no wire format: callers convert their
//! own records (the controller does it in its `placement` adapter).

use crate::reason::PendingReason;

/// A GPU architecture generation, oldest first: the order is what
/// "at least this generation" compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Generation {
    /// Not known (a GPU model outside the catalogue).
    #[default]
    Unspecified,
    Pascal,
    Volta,
    Turing,
    Ampere,
    Ada,
    Hopper,
    Blackwell,
}

impl Generation {
    /// Every generation, oldest first (`Unspecified` first).
    pub const ALL: [Generation; 8] = [
        Generation::Unspecified,
        Generation::Pascal,
        Generation::Volta,
        Generation::Turing,
        Generation::Ampere,
        Generation::Ada,
        Generation::Hopper,
        Generation::Blackwell,
    ];

    /// The name people read in explanations: `Hopper`, `Ampere`, …
    pub fn label(self) -> &'static str {
        match self {
            Generation::Unspecified => "Unspecified",
            Generation::Pascal => "Pascal",
            Generation::Volta => "Volta",
            Generation::Turing => "Turing",
            Generation::Ampere => "Ampere",
            Generation::Ada => "Ada",
            Generation::Hopper => "Hopper",
            Generation::Blackwell => "Blackwell",
        }
    }
}

/// Where the tasks of one job may be spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Locality {
    /// Not asked: one region for gangs (tasks > 1), anywhere for one task.
    #[default]
    Unspecified,
    Any,
    Region,
    Provider,
}

/// What a job requires of the GPUs it runs on. Empty lists allow anything.
/// `Hash` and `Eq` make it part of the key under which requests of the same
/// shape share a verdict within a pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Constraints {
    /// Allowed generations; empty = any.
    pub generations: Vec<Generation>,
    /// Allowed models (compared ignoring ASCII case); empty = any.
    pub models: Vec<String>,
    /// Minimum memory per GPU, bytes; 0 = any.
    pub min_gpu_memory_bytes: u64,
    pub providers: Vec<String>,
    pub regions: Vec<String>,
    /// The job's bid: highest acceptable price per GPU-hour, micro-USD.
    pub max_price_per_gpu_hour_micro_usd: Option<u64>,
    /// "At least this generation" (Hopper admits Hopper and Blackwell).
    pub min_generation: Option<Generation>,
    /// Minimum CUDA compute capability, (major, minor).
    pub min_compute_capability: (u32, u32),
    pub exclude_providers: Vec<String>,
    pub exclude_regions: Vec<String>,
    /// Soft: regions to prefer among those that satisfy everything else.
    pub preferred_regions: Vec<String>,
    /// Spot capacity may be used.
    pub allow_spot: bool,
    /// Only spot capacity may be used (implies `allow_spot`).
    pub require_spot: bool,
    /// Spot capacity interrupted more often than this (milli-interruptions
    /// per node-hour, as measured in its provider, region and generation)
    /// is skipped.
    pub max_interruption_milli_per_hour: Option<u32>,
    pub locality: Locality,
    /// Multi-GPU tasks need NVLink-connected GPUs; a node that reports no
    /// links does not qualify.
    pub require_nvlink: bool,
    /// A container-image job: only nodes that run images (`oci`) fit.
    pub require_oci: bool,
}

/// How to choose among GPUs that satisfy every constraint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    #[default]
    Cost,
    Pack,
    Spread,
    /// The naive baseline for benchmarks: first slot in node order that fits.
    FirstFit,
}

/// What one task of a job takes on its node: whole GPUs, a share of one
/// GPU, or one MIG instance. `Hash + Eq`: part of a request's shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum GpuUnit {
    /// `gpus_per_task` whole GPUs, exclusively.
    #[default]
    Whole,
    /// A share of one GPU, never MIG-enabled, packed beside other shares and
    /// never beside exclusive work. `milli`: thousandths of the GPU's compute
    /// (0 = as much as the memory's share of the GPU); `memory_bytes`: GPU
    /// memory (0 = the same share of the GPU's memory).
    Share { milli: u32, memory_bytes: u64 },
    /// One MIG instance: by profile name (`1g.10gb`, compared ignoring ASCII
    /// case) or, without one, the smallest instance with at least
    /// `min_memory_bytes` and `min_sm_share_milli` of its GPU's SMs.
    Mig {
        profile: Option<String>,
        min_memory_bytes: u64,
        min_sm_share_milli: u32,
    },
}

impl GpuUnit {
    /// Whole GPUs (or a full share) are 1000 milli-GPUs each.
    pub const WHOLE_MILLI: u32 = 1000;

    /// The thousandths of a GPU one task asks for before it is placed (a
    /// share's or MIG instance's real size is known once placed): what
    /// quotas charge a job that is not placed yet.
    pub fn requested_milli(&self, gpus_per_task: u32) -> u64 {
        match self {
            GpuUnit::Whole => gpus_per_task as u64 * Self::WHOLE_MILLI as u64,
            GpuUnit::Share { milli, .. } => (*milli).max(1) as u64,
            GpuUnit::Mig {
                min_sm_share_milli, ..
            } => (*min_sm_share_milli).max(1) as u64,
        }
    }

    /// "470/1000 of a GPU with 12 GiB free", "a 1g.10gb MIG instance", …:
    /// one task's unit in the words of a pending reason.
    pub fn describe(&self, gpus_per_task: u32) -> String {
        match self {
            GpuUnit::Whole => {
                format!(
                    "{gpus_per_task} GPU{}",
                    if gpus_per_task == 1 { "" } else { "s" }
                )
            }
            GpuUnit::Share {
                milli,
                memory_bytes,
            } => match (*milli, *memory_bytes) {
                (0, mem) => format!("a share of a GPU with {} free", gib(mem)),
                (m, 0) => format!("{m}/1000 of a GPU"),
                (m, mem) => format!("{m}/1000 of a GPU with {} free", gib(mem)),
            },
            GpuUnit::Mig {
                profile: Some(p), ..
            } => format!("a {p} MIG instance"),
            GpuUnit::Mig {
                profile: None,
                min_memory_bytes,
                min_sm_share_milli,
            } => {
                let mut parts = Vec::new();
                if *min_memory_bytes > 0 {
                    parts.push(format!("≥ {}", gib(*min_memory_bytes)));
                }
                if *min_sm_share_milli > 0 {
                    parts.push(format!("≥ {min_sm_share_milli}/1000 of the SMs"));
                }
                if parts.is_empty() {
                    "a MIG instance".to_string()
                } else {
                    format!("a MIG instance with {}", parts.join(" and "))
                }
            }
        }
    }
}

/// `12884901888` → `12 GiB`; `1610612736` → `1.5 GiB`.
pub(crate) fn gib(bytes: u64) -> String {
    let tenths = (bytes as u128 * 10 + (1 << 29)) / (1u128 << 30);
    if tenths.is_multiple_of(10) {
        format!("{} GiB", tenths / 10)
    } else {
        format!("{}.{} GiB", tenths / 10, tenths % 10)
    }
}

/// One pending job as the scheduler sees it.
#[derive(Debug, Clone, Default)]
pub struct JobInput {
    pub id: String,
    pub tenant: String,
    /// Higher goes first; preemptible running work of a lower priority may
    /// be evicted for it.
    pub priority: i32,
    pub preemptible: bool,
    /// Orders jobs of one tenant (e.g. submit time in nanoseconds).
    pub submitted_at: u64,
    pub tasks: u32,
    /// Whole GPUs per task; for a share or a MIG instance, 1.
    pub gpus_per_task: u32,
    /// What each task takes: whole GPUs (the default), a share, a MIG instance.
    pub unit: GpuUnit,
    pub constraints: Constraints,
    pub policy: Option<Policy>,
    pub max_runtime_secs: Option<u64>,
    /// Unix seconds before which the job is not placed (retry backoff).
    pub not_before: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPlacement {
    pub node_id: String,
    pub provider: String,
    pub region: String,
    /// The node's network block ([`crate::NodeInput::block`]; empty: not
    /// known).
    pub block: String,
    pub price_per_gpu_hour_micro_usd: u64,
    /// Whole GPUs, or the one GPU a share is on, or the MIG instance's uuid.
    pub gpu_uuids: Vec<String>,
    /// Generation of the GPUs.
    pub generation: Generation,
    /// 0: whole, exclusive GPUs. Else the thousandths of its one GPU the task
    /// holds: a share's, or the MIG instance's share of its GPU's SMs.
    pub share_milli: u32,
    /// A share's GPU memory limit, bytes (0 for whole GPUs and MIG instances,
    /// whose limit is the device's).
    pub memory_limit_bytes: u64,
    /// The MIG instance's profile, for a MIG placement.
    pub mig_profile: Option<String>,
}

impl TaskPlacement {
    /// Thousandths of a GPU held: 1000 per whole GPU, else the share. What
    /// the ledger bills (milli-GPU-seconds), quotas and fair share count.
    pub fn milli_gpus(&self) -> u64 {
        if self.share_milli == 0 {
            self.gpu_uuids.len() as u64 * GpuUnit::WHOLE_MILLI as u64
        } else {
            self.share_milli as u64
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Placed(Vec<TaskPlacement>),
    /// Victims (job ids) must be stopped and queued again; the job waits.
    Preempting {
        victims: Vec<String>,
    },
    /// Not placed this pass, and why.
    Pending(PendingReason),
}

#[derive(Debug, Default)]
pub struct PassResult {
    /// One entry per input job, in input order.
    pub outcomes: Vec<Outcome>,
    pub placed: usize,
    pub reservations: usize,
    /// (job index, nanoseconds) per decision, in queue order, when
    /// [`crate::SchedulerConfig::measure_decisions`] is set (benchmarks);
    /// each from the end of the decision before it in its priority level.
    pub decision_nanos: Vec<(usize, u64)>,
}
