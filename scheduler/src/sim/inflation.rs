//! Inflation mode: the experiment of Weng et al., "Beware of Fragmentation"
//! (USENIX ATC 2023). Tasks are drawn at random, with replacement, from the
//! workload until the GPUs they ask for reach a multiple of the fleet's
//! capacity (130 % by default, as in the paper); they arrive one at a time
//! in draw order and never leave. A task that fits nowhere when it arrives
//! fails and is not retried. As the arrived demand passes each step (50 %,
//! 55 %, … of capacity), the report records the GPU capacity still
//! unallocated and the fleet's fragmentation (the paper's `F(M)` against
//! the workload's task mix, see [`super::fgd`]).
//!
//! Deterministic for a seed: the draw uses the workload's own [`Rng`], and
//! every placer is deterministic.
//!
//! gpufleet's policies run the production scheduler ([`crate::schedule`])
//! as the replay does: one single-job pass per arriving task on a fleet
//! built, as the controller builds it, from the nodes and every earlier
//! placement (so no reservation outlives its pass); the baselines use the
//! simulator's placers.

use crate::sim::workload::{Rng, SimJob, Workload};
use crate::sim::{Engine, SimConfig, SimPolicy, fgd, job_input};

/// Most tasks one draw makes: a workload of tiny shares cannot make the
/// draw unbounded (openb to 1,000 % of capacity is about 72,000 tasks).
pub const MAX_TASKS: usize = 2_000_000;

/// How an inflation run draws and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflationConfig {
    pub seed: u64,
    /// Tasks are drawn until their GPUs reach this percentage of capacity.
    pub max_demand_pct: u32,
    /// First reported step, percent of capacity.
    pub first_step_pct: u32,
    /// Distance between reported steps, percent of capacity (at least 1).
    pub step_pct: u32,
}

impl Default for InflationConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            max_demand_pct: 130,
            first_step_pct: 50,
            step_pct: 5,
        }
    }
}

impl InflationConfig {
    /// The reported steps, percent of capacity, ascending.
    pub fn steps(&self) -> Vec<u32> {
        let step = self.step_pct.max(1) as usize;
        (self.first_step_pct..=self.max_demand_pct)
            .step_by(step)
            .collect()
    }
}

/// The fleet when arrived demand first reached a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InflationPoint {
    /// The step, percent of capacity.
    pub demand_pct: u32,
    /// Tasks arrived so far (placed or failed).
    pub arrived_tasks: u64,
    /// GPUs asked for by arrived tasks, thousandths.
    pub arrived_milli: u64,
    /// GPUs allocated, thousandths (a share counts as its part).
    pub allocated_milli: u64,
    pub failed_tasks: u64,
    /// Capacity minus allocation, GPUs.
    pub unallocated_gpus: f64,
    /// Unallocated capacity, percent of capacity.
    pub unallocated_pct: f64,
    /// The paper's expected fragmentation `F(M)` summed over nodes, GPUs:
    /// free capacity the workload's typical task could not use.
    pub fragmented_gpus: f64,
}

/// One policy's inflation run.
#[derive(Debug, Clone, PartialEq)]
pub struct InflationReport {
    pub policy: SimPolicy,
    pub capacity_gpus: u64,
    /// Tasks drawn.
    pub tasks: u64,
    pub placed: u64,
    /// One per [`InflationConfig::steps`] that the draw reached.
    pub points: Vec<InflationPoint>,
}

impl InflationReport {
    /// Mean unallocated GPUs over the steps in `from..=to` percent, or
    /// `None` when the run has none there.
    pub fn mean_unallocated(&self, from: u32, to: u32) -> Option<f64> {
        let values: Vec<f64> = self
            .points
            .iter()
            .filter(|p| (from..=to).contains(&p.demand_pct))
            .map(|p| p.unallocated_gpus)
            .collect();
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    }
}

/// GPUs a task asks for, thousandths.
fn demand_milli(job: &SimJob) -> u64 {
    let per_task = if job.gpu_milli > 0 {
        u64::from(job.gpu_milli.min(1000))
    } else {
        u64::from(job.gpus) * 1000
    };
    // A gang asks for all its tasks at once.
    per_task * u64::from(job.tasks.max(1))
}

/// The tasks of an inflation run: drawn with replacement from `workload`
/// until their demand reaches `max_demand_pct` of capacity (or
/// [`MAX_TASKS`] were drawn), in draw order,
/// arrival = position, never leaving. Empty when the workload has no jobs
/// or no GPUs.
pub fn sample_tasks(workload: &Workload, config: &InflationConfig) -> Vec<SimJob> {
    let capacity_milli = workload.total_gpus() * 1000;
    let target = capacity_milli * u64::from(config.max_demand_pct) / 100;
    let mut rng = Rng::new(config.seed);
    let mut tasks = Vec::new();
    let mut demand = 0;
    if workload.jobs.is_empty() || capacity_milli == 0 {
        return tasks;
    }
    while demand < target && tasks.len() < MAX_TASKS {
        let from = &workload.jobs[rng.below(workload.jobs.len() as u64) as usize];
        demand += demand_milli(from).max(1);
        let i = tasks.len() as u64;
        tasks.push(SimJob {
            id: format!("{}#{i}", from.id),
            arrival: i,
            // Never leaves: the run ends before any departure is applied;
            // nothing evicts it nor stops it at a max runtime.
            duration: u64::MAX / 4,
            preemptible: false,
            max_runtime: None,
            ..from.clone()
        });
    }
    tasks
}

