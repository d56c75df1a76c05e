//! Shares of GPUs and MIG instances: worked examples and properties (no
//! over-commit of any unit; shared and exclusive work never on one GPU).

use std::collections::HashMap;

use gpufleet_scheduler::explain::explain;
use gpufleet_scheduler::{
    Fleet, Generation, GpuInput, GpuUnit, JobInput, MigInput, NodeInput, Outcome, PendingReason,
    Policy, RunningInput, SchedulerConfig, TaskPlacement, TenantPolicy, TenantState, schedule,
};
use proptest::prelude::*;

const GIB: u64 = 1 << 30;

fn gpu(node: &str, g: u32, mig: Option<&[(&str, u64, u32)]>) -> GpuInput {
    GpuInput {
        uuid: format!("GPU-{node}-{g}"),
        model: "H100-SXM-80GB".into(),
        generation: Generation::Hopper,
        memory_bytes: 80 * GIB,
        compute_capability: (9, 0),
        healthy: true,
        mig_enabled: mig.is_some(),
        mig_instances: mig
            .unwrap_or(&[])
            .iter()
            .enumerate()
            .map(|(i, (profile, gib, sm))| MigInput {
                uuid: format!("MIG-{node}-{g}-{i}"),
                profile: (*profile).into(),
                memory_bytes: gib * GIB,
                sm_share_milli: *sm,
            })
            .collect(),
    }
}

/// `gpus` H100s; the first `mig` of them MIG-enabled with `layout`.
fn node(id: &str, gpus: u32, mig: u32, layout: &[(&str, u64, u32)]) -> NodeInput {
    NodeInput {
        id: id.into(),
        provider: "aws".into(),
        region: "r1".into(),
        price_per_gpu_hour_micro_usd: 2_000_000,
        schedulable: true,
        gpus: (0..gpus)
            .map(|g| gpu(id, g, (g < mig).then_some(layout)))
            .collect(),
        ..Default::default()
    }
}

const LAYOUT: &[(&str, u64, u32)] = &[
    ("3g.40gb", 40, 429),
    ("2g.20gb", 20, 286),
    ("1g.10gb", 10, 143),
    ("1g.10gb", 10, 143),
];

fn share_job(id: &str, milli: u32, memory_gib: u64) -> JobInput {
    JobInput {
        id: id.into(),
        tenant: "t".into(),
        tasks: 1,
        gpus_per_task: 1,
        unit: GpuUnit::Share {
            milli,
            memory_bytes: memory_gib * GIB,
        },
        ..Default::default()
    }
}

fn mig_job(id: &str, profile: Option<&str>, min_gib: u64, min_sm: u32) -> JobInput {
    JobInput {
        id: id.into(),
        tenant: "t".into(),
        tasks: 1,
        gpus_per_task: 1,
        unit: GpuUnit::Mig {
            profile: profile.map(str::to_string),
            min_memory_bytes: min_gib * GIB,
            min_sm_share_milli: min_sm,
        },
        ..Default::default()
    }
}

fn whole_job(id: &str, gpus: u32) -> JobInput {
    JobInput {
        id: id.into(),
        tenant: "t".into(),
        tasks: 1,
        gpus_per_task: gpus,
        ..Default::default()
    }
}

fn placed(outcome: &Outcome) -> &TaskPlacement {
    match outcome {
        Outcome::Placed(tasks) => &tasks[0],
        other => panic!("not placed: {other:?}"),
    }
}

fn pass(nodes: &[NodeInput], running: &[RunningInput], jobs: &[JobInput]) -> (Fleet, Vec<Outcome>) {
    let mut fleet = Fleet::build(nodes, running);
    let result = schedule(
        &mut fleet,
        jobs,
        &SchedulerConfig::default(),
        &TenantState::default(),
        1000,
    );
    (fleet, result.outcomes)
}

