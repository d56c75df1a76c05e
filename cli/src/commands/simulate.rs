//! `gpufleet simulate`: replays a workload (the Alibaba openb trace format,
//! a synthetic one, or a fleet's own history) through the production
//! scheduler in virtual time — gangs, preemption, max runtimes, tenants'
//! quotas and weights (`--quota`, `--weight`, `--controller-config`) and
//! recorded moving prices (`--prices`) — every policy side by side: a
//! table, `-o json`, and an SVG chart of allocation and stranded GPUs over
//! time. Runs locally; no controller.
//! The logic is `gpufleet_scheduler::sim`; this file reads files, parses
//! flags and formats.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use gpufleet_scheduler::format_usd;
use gpufleet_scheduler::sim::{self, PolicyReport, SIZE_CLASSES, SimConfig, SimPolicy, Workload};
use serde_json::json;

use super::simulate_input;

/// Nodes a synthetic fleet may have (the internet-scale benchmark's fleet
/// is 125,000).
const MAX_SYNTHETIC_NODES: u64 = 1_000_000;
/// Jobs a synthetic month may have (ten times the goal's month).
const MAX_SYNTHETIC_JOBS: u64 = 10_000_000;
/// Longest scheduling cadence and market interval.
const MAX_CADENCE_SECS: u64 = 86_400;
const MAX_MARKET_INTERVAL_SECS: u64 = 30 * 86_400;
use crate::output::Format;

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Node list in the openb format (`sn,cpu_milli,memory_mib,gpu,model`).
    #[arg(long, value_name = "FILE", requires = "pods")]
    nodes: Option<PathBuf>,
    /// Pod list in the openb format (`name,…,num_gpu,gpu_milli,gpu_spec,…,
    /// creation_time,deletion_time,scheduled_time`).
    #[arg(long, value_name = "FILE", requires = "nodes")]
    pods: Option<PathBuf>,
    /// Generate a synthetic fleet of N nodes instead of reading files (1–1,000,000).
    #[arg(long, value_name = "N", conflicts_with_all = ["nodes", "pods"],
          value_parser = clap::value_parser!(u64).range(1..=MAX_SYNTHETIC_NODES))]
    synthetic_nodes: Option<u64>,
    /// Jobs in the synthetic workload, a 30-day month (1–10,000,000).
    #[arg(long, value_name = "M", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=MAX_SYNTHETIC_JOBS))]
    synthetic_jobs: u64,
    /// Synthetic: this percentage of jobs are gangs of 2-4 tasks of 8 GPUs.
    #[arg(long, value_name = "PCT", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    synthetic_gangs: u32,
    /// Synthetic: this percentage of jobs are preemptible batch work at
    /// priority -1, which the others (priority 0) may evict.
    #[arg(long, value_name = "PCT", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    synthetic_preemptible: u32,
    /// Synthetic: this percentage of jobs have a max runtime (1h, 6h or 24h).
    #[arg(long, value_name = "PCT", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    synthetic_max_runtime: u32,
    /// Tenants' weights and quotas (and generation factors, reservation and
    /// preemption limits, fair-share half-life) from a controller
    /// configuration file: its `[tenants.NAME]` tables, as the controller
    /// reads them.
    #[arg(long, value_name = "FILE")]
    controller_config: Option<PathBuf>,
    /// A tenant's quota: most GPUs held at once, in all and per generation
    /// (`unlimited` for no total): ml=16,Hopper=8. Repeatable; overrides
    /// --controller-config for that tenant.
    #[arg(long, value_name = "TENANT=N[,GENERATION=N...]")]
    quota: Vec<String>,
    /// A tenant's fair-share weight, 0 < W <= 1000 (default 1). Repeatable.
    #[arg(long, value_name = "TENANT=W")]
    weight: Vec<String>,
    /// Prices that move: the price history the live system recorded, as
    /// `gpufleet -o json market prices --since 30d` writes it; each node's
    /// price changes at the recorded times (virtual time 0: a --history
    /// replay's first submit, else the file's first change).
    #[arg(long, value_name = "FILE")]
    prices: Option<PathBuf>,
    /// Policies to compare: `all`, or a comma-separated list of cost, pack,
    /// spread, first-fit, baseline-first-fit, baseline-best-fit, baseline-fgd.
    #[arg(long, default_value = "all")]
    policy: String,
    /// Scheduling tick grid in virtual time (`1s`, `30s`, `1m`).
    #[arg(long, default_value = "1s")]
    cadence: String,
    /// Seed of the synthetic generator and of `--inflation`'s draw (the
    /// replay itself has no randomness).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Inflation mode (Weng et al., ATC'23): draw tasks from the workload
    /// until arrived GPU demand reaches `--inflation-max` % of capacity,
    /// never leaving; report unallocated GPUs per demand step.
    #[arg(long)]
    inflation: bool,
    /// Inflation: stop drawing at this arrived demand, percent of capacity.
    #[arg(long, value_name = "PCT", default_value_t = 130,
          value_parser = clap::value_parser!(u32).range(50..=1000), requires = "inflation")]
    inflation_max: u32,
    /// Inflation: report every this many percent of capacity, from 50 %.
    #[arg(long, value_name = "PCT", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=100), requires = "inflation")]
    inflation_step: u32,
    /// Write a chart (allocation % and stranded GPUs over time) to this SVG file.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Replay a fleet's own history: finished allocations as `gpufleet
    /// usage export` writes them (JSON Lines), on the nodes of --fleet.
    #[arg(long, value_name = "FILE", requires = "fleet", conflicts_with_all = ["nodes", "pods", "synthetic_nodes"])]
    history: Option<PathBuf>,
    /// The fleet --history replays on: the output of `gpufleet -o json nodes list`.
    #[arg(long, value_name = "FILE", requires = "history")]
    fleet: Option<PathBuf>,
    /// What-if: add GPUs, e.g. 20xH100-SXM-80GB@nebius/eu-north1:$2.90 (nodes
    /// of 8) or 3x4xA10G@gcp/us-central1:0.80 (3 nodes of 4). Repeatable.
    #[arg(long, value_name = "[NODESx]GPUSxMODEL@PROVIDER/REGION:$PRICE")]
    add: Vec<String>,
    /// What-if: remove a node by id, or the nodes matching KEY=VALUE pairs
    /// (node, model, provider, region, generation; a model may be a family
    /// like V100), the last N of them with count=N. Repeatable.
    #[arg(long, value_name = "NODE|KEY=VALUE[,…][,count=N]")]
    remove: Vec<String>,
    /// What-if: the price per GPU-hour of a model (`*`: all), optionally
    /// at one provider or region: A100-SXM-80GB@aws=$1.50, *@lambda=-20%. Repeatable.
    #[arg(long, value_name = "MODEL[@PROVIDER[/REGION]]=$PRICE|±N%")]
    price: Vec<String>,
    /// What-if: arrivals this many times as fast (inter-arrival times
    /// divided by it; durations unchanged), 0.01 to 100.
    #[arg(long, value_name = "FACTOR")]
    load: Option<String>,
    /// Market signals (gpufleet's policies): at most one snapshot of supply
    /// and demand per this much virtual time, taken after a scheduling pass
    /// and held until the next (`1m`, as the live controller records them).
    #[arg(long, default_value = "1m")]
    market_interval: String,
}

