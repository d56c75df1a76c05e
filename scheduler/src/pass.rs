//! One scheduling pass: the queue walked level by level, one decision per
//! job (place, preempt for, or say why it waits).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};

use crate::compiled::Compiled;
use crate::config::{SchedulerConfig, TenantState};
use crate::domain::{Constraints, Generation, GpuUnit, JobInput, Outcome, PassResult, Policy};
use crate::eligible::Eligible;
use crate::fleet::{Fleet, NEVER};
use crate::place::{Prefs, place_job};
use crate::preempt::{preempt, preempt_share, preemption_possible};
use crate::queue;
use crate::reason::PendingReason;
use crate::reserve::{fits_when_idle, reserve, reserved_capacity_would_fit};
use crate::units;
use crate::verdict::{Verdict, Verdicts};

/// Runs one scheduling pass. `fleet` is updated with every placement, so the
/// caller may inspect it afterwards (e.g. to explain pending jobs).
pub fn schedule(
    fleet: &mut Fleet,
    jobs: &[JobInput],
    config: &SchedulerConfig,
    tenants: &TenantState,
    now: u64,
) -> PassResult {
    let mut ctx = PassCtx {
        config,
        now,
        result: PassResult {
            outcomes: vec![Outcome::Pending(PendingReason::WaitingForScheduler); jobs.len()],
            ..Default::default()
        },
        allocated: tenants
            .allocated
            .iter()
            .map(|(t, per_gen)| (t.as_str(), per_gen.clone()))
            .collect(),
        reservations: 0,
        preemptions: 0,
        level_reserved: false,
        failed: HashMap::default(),
        verdicts: Verdicts::default(),
        eligible: Eligible::default(),
        // The smallest share anyone waits for: packing avoids leaving a GPU
        // with less than that (a sliver nothing in the queue could use).
        min_share: jobs
            .iter()
            .filter_map(|j| match j.unit {
                GpuUnit::Share { milli, .. } if milli > 0 => Some(milli),
                _ => None,
            })
            .min()
            .unwrap_or(0),
    };
    if fleet.slots.is_empty() {
        for outcome in &mut ctx.result.outcomes {
            *outcome = Outcome::Pending(PendingReason::NoNodes);
        }
        return ctx.result;
    }
    let share_now = |tenant: &str| -> f64 {
        let usage = tenants.usage.get(tenant).copied().unwrap_or(0.0);
        let running: f64 = tenants
            .allocated
            .get(tenant)
            .map(|per_gen| {
                per_gen
                    .iter()
                    .map(|(g, milli)| *milli as f64 / 1000.0 * config.factor(*g))
                    .sum()
            })
            .unwrap_or(0.0);
        usage + running
    };

    if config.measure_decisions {
        ctx.result.decision_nanos.reserve_exact(jobs.len());
    }
    for level in queue::levels(jobs) {
        let mut queue = queue::LevelQueue::of_level(level, share_now, |t| config.weight(t));
        ctx.level_reserved = false;
        // A benchmark's stopwatch only: no decision reads it. Each decision
        // is timed from the end of the one before (its queue step counts).
        let mut last = config.measure_decisions.then(std::time::Instant::now);
        while let Some((index, tenant_slot)) = queue.pop() {
            let (outcome, granted) = decide(fleet, &jobs[index], &mut ctx);
            if matches!(outcome, Outcome::Placed(_)) {
                ctx.result.placed += 1;
            }
            ctx.result.outcomes[index] = outcome;
            queue.done(tenant_slot, granted);
            if let Some(started) = last {
                let now = std::time::Instant::now();
                ctx.result
                    .decision_nanos
                    .push((index, (now - started).as_nanos() as u64));
                last = Some(now);
            }
        }
    }
    ctx.result.reservations = ctx.reservations;
    ctx.result
}

/// Mutable state of one pass.
struct PassCtx<'a> {
    config: &'a SchedulerConfig,
    now: u64,
    result: PassResult,
    /// Thousandths of GPUs held per tenant and generation, including this
    /// pass's placements.
    allocated: HashMap<&'a str, HashMap<Generation, u64>>,
    reservations: usize,
    preemptions: usize,
    /// The current priority level already had its reservation attempt.
    level_reserved: bool,
    /// Request shape → (earliest end that failed, reason).
    failed: HashMap<ShapeKey<'a>, (u64, PendingReason), foldhash::fast::RandomState>,
    /// Work already done for requests that resolve alike (skipped only
    /// where its answer cannot have changed).
    verdicts: Verdicts,
    /// Eligible classes by constraints.
    eligible: Eligible<'a>,
    /// The smallest share of the pass's queue, thousandths (0: none).
    min_share: u32,
}

