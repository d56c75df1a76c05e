//! The market signals a live controller would have recorded during a
//! replay: per (region, generation), supply, free GPUs, pending demand and
//! tightness, computed by the same `market::snapshot` the controller's
//! market minute uses and merged across providers the same way (supply
//! summed, demand the larger of the providers', since a job eligible with
//! two providers counts with each).
//!
//! Snapshots are taken after a scheduling pass, at most one per
//! `interval_secs` of virtual time, and each is held until the next, so
//! the means are time-weighted over the replayed span. Only gpufleet's
//! policies build the scheduler's fleet; the baselines record none.

use std::collections::BTreeMap;

use crate::domain::{Generation, JobInput};
use crate::fleet::Fleet;
use crate::market::{self, PRICE_LADDER};

/// One (region, generation) over a replay.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RegionMarket {
    pub region: String,
    pub generation: Generation,
    /// Healthy GPUs offered (the largest seen).
    pub supply_gpus: u32,
    /// Time-weighted means.
    pub mean_free_gpus: f64,
    pub mean_pending_demand_gpus: f64,
    /// `pending demand ÷ max(free, 1)`, as `gpufleet market tightness`.
    pub mean_tightness: f64,
    pub peak_tightness: f64,
    /// Time-weighted mean GPUs demanded at each price of
    /// [`PRICE_LADDER`] (micro-USD per GPU-hour).
    pub demand_curve: Vec<(u64, f64)>,
}

/// One snapshot merged per region, held until the next.
#[derive(Debug, Clone, Default)]
struct Held {
    free: u32,
    demand: u32,
    curve: Vec<u32>,
}

#[derive(Debug, Default)]
struct Acc {
    supply: u32,
    free_secs: f64,
    demand_secs: f64,
    tightness_secs: f64,
    peak: f64,
    curve_secs: Vec<f64>,
}

/// Accumulates signals over a replay.
#[derive(Debug)]
pub(crate) struct MarketRecorder {
    interval_secs: u64,
    next_at: u64,
    /// When the held snapshot was taken (None before the first).
    held_since: Option<u64>,
    held: BTreeMap<(String, Generation), Held>,
    /// The first snapshot's time: where the means' span starts.
    first: Option<u64>,
    acc: BTreeMap<(String, Generation), Acc>,
}

impl MarketRecorder {
    pub(crate) fn new(interval_secs: u64) -> Self {
        Self {
            interval_secs: interval_secs.max(1),
            next_at: 0,
            held_since: None,
            held: BTreeMap::new(),
            first: None,
            acc: BTreeMap::new(),
        }
    }

    /// Whether a pass at `now` should be observed (at most one per
    /// interval).
    pub(crate) fn due(&self, now: u64) -> bool {
        now >= self.next_at
    }

    /// After a pass at `now`: the fleet as the pass left it and the jobs
    /// still pending.
    pub(crate) fn observe(&mut self, now: u64, fleet: &Fleet, pending: &[JobInput]) {
        if !self.due(now) {
            return;
        }
        self.next_at = (now / self.interval_secs + 1) * self.interval_secs;
        self.hold_until(now);
        let snapshot = market::snapshot(fleet, pending);
        let mut merged: BTreeMap<(String, Generation), Held> = BTreeMap::new();
        let mut supply: BTreeMap<(String, Generation), u32> = BTreeMap::new();
        for ((_, region, generation), g) in &snapshot.groups {
            let key = (region.clone(), *generation);
            *supply.entry(key.clone()).or_default() += g.supply_gpus;
            let h = merged.entry(key).or_default();
            h.free += g.free_gpus;
            h.demand = h.demand.max(g.pending_demand_gpus);
            if h.curve.len() < g.demand_curve.len() {
                h.curve.resize(g.demand_curve.len(), 0);
            }
            for (point, &(_, gpus)) in h.curve.iter_mut().zip(&g.demand_curve) {
                *point = (*point).max(gpus);
            }
        }
        for (key, gpus) in supply {
            let acc = self.acc.entry(key).or_default();
            acc.supply = acc.supply.max(gpus);
        }
        for (key, h) in &merged {
            let acc = self.acc.entry(key.clone()).or_default();
            acc.peak = acc.peak.max(tightness(h));
        }
        self.first.get_or_insert(now);
        self.held = merged;
        self.held_since = Some(now);
    }

    /// Credits the held snapshot with the time from when it was taken to `now`.
    fn hold_until(&mut self, now: u64) {
        let Some(since) = self.held_since else {
            return;
        };
        let secs = now.saturating_sub(since) as f64;
        if secs == 0.0 {
            return;
        }
        for (key, h) in &self.held {
            let acc = self.acc.entry(key.clone()).or_default();
            acc.free_secs += h.free as f64 * secs;
            acc.demand_secs += h.demand as f64 * secs;
            acc.tightness_secs += tightness(h) * secs;
            if acc.curve_secs.len() < h.curve.len() {
                acc.curve_secs.resize(h.curve.len(), 0.0);
            }
            for (sum, &gpus) in acc.curve_secs.iter_mut().zip(&h.curve) {
                *sum += gpus as f64 * secs;
            }
        }
        self.held_since = Some(now);
    }

    /// The report, the last snapshot held until `end`; regions tightest
    /// first.
    pub(crate) fn finish(mut self, end: u64) -> Vec<RegionMarket> {
        let start = self.first.unwrap_or(end);
        self.hold_until(end);
        let span = end.saturating_sub(start).max(1) as f64;
        let mut out: Vec<RegionMarket> = self
            .acc
            .into_iter()
            .map(|((region, generation), acc)| RegionMarket {
                region,
                generation,
                supply_gpus: acc.supply,
                mean_free_gpus: acc.free_secs / span,
                mean_pending_demand_gpus: acc.demand_secs / span,
                mean_tightness: acc.tightness_secs / span,
                peak_tightness: acc.peak,
                demand_curve: PRICE_LADDER
                    .iter()
                    .zip(acc.curve_secs.iter().chain(std::iter::repeat(&0.0)))
                    .map(|(&price, &secs)| (price, secs / span))
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| {
            b.mean_tightness
                .total_cmp(&a.mean_tightness)
                .then_with(|| a.region.cmp(&b.region))
                .then_with(|| a.generation.cmp(&b.generation))
        });
        out
    }
}

fn tightness(h: &Held) -> f64 {
    h.demand as f64 / h.free.max(1) as f64
}
