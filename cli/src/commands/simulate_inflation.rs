//! `gpufleet simulate --inflation`: the fragmentation experiment of Weng et
//! al. (ATC'23) on the loaded workload — tasks drawn from it until the
//! arrived GPU demand passes the fleet's capacity, never leaving — every
//! policy on the same draw: a table of unallocated and fragmented GPUs per
//! demand step, the percentage by which each policy beats each at 90–100 %
//! arrived demand, `-o json`, and an SVG chart. The logic is
//! `gpufleet_scheduler::sim::inflation`; this file formats.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use gpufleet_scheduler::sim::inflation::{self, InflationConfig, InflationReport};
use gpufleet_scheduler::sim::{SimPolicy, Workload};
use serde_json::json;

use super::simulate::COLOURS;
use crate::output::Format;

/// The demand range the comparison averages over, percent of capacity.
const COMPARE: (u32, u32) = (90, 100);

/// Most reported steps (so a tiny `--inflation-step` cannot flood output).
const MAX_STEPS: usize = 1000;

/// Runs every policy and prints; `svg` receives the chart.
pub(crate) fn run(
    format: Format,
    workload: &Workload,
    policies: &[SimPolicy],
    config: &InflationConfig,
    svg_path: Option<&Path>,
) -> anyhow::Result<()> {
    if workload.jobs.is_empty() || workload.total_gpus() == 0 {
        anyhow::bail!("--inflation needs a workload with GPU tasks and a fleet with GPUs");
    }
    if config.max_demand_pct < config.first_step_pct {
        anyhow::bail!(
            "--inflation-max {} is below the first step ({} %); give at least {}",
            config.max_demand_pct,
            config.first_step_pct,
            config.first_step_pct
        );
    }
    if config.steps().len() > MAX_STEPS {
        anyhow::bail!("--inflation-step gives more than {MAX_STEPS} steps; use a larger step");
    }
    let tasks = inflation::sample_tasks(workload, config);
    let mut reports = Vec::new();
    let mut walls = Vec::new();
    for &policy in policies {
        let started = Instant::now();
        reports.push(inflation::inflate_tasks(
            workload,
            tasks.clone(),
            policy,
            config,
        ));
        walls.push(started.elapsed().as_secs_f64());
    }
    if let Some(path) = svg_path {
        std::fs::write(path, svg(&reports))
            .with_context(|| format!("writing the chart to {}", path.display()))?;
    }
    match format {
        Format::Json => println!("{}", to_json(workload, config, &reports, &walls)),
        _ => print!("{}", table(workload, config, &reports, &walls)),
    }
    Ok(())
}

fn table(
    workload: &Workload,
    config: &InflationConfig,
    reports: &[InflationReport],
    walls: &[f64],
) -> String {
    let mut out = String::new();
    let tasks = reports.first().map_or(0, |r| r.tasks);
    let _ = writeln!(
        out,
        "inflation (Weng et al., ATC'23): {tasks} tasks drawn with replacement from {} jobs (seed {}) \
         until arrived demand reaches {} % of {} GPUs on {} nodes; no departures; a task that fits nowhere fails.",
        workload.jobs.len(),
        config.seed,
        config.max_demand_pct,
        workload.total_gpus(),
        workload.nodes.len(),
    );
    let _ = writeln!(
        out,
        "unallocated GPUs (% of capacity) / fragmented GPUs (the paper's F(M)) when arrived demand first reaches each step:"
    );
    let mut t = comfy_table::Table::new();
    let mut header = vec!["arrived demand".to_string()];
    header.extend(reports.iter().map(|r| r.policy.label().to_string()));
    t.set_header(header);
    for (i, step) in config.steps().iter().enumerate() {
        let mut cells = vec![format!("{step} %")];
        for r in reports {
            cells.push(match r.points.get(i) {
                Some(p) => format!(
                    "{:.1} ({:.2} %) / {:.1}",
                    p.unallocated_gpus, p.unallocated_pct, p.fragmented_gpus
                ),
                None => "-".to_string(),
            });
        }
        t.add_row(cells);
    }
    let mut cells = vec!["failed tasks".to_string()];
    cells.extend(reports.iter().map(|r| (r.tasks - r.placed).to_string()));
    t.add_row(cells);
    let mut cells = vec!["wall time".to_string()];
    cells.extend(walls.iter().map(|w| format!("{w:.2}s")));
    t.add_row(cells);
    let _ = writeln!(out, "{t}");
    out.push_str(&super::simulate_chart::inflation(reports));

    let (from, to) = COMPARE;
    let _ = writeln!(
        out,
        "fewer unallocated GPUs, mean over {from}–{to} % arrived demand: row vs column (negative: more)"
    );
    let mut m = comfy_table::Table::new();
    let mut header = vec!["".to_string()];
    header.extend(reports.iter().map(|r| r.policy.label().to_string()));
    m.set_header(header);
    for (r, row) in reports.iter().zip(inflation::beats(reports, from, to)) {
        let mut cells = vec![r.policy.label().to_string()];
        cells.extend(row.iter().map(|v| match v {
            Some(v) => format!("{v:+.1} %"),
            None => "-".to_string(),
        }));
        m.add_row(cells);
    }
    let _ = writeln!(out, "{m}");
    let _ = writeln!(
        out,
        "baseline-* policies are simulator baselines, not the gpufleet scheduler (baseline-fgd: FGD, Weng et al., ATC'23, from the paper's description)."
    );
    out
}

