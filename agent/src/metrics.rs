//! The agent's Prometheus endpoint: dcgm-exporter's metric names (so the
//! NVIDIA Grafana dashboards work) plus gpufleet's health metrics, in the
//! text exposition format, checked by `promtool check metrics` in CI.
//!
//! Two deliberate differences from dcgm-exporter, both because promtool's
//! linter rejects dcgm-exporter's own output:
//! - the model label is `model_name`, not `modelName` (camelCase label
//!   names fail the lint);
//! - monotonic DCGM counters (energy, ECC, replays) are typed `gauge`: a
//!   `counter` must end in `_total`, and renaming would break dashboards.
//!   `rate()` and `increase()` work on them all the same;
//! - `DCGM_FI_DEV_PCIE_REPLAY_COUNTER` is `gpufleet_gpu_pcie_replays_total`
//!   (a metric name may not contain its type).
//!
//! gpufleet adds the labels `provider`, `region` and `job_id` (the job on
//! the GPU, empty when idle). Profiling (`DCGM_FI_PROF_*`) and per-MIG-
//! instance series are rendered by [`profiling`]. It is not `job`: Prometheus sets `job` on
//! every scraped series and would rename ours to `exported_job`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use gpufleet_proto::v1::{GpuHealth, GpuInfo, GpuSample, NodeIdentity};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::log_retention::RetentionStats;
use crate::outbox::{Outbox, OutboxStats};
use crate::telemetry::Telemetry;

mod profiling;

/// Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

type Extract = fn(&GpuSample) -> Option<f64>;

fn u32f(v: Option<u32>) -> Option<f64> {
    v.map(f64::from)
}

fn u64f(v: Option<u64>) -> Option<f64> {
    v.map(|x| x as f64)
}

fn boolf(v: Option<bool>) -> Option<f64> {
    v.map(|b| f64::from(u8::from(b)))
}

const MIB: f64 = 1024.0 * 1024.0;

