//! The simulator: replays a [`Workload`] through the production scheduler
//! ([`crate::schedule`], called as the controller calls it: the fleet of
//! nodes and running work, then one pass over the pending jobs) in virtual
//! time, and through two simple baselines for comparison. The fleet is a
//! [`LiveFleet`]: starts and departures are applied to it, and before each
//! pass it is in the state a fresh [`crate::Fleet::build`] would give, so
//! decisions are the controller's without rebuilding every pass.
//!
//! Time model: jobs arrive at their arrival times and leave `duration`
//! seconds after they start. Scheduling ticks lie on a grid of
//! `cadence_secs`; a tick runs when something changed since the previous
//! one (an arrival or a departure at or before it). A tick where nothing
//! changed is skipped: the workload has no max runtimes, backoffs or
//! preemptible jobs, so the pass would decide exactly as the last one did.
//! At a tick, departures are applied first, then arrivals queued, then one
//! pass runs if anything is pending. Deterministic: no wall clock, no
//! randomness (the seed only drives [`workload::synthetic`]).
//!
//! Shares of a GPU (openb's `gpu_milli` < 1000) are replayed as shares: a
//! GPU hosting shares is not free for whole-GPU work until its last share
//! leaves, and a share is billed as its part of the GPU.
//!
//! Not modelled yet: CPU and memory, preemption (no workload job is
//! preemptible), multi-task gangs (history replays a gang's tasks as
//! independent jobs).

mod fgd;
pub mod history;
pub mod inflation;
pub mod market;
pub mod openb;
pub mod report;
pub mod whatif;
pub mod workload;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use crate::config::{SchedulerConfig, TenantState};
use crate::domain::{Constraints, Generation, GpuUnit, JobInput, Outcome, Policy};
use crate::fleet::{GpuInput, NodeInput, lowest_bits};
use crate::live::{LiveFleet, LiveRun};
use crate::pass::schedule;
use crate::queue::FairShare;
pub use report::{PolicyReport, SIZE_CLASSES, Sample, WaitStats};
pub use workload::{SimJob, SimNode, Workload, WorkloadNotes};

/// Who decides placements in a simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimPolicy {
    /// The production scheduler with this placement policy.
    Scheduler(Policy),
    /// Baseline (simulator only): jobs in arrival order, each on the first
    /// node in list order with enough free GPUs.
    BaselineFirstFit,
    /// Baseline (simulator only): jobs in arrival order, each on the node
    /// left with the fewest free GPUs after placing it.
    BaselineBestFit,
    /// Baseline (simulator only): FGD (Weng et al., ATC'23) as the paper
    /// describes it; see [`fgd`].
    BaselineFgd,
}

impl SimPolicy {
    /// Every policy a default run compares.
    pub const ALL: [SimPolicy; 7] = [
        SimPolicy::Scheduler(Policy::Cost),
        SimPolicy::Scheduler(Policy::Pack),
        SimPolicy::Scheduler(Policy::Spread),
        SimPolicy::Scheduler(Policy::FirstFit),
        SimPolicy::BaselineFirstFit,
        SimPolicy::BaselineBestFit,
        SimPolicy::BaselineFgd,
    ];

    /// The name on the command line and in reports.
    pub fn label(self) -> &'static str {
        match self {
            SimPolicy::Scheduler(Policy::Cost) => "cost",
            SimPolicy::Scheduler(Policy::Pack) => "pack",
            SimPolicy::Scheduler(Policy::Spread) => "spread",
            SimPolicy::Scheduler(Policy::FirstFit) => "first-fit",
            SimPolicy::BaselineFirstFit => "baseline-first-fit",
            SimPolicy::BaselineBestFit => "baseline-best-fit",
            SimPolicy::BaselineFgd => "baseline-fgd",
        }
    }

    /// A simulator baseline rather than the gpufleet scheduler.
    pub fn is_baseline(self) -> bool {
        !matches!(self, SimPolicy::Scheduler(_))
    }

    pub fn parse(name: &str) -> Option<SimPolicy> {
        SimPolicy::ALL
            .into_iter()
            .find(|p| p.label().eq_ignore_ascii_case(name.trim()))
    }
}

