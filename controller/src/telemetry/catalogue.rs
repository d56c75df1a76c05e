//! The metric catalogue: which numeric fields of a `GpuSample` are
//! validated, rolled up and queryable, with their stable ids, units and
//! the short names queries accept.

use gpufleet_proto::v1::GpuSample;

use crate::error::{ControllerError, Result};

/// One numeric field of `GpuSample` that is validated, rolled up and
/// queryable. Adding a metric is one entry in `METRICS`.
#[derive(Debug)]
pub struct Metric {
    /// Stable id in stored rollups: never reuse or renumber.
    pub id: u8,
    pub name: &'static str,
    pub unit: &'static str,
    /// Short names accepted by queries.
    pub aliases: &'static [&'static str],
    /// Largest plausible value; a sample above it is dropped as out of range.
    pub max_valid: f64,
    pub extract: fn(&GpuSample) -> Option<f64>,
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

pub const METRICS: &[Metric] = &[
    Metric {
        id: 1,
        name: "gpu_utilization_percent",
        unit: "percent",
        aliases: &["util", "gpu_util", "utilization"],
        max_valid: 100.0,
        extract: |s| s.gpu_utilization_percent.map(f64::from),
    },
    Metric {
        id: 2,
        name: "memory_utilization_percent",
        unit: "percent",
        aliases: &["mem_util"],
        max_valid: 100.0,
        extract: |s| s.memory_utilization_percent.map(f64::from),
    },
    Metric {
        id: 3,
        name: "memory_used_bytes",
        unit: "bytes",
        aliases: &["mem", "memory"],
        // Far above any GPU made (B200: 192 GB), far below nonsense.
        max_valid: 4096.0 * GIB,
        extract: |s| s.memory_used_bytes.map(|v| v as f64),
    },
    Metric {
        id: 4,
        name: "memory_total_bytes",
        unit: "bytes",
        aliases: &[],
        max_valid: 4096.0 * GIB,
        extract: |s| s.memory_total_bytes.map(|v| v as f64),
    },
    Metric {
        id: 5,
        name: "temperature_celsius",
        unit: "celsius",
        aliases: &["temp", "temperature"],
        max_valid: 150.0,
        extract: |s| s.temperature_celsius.map(f64::from),
    },
    Metric {
        id: 6,
        name: "power_usage_milliwatts",
        unit: "milliwatts",
        aliases: &["power"],
        // 5 kW per GPU: twice the largest board power announced so far.
        max_valid: 5_000_000.0,
        extract: |s| s.power_usage_milliwatts.map(f64::from),
    },
    Metric {
        id: 7,
        name: "power_limit_milliwatts",
        unit: "milliwatts",
        aliases: &["power_limit"],
        max_valid: 5_000_000.0,
        extract: |s| s.power_limit_milliwatts.map(f64::from),
    },
    Metric {
        id: 8,
        name: "sm_clock_mhz",
        unit: "MHz",
        aliases: &["sm_clock", "clock"],
        max_valid: 10_000.0,
        extract: |s| s.sm_clock_mhz.map(f64::from),
    },
    Metric {
        id: 9,
        name: "memory_clock_mhz",
        unit: "MHz",
        aliases: &["mem_clock"],
        max_valid: 20_000.0,
        extract: |s| s.memory_clock_mhz.map(f64::from),
    },
];

pub(crate) const METRIC_COUNT: usize = METRICS.len();

/// Finds a metric by name or alias.
pub fn metric(name: &str) -> Result<&'static Metric> {
    METRICS
        .iter()
        .find(|m| m.name == name || m.aliases.contains(&name))
        .ok_or_else(|| {
            let known: Vec<&str> = METRICS.iter().map(|m| m.name).collect();
            ControllerError::invalid(
                "metric",
                format!(
                    "{name:?} is not a metric; known metrics: {}",
                    known.join(", ")
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_ids_and_names_are_unique() {
        let mut ids: Vec<u8> = METRICS.iter().map(|m| m.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), METRICS.len());
        let mut names: Vec<&str> = METRICS
            .iter()
            .flat_map(|m| std::iter::once(m.name).chain(m.aliases.iter().copied()))
            .collect();
        let all = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all, "a name or alias is used twice");
        let err = metric("wattage").unwrap_err().to_string();
        assert!(err.contains("gpu_utilization_percent"), "{err}");
    }
}
