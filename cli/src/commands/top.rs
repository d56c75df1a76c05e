//! `gpufleet top`: the whole fleet's GPUs in one refreshing table, like
//! nvtop across hosts. Redraws with plain ANSI clear-screen; `--once`
//! prints a single frame for scripts and tests.

use std::cmp::Ordering;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use gpufleet_proto::v1::{GetLatestRequest, GetLatestResponse, GpuHealth, GpuLatest, NodeState};

use crate::client;
use crate::output::{self, Format};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortKey {
    /// Node, then GPU index.
    Node,
    /// Highest utilisation first.
    Util,
    /// Highest power first.
    Power,
    /// Hottest first.
    Temp,
    /// Most memory used first.
    Mem,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Sort rows by this column.
    #[arg(long, value_enum, default_value = "node")]
    sort: SortKey,
    /// Time between refreshes, e.g. 2s or 500ms.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Print one frame and exit (no screen clearing).
    #[arg(long)]
    once: bool,
    /// Only GPUs of this provider.
    #[arg(long)]
    provider: Option<String>,
    /// Only GPUs in this region.
    #[arg(long)]
    region: Option<String>,
    /// Only GPUs of this node.
    #[arg(long)]
    node: Option<String>,
}

pub async fn run(address: &str, format: Format, args: TopArgs) -> anyhow::Result<ExitCode> {
    if args.interval < Duration::from_millis(100) {
        anyhow::bail!(
            "--interval {} is too short; use at least 100ms",
            humantime::format_duration(args.interval)
        );
    }
    let mut telemetry = client::telemetry(address).await?;
    let request = GetLatestRequest {
        node_id: args.node.clone().unwrap_or_default(),
        provider: args.provider.clone().unwrap_or_default(),
        region: args.region.clone().unwrap_or_default(),
        ..Default::default()
    };
    loop {
        let response = telemetry.get_latest(request.clone()).await?.into_inner();
        if format == Format::Json {
            // One object per frame: a stream of JSON lines when live.
            output::print_json(&response, args.once)?;
        } else {
            if !args.once {
                // Home + clear: redraw in place without a TUI framework.
                print!("\x1b[H\x1b[2J");
            }
            for line in render_frame(&response, args.sort) {
                output::line(&line);
            }
        }
        if args.once {
            return Ok(ExitCode::SUCCESS);
        }
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}

fn compare(a: &GpuLatest, b: &GpuLatest, key: SortKey) -> Ordering {
    let metric = |g: &GpuLatest| -> Option<u64> {
        let s = g.sample.as_ref()?;
        match key {
            SortKey::Node => None,
            SortKey::Util => s.gpu_utilization_percent.map(u64::from),
            SortKey::Power => s.power_usage_milliwatts.map(u64::from),
            SortKey::Temp => s.temperature_celsius.map(u64::from),
            SortKey::Mem => s.memory_used_bytes,
        }
    };
    let by_node = |a: &GpuLatest, b: &GpuLatest| {
        let index = |g: &GpuLatest| g.info.as_ref().map_or(0, |i| i.index);
        a.node_id.cmp(&b.node_id).then(index(a).cmp(&index(b)))
    };
    // Highest first; GPUs without the value last; ties by node.
    metric(b).cmp(&metric(a)).then_with(|| by_node(a, b))
}

fn health_label(health: GpuHealth) -> &'static str {
    match health {
        GpuHealth::Healthy => "ok",
        GpuHealth::Degraded => "degraded",
        GpuHealth::Unhealthy => "UNHEALTHY",
        GpuHealth::Unspecified => "-",
    }
}

/// One screen: a summary line and one row per GPU.
pub fn render_frame(response: &GetLatestResponse, sort: SortKey) -> Vec<String> {
    let mut gpus: Vec<&GpuLatest> = response.gpus.iter().collect();
    gpus.sort_by(|a, b| compare(a, b, sort));
    let reporting: Vec<_> = gpus.iter().filter_map(|g| g.sample.as_ref()).collect();
    let utils: Vec<u32> = reporting
        .iter()
        .filter_map(|s| s.gpu_utilization_percent)
        .collect();
    let mean_util = if utils.is_empty() {
        "-".to_string()
    } else {
        format!(
            "{:.0}%",
            utils.iter().map(|u| f64::from(*u)).sum::<f64>() / utils.len() as f64
        )
    };
    let power_w: f64 = reporting
        .iter()
        .filter_map(|s| s.power_usage_milliwatts)
        .map(|p| f64::from(p) / 1000.0)
        .sum();
    let nodes: std::collections::BTreeSet<&str> = gpus.iter().map(|g| g.node_id.as_str()).collect();
    let busy = gpus.iter().filter(|g| !g.job_id.is_empty()).count();
    let dropped: u64 = response.nodes.iter().map(|n| n.samples_dropped).sum();
    let mut lines = vec![format!(
        "gpufleet top — {} nodes, {} GPUs ({} allocated), mean util {}, power {:.0} W, dropped samples {} — {}",
        nodes.len(),
        gpus.len(),
        busy,
        mean_util,
        power_w,
        dropped,
        output::time(response.as_of.as_ref()),
    )];
    let mut table = output::table(&[
        "NODE",
        "GPU",
        "PROVIDER/REGION",
        "MODEL",
        "UTIL",
        "SM",
        "TENSOR",
        "MEM",
        "TEMP",
        "POWER",
        "HEALTH",
        "JOB",
    ]);
    for gpu in gpus {
        let info = gpu.info.clone().unwrap_or_default();
        let s = gpu.sample.clone().unwrap_or_default();
        let node = if gpu.node_state() == NodeState::Ready {
            gpu.node_id.clone()
        } else {
            format!(
                "{} ({})",
                gpu.node_id,
                output::enum_label(gpu.node_state().as_str_name(), "NODE_STATE_")
            )
        };
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        table.add_row(vec![
            node,
            info.index.to_string(),
            format!("{}/{}", gpu.provider, gpu.region),
            info.model,
            s.gpu_utilization_percent
                .map_or("-".into(), |u| format!("{u}%")),
            profiling_cell(&s, |g| g.sm_active),
            profiling_cell(&s, |g| g.tensor_active),
            match (s.memory_used_bytes, s.memory_total_bytes) {
                (Some(used), Some(total)) => format!("{:.1}/{:.0} GiB", gib(used), gib(total)),
                (Some(used), None) => format!("{:.1} GiB", gib(used)),
                _ => "-".into(),
            },
            s.temperature_celsius
                .map_or("-".into(), |t| format!("{t}°C")),
            s.power_usage_milliwatts
                .map_or("-".into(), |p| format!("{} W", p / 1000)),
            health_label(gpu.health()).to_string(),
            if gpu.job_id.is_empty() {
                "-".into()
            } else {
                gpu.job_id.clone()
            },
        ]);
    }
    for line in table.to_string().lines() {
        lines.push(
            line.strip_prefix(' ')
                .unwrap_or(line)
                .trim_end()
                .to_string(),
        );
    }
    if response.gpus.is_empty() {
        lines.push("no GPUs match: start an agent, or loosen the filters".to_string());
    }
    lines
}