/// How the simulation runs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Scheduling tick grid, virtual seconds (at least 1).
    pub cadence_secs: u64,
    /// The controller's default.
    pub fair_share_half_life_secs: f64,
    /// Market signals: at most one snapshot per this many virtual seconds
    /// (the live controller records one a minute).
    pub market_interval_secs: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            cadence_secs: 1,
            fair_share_half_life_secs: 24.0 * 3600.0,
            market_interval_secs: 60,
        }
    }
}

/// A placement that is running.
#[derive(Debug, Clone, Copy)]
struct Run {
    node: u32,
    mask: u32,
    /// 0: whole GPUs; else its share of the one GPU in `mask`.
    milli: u32,
}

/// Simulates one policy over the workload (jobs must be sorted by arrival).
pub fn simulate(workload: &Workload, policy: SimPolicy, config: &SimConfig) -> PolicyReport {
    Engine::new(workload, policy, config).run()
}

/// Simulates each policy over the same workload, in the order given.
pub fn simulate_all(
    workload: &Workload,
    policies: &[SimPolicy],
    config: &SimConfig,
) -> Vec<PolicyReport> {
    policies
        .iter()
        .map(|&p| simulate(workload, p, config))
        .collect()
}

struct Engine<'a> {
    workload: &'a Workload,
    policy: SimPolicy,
    config: &'a SimConfig,
    scheduler_config: SchedulerConfig,
    /// The scheduler's fleet, kept as jobs start and leave (scheduler
    /// policies only).
    live: Option<LiveFleet>,
    node_index: HashMap<&'a str, u32>,
    /// Free GPU positions per node (a GPU hosting shares is not free).
    free: Vec<u32>,
    /// Kept with `free` (see [`Engine::set_free`]), so that a sample
    /// after a tick does not walk every node: GPUs in all, GPUs free, and
    /// per model (index into `models`) how many nodes have k GPUs free.
    total_gpus: u32,
    free_gpus: u32,
    models: Vec<&'a str>,
    node_model: Vec<u16>,
    free_hist: Vec<[u32; 33]>,
    /// Per node, per GPU position: thousandths held by shares.
    shares: Vec<[u32; 32]>,
    running: HashMap<usize, Run>,
    /// Thousandths of GPUs held per tenant and generation (no zero entries).
    allocated: HashMap<String, HashMap<Generation, u64>>,
    /// Thousandths of GPUs held per tenant (no zero entries).
    tenant_milli: HashMap<String, u64>,
    departures: BinaryHeap<Reverse<(u64, usize)>>,
    /// Job indexes in arrival order.
    pending: Vec<usize>,
    /// What the scheduler is told of each pending job (same order as
    /// `pending`; scheduler policies only): built once at arrival.
    pending_inputs: Vec<JobInput>,
    starts: Vec<Option<u64>>,
    /// Per job: (node index, GPU position mask) where it started.
    placements: Vec<Option<(u32, u32)>>,
    fair: FairShare,
    cost_micro_usd: u64,
    passes: u64,
    /// The FGD placer, for [`SimPolicy::BaselineFgd`] only.
    fgd: Option<fgd::Fgd>,
    /// Market signals, for gpufleet's policies only.
    market: Option<market::MarketRecorder>,
}

