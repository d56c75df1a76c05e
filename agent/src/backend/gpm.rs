//! GPM (GPU Performance Monitoring, Hopper and newer) through nvml-wrapper:
//! SM activity and occupancy, tensor, DRAM and FP16/32/64 pipe activity,
//! PCIe and NVLink rates, for a whole GPU or one MIG GPU instance.
//!
//! NVML computes GPM metrics between two samples, so the tracker keeps the
//! previous sample of every GPU (and GPU instance) and answers the metrics
//! over the interval since then: the first call for a key has nothing to
//! compare with and answers `None`, as does a GPU without GPM — its fields
//! are then absent, never zero.

use std::collections::HashMap;
use std::sync::Mutex;

use gpufleet_proto::v1::GpmMetrics;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::gpm::gpm_metrics_get;
use nvml_wrapper::{GpmSample, Nvml};
use nvml_wrapper_sys::bindings::nvmlGpmSample_t;

/// Whose samples: a GPU (by index) or one of its MIG GPU instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct GpmKey {
    pub gpu_index: u32,
    pub gpu_instance_id: Option<u32>,
}

/// The metrics asked for, in one `nvmlGpmMetricsGet` call.
const METRICS: [GpmMetricId; 12] = [
    GpmMetricId::GraphicsUtil,
    GpmMetricId::SmUtil,
    GpmMetricId::SmOccupancy,
    GpmMetricId::AnyTensorUtil,
    GpmMetricId::DramBwUtil,
    GpmMetricId::Fp16Util,
    GpmMetricId::Fp32Util,
    GpmMetricId::Fp64Util,
    GpmMetricId::PcieTxPerSec,
    GpmMetricId::PcieRxPerSec,
    GpmMetricId::NvlinkTotalTxPerSec,
    GpmMetricId::NvlinkTotalRxPerSec,
];

/// A sample handle kept between calls. nvml-wrapper's `GpmSample` borrows
/// the `Nvml` it came from, which the backend owns next to the tracker, so
/// the handle is kept raw and re-wrapped (`GpmSample::from_handle`) to use
/// or free it.
struct Held(nvmlGpmSample_t);

// SAFETY: a GPM sample handle is an opaque pointer NVML owns; the tracker
// only ever touches it under its mutex, one thread at a time, which is what
// nvml-wrapper's own `unsafe impl Send for GpmSample` relies on too.
#[allow(unsafe_code)]
unsafe impl Send for Held {}

/// The previous sample of every key.
#[derive(Default)]
pub(crate) struct GpmTracker {
    held: Mutex<HashMap<GpmKey, Held>>,
}

impl std::fmt::Debug for GpmTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpmTracker").finish_non_exhaustive()
    }
}

/// A GPM percentage (0–100) as dcgm-exporter's ratio (0–1).
fn ratio(percent: f64) -> Option<f64> {
    percent
        .is_finite()
        .then(|| (percent / 100.0).clamp(0.0, 1.0))
}

/// A GPM rate in MiB per second as bytes per second.
fn bytes_per_second(mib_per_second: f64) -> Option<u64> {
    (mib_per_second.is_finite() && mib_per_second >= 0.0)
        .then_some((mib_per_second * 1024.0 * 1024.0) as u64)
}

/// Turns one `nvmlGpmMetricsGet` answer into `GpmMetrics`; a metric NVML
/// answered with an error stays absent. `None` when none came back.
pub(crate) fn to_metrics(values: &[(GpmMetricId, f64)]) -> Option<GpmMetrics> {
    let mut m = GpmMetrics::default();
    for &(id, v) in values {
        match id {
            GpmMetricId::GraphicsUtil => m.gr_engine_active = ratio(v),
            GpmMetricId::SmUtil => m.sm_active = ratio(v),
            GpmMetricId::SmOccupancy => m.sm_occupancy = ratio(v),
            GpmMetricId::AnyTensorUtil => m.tensor_active = ratio(v),
            GpmMetricId::DramBwUtil => m.dram_active = ratio(v),
            GpmMetricId::Fp16Util => m.fp16_active = ratio(v),
            GpmMetricId::Fp32Util => m.fp32_active = ratio(v),
            GpmMetricId::Fp64Util => m.fp64_active = ratio(v),
            GpmMetricId::PcieTxPerSec => m.pcie_tx_bytes_per_second = bytes_per_second(v),
            GpmMetricId::PcieRxPerSec => m.pcie_rx_bytes_per_second = bytes_per_second(v),
            GpmMetricId::NvlinkTotalTxPerSec => {
                m.nvlink_tx_bytes_per_second = bytes_per_second(v);
            }
            GpmMetricId::NvlinkTotalRxPerSec => {
                m.nvlink_rx_bytes_per_second = bytes_per_second(v);
            }
            _ => {}
        }
    }
    (m != GpmMetrics::default()).then_some(m)
}

impl GpmTracker {
    /// Takes a new sample with `take` and answers the metrics since the
    /// previous one of `key`. A failed sample keeps the previous one, so the
    /// next success covers the longer interval.
    #[allow(unsafe_code)]
    pub(crate) fn measure<'nvml>(
        &self,
        nvml: &'nvml Nvml,
        key: GpmKey,
        take: impl FnOnce() -> Result<GpmSample<'nvml>, NvmlError>,
    ) -> Option<GpmMetrics> {
        let new = take().ok()?;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let previous = held.remove(&key);
        let values = previous.and_then(|Held(raw)| {
            // SAFETY: `raw` came from `into_handle` of a sample of this same
            // `Nvml` (the backend owns both) and was removed from the map, so
            // this wrapper is its only owner and frees it once when dropped.
            let previous = unsafe { GpmSample::from_handle(nvml, raw) };
            gpm_metrics_get(nvml, &previous, &new, &METRICS).ok()
        });
        held.insert(key, Held(new.into_handle()));
        drop(held);
        let values: Vec<(GpmMetricId, f64)> = values?
            .into_iter()
            .filter_map(|r| r.ok().map(|r| (r.metric_id, r.value)))
            .collect();
        to_metrics(&values)
    }

    /// Frees the samples of keys `keep` rejects (a GPU instance that was
    /// destroyed), or all of them before NVML shuts down.
    #[allow(unsafe_code)]
    pub(crate) fn release(&self, nvml: &Nvml, keep: impl Fn(&GpmKey) -> bool) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<GpmKey> = held.keys().filter(|k| !keep(k)).copied().collect();
        for key in gone {
            if let Some(Held(raw)) = held.remove(&key) {
                // SAFETY: as in `measure`: a handle of this `Nvml`, owned
                // only by the map until this removal.
                drop(unsafe { GpmSample::from_handle(nvml, raw) });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_become_ratios_and_mib_bytes() {
        let m = to_metrics(&[
            (GpmMetricId::SmUtil, 62.5),
            (GpmMetricId::AnyTensorUtil, 150.0),
            (GpmMetricId::PcieTxPerSec, 2.0),
            (GpmMetricId::NvlinkTotalRxPerSec, f64::NAN),
        ])
        .unwrap();
        assert_eq!(m.sm_active, Some(0.625));
        assert_eq!(m.tensor_active, Some(1.0), "clamped to 1");
        assert_eq!(m.pcie_tx_bytes_per_second, Some(2 * 1024 * 1024));
        assert_eq!(m.nvlink_rx_bytes_per_second, None, "NaN is absent");
        assert_eq!(m.fp64_active, None, "not asked is absent, not 0");
        assert_eq!(to_metrics(&[]), None);
    }
}
