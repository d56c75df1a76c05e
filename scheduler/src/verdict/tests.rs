//! The pass's shortcuts (the verdict cache and the eligible-class lists)
//! never change a decision: random fleets with running work, spot and
//! NVLink nodes and network blocks, and queues of several priorities,
//! runtimes, price caps, gangs and shares, scheduled with the shortcuts and
//! without.

use proptest::prelude::*;

use super::SHORTCUTS_OFF;
use crate::config::{SchedulerConfig, TenantState};
use crate::domain::{Constraints, Generation, GpuUnit, JobInput, Locality, Policy};
use crate::fleet::{Fleet, GpuInput, NodeInput, RunningInput};
use crate::pass::schedule;

const MODELS: &[(&str, Generation)] = &[
    ("H100-SXM-80GB", Generation::Hopper),
    ("A100-SXM-80GB", Generation::Ampere),
    ("L4", Generation::Ada),
];
const REGIONS: &[&str] = &["r1", "r2", "r3"];

/// (region, model, gpus, price step, spot, nvlink pairs, busy GPUs,
/// busy work's priority, preemptible, end step)
type NodeSpec = (usize, usize, u32, u64, bool, bool, u32, i32, bool, u64);

/// (tenant, priority, tasks, gpus, model, price cap step, locality,
/// runtime, policy, preferred region, nvlink, share, preemptible)
type JobSpec = (
    (usize, i32, u32, u32, Option<usize>, Option<u64>),
    (
        Locality,
        Option<u64>,
        Policy,
        Option<usize>,
        bool,
        bool,
        bool,
    ),
);

fn node_spec() -> impl Strategy<Value = NodeSpec> {
    (
        0..REGIONS.len(),
        0..MODELS.len(),
        prop::sample::select(vec![2u32, 4, 8]),
        1u64..6,
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.3),
        0u32..8,
        prop::sample::select(vec![0, 3, 20]),
        prop::bool::weighted(0.5),
        1u64..6,
    )
}

fn job_spec() -> impl Strategy<Value = JobSpec> {
    (
        (
            0usize..3,
            prop::sample::select(vec![0, 0, 5, 10]),
            prop::sample::select(vec![1u32, 1, 1, 2, 3]),
            prop::sample::select(vec![1u32, 1, 2, 4, 8]),
            prop::option::weighted(0.3, 0..MODELS.len()),
            prop::option::weighted(0.4, 1u64..7),
        ),
        (
            prop::sample::select(vec![
                Locality::Unspecified,
                Locality::Any,
                Locality::Provider,
            ]),
            prop::option::weighted(
                0.6,
                prop::sample::select(vec![100u64, 500, 1000, 3000, 9000]),
            ),
            prop::sample::select(vec![Policy::Cost, Policy::Pack, Policy::Spread]),
            prop::option::weighted(0.2, 0..REGIONS.len()),
            prop::bool::weighted(0.15),
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.2),
        ),
    )
}

const NOW: u64 = 10_000;

fn inputs(node_specs: &[NodeSpec]) -> (Vec<NodeInput>, Vec<RunningInput>) {
    let mut nodes = Vec::new();
    let mut running = Vec::new();
    for (i, &(region, model, gpus, price, spot, nvlink, busy, priority, preemptible, end)) in
        node_specs.iter().enumerate()
    {
        let (name, generation) = MODELS[model];
        let id = format!("n{i}");
        nodes.push(NodeInput {
            id: id.clone(),
            provider: if i % 2 == 0 { "aws" } else { "gcp" }.into(),
            region: REGIONS[region].into(),
            price_per_gpu_hour_micro_usd: price * 500_000,
            spot,
            schedulable: true,
            gpus: (0..gpus)
                .map(|g| GpuInput {
                    uuid: format!("{id}-{g}"),
                    model: name.into(),
                    generation,
                    memory_bytes: 80 << 30,
                    compute_capability: (9, 0),
                    healthy: true,
                    ..Default::default()
                })
                .collect(),
            // Network blocks on most nodes: gangs try a block, then a region.
            block: if i % 3 == 0 {
                String::new()
            } else {
                format!("b{}", i % 2)
            },
            nvlink_groups: if nvlink {
                (0..gpus / 2).map(|p| vec![2 * p, 2 * p + 1]).collect()
            } else {
                Vec::new()
            },
            ..Default::default()
        });
        let busy = busy.min(gpus);
        if busy > 0 {
            running.push(RunningInput {
                job_id: format!("run-{i}"),
                tenant: "r".into(),
                priority,
                preemptible,
                node_id: id.clone(),
                gpu_uuids: (0..busy).map(|g| format!("{id}-{g}")).collect(),
                expected_end: Some(NOW + end * 700),
                ..Default::default()
            });
        }
    }
    (nodes, running)
}

fn jobs(specs: &[JobSpec]) -> Vec<JobInput> {
    specs
        .iter()
        .enumerate()
        .map(
            |(
                i,
                &(
                    (tenant, priority, tasks, gpus, model, cap),
                    (locality, runtime, policy, preferred, nvlink, share, preemptible),
                ),
            )| JobInput {
                id: format!("job-{i}"),
                tenant: format!("t{tenant}"),
                priority,
                preemptible,
                submitted_at: i as u64,
                tasks,
                gpus_per_task: if share { 1 } else { gpus },
                unit: if share {
                    GpuUnit::Share {
                        milli: 500,
                        memory_bytes: 0,
                    }
                } else {
                    GpuUnit::Whole
                },
                constraints: Constraints {
                    models: model
                        .map(|m| vec![MODELS[m].0.to_string()])
                        .unwrap_or_default(),
                    // Caps between node prices (steps of 500,000): many
                    // caps select the same classes.
                    max_price_per_gpu_hour_micro_usd: cap.map(|c| c * 500_000 - 1 + i as u64 % 7),
                    locality,
                    preferred_regions: preferred
                        .map(|r| vec![REGIONS[r].to_string()])
                        .unwrap_or_default(),
                    allow_spot: i % 3 != 0,
                    require_nvlink: nvlink,
                    ..Default::default()
                },
                policy: Some(policy),
                max_runtime_secs: runtime,
                not_before: None,
            },
        )
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn shortcuts_never_change_a_decision(
        node_specs in prop::collection::vec(node_spec(), 1..14),
        job_specs in prop::collection::vec(job_spec(), 1..80),
        max_reservations in 0usize..3,
    ) {
        let (nodes, running) = inputs(&node_specs);
        let jobs = jobs(&job_specs);
        let config = SchedulerConfig {
            max_reservations,
            ..Default::default()
        };
        let run = |off: bool| {
            SHORTCUTS_OFF.with(|o| o.set(off));
            let mut fleet = Fleet::build(&nodes, &running);
            let result = schedule(&mut fleet, &jobs, &config, &TenantState::default(), NOW);
            SHORTCUTS_OFF.with(|o| o.set(false));
            (result.outcomes, result.placed, result.reservations, fleet.free_gpu_count())
        };
        prop_assert_eq!(run(false), run(true));
    }
}