/// Everything that decides whether a request fits: two jobs of one shape
/// get the same verdict from the same free capacity.
#[derive(PartialEq, Eq, Hash)]
struct RequestShape<'a> {
    constraints: &'a Constraints,
    tasks: u32,
    gpus_per_task: u32,
    unit: &'a GpuUnit,
    priority: i32,
    preemptible: bool,
    policy: Policy,
}

/// A request shape with its hash, computed once per decision: a failed
/// decision looks its shape up and inserts it, and the map rehashes as it
/// grows.
struct ShapeKey<'a> {
    hash: u64,
    shape: RequestShape<'a>,
}

impl<'a> ShapeKey<'a> {
    fn new(hasher: &impl BuildHasher, shape: RequestShape<'a>) -> Self {
        ShapeKey {
            hash: hasher.hash_one(&shape),
            shape,
        }
    }
}

impl PartialEq for ShapeKey<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.shape == other.shape
    }
}

impl Eq for ShapeKey<'_> {}

impl Hash for ShapeKey<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

fn request_shape(job: &JobInput, policy: Policy) -> RequestShape<'_> {
    RequestShape {
        constraints: &job.constraints,
        tasks: job.tasks.max(1),
        gpus_per_task: job.gpus_per_task,
        unit: &job.unit,
        priority: job.priority,
        preemptible: job.preemptible,
        policy,
    }
}

