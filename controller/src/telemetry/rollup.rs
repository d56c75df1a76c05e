//! Per-minute rollups: count, sum and max of every metric of one GPU over
//! one minute, and how they add up and merge.

use std::sync::Arc;

use gpufleet_proto::v1::GpuSample;

use super::catalogue::{METRIC_COUNT, METRICS, Metric};

/// Count, sum and max of one metric over one minute (or one step).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Acc {
    pub count: u32,
    pub sum: f64,
    pub max: f64,
}

impl Acc {
    pub fn add(&mut self, v: f64) {
        self.max = if self.count == 0 { v } else { self.max.max(v) };
        self.count += 1;
        self.sum += v;
    }

    pub fn merge(&mut self, other: &Acc) {
        if other.count == 0 {
            return;
        }
        self.max = if self.count == 0 {
            other.max
        } else {
            self.max.max(other.max)
        };
        self.count += other.count;
        self.sum += other.sum;
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// Every metric of one GPU over one minute.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollup {
    pub minute: u64,
    pub metrics: [Acc; METRIC_COUNT],
}

/// Format byte of the per-GPU records of the first rollup tree
impl Rollup {
    pub fn new(minute: u64) -> Self {
        Self {
            minute,
            metrics: [Acc::default(); METRIC_COUNT],
        }
    }

    pub fn add(&mut self, sample: &GpuSample) {
        for (acc, m) in self.metrics.iter_mut().zip(METRICS) {
            if let Some(v) = (m.extract)(sample) {
                acc.add(v);
            }
        }
    }

    pub fn merge(&mut self, other: &Rollup) {
        for (a, b) in self.metrics.iter_mut().zip(&other.metrics) {
            a.merge(b);
        }
    }

    pub fn get(&self, metric: &Metric) -> Acc {
        METRICS
            .iter()
            .position(|m| m.id == metric.id)
            .map(|i| self.metrics[i])
            .unwrap_or_default()
    }
}

/// A finished minute of one GPU, on its way to the store.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedRollup {
    pub node_id: Arc<str>,
    pub uuid: Arc<str>,
    pub rollup: Rollup,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::catalogue::metric;
    use crate::telemetry::test_support::{sample, t0, util};
    use std::time::Duration;

    #[test]
    fn rollup_mean_and_max_and_merge() {
        let mut r = Rollup::new(7);
        for (i, u) in [10, 30, 20].into_iter().enumerate() {
            r.add(&sample(
                "GPU-a",
                t0() + Duration::from_secs(i as u64),
                u,
                1000,
            ));
        }
        let acc = r.get(util());
        assert_eq!((acc.count, acc.sum, acc.max), (3, 60.0, 30.0));
        assert_eq!(acc.mean(), Some(20.0));
        // A metric the device did not report stays empty: absent, not zero.
        assert_eq!(r.get(metric("temp").unwrap()).count, 0);
        let mut other = Rollup::new(7);
        other.add(&sample("GPU-a", t0(), 90, 1000));
        r.merge(&other);
        let acc = r.get(util());
        assert_eq!((acc.count, acc.sum, acc.max), (4, 150.0, 90.0));
        // Merging an empty accumulator leaves max alone, even at zero.
        let mut zero = Acc::default();
        zero.add(0.0);
        zero.merge(&Acc::default());
        assert_eq!((zero.count, zero.max), (1, 0.0));
    }
}
