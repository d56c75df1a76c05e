//! dcgm-exporter's profiling gauges (`DCGM_FI_PROF_*`, from NVML GPM) and
//! its per-MIG-instance series, so NVIDIA's Grafana dashboard (id 12239)
//! plots tensor activity and per-instance memory against the agent
//! unchanged.
//!
//! As dcgm-exporter does: activities are ratios 0–1, rates bytes per
//! second; a MIG instance's series carry the parent GPU's labels (`gpu`,
//! `UUID`, `device`) plus `GPU_I_PROFILE` (e.g. `1g.10gb`) and `GPU_I_ID`
//! (the GPU instance id); `job_id` is the job on that instance. A GPU in
//! MIG mode reports profiling per instance only (NVML samples GPM per GPU
//! instance there); its whole-GPU series stay as they are.

use std::collections::HashMap;
use std::fmt::Write as _;

use gpufleet_proto::v1::{GpmMetrics, GpuInfo, GpuSample, MigSample, NodeIdentity};

use super::{escape_label, family, gpu_labels, value};

type Extract = fn(&GpmMetrics) -> Option<f64>;

fn u64f(v: Option<u64>) -> Option<f64> {
    v.map(|x| x as f64)
}

/// (name, help, value) of every profiling gauge; names, help and units as
/// dcgm-exporter's default counters.
pub(crate) const PROF_GAUGES: &[(&str, &str, Extract)] = &[
    (
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        "Ratio of time the graphics engine is active.",
        |m| m.gr_engine_active,
    ),
    (
        "DCGM_FI_PROF_SM_ACTIVE",
        "The ratio of cycles an SM has at least 1 warp assigned.",
        |m| m.sm_active,
    ),
    (
        "DCGM_FI_PROF_SM_OCCUPANCY",
        "The ratio of number of warps resident on an SM.",
        |m| m.sm_occupancy,
    ),
    (
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "Ratio of cycles the tensor (HMMA) pipe is active.",
        |m| m.tensor_active,
    ),
    (
        "DCGM_FI_PROF_DRAM_ACTIVE",
        "Ratio of cycles the device memory interface is active sending or receiving data.",
        |m| m.dram_active,
    ),
    (
        "DCGM_FI_PROF_PIPE_FP64_ACTIVE",
        "Ratio of cycles the fp64 pipes are active.",
        |m| m.fp64_active,
    ),
    (
        "DCGM_FI_PROF_PIPE_FP32_ACTIVE",
        "Ratio of cycles the fp32 pipes are active.",
        |m| m.fp32_active,
    ),
    (
        "DCGM_FI_PROF_PIPE_FP16_ACTIVE",
        "Ratio of cycles the fp16 pipes are active.",
        |m| m.fp16_active,
    ),
    (
        "DCGM_FI_PROF_PCIE_TX_BYTES",
        "The rate of data transmitted over the PCIe bus - including both protocol headers and data payloads - in bytes per second.",
        |m| u64f(m.pcie_tx_bytes_per_second),
    ),
    (
        "DCGM_FI_PROF_PCIE_RX_BYTES",
        "The rate of data received over the PCIe bus - including both protocol headers and data payloads - in bytes per second.",
        |m| u64f(m.pcie_rx_bytes_per_second),
    ),
    (
        "DCGM_FI_PROF_NVLINK_TX_BYTES",
        "The rate of data transmitted over NVLink, not including protocol headers, in bytes per second.",
        |m| u64f(m.nvlink_tx_bytes_per_second),
    ),
    (
        "DCGM_FI_PROF_NVLINK_RX_BYTES",
        "The rate of data received over NVLink, not including protocol headers, in bytes per second.",
        |m| u64f(m.nvlink_rx_bytes_per_second),
    ),
];

type MigExtract = fn(&MigSample) -> Option<f64>;

const MIB: f64 = 1024.0 * 1024.0;

/// dcgm-exporter's framebuffer gauges of a MIG instance (MiB): the
/// instance's own memory.
const MIG_FB_GAUGES: &[(&str, &str, MigExtract)] = &[
    (
        "DCGM_FI_DEV_FB_USED",
        "Framebuffer memory used (in MiB).",
        |m| m.memory_used_bytes.map(|b| (b as f64 / MIB).round()),
    ),
    (
        "DCGM_FI_DEV_FB_FREE",
        "Framebuffer memory free (in MiB).",
        |m| match (m.memory_total_bytes, m.memory_used_bytes) {
            (Some(t), Some(u)) => Some((t.saturating_sub(u) as f64 / MIB).round()),
            _ => None,
        },
    ),
    (
        "DCGM_FI_DEV_FB_TOTAL",
        "Total framebuffer memory (in MiB).",
        |m| m.memory_total_bytes.map(|b| (b as f64 / MIB).round()),
    ),
];

/// The framebuffer gauges a MIG GPU adds per instance, by family name, for
/// the caller to write under the family it already opened.
pub(crate) fn mig_fb_rows(
    name: &str,
    identity: &NodeIdentity,
    info: &HashMap<&str, &GpuInfo>,
    samples: &[GpuSample],
    jobs: &HashMap<String, String>,
) -> Vec<(String, f64)> {
    let Some((_, _, extract)) = MIG_FB_GAUGES.iter().find(|(n, _, _)| *n == name) else {
        return Vec::new();
    };
    samples
        .iter()
        .flat_map(|s| {
            s.mig_samples.iter().filter_map(move |m| {
                let v = extract(m)?;
                Some((mig_labels(identity, info, s, m, jobs), v))
            })
        })
        .collect()
}

/// A MIG instance's labels: its parent GPU's, the job on the instance,
/// and dcgm-exporter's `GPU_I_PROFILE` and `GPU_I_ID`.
fn mig_labels(
    identity: &NodeIdentity,
    info: &HashMap<&str, &GpuInfo>,
    s: &GpuSample,
    m: &MigSample,
    jobs: &HashMap<String, String>,
) -> String {
    let job = jobs.get(&m.uuid).map_or("", String::as_str);
    format!(
        "{},GPU_I_PROFILE=\"{}\",GPU_I_ID=\"{}\"",
        gpu_labels(identity, info.get(s.uuid.as_str()).copied(), s, job),
        escape_label(&m.profile),
        m.gpu_instance_id
    )
}

/// Writes every profiling family that has at least one value: one series
/// per GPU with GPM, one per MIG instance with GPM.
pub(crate) fn render(
    out: &mut String,
    identity: &NodeIdentity,
    info: &HashMap<&str, &GpuInfo>,
    samples: &[GpuSample],
    jobs: &HashMap<String, String>,
) {
    let mut sources: Vec<(String, &GpmMetrics)> = Vec::new();
    for s in samples {
        if let Some(gpm) = &s.gpm {
            let job = jobs.get(&s.uuid).map_or("", String::as_str);
            sources.push((
                gpu_labels(identity, info.get(s.uuid.as_str()).copied(), s, job),
                gpm,
            ));
        }
        for m in &s.mig_samples {
            if let Some(gpm) = &m.gpm {
                sources.push((mig_labels(identity, info, s, m, jobs), gpm));
            }
        }
    }
    for (name, help, extract) in PROF_GAUGES {
        let rows: Vec<(&String, f64)> = sources
            .iter()
            .filter_map(|(l, m)| Some((l, extract(m)?)))
            .collect();
        // Absent on every GPU (no GPM): no family at all, not zeros.
        if rows.is_empty() {
            continue;
        }
        family(out, name, help, "gauge");
        for (l, v) in rows {
            let _ = writeln!(out, "{name}{{{l}}} {}", value(v));
        }
    }
}
