//! Prices that move during a replay: each node's price per GPU-hour changes
//! at the recorded virtual times ([`PriceStep`], e.g. the price history the
//! live system recorded, `gpufleet market prices -o json`). The scheduler
//! sees a node's price in force at each pass, as the controller resolves it
//! from its price book at each pass; a run is billed over the prices in
//! force while it ran, as the controller's ledger bills it (per price
//! segment).

use super::{Engine, Run, held_milli};
use crate::live::LiveFleet;

/// A node's price from `at` (virtual seconds) on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PriceStep {
    pub at: u64,
    /// Index of the node in the workload.
    pub node: u32,
    pub price_per_gpu_hour_micro_usd: u64,
}

impl Engine<'_> {
    /// The next price change's time.
    pub(super) fn next_price_step(&self) -> Option<u64> {
        self.price_steps.get(self.next_price_step).map(|s| s.at)
    }

    /// Applies the price changes due by `tick` (each from its own time, for
    /// billing); the scheduler's fleet is rebuilt when a price moved.
    pub(super) fn apply_prices(&mut self, tick: u64) {
        let mut moved = false;
        while let Some(&step) = self.price_steps.get(self.next_price_step) {
            if step.at > tick {
                break;
            }
            self.next_price_step += 1;
            let node = step.node as usize;
            let Some(&before) = self.prices.get(node) else {
                continue;
            };
            let price = step.price_per_gpu_hour_micro_usd;
            if price == before {
                continue;
            }
            self.prices[node] = price;
            self.price_timelines
                .entry(step.node)
                .or_insert_with(|| vec![(0, before)])
                .push((step.at, price));
            moved = true;
        }
        if moved {
            self.rebuild_live();
        }
    }

    /// A node's price changes its class in the scheduler's index: the live
    /// fleet is built again, with the running work in key order (what a
    /// fresh build would be given).
    fn rebuild_live(&mut self) {
        if self.live.is_none() {
            return;
        }
        for (input, &price) in self.node_inputs.iter_mut().zip(&self.prices) {
            input.price_per_gpu_hour_micro_usd = price;
        }
        let Ok(mut fresh) = LiveFleet::new(&self.node_inputs) else {
            return;
        };
        let mut jobs: Vec<usize> = self.running.keys().copied().collect();
        jobs.sort_unstable();
        for job in jobs {
            if let Some(running) = self.running.get(&job) {
                let tasks = self.live_runs(job, running.runs(), running.start);
                fresh.start_tasks(job as u64, &tasks);
            }
        }
        self.live = Some(fresh);
    }

    /// A task's bill for `[from, to)`, micro-USD: Σ over the node's price
    /// segments of thousandths of GPUs × seconds × price, / 3600 / 1000
    /// once (rounded down).
    pub(super) fn bill(&self, run: Run, from: u64, to: u64) -> u128 {
        let held = u128::from(held_milli(run));
        let timeline = if self.price_timelines.is_empty() {
            None
        } else {
            self.price_timelines.get(&run.node)
        };
        let Some(timeline) = timeline else {
            let price = self.prices[run.node as usize];
            return held * u128::from(to.saturating_sub(from)) * u128::from(price) / 3600 / 1000;
        };
        let mut total = 0u128;
        for (i, &(at, price)) in timeline.iter().enumerate() {
            let next = timeline.get(i + 1).map_or(u64::MAX, |(t, _)| *t);
            let (lo, hi) = (at.max(from), next.min(to));
            if hi > lo {
                total += held * u128::from(hi - lo) * u128::from(price);
            }
        }
        total / 3600 / 1000
    }
}