/// Runs one policy's inflation experiment.
pub fn inflate(
    workload: &Workload,
    policy: SimPolicy,
    config: &InflationConfig,
) -> InflationReport {
    let tasks = sample_tasks(workload, config);
    inflate_tasks(workload, tasks, policy, config)
}

/// Every policy over the same drawn tasks.
pub fn inflate_all(
    workload: &Workload,
    policies: &[SimPolicy],
    config: &InflationConfig,
) -> Vec<InflationReport> {
    let tasks = sample_tasks(workload, config);
    policies
        .iter()
        .map(|&p| inflate_tasks(workload, tasks.clone(), p, config))
        .collect()
}

/// One policy over tasks already drawn by [`sample_tasks`] (so that several
/// policies can share one draw).
pub fn inflate_tasks(
    workload: &Workload,
    tasks: Vec<SimJob>,
    policy: SimPolicy,
    config: &InflationConfig,
) -> InflationReport {
    let capacity_gpus = workload.total_gpus();
    let capacity_milli = capacity_gpus * 1000;
    let drawn = Workload {
        nodes: workload.nodes.clone(),
        jobs: tasks,
        notes: workload.notes.clone(),
    };
    let sim_config = SimConfig::default();
    let mut engine = Engine::new(&drawn, policy, &sim_config);
    // FGD's task mix, and the fragmentation measure, come from the
    // workload the tasks were drawn from (the paper's "target workload").
    let mut measure = fgd::Fgd::new(workload);
    if engine.fgd.is_some() {
        engine.fgd = Some(fgd::Fgd::new(workload));
    }
    // gpufleet's policies: one pass per task on a fleet built as the
    // controller builds it, from the nodes and everything placed so far.
    let is_scheduler = matches!(policy, SimPolicy::Scheduler(_));
    let steps = config.steps();
    let mut next_step = 0;
    let mut points = Vec::with_capacity(steps.len());
    let (mut arrived, mut allocated, mut failed, mut placed) = (0u64, 0u64, 0u64, 0u64);
    for (i, task) in drawn.jobs.iter().enumerate() {
        let now = i as u64;
        let demand = demand_milli(task);
        arrived += demand;
        engine.pending.push(i);
        if is_scheduler {
            engine.pending_inputs.push(job_input(task, i));
            engine.scheduler_pass(now);
        } else {
            engine.baseline_pass(now);
        }
        // A task that did not fit fails; it is not retried.
        let ok = engine.pending.is_empty();
        engine.pending.clear();
        engine.pending_inputs.clear();
        if ok {
            allocated += demand;
            placed += 1;
        } else {
            failed += 1;
        }
        while next_step < steps.len()
            && arrived * 100 >= capacity_milli * u64::from(steps[next_step])
        {
            let unallocated_milli = capacity_milli.saturating_sub(allocated);
            points.push(InflationPoint {
                demand_pct: steps[next_step],
                arrived_tasks: i as u64 + 1,
                arrived_milli: arrived,
                allocated_milli: allocated,
                failed_tasks: failed,
                unallocated_gpus: unallocated_milli as f64 / 1000.0,
                unallocated_pct: 100.0 * unallocated_milli as f64 / capacity_milli.max(1) as f64,
                fragmented_gpus: measure.fleet_fragmentation(
                    &drawn.nodes,
                    &engine.free,
                    &engine.shares,
                ),
            });
            next_step += 1;
        }
    }
    InflationReport {
        policy,
        capacity_gpus,
        tasks: drawn.jobs.len() as u64,
        placed,
        points,
    }
}