fn to_json(
    workload: &Workload,
    config: &InflationConfig,
    reports: &[InflationReport],
    walls: &[f64],
) -> serde_json::Value {
    let (from, to) = COMPARE;
    let beats = inflation::beats(reports, from, to);
    json!({
        "mode": "inflation",
        "workload": {
            "nodes": workload.nodes.len(),
            "gpus": workload.total_gpus(),
            "jobs": workload.jobs.len(),
        },
        "seed": config.seed,
        "max_demand_pct": config.max_demand_pct,
        "policies": reports.iter().zip(walls).zip(&beats).map(|((r, wall), row)| json!({
            "policy": r.policy.label(),
            "baseline": r.policy.is_baseline(),
            "tasks": r.tasks,
            "placed": r.placed,
            "wall_s": wall,
            "mean_unallocated_gpus_90_100": r.mean_unallocated(from, to),
            "fewer_unallocated_pct_than": reports.iter().zip(row)
                .map(|(other, v)| (other.policy.label().to_string(), json!(v)))
                .collect::<serde_json::Map<_, _>>(),
            "points": r.points.iter().map(|p| json!({
                "demand_pct": p.demand_pct,
                "arrived_tasks": p.arrived_tasks,
                "arrived_gpus": p.arrived_milli as f64 / 1000.0,
                "allocated_gpus": p.allocated_milli as f64 / 1000.0,
                "failed_tasks": p.failed_tasks,
                "unallocated_gpus": p.unallocated_gpus,
                "unallocated_pct": p.unallocated_pct,
                "fragmented_gpus": p.fragmented_gpus,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// Unallocated GPUs (y) against arrived demand (x), one polyline per
/// policy, and a legend.
fn svg(reports: &[InflationReport]) -> String {
    let (width, height, left, top) = (900.0, 420.0, 70.0, 30.0);
    let (plot_w, plot_h) = (width - left - 20.0, height - top - 50.0);
    let (x_min, x_max) = reports
        .iter()
        .flat_map(|r| r.points.iter().map(|p| f64::from(p.demand_pct)))
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let (x_min, x_max) = if x_min <= x_max {
        (x_min, x_max.max(x_min + 1.0))
    } else {
        (0.0, 1.0)
    };
    let y_max = reports
        .iter()
        .flat_map(|r| r.points.iter().map(|p| p.unallocated_gpus))
        .fold(1.0f64, f64::max);
    let total = height + 20.0 * reports.len() as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r##"<text x="{left}" y="{}" font-weight="bold">unallocated GPUs vs arrived GPU demand (% of capacity), no departures</text><rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/><text x="{}" y="{}" text-anchor="end">{y_max:.0}</text><text x="{}" y="{}" text-anchor="end">0</text><text x="{left}" y="{}">{x_min:.0} %</text><text x="{}" y="{}" text-anchor="end">{x_max:.0} %</text>"##,
        top - 10.0,
        left - 4.0,
        top + 10.0,
        left - 4.0,
        top + plot_h,
        top + plot_h + 16.0,
        left + plot_w,
        top + plot_h + 16.0,
    );
    for (i, r) in reports.iter().enumerate() {
        let points: Vec<String> = r
            .points
            .iter()
            .map(|p| {
                let px = left + plot_w * (f64::from(p.demand_pct) - x_min) / (x_max - x_min);
                let py = top + plot_h - plot_h * (p.unallocated_gpus / y_max).min(1.0);
                format!("{px:.1},{py:.1}")
            })
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke-width="1.5" stroke="{}" points="{}"/>"#,
            COLOURS[i % COLOURS.len()],
            points.join(" ")
        );
    }
    super::simulate::svg_legend(&mut s, reports.iter().map(|r| r.policy), left, height);
    s.push_str("</svg>\n");
    s
}