/// A GPM activity (0–1) as a percentage: the GPU's own, or the busiest
/// MIG instance's with a `*` (a MIG GPU reports per instance); `-` on a GPU
/// without GPM (before Hopper).
fn profiling_cell(
    s: &gpufleet_proto::v1::GpuSample,
    pick: fn(&gpufleet_proto::v1::GpmMetrics) -> Option<f64>,
) -> String {
    if let Some(v) = s.gpm.as_ref().and_then(pick) {
        return format!("{:.0}%", v * 100.0);
    }
    s.mig_samples
        .iter()
        .filter_map(|m| m.gpm.as_ref().and_then(pick))
        .reduce(f64::max)
        .map_or("-".into(), |v| format!("{:.0}%*", v * 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::{GpuInfo, GpuSample};

    fn gpu(node: &str, index: u32, util: Option<u32>, power_w: u32) -> GpuLatest {
        GpuLatest {
            node_id: node.into(),
            provider: "aws".into(),
            region: "r".into(),
            node_state: NodeState::Ready as i32,
            info: Some(GpuInfo {
                index,
                model: "H100".into(),
                ..Default::default()
            }),
            health: GpuHealth::Healthy as i32,
            sample: Some(GpuSample {
                gpu_utilization_percent: util,
                power_usage_milliwatts: Some(power_w * 1000),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn nodes_in(lines: &[String]) -> Vec<String> {
        lines[2..]
            .iter()
            .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join("#"))
            .collect()
    }

    #[test]
    fn sorts_by_the_chosen_column_missing_values_last() {
        let response = GetLatestResponse {
            gpus: vec![
                gpu("b", 0, Some(10), 300),
                gpu("a", 1, None, 100),
                gpu("a", 0, Some(90), 200),
            ],
            ..Default::default()
        };
        let by_node = render_frame(&response, SortKey::Node);
        assert_eq!(nodes_in(&by_node), vec!["a#0", "a#1", "b#0"]);
        let by_util = render_frame(&response, SortKey::Util);
        assert_eq!(nodes_in(&by_util), vec!["a#0", "b#0", "a#1"]);
        let by_power = render_frame(&response, SortKey::Power);
        assert_eq!(nodes_in(&by_power), vec!["b#0", "a#0", "a#1"]);
        assert!(by_node[0].contains("2 nodes, 3 GPUs"), "{}", by_node[0]);
        assert!(by_node[0].contains("mean util 50%"), "{}", by_node[0]);
        assert!(by_node[0].contains("power 600 W"), "{}", by_node[0]);
    }

    #[test]
    fn profiling_columns_show_gpm_per_gpu_or_busiest_mig_instance() {
        use gpufleet_proto::v1::{GpmMetrics, MigSample};
        let mut whole = gpu("a", 0, Some(90), 500);
        if let Some(s) = whole.sample.as_mut() {
            s.gpm = Some(GpmMetrics {
                sm_active: Some(0.8),
                tensor_active: Some(0.25),
                ..Default::default()
            });
        }
        let mut mig = gpu("a", 1, Some(50), 300);
        if let Some(s) = mig.sample.as_mut() {
            s.mig_samples = [0.1, 0.6]
                .map(|t| MigSample {
                    gpm: Some(GpmMetrics {
                        sm_active: Some(t),
                        tensor_active: Some(t / 2.0),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .to_vec();
        }
        let old = gpu("a", 2, Some(50), 300);
        let response = GetLatestResponse {
            gpus: vec![whole, mig, old],
            ..Default::default()
        };
        let lines = render_frame(&response, SortKey::Node);
        let row = |gpu: &str| {
            lines[2..]
                .iter()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|c| c[1] == gpu)
                .map(|c| (c[5].to_string(), c[6].to_string()))
        };
        assert_eq!(row("0"), Some(("80%".into(), "25%".into())), "{lines:?}");
        assert_eq!(row("1"), Some(("60%*".into(), "30%*".into())), "{lines:?}");
        assert_eq!(row("2"), Some(("-".into(), "-".into())), "{lines:?}");
    }
}
