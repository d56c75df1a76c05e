//! Gangs, preemption, quotas and max runtimes in the simulator, each on a
//! small trace whose schedule is computed by hand in the test's comment.
//! Prices are micro-USD per GPU-hour; a task is billed
//! ⌊thousandths of GPUs × seconds × price / 3600 / 1000⌋ per run.

use std::collections::HashMap;

use gpufleet_scheduler::sim::{self, SimConfig, SimJob, SimNode, SimPolicy, Workload};
use gpufleet_scheduler::{Generation, Policy, SchedulerConfig, TenantPolicy};

fn node(id: &str, model: &str, generation: Generation, gpus: u32, price: u64) -> SimNode {
    SimNode {
        id: id.into(),
        model: model.into(),
        generation,
        gpus,
        price_per_gpu_hour_micro_usd: price,
        provider: "p".into(),
        region: "r".into(),
    }
}

fn a100(id: &str, gpus: u32) -> SimNode {
    node(id, "A100-SXM-80GB", Generation::Ampere, gpus, 1_000_000)
}

fn job(id: &str, arrival: u64, duration: u64, gpus: u32) -> SimJob {
    SimJob {
        id: id.into(),
        tenant: "t".into(),
        arrival,
        duration,
        gpus,
        ..Default::default()
    }
}

fn workload(nodes: Vec<SimNode>, jobs: Vec<SimJob>) -> Workload {
    let mut w = Workload {
        nodes,
        jobs,
        ..Default::default()
    };
    w.sort_jobs();
    w
}

fn starts(r: &sim::PolicyReport, w: &Workload) -> Vec<(String, Option<u64>)> {
    w.jobs
        .iter()
        .zip(&r.starts)
        .map(|(j, s)| (j.id.clone(), *s))
        .collect()
}

fn want(list: &[(&str, u64)]) -> Vec<(String, Option<u64>)> {
    list.iter()
        .map(|(id, t)| (id.to_string(), Some(*t)))
        .collect()
}

/// ⌊milli × secs × price / 3600 / 1000⌋: one task's bill.
fn bill(milli: u64, secs: u64, price: u64) -> u64 {
    milli * secs * price / 3600 / 1000
}

/// n0, n1: 4 A100 at $1; n2: 4 H100 at $3.
/// - t=0: gang g (2 tasks × 4 GPUs, 30 s) takes n0 and n1 (the $1 class
///   holds exactly its two tasks); h (4 GPUs, 20 s) takes n2.
/// - t=5: gang g2 (2 × 4, 10 s) fits nowhere.
/// - t=20: h leaves: n2 has room for one task of g2, not two: g2 waits,
///   nothing of it starts (8 GPUs stay allocated, g's).
/// - t=30: g leaves; g2 starts both tasks on n0 and n1 (cheapest), and
///   leaves at 40 with both.
#[test]
fn a_gang_starts_all_or_nothing_on_the_expected_nodes() {
    let mut g = job("g", 0, 30, 4);
    g.tasks = 2;
    let mut g2 = job("g2", 5, 10, 4);
    g2.tasks = 2;
    let w = workload(
        vec![
            a100("n0", 4),
            a100("n1", 4),
            node("n2", "H100-SXM-80GB", Generation::Hopper, 4, 3_000_000),
        ],
        vec![g, job("h", 0, 20, 4), g2],
    );
    for policy in [
        SimPolicy::Scheduler(Policy::Cost),
        SimPolicy::BaselineFirstFit,
        SimPolicy::BaselineBestFit,
    ] {
        let r = sim::simulate(&w, policy, &SimConfig::default());
        let label = policy.label();
        assert_eq!(
            starts(&r, &w),
            want(&[("g", 0), ("h", 0), ("g2", 30)]),
            "{label}"
        );
        // A gang's first task on n0 or n1 (indexes 0, 1), all four GPUs;
        // the bill below puts both tasks on the $1 nodes, one each.
        for gang in [0, 2] {
            let (node, mask) = r.placements[gang].expect("placed");
            assert!(node <= 1 && mask == 0b1111, "{label}: {node} {mask:b}");
        }
        let at = |t: u64| r.series.iter().find(|s| s.time == t).copied();
        assert_eq!(at(0).map(|s| s.allocated_gpus), Some(12), "{label}");
        assert_eq!(
            at(20).map(|s| s.allocated_gpus),
            Some(8),
            "{label}: no partial gang"
        );
        assert_eq!(at(30).map(|s| s.allocated_gpus), Some(8), "{label}");
        assert_eq!(
            at(40).map(|s| s.allocated_gpus),
            Some(0),
            "{label}: left together"
        );
        // Each task billed on its own node: g2's two on the $1 nodes.
        let cost = 2 * bill(4000, 30, 1_000_000)
            + bill(4000, 20, 3_000_000)
            + 2 * bill(4000, 10, 1_000_000);
        assert_eq!(r.cost_micro_usd, cost, "{label}");
        assert!((r.gpu_hours - (8.0 * 30.0 + 4.0 * 20.0 + 8.0 * 10.0) / 3600.0).abs() < 1e-9);
        // A gang of 2 × 4 is in the 8+ class.
        assert_eq!(r.waits_by_class[2].jobs, 2, "{label}");
    }
}