pub fn run(format: Format, args: &SimulateArgs) -> anyhow::Result<ExitCode> {
    let policies = parse_policies(&args.policy)?;
    let cadence = humantime::parse_duration(&args.cadence)
        .map_err(|e| anyhow::anyhow!("--cadence `{}`: {e}; try 1s or 1m", args.cadence))?
        .as_secs();
    if !(1..=MAX_CADENCE_SECS).contains(&cadence) {
        anyhow::bail!("--cadence must be from 1s to 1day (a controller passes every second or so)");
    }
    let edits =
        sim::whatif::Edits::parse(&args.add, &args.remove, &args.price, args.load.as_deref())?;
    let (mut workload, mut input_notes, start_ms) = load(args)?;
    let applied = edits.apply(&mut workload, &simulate_input::catalogue())?;
    input_notes.extend(applied.iter().map(|a| format!("what-if {a}")));
    let mut price_steps = Vec::new();
    if let Some(path) = &args.prices {
        // A fixed --price would be overwritten by each node's recorded
        // history: refuse rather than ignore it.
        if !args.price.is_empty() {
            anyhow::bail!(
                "--price and --prices together: --prices replays each node's recorded price over time, which would \
                 override --price; edit the exported price file instead, or use --price without --prices"
            );
        }
        if args.inflation {
            anyhow::bail!(
                "--prices replays prices over time; --inflation has no time to replay them over"
            );
        }
        let (steps, lines) = simulate_input::read_prices(path, &mut workload.nodes, start_ms)?;
        price_steps = steps;
        input_notes.extend(lines);
    }
    if args.inflation {
        let config = sim::inflation::InflationConfig {
            seed: args.seed,
            max_demand_pct: args.inflation_max,
            step_pct: args.inflation_step,
            ..Default::default()
        };
        super::simulate_inflation::run(format, &workload, &policies, &config, args.svg.as_deref())?;
        return Ok(ExitCode::SUCCESS);
    }
    let market_interval = humantime::parse_duration(&args.market_interval)
        .map_err(|e| {
            anyhow::anyhow!(
                "--market-interval `{}`: {e}; try 1m or 1h",
                args.market_interval
            )
        })?
        .as_secs();
    if !(1..=MAX_MARKET_INTERVAL_SECS).contains(&market_interval) {
        anyhow::bail!(
            "--market-interval must be from 1s to 30days (the live controller records one a minute)"
        );
    }
    let mut config = SimConfig {
        cadence_secs: cadence,
        market_interval_secs: market_interval,
        price_steps,
        ..Default::default()
    };
    if let Some(path) = &args.controller_config {
        let controller = gpufleet_controller::ControllerConfig::load(
            [
                std::ffi::OsString::from("gpufleet-controller"),
                "--config".into(),
                path.clone().into_os_string(),
            ],
            &std::collections::HashMap::new(),
        )
        .map_err(|e| anyhow::anyhow!("--controller-config {}: {e}", path.display()))?;
        config.scheduler = controller.scheduler;
        config.fair_share_half_life_secs = controller.fair_share_half_life.as_secs_f64();
    }
    sim::tenants::apply(&mut config.scheduler.tenants, &args.quota, &args.weight)
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut reports = Vec::new();
    let mut walls = Vec::new();
    for &policy in &policies {
        let started = Instant::now();
        reports.push(sim::simulate(&workload, policy, &config));
        walls.push(started.elapsed().as_secs_f64());
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, svg(&reports))
            .with_context(|| format!("writing the chart to {}", path.display()))?;
    }
    match format {
        Format::Json => println!(
            "{}",
            to_json(&workload, &input_notes, &applied, &reports, &walls)
        ),
        _ => print!("{}", table(&workload, &input_notes, &reports, &walls)),
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_policies(list: &str) -> anyhow::Result<Vec<SimPolicy>> {
    if list.trim().eq_ignore_ascii_case("all") {
        return Ok(SimPolicy::ALL.to_vec());
    }
    list.split(',')
        .map(|name| {
            SimPolicy::parse(name).ok_or_else(|| {
                let known: Vec<&str> = SimPolicy::ALL.iter().map(|p| p.label()).collect();
                anyhow::anyhow!(
                    "--policy `{}` is unknown; use all or {}",
                    name.trim(),
                    known.join(", ")
                )
            })
        })
        .collect()
}

/// The workload, lines saying what its reader changed beyond
/// [`Workload::notes`], and the Unix ms of its virtual time 0 where known.
fn load(args: &SimulateArgs) -> anyhow::Result<(Workload, Vec<String>, Option<u64>)> {
    if args.synthetic_nodes.is_none()
        && (args.synthetic_gangs > 0
            || args.synthetic_preemptible > 0
            || args.synthetic_max_runtime > 0)
    {
        anyhow::bail!(
            "--synthetic-gangs, --synthetic-preemptible and --synthetic-max-runtime shape the synthetic workload: give --synthetic-nodes N"
        );
    }
    if let Some(nodes) = args.synthetic_nodes {
        let mix = sim::SyntheticMix {
            gang_pct: args.synthetic_gangs,
            preemptible_pct: args.synthetic_preemptible,
            max_runtime_pct: args.synthetic_max_runtime,
        };
        let workload = sim::workload::synthetic_with(
            nodes as usize,
            args.synthetic_jobs as usize,
            args.seed,
            mix,
        );
        return Ok((workload, Vec::new(), None));
    }
    if let (Some(history), Some(fleet)) = (&args.history, &args.fleet) {
        let (nodes, mut lines) = simulate_input::read_fleet(fleet)?;
        let records = simulate_input::read_history(history)?;
        let (workload, notes) = sim::history::workload(nodes, &records)
            .map_err(|e| anyhow::anyhow!("--history {}: {e}", history.display()))?;
        lines.extend(history_notes(&notes));
        return Ok((workload, lines, Some(notes.start_unix_ms)));
    }
    let (Some(nodes), Some(pods)) = (&args.nodes, &args.pods) else {
        anyhow::bail!("give --nodes FILE --pods FILE (openb format) or --synthetic-nodes N");
    };
    let max = simulate_input::MAX_TRACE_BYTES;
    let fix = "split the trace";
    let nodes = simulate_input::read_bounded("--nodes", nodes, max, fix)?;
    let pods = simulate_input::read_bounded("--pods", pods, max, fix)?;
    Ok((sim::openb::parse(&nodes, &pods)?, Vec::new(), None))
}

fn history_notes(n: &sim::history::HistoryNotes) -> Vec<String> {
    let mut out = vec![format!(
        "history: {} records of {} jobs, replayed as {} tasks",
        n.records, n.jobs, n.tasks
    )];
    for (count, what) in [
        (
            n.gangs,
            "gangs (jobs of several tasks) replayed as gangs, all tasks or none",
        ),
        (
            n.no_submit_time,
            "tasks without a submit time arrive when they started (older controller)",
        ),
        (
            n.multi_attempt,
            "tasks that ran more than once replayed with their run times summed",
        ),
        (
            n.mig_as_share,
            "MIG instances replayed as their share of a GPU",
        ),
        (
            n.unmodelled_constraints,
            "tasks with provider/region/price/memory/spot constraints replayed without them",
        ),
        (
            n.unplaceable,
            "tasks allowed on no model of this fleet (never placed)",
        ),
    ] {
        if count > 0 {
            out.push(format!("{count} {what}"));
        }
    }
    out
}

/// Gangs, preemptible jobs, jobs with a max runtime.
fn job_kinds(workload: &Workload) -> (usize, usize, usize) {
    let jobs = &workload.jobs;
    (
        jobs.iter().filter(|j| j.tasks > 1).count(),
        jobs.iter().filter(|j| j.preemptible).count(),
        jobs.iter().filter(|j| j.max_runtime.is_some()).count(),
    )
}

fn notes(workload: &Workload) -> Vec<String> {
    let n = &workload.notes;
    let mut out = vec![format!(
        "{} jobs on {} nodes / {} GPUs",
        workload.jobs.len(),
        workload.nodes.len(),
        workload.total_gpus()
    )];
    let (gangs, preemptible, limited) = job_kinds(workload);
    for (count, what) in [
        (gangs, "gangs (jobs of several tasks, placed all or none)"),
        (preemptible, "preemptible jobs"),
        (limited, "jobs with a max runtime"),
    ] {
        if count > 0 {
            out.push(format!("{count} {what}"));
        }
    }
    if n.fractional_shares > 0 {
        out.push(format!(
            "{} fractional tasks replayed as shares of a GPU",
            n.fractional_shares
        ));
    }
    if n.fractional_rounded_up > 0 {
        out.push(format!(
            "{} fractional tasks of several GPUs rounded up to whole GPUs",
            n.fractional_rounded_up
        ));
    }
    if n.skipped_no_gpu > 0 {
        out.push(format!("{} pods without a GPU skipped", n.skipped_no_gpu));
    }
    if n.skipped_no_deletion > 0 {
        out.push(format!(
            "{} pods without a deletion time skipped",
            n.skipped_no_deletion
        ));
    }
    if n.zero_duration > 0 {
        out.push(format!("{} zero-length pods run for 1 s", n.zero_duration));
    }
    out
}

fn secs(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{:.1}m", s as f64 / 60.0),
        _ => format!("{:.1}h", s as f64 / 3600.0),
    }
}

