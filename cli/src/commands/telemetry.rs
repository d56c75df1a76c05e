//! `gpufleet telemetry`: a metric's history as a terminal chart, and fleet
//! aggregates.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use gpufleet_proto::v1::{GetAggregatesRequest, GetHistoryRequest, GpuGeneration, HistoryPoint};

use crate::client;
use crate::output::{self, Format};

#[derive(Debug, Args)]
pub struct TelemetryArgs {
    #[command(subcommand)]
    command: TelemetryCommand,
}

#[derive(Debug, Subcommand)]
enum TelemetryCommand {
    /// One metric of a GPU (or of each GPU of a node) over time, as a chart.
    History(HistoryArgs),
    /// Utilisation, power and memory grouped by provider, region, generation or model.
    Aggregates {
        /// Group by these dimensions (comma-separated).
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "provider,region"
        )]
        by: Vec<Dimension>,
    },
}

#[derive(Debug, Args)]
struct HistoryArgs {
    /// GPU UUID (see `gpufleet top --once`).
    #[arg(long, conflicts_with = "node", required_unless_present = "node")]
    gpu: Option<String>,
    /// Node id: one chart per GPU of the node.
    #[arg(long)]
    node: Option<String>,
    /// Metric, e.g. gpu_utilization_percent (or util), power_usage_milliwatts
    /// (power), temperature_celsius (temp), memory_used_bytes (mem).
    #[arg(long, default_value = "gpu_utilization_percent")]
    metric: String,
    /// How far back, e.g. 1h, 30m, 2d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    since: Duration,
    /// Step between points, whole minutes (e.g. 1m, 5m); default: the
    /// controller picks one giving at most 500 points.
    #[arg(long, value_parser = humantime::parse_duration)]
    step: Option<Duration>,
    /// Chart height in rows.
    #[arg(long, default_value_t = 8)]
    height: usize,
    /// Chart width in columns.
    #[arg(long, default_value_t = 60)]
    width: usize,
}

use super::nodes::Dimension;

pub async fn run(address: &str, format: Format, args: TelemetryArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        TelemetryCommand::History(args) => history(address, format, args).await,
        TelemetryCommand::Aggregates { by } => aggregates(address, format, &by).await,
    }
}

async fn history(address: &str, format: Format, args: HistoryArgs) -> anyhow::Result<ExitCode> {
    let step_seconds = match args.step {
        None => 0,
        Some(step) => u32::try_from(step.as_secs())
            .ok()
            .filter(|s| *s >= 60 && *s % 60 == 0 && step.subsec_nanos() == 0)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "--step {} is not a whole number of minutes; rollups are per minute (e.g. --step 1m or 5m)",
                    humantime::format_duration(step)
                )
            })?,
    };
    if !(2..=200).contains(&args.height) || !(10..=1000).contains(&args.width) {
        anyhow::bail!("--height must be 2..=200 and --width 10..=1000");
    }
    let start = SystemTime::now()
        .checked_sub(args.since)
        .ok_or_else(|| anyhow::anyhow!("--since {:?} reaches before 1970", args.since))?;
    let mut telemetry = client::telemetry(address).await?;
    let response = telemetry
        .get_history(GetHistoryRequest {
            gpu_uuid: args.gpu.clone().unwrap_or_default(),
            node_id: args.node.clone().unwrap_or_default(),
            metric: args.metric.clone(),
            start: Some(start.into()),
            end: None,
            step_seconds,
        })
        .await?
        .into_inner();
    if format == Format::Json {
        output::print_json(&response, true)?;
        return Ok(ExitCode::SUCCESS);
    }
    for series in &response.series {
        say!(
            "{} on {} ({}), {} per point, last {}",
            response.metric,
            series.gpu_uuid,
            series.node_id,
            humantime::format_duration(Duration::from_secs(u64::from(response.step_seconds))),
            humantime::format_duration(args.since),
        );
        if series.points.is_empty() {
            say!("  no samples in this range");
            continue;
        }
        for line in chart(&series.points, args.width, args.height, &response.unit) {
            say!("{line}");
        }
        let last = series.points.last().map(|p| p.mean).unwrap_or_default();
        let max = series.points.iter().map(|p| p.max).fold(f64::MIN, f64::max);
        let samples: u64 = series.points.iter().map(|p| p.samples).sum();
        say!(
            "  last {} · max {} · {} samples, {} - {}",
            value(last, &response.unit),
            value(max, &response.unit),
            samples,
            output::time(series.points.first().and_then(|p| p.time.as_ref())),
            output::time(series.points.last().and_then(|p| p.time.as_ref())),
        );
        say!();
    }
    Ok(ExitCode::SUCCESS)
}

/// A value with its unit, scaled for people.
fn value(v: f64, unit: &str) -> String {
    match unit {
        "percent" => format!("{v:.0}%"),
        "bytes" => format!("{:.1} GiB", v / (1u64 << 30) as f64),
        "milliwatts" => format!("{:.0} W", v / 1000.0),
        "celsius" => format!("{v:.0}°C"),
        other => format!("{v:.0} {other}"),
    }
}