/// n0: 4 A100. b (4 GPUs, preemptible, priority 0, 100 s) starts at 0. u
/// (4 GPUs, priority 5, 20 s) arrives at 10: the pass evicts b. As the
/// controller: b is stopped at 10 (40 GPU-seconds lost, billed) and queued
/// again with no backoff; u starts in the next pass (t=11) and leaves at
/// 31; b starts again at 31 and runs its whole 100 s (to 131).
/// Not preemptible, b keeps n0 and u waits until 100.
#[test]
fn a_higher_priority_job_preempts_a_preemptible_one_which_is_requeued() {
    let mut b = job("b", 0, 100, 4);
    b.preemptible = true;
    let mut u = job("u", 10, 20, 4);
    u.priority = 5;
    let w = workload(vec![a100("n0", 4)], vec![b, u]);
    for policy in [Policy::Cost, Policy::Pack, Policy::Spread, Policy::FirstFit] {
        let r = sim::simulate(&w, SimPolicy::Scheduler(policy), &SimConfig::default());
        assert_eq!(starts(&r, &w), want(&[("b", 31), ("u", 11)]), "{policy:?}");
        assert_eq!(r.preemptions, 1);
        assert_eq!(r.preempted_gpu_secs, 40.0);
        assert_eq!(r.never_placed, 0);
        assert_eq!(r.end_time, 131);
        let cost =
            bill(4000, 10, 1_000_000) + bill(4000, 100, 1_000_000) + bill(4000, 20, 1_000_000);
        assert_eq!(r.cost_micro_usd, cost);
        assert!((r.gpu_hours - (40.0 + 400.0 + 80.0) / 3600.0).abs() < 1e-9);
        // Between the eviction and the restart, b waits in the queue.
        let s10 = r.series.iter().find(|s| s.time == 10).copied();
        assert_eq!(
            s10.map(|s| (s.allocated_gpus, s.pending_jobs)),
            Some((0, 2))
        );
    }
    let mut w = w;
    w.jobs[0].preemptible = false;
    let r = sim::simulate(
        &w,
        SimPolicy::Scheduler(Policy::Cost),
        &SimConfig::default(),
    );
    assert_eq!(starts(&r, &w), want(&[("b", 0), ("u", 100)]));
    assert_eq!((r.preemptions, r.preempted_gpu_secs), (0, 0.0));
    // The baselines do not preempt.
    let r = sim::simulate(&w, SimPolicy::BaselineFirstFit, &SimConfig::default());
    assert_eq!(r.preemptions, 0);
}

