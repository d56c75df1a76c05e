//! Gangs and topology: a gang prefers one network block (the nodes'
//! `block`), then — where its locality allows more — one region, and spans
//! them only when no single one has room. The properties compare the
//! placement on a whole random fleet with the same job on the fleet cut
//! down to one block or one region: if it fits there alone, it lands in
//! one; and labels never make a gang fail that placed without them.

use std::collections::{BTreeSet, HashSet};

use gpufleet_scheduler::{
    Constraints, Fleet, Generation, GpuInput, GpuUnit, JobInput, Locality, NodeInput, Outcome,
    Policy, RunningInput, SchedulerConfig, TenantState, schedule,
};
use proptest::prelude::*;

const REGIONS: &[&str] = &["r1", "r2", "r3"];
const PROVIDERS: &[&str] = &["aws", "lambda"];

#[derive(Debug, Clone)]
struct NodeSpec {
    provider: usize,
    region: usize,
    /// `None`: no block label.
    block: Option<usize>,
    gpus: u32,
    price: u64,
    /// GPUs (by bit) already running other work.
    busy: u32,
}

fn node_strategy() -> impl Strategy<Value = NodeSpec> {
    (
        0..PROVIDERS.len(),
        0..REGIONS.len(),
        prop::option::weighted(0.8, 0usize..3),
        prop::sample::select(vec![1u32, 2, 4, 8]),
        1u64..6,
        0u32..256,
    )
        .prop_map(|(provider, region, block, gpus, price, busy)| NodeSpec {
            provider,
            region,
            block,
            gpus,
            price: price * 500_000,
            // About half the GPUs of half the nodes are busy.
            busy: if busy % 2 == 0 { busy } else { 0 },
        })
}

#[derive(Debug, Clone)]
struct GangSpec {
    tasks: u32,
    gpus: u32,
    locality: Locality,
    policy: Policy,
    /// A share of one GPU per task instead of whole GPUs.
    share: Option<u32>,
}

fn gang_strategy() -> impl Strategy<Value = GangSpec> {
    (
        2u32..5,
        prop::sample::select(vec![1u32, 2, 4, 8]),
        prop::sample::select(vec![
            Locality::Unspecified,
            Locality::Any,
            Locality::Region,
            Locality::Provider,
        ]),
        prop::sample::select(vec![Policy::Cost, Policy::Pack, Policy::Spread]),
        prop::option::weighted(0.25, prop::sample::select(vec![250u32, 500, 700])),
    )
        .prop_map(|(tasks, gpus, locality, policy, share)| GangSpec {
            tasks,
            gpus,
            locality,
            policy,
            share,
        })
}

fn block_name(spec: &NodeSpec) -> String {
    spec.block.map(|b| format!("b{b}")).unwrap_or_default()
}

/// The fleet of `specs` with node ids by position (so a cut-down fleet
/// names the same nodes), and the work running on it.
fn fleet_of(specs: &[(usize, &NodeSpec)], labels: bool) -> (Vec<NodeInput>, Vec<RunningInput>) {
    let mut nodes = Vec::new();
    let mut running = Vec::new();
    for &(i, s) in specs {
        nodes.push(NodeInput {
            id: format!("n{i}"),
            provider: PROVIDERS[s.provider].into(),
            region: REGIONS[s.region].into(),
            price_per_gpu_hour_micro_usd: s.price,
            schedulable: true,
            gpus: (0..s.gpus)
                .map(|g| GpuInput {
                    uuid: format!("GPU-n{i}-{g}"),
                    model: "H100-SXM-80GB".into(),
                    generation: Generation::Hopper,
                    memory_bytes: 80 << 30,
                    compute_capability: (9, 0),
                    healthy: true,
                    ..Default::default()
                })
                .collect(),
            block: if labels { block_name(s) } else { String::new() },
            ..Default::default()
        });
        let busy: Vec<String> = (0..s.gpus)
            .filter(|g| s.busy & (1 << g) != 0)
            .map(|g| format!("GPU-n{i}-{g}"))
            .collect();
        if !busy.is_empty() {
            running.push(RunningInput {
                job_id: format!("run-{i}"),
                tenant: "other".into(),
                node_id: format!("n{i}"),
                gpu_uuids: busy,
                ..Default::default()
            });
        }
    }
    (nodes, running)
}

fn gang(spec: &GangSpec) -> JobInput {
    let (gpus_per_task, unit) = match spec.share {
        Some(milli) => (
            1,
            GpuUnit::Share {
                milli,
                memory_bytes: 0,
            },
        ),
        None => (spec.gpus, GpuUnit::Whole),
    };
    JobInput {
        id: "job-gang".into(),
        tenant: "t".into(),
        tasks: spec.tasks,
        gpus_per_task,
        unit,
        constraints: Constraints {
            locality: spec.locality,
            ..Default::default()
        },
        policy: Some(spec.policy),
        ..Default::default()
    }
}

