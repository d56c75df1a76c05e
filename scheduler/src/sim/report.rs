//! What one simulated policy produced: queue waits (overall and per size
//! class), allocation and stranded GPUs over time, jobs never placed, cost.

use crate::sim::SimPolicy;
use crate::sim::workload::{SimJob, SimNode};

/// One point of the time series, taken after each scheduling tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Virtual seconds.
    pub time: u64,
    pub allocated_gpus: u32,
    /// Free GPUs that no pending job could use (see [`stranded_gpus`]).
    pub stranded_gpus: u32,
    pub pending_jobs: u32,
}

/// Queue wait (start − arrival) of placed jobs, seconds; nearest-rank
/// percentiles.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WaitStats {
    pub jobs: u64,
    pub p50: u64,
    pub p95: u64,
    pub p99: u64,
    pub mean: f64,
}

impl WaitStats {
    pub fn of(mut waits: Vec<u64>) -> Self {
        if waits.is_empty() {
            return WaitStats::default();
        }
        waits.sort_unstable();
        let rank = |p: f64| {
            let idx = ((p / 100.0) * waits.len() as f64).ceil() as usize;
            waits[idx.clamp(1, waits.len()) - 1]
        };
        WaitStats {
            jobs: waits.len() as u64,
            p50: rank(50.0),
            p95: rank(95.0),
            p99: rank(99.0),
            mean: waits.iter().sum::<u64>() as f64 / waits.len() as f64,
        }
    }
}

/// Size classes for per-class waits: 1 GPU, 2–7 GPUs, 8 or more.
pub const SIZE_CLASSES: [&str; 3] = ["1", "2-7", "8+"];

pub fn size_class(gpus: u32) -> usize {
    match gpus {
        0 | 1 => 0,
        2..=7 => 1,
        _ => 2,
    }
}

/// One policy's results.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyReport {
    pub policy: SimPolicy,
    pub jobs: u64,
    pub placed: u64,
    /// Jobs still pending when no arrival or departure was left.
    pub never_placed: u64,
    pub waits: WaitStats,
    /// Per [`SIZE_CLASSES`] entry.
    pub waits_by_class: [WaitStats; 3],
    /// Σ GPUs × run hours × the node's price, micro-USD (every attempt:
    /// a preempted run was billed too).
    pub cost_micro_usd: u64,
    /// GPU-hours run, every attempt (a share counts as its part).
    pub gpu_hours: f64,
    /// Jobs stopped and queued again by a preemption (a job preempted twice
    /// counts twice).
    pub preemptions: u64,
    /// GPU-seconds the preempted runs had used: work lost.
    pub preempted_gpu_secs: f64,
    /// Jobs stopped at their max runtime (they fail).
    pub max_runtime_stops: u64,
    pub total_gpus: u64,
    /// Time-weighted over the simulated span.
    pub mean_allocation_pct: f64,
    pub mean_stranded_gpus: f64,
    pub peak_stranded_gpus: u32,
    /// Scheduling passes run.
    pub passes: u64,
    /// Virtual time of the last tick.
    pub end_time: u64,
    /// Start time per job (workload order), of its last attempt (a
    /// preempted job's restart); `None` = not running or run at the end.
    pub starts: Vec<Option<u64>>,
    /// Where each job started (workload order): the index of its node in
    /// the workload and its GPU positions on it as a bit mask (a share: the
    /// one GPU it shares). What the live controller is compared with.
    pub placements: Vec<Option<(u32, u32)>>,
    pub series: Vec<Sample>,
    /// The market signals a live controller would have recorded (gpufleet's
    /// policies; empty for the baselines).
    pub market: Vec<crate::sim::market::RegionMarket>,
}

impl PolicyReport {
    pub(crate) fn new(
        policy: SimPolicy,
        jobs: &[SimJob],
        nodes: &[SimNode],
        starts: Vec<Option<u64>>,
        series: Vec<Sample>,
        passes: u64,
        cost_micro_usd: u64,
    ) -> Self {
        let mut all = Vec::new();
        let mut by_class: [Vec<u64>; 3] = Default::default();
        for (job, start) in jobs.iter().zip(&starts) {
            if let Some(start) = start {
                let wait = start.saturating_sub(job.arrival);
                all.push(wait);
                // A gang's class is its GPUs over all tasks.
                by_class[size_class(job.gpus.saturating_mul(job.tasks.max(1)))].push(wait);
            }
        }
        let placed = all.len() as u64;
        let total_gpus: u64 = nodes.iter().map(|n| u64::from(n.gpus)).sum();
        let (mut alloc_area, mut stranded_area, mut span) = (0.0, 0.0, 0.0);
        for pair in series.windows(2) {
            let dt = (pair[1].time - pair[0].time) as f64;
            alloc_area += f64::from(pair[0].allocated_gpus) * dt;
            stranded_area += f64::from(pair[0].stranded_gpus) * dt;
            span += dt;
        }
        let [c1, c2, c3] = by_class;
        PolicyReport {
            policy,
            jobs: jobs.len() as u64,
            placed,
            never_placed: jobs.len() as u64 - placed,
            waits: WaitStats::of(all),
            waits_by_class: [WaitStats::of(c1), WaitStats::of(c2), WaitStats::of(c3)],
            cost_micro_usd,
            gpu_hours: 0.0,
            preemptions: 0,
            preempted_gpu_secs: 0.0,
            max_runtime_stops: 0,
            total_gpus,
            mean_allocation_pct: if span > 0.0 && total_gpus > 0 {
                100.0 * alloc_area / span / total_gpus as f64
            } else {
                0.0
            },
            mean_stranded_gpus: if span > 0.0 {
                stranded_area / span
            } else {
                0.0
            },
            peak_stranded_gpus: series.iter().map(|s| s.stranded_gpus).max().unwrap_or(0),
            passes,
            end_time: series.last().map_or(0, |s| s.time),
            starts,
            placements: Vec::new(),
            series,
            market: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let w = WaitStats::of((1..=100).collect());
        assert_eq!((w.p50, w.p95, w.p99), (50, 95, 99));
        assert_eq!(WaitStats::of(vec![7]).p99, 7);
        assert_eq!(WaitStats::of(Vec::new()).jobs, 0);
    }
}
