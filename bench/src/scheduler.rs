//! Scheduler benchmark.
//!
//! Fleet: 10,000 nodes × 8 GPUs over 7 providers, 24 regions and 7 models
//! with realistic on-demand prices. Queue: 100,000 pending jobs — 70 % one
//! GPU, 20 % eight GPUs, 10 % gangs of 2–32 nodes × 8 GPUs; 30 % with a
//! model or generation constraint; 20 % with a price cap. One full pass with
//! the default policy (`cost`), timed per decision, against the naive
//! baseline (first fit: a linear scan over nodes) on the same inputs. The
//! pass is one `schedule()` call: ordering the queue, every decision and
//! the result; the fleet index (`Fleet::build`) is built before the
//! stopwatch starts and is timed apart.
//! Then fragmentation: a long random churn on a smaller fleet, counting
//! pending 8-GPU jobs that could not be placed although 8 GPUs were free in
//! one region — `pack` against first fit.

use std::collections::HashMap;
use std::time::Instant;

use gpufleet_scheduler::{
    Constraints, Fleet, Generation, GpuInput, JobInput, Locality, NodeInput, Outcome, Policy,
    RunningInput, SchedulerConfig, TenantState, schedule,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::report;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Nodes (8 GPUs each).
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Pending jobs.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Jobs given to the first-fit baseline (the ratio compares rates).
    #[arg(long, default_value_t = 100_000)]
    baseline_jobs: usize,
    /// Churn steps for the fragmentation measurement.
    #[arg(long, default_value_t = 400)]
    churn_steps: usize,
    /// Offered load during churn (GPU demand ÷ capacity).
    #[arg(long, default_value_t = 0.85)]
    churn_load: f64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Network blocks per region (the nodes' `topology.block` labels) for
    /// the main pass; 0: no labels, gangs skip the block tier.
    #[arg(long, default_value_t = 0)]
    blocks: usize,
}

/// (model, generation, memory GiB, compute capability, base price USD/GPU-h)
type ModelRow = (&'static str, Generation, u64, (u32, u32), f64);
const MODELS: &[ModelRow] = &[
    ("B200-SXM-180GB", Generation::Blackwell, 180, (10, 0), 6.25),
    ("H200-SXM-141GB", Generation::Hopper, 141, (9, 0), 3.80),
    ("H100-SXM-80GB", Generation::Hopper, 80, (9, 0), 3.20),
    ("A100-SXM-80GB", Generation::Ampere, 80, (8, 0), 1.90),
    ("L40S", Generation::Ada, 48, (8, 9), 1.35),
    ("L4", Generation::Ada, 24, (8, 9), 0.80),
    ("A10G", Generation::Ampere, 24, (8, 6), 1.01),
];

/// (provider, regions, price multiplier)
const PROVIDERS: &[(&str, &[&str], f64)] = &[
    (
        "aws",
        &["us-east-1", "us-west-2", "eu-west-1", "ap-northeast-1"],
        1.25,
    ),
    ("azure", &["eastus", "westeurope", "southcentralus"], 1.30),
    (
        "gcp",
        &["us-central1", "europe-west4", "asia-southeast1"],
        1.20,
    ),
    (
        "coreweave",
        &["us-east-04", "us-west-09", "eu-south-03", "us-central-07"],
        1.10,
    ),
    ("lambda", &["us-west-1", "us-south-1", "us-east-3"], 0.85),
    ("nebius", &["eu-north1", "eu-west1", "us-central1"], 0.90),
    (
        "oracle",
        &["us-ashburn-1", "eu-frankfurt-1", "uk-london-1"],
        1.00,
    ),
];

pub fn fleet_inputs(nodes: usize, rng: &mut StdRng) -> Vec<NodeInput> {
    let regions: Vec<(usize, &str)> = PROVIDERS
        .iter()
        .enumerate()
        .flat_map(|(p, (_, regions, _))| regions.iter().map(move |r| (p, *r)))
        .collect();
    // Each region offers three models.
    let offers: Vec<[usize; 3]> = regions
        .iter()
        .map(|_| {
            let mut picks = [0usize; 3];
            for (i, pick) in picks.iter_mut().enumerate() {
                *pick = (rng.random_range(0..MODELS.len()) + i * 2) % MODELS.len();
            }
            picks
        })
        .collect();
    (0..nodes)
        .map(|n| {
            let r = n % regions.len();
            let (p, region) = regions[r];
            let model = offers[r][rng.random_range(0..3)];
            let (name, generation, gib, cc, base) = MODELS[model];
            let (provider, _, multiplier) = PROVIDERS[p];
            let spot = rng.random_bool(0.1);
            let price = base * multiplier * if spot { 0.4 } else { 1.0 };
            NodeInput {
                id: format!("{provider}-{region}-{n}"),
                provider: provider.to_string(),
                region: region.to_string(),
                price_per_gpu_hour_micro_usd: (price * 1_000_000.0) as u64,
                spot,
                schedulable: true,
                gpus: (0..8)
                    .map(|g| GpuInput {
                        uuid: format!("GPU-{n:06}-{g}"),
                        model: name.to_string(),
                        generation,
                        memory_bytes: gib << 30,
                        compute_capability: cc,
                        healthy: true,
                        ..Default::default()
                    })
                    .collect(),
                nvlink_groups: Vec::new(),
                ..Default::default()
            }
        })
        .collect()
}

pub fn job_inputs(count: usize, rng: &mut StdRng) -> Vec<JobInput> {
    (0..count)
        .map(|i| {
            let kind: f64 = rng.random();
            let (tasks, gpus) = if kind < 0.7 {
                (1, 1)
            } else if kind < 0.9 {
                (1, 8)
            } else {
                (rng.random_range(2..=32), 8)
            };
            let mut constraints = Constraints::default();
            if rng.random_bool(0.3) {
                if rng.random_bool(0.5) {
                    constraints.models =
                        vec![MODELS[rng.random_range(0..MODELS.len())].0.to_string()];
                } else {
                    constraints.min_generation = Some(Generation::Hopper);
                }
            }
            if rng.random_bool(0.2) {
                constraints.max_price_per_gpu_hour_micro_usd =
                    Some(rng.random_range(1_000_000..4_000_000));
            }
            constraints.locality = if tasks > 1 {
                Locality::Region
            } else {
                Locality::Any
            };
            JobInput {
                id: format!("job-{i:012x}"),
                tenant: format!("tenant-{}", rng.random_range(0..50)),
                priority: if rng.random_bool(0.1) { 10 } else { 0 },
                submitted_at: i as u64,
                tasks,
                gpus_per_task: gpus,
                constraints,
                max_runtime_secs: rng.random_bool(0.5).then(|| rng.random_range(600..86_400)),
                ..Default::default()
            }
        })
        .collect()
}

struct PassFigures {
    jobs: usize,
    placed: usize,
    gpus_placed: usize,
    pass_secs: f64,
    decisions_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// Over decisions that placed a job only.
    placing_p50_us: f64,
    placing_p99_us: f64,
}

fn run_pass(nodes: &[NodeInput], jobs: &[JobInput], policy: Option<Policy>) -> PassFigures {
    let mut fleet = Fleet::build(nodes, &[]);
    let jobs: Vec<JobInput> = jobs
        .iter()
        .cloned()
        .map(|mut j| {
            if policy.is_some() {
                j.policy = policy;
            }
            j
        })
        .collect();
    let config = SchedulerConfig {
        measure_decisions: true,
        ..Default::default()
    };
    let started = Instant::now();
    let result = schedule(
        &mut fleet,
        &jobs,
        &config,
        &TenantState::default(),
        1_000_000,
    );
    let pass_secs = started.elapsed().as_secs_f64();
    let gpus_placed = fleet.gpu_count() - fleet.free_gpu_count();
    let mut nanos: Vec<u64> = result.decision_nanos.iter().map(|(_, n)| *n).collect();
    nanos.sort_unstable();
    let mut placing: Vec<u64> = result
        .decision_nanos
        .iter()
        .filter(|(i, _)| matches!(result.outcomes[*i], Outcome::Placed(_)))
        .map(|(_, n)| *n)
        .collect();
    placing.sort_unstable();
    PassFigures {
        jobs: jobs.len(),
        placed: result.placed,
        gpus_placed,
        pass_secs,
        decisions_per_sec: jobs.len() as f64 / pass_secs,
        p50_us: report::percentile(&nanos, 50.0) as f64 / 1000.0,
        p99_us: report::percentile(&nanos, 99.0) as f64 / 1000.0,
        max_us: nanos.last().copied().unwrap_or(0) as f64 / 1000.0,
        placing_p50_us: report::percentile(&placing, 50.0) as f64 / 1000.0,
        placing_p99_us: report::percentile(&placing, 99.0) as f64 / 1000.0,
    }
}

/// Churn on a smaller fleet at moderate load, with a persistent queue.
/// Returns the share of (pending 8-GPU job, step) pairs where the job could
/// not be placed although its region had 8 or more free GPUs (spread over
/// nodes: fragmentation), and the number of such pairs observed.
fn fragmentation(
    nodes: &[NodeInput],
    policy: Policy,
    steps: usize,
    load: f64,
    seed: u64,
) -> Fragmentation {
    let mut rng = StdRng::seed_from_u64(seed);
    let capacity: usize = nodes.iter().map(|n| n.gpus.len()).sum();
    // Mean GPUs per job 2.9, mean runtime 32 steps.
    let arrivals_per_step = ((capacity as f64 * load) / (2.9 * 32.0)).max(1.0) as usize;
    let mut running: Vec<(RunningInput, u64)> = Vec::new();
    let mut queue: Vec<JobInput> = Vec::new();
    let mut blocked_fragmented = 0usize;
    let mut free_total = 0usize;
    let mut stranded = 0usize;
    let mut pending_eight = 0usize;
    let mut next = 0u64;
    for step in 0..steps as u64 {
        running.retain(|(_, end)| *end > step);
        for _ in 0..arrivals_per_step {
            next += 1;
            let gpus = match rng.random_range(0..10) {
                0..=4 => 1,
                5..=6 => 2,
                7 => 4,
                _ => 8,
            };
            queue.push(JobInput {
                id: format!("c-{next}"),
                tenant: "t".into(),
                submitted_at: next,
                tasks: 1,
                gpus_per_task: gpus,
                policy: Some(policy),
                max_runtime_secs: Some(rng.random_range(5..60)),
                ..Default::default()
            });
        }
        let inputs: Vec<RunningInput> = running.iter().map(|(r, _)| r.clone()).collect();
        let mut fleet = Fleet::build(nodes, &inputs);
        let result = schedule(
            &mut fleet,
            &queue,
            &SchedulerConfig::default(),
            &TenantState::default(),
            step,
        );
        let mut used: std::collections::HashSet<String> = running
            .iter()
            .flat_map(|(r, _)| r.gpu_uuids.iter().cloned())
            .collect();
        let mut still = Vec::new();
        for (job, outcome) in queue.drain(..).zip(result.outcomes) {
            match outcome {
                Outcome::Placed(tasks) => {
                    let end = step + job.max_runtime_secs.unwrap_or(10);
                    for t in tasks {
                        used.extend(t.gpu_uuids.iter().cloned());
                        running.push((
                            RunningInput {
                                job_id: job.id.clone(),
                                node_id: t.node_id.clone(),
                                gpu_uuids: t.gpu_uuids.clone(),
                                expected_end: Some(end),
                                ..Default::default()
                            },
                            end,
                        ));
                    }
                }
                _ => still.push(job),
            }
        }
        queue = still;
        if step < steps as u64 / 4 {
            continue; // warm-up
        }
        let mut free_by_region: HashMap<&str, usize> = HashMap::new();
        for node in nodes {
            let free = node.gpus.iter().filter(|g| !used.contains(&g.uuid)).count();
            *free_by_region.entry(node.region.as_str()).or_insert(0) += free;
        }
        let most_free = free_by_region.values().copied().max().unwrap_or(0);
        // Free GPUs stranded on nodes that cannot host an 8-GPU task.
        for node in nodes {
            let free = node.gpus.iter().filter(|g| !used.contains(&g.uuid)).count();
            free_total += free;
            if free < 8 {
                stranded += free;
            }
        }
        let pending = queue.iter().filter(|j| j.gpus_per_task == 8).count();
        pending_eight += pending;
        if most_free >= 8 {
            blocked_fragmented += pending;
        }
    }
    let share = if pending_eight == 0 {
        0.0
    } else {
        blocked_fragmented as f64 / pending_eight as f64
    };
    let stranded_share = if free_total == 0 {
        0.0
    } else {
        stranded as f64 / free_total as f64
    };
    Fragmentation {
        blocked_share: share,
        pending_eight,
        stranded_share,
    }
}

struct Fragmentation {
    blocked_share: f64,
    pending_eight: usize,
    stranded_share: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut nodes = fleet_inputs(args.nodes, &mut rng);
    let jobs = job_inputs(args.jobs, &mut rng);
    if args.blocks > 0 {
        // Node n is in region n mod regions: its block splits each region.
        let regions: usize = PROVIDERS.iter().map(|(_, r, _)| r.len()).sum();
        for (n, node) in nodes.iter_mut().enumerate() {
            node.block = format!("b{}", (n / regions) % args.blocks);
        }
    }

    let rss_before = report::rss_bytes();
    let build_started = Instant::now();
    let fleet = Fleet::build(&nodes, &[]);
    // Not part of the pass (`schedule()` takes a built fleet); shown so that
    // the whole cost is visible.
    let build_secs = build_started.elapsed().as_secs_f64();
    let rss_after = report::rss_bytes();
    let gpus = fleet.gpu_count();
    let bytes_per_gpu = rss_after.saturating_sub(rss_before) as f64 / gpus.max(1) as f64;
    drop(fleet);

    let ours = run_pass(&nodes, &jobs, None);
    let baseline_jobs = &jobs[..args.baseline_jobs.min(jobs.len())];
    let baseline = run_pass(&nodes, baseline_jobs, Some(Policy::FirstFit));
    let ratio = ours.decisions_per_sec / baseline.decisions_per_sec.max(1e-9);

    // Fragmentation on a fleet of 500 nodes under churn.
    let small = fleet_inputs(500, &mut StdRng::seed_from_u64(args.seed + 1));
    let pack = fragmentation(
        &small,
        Policy::Pack,
        args.churn_steps,
        args.churn_load,
        args.seed,
    );
    let first = fragmentation(
        &small,
        Policy::FirstFit,
        args.churn_steps,
        args.churn_load,
        args.seed,
    );

    // Mixed units (whole, MIG, shares) on the same small fleet, a quarter
    // of its nodes with four MIG GPUs.
    let mixed_nodes = crate::scheduler_mixed::with_mig(small.clone());
    let mixed = crate::scheduler_mixed::churn(
        &mixed_nodes,
        Policy::Pack,
        args.churn_steps / 2,
        args.churn_load,
        args.seed,
    );
    let mixed_first = crate::scheduler_mixed::churn(
        &mixed_nodes,
        Policy::FirstFit,
        args.churn_steps / 2,
        args.churn_load,
        args.seed,
    );
    let rate = |m: &crate::scheduler_mixed::Mixed| m.placed as f64 / m.arrived.max(1) as f64;

    println!(
        "scheduler: {} nodes, {gpus} GPUs, {} pending jobs{}",
        args.nodes,
        jobs.len(),
        if args.blocks > 0 {
            format!(", {} network blocks per region", args.blocks)
        } else {
            String::new()
        }
    );
    report::table(
        &[
            "policy",
            "jobs",
            "placed",
            "GPUs placed",
            "pass (s)",
            "decisions/s",
            "p50 (µs)",
            "p99 (µs)",
            "max (µs)",
            "placing p50/p99 (µs)",
        ],
        &[
            row("cost (gpufleet)", &ours),
            row("first fit (baseline)", &baseline),
        ],
    );
    println!();
    report::table(
        &["figure", "value", "goal"],
        &[
            vec![
                "decisions/s vs baseline".into(),
                format!("{ratio:.1}x"),
                "-".into(),
            ],
            vec![
                "scheduler memory per GPU".into(),
                format!("{bytes_per_gpu:.0} B"),
                "<= 1024 B".into(),
            ],
            vec![
                "decisions/s".into(),
                format!("{:.0}", ours.decisions_per_sec),
                ">= 100000".into(),
            ],
            vec![
                "p99 per decision".into(),
                format!("{:.1} µs", ours.p99_us),
                "<= 100 µs".into(),
            ],
            vec![
                "full pass".into(),
                format!("{:.2} s", ours.pass_secs),
                "<= 2 s".into(),
            ],
            vec![
                "fleet index build (before the pass)".into(),
                format!("{build_secs:.2} s"),
                "-".into(),
            ],
            vec![
                "8-GPU jobs blocked by fragmentation, pack".into(),
                format!(
                    "{:.1} % of {} pending job-steps",
                    pack.blocked_share * 100.0,
                    pack.pending_eight
                ),
                "lower is better".into(),
            ],
            vec![
                "8-GPU jobs blocked by fragmentation, first fit".into(),
                format!(
                    "{:.1} % of {} pending job-steps",
                    first.blocked_share * 100.0,
                    first.pending_eight
                ),
                "-".into(),
            ],
            vec![
                "free GPUs stranded (< 8 free on node), pack".into(),
                format!("{:.1} %", pack.stranded_share * 100.0),
                "lower is better".into(),
            ],
            vec![
                "free GPUs stranded (< 8 free on node), first fit".into(),
                format!("{:.1} %", first.stranded_share * 100.0),
                "-".into(),
            ],
        ],
    );
    println!();
    println!(
        "mixed units (45 % shares, 15 % MIG, 40 % whole) on {} nodes, {} steps at {:.0} % load:",
        mixed_nodes.len(),
        args.churn_steps / 2,
        args.churn_load * 100.0
    );
    let mixed_row = |name: &str, m: &crate::scheduler_mixed::Mixed| {
        vec![
            name.to_string(),
            m.arrived.to_string(),
            m.placed.to_string(),
            format!("{:.1} %", rate(m) * 100.0),
            format!("{:.1} %", m.utilisation * 100.0),
            format!("{:.2} %", m.stranded * 100.0),
            format!("{:.2}", m.pass_secs),
        ]
    };
    report::table(
        &[
            "policy",
            "arrived",
            "placed",
            "placement rate",
            "GPU capacity allocated",
            "capacity stranded",
            "passes (s)",
        ],
        &[
            mixed_row("pack (gpufleet)", &mixed),
            mixed_row("first fit (baseline)", &mixed_first),
        ],
    );
    let summary = serde_json::json!({
        "bench": "scheduler",
        "nodes": args.nodes,
        "gpus": gpus,
        "jobs": jobs.len(),
        "placed": ours.placed,
        "gpus_placed": ours.gpus_placed,
        "pass_seconds": ours.pass_secs,
        "fleet_build_seconds": build_secs,
        "decisions_per_second": ours.decisions_per_sec,
        "p50_us": ours.p50_us,
        "p99_us": ours.p99_us,
        "max_us": ours.max_us,
        "placing_p50_us": ours.placing_p50_us,
        "placing_p99_us": ours.placing_p99_us,
        "baseline_jobs": baseline.jobs,
        "baseline_decisions_per_second": baseline.decisions_per_sec,
        "baseline_p99_us": baseline.p99_us,
        "ratio_vs_baseline": ratio,
        "memory_bytes_per_gpu": bytes_per_gpu,
        "churn_load": args.churn_load,
        "fragmentation_pack": pack.blocked_share,
        "fragmentation_first_fit": first.blocked_share,
        "pending_8gpu_job_steps_pack": pack.pending_eight,
        "pending_8gpu_job_steps_first_fit": first.pending_eight,
        "stranded_free_share_pack": pack.stranded_share,
        "stranded_free_share_first_fit": first.stranded_share,
        "mixed_placement_rate_pack": rate(&mixed),
        "mixed_placement_rate_first_fit": rate(&mixed_first),
        "mixed_allocated_share_pack": mixed.utilisation,
        "mixed_allocated_share_first_fit": mixed_first.utilisation,
        "mixed_stranded_share_pack": mixed.stranded,
        "mixed_stranded_share_first_fit": mixed_first.stranded,
    });
    println!("{summary}");
    Ok(())
}

fn row(name: &str, f: &PassFigures) -> Vec<String> {
    vec![
        name.to_string(),
        f.jobs.to_string(),
        f.placed.to_string(),
        f.gpus_placed.to_string(),
        format!("{:.3}", f.pass_secs),
        format!("{:.0}", f.decisions_per_sec),
        format!("{:.1}", f.p50_us),
        format!("{:.1}", f.p99_us),
        format!("{:.1}", f.max_us),
        format!("{:.1}/{:.1}", f.placing_p50_us, f.placing_p99_us),
    ]
}
