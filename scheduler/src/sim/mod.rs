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
//! `cadence_secs`. At a tick, departures are applied first, then arrivals
//! queued, then one pass runs if anything is pending.
//!
//! What the controller does, the engine does at virtual time:
//! - Gangs ([`SimJob::tasks`] > 1): the scheduler places every task or
//!   none; all tasks start together, are billed on their own nodes, and
//!   leave together.
//! - Preemption: when a pass answers [`Outcome::Preempting`], each victim
//!   is stopped at that tick (every task; the controller's agents stop them
//!   and the job is requeued without backoff, same submit time, as
//!   `lifecycle::requeue` does), billed for the time it ran (lost work,
//!   counted in [`PolicyReport::preemptions`] and
//!   [`PolicyReport::preempted_gpu_secs`]) and queued again; it runs its
//!   whole duration again when placed. The preemptor places in a later
//!   pass. The stop is immediate here; the controller waits for the
//!   agents (seconds).
//! - Max runtime ([`SimJob::max_runtime`]): the scheduler is told it
//!   (`JobInput::max_runtime_secs`) and the running work's expected end is
//!   start + max runtime (`LiveRun::expected_end`), as the controller tells
//!   it, so reservations and backfill see real ends; a job still running at
//!   start + max runtime is stopped then and fails (no retry policy is
//!   modelled), counted in [`PolicyReport::max_runtime_stops`].
//! - Quotas, weights and generation factors: [`SimConfig::scheduler`], the
//!   controller's `[tenants.*]` settings.
//! - Prices that move ([`SimConfig::price_steps`], see [`prices`]): the
//!   scheduler sees each node's price in force at every pass; runs are
//!   billed per price segment.
//!
//! Which ticks run a pass: a tick runs when something changed since the
//! previous one — an arrival, a departure (a job's end or its max runtime),
//! a price change while jobs wait, or victims stopped by a preemption (the next tick on the grid runs, as
//! their requeue asks the controller for a pass). A tick where nothing
//! changed is skipped: nothing the pass reads is different. Free GPUs,
//! running work, holdings against quotas, and the queue are unchanged; no
//! job has a backoff (no retry policy is modelled, a preempted job requeues
//! without one); expected ends are fixed once work starts, so `now`
//! advancing only makes backfill into a reservation harder for a job that
//! already failed it; and a pass that asked for evictions is always
//! followed by a tick. The one input that drifts is fair share: decayed
//! usage can reorder tenants within a priority level, which can move a
//! level's one reservation; the skipped ticks ignore that drift (the next
//! event's pass sees it).
//! Deterministic: no wall clock, no randomness (the seed only drives
//! [`workload::synthetic`]).
//!
//! Shares of a GPU (openb's `gpu_milli` < 1000) are replayed as shares: a
//! GPU hosting shares is not free for whole-GPU work until its last share
//! leaves, and a share is billed as its part of the GPU.
//!
//! The baselines place gangs all-or-nothing too (task by task, first or
//! best fit) and stop jobs at their max runtime, but ignore priorities,
//! preemption and quotas: they are placement baselines.
//!
//! Not modelled yet: CPU and memory, retry policies (a job stopped at its
//! max runtime fails), node failures and spot interruptions.

mod baseline;
mod fgd;
pub mod history;
pub mod inflation;
pub mod market;
pub mod openb;
pub mod prices;
pub mod report;
pub mod tenants;
pub mod whatif;
pub mod workload;

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};

