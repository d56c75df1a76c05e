//! What a simulation replays: a fleet of nodes and a stream of jobs, in the
//! simulator's own plain types (every input format converts into these),
//! plus a seeded synthetic generator for scale tests.

use crate::domain::Generation;

/// One node: `gpus` GPUs of one catalogue model at one price.
#[derive(Debug, Clone, PartialEq)]
pub struct SimNode {
    pub id: String,
    /// gpufleet catalogue model name, e.g. `V100-SXM2-32GB`.
    pub model: String,
    pub generation: Generation,
    pub gpus: u32,
    pub price_per_gpu_hour_micro_usd: u64,
    /// Cloud or owner, as the live fleet names it (`aws`, `nebius`, …).
    pub provider: String,
    pub region: String,
}

/// One job: `tasks` tasks (a gang when more than one: placed all or none),
/// each of `gpus` whole GPUs on one node, or of a share of one GPU.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimJob {
    pub id: String,
    pub tenant: String,
    pub priority: i32,
    /// Virtual seconds from the start of the workload.
    pub arrival: u64,
    /// Run time once placed, virtual seconds (at least 1).
    pub duration: u64,
    pub gpus: u32,
    /// 0: `gpus` whole GPUs. Else a share of one GPU in thousandths (like
    /// openb's `gpu_milli`), packed beside other shares; `gpus` is then 1.
    pub gpu_milli: u32,
    /// Allowed catalogue models; empty = any.
    pub models: Vec<String>,
    /// Tasks (0 or 1: one task). A gang's tasks start together, may run on
    /// several nodes, and leave together.
    pub tasks: u32,
    /// Lower-priority running work the scheduler may evict for a job of a
    /// higher priority (it is requeued and runs again from the start).
    pub preemptible: bool,
    /// Stopped (and failed) this many seconds after it starts if still
    /// running; the scheduler plans with start + this as its end.
    pub max_runtime: Option<u64>,
}

/// What an input reader dropped or changed, so the report can say so.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkloadNotes {
    /// Pods that ask for no GPU (the scheduler only places GPU work).
    pub skipped_no_gpu: u64,
    /// Pods without a deletion time (no duration to replay).
    pub skipped_no_deletion: u64,
    /// Pods asking for a fraction of each of several GPUs, given whole GPUs
    /// (a share is of one GPU).
    pub fractional_rounded_up: u64,
    /// Pods asking for a fraction of one GPU, replayed as shares.
    pub fractional_shares: u64,
    /// Pods whose deletion time equals their creation time (run 1 s).
    pub zero_duration: u64,
}

/// A fleet and the jobs that arrive at it, jobs sorted by arrival.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Workload {
    pub nodes: Vec<SimNode>,
    pub jobs: Vec<SimJob>,
    pub notes: WorkloadNotes,
}

impl Workload {
    /// Sorts jobs by arrival (stable: equal arrivals keep input order).
    pub fn sort_jobs(&mut self) {
        self.jobs.sort_by_key(|j| j.arrival);
    }

    pub fn total_gpus(&self) -> u64 {
        self.nodes.iter().map(|n| u64::from(n.gpus)).sum()
    }
}

/// A small, fast, seeded generator (SplitMix64): the same seed always gives
/// the same workload, with no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }
}

/// The synthetic fleet's node shapes: (model, generation, GPUs, price).
const SYNTHETIC_SHAPES: [(&str, Generation, u32, u64); 4] = [
    ("H100-SXM-80GB", Generation::Hopper, 8, 2_990_000),
    ("A100-SXM-80GB", Generation::Ampere, 8, 1_790_000),
    ("L4", Generation::Ada, 4, 800_000),
    ("T4", Generation::Turing, 2, 350_000),
];

/// `nodes` nodes and `jobs` single-task jobs over a 30-day month, drawn from
/// `seed`. Job sizes follow the openb mix (mostly 1 GPU, some 2, 4 and 8);
/// arrivals are uniform over the month, durations 1 min – 2 days, four
/// tenants, a fifth of jobs pinned to one model.
pub fn synthetic(nodes: usize, jobs: usize, seed: u64) -> Workload {
    const MONTH: u64 = 30 * 24 * 3600;
    let mut rng = Rng::new(seed);
    let nodes: Vec<SimNode> = (0..nodes)
        .map(|i| {
            let (model, generation, gpus, price) =
                SYNTHETIC_SHAPES[rng.below(SYNTHETIC_SHAPES.len() as u64) as usize];
            SimNode {
                id: format!("node-{i:06}"),
                model: model.to_string(),
                generation,
                gpus,
                price_per_gpu_hour_micro_usd: price,
                provider: "sim".to_string(),
                region: format!("region-{}", i % 4),
            }
        })
        .collect();
    let jobs = (0..jobs)
        .map(|i| {
            let gpus = match rng.below(100) {
                0..=79 => 1,
                80..=89 => 2,
                90..=96 => 4,
                _ => 8,
            };
            let models = if rng.below(5) == 0 {
                let shape = SYNTHETIC_SHAPES[rng.below(2) as usize];
                vec![shape.0.to_string()]
            } else {
                Vec::new()
            };
            SimJob {
                id: format!("job-{i:07}"),
                tenant: format!("tenant-{}", rng.below(4)),
                priority: 0,
                arrival: rng.below(MONTH),
                duration: 60 + rng.below(2 * 24 * 3600),
                gpus,
                gpu_milli: 0,
                models,
                ..Default::default()
            }
        })
        .collect();
    let mut workload = Workload {
        nodes,
        jobs,
        notes: WorkloadNotes::default(),
    };
    workload.sort_jobs();
    workload
}

/// Optional parts of the synthetic workload, each a percentage of jobs
/// (0–100). All 0 (the default) leaves [`synthetic`]'s workload as it is:
/// the draws for these come from a second generator of the same seed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyntheticMix {
    /// Jobs made gangs of 2–4 tasks of 8 GPUs each (whole 8-GPU nodes).
    pub gang_pct: u32,
    /// Jobs made preemptible batch work at priority −1: the others (at 0)
    /// may evict them.
    pub preemptible_pct: u32,
    /// Jobs given a max runtime of 1 h, 6 h or 24 h (a run longer than it
    /// is stopped there).
    pub max_runtime_pct: u32,
}

/// [`synthetic`], then `mix` applied.
pub fn synthetic_with(nodes: usize, jobs: usize, seed: u64, mix: SyntheticMix) -> Workload {
    let mut workload = synthetic(nodes, jobs, seed);
    if mix == SyntheticMix::default() {
        return workload;
    }
    let mut rng = Rng::new(seed ^ 0x6A09_E667_F3BC_C908);
    for job in &mut workload.jobs {
        let (gang, preemptible, limited) = (rng.below(100), rng.below(100), rng.below(100));
        let (tasks, limit) = (2 + rng.below(3) as u32, rng.below(3));
        if gang < u64::from(mix.gang_pct) {
            job.tasks = tasks;
            job.gpus = 8;
        }
        if preemptible < u64::from(mix.preemptible_pct) {
            job.preemptible = true;
            job.priority = -1;
        }
        if limited < u64::from(mix.max_runtime_pct) {
            job.max_runtime = Some([3600, 6 * 3600, 24 * 3600][limit as usize]);
        }
    }
    workload
}
