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
    pub locality: Locality,
    /// Multi-GPU tasks need NVLink-connected GPUs (where topology is known).
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
    pub gpus_per_task: u32,
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
    pub price_per_gpu_hour_micro_usd: u64,
    pub gpu_uuids: Vec<String>,
    /// Generation of the GPUs.
    pub generation: Generation,
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
    /// [`crate::SchedulerConfig::measure_decisions`] is set (benchmarks).
    pub decision_nanos: Vec<(usize, u64)>,
}