/// (name, help) of every per-GPU gauge, dcgm-exporter's names and units.
const GPU_GAUGES: &[(&str, &str, Extract)] = &[
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", |s| {
        u32f(s.gpu_utilization_percent)
    }),
    (
        "DCGM_FI_DEV_MEM_COPY_UTIL",
        "Memory utilization (in %).",
        |s| u32f(s.memory_utilization_percent),
    ),
    ("DCGM_FI_DEV_ENC_UTIL", "Encoder utilization (in %).", |s| {
        u32f(s.encoder_utilization_percent)
    }),
    ("DCGM_FI_DEV_DEC_UTIL", "Decoder utilization (in %).", |s| {
        u32f(s.decoder_utilization_percent)
    }),
    (
        "DCGM_FI_DEV_FB_USED",
        "Framebuffer memory used (in MiB).",
        |s| s.memory_used_bytes.map(|b| (b as f64 / MIB).round()),
    ),
    (
        "DCGM_FI_DEV_FB_FREE",
        "Framebuffer memory free (in MiB).",
        |s| s.memory_free_bytes.map(|b| (b as f64 / MIB).round()),
    ),
    (
        "DCGM_FI_DEV_FB_TOTAL",
        "Total framebuffer memory (in MiB).",
        |s| s.memory_total_bytes.map(|b| (b as f64 / MIB).round()),
    ),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C).", |s| {
        u32f(s.temperature_celsius)
    }),
    (
        "DCGM_FI_DEV_MEMORY_TEMP",
        "Memory temperature (in C).",
        |s| u32f(s.memory_temperature_celsius),
    ),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W).", |s| {
        s.power_usage_milliwatts.map(|mw| f64::from(mw) / 1000.0)
    }),
    (
        "DCGM_FI_DEV_ENFORCED_POWER_LIMIT",
        "Current enforced power limit (in W).",
        |s| s.power_limit_milliwatts.map(|mw| f64::from(mw) / 1000.0),
    ),
    (
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "Total energy consumption since boot (in mJ).",
        |s| u64f(s.total_energy_millijoules),
    ),
    (
        "DCGM_FI_DEV_SM_CLOCK",
        "SM clock frequency (in MHz).",
        |s| u32f(s.sm_clock_mhz),
    ),
    (
        "DCGM_FI_DEV_MEM_CLOCK",
        "Memory clock frequency (in MHz).",
        |s| u32f(s.memory_clock_mhz),
    ),
    (
        "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS",
        "Current clock throttle reasons (bitmask of NVML clocks-event reasons).",
        |s| u64f(s.throttle_reasons_mask),
    ),
    (
        "DCGM_FI_DEV_PCIE_TX_THROUGHPUT",
        "PCIe transmit throughput (in KB/s).",
        |s| u32f(s.pcie_tx_kib_per_second),
    ),
    (
        "DCGM_FI_DEV_PCIE_RX_THROUGHPUT",
        "PCIe receive throughput (in KB/s).",
        |s| u32f(s.pcie_rx_kib_per_second),
    ),
    (
        "DCGM_FI_DEV_XID_ERRORS",
        "Value of the last XID error encountered.",
        |s| s.recent_xids.last().map(|x| f64::from(x.xid)),
    ),
    (
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        "Total number of single-bit volatile ECC errors.",
        |s| u64f(s.ecc_sbe_volatile),
    ),
    (
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        "Total number of double-bit volatile ECC errors.",
        |s| u64f(s.ecc_dbe_volatile),
    ),
    (
        "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL",
        "Total number of single-bit persistent ECC errors.",
        |s| u64f(s.ecc_sbe_aggregate),
    ),
    (
        "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
        "Total number of double-bit persistent ECC errors.",
        |s| u64f(s.ecc_dbe_aggregate),
    ),
    (
        "DCGM_FI_DEV_RETIRED_SBE",
        "Total number of retired pages due to single-bit errors.",
        |s| u64f(s.retired_pages_sbe),
    ),
    (
        "DCGM_FI_DEV_RETIRED_DBE",
        "Total number of retired pages due to double-bit errors.",
        |s| u64f(s.retired_pages_dbe),
    ),
    (
        "DCGM_FI_DEV_RETIRED_PENDING",
        "Whether a page retirement is pending (1 = yes).",
        |s| boolf(s.retired_pages_pending),
    ),
    (
        "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
        "Number of remapped rows for correctable errors.",
        |s| u64f(s.remapped_rows_correctable),
    ),
    (
        "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
        "Number of remapped rows for uncorrectable errors.",
        |s| u64f(s.remapped_rows_uncorrectable),
    ),
    (
        "DCGM_FI_DEV_ROW_REMAP_PENDING",
        "Whether a row remap is pending (1 = yes).",
        |s| boolf(s.row_remap_pending),
    ),
    (
        "DCGM_FI_DEV_ROW_REMAP_FAILURE",
        "Whether remapping of rows has failed (1 = yes).",
        |s| boolf(s.row_remap_failure),
    ),
    (
        "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
        "Total NVLink data transferred over all links (in KiB).",
        |s| match (s.nvlink_tx_kib, s.nvlink_rx_kib) {
            (Some(t), Some(r)) => Some(t as f64 + r as f64),
            _ => None,
        },
    ),
    (
        "DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL",
        "Total number of NVLink flow-control CRC errors.",
        |s| u64f(s.nvlink_crc_errors),
    ),
    (
        "DCGM_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL",
        "Total number of NVLink retries.",
        |s| u64f(s.nvlink_replay_errors),
    ),
    (
        "DCGM_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL",
        "Total number of NVLink recovery errors.",
        |s| u64f(s.nvlink_recovery_errors),
    ),
    (
        "gpufleet_gpu_mig_enabled",
        "Whether MIG mode is enabled (1 = yes).",
        |s| boolf(s.mig_enabled),
    ),
    (
        "gpufleet_gpu_processes",
        "Compute processes running on the GPU.",
        |s| Some(s.processes.len() as f64),
    ),
];

/// Escapes a label value: backslash, double quote and newline.
pub(crate) fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Writes a number the way Prometheus parses it.
pub(crate) fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

pub(crate) fn family(out: &mut String, name: &str, help: &str, kind: &str) {
    // HELP text escapes backslash and newline.
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn health_name(h: GpuHealth) -> &'static str {
    match h {
        GpuHealth::Healthy => "healthy",
        GpuHealth::Degraded => "degraded",
        GpuHealth::Unhealthy => "unhealthy",
        GpuHealth::Unspecified => "unknown",
    }
}

