//! Property tests of the pure scheduler over random fleets, queues and churn.

use std::collections::{HashMap, HashSet};

use gpufleet_scheduler::{
    Constraints, FairShare, Fleet, FleetTemplate, Generation, GpuInput, JobInput, Locality,
    NodeInput, Outcome, Policy, RunningInput, SchedulerConfig, TenantPolicy, TenantState, schedule,
};
use proptest::prelude::*;

const MODELS: &[(&str, Generation, u64)] = &[
    ("H100-SXM-80GB", Generation::Hopper, 80),
    ("A100-SXM-80GB", Generation::Ampere, 80),
    ("L4", Generation::Ada, 24),
];
const PROVIDERS: &[&str] = &["aws", "azure", "lambda"];
const REGIONS: &[&str] = &["r1", "r2", "r3", "r4"];

#[derive(Debug, Clone)]
struct NodeSpec {
    provider: usize,
    region: usize,
    model: usize,
    gpus: u32,
    price: u64,
    schedulable: bool,
    unhealthy: u32,
}

fn node_strategy() -> impl Strategy<Value = NodeSpec> {
    (
        0..PROVIDERS.len(),
        0..REGIONS.len(),
        0..MODELS.len(),
        prop::sample::select(vec![1u32, 2, 4, 8]),
        1u64..50,
        prop::bool::weighted(0.9),
        0u32..256,
    )
        .prop_map(
            |(provider, region, model, gpus, price, schedulable, unhealthy)| NodeSpec {
                provider,
                region,
                model,
                gpus,
                price: price * 100_000,
                schedulable,
                unhealthy,
            },
        )
}

#[derive(Debug, Clone)]
struct JobSpec {
    tenant: usize,
    priority: i32,
    tasks: u32,
    gpus: u32,
    generation: Option<usize>,
    region: Option<usize>,
    max_price: Option<u64>,
    locality: Locality,
    runtime: Option<u64>,
    policy: Policy,
}

fn job_strategy() -> impl Strategy<Value = JobSpec> {
    (
        0usize..3,
        prop::sample::select(vec![0, 0, 0, 5, 10]),
        prop::sample::select(vec![1u32, 1, 1, 2, 3]),
        prop::sample::select(vec![1u32, 1, 2, 4, 8]),
        prop::option::weighted(0.3, 0..MODELS.len()),
        prop::option::weighted(0.2, 0..REGIONS.len()),
        prop::option::weighted(0.2, 1u64..50),
        prop::sample::select(vec![
            Locality::Unspecified,
            Locality::Any,
            Locality::Region,
            Locality::Provider,
        ]),
        prop::option::weighted(0.5, 60u64..7200),
        prop::sample::select(vec![Policy::Cost, Policy::Pack, Policy::Spread]),
    )
        .prop_map(
            |(
                tenant,
                priority,
                tasks,
                gpus,
                generation,
                region,
                max_price,
                locality,
                runtime,
                policy,
            )| JobSpec {
                tenant,
                priority,
                tasks,
                gpus,
                generation,
                region,
                max_price: max_price.map(|p| p * 100_000),
                locality,
                runtime,
                policy,
            },
        )
}

fn nodes(specs: &[NodeSpec]) -> Vec<NodeInput> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (model, generation, gib) = MODELS[s.model];
            NodeInput {
                id: format!("n{i}"),
                provider: PROVIDERS[s.provider].into(),
                region: REGIONS[s.region].into(),
                price_per_gpu_hour_micro_usd: s.price,
                spot: false,
                schedulable: s.schedulable,
                gpus: (0..s.gpus)
                    .map(|g| GpuInput {
                        uuid: format!("GPU-n{i}-{g}"),
                        model: model.into(),
                        generation,
                        memory_bytes: gib << 30,
                        compute_capability: (8, 0),
                        healthy: s.unhealthy & (1 << g) == 0 || g > 7,
                        ..Default::default()
                    })
                    .collect(),
                nvlink_groups: Vec::new(),
                ..Default::default()
            }
        })
        .collect()
}

fn jobs(specs: &[JobSpec]) -> Vec<JobInput> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| JobInput {
            id: format!("job-{i:012x}"),
            tenant: format!("t{}", s.tenant),
            priority: s.priority,
            preemptible: false,
            submitted_at: i as u64,
            tasks: s.tasks,
            gpus_per_task: s.gpus,
            unit: Default::default(),
            constraints: Constraints {
                generations: s.generation.map(|m| vec![MODELS[m].1]).unwrap_or_default(),
                regions: s
                    .region
                    .map(|r| vec![REGIONS[r].to_string()])
                    .unwrap_or_default(),
                max_price_per_gpu_hour_micro_usd: s.max_price,
                locality: s.locality,
                ..Default::default()
            },
            policy: Some(s.policy),
            max_runtime_secs: s.runtime,
            not_before: None,
        })
        .collect()
}