/// One decision: place, preempt for, or explain one job. Returns the outcome
/// and the normalised GPUs granted (for fair share).
fn decide<'a>(fleet: &mut Fleet, job: &'a JobInput, ctx: &mut PassCtx<'a>) -> (Outcome, f64) {
    let config = ctx.config;
    let now = ctx.now;
    if job.not_before.is_some_and(|t| t > now) {
        return (Outcome::Pending(PendingReason::Backoff), 0.0);
    }
    let quota = config.tenants.get(&job.tenant);
    let policy = job.policy.unwrap_or(config.default_policy);
    let end = job
        .max_runtime_secs
        .map_or(NEVER, |r| now.saturating_add(r));
    // Requests of the same shape that already failed this pass fail again
    // (capacity only shrinks within a pass). The head of a level is always
    // evaluated in full so that it can get its reservation.
    // The naive baseline keeps no such memory.
    let shape = (quota.is_none() && policy != Policy::FirstFit)
        .then(|| ShapeKey::new(ctx.failed.hasher(), request_shape(job, policy)));
    if ctx.level_reserved
        && let Some(key) = &shape
        && let Some(&(failed_end, reason)) = ctx.failed.get(key)
        && end >= failed_end
    {
        return (Outcome::Pending(reason), 0.0);
    }
    let compiled = Compiled::new(fleet, job);
    // Quotas count thousandths of GPUs: shares count as what they hold.
    let whole = job.unit == GpuUnit::Whole;
    let total_milli = job.tasks.max(1) as u64 * job.unit.requested_milli(job.gpus_per_task);
    // Read only under a quota.
    let held = quota.and_then(|_| ctx.allocated.get(job.tenant.as_str()));
    if let Some(max) = quota.and_then(|q| q.max_gpus) {
        let now_held: u64 = held.map_or(0, |h| h.values().sum());
        if now_held + total_milli > max as u64 * 1000 {
            return (Outcome::Pending(PendingReason::QuotaExceeded), 0.0);
        }
    }
    // Classes the job may use, honouring per-generation quotas.
    let mut over_quota = false;
    let classes: Vec<u32> = match quota {
        None => ctx.eligible.classes(fleet, &job.constraints, &compiled),
        Some(_) => fleet
            .classes_by_price
            .iter()
            .copied()
            // By ascending price: none past the job's cap qualifies.
            .take_while(|&c| fleet.classes[c as usize].price <= compiled.max_price)
            .filter(|&c| {
                let class = &fleet.classes[c as usize];
                if !compiled.class_ok(class) {
                    return false;
                }
                let generation = fleet.models[class.model as usize].generation;
                let within = match quota.and_then(|q| q.max_gpus_per_generation.get(&generation)) {
                    Some(max) => {
                        held.and_then(|h| h.get(&generation)).copied().unwrap_or(0) + total_milli
                            <= *max as u64 * 1000
                    }
                    None => true,
                };
                over_quota |= !within;
                within
            })
            .collect(),
    };
    if classes.is_empty() && over_quota {
        return (Outcome::Pending(PendingReason::QuotaExceeded), 0.0);
    }
    let verdict: Option<Verdict> = shape.as_ref().and_then(|_| {
        ctx.verdicts
            .lookup(job, &compiled, &classes, policy, fleet.classes.len())
    });
    // A request that resolves like one that failed with an earlier end
    // fails again (verdict.rs).
    let known_to_fail = verdict.is_some_and(|v| v.failed_end.is_some_and(|e| end >= e));
    if !known_to_fail
        && let Some(placements) = place_job(
            fleet,
            job,
            &compiled,
            &classes,
            policy,
            end,
            Prefs {
                discount: config.preferred_region_discount,
                min_share: ctx.min_share,
            },
        )
    {
        let granted: f64 = placements
            .iter()
            .map(|p| p.milli_gpus() as f64 / 1000.0 * config.factor(p.generation))
            .sum();
        let per_gen = ctx.allocated.entry(job.tenant.as_str()).or_default();
        for p in &placements {
            *per_gen.entry(p.generation).or_insert(0) += p.milli_gpus();
        }
        return (Outcome::Placed(placements), granted);
    }
    let ever = match verdict.and_then(|v| v.fits_when_idle) {
        Some(ever) => ever,
        None if whole => fits_when_idle(fleet, job, &compiled, &classes),
        None => units::fits_when_idle(fleet, job, &compiled, &classes),
    };
    let reserved_considered = whole && ever && !classes.is_empty();
    let reserved_fits = reserved_considered
        && !verdict.is_some_and(|v| v.reserved_would_not_fit)
        && reserved_capacity_would_fit(fleet, job, &compiled, &classes);
    let mut reason = if classes.is_empty() || !ever {
        PendingReason::NoFeasibleNodes
    } else if reserved_fits {
        PendingReason::ReservedForHigherPriority
    } else {
        PendingReason::InsufficientFreeGpus
    };
    if let Some(known) = verdict {
        ctx.verdicts.store(Verdict {
            failed_end: Some(known.failed_end.map_or(end, |e| e.min(end))),
            fits_when_idle: Some(ever),
            reserved_would_not_fit: known.reserved_would_not_fit
                || (reserved_considered && !reserved_fits),
        });
    }
    // Whole-GPU jobs and one-task shares may preempt (a whole-GPU job
    // evicts every share of a GPU together); MIG jobs and share gangs wait
    // for room, and fractions never reserve (docs/gpus.md).
    let share = matches!(job.unit, GpuUnit::Share { .. }) && job.tasks <= 1;
    if ever
        && (whole || share)
        && !job.preemptible
        && ctx.preemptions < config.max_preemptions
        && preemption_possible(fleet, job, &classes)
        && let Some(victims) = if whole {
            preempt(fleet, job, &compiled, &classes, now)
        } else {
            preempt_share(fleet, job, &classes, now)
        }
    {
        ctx.preemptions += 1;
        return (Outcome::Preempting { victims }, 0.0);
    }
    if ever && whole && !ctx.level_reserved && ctx.reservations < config.max_reservations {
        // One attempt per level: the head job's.
        ctx.level_reserved = true;
        if reserve(fleet, job, &compiled, &classes, now) {
            ctx.reservations += 1;
            if reason == PendingReason::ReservedForHigherPriority {
                reason = PendingReason::InsufficientFreeGpus;
            }
        }
    }
    if let Some(key) = shape {
        // Free capacity only shrinks within a pass: the same request with
        // the same or a later end fails again.
        let entry = ctx.failed.entry(key).or_insert((end, reason));
        if end < entry.0 {
            *entry = (end, reason);
        }
    }
    (Outcome::Pending(reason), 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{GpuInput, NodeInput, RunningInput};
    use crate::{Generation, TenantPolicy};

    fn node(id: &str, region: &str, price: u64, gpus: u32) -> NodeInput {
        NodeInput {
            id: id.into(),
            provider: "aws".into(),
            region: region.into(),
            price_per_gpu_hour_micro_usd: price,
            spot: false,
            schedulable: true,
            gpus: (0..gpus)
                .map(|g| GpuInput {
                    uuid: format!("GPU-{id}-{g}"),
                    model: "H100-SXM-80GB".into(),
                    generation: Generation::Hopper,
                    memory_bytes: 80 << 30,
                    compute_capability: (9, 0),
                    healthy: true,
                    ..Default::default()
                })
                .collect(),
            nvlink_groups: Vec::new(),
            ..Default::default()
        }
    }

    fn job(id: &str, gpus: u32, policy: Policy) -> JobInput {
        JobInput {
            id: id.into(),
            tenant: "t".into(),
            tasks: 1,
            gpus_per_task: gpus,
            policy: Some(policy),
            ..Default::default()
        }
    }

    fn placed_node(outcome: &Outcome) -> String {
        match outcome {
            Outcome::Placed(tasks) => tasks[0].node_id.clone(),
            other => panic!("not placed: {other:?}"),
        }
    }

    fn run(
        nodes: &[NodeInput],
        running: &[RunningInput],
        jobs: &[JobInput],
        config: &SchedulerConfig,
        tenants: &TenantState,
    ) -> PassResult {
        let mut fleet = Fleet::build(nodes, running);
        schedule(&mut fleet, jobs, config, tenants, 1000)
    }

    fn running_on(node: &str, gpus: u32, tenant: &str) -> RunningInput {
        RunningInput {
            job_id: format!("run-{node}"),
            tenant: tenant.into(),
            node_id: node.into(),
            gpu_uuids: (0..gpus).map(|g| format!("GPU-{node}-{g}")).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn policies_choose_as_documented() {
        // a: 8 GPUs, 6 busy (2 free); b: 8 free; same price.
        let nodes = [node("a", "r1", 1_000_000, 8), node("b", "r1", 1_000_000, 8)];
        let busy = [running_on("a", 6, "x")];
        let config = SchedulerConfig::default();
        let pack = run(
            &nodes,
            &busy,
            &[job("j", 1, Policy::Pack)],
            &config,
            &TenantState::default(),
        );
        assert_eq!(
            placed_node(&pack.outcomes[0]),
            "a",
            "pack fills the partly used node"
        );
        let spread = run(
            &nodes,
            &busy,
            &[job("j", 1, Policy::Spread)],
            &config,
            &TenantState::default(),
        );
        assert_eq!(
            placed_node(&spread.outcomes[0]),
            "b",
            "spread takes the emptiest"
        );
        // Cost: cheaper wins over fuller.
        let nodes = [node("a", "r1", 2_000_000, 8), node("b", "r1", 1_000_000, 8)];
        let cost = run(
            &nodes,
            &busy,
            &[job("j", 1, Policy::Cost)],
            &config,
            &TenantState::default(),
        );
        assert_eq!(placed_node(&cost.outcomes[0]), "b");
    }

    #[test]
    fn preferred_region_is_soft() {
        let nodes = [
            node("cheap", "r1", 1_000_000, 8),
            node("pref", "r2", 1_050_000, 8),
            node("dear", "r3", 2_000_000, 8),
        ];
        let mut j = job("j", 1, Policy::Cost);
        j.constraints.preferred_regions = vec!["r2".into()];
        let r = run(
            &nodes,
            &[],
            &[j.clone()],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        assert_eq!(
            placed_node(&r.outcomes[0]),
            "pref",
            "5 % dearer but preferred (10 % discount)"
        );
        j.constraints.preferred_regions = vec!["r3".into()];
        let r = run(
            &nodes,
            &[],
            &[j],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        assert_eq!(
            placed_node(&r.outcomes[0]),
            "cheap",
            "a preference never outweighs a 2x price"
        );
    }

    #[test]
    fn quotas_hold_jobs_back() {
        let nodes = [node("a", "r1", 1_000_000, 8)];
        let mut config = SchedulerConfig::default();
        config.tenants.insert(
            "t".into(),
            TenantPolicy {
                weight: 1.0,
                max_gpus: Some(4),
                max_gpus_per_generation: HashMap::from([(Generation::Hopper, 3)]),
            },
        );
        let jobs = [job("a", 2, Policy::Cost), job("b", 2, Policy::Cost)];
        let r = run(&nodes, &[], &jobs, &config, &TenantState::default());
        assert!(matches!(r.outcomes[0], Outcome::Placed(_)));
        // 2 held + 2 more would exceed the Hopper quota of 3 (within the 4 total).
        assert_eq!(
            r.outcomes[1],
            Outcome::Pending(PendingReason::QuotaExceeded)
        );
        if let Some(t) = config.tenants.get_mut("t") {
            t.max_gpus_per_generation.clear();
        }
        let tenants = TenantState {
            allocated: HashMap::from([(
                "t".to_string(),
                HashMap::from([(Generation::Hopper, 3000)]),
            )]),
            ..Default::default()
        };
        let r = run(&nodes, &[], &[job("c", 2, Policy::Cost)], &config, &tenants);
        assert_eq!(
            r.outcomes[0],
            Outcome::Pending(PendingReason::QuotaExceeded)
        );
    }

    #[test]
    fn a_node_without_links_does_not_serve_an_nvlink_request() {
        let pcie = node("pcie", "r1", 1, 4);
        let mut j = job("j", 2, Policy::Cost);
        j.constraints.require_nvlink = true;
        let r = run(
            std::slice::from_ref(&pcie),
            &[],
            &[j.clone()],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        assert!(
            matches!(r.outcomes[0], Outcome::Pending(_)),
            "{:?}",
            r.outcomes[0]
        );
        // One GPU needs no link; and without the requirement it fits.
        let mut one = job("one", 1, Policy::Cost);
        one.constraints.require_nvlink = true;
        j.constraints.require_nvlink = false;
        let r = run(
            &[pcie],
            &[],
            &[one, j],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        assert!(
            r.outcomes.iter().all(|o| matches!(o, Outcome::Placed(_))),
            "{:?}",
            r.outcomes
        );
    }

    #[test]
    fn nvlink_tasks_stay_inside_one_group() {
        let mut n = node("a", "r1", 1, 4);
        n.nvlink_groups = vec![vec![0, 1], vec![2, 3]];
        let busy = [RunningInput {
            job_id: "busy".into(),
            node_id: "a".into(),
            gpu_uuids: vec!["GPU-a-1".into()],
            ..Default::default()
        }];
        let mut j = job("j", 2, Policy::Cost);
        j.constraints.require_nvlink = true;
        let r = run(
            &[n.clone()],
            &busy,
            &[j.clone()],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        match &r.outcomes[0] {
            Outcome::Placed(tasks) => assert_eq!(tasks[0].gpu_uuids, vec!["GPU-a-2", "GPU-a-3"]),
            other => panic!("{other:?}"),
        }
        // Without the requirement the lowest free GPUs are taken.
        j.constraints.require_nvlink = false;
        let r = run(
            &[n],
            &busy,
            &[j],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        match &r.outcomes[0] {
            Outcome::Placed(tasks) => assert_eq!(tasks[0].gpu_uuids, vec!["GPU-a-0", "GPU-a-2"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backoff_and_no_nodes() {
        let mut j = job("j", 1, Policy::Cost);
        j.not_before = Some(5000);
        let r = run(
            &[node("a", "r1", 1, 1)],
            &[],
            &[j.clone()],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        assert_eq!(r.outcomes[0], Outcome::Pending(PendingReason::Backoff));
        let r = run(
            &[],
            &[],
            &[j],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        assert_eq!(r.outcomes[0], Outcome::Pending(PendingReason::NoNodes));
    }

    #[test]
    fn preemption_picks_the_cheapest_victims_and_spares_higher_priorities() {
        let nodes = [node("a", "r1", 1, 4), node("b", "r1", 1, 4)];
        let running = [
            RunningInput {
                priority: 5,
                preemptible: true,
                ..running_on("a", 4, "x")
            },
            RunningInput {
                job_id: "run-b".into(),
                priority: 1,
                preemptible: true,
                ..running_on("b", 2, "x")
            },
            RunningInput {
                job_id: "run-b2".into(),
                priority: 50,
                preemptible: true,
                node_id: "b".into(),
                gpu_uuids: vec!["GPU-b-2".into(), "GPU-b-3".into()],
                ..Default::default()
            },
        ];
        let mut urgent = job("urgent", 2, Policy::Cost);
        urgent.priority = 10;
        let r = run(
            &nodes,
            &running,
            &[urgent.clone()],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        assert_eq!(
            r.outcomes[0],
            Outcome::Preempting {
                victims: vec!["run-b".into()]
            },
            "2 GPUs of priority 1 beat 4 of priority 5"
        );
        urgent.preemptible = true;
        let r = run(
            &nodes,
            &running,
            &[urgent],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        assert!(
            matches!(r.outcomes[0], Outcome::Pending { .. }),
            "preemptible jobs never preempt"
        );
    }
}