use crate::config::{SchedulerConfig, TenantState};
use crate::domain::{Constraints, GpuUnit, JobInput, Outcome, Policy};
use crate::fleet::{GpuInput, NodeInput};
use crate::live::{LiveFleet, LiveRun};
use crate::pass::schedule;
use crate::queue::FairShare;
pub use prices::PriceStep;
pub use report::{PolicyReport, SIZE_CLASSES, Sample, WaitStats};
pub use workload::{SimJob, SimNode, SyntheticMix, Workload, WorkloadNotes};

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
    /// The scheduler's configuration as the controller would pass it:
    /// tenants' weights and quotas, generation factors, reservation and
    /// preemption limits. Its `default_policy` is replaced by each
    /// simulated policy.
    pub scheduler: SchedulerConfig,
    /// Nodes' prices changing during the replay (any order; empty: each
    /// node keeps its own price).
    pub price_steps: Vec<PriceStep>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            cadence_secs: 1,
            fair_share_half_life_secs: 24.0 * 3600.0,
            market_interval_secs: 60,
            scheduler: SchedulerConfig::default(),
            price_steps: Vec::new(),
        }
    }
}

/// [`Engine::ends`] of a job that is not running.
const NOT_RUNNING: u64 = u64::MAX;

/// One task's placement.
#[derive(Debug, Clone, Copy)]
struct Run {
    node: u32,
    mask: u32,
    /// 0: whole GPUs; else its share of the one GPU in `mask`.
    milli: u32,
}

/// A job that is running: its tasks' placements and when it started (when
/// it leaves is in [`Engine::ends`]).
#[derive(Debug, Clone)]
struct Running {
    first: Run,
    /// A gang's other tasks (empty for one task: no allocation).
    more: Vec<Run>,
    start: u64,
}

