//! Preemption beside fractions of GPUs: a whole-GPU job may evict
//! lower-priority preemptible shares, but only every share of a GPU
//! together (a share alone frees no GPU); a one-task share job evicts the
//! fewest thousandths that make room for it; MIG instances are never
//! victims and MIG jobs do not preempt; and the room being freed is not
//! handed to other shares in the same pass.

use gpufleet_scheduler::{
    Fleet, Generation, GpuInput, GpuUnit, JobInput, MigInput, NodeInput, Outcome, PendingReason,
    RunningInput, SchedulerConfig, TenantState, schedule,
};
use proptest::prelude::*;

const GIB: u64 = 1 << 30;

/// What one GPU of a test node holds.
#[derive(Debug, Clone)]
enum Held {
    Free,
    /// A whole-GPU job: (priority, preemptible).
    Whole(i32, bool),
    /// Shares of 250/1000 each: (priority, preemptible) per share.
    Shares(Vec<(i32, bool)>),
    /// MIG mode, its one instance held by (priority, preemptible).
    Mig(i32, bool),
}

fn held_strategy() -> impl Strategy<Value = Held> {
    let who = || (0i32..4, prop::bool::weighted(0.7));
    prop_oneof![
        Just(Held::Free),
        who().prop_map(|(p, b)| Held::Whole(p, b)),
        prop::collection::vec(who(), 1..4).prop_map(Held::Shares),
        who().prop_map(|(p, b)| Held::Mig(p, b)),
    ]
}

/// Nodes of H100s in one region; each GPU as `held` says. Returns the
/// nodes and the work running on them.
fn fleet_of(nodes: &[Vec<Held>]) -> (Vec<NodeInput>, Vec<RunningInput>) {
    let mut inputs = Vec::new();
    let mut running = Vec::new();
    for (n, gpus) in nodes.iter().enumerate() {
        let node = format!("n{n}");
        let mut node_gpus = Vec::new();
        for (g, held) in gpus.iter().enumerate() {
            let uuid = format!("GPU-{n}-{g}");
            let mig_uuid = format!("MIG-{n}-{g}");
            let mig = matches!(held, Held::Mig(..));
            node_gpus.push(GpuInput {
                uuid: uuid.clone(),
                model: "H100-SXM-80GB".into(),
                generation: Generation::Hopper,
                memory_bytes: 80 * GIB,
                compute_capability: (9, 0),
                healthy: true,
                mig_enabled: mig,
                mig_instances: if mig {
                    vec![MigInput {
                        uuid: mig_uuid.clone(),
                        profile: "7g.80gb".into(),
                        memory_bytes: 80 * GIB,
                        sm_share_milli: 1000,
                    }]
                } else {
                    Vec::new()
                },
            });
            let run = |id: String, priority: i32, preemptible: bool, uuid: &str, share: u32| {
                RunningInput {
                    job_id: id,
                    tenant: "low".into(),
                    priority,
                    preemptible,
                    node_id: node.clone(),
                    gpu_uuids: vec![uuid.to_string()],
                    share_milli: share,
                    ..Default::default()
                }
            };
            match held {
                Held::Free => {}
                Held::Whole(p, b) => running.push(run(format!("whole-{n}-{g}"), *p, *b, &uuid, 0)),
                Held::Shares(shares) => {
                    for (i, (p, b)) in shares.iter().enumerate() {
                        running.push(run(format!("share-{n}-{g}-{i}"), *p, *b, &uuid, 250));
                    }
                }
                Held::Mig(p, b) => running.push(run(format!("mig-{n}-{g}"), *p, *b, &mig_uuid, 0)),
            }
        }
        inputs.push(NodeInput {
            id: node,
            provider: "aws".into(),
            region: "r1".into(),
            price_per_gpu_hour_micro_usd: 1_000_000,
            schedulable: true,
            gpus: node_gpus,
            ..Default::default()
        });
    }
    (inputs, running)
}