impl<'a> Engine<'a> {
    fn new(workload: &'a Workload, policy: SimPolicy, config: &'a SimConfig) -> Self {
        let node_inputs: Vec<NodeInput> = workload.nodes.iter().map(node_input).collect();
        let mut models: Vec<&str> = Vec::new();
        let node_model: Vec<u16> = workload
            .nodes
            .iter()
            .map(|n| match models.iter().position(|m| *m == n.model) {
                Some(i) => i as u16,
                None => {
                    models.push(&n.model);
                    (models.len() - 1) as u16
                }
            })
            .collect();
        let mut free_hist = vec![[0u32; 33]; models.len()];
        for (n, &m) in workload.nodes.iter().zip(&node_model) {
            free_hist[m as usize][full_mask(n.gpus).count_ones() as usize] += 1;
        }
        // Simulated nodes have no MIG GPUs, which is all a live fleet refuses.
        let live = match policy {
            SimPolicy::Scheduler(_) => LiveFleet::new(&node_inputs).ok(),
            _ => None,
        };
        Engine {
            workload,
            policy,
            config,
            scheduler_config: SchedulerConfig {
                default_policy: match policy {
                    SimPolicy::Scheduler(p) => p,
                    _ => Policy::Cost,
                },
                ..Default::default()
            },
            live,
            node_index: workload
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.id.as_str(), i as u32))
                .collect(),
            free: workload.nodes.iter().map(|n| full_mask(n.gpus)).collect(),
            total_gpus: workload.nodes.iter().map(|n| n.gpus).sum(),
            free_gpus: workload
                .nodes
                .iter()
                .map(|n| full_mask(n.gpus).count_ones())
                .sum(),
            models,
            node_model,
            free_hist,
            shares: vec![[0; 32]; workload.nodes.len()],
            running: HashMap::new(),
            allocated: HashMap::new(),
            tenant_milli: HashMap::new(),
            departures: BinaryHeap::new(),
            pending: Vec::new(),
            pending_inputs: Vec::new(),
            starts: vec![None; workload.jobs.len()],
            placements: vec![None; workload.jobs.len()],
            fair: FairShare::new(config.fair_share_half_life_secs),
            cost_micro_usd: 0,
            passes: 0,
            fgd: (policy == SimPolicy::BaselineFgd).then(|| fgd::Fgd::new(workload)),
            market: matches!(policy, SimPolicy::Scheduler(_))
                .then(|| market::MarketRecorder::new(config.market_interval_secs)),
        }
    }

    fn run(mut self) -> PolicyReport {
        let jobs = &self.workload.jobs;
        let cadence = self.config.cadence_secs.max(1);
        let mut next_arrival = 0;
        let mut series = Vec::new();
        loop {
            let arrival = jobs.get(next_arrival).map(|j| j.arrival);
            let departure = self.departures.peek().map(|Reverse((end, _))| *end);
            let Some(event) = [arrival, departure].into_iter().flatten().min() else {
                break;
            };
            let tick = event.div_ceil(cadence) * cadence;
            self.advance_fair_share(tick);
            while let Some(&Reverse((end, job))) = self.departures.peek() {
                if end > tick {
                    break;
                }
                self.departures.pop();
                if let Some(run) = self.running.remove(&job) {
                    self.release(run);
                    self.forget(job, run);
                }
            }
            while next_arrival < jobs.len() && jobs[next_arrival].arrival <= tick {
                self.pending.push(next_arrival);
                if self.live.is_some() {
                    self.pending_inputs
                        .push(job_input(&jobs[next_arrival], next_arrival));
                }
                next_arrival += 1;
            }
            if !self.pending.is_empty() {
                self.passes += 1;
                match self.policy {
                    SimPolicy::Scheduler(_) => self.scheduler_pass(tick),
                    SimPolicy::BaselineFirstFit
                    | SimPolicy::BaselineBestFit
                    | SimPolicy::BaselineFgd => self.baseline_pass(tick),
                }
            }
            series.push(self.sample(tick));
        }
        let mut report = PolicyReport::new(
            self.policy,
            jobs,
            &self.workload.nodes,
            self.starts,
            series,
            self.passes,
            self.cost_micro_usd,
        );
        report.placements = self.placements;
        if let Some(market) = self.market {
            report.market = market.finish(report.end_time);
        }
        report
    }

    fn sample(&self, time: u64) -> Sample {
        Sample {
            time,
            allocated_gpus: self.total_gpus - self.free_gpus,
            stranded_gpus: self.stranded_gpus(),
            pending_jobs: self.pending.len() as u32,
        }
    }

    /// Free GPUs that no pending job can use: a free GPU on node N is
    /// stranded when at least one job is pending and no pending job both
    /// allows N's model and asks for no more GPUs than N has free. With
    /// nothing pending, free GPUs are idle, not stranded (0).
    fn stranded_gpus(&self) -> u32 {
        if self.pending.is_empty() {
            return 0;
        }
        // Smallest request any pending job could put on each model.
        let mut any_model = u32::MAX;
        let mut need = vec![u32::MAX; self.models.len()];
        for &i in &self.pending {
            let job = &self.workload.jobs[i];
            if job.models.is_empty() {
                any_model = any_model.min(job.gpus);
            } else {
                for model in &job.models {
                    if let Some(m) = self.models.iter().position(|x| x == model) {
                        need[m] = need[m].min(job.gpus);
                    }
                }
            }
        }
        need.iter()
            .zip(&self.free_hist)
            .map(|(&need, hist)| {
                let need = need.min(any_model).min(33) as usize;
                (1..need).map(|k| k as u32 * hist[k]).sum::<u32>()
            })
            .sum()
    }

    /// Sets a node's free GPUs, keeping the counts beside them.
    fn set_free(&mut self, node: u32, mask: u32) {
        let n = node as usize;
        let (before, after) = (self.free[n].count_ones(), mask.count_ones());
        let hist = &mut self.free_hist[self.node_model[n] as usize];
        hist[before as usize] -= 1;
        hist[after as usize] += 1;
        self.free_gpus = self.free_gpus + after - before;
        self.free[n] = mask;
    }

    /// Decays and accrues tenants' usage as the controller's market minute does.
    fn advance_fair_share(&mut self, now: u64) {
        let running: HashMap<String, f64> = self
            .tenant_milli
            .iter()
            .map(|(t, &milli)| (t.clone(), milli as f64 / 1000.0))
            .collect();
        self.fair.advance(now, &running);
    }

    /// Records a started job in the running index and tenants' holdings.
    fn remember(&mut self, job: usize, run: Run) {
        let node = &self.workload.nodes[run.node as usize];
        let spec = &self.workload.jobs[job];
        let milli = held_milli(run);
        *self
            .allocated
            .entry(spec.tenant.clone())
            .or_default()
            .entry(node.generation)
            .or_insert(0) += milli;
        *self.tenant_milli.entry(spec.tenant.clone()).or_insert(0) += milli;
        let Some(live) = &mut self.live else {
            return;
        };
        // Keyed by job index: a fresh build would list running work in
        // job order.
        live.start(
            job as u64,
            &LiveRun {
                job_id: spec.id.clone(),
                priority: spec.priority,
                node_id: node.id.clone(),
                gpu_uuids: positions(run.mask).map(|p| gpu_uuid(&node.id, p)).collect(),
                share_milli: run.milli,
                memory_bytes: 0,
                expected_end: None,
            },
        );
    }

    /// Undoes [`Engine::remember`] for a job that left.
    fn forget(&mut self, job: usize, run: Run) {
        let generation = self.workload.nodes[run.node as usize].generation;
        let tenant = &self.workload.jobs[job].tenant;
        let milli = held_milli(run);
        if let Some(per_gen) = self.allocated.get_mut(tenant) {
            if let Some(held) = per_gen.get_mut(&generation) {
                *held = held.saturating_sub(milli);
                if *held == 0 {
                    per_gen.remove(&generation);
                }
            }
            if per_gen.is_empty() {
                self.allocated.remove(tenant);
            }
        }
        if let Some(held) = self.tenant_milli.get_mut(tenant) {
            *held = held.saturating_sub(milli);
            if *held == 0 {
                self.tenant_milli.remove(tenant);
            }
        }
        if let Some(live) = &mut self.live {
            live.depart(job as u64);
        }
    }

    /// Returns a run's GPUs: a shared GPU once its last share leaves.
    fn release(&mut self, run: Run) {
        if run.milli == 0 {
            self.set_free(run.node, self.free[run.node as usize] | run.mask);
            return;
        }
        let pos = run.mask.trailing_zeros() as usize;
        let held = &mut self.shares[run.node as usize][pos.min(31)];
        *held = held.saturating_sub(run.milli);
        if *held == 0 {
            self.set_free(run.node, self.free[run.node as usize] | run.mask);
        }
    }

    fn start(&mut self, job: usize, node: u32, mask: u32, milli: u32, now: u64) {
        let spec = &self.workload.jobs[job];
        let price = self.workload.nodes[node as usize].price_per_gpu_hour_micro_usd;
        self.set_free(node, self.free[node as usize] & !mask);
        if milli > 0 {
            let pos = (mask.trailing_zeros() as usize).min(31);
            self.shares[node as usize][pos] += milli;
        }
        let run = Run { node, mask, milli };
        self.running.insert(job, run);
        self.remember(job, run);
        self.departures
            .push(Reverse((now.saturating_add(spec.duration), job)));
        self.starts[job] = Some(now);
        self.placements[job] = Some((node, mask));
        // Thousandths of GPU-seconds: a share is billed as its part.
        let milli_held = if milli > 0 {
            u128::from(milli)
        } else {
            u128::from(mask.count_ones()) * 1000
        };
        let gpu_secs = milli_held * u128::from(spec.duration);
        let cost = gpu_secs * u128::from(price) / 3600 / 1000;
        self.cost_micro_usd = self
            .cost_micro_usd
            .saturating_add(u64::try_from(cost).unwrap_or(u64::MAX));
    }

    /// One production pass: fleet and queue built as the controller builds
    /// them, decisions applied.
    fn scheduler_pass(&mut self, now: u64) {
        // Running work in job order, so the fleet (and so every tie-break)
        // is the same each run.
        let Some(live) = &mut self.live else {
            return;
        };
        let fleet = live.pass_fleet();
        let tenants = TenantState {
            usage: self.fair.usage().clone(),
            allocated: self.allocated.clone(),
        };
        let result = schedule(
            fleet,
            &self.pending_inputs,
            &self.scheduler_config,
            &tenants,
            now,
        );
        // The market as the pass left it: its placements charged, the jobs
        // it could not place still waiting.
        if let Some(market) = &mut self.market
            && market.due(now)
        {
            let waiting: Vec<JobInput> = self
                .pending_inputs
                .iter()
                .zip(&result.outcomes)
                .filter(|(_, outcome)| !matches!(outcome, Outcome::Placed(_)))
                .map(|(input, _)| input.clone())
                .collect();
            market.observe(now, fleet, &waiting);
        }
        let mut still_pending = Vec::with_capacity(self.pending.len());
        let mut still_inputs = Vec::with_capacity(self.pending.len());
        let pending = std::mem::take(&mut self.pending);
        let inputs = std::mem::take(&mut self.pending_inputs);
        for ((&job, input), outcome) in pending.iter().zip(inputs).zip(&result.outcomes) {
            let placed = match outcome {
                Outcome::Placed(tasks) => tasks.first().and_then(|task| {
                    let node = *self.node_index.get(task.node_id.as_str())?;
                    let mask = task
                        .gpu_uuids
                        .iter()
                        .filter_map(|u| uuid_position(u))
                        .fold(0u32, |m, p| m | (1 << p));
                    Some((node, mask, task.share_milli))
                }),
                // No job is preemptible, so the scheduler never asks to evict.
                Outcome::Preempting { .. } | Outcome::Pending(_) => None,
            };
            match placed {
                Some((node, mask, milli)) => self.start(job, node, mask, milli, now),
                None => {
                    still_pending.push(job);
                    still_inputs.push(input);
                }
            }
        }
        self.pending = still_pending;
        self.pending_inputs = still_inputs;
    }

    /// One baseline pass: pending jobs in arrival order, each placed on the
    /// first (or best-fitting) node with enough free GPUs of an allowed
    /// model; a job that does not fit waits without blocking later ones.
    fn baseline_pass(&mut self, now: u64) {
        let best_fit = self.policy == SimPolicy::BaselineBestFit;
        let pending = std::mem::take(&mut self.pending);
        let mut still_pending = Vec::with_capacity(pending.len());
        // Free capacity only shrinks within a pass: a request shape that
        // failed once fails again.
        let mut failed: HashSet<(u32, u32, &[String])> = HashSet::new();
        for job in pending {
            let spec = &self.workload.jobs[job];
            let shape = (spec.gpus, spec.gpu_milli, spec.models.as_slice());
            if failed.contains(&shape) {
                still_pending.push(job);
                continue;
            }
            if let Some(fgd) = &mut self.fgd {
                match fgd.place(spec, &self.workload.nodes, &self.free, &self.shares) {
                    Some((node, mask)) => self.start(job, node, mask, spec.gpu_milli, now),
                    None => {
                        failed.insert(shape);
                        still_pending.push(job);
                    }
                }
                continue;
            }
            if spec.gpu_milli > 0 {
                match self.baseline_share(spec, best_fit) {
                    Some((node, pos)) => self.start(job, node, 1 << pos, spec.gpu_milli, now),
                    None => {
                        failed.insert(shape);
                        still_pending.push(job);
                    }
                }
                continue;
            }
            let mut chosen: Option<(u32, u32)> = None; // (node, free after)
            for (i, node) in self.workload.nodes.iter().enumerate() {
                let free = self.free[i].count_ones();
                if free < spec.gpus || !allows(spec, node) {
                    continue;
                }
                let left = free - spec.gpus;
                if chosen.is_none_or(|(_, best)| left < best) {
                    chosen = Some((i as u32, left));
                }
                if !best_fit || left == 0 {
                    break;
                }
            }
            match chosen {
                Some((node, _)) => {
                    let mask = lowest_bits(self.free[node as usize], spec.gpus);
                    self.start(job, node, mask, 0, now);
                }
                None => {
                    failed.insert(shape);
                    still_pending.push(job);
                }
            }
        }
        self.pending = still_pending;
    }
}