/// `beats[a][b]`: by how many percent policy `a` leaves fewer unallocated
/// GPUs than policy `b` on average over the steps in `from..=to` percent
/// (negative: more). `None` where either run has no step there or `b`
/// left nothing unallocated.
pub fn beats(reports: &[InflationReport], from: u32, to: u32) -> Vec<Vec<Option<f64>>> {
    let means: Vec<Option<f64>> = reports
        .iter()
        .map(|r| r.mean_unallocated(from, to))
        .collect();
    means
        .iter()
        .map(|a| {
            means
                .iter()
                .map(|b| match (a, b) {
                    (Some(a), Some(b)) if *b > 0.0 => Some(100.0 * (b - a) / b),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Generation, Policy};
    use crate::sim::workload::SimNode;

    fn workload() -> Workload {
        let nodes = (0..6)
            .map(|i| SimNode {
                id: format!("n{i}"),
                model: if i % 2 == 0 { "T4" } else { "A10" }.into(),
                generation: Generation::Turing,
                gpus: if i < 3 { 2 } else { 8 },
                price_per_gpu_hour_micro_usd: 1_000_000 + i,
                region: "r".into(),
                provider: "sim".into(),
            })
            .collect();
        let shapes: [(u32, u32, &[&str]); 6] = [
            (1, 500, &[]),
            (1, 300, &[]),
            (1, 0, &[]),
            (2, 0, &[]),
            (4, 0, &["A10"]),
            (1, 700, &["T4"]),
        ];
        let jobs = shapes
            .iter()
            .enumerate()
            .map(|(i, &(gpus, milli, models))| SimJob {
                id: format!("j{i}"),
                tenant: "t".into(),
                priority: 0,
                arrival: i as u64,
                duration: 10,
                gpus,
                gpu_milli: milli,
                models: models.iter().map(|m| m.to_string()).collect(),
                ..Default::default()
            })
            .collect();
        Workload {
            nodes,
            jobs,
            ..Default::default()
        }
    }

    #[test]
    fn the_draw_is_deterministic_for_a_seed_and_reaches_the_target() {
        let w = workload();
        let config = InflationConfig::default();
        let a = sample_tasks(&w, &config);
        assert_eq!(a, sample_tasks(&w, &config));
        let other = sample_tasks(&w, &InflationConfig { seed: 7, ..config });
        assert_ne!(a, other, "another seed draws other tasks");
        let demand: u64 = a.iter().map(demand_milli).sum();
        let target = w.total_gpus() * 1000 * 130 / 100;
        assert!(demand >= target);
        let last = a.last().map(demand_milli).unwrap_or(0);
        assert!(demand - last < target, "the draw stops at the target");
        assert!(a.iter().enumerate().all(|(i, t)| t.arrival == i as u64));
    }

    #[test]
    fn every_policy_is_deterministic_steps_are_monotone_and_nothing_leaves() {
        let w = workload();
        let config = InflationConfig::default();
        for policy in SimPolicy::ALL {
            let r = inflate(&w, policy, &config);
            assert_eq!(r, inflate(&w, policy, &config), "{}", policy.label());
            assert_eq!(
                r.points.iter().map(|p| p.demand_pct).collect::<Vec<_>>(),
                config.steps()
            );
            for pair in r.points.windows(2) {
                let (a, b) = (pair[0], pair[1]);
                assert!(b.arrived_milli >= a.arrived_milli);
                assert!(b.arrived_tasks >= a.arrived_tasks);
                // No departures: allocation never shrinks.
                assert!(b.allocated_milli >= a.allocated_milli, "{}", policy.label());
                assert!(b.unallocated_gpus <= a.unallocated_gpus);
            }
            for p in &r.points {
                assert!(p.arrived_milli * 100 >= r.capacity_gpus * 1000 * u64::from(p.demand_pct));
                assert!(p.allocated_milli <= p.arrived_milli);
                assert!(p.allocated_milli <= r.capacity_gpus * 1000);
                assert!(p.fragmented_gpus <= p.unallocated_gpus + 1e-9);
            }
            assert_eq!(
                r.placed + r.points.last().map_or(0, |p| p.failed_tasks),
                r.tasks
            );
        }
    }

    #[test]
    fn below_capacity_everything_fits_on_an_empty_compatible_fleet() {
        // Only 1-GPU tasks, no model constraints: every policy places every
        // task until the fleet is full, so unallocated = capacity − arrived.
        let mut w = workload();
        w.jobs.retain(|j| j.gpus == 1 && j.gpu_milli == 0);
        let config = InflationConfig {
            max_demand_pct: 100,
            ..Default::default()
        };
        for policy in [
            SimPolicy::Scheduler(Policy::Pack),
            SimPolicy::BaselineFirstFit,
            SimPolicy::BaselineFgd,
        ] {
            let r = inflate(&w, policy, &config);
            for p in &r.points {
                assert_eq!(p.failed_tasks, 0, "{}", policy.label());
                assert_eq!(p.allocated_milli, p.arrived_milli);
            }
            assert_eq!(r.points.last().map(|p| p.unallocated_gpus), Some(0.0));
        }
    }

    #[test]
    fn beats_is_the_relative_difference_of_mean_unallocated() {
        let point = |pct, gpus| InflationPoint {
            demand_pct: pct,
            arrived_tasks: 0,
            arrived_milli: 0,
            allocated_milli: 0,
            failed_tasks: 0,
            unallocated_gpus: gpus,
            unallocated_pct: 0.0,
            fragmented_gpus: 0.0,
        };
        let report = |policy, a, b| InflationReport {
            policy,
            capacity_gpus: 100,
            tasks: 0,
            placed: 0,
            points: vec![point(80, 50.0), point(90, a), point(100, b)],
        };
        let reports = [
            report(SimPolicy::BaselineFgd, 10.0, 4.0),
            report(SimPolicy::BaselineBestFit, 10.0, 10.0),
        ];
        let m = beats(&reports, 90, 100);
        // FGD: mean 7, best-fit: mean 10 → FGD leaves 30 % fewer.
        assert_eq!(m[0][1].map(|v| (v * 1000.0).round()), Some(30_000.0));
        assert_eq!(m[1][0].map(|v| (v * 1000.0).round()), Some(-42_857.0));
        assert_eq!(m[0][0], Some(0.0));
    }
}