fn table(
    workload: &Workload,
    input_notes: &[String],
    reports: &[PolicyReport],
    walls: &[f64],
) -> String {
    let mut t = comfy_table::Table::new();
    let mut header = vec!["".to_string()];
    header.extend(reports.iter().map(|r| r.policy.label().to_string()));
    t.set_header(header);
    let mut row = |name: &str, f: &dyn Fn(&PolicyReport) -> String| {
        let mut cells = vec![name.to_string()];
        cells.extend(reports.iter().map(f));
        t.add_row(cells);
    };
    row("placed", &|r| format!("{}/{}", r.placed, r.jobs));
    row("never placed", &|r| r.never_placed.to_string());
    row("wait p50/p95/p99", &|r| {
        format!(
            "{} / {} / {}",
            secs(r.waits.p50),
            secs(r.waits.p95),
            secs(r.waits.p99)
        )
    });
    for (i, class) in SIZE_CLASSES.iter().enumerate() {
        row(&format!("  {class} GPU p50/p99"), &|r| {
            let w = r.waits_by_class[i];
            format!("{} / {} (n={})", secs(w.p50), secs(w.p99), w.jobs)
        });
    }
    row("mean allocation", &|r| {
        format!("{:.1} %", r.mean_allocation_pct)
    });
    row("stranded GPUs mean/peak", &|r| {
        format!("{:.1} / {}", r.mean_stranded_gpus, r.peak_stranded_gpus)
    });
    row("GPU-hours", &|r| format!("{:.0}", r.gpu_hours));
    row("preemptions (GPU-h lost)", &|r| {
        format!("{} ({:.1})", r.preemptions, r.preempted_gpu_secs / 3600.0)
    });
    row("stopped at max runtime", &|r| {
        r.max_runtime_stops.to_string()
    });
    row("cost", &|r| format_usd(r.cost_micro_usd));
    row("passes", &|r| r.passes.to_string());
    let wall_of = |r: &PolicyReport| {
        reports
            .iter()
            .position(|x| x.policy == r.policy)
            .and_then(|i| walls.get(i))
            .copied()
            .unwrap_or(0.0)
    };
    row("wall time", &|r| format!("{:.2}s", wall_of(r)));
    row("simulated s / wall s", &|r| {
        format!("{:.0}", r.end_time as f64 / wall_of(r).max(1e-9))
    });
    let mut out = String::new();
    for note in input_notes.iter().cloned().chain(notes(workload)) {
        let _ = writeln!(out, "{note}");
    }
    let _ = writeln!(out, "{t}");
    out.push_str(&super::simulate_chart::replay(reports));
    out.push_str(&market_table(reports));
    let _ = writeln!(
        out,
        "baseline-* policies are simulator baselines, not the gpufleet scheduler (baseline-fgd: FGD, Weng et al., ATC'23, from the paper's description)."
    );
    out
}