impl Engine<'_> {
    /// The baselines' GPU for a share: the first GPU (node order, then
    /// position) already shared with room or free, or the one left with
    /// the least share after placing it.
    fn baseline_share(&self, spec: &SimJob, best_fit: bool) -> Option<(u32, u32)> {
        let mut chosen: Option<(u32, u32, u32)> = None; // (node, pos, left)
        for (i, node) in self.workload.nodes.iter().enumerate() {
            if !allows(spec, node) {
                continue;
            }
            for pos in 0..node.gpus.min(32) {
                let held = self.shares[i][pos as usize];
                let fits = if held > 0 {
                    held + spec.gpu_milli <= 1000
                } else {
                    self.free[i] & (1 << pos) != 0
                };
                if !fits {
                    continue;
                }
                let left = 1000 - held - spec.gpu_milli;
                if chosen.is_none_or(|(_, _, best)| left < best) {
                    chosen = Some((i as u32, pos, left));
                }
                if !best_fit || left == 0 {
                    return chosen.map(|(n, p, _)| (n, p));
                }
            }
        }
        chosen.map(|(n, p, _)| (n, p))
    }
}

/// Thousandths of GPUs a run holds (a share its part).
fn held_milli(run: Run) -> u64 {
    if run.milli > 0 {
        u64::from(run.milli)
    } else {
        u64::from(run.mask.count_ones()) * 1000
    }
}

