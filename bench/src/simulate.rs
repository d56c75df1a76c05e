//! `gpufleet-bench simulate`: how fast the trace-driven simulator replays.
//! The Alibaba openb trace (8,152 tasks on 1,213 nodes) and a synthetic
//! month (by default 20,000 jobs on 1,000 nodes; the goal's 1,000,000 jobs
//! on 10,000 nodes is `--synthetic-nodes 10000 --synthetic-jobs 1000000`,
//! which the production policies do not yet finish in a minute: the fleet
//! is kept between passes, but the passes themselves now cost that), each under every
//! policy asked for: wall time, simulated seconds per wall second, jobs
//! per second, and the ratio to `baseline-first-fit` on the same input in
//! the same run (the simplest placer: what the engine itself costs). Also
//! the inflation experiment on openb (every policy on one draw).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args as ClapArgs;
use gpufleet_scheduler::sim::{self, SimConfig, SimPolicy, Workload, inflation};
use serde_json::json;

use crate::report::table;

/// Where the project's machines keep the openb trace (never in the repo).
const DEFAULT_TRACES: &str = "/work/shared/traces";
const NODE_FILE: &str = "openb_node_list_gpu_node.csv";
const POD_FILE: &str = "openb_pod_list_default.csv";

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// openb node list; default `/work/shared/traces/openb_node_list_gpu_node.csv` when present.
    #[arg(long, value_name = "FILE")]
    nodes: Option<PathBuf>,
    /// openb pod list; default `/work/shared/traces/openb_pod_list_default.csv` when present.
    #[arg(long, value_name = "FILE")]
    pods: Option<PathBuf>,
    /// Policies replayed, comma-separated (see `gpufleet simulate --policy`).
    #[arg(
        long,
        default_value = "cost,pack,spread,first-fit,baseline-first-fit,baseline-best-fit,baseline-fgd"
    )]
    policy: String,
    /// Nodes of the synthetic month (0: skip it).
    #[arg(long, default_value_t = 1_000)]
    synthetic_nodes: usize,
    /// Jobs of the synthetic month.
    #[arg(long, default_value_t = 20_000)]
    synthetic_jobs: usize,
    /// Policies of the synthetic month (it is long; the baseline is always added).
    #[arg(long, default_value = "cost")]
    synthetic_policy: String,
    /// Seed of the synthetic month and of the inflation draw.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Skip the inflation experiment.
    #[arg(long)]
    no_inflation: bool,
}

fn policies(list: &str) -> anyhow::Result<Vec<SimPolicy>> {
    list.split(',')
        .map(|name| {
            SimPolicy::parse(name).with_context(|| format!("--policy `{}` is unknown", name.trim()))
        })
        .collect()
}

fn trace_path(flag: &str, given: &Option<PathBuf>, file: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.clone());
    }
    let default = Path::new(DEFAULT_TRACES).join(file);
    if default.exists() {
        return Ok(default);
    }
    anyhow::bail!(
        "no openb trace at {}; give {flag} FILE (the Alibaba cluster-trace-gpu-v2023 `{file}`)",
        default.display()
    )
}

struct Run {
    input: &'static str,
    policy: SimPolicy,
    wall_s: f64,
    simulated_s: u64,
    jobs: u64,
    placed: u64,
    passes: u64,
}