/// Regions the replay found tightest, per gpufleet policy: what `gpufleet
/// market tightness` would have shown (time-weighted over the replay).
fn market_table(reports: &[PolicyReport]) -> String {
    const REGIONS_SHOWN: usize = 5;
    let mut t = comfy_table::Table::new();
    t.set_header([
        "market (time-weighted)",
        "region",
        "generation",
        "supply",
        "free",
        "pending demand",
        "tightness mean/peak",
    ]);
    let mut any = false;
    for r in reports.iter().filter(|r| !r.market.is_empty()) {
        for m in r.market.iter().take(REGIONS_SHOWN) {
            any = true;
            t.add_row([
                r.policy.label().to_string(),
                m.region.clone(),
                m.generation.label().to_string(),
                m.supply_gpus.to_string(),
                format!("{:.1}", m.mean_free_gpus),
                format!("{:.1}", m.mean_pending_demand_gpus),
                format!("{:.2} / {:.2}", m.mean_tightness, m.peak_tightness),
            ]);
        }
    }
    if any { format!("{t}\n") } else { String::new() }
}

fn wait_json(w: &sim::WaitStats) -> serde_json::Value {
    json!({ "jobs": w.jobs, "p50_s": w.p50, "p95_s": w.p95, "p99_s": w.p99, "mean_s": w.mean })
}