/// The labels of every per-GPU series: dcgm-exporter's (`gpu`, `UUID`,
/// `device`, `model_name`, `pci_bus_id`, `Hostname`) and gpufleet's.
pub(crate) fn gpu_labels(
    identity: &NodeIdentity,
    g: Option<&GpuInfo>,
    s: &GpuSample,
    job: &str,
) -> String {
    format!(
        "gpu=\"{}\",UUID=\"{}\",device=\"nvidia{}\",model_name=\"{}\",pci_bus_id=\"{}\",Hostname=\"{}\",provider=\"{}\",region=\"{}\",job_id=\"{}\"",
        s.index,
        escape_label(&s.uuid),
        s.index,
        escape_label(g.map_or("", |g| g.name.as_str())),
        escape_label(g.map_or("", |g| g.pci_bus_id.as_str())),
        escape_label(&identity.hostname),
        escape_label(&identity.provider),
        escape_label(&identity.region),
        escape_label(job),
    )
}

/// The whole exposition for one host.
pub fn render(
    identity: &NodeIdentity,
    gpus: &[GpuInfo],
    samples: &[GpuSample],
    jobs: &HashMap<String, String>,
) -> String {
    let info: HashMap<&str, &GpuInfo> = gpus.iter().map(|g| (g.uuid.as_str(), g)).collect();
    let labels: Vec<(&GpuSample, String)> = samples
        .iter()
        .map(|s| {
            let g = info.get(s.uuid.as_str()).copied();
            let job = jobs.get(&s.uuid).map_or("", String::as_str);
            (s, gpu_labels(identity, g, s, job))
        })
        .collect();
    let mut out = String::with_capacity(512 + samples.len() * 6 * 1024);
    for (name, help, extract) in GPU_GAUGES {
        let rows: Vec<(&String, f64)> = labels
            .iter()
            .filter_map(|(s, l)| Some((l, extract(s)?)))
            .collect();
        let mig_rows = profiling::mig_fb_rows(name, identity, &info, samples, jobs);
        // A field no GPU reports is left out entirely, not written as 0.
        if rows.is_empty() && mig_rows.is_empty() {
            continue;
        }
        family(&mut out, name, help, "gauge");
        for (l, v) in rows {
            let _ = writeln!(out, "{name}{{{l}}} {}", value(v));
        }
        for (l, v) in mig_rows {
            let _ = writeln!(out, "{name}{{{l}}} {}", value(v));
        }
    }

    profiling::render(&mut out, identity, &info, samples, jobs);

    family(
        &mut out,
        "gpufleet_gpu_health",
        "GPU health as the agent judges it: 1 for the current state.",
        "gauge",
    );
    for (s, l) in &labels {
        for state in [
            GpuHealth::Healthy,
            GpuHealth::Degraded,
            GpuHealth::Unhealthy,
        ] {
            let on = s.health() == state;
            let _ = writeln!(
                out,
                "gpufleet_gpu_health{{{l},state=\"{}\"}} {}",
                health_name(state),
                u8::from(on)
            );
        }
    }
    family(
        &mut out,
        "gpufleet_gpu_health_reason",
        "Why a GPU is not healthy: one series per active reason, value 1.",
        "gauge",
    );
    for (s, l) in &labels {
        for r in &s.health_reasons {
            let _ = writeln!(
                out,
                "gpufleet_gpu_health_reason{{{l},code=\"{}\",severity=\"{}\",xid=\"{}\"}} 1",
                escape_label(&r.code),
                health_name(r.severity()),
                r.xid.map(|x| x.to_string()).unwrap_or_default()
            );
        }
    }
    family(
        &mut out,
        "gpufleet_gpu_throttle_reason",
        "Active clock throttle reasons: one series per reason, value 1.",
        "gauge",
    );
    for (s, l) in &labels {
        for r in &s.throttle_reasons {
            let _ = writeln!(
                out,
                "gpufleet_gpu_throttle_reason{{{l},reason=\"{}\"}} 1",
                escape_label(r)
            );
        }
    }
    // dcgm-exporter's DCGM_FI_DEV_PCIE_REPLAY_COUNTER cannot pass promtool
    // (a name may not contain its type), so this one has a gpufleet name.
    let replays: Vec<_> = labels
        .iter()
        .filter_map(|(s, l)| Some((l, s.pcie_replay_count?)))
        .collect();
    if !replays.is_empty() {
        family(
            &mut out,
            "gpufleet_gpu_pcie_replays_total",
            "PCIe replays (retries) since the driver loaded.",
            "counter",
        );
        for (l, v) in replays {
            let _ = writeln!(out, "gpufleet_gpu_pcie_replays_total{{{l}}} {v}");
        }
    }
    family(
        &mut out,
        "gpufleet_gpu_xid_errors_total",
        "XID errors seen since the agent started.",
        "counter",
    );
    for (s, l) in &labels {
        let _ = writeln!(out, "gpufleet_gpu_xid_errors_total{{{l}}} {}", s.xid_count);
    }
    family(
        &mut out,
        "gpufleet_agent_gpus",
        "GPUs the agent manages on this host.",
        "gauge",
    );
    let _ = writeln!(
        out,
        "gpufleet_agent_gpus{{Hostname=\"{}\",provider=\"{}\",region=\"{}\"}} {}",
        escape_label(&identity.hostname),
        escape_label(&identity.provider),
        escape_label(&identity.region),
        gpus.len()
    );
    out
}