#[test]
fn two_halves_share_one_gpu_and_a_third_waits_with_its_reason() {
    let nodes = [node("a", 1, 0, &[])];
    let jobs = [
        share_job("s1", 500, 0),
        share_job("s2", 500, 0),
        share_job("s3", 470, 12),
    ];
    let (fleet, outcomes) = pass(&nodes, &[], &jobs);
    let (a, b) = (placed(&outcomes[0]), placed(&outcomes[1]));
    assert_eq!(a.gpu_uuids, vec!["GPU-a-0"]);
    assert_eq!(b.gpu_uuids, vec!["GPU-a-0"], "packed on the same GPU");
    assert_eq!((a.share_milli, a.memory_limit_bytes), (500, 40 * GIB));
    assert_eq!(a.milli_gpus() + b.milli_gpus(), 1000);
    assert_eq!(
        outcomes[2],
        Outcome::Pending(PendingReason::InsufficientFreeGpus)
    );
    let e = explain(&fleet, &jobs[2], Some(PendingReason::InsufficientFreeGpus));
    assert!(
        e.message
            .starts_with("needs 470/1000 of a GPU with 12 GiB free: no GPU has that much free now"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("a has 0/1000 and 0 GiB free at most"),
        "{}",
        e.message
    );
}

#[test]
fn shares_and_whole_gpus_never_mix_and_shares_pack_best_fit() {
    let nodes = [node("a", 2, 0, &[])];
    // A running share on GPU 0: a whole-GPU job takes GPU 1, not GPU 0.
    let running = [RunningInput {
        job_id: "old".into(),
        node_id: "a".into(),
        gpu_uuids: vec!["GPU-a-0".into()],
        share_milli: 300,
        ..Default::default()
    }];
    let (_, outcomes) = pass(&nodes, &running, &[whole_job("w", 1), whole_job("w2", 1)]);
    assert_eq!(placed(&outcomes[0]).gpu_uuids, vec!["GPU-a-1"]);
    assert_eq!(
        outcomes[1],
        Outcome::Pending(PendingReason::InsufficientFreeGpus),
        "the shared GPU is not free for whole work"
    );
    // A share goes beside the running one rather than opening GPU 1.
    let (_, outcomes) = pass(&nodes, &running, &[share_job("s", 700, 0)]);
    assert_eq!(placed(&outcomes[0]).gpu_uuids, vec!["GPU-a-0"]);
    // Memory counts too: 300 ‰ running leaves 56 GiB; 60 GiB opens GPU 1.
    let (_, outcomes) = pass(&nodes, &running, &[share_job("s", 100, 60)]);
    assert_eq!(placed(&outcomes[0]).gpu_uuids, vec!["GPU-a-1"]);
    // A whole GPU running exclusively never takes a share.
    let running = [RunningInput {
        job_id: "old".into(),
        node_id: "a".into(),
        gpu_uuids: vec!["GPU-a-0".into(), "GPU-a-1".into()],
        ..Default::default()
    }];
    let (_, outcomes) = pass(&nodes, &running, &[share_job("s", 10, 0)]);
    assert!(matches!(outcomes[0], Outcome::Pending(_)));
}

#[test]
fn mig_instances_by_profile_or_by_minimum_and_never_whole() {
    let nodes = [node("a", 2, 1, LAYOUT)];
    let jobs = [
        mig_job("p", Some("1G.10GB"), 0, 0),
        mig_job("m", None, 15, 0),
        mig_job("q", None, 0, 400),
        mig_job("x", Some("7g.80gb"), 0, 0),
        whole_job("w", 2),
        share_job("s", 100, 0),
    ];
    let (fleet, outcomes) = pass(&nodes, &[], &jobs);
    let p = placed(&outcomes[0]);
    assert_eq!(p.gpu_uuids, vec!["MIG-a-0-2"]);
    assert_eq!(
        (p.share_milli, p.mig_profile.as_deref()),
        (143, Some("1g.10gb"))
    );
    assert_eq!(
        placed(&outcomes[1]).gpu_uuids,
        vec!["MIG-a-0-1"],
        "smallest with ≥ 15 GiB"
    );
    assert_eq!(placed(&outcomes[2]).gpu_uuids, vec!["MIG-a-0-0"]);
    assert_eq!(
        outcomes[3],
        Outcome::Pending(PendingReason::NoFeasibleNodes)
    );
    assert_eq!(
        outcomes[4],
        Outcome::Pending(PendingReason::NoFeasibleNodes),
        "a MIG-enabled GPU is not a whole GPU"
    );
    assert_eq!(
        placed(&outcomes[5]).gpu_uuids,
        vec!["GPU-a-1"],
        "shares avoid MIG GPUs"
    );
    let e = explain(&fleet, &jobs[3], Some(PendingReason::NoFeasibleNodes));
    assert!(
        e.message
            .starts_with("needs a 7g.80gb MIG instance: no node satisfies"),
        "{}",
        e.message
    );
    // A running MIG job holds its instance.
    let running = [RunningInput {
        job_id: "old".into(),
        node_id: "a".into(),
        gpu_uuids: vec!["MIG-a-0-2".into(), "MIG-a-0-3".into()],
        ..Default::default()
    }];
    let (_, outcomes) = pass(&nodes, &running, &[mig_job("p", Some("1g.10gb"), 0, 0)]);
    assert_eq!(
        outcomes[0],
        Outcome::Pending(PendingReason::InsufficientFreeGpus)
    );
}

#[test]
fn quotas_and_fair_share_count_thousandths() {
    let nodes = [node("a", 2, 0, &[])];
    let mut config = SchedulerConfig::default();
    config.tenants.insert(
        "t".into(),
        TenantPolicy {
            weight: 1.0,
            max_gpus: Some(1),
            ..Default::default()
        },
    );
    // Holding 600 ‰, a 400 ‰ share fits a 1-GPU quota; 500 ‰ does not.
    let tenants = TenantState {
        allocated: HashMap::from([("t".into(), HashMap::from([(Generation::Hopper, 600)]))]),
        ..Default::default()
    };
    let mut fleet = Fleet::build(&nodes, &[]);
    let jobs = [share_job("a", 400, 0), share_job("b", 100, 0)];
    let r = schedule(&mut fleet, &jobs, &config, &tenants, 0);
    assert!(matches!(r.outcomes[0], Outcome::Placed(_)));
    assert_eq!(
        r.outcomes[1],
        Outcome::Pending(PendingReason::QuotaExceeded)
    );
}

#[test]
fn first_fit_baseline_places_units_too() {
    let nodes = [node("a", 2, 1, LAYOUT)];
    let mut jobs = vec![share_job("s", 500, 0), mig_job("m", Some("2g.20gb"), 0, 0)];
    for j in &mut jobs {
        j.policy = Some(Policy::FirstFit);
    }
    let (_, outcomes) = pass(&nodes, &[], &jobs);
    assert_eq!(placed(&outcomes[0]).gpu_uuids, vec!["GPU-a-1"]);
    assert_eq!(placed(&outcomes[1]).gpu_uuids, vec!["MIG-a-0-1"]);
}

// ---- properties ---------------------------------------------------------

#[derive(Debug, Clone)]
enum Want {
    Whole(u32),
    Share(u32, u64),
    Mig(Option<&'static str>, u64),
}

fn want_strategy() -> impl Strategy<Value = Want> {
    prop_oneof![
        (1u32..=4).prop_map(Want::Whole),
        (
            prop::sample::select(vec![0u32, 100, 230, 470, 500, 650, 810, 1000]),
            prop::sample::select(vec![0u64, 5, 12, 40, 79]),
        )
            .prop_filter("a share asks for something", |(m, g)| *m > 0 || *g > 0)
            .prop_map(|(m, g)| Want::Share(m, g)),
        (
            prop::sample::select(vec![
                Some("1g.10gb"),
                Some("2g.20gb"),
                Some("3g.40gb"),
                Some("7g.80gb"),
                None
            ]),
            prop::sample::select(vec![0u64, 10, 20, 30]),
        )
            .prop_map(|(p, g)| Want::Mig(p, g)),
    ]
}

fn job_of(i: usize, want: &Want, tasks: u32, policy: Policy) -> JobInput {
    let mut job = match want {
        Want::Whole(g) => whole_job(&format!("j{i}"), *g),
        Want::Share(m, g) => share_job(&format!("j{i}"), *m, *g),
        Want::Mig(p, g) => mig_job(&format!("j{i}"), *p, *g, 0),
    };
    job.tasks = tasks;
    job.policy = Some(policy);
    job.submitted_at = i as u64;
    job
}

/// What holds each unit: per whole GPU, exclusive holders and shares (‰,
/// bytes); per MIG instance, holders.
#[derive(Default, Debug)]
struct Ledger {
    exclusive: HashMap<String, u32>,
    shares: HashMap<String, (u64, u64, u32)>,
    mig: HashMap<String, u32>,
}

impl Ledger {
    fn add(&mut self, p: &TaskPlacement) {
        if p.mig_profile.is_some() {
            for u in &p.gpu_uuids {
                *self.mig.entry(u.clone()).or_default() += 1;
            }
        } else if p.share_milli > 0 {
            let e = self.shares.entry(p.gpu_uuids[0].clone()).or_default();
            e.0 += p.share_milli as u64;
            e.1 += p.memory_limit_bytes;
            e.2 += 1;
        } else {
            for u in &p.gpu_uuids {
                *self.exclusive.entry(u.clone()).or_default() += 1;
            }
        }
    }

    fn check(&self, mig_gpus: &[String]) -> Result<(), TestCaseError> {
        for (u, n) in &self.exclusive {
            prop_assert!(*n == 1, "{u} held exclusively {n} times");
            prop_assert!(
                !self.shares.contains_key(u),
                "{u} both exclusive and shared"
            );
            prop_assert!(!mig_gpus.contains(u), "{u} is MIG-enabled but held whole");
        }
        for (u, (milli, mem, _)) in &self.shares {
            prop_assert!(*milli <= 1000, "{u} shares add up to {milli}/1000");
            prop_assert!(*mem <= 80 * GIB, "{u} shares hold {mem} bytes");
            prop_assert!(!mig_gpus.contains(u), "{u} is MIG-enabled but shared");
        }
        for (u, n) in &self.mig {
            prop_assert!(*n == 1, "MIG instance {u} held {n} times");
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, ..ProptestConfig::default() })]

    /// Over passes with churn (placed work keeps running for a while and is
    /// handed back to the next pass as running input), no unit is ever
    /// over-committed and shared and exclusive work never meet on a GPU.
    #[test]
    fn no_overcommit_and_never_mixed(
        shapes in prop::collection::vec((1u32..=8, 0u32..=3), 1..6),
        wants in prop::collection::vec((want_strategy(), prop::sample::select(vec![1u32, 1, 1, 2]),
            prop::sample::select(vec![Policy::Cost, Policy::Pack, Policy::Spread, Policy::FirstFit]),
            1u64..6), 1..80),
    ) {
        let nodes: Vec<NodeInput> = shapes
            .iter()
            .enumerate()
            .map(|(i, (gpus, mig))| node(&format!("n{i}"), *gpus, (*mig).min(*gpus), LAYOUT))
            .collect();
        let mig_gpus: Vec<String> = nodes
            .iter()
            .flat_map(|n| n.gpus.iter().filter(|g| g.mig_enabled).map(|g| g.uuid.clone()))
            .collect();
        // (placement, job index, ends at pass)
        let mut running: Vec<(TaskPlacement, usize, u64)> = Vec::new();
        let mut queue: Vec<usize> = Vec::new();
        let mut next = 0usize;
        for step in 0..12u64 {
            running.retain(|r| r.2 > step);
            for _ in 0..8 {
                if next < wants.len() {
                    queue.push(next);
                    next += 1;
                }
            }
            let inputs: Vec<RunningInput> = running
                .iter()
                .map(|(p, j, _)| RunningInput {
                    job_id: format!("j{j}"),
                    node_id: p.node_id.clone(),
                    gpu_uuids: p.gpu_uuids.clone(),
                    share_milli: if p.mig_profile.is_some() { 0 } else { p.share_milli },
                    memory_bytes: p.memory_limit_bytes,
                    ..Default::default()
                })
                .collect();
            let jobs: Vec<JobInput> = queue
                .iter()
                .map(|&i| job_of(i, &wants[i].0, wants[i].1, wants[i].2))
                .collect();
            let (_, outcomes) = pass(&nodes, &inputs, &jobs);
            let mut still = Vec::new();
            for (&i, outcome) in queue.iter().zip(&outcomes) {
                match outcome {
                    Outcome::Placed(tasks) => {
                        prop_assert_eq!(tasks.len() as u32, wants[i].1, "gang whole");
                        for t in tasks {
                            match &wants[i].0 {
                                Want::Whole(g) => {
                                    prop_assert_eq!(t.share_milli, 0);
                                    prop_assert_eq!(t.gpu_uuids.len() as u32, *g);
                                }
                                Want::Share(m, g) => {
                                    prop_assert_eq!(t.gpu_uuids.len(), 1);
                                    prop_assert!(t.share_milli >= *m && t.share_milli > 0);
                                    prop_assert!(t.memory_limit_bytes >= g * GIB);
                                }
                                Want::Mig(p, g) => {
                                    let profile = t.mig_profile.clone().unwrap_or_default();
                                    if let Some(p) = p {
                                        prop_assert_eq!(&profile, p);
                                    } else {
                                        let gib: u64 = profile[3..profile.len() - 2].parse().unwrap_or(0);
                                        prop_assert!(gib >= *g, "{} for ≥ {} GiB", profile, g);
                                    }
                                }
                            }
                            running.push((t.clone(), i, step + wants[i].3));
                        }
                    }
                    _ => still.push(i),
                }
            }
            queue = still;
            let mut ledger = Ledger::default();
            for (p, _, _) in &running {
                ledger.add(p);
            }
            ledger.check(&mig_gpus)?;
        }
    }
}

#[test]
fn market_signals_count_shares_as_parts_of_gpus() {
    let nodes = [node("a", 2, 1, LAYOUT)];
    let running = [
        RunningInput {
            job_id: "s".into(),
            node_id: "a".into(),
            gpu_uuids: vec!["GPU-a-1".into()],
            share_milli: 300,
            ..Default::default()
        },
        RunningInput {
            job_id: "m".into(),
            node_id: "a".into(),
            gpu_uuids: vec!["MIG-a-0-2".into()],
            ..Default::default()
        },
    ];
    let fleet = Fleet::build(&nodes, &running);
    let pending = [
        share_job("p1", 500, 0),
        share_job("p2", 500, 0),
        share_job("p3", 250, 0),
    ];
    let snapshot = gpufleet_scheduler::market::snapshot(&fleet, &pending);
    let group = snapshot.groups.values().next().cloned().unwrap_or_default();
    assert_eq!(group.allocated_milli, 300 + 143);
    assert_eq!(group.supply_milli, 1000 + 429 + 286 + 143 + 143);
    assert_eq!(group.pending_demand_milli, 1250);
    assert_eq!(group.pending_demand_gpus, 2, "1.25 GPUs rounded up");
    assert_eq!(snapshot.unmet_demand_gpus, 0);
}