fn to_json(
    workload: &Workload,
    input_notes: &[String],
    edits: &[String],
    reports: &[PolicyReport],
    walls: &[f64],
) -> serde_json::Value {
    let n = &workload.notes;
    let (gangs, preemptible, limited) = job_kinds(workload);
    json!({
        "notes": input_notes,
        "edits": edits,
        "workload": {
            "nodes": workload.nodes.len(),
            "gpus": workload.total_gpus(),
            "jobs": workload.jobs.len(),
            "fractional_rounded_up": n.fractional_rounded_up,
            "fractional_shares": n.fractional_shares,
            "skipped_no_gpu": n.skipped_no_gpu,
            "skipped_no_deletion": n.skipped_no_deletion,
            "zero_duration": n.zero_duration,
            "gangs": gangs,
            "preemptible_jobs": preemptible,
            "max_runtime_jobs": limited,
        },
        "policies": reports.iter().zip(walls).map(|(r, wall)| json!({
            "policy": r.policy.label(),
            "baseline": r.policy.is_baseline(),
            "jobs": r.jobs,
            "placed": r.placed,
            "never_placed": r.never_placed,
            "wait": wait_json(&r.waits),
            "wait_by_size": SIZE_CLASSES.iter().zip(&r.waits_by_class)
                .map(|(c, w)| (c.to_string(), wait_json(w)))
                .collect::<serde_json::Map<_, _>>(),
            "mean_allocation_pct": r.mean_allocation_pct,
            "mean_stranded_gpus": r.mean_stranded_gpus,
            "peak_stranded_gpus": r.peak_stranded_gpus,
            "gpu_hours": r.gpu_hours,
            "preemptions": r.preemptions,
            "preempted_gpu_seconds": r.preempted_gpu_secs,
            "max_runtime_stops": r.max_runtime_stops,
            "cost_usd": r.cost_micro_usd as f64 / 1e6,
            "passes": r.passes,
            "end_time_s": r.end_time,
            "wall_s": wall,
            "series": downsample(&r.series, 500).iter()
                .map(|s| json!([s.time, s.allocated_gpus, s.stranded_gpus, s.pending_jobs]))
                .collect::<Vec<_>>(),
            "market": r.market.iter().map(|m| json!({
                "region": m.region,
                "generation": m.generation.label(),
                "supply_gpus": m.supply_gpus,
                "mean_free_gpus": m.mean_free_gpus,
                "mean_pending_demand_gpus": m.mean_pending_demand_gpus,
                "mean_tightness": m.mean_tightness,
                "peak_tightness": m.peak_tightness,
                "demand_curve": m.demand_curve.iter()
                    .map(|&(price, gpus)| json!({ "price_usd": price as f64 / 1e6, "gpus": gpus }))
                    .collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// At most about `points` samples, evenly spaced in index, keeping the last.
fn downsample(series: &[sim::Sample], points: usize) -> Vec<sim::Sample> {
    let step = series.len().div_ceil(points.max(1)).max(1);
    let mut out: Vec<sim::Sample> = series.iter().step_by(step).copied().collect();
    if let Some(last) = series.last()
        && out.last() != Some(last)
    {
        out.push(*last);
    }
    out
}

/// What a chart panel plots for one sample of one policy.
type SeriesValue = dyn Fn(&PolicyReport, &sim::Sample) -> f64;

/// One colour per policy, in the order policies are given (the charts of
/// both modes).
pub(crate) const COLOURS: [&str; 7] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
];

/// Two stacked panels (allocation %, stranded GPUs) with one polyline per
/// policy over virtual time, and a legend.
fn svg(reports: &[PolicyReport]) -> String {
    let (width, panel, left, top) = (900.0, 260.0, 70.0, 30.0);
    let plot_w = width - left - 20.0;
    let end = reports.iter().map(|r| r.end_time).max().unwrap_or(1).max(1) as f64;
    let peak_stranded = reports
        .iter()
        .map(|r| r.peak_stranded_gpus)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let height = top + 2.0 * (panel + 50.0) + 20.0 * reports.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let panels: [(&str, f64, Box<SeriesValue>); 2] = [
        (
            "GPU allocation (%)",
            100.0,
            Box::new(|r, x| 100.0 * f64::from(x.allocated_gpus) / r.total_gpus.max(1) as f64),
        ),
        (
            "stranded GPUs (free, unusable by any pending job)",
            peak_stranded,
            Box::new(|_, x| f64::from(x.stranded_gpus)),
        ),
    ];
    for (p, (title, max, value)) in panels.iter().enumerate() {
        let y0 = top + p as f64 * (panel + 50.0);
        let _ = writeln!(
            s,
            r##"<text x="{left}" y="{}" font-weight="bold">{title}</text><rect x="{left}" y="{y0}" width="{plot_w}" height="{panel}" fill="none" stroke="#999"/><text x="{}" y="{}" text-anchor="end">{max:.0}</text><text x="{}" y="{}" text-anchor="end">0</text><text x="{}" y="{}" text-anchor="end">{:.1} h</text>"##,
            y0 - 8.0,
            left - 4.0,
            y0 + 10.0,
            left - 4.0,
            y0 + panel,
            left + plot_w,
            y0 + panel + 14.0,
            end / 3600.0
        );
        for (i, r) in reports.iter().enumerate() {
            let points: Vec<String> = downsample(&r.series, 1500)
                .iter()
                .map(|x| {
                    let px = left + plot_w * x.time as f64 / end;
                    let py = y0 + panel - panel * (value(r, x) / max).min(1.0);
                    format!("{px:.1},{py:.1}")
                })
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke-width="1.2" stroke="{}" points="{}"/>"#,
                COLOURS[i % COLOURS.len()],
                points.join(" ")
            );
        }
    }
    let legend_y = top + 2.0 * (panel + 50.0);
    svg_legend(&mut s, reports.iter().map(|r| r.policy), left, legend_y);
    s.push_str("</svg>\n");
    s
}

/// One line per policy below a chart: its colour, then its name.
pub(crate) fn svg_legend(
    s: &mut String,
    policies: impl Iterator<Item = SimPolicy>,
    left: f64,
    top: f64,
) {
    for (i, policy) in policies.enumerate() {
        let y = top + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{left}" y="{}" width="14" height="4" fill="{}"/><text x="{}" y="{y}">{}</text>"#,
            y - 4.0,
            COLOURS[i % COLOURS.len()],
            left + 20.0,
            policy.label()
        );
    }
}