/// The agent's own series (name, help, type, value), one sample each,
/// labelled with the host.
fn render_host_series(identity: &NodeIdentity, series: &[(&str, &str, &str, u64)]) -> String {
    let labels = format!(
        "Hostname=\"{}\",provider=\"{}\",region=\"{}\"",
        escape_label(&identity.hostname),
        escape_label(&identity.provider),
        escape_label(&identity.region),
    );
    let mut out = String::with_capacity(256 * series.len());
    for (name, help, kind, v) in series {
        family(&mut out, name, help, kind);
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
    out
}

/// The outbox's size and drops, with the host's labels.
pub fn render_outbox(identity: &NodeIdentity, stats: &OutboxStats) -> String {
    render_host_series(
        identity,
        &[
            (
                "gpufleet_agent_outbox_dropped_total",
                "Telemetry events dropped because the outbox was over outbox_max_bytes (the controller was unreachable or slow too long).",
                "counter",
                stats.dropped_events,
            ),
            (
                "gpufleet_agent_outbox_bytes",
                "Bytes of events in the outbox not yet acknowledged by the controller.",
                "gauge",
                stats.bytes,
            ),
            (
                "gpufleet_agent_outbox_events",
                "Events in the outbox not yet acknowledged by the controller.",
                "gauge",
                stats.events,
            ),
            (
                "gpufleet_agent_outbox_degraded",
                "1 while the outbox cannot write to the agent's disk (full): workload status events wait in memory, telemetry is dropped.",
                "gauge",
                u64::from(stats.degraded),
            ),
            (
                "gpufleet_agent_outbox_write_failures_total",
                "Outbox writes to the agent's disk that failed (a full disk), including failed attempts to recover.",
                "counter",
                stats.write_failures,
            ),
            (
                "gpufleet_agent_outbox_reopens_total",
                "Times the outbox's database was reopened once the disk took writes again.",
                "counter",
                stats.reopens,
            ),
            (
                "gpufleet_agent_outbox_unwritten_events",
                "Workload status events held only in memory because the disk refused them (sent from there; written once the disk has room).",
                "gauge",
                stats.unwritten_events,
            ),
            (
                "gpufleet_agent_outbox_unwritten_dropped_total",
                "Telemetry events dropped because the disk refused them.",
                "counter",
                stats.unwritten_dropped_telemetry,
            ),
            (
                "gpufleet_agent_outbox_unwritten_status_dropped_total",
                "Workload status events dropped because those held in memory reached their bound while the disk was full.",
                "counter",
                stats.unwritten_dropped_status,
            ),
        ],
    )
}

/// Log retention's deletions and failures, with the host's labels.
pub fn render_retention(identity: &NodeIdentity, stats: &RetentionStats) -> String {
    render_host_series(
        identity,
        &[
            (
                "gpufleet_agent_allocation_dirs_deleted_total",
                "Directories (logs) of finished allocations deleted after log_retention.",
                "counter",
                stats.deleted(),
            ),
            (
                "gpufleet_agent_allocation_dirs_delete_failures",
                "Expired allocation directories the last log retention pass could not delete (retried next pass).",
                "gauge",
                stats.failing(),
            ),
        ],
    )
}

#[derive(Clone)]
struct Sources {
    telemetry: Arc<Telemetry>,
    outbox: Arc<Outbox>,
    retention: Arc<RetentionStats>,
}

async fn metrics(State(sources): State<Sources>) -> impl IntoResponse {
    let telemetry = &sources.telemetry;
    let mut body = render(
        &telemetry.identity,
        &telemetry.gpus,
        &telemetry.latest(),
        &telemetry.gpu_jobs(),
    );
    body.push_str(&render_outbox(&telemetry.identity, &sources.outbox.stats()));
    body.push_str(&render_retention(&telemetry.identity, &sources.retention));
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body)
}

