//! GPM (GPU Performance Monitoring, Hopper and newer) in the fake. A GPU
//! (or MIG instance) with a `"gpm"` map supports it; one without answers
//! `NVML_ERROR_NOT_SUPPORTED`, like a pre-Hopper part. A sample records the
//! map as it is when taken; `nvmlGpmMetricsGet` answers each metric from the
//! later of its two samples (the values "over the interval"), and a metric
//! missing from the map comes back `NOT_SUPPORTED` on its own. Keys, in
//! NVML's units (percent 0–100, MiB per second): [`METRIC_KEYS`].

use std::collections::HashMap;
use std::ffi::{c_char, c_uint, c_void};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::mig::{is_mig_handle, with_mig};
use crate::{
    Device, ERROR_INVALID_ARGUMENT, ERROR_NOT_FOUND, ERROR_NOT_SUPPORTED, Ret, SUCCESS, put,
    with_gpu,
};

/// NVML GPM metric ids (`nvmlGpmMetricId_t`) and their keys.
pub const METRIC_KEYS: [(c_uint, &str); 12] = [
    (1, "graphics_util"),
    (2, "sm_util"),
    (3, "sm_occupancy"),
    (5, "any_tensor_util"),
    (10, "dram_bw_util"),
    (11, "fp64_util"),
    (12, "fp32_util"),
    (13, "fp16_util"),
    (20, "pcie_tx_mib_per_sec"),
    (21, "pcie_rx_mib_per_sec"),
    (60, "nvlink_total_rx_mib_per_sec"),
    (61, "nvlink_total_tx_mib_per_sec"),
];

/// `NVML_GPM_METRICS_GET_VERSION` and `NVML_GPM_SUPPORT_VERSION`.
const VERSION: c_uint = 1;
/// `NVML_GPM_METRIC_MAX`: the length of the request's metric array.
const METRIC_MAX: usize = 210;

/// Orders samples, so a request with its samples swapped is refused.
static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

struct Taken {
    seq: u64,
    values: HashMap<String, f64>,
}

/// What an `nvmlGpmSample_t` points to.
struct Sample {
    taken: Mutex<Option<Taken>>,
}

/// # Safety
/// `sample` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleAlloc(sample: *mut *mut c_void) -> Ret {
    let boxed = Box::new(Sample {
        taken: Mutex::new(None),
    });
    // SAFETY: forwarded contract; freed by nvmlGpmSampleFree.
    unsafe { put(sample, Some(Box::into_raw(boxed).cast::<c_void>())) }
}

/// # Safety
/// `sample` from `nvmlGpmSampleAlloc`, freed at most once.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleFree(sample: *mut c_void) -> Ret {
    if sample.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: created by Box::into_raw in nvmlGpmSampleAlloc.
    drop(unsafe { Box::from_raw(sample.cast::<Sample>()) });
    SUCCESS
}

#[repr(C)]
pub struct Support {
    version: c_uint,
    is_supported_device: c_uint,
}

/// # Safety
/// `support` valid for a read and a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmQueryDeviceSupport(device: Device, support: *mut Support) -> Ret {
    if support.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    with_gpu(device, |g| {
        // SAFETY: non-null, valid per contract.
        let support = unsafe { &mut *support };
        if support.version != VERSION {
            return ERROR_INVALID_ARGUMENT;
        }
        support.is_supported_device = c_uint::from(g.gpm.is_some());
        SUCCESS
    })
}

/// Records `values` into the sample behind `sample`.
fn record(sample: *mut c_void, values: Option<&HashMap<String, f64>>) -> Ret {
    let Some(values) = values else {
        return ERROR_NOT_SUPPORTED;
    };
    if sample.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: a live sample per the caller's contract.
    let sample = unsafe { &*sample.cast::<Sample>() };
    *sample.taken.lock().unwrap_or_else(|e| e.into_inner()) = Some(Taken {
        seq: NEXT_SEQ.fetch_add(1, Ordering::Relaxed),
        values: values.clone(),
    });
    SUCCESS
}

/// # Safety
/// `sample` from `nvmlGpmSampleAlloc`, not freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleGet(device: Device, sample: *mut c_void) -> Ret {
    if is_mig_handle(device) {
        return with_mig(device, |_, m| record(sample, m.gpm.as_ref()));
    }
    with_gpu(device, |g| record(sample, g.gpm.as_ref()))
}

/// # Safety
/// `sample` from `nvmlGpmSampleAlloc`, not freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmMigSampleGet(
    device: Device,
    gpu_instance_id: c_uint,
    sample: *mut c_void,
) -> Ret {
    with_gpu(device, |g| {
        g.gpm.as_ref().map_or(
            ERROR_NOT_SUPPORTED,
            |_| match crate::mig_layout::instances(g)
                .iter()
                .find(|m| m.gpu_instance_id == gpu_instance_id)
            {
                Some(m) => record(sample, m.gpm.as_ref()),
                None => ERROR_NOT_FOUND,
            },
        )
    })
}

#[repr(C)]
pub struct MetricInfo {
    short_name: *mut c_char,
    long_name: *mut c_char,
    unit: *mut c_char,
}

#[repr(C)]
pub struct Metric {
    metric_id: c_uint,
    nvml_return: Ret,
    value: f64,
    info: MetricInfo,
}

#[repr(C)]
pub struct MetricsGet {
    version: c_uint,
    num_metrics: c_uint,
    sample1: *mut c_void,
    sample2: *mut c_void,
    metrics: [Metric; METRIC_MAX],
}

fn snapshot(sample: *mut c_void) -> Option<(u64, HashMap<String, f64>)> {
    if sample.is_null() {
        return None;
    }
    // SAFETY: a live sample per the caller's contract.
    let sample = unsafe { &*sample.cast::<Sample>() };
    let taken = sample.taken.lock().unwrap_or_else(|e| e.into_inner());
    taken.as_ref().map(|t| (t.seq, t.values.clone()))
}

/// # Safety
/// `request` valid for a read and a write of `nvmlGpmMetricsGet_t`; its
/// samples live.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmMetricsGet(request: *mut MetricsGet) -> Ret {
    if request.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: non-null, valid per contract.
    let request = unsafe { &mut *request };
    if request.version != VERSION || request.num_metrics as usize > METRIC_MAX {
        return ERROR_INVALID_ARGUMENT;
    }
    let (Some((first, _)), Some((second, values))) =
        (snapshot(request.sample1), snapshot(request.sample2))
    else {
        return ERROR_INVALID_ARGUMENT;
    };
    // Metrics are rates over the interval from sample1 to sample2.
    if first >= second {
        return ERROR_INVALID_ARGUMENT;
    }
    for metric in request
        .metrics
        .iter_mut()
        .take(request.num_metrics as usize)
    {
        metric.info = MetricInfo {
            short_name: std::ptr::null_mut(),
            long_name: std::ptr::null_mut(),
            unit: std::ptr::null_mut(),
        };
        let value = METRIC_KEYS
            .iter()
            .find(|(id, _)| *id == metric.metric_id)
            .and_then(|(_, key)| values.get(*key))
            .filter(|v| v.is_finite());
        match value {
            Some(v) => {
                metric.value = *v;
                metric.nvml_return = SUCCESS;
            }
            None => {
                metric.value = 0.0;
                metric.nvml_return = ERROR_NOT_SUPPORTED;
            }
        }
    }
    SUCCESS
}