/// `count` identical nodes `n0…` of 8 H100s in aws/r1 at $1.00.
fn h100_nodes(count: usize) -> Vec<NodeInput> {
    (0..count)
        .map(|n| NodeInput {
            id: format!("n{n}"),
            provider: "aws".into(),
            region: "r1".into(),
            price_per_gpu_hour_micro_usd: 1_000_000,
            schedulable: true,
            gpus: (0..8)
                .map(|g| GpuInput {
                    uuid: format!("GPU-{n}-{g}"),
                    model: "H100-SXM-80GB".into(),
                    generation: Generation::Hopper,
                    memory_bytes: 80 << 30,
                    compute_capability: (9, 0),
                    healthy: true,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .collect()
}

struct GpuFacts {
    node: usize,
    healthy: bool,
}

fn gpu_facts(specs: &[NodeSpec]) -> HashMap<String, GpuFacts> {
    let mut out = HashMap::new();
    for (i, s) in specs.iter().enumerate() {
        for g in 0..s.gpus {
            out.insert(
                format!("GPU-n{i}-{g}"),
                GpuFacts {
                    node: i,
                    healthy: s.unhealthy & (1 << g) == 0 || g > 7,
                },
            );
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// A pass on a fleet built from a [`FleetTemplate`] (a per-pass
    /// rebuild over fixed nodes) decides exactly as one on `Fleet::build`, also when
    /// the template is reused with other running work.
    #[test]
    fn a_template_built_fleet_decides_as_a_fresh_build(
        node_specs in prop::collection::vec(node_strategy(), 1..30),
        job_specs in prop::collection::vec(job_strategy(), 1..60),
        share_milli in prop::sample::select(vec![0u32, 250, 500])) {
        let node_inputs = nodes(&node_specs);
        let job_inputs = jobs(&job_specs);
        let template = FleetTemplate::new(&node_inputs);
        for parity in 0..3usize {
            let running: Vec<RunningInput> = node_inputs
                .iter()
                .enumerate()
                .filter(|(i, n)| i % 3 == parity && !n.gpus.is_empty())
                .map(|(i, n)| RunningInput {
                    job_id: format!("run-{i}"),
                    tenant: "t0".into(),
                    node_id: n.id.clone(),
                    gpu_uuids: vec![n.gpus[0].uuid.clone()],
                    expected_end: Some(1_000 + i as u64),
                    share_milli,
                    ..Default::default()
                })
                .collect();
            let mut fresh = Fleet::build(&node_inputs, &running);
            let mut reused = template.build(&node_inputs, &running);
            let config = SchedulerConfig::default();
            let a = schedule(&mut fresh, &job_inputs, &config, &TenantState::default(), 100);
            let b = schedule(&mut reused, &job_inputs, &config, &TenantState::default(), 100);
            prop_assert_eq!(format!("{:?}", a.outcomes), format!("{:?}", b.outcomes));
            prop_assert_eq!(fresh.free_gpu_count(), reused.free_gpu_count());
        }
    }

    /// Every placement respects every hard constraint; no GPU twice; gangs whole.
    #[test]
    fn placements_are_valid(node_specs in prop::collection::vec(node_strategy(), 1..30),
                            job_specs in prop::collection::vec(job_strategy(), 1..60),
                            running_frac in 0u32..4) {
        let node_inputs = nodes(&node_specs);
        let facts = gpu_facts(&node_specs);
        // Some GPUs already run work.
        let mut running = Vec::new();
        for (i, n) in node_inputs.iter().enumerate() {
            if i as u32 % 4 < running_frac && !n.gpus.is_empty() {
                running.push(RunningInput {
                    job_id: format!("run-{i}"),
                    tenant: "t0".into(),
                    node_id: n.id.clone(),
                    gpu_uuids: vec![n.gpus[0].uuid.clone()],
                    expected_end: Some(1_000 + i as u64),
                    ..Default::default()
                });
            }
        }
        let job_inputs = jobs(&job_specs);
        let mut fleet = Fleet::build(&node_inputs, &running);
        let result = schedule(&mut fleet, &job_inputs, &SchedulerConfig::default(), &TenantState::default(), 100);
        prop_assert_eq!(result.outcomes.len(), job_inputs.len());

        let mut used: HashSet<String> = running.iter().flat_map(|r| r.gpu_uuids.clone()).collect();
        for (job, (spec, outcome)) in job_inputs.iter().zip(job_specs.iter().zip(&result.outcomes)) {
            let Outcome::Placed(tasks) = outcome else { continue };
            prop_assert_eq!(tasks.len() as u32, job.tasks, "gang all-or-nothing");
            let mut regions = HashSet::new();
            let mut providers = HashSet::new();
            for task in tasks {
                prop_assert_eq!(task.gpu_uuids.len() as u32, job.gpus_per_task);
                let mut task_nodes = HashSet::new();
                for uuid in &task.gpu_uuids {
                    prop_assert!(used.insert(uuid.clone()), "GPU {} allocated twice", uuid);
                    let fact = &facts[uuid];
                    let node = &node_specs[fact.node];
                    task_nodes.insert(fact.node);
                    prop_assert!(fact.healthy, "unhealthy GPU {} used", uuid);
                    prop_assert!(node.schedulable, "unschedulable node used");
                    if let Some(m) = spec.generation {
                        prop_assert_eq!(MODELS[node.model].1, MODELS[m].1);
                    }
                    if let Some(r) = spec.region {
                        prop_assert_eq!(node.region, r);
                    }
                    if let Some(p) = spec.max_price {
                        prop_assert!(node.price <= p, "over bid");
                    }
                }
                prop_assert_eq!(task_nodes.len(), 1, "a task's GPUs are on one node");
                regions.insert(task.region.clone());
                providers.insert(task.provider.clone());
            }
            let locality = match spec.locality {
                Locality::Unspecified if job.tasks > 1 => Locality::Region,
                other => other,
            };
            if locality == Locality::Region {
                prop_assert_eq!(regions.len(), 1, "gang left its region");
            }
            if locality == Locality::Provider {
                prop_assert_eq!(providers.len(), 1, "gang left its provider");
            }
        }
    }

    /// A higher-priority job that does not fit is not starved by a stream of
    /// lower-priority work: it gets a reservation, and backfill (with or
    /// without max runtimes) never delays it past the time the running work
    /// on its reserved node ends.
    #[test]
    fn higher_priority_head_is_never_starved_by_backfill(
        ends in prop::collection::vec(1u64..40, 16),
        stream_runtimes in prop::collection::vec(prop::option::weighted(0.5, 1u64..60), 60),
        gpus_needed in 4u32..=8) {
        let node_inputs = h100_nodes(2);
        // Every GPU busy with one-GPU work ending at a random minute.
        let mut running: Vec<(String, String, Vec<String>, u64)> = (0..16)
            .map(|i| (format!("init-{i}"), format!("n{}", i / 8), vec![format!("GPU-{}-{}", i / 8, i % 8)], ends[i] * 60))
            .collect();
        // The head can start once `gpus_needed` GPUs of one node are free.
        let bound = (0..2)
            .map(|n| {
                let mut node_ends: Vec<u64> = (0..8).map(|g| ends[n * 8 + g] * 60).collect();
                node_ends.sort_unstable();
                node_ends[gpus_needed as usize - 1]
            })
            .min()
            .unwrap_or(0);
        let head = JobInput {
            id: "job-head".into(),
            tenant: "big".into(),
            priority: 10,
            tasks: 1,
            gpus_per_task: gpus_needed,
            ..Default::default()
        };
        let mut started_at = None;
        let mut next = 0usize;
        for minute in 0..120u64 {
            let now = minute * 60;
            running.retain(|r| r.3 > now);
            // One new small job per minute from a lower-priority tenant.
            let mut queue = vec![head.clone()];
            for k in 0..3 {
                let runtime = stream_runtimes[(next + k) % stream_runtimes.len()].map(|m| m * 60);
                queue.push(JobInput {
                    id: format!("small-{}", next + k),
                    tenant: "small".into(),
                    priority: 0,
                    submitted_at: (next + k) as u64,
                    tasks: 1,
                    gpus_per_task: 1,
                    max_runtime_secs: runtime,
                    ..Default::default()
                });
            }
            let inputs: Vec<RunningInput> = running
                .iter()
                .map(|r| RunningInput {
                    job_id: r.0.clone(),
                    node_id: r.1.clone(),
                    gpu_uuids: r.2.clone(),
                    expected_end: (r.3 != u64::MAX).then_some(r.3),
                    ..Default::default()
                })
                .collect();
            let mut fleet = Fleet::build(&node_inputs, &inputs);
            let result = schedule(&mut fleet, &queue, &SchedulerConfig::default(), &TenantState::default(), now);
            if let Outcome::Placed(_) = &result.outcomes[0] {
                started_at = Some(now);
                break;
            }
            for (job, outcome) in queue.iter().zip(&result.outcomes).skip(1) {
                if let Outcome::Placed(tasks) = outcome {
                    next += 1;
                    let end = job.max_runtime_secs.map_or(u64::MAX, |r| now + r);
                    running.push((job.id.clone(), tasks[0].node_id.clone(), tasks[0].gpu_uuids.clone(), end));
                }
            }
        }
        let started = started_at.unwrap_or(u64::MAX);
        // Passes run once a minute, so allow the minute the room appears in.
        prop_assert!(started <= bound + 60, "head started at {started}s, but room was due by {bound}s");
    }
}

/// Three always-backlogged tenants with weights 1, 2 and 3 share 24 GPUs;
/// over a long run each one's GPU time converges to its weight's share.
#[test]
fn fair_share_converges_to_weights() {
    let node_inputs = h100_nodes(3);
    let weights = [1.0, 2.0, 3.0];
    let mut config = SchedulerConfig::default();
    for (t, w) in weights.iter().enumerate() {
        config.tenants.insert(
            format!("t{t}"),
            TenantPolicy {
                weight: *w,
                ..Default::default()
            },
        );
    }
    let mut fair = FairShare::new(3600.0);
    // (job id, tenant, node, gpu uuids, end)
    let mut running: Vec<(String, usize, String, Vec<String>, u64)> = Vec::new();
    let mut gpu_seconds = [0f64; 3];
    let mut next_id = 0u64;
    let step = 60u64;
    let duration = 600u64;
    for tick in 0..2000u64 {
        let now = tick * step;
        running.retain(|r| r.4 > now);
        let mut norm: HashMap<String, f64> = HashMap::new();
        let mut allocated: HashMap<String, HashMap<Generation, u64>> = HashMap::new();
        for r in &running {
            *norm.entry(format!("t{}", r.1)).or_insert(0.0) += r.3.len() as f64;
            *allocated
                .entry(format!("t{}", r.1))
                .or_default()
                .entry(Generation::Hopper)
                .or_insert(0) += r.3.len() as u64 * 1000;
            gpu_seconds[r.1] += (r.3.len() as u64 * step) as f64;
        }
        fair.advance(now, &norm);
        // Each tenant keeps 30 jobs queued.
        let queue: Vec<JobInput> = (0..3)
            .flat_map(|t| {
                (0..30).map(move |k| JobInput {
                    id: format!("q-{t}-{k}"),
                    tenant: format!("t{t}"),
                    submitted_at: now * 1000 + k,
                    tasks: 1,
                    gpus_per_task: 1,
                    max_runtime_secs: Some(duration),
                    ..Default::default()
                })
            })
            .collect();
        let running_inputs: Vec<RunningInput> = running
            .iter()
            .map(|r| RunningInput {
                job_id: r.0.clone(),
                tenant: format!("t{}", r.1),
                node_id: r.2.clone(),
                gpu_uuids: r.3.clone(),
                expected_end: Some(r.4),
                ..Default::default()
            })
            .collect();
        let mut fleet = Fleet::build(&node_inputs, &running_inputs);
        let tenants = TenantState {
            usage: fair.usage().clone(),
            allocated,
        };
        let result = schedule(&mut fleet, &queue, &config, &tenants, now);
        for (job, outcome) in queue.iter().zip(result.outcomes) {
            if let Outcome::Placed(tasks) = outcome {
                let tenant: usize = job.tenant[1..].parse().unwrap();
                next_id += 1;
                running.push((
                    format!("r{next_id}"),
                    tenant,
                    tasks[0].node_id.clone(),
                    tasks[0].gpu_uuids.clone(),
                    now + duration,
                ));
            }
        }
    }
    let total: f64 = gpu_seconds.iter().sum();
    let weight_total: f64 = weights.iter().sum();
    for t in 0..3 {
        let share = gpu_seconds[t] / total;
        let target = weights[t] / weight_total;
        // Stated tolerance: within 5 % of the target share (relative).
        assert!(
            (share - target).abs() / target < 0.05,
            "tenant t{t}: share {share:.3}, target {target:.3}"
        );
    }
}