/// Binds `addr` and serves `/metrics` until `shutdown` turns true.
pub(crate) async fn serve(
    addr: SocketAddr,
    telemetry: Arc<Telemetry>,
    outbox: Arc<Outbox>,
    retention: Arc<RetentionStats>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen for /metrics on {addr} (set metrics_listen, or \"off\")")
    })?;
    let local = listener
        .local_addr()
        .context("metrics listener has no local address")?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Sources {
            telemetry,
            outbox,
            retention,
        });
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "/metrics server failed");
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::HealthReason;

    #[test]
    fn renders_dcgm_names_labels_and_health() {
        let identity = NodeIdentity {
            hostname: "host\"1".into(),
            provider: "aws".into(),
            region: "us-east-1".into(),
            ..Default::default()
        };
        let gpus = [GpuInfo {
            index: 0,
            uuid: "GPU-a".into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            ..Default::default()
        }];
        let samples = [GpuSample {
            uuid: "GPU-a".into(),
            index: 0,
            gpu_utilization_percent: Some(97),
            memory_used_bytes: Some(3 * 1024 * 1024 * 1024),
            power_usage_milliwatts: Some(612_500),
            health: GpuHealth::Unhealthy as i32,
            health_reasons: vec![HealthReason {
                code: "xid_critical".into(),
                severity: GpuHealth::Unhealthy as i32,
                xid: Some(79),
                ..Default::default()
            }],
            ..Default::default()
        }];
        let jobs = HashMap::from([("GPU-a".to_string(), "job-7".to_string())]);
        let text = render(&identity, &gpus, &samples, &jobs);
        let labels = r#"gpu="0",UUID="GPU-a",device="nvidia0",model_name="NVIDIA H100 80GB HBM3",pci_bus_id="",Hostname="host\"1",provider="aws",region="us-east-1",job_id="job-7""#;
        assert!(
            text.contains(&format!("DCGM_FI_DEV_GPU_UTIL{{{labels}}} 97\n")),
            "{text}"
        );
        assert!(text.contains(&format!("DCGM_FI_DEV_FB_USED{{{labels}}} 3072\n")));
        assert!(text.contains(&format!("DCGM_FI_DEV_POWER_USAGE{{{labels}}} 612.5\n")));
        assert!(text.contains(&format!(
            "gpufleet_gpu_health{{{labels},state=\"unhealthy\"}} 1\n"
        )));
        assert!(text.contains(&format!(
            "gpufleet_gpu_health{{{labels},state=\"healthy\"}} 0\n"
        )));
        assert!(text.contains("code=\"xid_critical\",severity=\"unhealthy\",xid=\"79\"} 1"));
        // Absent fields are absent, not zero.
        assert!(!text.contains("DCGM_FI_DEV_GPU_TEMP"), "{text}");
        // One HELP/TYPE per family.
        assert_eq!(text.matches("# TYPE DCGM_FI_DEV_GPU_UTIL gauge").count(), 1);
    }

    #[test]
    fn profiling_gauges_per_gpu_and_per_mig_instance_in_dcgm_units() {
        use gpufleet_proto::v1::{GpmMetrics, MigSample};
        let identity = host_h();
        let gpus = [
            GpuInfo {
                index: 0,
                uuid: "GPU-a".into(),
                name: "H100".into(),
                ..Default::default()
            },
            GpuInfo {
                index: 1,
                uuid: "GPU-m".into(),
                name: "H100".into(),
                ..Default::default()
            },
            GpuInfo {
                index: 2,
                uuid: "GPU-old".into(),
                name: "A100".into(),
                ..Default::default()
            },
        ];
        let samples = [
            GpuSample {
                uuid: "GPU-a".into(),
                index: 0,
                gpm: Some(GpmMetrics {
                    tensor_active: Some(0.25),
                    pcie_tx_bytes_per_second: Some(1_048_576),
                    ..Default::default()
                }),
                ..Default::default()
            },
            GpuSample {
                uuid: "GPU-m".into(),
                index: 1,
                mig_enabled: Some(true),
                mig_samples: vec![MigSample {
                    uuid: "MIG-1".into(),
                    gpu_instance_id: 9,
                    profile: "1g.10gb".into(),
                    memory_used_bytes: Some(3 << 30),
                    memory_total_bytes: Some(10 << 30),
                    gpm: Some(GpmMetrics {
                        tensor_active: Some(0.5),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            },
            GpuSample {
                uuid: "GPU-old".into(),
                index: 2,
                ..Default::default()
            },
        ];
        let jobs = HashMap::from([("MIG-1".to_string(), "job-m".to_string())]);
        let text = render(&identity, &gpus, &samples, &jobs);
        let whole = r#"gpu="0",UUID="GPU-a",device="nvidia0",model_name="H100",pci_bus_id="",Hostname="h",provider="aws",region="r",job_id="""#;
        let mig = r#"gpu="1",UUID="GPU-m",device="nvidia1",model_name="H100",pci_bus_id="",Hostname="h",provider="aws",region="r",job_id="job-m",GPU_I_PROFILE="1g.10gb",GPU_I_ID="9""#;
        assert!(
            text.contains(&format!(
                "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{{whole}}} 0.25\n"
            )),
            "{text}"
        );
        assert!(text.contains(&format!("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{{{mig}}} 0.5\n")));
        assert!(text.contains(&format!("DCGM_FI_PROF_PCIE_TX_BYTES{{{whole}}} 1048576\n")));
        assert!(text.contains(&format!("DCGM_FI_DEV_FB_USED{{{mig}}} 3072\n")));
        assert!(text.contains(&format!("DCGM_FI_DEV_FB_FREE{{{mig}}} 7168\n")));
        assert_eq!(
            text.matches("# TYPE DCGM_FI_PROF_PIPE_TENSOR_ACTIVE gauge")
                .count(),
            1
        );
        // No GPU reports SM occupancy, and the A100 has no GPM at all:
        // absent, never zero.
        assert!(!text.contains("DCGM_FI_PROF_SM_OCCUPANCY"), "{text}");
        assert!(!text.contains("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{gpu=\"2\""));
    }

    /// Host `h` of aws region `r`: labels `Hostname="h",provider="aws",region="r"`.
    fn host_h() -> NodeIdentity {
        NodeIdentity {
            hostname: "h".into(),
            provider: "aws".into(),
            region: "r".into(),
            ..Default::default()
        }
    }

    #[test]
    fn outbox_metrics_carry_the_host_labels() {
        let identity = host_h();
        let stats = OutboxStats {
            bytes: 2048,
            events: 3,
            dropped_events: 7,
            degraded: true,
            write_failures: 4,
            reopens: 1,
            unwritten_events: 2,
            ..Default::default()
        };
        let text = render_outbox(&identity, &stats);
        let labels = r#"Hostname="h",provider="aws",region="r""#;
        assert!(text.contains("# TYPE gpufleet_agent_outbox_dropped_total counter\n"));
        assert!(text.contains(&format!(
            "gpufleet_agent_outbox_dropped_total{{{labels}}} 7\n"
        )));
        assert!(text.contains(&format!("gpufleet_agent_outbox_bytes{{{labels}}} 2048\n")));
        assert!(text.contains(&format!("gpufleet_agent_outbox_events{{{labels}}} 3\n")));
        for (name, value) in [
            ("gpufleet_agent_outbox_degraded", 1),
            ("gpufleet_agent_outbox_write_failures_total", 4),
            ("gpufleet_agent_outbox_reopens_total", 1),
            ("gpufleet_agent_outbox_unwritten_events", 2),
        ] {
            assert!(
                text.contains(&format!("{name}{{{labels}}} {value}\n")),
                "{name}"
            );
        }
    }

    #[test]
    fn retention_metrics_carry_the_host_labels() {
        use crate::log_retention::Pruned;
        let identity = host_h();
        let stats = RetentionStats::default();
        stats.record(&Pruned {
            removed: vec!["a".into(), "b".into()],
            failed: vec!["c: denied".into()],
        });
        let text = render_retention(&identity, &stats);
        let labels = r#"Hostname="h",provider="aws",region="r""#;
        assert!(text.contains("# TYPE gpufleet_agent_allocation_dirs_deleted_total counter\n"));
        assert!(text.contains(&format!(
            "gpufleet_agent_allocation_dirs_deleted_total{{{labels}}} 2\n"
        )));
        assert!(text.contains("# TYPE gpufleet_agent_allocation_dirs_delete_failures gauge\n"));
        assert!(text.contains(&format!(
            "gpufleet_agent_allocation_dirs_delete_failures{{{labels}}} 1\n"
        )));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert_eq!(value(f64::NAN), "NaN");
        assert_eq!(value(1.5), "1.5");
        assert_eq!(value(3.0), "3");
    }
}