/// The gang alone on the nodes `keep` admits: its tasks' (region, block)
/// pairs when placed.
fn place(
    specs: &[NodeSpec],
    keep: impl Fn(&NodeSpec) -> bool,
    labels: bool,
    job: &JobInput,
) -> Option<Vec<(String, String)>> {
    let kept: Vec<(usize, &NodeSpec)> = specs.iter().enumerate().filter(|(_, s)| keep(s)).collect();
    if kept.is_empty() {
        return None;
    }
    let (nodes, running) = fleet_of(&kept, labels);
    let mut fleet = Fleet::build(&nodes, &running);
    let result = schedule(
        &mut fleet,
        std::slice::from_ref(job),
        &SchedulerConfig::default(),
        &TenantState::default(),
        1000,
    );
    match &result.outcomes[0] {
        Outcome::Placed(tasks) => Some(
            tasks
                .iter()
                .map(|t| (t.region.clone(), t.block.clone()))
                .collect(),
        ),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// A gang that fits inside one network block lands inside one block;
    /// one that fits inside one region lands inside one region.
    #[test]
    fn a_gang_that_fits_in_one_block_or_region_lands_in_one(
        specs in prop::collection::vec(node_strategy(), 1..24),
        spec in gang_strategy(),
    ) {
        let job = gang(&spec);
        let placed = place(&specs, |_| true, true, &job);
        let blocks: BTreeSet<(usize, usize)> = specs
            .iter()
            .filter_map(|s| s.block.map(|b| (s.region, b)))
            .collect();
        let fits_in_a_block = blocks.iter().any(|&(r, b)| {
            place(&specs, |s| s.region == r && s.block == Some(b), true, &job).is_some()
        });
        if fits_in_a_block {
            let tasks = placed.clone();
            prop_assert!(tasks.is_some(), "fits in one block, yet not placed");
            let tasks = tasks.unwrap_or_default();
            let distinct: HashSet<&(String, String)> = tasks.iter().collect();
            prop_assert_eq!(distinct.len(), 1, "fits in one block, yet spans: {:?}", tasks);
            prop_assert!(!tasks[0].1.is_empty(), "one block means a labelled one: {:?}", tasks);
        }
        let fits_in_a_region = (0..REGIONS.len())
            .any(|r| place(&specs, |s| s.region == r, true, &job).is_some());
        if fits_in_a_region {
            let tasks = placed.unwrap_or_default();
            let regions: HashSet<&String> = tasks.iter().map(|(r, _)| r).collect();
            prop_assert_eq!(regions.len(), 1, "fits in one region, yet spans: {:?}", tasks);
        }
    }

    /// Labels only order the choice: a gang placed on the unlabelled fleet
    /// is placed on the labelled one too.
    #[test]
    fn block_labels_never_lose_a_placement(
        specs in prop::collection::vec(node_strategy(), 1..24),
        spec in gang_strategy(),
    ) {
        let job = gang(&spec);
        let without = place(&specs, |_| true, false, &job);
        let with = place(&specs, |_| true, true, &job);
        prop_assert!(without.is_none() || with.is_some(), "placed without labels only: {:?}", without);
    }
}

/// Worked example: block b1 is cheaper but too small for the gang; it goes
/// to b2 whole rather than spanning the cheaper b1 and b2, and spans only
/// when it outgrows every block.
#[test]
fn a_gang_spans_blocks_only_when_no_block_fits() {
    let spec = |block: usize, price: u64| NodeSpec {
        provider: 0,
        region: 0,
        block: Some(block),
        gpus: 8,
        price,
        busy: 0,
    };
    let specs = [spec(1, 500_000), spec(2, 900_000), spec(2, 900_000)];
    let mut job = gang(&GangSpec {
        tasks: 2,
        gpus: 8,
        locality: Locality::Unspecified,
        policy: Policy::Cost,
        share: None,
    });
    let tasks = place(&specs, |_| true, true, &job).unwrap_or_default();
    assert_eq!(
        tasks,
        vec![("r1".to_string(), "b2".to_string()); 2],
        "one block, though dearer"
    );
    job.tasks = 3;
    let tasks = place(&specs, |_| true, true, &job).unwrap_or_default();
    let blocks: BTreeSet<&str> = tasks.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(
        blocks,
        BTreeSet::from(["b1", "b2"]),
        "no block fits 3 nodes"
    );
}

/// Worked example: a gang free to go anywhere stays in one region when one
/// has room, even if spanning would be cheaper.
#[test]
fn a_gang_with_any_locality_prefers_one_region() {
    let spec = |region: usize, price: u64| NodeSpec {
        provider: 0,
        region,
        block: None,
        gpus: 8,
        price,
        busy: 0,
    };
    let specs = [spec(0, 500_000), spec(1, 900_000), spec(1, 900_000)];
    let job = gang(&GangSpec {
        tasks: 2,
        gpus: 8,
        locality: Locality::Any,
        policy: Policy::Cost,
        share: None,
    });
    let tasks = place(&specs, |_| true, true, &job).unwrap_or_default();
    assert_eq!(tasks, vec![("r2".to_string(), String::new()); 2]);
    let three = JobInput { tasks: 3, ..job };
    let tasks = place(&specs, |_| true, true, &three).unwrap_or_default();
    let regions: BTreeSet<&str> = tasks.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(regions, BTreeSet::from(["r1", "r2"]), "spans when it must");
}