fn allows(job: &SimJob, node: &SimNode) -> bool {
    job.models.is_empty()
        || job
            .models
            .iter()
            .any(|m| m.eq_ignore_ascii_case(&node.model))
}

fn full_mask(gpus: u32) -> u32 {
    if gpus >= 32 {
        u32::MAX
    } else {
        (1u32 << gpus) - 1
    }
}

fn positions(mask: u32) -> impl Iterator<Item = u32> {
    (0..32).filter(move |p| mask & (1 << p) != 0)
}

/// `node/pos`: the position is recoverable from the UUID the scheduler returns.
fn gpu_uuid(node: &str, pos: u32) -> String {
    format!("{node}/{pos}")
}

fn uuid_position(uuid: &str) -> Option<u32> {
    uuid.rsplit_once('/')?.1.parse().ok()
}

fn node_input(node: &SimNode) -> NodeInput {
    NodeInput {
        id: node.id.clone(),
        provider: node.provider.clone(),
        region: node.region.clone(),
        price_per_gpu_hour_micro_usd: node.price_per_gpu_hour_micro_usd,
        spot: false,
        schedulable: true,
        gpus: (0..node.gpus.min(32))
            .map(|p| GpuInput {
                uuid: gpu_uuid(&node.id, p),
                model: node.model.clone(),
                generation: node.generation,
                memory_bytes: 0,
                compute_capability: (0, 0),
                healthy: true,
                ..Default::default()
            })
            .collect(),
        nvlink_groups: Vec::new(),
        ..Default::default()
    }
}

fn job_input(job: &SimJob, index: usize) -> JobInput {
    JobInput {
        id: job.id.clone(),
        tenant: job.tenant.clone(),
        priority: job.priority,
        preemptible: false,
        // Arrival first, then workload order: ties stay deterministic.
        submitted_at: job.arrival.saturating_mul(1_000_000_000) + index as u64 % 1_000_000_000,
        tasks: 1,
        gpus_per_task: if job.gpu_milli > 0 { 1 } else { job.gpus },
        unit: if job.gpu_milli > 0 {
            GpuUnit::Share {
                milli: job.gpu_milli,
                memory_bytes: 0,
            }
        } else {
            GpuUnit::Whole
        },
        constraints: Constraints {
            models: job.models.clone(),
            ..Default::default()
        },
        policy: None,
        max_runtime_secs: None,
        not_before: None,
    }
}