/// n0: 8 A100. Tenant a: a1 and a2 (3 GPUs each, 50 s) at 0; tenant b: b1
/// (2 GPUs, 10 s) at 1. With a quota of 4 GPUs for a (in all, or of
/// Ampere), a2 is held back until a1 leaves at 50 although 5 GPUs are
/// free; b1 is not held back (starts at 1). Without a quota a2 starts at 0.
#[test]
fn a_quota_holds_a_tenant_back() {
    let tenant = |mut j: SimJob, t: &str| {
        j.tenant = t.into();
        j
    };
    let w = workload(
        vec![a100("n0", 8)],
        vec![
            tenant(job("a1", 0, 50, 3), "a"),
            tenant(job("a2", 0, 50, 3), "a"),
            tenant(job("b1", 1, 10, 2), "b"),
        ],
    );
    let run = |quota: Option<TenantPolicy>| {
        let config = SimConfig {
            scheduler: SchedulerConfig {
                tenants: quota.into_iter().map(|q| ("a".to_string(), q)).collect(),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = sim::simulate(&w, SimPolicy::Scheduler(Policy::Cost), &config);
        starts(&r, &w)
    };
    assert_eq!(run(None), want(&[("a1", 0), ("a2", 0), ("b1", 1)]));
    let held = want(&[("a1", 0), ("a2", 50), ("b1", 1)]);
    let total = TenantPolicy {
        weight: 1.0,
        max_gpus: Some(4),
        ..Default::default()
    };
    assert_eq!(run(Some(total)), held);
    let ampere = TenantPolicy {
        weight: 1.0,
        max_gpus_per_generation: HashMap::from([(Generation::Ampere, 4)]),
        ..Default::default()
    };
    assert_eq!(run(Some(ampere)), held);
    // A quota on another generation does not hold a back.
    let hopper = TenantPolicy {
        weight: 1.0,
        max_gpus_per_generation: HashMap::from([(Generation::Hopper, 4)]),
        ..Default::default()
    };
    assert_eq!(run(Some(hopper)), want(&[("a1", 0), ("a2", 0), ("b1", 1)]));
}

/// n0: 8 A100.
/// - t=0: r (4 GPUs, 1000 s, max runtime 60) starts; the scheduler sees
///   its end at 60.
/// - t=5: big (8 GPUs, 10 s) does not fit: it reserves n0 from 60.
/// - t=6: s2 (4 GPUs, no max runtime) would fit but never ends: it may not
///   use the reserved node and waits.
/// - t=7: s1 (4 GPUs, 100 s, max runtime 40) ends by 47 ≤ 60: it backfills
///   n0 at 7 and is stopped at 47.
/// - t=60: r is stopped at its max runtime; big starts at 60 (not at
///   1000), leaves at 70; s2 starts at 70.
#[test]
fn a_max_runtime_stops_a_job_and_frees_its_gpus_for_a_reserved_job() {
    let limited = |mut j: SimJob, max: u64| {
        j.max_runtime = Some(max);
        j
    };
    let w = workload(
        vec![a100("n0", 8)],
        vec![
            limited(job("r", 0, 1000, 4), 60),
            job("big", 5, 10, 8),
            job("s2", 6, 20, 4),
            limited(job("s1", 7, 100, 4), 40),
        ],
    );
    for policy in [Policy::Cost, Policy::Pack, Policy::Spread] {
        let r = sim::simulate(&w, SimPolicy::Scheduler(policy), &SimConfig::default());
        assert_eq!(
            starts(&r, &w),
            want(&[("r", 0), ("big", 60), ("s2", 70), ("s1", 7)]),
            "{policy:?}"
        );
        assert_eq!(r.max_runtime_stops, 2, "r and s1");
        let at = |t: u64| r.series.iter().find(|s| s.time == t).copied();
        assert_eq!(
            at(47).map(|s| s.allocated_gpus),
            Some(4),
            "s1 stopped at 47"
        );
        assert_eq!(
            at(60).map(|s| s.allocated_gpus),
            Some(8),
            "big started at 60"
        );
        // Billed for the time run: r 60 s, s1 40 s, big 10 s, s2 20 s.
        let cost = bill(4000, 60, 1_000_000)
            + bill(4000, 40, 1_000_000)
            + bill(8000, 10, 1_000_000)
            + bill(4000, 20, 1_000_000);
        assert_eq!(r.cost_micro_usd, cost, "{policy:?}");
    }
    // Without the limit, big waits for r's real end.
    let mut w = w;
    w.jobs[0].max_runtime = None;
    let r = sim::simulate(
        &w,
        SimPolicy::Scheduler(Policy::Cost),
        &SimConfig::default(),
    );
    assert_eq!(r.starts[1], Some(1000));
    assert_eq!(r.max_runtime_stops, 1, "s1 only");
}

/// n0 (2 A100 at $1) and n1 (2 A100 at $2); n0's price moves to $3 at 100.
/// a (1 GPU, 0–200 s) takes n0, the cheapest; it keeps running there and
/// is billed 100 s at $1 and 100 s at $3. b (1 GPU, at 150, 10 s) takes
/// n1, now the cheaper; without the move it takes n0's other GPU.
#[test]
fn prices_that_move_change_placements_and_bills_at_the_recorded_times() {
    let mut n1 = a100("n1", 2);
    n1.price_per_gpu_hour_micro_usd = 2_000_000;
    let w = workload(
        vec![a100("n0", 2), n1],
        vec![job("a", 0, 200, 1), job("b", 150, 10, 1)],
    );
    let step = |at: u64, price: u64| sim::PriceStep {
        at,
        node: 0,
        price_per_gpu_hour_micro_usd: price,
    };
    // A change after the last job changes nothing (no tick of its own).
    let moving = SimConfig {
        price_steps: vec![step(10_000, 9_000_000), step(100, 3_000_000)],
        ..Default::default()
    };
    let r = sim::simulate(&w, SimPolicy::Scheduler(Policy::Cost), &moving);
    assert_eq!(starts(&r, &w), want(&[("a", 0), ("b", 150)]));
    assert_eq!(r.end_time, 200);
    assert_eq!(r.placements[0].map(|p| p.0), Some(0));
    assert_eq!(
        r.placements[1].map(|p| p.0),
        Some(1),
        "n1 is cheaper from 100"
    );
    let a = 1000 * (100 * 1_000_000 + 100 * 3_000_000) / 3600 / 1000;
    assert_eq!(r.cost_micro_usd, a + bill(1000, 10, 2_000_000));
    let r = sim::simulate(
        &w,
        SimPolicy::Scheduler(Policy::Cost),
        &SimConfig::default(),
    );
    assert_eq!(r.placements[1].map(|p| p.0), Some(0));
    assert_eq!(
        r.cost_micro_usd,
        bill(1000, 200, 1_000_000) + bill(1000, 10, 1_000_000)
    );
    // The baselines place by node order, but are billed the moving prices.
    let r = sim::simulate(&w, SimPolicy::BaselineFirstFit, &moving);
    assert_eq!(r.cost_micro_usd, a + bill(1000, 10, 3_000_000));
}

/// Gangs, preemption, max runtimes and quotas together replay the same way
/// every time (hash maps' orders, which differ between runs and map
/// instances, must never pick between equal choices).
#[test]
fn a_replay_with_every_feature_is_deterministic() {
    let mix = sim::SyntheticMix {
        gang_pct: 5,
        preemptible_pct: 30,
        max_runtime_pct: 20,
    };
    let w = sim::workload::synthetic_with(50, 3000, 42, mix);
    assert!(w.jobs.iter().any(|j| j.tasks > 1 && !j.preemptible));
    let config = SimConfig {
        scheduler: SchedulerConfig {
            tenants: HashMap::from([(
                "tenant-0".to_string(),
                TenantPolicy {
                    weight: 1.0,
                    max_gpus: Some(100),
                    max_gpus_per_generation: HashMap::from([(Generation::Hopper, 40)]),
                },
            )]),
            ..Default::default()
        },
        ..Default::default()
    };
    let first = sim::simulate(&w, SimPolicy::Scheduler(Policy::Cost), &config);
    assert!(first.preemptions > 0 && first.max_runtime_stops > 0);
    for _ in 0..3 {
        let again = sim::simulate(&w, SimPolicy::Scheduler(Policy::Cost), &config);
        assert_eq!(again, first);
    }
}