fn replay(input: &'static str, workload: &Workload, policy: SimPolicy) -> Run {
    let started = Instant::now();
    let report = sim::simulate(workload, policy, &SimConfig::default());
    Run {
        input,
        policy,
        wall_s: started.elapsed().as_secs_f64(),
        simulated_s: report.end_time,
        jobs: report.jobs,
        placed: report.placed,
        passes: report.passes,
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let nodes = trace_path("--nodes", &args.nodes, NODE_FILE)?;
    let pods = trace_path("--pods", &args.pods, POD_FILE)?;
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let openb = sim::openb::parse(&read(&nodes)?, &read(&pods)?)?;
    let mut with_baseline = policies(&args.policy)?;
    if !with_baseline.contains(&SimPolicy::BaselineFirstFit) {
        with_baseline.push(SimPolicy::BaselineFirstFit);
    }
    let mut runs: Vec<Run> = with_baseline
        .iter()
        .map(|&p| replay("openb", &openb, p))
        .collect();
    if args.synthetic_nodes > 0 {
        let month = sim::workload::synthetic(args.synthetic_nodes, args.synthetic_jobs, args.seed);
        let mut list = policies(&args.synthetic_policy)?;
        if !list.contains(&SimPolicy::BaselineFirstFit) {
            list.push(SimPolicy::BaselineFirstFit);
        }
        for p in list {
            runs.push(replay("synthetic", &month, p));
        }
    }
    let baseline = |input: &str| {
        runs.iter()
            .find(|r| r.input == input && r.policy == SimPolicy::BaselineFirstFit)
            .map_or(f64::NAN, |r| r.wall_s)
    };
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.input.to_string(),
                r.policy.label().to_string(),
                format!("{}/{}", r.placed, r.jobs),
                r.passes.to_string(),
                format!("{:.2}", r.wall_s),
                format!("{:.0}", r.simulated_s as f64 / r.wall_s.max(1e-9)),
                format!("{:.0}", r.jobs as f64 / r.wall_s.max(1e-9)),
                format!("{:.1}×", r.wall_s / baseline(r.input)),
            ]
        })
        .collect();
    println!(
        "openb: {} jobs on {} nodes / {} GPUs; synthetic: {} jobs on {} nodes over 30 days",
        openb.jobs.len(),
        openb.nodes.len(),
        openb.total_gpus(),
        if args.synthetic_nodes > 0 {
            args.synthetic_jobs
        } else {
            0
        },
        args.synthetic_nodes
    );
    table(
        &[
            "input",
            "policy",
            "placed",
            "passes",
            "wall s",
            "sim s / wall s",
            "jobs / s",
            "vs baseline-first-fit",
        ],
        &rows,
    );

    let mut inflation_json = Vec::new();
    if !args.no_inflation {
        let config = inflation::InflationConfig {
            seed: args.seed,
            ..Default::default()
        };
        let tasks = inflation::sample_tasks(&openb, &config);
        let mut rows = Vec::new();
        for &p in &with_baseline {
            let started = Instant::now();
            let r = inflation::inflate_tasks(&openb, tasks.clone(), p, &config);
            let wall = started.elapsed().as_secs_f64();
            let at = |pct: u32| {
                r.points
                    .iter()
                    .find(|x| x.demand_pct == pct)
                    .map_or(f64::NAN, |x| x.unallocated_pct)
            };
            rows.push(vec![
                p.label().to_string(),
                format!("{:.2}", wall),
                format!("{:.2} %", at(90)),
                format!("{:.2} %", at(100)),
                format!("{:.2} %", at(130)),
            ]);
            inflation_json.push(json!({
                "policy": p.label(), "wall_s": wall,
                "unallocated_pct_90": at(90), "unallocated_pct_100": at(100),
                "unallocated_pct_130": at(130),
            }));
        }
        println!(
            "inflation on openb ({} tasks drawn, seed {}): unallocated GPU capacity at arrived demand",
            tasks.len(),
            args.seed
        );
        table(&["policy", "wall s", "@90 %", "@100 %", "@130 %"], &rows);
    }

    let summary = json!({
        "bench": "simulate",
        "runs": runs.iter().map(|r| json!({
            "input": r.input,
            "policy": r.policy.label(),
            "wall_s": r.wall_s,
            "simulated_s_per_wall_s": r.simulated_s as f64 / r.wall_s.max(1e-9),
            "jobs": r.jobs,
            "placed": r.placed,
            "vs_baseline": r.wall_s / baseline(r.input),
        })).collect::<Vec<_>>(),
        "inflation": inflation_json,
    });
    println!("{summary}");
    Ok(())
}