fn pass(nodes: &[NodeInput], running: &[RunningInput], jobs: &[JobInput]) -> Vec<Outcome> {
    let mut fleet = Fleet::build(nodes, running);
    schedule(
        &mut fleet,
        jobs,
        &SchedulerConfig::default(),
        &TenantState::default(),
        1000,
    )
    .outcomes
}

fn whole(gpus: u32, priority: i32) -> JobInput {
    JobInput {
        id: "job-urgent".into(),
        tenant: "high".into(),
        priority,
        tasks: 1,
        gpus_per_task: gpus,
        ..Default::default()
    }
}

fn share(id: &str, milli: u32, priority: i32) -> JobInput {
    JobInput {
        id: id.into(),
        tenant: "t".into(),
        priority,
        tasks: 1,
        gpus_per_task: 1,
        unit: GpuUnit::Share {
            milli,
            memory_bytes: 0,
        },
        ..Default::default()
    }
}

#[test]
fn a_whole_gpu_job_evicts_every_share_of_one_gpu_and_then_runs_there() {
    let nodes = [vec![
        Held::Shares(vec![(0, true), (1, true)]),
        Held::Whole(5, false),
    ]];
    let (inputs, running) = fleet_of(&nodes);
    let outcomes = pass(&inputs, &running, &[whole(1, 10)]);
    assert_eq!(
        outcomes[0],
        Outcome::Preempting {
            victims: vec!["share-0-0-0".into(), "share-0-0-1".into()]
        }
    );
    // Once they have gone, it runs on the GPU they shared.
    let left: Vec<RunningInput> = running
        .iter()
        .filter(|r| !r.job_id.starts_with("share-"))
        .cloned()
        .collect();
    match &pass(&inputs, &left, &[whole(1, 10)])[0] {
        Outcome::Placed(tasks) => assert_eq!(tasks[0].gpu_uuids, vec!["GPU-0-0"]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn one_share_that_may_not_be_evicted_keeps_its_gpu_shared() {
    // Not preemptible, or not lower: its neighbour is no victim either.
    for keeper in [(0, false), (10, true)] {
        let nodes = [vec![Held::Shares(vec![(0, true), keeper])]];
        let (inputs, running) = fleet_of(&nodes);
        assert_eq!(
            pass(&inputs, &running, &[whole(1, 10)])[0],
            Outcome::Pending(PendingReason::InsufficientFreeGpus),
            "{keeper:?}"
        );
    }
}

#[test]
fn the_gpu_being_freed_is_not_shared_out_again_in_the_same_pass() {
    let nodes = [vec![Held::Shares(vec![(0, true)])]];
    let (inputs, running) = fleet_of(&nodes);
    let outcomes = pass(
        &inputs,
        &running,
        &[whole(1, 10), share("job-small", 250, 0)],
    );
    assert_eq!(
        outcomes[0],
        Outcome::Preempting {
            victims: vec!["share-0-0-0".into()]
        }
    );
    assert!(
        matches!(outcomes[1], Outcome::Pending(_)),
        "a share beside the evicted one would keep the GPU shared: {:?}",
        outcomes[1]
    );
}

#[test]
fn a_share_evicts_the_fewest_lower_priority_shares_and_mig_jobs_wait() {
    // GPU 0: four quarter shares of priorities 0, 0, 1 and 20 (one not
    // preemptible); GPU 1: MIG, its instance held by preemptible work.
    let nodes = [vec![
        Held::Shares(vec![(1, true), (0, true), (0, true), (20, true)]),
        Held::Mig(0, true),
    ]];
    let (inputs, running) = fleet_of(&nodes);
    let outcomes = pass(&inputs, &running, &[share("job-half", 500, 10)]);
    assert_eq!(
        outcomes[0],
        Outcome::Preempting {
            victims: vec!["share-0-0-1".into(), "share-0-0-2".into()]
        },
        "the two lowest-priority quarters make a half"
    );
    let left: Vec<RunningInput> = running
        .iter()
        .filter(|r| r.job_id != "share-0-0-1" && r.job_id != "share-0-0-2")
        .cloned()
        .collect();
    match &pass(&inputs, &left, &[share("job-half", 500, 10)])[0] {
        Outcome::Placed(tasks) => assert_eq!(tasks[0].gpu_uuids, vec!["GPU-0-0"]),
        other => panic!("{other:?}"),
    }
    // More than the evictable quarters could free: it waits.
    assert_eq!(
        pass(&inputs, &running, &[share("job-big", 800, 10)])[0],
        Outcome::Pending(PendingReason::InsufficientFreeGpus)
    );
    let mig = JobInput {
        unit: GpuUnit::Mig {
            profile: Some("7g.80gb".into()),
            min_memory_bytes: 0,
            min_sm_share_milli: 0,
        },
        ..share("job-mig", 0, 10)
    };
    assert_eq!(
        pass(&inputs, &running, &[mig])[0],
        Outcome::Pending(PendingReason::InsufficientFreeGpus)
    );
}

#[test]
fn a_share_may_evict_a_whole_gpu_job() {
    let nodes = [vec![Held::Whole(0, true)]];
    let (inputs, running) = fleet_of(&nodes);
    assert_eq!(
        pass(&inputs, &running, &[share("job-half", 500, 10)])[0],
        Outcome::Preempting {
            victims: vec!["whole-0-0".into()]
        }
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// A whole-GPU or share job's victims are always preemptible, of a
    /// lower priority, never MIG work, and for a whole-GPU job every share
    /// of a GPU goes with its neighbours; evicting them makes room; and
    /// when evicting every allowed victim would make room, it preempts
    /// rather than waits.
    #[test]
    fn preemption_beside_shares_is_sound_and_complete(
        nodes in prop::collection::vec(prop::collection::vec(held_strategy(), 1..5), 1..4),
        gpus in 1u32..4,
        milli in prop::option::weighted(0.5, prop::sample::select(vec![250u32, 500, 750, 1000])),
        priority in 1i32..4,
    ) {
        let (inputs, running) = fleet_of(&nodes);
        let job = match milli {
            Some(m) => share("job-urgent", m, priority),
            None => whole(gpus, priority),
        };
        let outcome = pass(&inputs, &running, std::slice::from_ref(&job))[0].clone();
        let evictable = |r: &RunningInput| {
            r.preemptible && r.priority < priority && !r.job_id.starts_with("mig-")
        };
        match &outcome {
            Outcome::Preempting { victims } => {
                for v in victims {
                    let r = running.iter().find(|r| r.job_id == *v);
                    prop_assert!(r.is_some_and(evictable), "victim {} may not be evicted", v);
                }
                // For a whole-GPU job shares go together: a victim
                // share's GPU keeps none.
                for v in victims.iter().filter(|v| milli.is_none() && v.starts_with("share-")) {
                    let gpu = running.iter().find(|r| r.job_id == *v).map(|r| r.gpu_uuids.clone());
                    for r in running.iter().filter(|r| Some(&r.gpu_uuids) == gpu.as_ref()) {
                        prop_assert!(victims.contains(&r.job_id), "{} stays beside victim {}", r.job_id, v);
                    }
                }
                let left: Vec<RunningInput> = running
                    .iter()
                    .filter(|r| !victims.contains(&r.job_id))
                    .cloned()
                    .collect();
                let after = pass(&inputs, &left, std::slice::from_ref(&job));
                prop_assert!(matches!(after[0], Outcome::Placed(_)), "no room after eviction: {:?}", after[0]);
            }
            Outcome::Placed(_) => {}
            Outcome::Pending(_) => {
                let left: Vec<RunningInput> = running.iter().filter(|r| !evictable(r)).cloned().collect();
                let ideal = pass(&inputs, &left, std::slice::from_ref(&job));
                prop_assert!(
                    !matches!(ideal[0], Outcome::Placed(_)),
                    "evicting every allowed victim makes room, yet it waits"
                );
            }
        }
    }
}