impl Running {
    fn runs(&self) -> impl Iterator<Item = Run> + '_ {
        std::iter::once(self.first).chain(self.more.iter().copied())
    }
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
    running: HashMap<usize, Running>,
    /// Thousandths of GPUs held per tenant and generation (no zero entries).
    /// What the scheduler is told of tenants: holdings kept here as work
    /// starts and leaves, fair-share usage copied in before each pass.
    tenants: TenantState,
    /// Thousandths of GPUs held per tenant (no zero entries).
    tenant_milli: HashMap<String, u64>,
    /// (end, job): a job whose running end differs was stopped before it.
    departures: BinaryHeap<Reverse<(u64, usize)>>,
    /// Job indexes in arrival order.
    pending: Vec<usize>,
    /// What the scheduler is told of each pending job (same order as
    /// `pending`; scheduler policies only): built once at arrival.
    pending_inputs: Vec<JobInput>,
    /// A tick at or after this time must run (victims were stopped).
    wake: Option<u64>,
    /// Per job: when its run ends ([`NOT_RUNNING`]: none), so that a
    /// departure entry of a run stopped earlier is told apart cheaply.
    ends: Vec<u64>,
    starts: Vec<Option<u64>>,
    /// Per job: (node index, GPU position mask) where it started (a gang:
    /// its first task).
    placements: Vec<Option<(u32, u32)>>,
    fair: FairShare,
    cost_micro_usd: u64,
    /// Thousandths of GPU-seconds run (billed), all attempts.
    gpu_milli_secs: u128,
    preemptions: u64,
    preempted_milli_secs: u128,
    max_runtime_stops: u64,
    passes: u64,
    /// The FGD placer, for [`SimPolicy::BaselineFgd`] only.
    fgd: Option<fgd::Fgd>,
    /// Market signals, for gpufleet's policies only.
    market: Option<market::MarketRecorder>,
    /// Each node's price now.
    prices: Vec<u64>,
    /// The price changes in time order, and the next one due.
    price_steps: Vec<PriceStep>,
    next_price_step: usize,
    /// Per node whose price moved: (from, price) in time order, from 0.
    price_timelines: HashMap<u32, Vec<(u64, u64)>>,
    /// The scheduler's nodes, kept to rebuild its fleet when a price
    /// moves (empty when none does).
    node_inputs: Vec<NodeInput>,
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
        let mut price_steps = config.price_steps.clone();
        price_steps.sort_by_key(|s| (s.at, s.node));
        Engine {
            prices: workload
                .nodes
                .iter()
                .map(|n| n.price_per_gpu_hour_micro_usd)
                .collect(),
            next_price_step: 0,
            price_timelines: HashMap::new(),
            node_inputs: if price_steps.is_empty() {
                Vec::new()
            } else {
                node_inputs
            },
            price_steps,
            workload,
            policy,
            config,
            scheduler_config: SchedulerConfig {
                default_policy: match policy {
                    SimPolicy::Scheduler(p) => p,
                    _ => Policy::Cost,
                },
                ..config.scheduler.clone()
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
            tenants: TenantState::default(),
            tenant_milli: HashMap::new(),
            departures: BinaryHeap::new(),
            pending: Vec::new(),
            pending_inputs: Vec::new(),
            wake: None,
            starts: vec![None; workload.jobs.len()],
            ends: vec![NOT_RUNNING; workload.jobs.len()],
            placements: vec![None; workload.jobs.len()],
            fair: FairShare::new(config.fair_share_half_life_secs),
            cost_micro_usd: 0,
            gpu_milli_secs: 0,
            preemptions: 0,
            preempted_milli_secs: 0,
            max_runtime_stops: 0,
            passes: 0,
            fgd: (policy == SimPolicy::BaselineFgd).then(|| fgd::Fgd::new(workload)),
            market: matches!(policy, SimPolicy::Scheduler(_))
                .then(|| market::MarketRecorder::new(config.market_interval_secs)),
        }
    }

    /// The next departure still due (entries of jobs stopped earlier, by a
    /// preemption, are dropped).
    fn next_departure(&mut self) -> Option<u64> {
        while let Some(&Reverse((end, job))) = self.departures.peek() {
            if self.ends[job] == end {
                return Some(end);
            }
            self.departures.pop();
        }
        None
    }

    fn run(mut self) -> PolicyReport {
        let jobs = &self.workload.jobs;
        let cadence = self.config.cadence_secs.max(1);
        let mut next_arrival = 0;
        let mut series = Vec::new();
        loop {
            let arrival = jobs.get(next_arrival).map(|j| j.arrival);
            let departure = self.next_departure();
            // A price change is applied from its own time whenever the next
            // tick runs; it needs a tick of its own only while jobs wait
            // (a pass may place them elsewhere now).
            let price = self.next_price_step().filter(|_| !self.pending.is_empty());
            let Some(event) = [arrival, departure, self.wake, price]
                .into_iter()
                .flatten()
                .min()
            else {
                break;
            };
            let tick = event.div_ceil(cadence).saturating_mul(cadence);
            if self.wake.is_some_and(|w| w <= tick) {
                self.wake = None;
            }
            self.advance_fair_share(tick);
            self.apply_prices(tick);
            while let Some(end) = self.next_departure() {
                if end > tick {
                    break;
                }
                if let Some(Reverse((_, job))) = self.departures.pop() {
                    let spec = &jobs[job];
                    if spec.max_runtime.is_some_and(|max| max < spec.duration) {
                        self.max_runtime_stops += 1;
                    }
                    self.stop(job, end);
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
        report.gpu_hours = self.gpu_milli_secs as f64 / 1000.0 / 3600.0;
        report.preemptions = self.preemptions;
        report.preempted_gpu_secs = self.preempted_milli_secs as f64 / 1000.0;
        report.max_runtime_stops = self.max_runtime_stops;
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
    /// allows N's model and asks for no more GPUs than N has free (per
    /// task, for a gang). With nothing pending, free GPUs are idle, not
    /// stranded (0).
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

    /// Records a started job's tasks in tenants' holdings and the live fleet.
    fn remember(&mut self, job: usize, first: Run, more: &[Run], now: u64) {
        let spec = &self.workload.jobs[job];
        for &run in std::iter::once(&first).chain(more) {
            let node = &self.workload.nodes[run.node as usize];
            let milli = held_milli(run);
            *self
                .tenants
                .allocated
                .entry(spec.tenant.clone())
                .or_default()
                .entry(node.generation)
                .or_insert(0) += milli;
            *self.tenant_milli.entry(spec.tenant.clone()).or_insert(0) += milli;
        }
        if self.live.is_none() {
            return;
        }
        // Keyed by job index: a fresh build would list running work in
        // job order. One task (the common case) without a list.
        if more.is_empty() {
            let task = self.live_run(job, first, now);
            if let Some(live) = &mut self.live {
                live.start(job as u64, &task);
            }
            return;
        }
        let tasks = self.live_runs(job, std::iter::once(first).chain(more.iter().copied()), now);
        if let Some(live) = &mut self.live {
            live.start_tasks(job as u64, &tasks);
        }
    }

    /// A job's tasks as the scheduler is told of running work.
    fn live_runs(&self, job: usize, runs: impl Iterator<Item = Run>, start: u64) -> Vec<LiveRun> {
        runs.map(|run| self.live_run(job, run, start)).collect()
    }

    /// One task as the scheduler is told of running work.
    fn live_run(&self, job: usize, run: Run, start: u64) -> LiveRun {
        let spec = &self.workload.jobs[job];
        let node = &self.workload.nodes[run.node as usize];
        LiveRun {
            // The job's index: victims are named by it.
            job_id: job.to_string(),
            priority: spec.priority,
            node_id: node.id.clone(),
            gpu_uuids: positions(run.mask).map(|p| gpu_uuid(&node.id, p)).collect(),
            share_milli: run.milli,
            memory_bytes: 0,
            // As the controller tells the scheduler of running work: its
            // end is start + max runtime when it has one.
            expected_end: spec.max_runtime.map(|max| start.saturating_add(max)),
            preemptible: spec.preemptible,
        }
    }

    /// Undoes [`Engine::remember`] for one task of a job that left.
    fn forget(&mut self, job: usize, run: Run) {
        let generation = self.workload.nodes[run.node as usize].generation;
        let tenant = &self.workload.jobs[job].tenant;
        let milli = held_milli(run);
        if let Some(per_gen) = self.tenants.allocated.get_mut(tenant) {
            if let Some(held) = per_gen.get_mut(&generation) {
                *held = held.saturating_sub(milli);
                if *held == 0 {
                    per_gen.remove(&generation);
                }
            }
            if per_gen.is_empty() {
                self.tenants.allocated.remove(tenant);
            }
        }
        if let Some(held) = self.tenant_milli.get_mut(tenant) {
            *held = held.saturating_sub(milli);
            if *held == 0 {
                self.tenant_milli.remove(tenant);
            }
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

    /// Takes a run's GPUs (what [`Engine::release`] gives back).
    fn take(&mut self, run: Run) {
        self.set_free(run.node, self.free[run.node as usize] & !run.mask);
        if run.milli > 0 {
            let pos = (run.mask.trailing_zeros() as usize).min(31);
            self.shares[run.node as usize][pos] += run.milli;
        }
    }

    /// Starts every task of a job at once: `first`, and a gang's others.
    fn start(&mut self, job: usize, first: Run, more: Vec<Run>, now: u64) {
        let spec = &self.workload.jobs[job];
        self.take(first);
        for &run in &more {
            self.take(run);
        }
        self.remember(job, first, &more, now);
        let ran = spec
            .max_runtime
            .map_or(spec.duration, |max| spec.duration.min(max));
        let end = now.saturating_add(ran);
        self.departures.push(Reverse((end, job)));
        self.ends[job] = end;
        self.starts[job] = Some(now);
        self.placements[job] = Some((first.node, first.mask));
        self.running.insert(
            job,
            Running {
                first,
                more,
                start: now,
            },
        );
    }

    /// Stops a running job at `at` (its end, max runtime, or preemption):
    /// frees every task and bills each for the time it ran on its node.
    /// Returns the thousandths of GPU-seconds it ran.
    fn stop(&mut self, job: usize, at: u64) -> u128 {
        let Some(running) = self.running.remove(&job) else {
            return 0;
        };
        self.ends[job] = NOT_RUNNING;
        let ran = u128::from(at.saturating_sub(running.start));
        let mut milli_secs = 0u128;
        for run in running.runs() {
            self.release(run);
            self.forget(job, run);
            // Thousandths of GPU-seconds: a share is billed as its part, at
            // the prices in force while it ran.
            let held = u128::from(held_milli(run)) * ran;
            let cost = self.bill(run, running.start, at);
            self.cost_micro_usd = self
                .cost_micro_usd
                .saturating_add(u64::try_from(cost).unwrap_or(u64::MAX));
            milli_secs += held;
        }
        self.gpu_milli_secs += milli_secs;
        if let Some(live) = &mut self.live {
            live.depart(job as u64);
        }
        milli_secs
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
        // Values in place: the same few tenants every pass.
        let usage = self.fair.usage();
        self.tenants
            .usage
            .retain(|tenant, _| usage.contains_key(tenant));
        for (tenant, &value) in usage {
            match self.tenants.usage.get_mut(tenant) {
                Some(held) => *held = value,
                None => {
                    self.tenants.usage.insert(tenant.clone(), value);
                }
            }
        }
        let result = schedule(
            fleet,
            &self.pending_inputs,
            &self.scheduler_config,
            &self.tenants,
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
        let mut pending = std::mem::take(&mut self.pending);
        let mut inputs = std::mem::take(&mut self.pending_inputs);
        // Jobs that stay queued; the queue is compacted only if any left it.
        let mut stays = Vec::with_capacity(pending.len());
        // As the controller: victims of every preemption this pass, once.
        let mut victims: BTreeSet<usize> = BTreeSet::new();
        for (&job, outcome) in pending.iter().zip(&result.outcomes) {
            let run_of = |task: &crate::domain::TaskPlacement| {
                let node = *self.node_index.get(task.node_id.as_str())?;
                let mask = task
                    .gpu_uuids
                    .iter()
                    .filter_map(|u| uuid_position(u))
                    .fold(0u32, |m, p| m | (1 << p));
                Some(Run {
                    node,
                    mask,
                    milli: task.share_milli,
                })
            };
            let placed = match outcome {
                // One task (the common case) without a list.
                Outcome::Placed(tasks) => match tasks.split_first() {
                    Some((first, [])) => run_of(first).map(|run| (run, Vec::new())),
                    Some((first, more)) => run_of(first).zip(more.iter().map(run_of).collect()),
                    None => None,
                },
                Outcome::Preempting { victims: named } => {
                    victims.extend(named.iter().filter_map(|v| v.parse::<usize>().ok()));
                    None
                }
                Outcome::Pending(_) => None,
            };
            stays.push(placed.is_none());
            if let Some((first, more)) = placed {
                self.start(job, first, more, now);
            }
        }
        if stays.contains(&false) {
            let mut keep = stays.iter();
            pending.retain(|_| keep.next().copied().unwrap_or(true));
            let mut keep = stays.iter();
            inputs.retain(|_| keep.next().copied().unwrap_or(true));
        }
        self.pending = pending;
        self.pending_inputs = inputs;
        for victim in victims {
            self.preempt(victim, now);
        }
    }

    /// Stops a victim of a preemption and queues it again, as the
    /// controller's requeue does: no backoff, its submit time kept, its
    /// run so far lost.
    fn preempt(&mut self, job: usize, now: u64) {
        if !self.running.contains_key(&job) {
            return;
        }
        let lost = self.stop(job, now);
        self.preemptions += 1;
        self.preempted_milli_secs += lost;
        self.starts[job] = None;
        self.placements[job] = None;
        // Pending stays in arrival (= index) order.
        let at = self.pending.partition_point(|&j| j < job);
        self.pending.insert(at, job);
        if self.live.is_some() {
            self.pending_inputs
                .insert(at, job_input(&self.workload.jobs[job], job));
        }
        // The freed room and the requeued job are for the next pass.
        self.wake = Some(now.saturating_add(1));
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
        preemptible: job.preemptible,
        // Arrival first, then workload order: ties stay deterministic.
        submitted_at: job.arrival.saturating_mul(1_000_000_000) + index as u64 % 1_000_000_000,
        tasks: job.tasks.max(1),
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
        max_runtime_secs: job.max_runtime,
        not_before: None,
    }
}