/// Draws the means as a column chart with eighth-block resolution; each
/// column is one point, or the mean of several when there are more points
/// than columns. The y axis starts at zero (utilisation and power read
/// wrong on an axis that does not).
pub fn chart(points: &[HistoryPoint], width: usize, height: usize, unit: &str) -> Vec<String> {
    const BLOCKS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let columns = points.len().min(width).max(1);
    let values: Vec<f64> = (0..columns)
        .map(|c| {
            let from = c * points.len() / columns;
            let to = ((c + 1) * points.len() / columns).max(from + 1);
            let slice = &points[from..to.min(points.len())];
            slice.iter().map(|p| p.mean).sum::<f64>() / slice.len().max(1) as f64
        })
        .collect();
    let top = values.iter().copied().fold(0.0_f64, f64::max);
    let top = if unit == "percent" {
        100.0
    } else if top > 0.0 {
        top
    } else {
        1.0
    };
    let labels = [value(top, unit), value(top / 2.0, unit), value(0.0, unit)];
    let label_width = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let mut lines = Vec::with_capacity(height);
    for row in 0..height {
        // Eighths of a row filled at this row, per column.
        let row_floor = (height - 1 - row) as f64;
        let mut text = String::with_capacity(columns);
        for v in &values {
            let filled = (v / top * height as f64 - row_floor).clamp(0.0, 1.0);
            text.push(BLOCKS[(filled * 8.0).round() as usize]);
        }
        let label = match row {
            0 => labels[0].as_str(),
            r if r == height / 2 => labels[1].as_str(),
            r if r == height - 1 => labels[2].as_str(),
            _ => "",
        };
        lines.push(format!("{label:>label_width$} ┤{text}"));
    }
    lines
}

async fn aggregates(address: &str, format: Format, by: &[Dimension]) -> anyhow::Result<ExitCode> {
    let mut telemetry = client::telemetry(address).await?;
    let group_by = by.iter().map(|d| d.proto() as i32).collect();
    let response = telemetry
        .get_aggregates(GetAggregatesRequest { group_by })
        .await?
        .into_inner();
    if format == Format::Json {
        output::print_json(&response, true)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut headers: Vec<&str> = by.iter().map(|d| d.header()).collect();
    headers.extend([
        "GPUS",
        "REPORTING",
        "UNHEALTHY",
        "MEAN UTIL",
        "POWER",
        "MEM USED",
    ]);
    let mut table = output::table(&headers);
    let groups = response.groups.iter().map(|g| (g, false));
    for (g, is_total) in groups.chain(response.total.iter().map(|g| (g, true))) {
        let mut row: Vec<String> = by
            .iter()
            .enumerate()
            .map(|(i, d)| match (is_total, i, d) {
                (true, 0, _) => "TOTAL".to_string(),
                (true, _, _) => String::new(),
                (false, _, Dimension::Provider) => g.provider.clone(),
                (false, _, Dimension::Region) => g.region.clone(),
                (false, _, Dimension::Generation) => GpuGeneration::try_from(g.generation)
                    .map(|x| output::enum_label(x.as_str_name(), "GPU_GENERATION_"))
                    .unwrap_or_default(),
                (false, _, Dimension::Model) => g.model.clone(),
            })
            .collect();
        row.extend([
            g.gpus.to_string(),
            g.reporting_gpus.to_string(),
            g.unhealthy_gpus.to_string(),
            format!("{:.0}%", g.mean_gpu_utilization_percent),
            format!("{:.0} W", g.total_power_watts),
            format!(
                "{:.0} GiB",
                g.memory_used_bytes as f64 / (1u64 << 30) as f64
            ),
        ]);
        table.add_row(row);
    }
    output::print_table(&table);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(means: &[f64]) -> Vec<HistoryPoint> {
        means
            .iter()
            .map(|m| HistoryPoint {
                mean: *m,
                max: *m,
                samples: 1,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn chart_scales_percent_to_100_and_draws_full_and_partial_blocks() {
        let lines = chart(&points(&[0.0, 50.0, 100.0]), 60, 4, "percent");
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], "100% ┤  █");
        assert_eq!(lines[2], " 50% ┤ ██");
        assert_eq!(lines[3], "  0% ┤ ██");
        // 25% of 4 rows is exactly the bottom row.
        let lines = chart(&points(&[25.0, 30.0]), 60, 4, "percent");
        assert!(lines[3].ends_with("██"), "{lines:?}");
        assert!(lines[2].ends_with(" ▂"), "{lines:?}");
    }

    #[test]
    fn chart_averages_points_into_the_width() {
        let many: Vec<f64> = (0..100).map(|i| if i < 50 { 0.0 } else { 100.0 }).collect();
        let lines = chart(&points(&many), 10, 2, "percent");
        let top: String = lines[0].chars().skip_while(|c| *c != '┤').skip(1).collect();
        assert_eq!(top, "     █████");
        // Non-percent units scale to the largest value.
        let lines = chart(&points(&[350_000.0, 700_000.0]), 10, 2, "milliwatts");
        assert!(lines[0].starts_with("700 W ┤"), "{lines:?}");
    }
}
