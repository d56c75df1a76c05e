//! What makes a sample unusable: the reasons a sample is dropped (counted
//! per node and exported on `/metrics`) and the check of its values on
//! their own. The hub applies the checks that need its GPU and its time.

use std::time::Duration;

use gpufleet_proto::v1::GpuSample;

use super::catalogue::METRICS;

/// Why a sample was dropped. The label values are part of `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// The UUID is not one of the GPUs the node announced.
    UnknownGpu,
    /// `sampled_at` missing or not a valid time.
    BadTimestamp,
    /// `sampled_at` more than `MAX_FUTURE_SKEW` ahead of the controller.
    Future,
    /// `sampled_at` equal to the GPU's latest accepted sample: the same
    /// sample again. (Earlier samples, e.g. replayed from an agent's
    /// outbox after a partition, are accepted into their minute's rollup.)
    Stale,
    /// Older than the rollup retention: nothing could be kept of it.
    TooOld,
    /// A value outside what any GPU can report (e.g. utilisation > 100 %,
    /// memory used > total).
    OutOfRange,
}

pub const DROP_REASONS: [DropReason; 6] = [
    DropReason::UnknownGpu,
    DropReason::BadTimestamp,
    DropReason::Future,
    DropReason::Stale,
    DropReason::TooOld,
    DropReason::OutOfRange,
];

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownGpu => "unknown_gpu",
            DropReason::BadTimestamp => "bad_timestamp",
            DropReason::Future => "future",
            DropReason::Stale => "stale",
            DropReason::TooOld => "too_old",
            DropReason::OutOfRange => "out_of_range",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Agent clocks drift; more than this ahead is a broken clock.
pub const MAX_FUTURE_SKEW: Duration = Duration::from_secs(300);

/// Checks one sample's values on their own (not its GPU or time).
pub fn check_values(sample: &GpuSample) -> std::result::Result<(), DropReason> {
    for m in METRICS {
        if let Some(v) = (m.extract)(sample)
            && !(v.is_finite() && v >= 0.0 && v <= m.max_valid)
        {
            return Err(DropReason::OutOfRange);
        }
    }
    if let (Some(used), Some(total)) = (sample.memory_used_bytes, sample.memory_total_bytes)
        && used > total
    {
        return Err(DropReason::OutOfRange);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GpuSample {
        GpuSample {
            gpu_utilization_percent: Some(50),
            memory_used_bytes: Some(10),
            memory_total_bytes: Some(100),
            ..Default::default()
        }
    }

    #[test]
    fn values_outside_what_a_gpu_reports_are_out_of_range() {
        assert_eq!(check_values(&sample()), Ok(()));
        assert_eq!(
            check_values(&GpuSample::default()),
            Ok(()),
            "absent is fine"
        );
        let cases = [
            GpuSample {
                gpu_utilization_percent: Some(101),
                ..sample()
            },
            GpuSample {
                memory_used_bytes: Some(101),
                ..sample()
            },
            GpuSample {
                temperature_celsius: Some(4000),
                ..sample()
            },
        ];
        for bad in cases {
            assert_eq!(check_values(&bad), Err(DropReason::OutOfRange), "{bad:?}");
        }
    }

    #[test]
    fn drop_reasons_have_distinct_labels_in_index_order() {
        for (i, reason) in DROP_REASONS.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
        let mut labels: Vec<&str> = DROP_REASONS.iter().map(|r| r.as_str()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), DROP_REASONS.len());
    }
}
