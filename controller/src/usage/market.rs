//! Market signals over time: recorded every minute per (region, generation)
//! and per (provider, region, generation); tightness rankings and price
//! elasticity of demand.
//!
//! * **Tightness** = pending demand ÷ max(free GPUs, 1): how many GPUs are
//!   wanted per free GPU. 0 means slack; above 1 means more is wanted than is
//!   free, and queues grow.
//! * **Elasticity from the curve**: the arc elasticity of the demand curve
//!   (GPUs wanted at a bid ≥ p) between 0.9 and 1.1 × the median ask.
//! * **Elasticity over time**: the least-squares slope of ln(GPUs started per
//!   hour) on ln(median ask) across hours with starts. It needs at least three
//!   such hours and some price movement (≥ 1 % spread); it conflates price
//!   with everything else that moved demand in those hours (time of day,
//!   supply), so read it as a correlation, not a causal estimate.

use std::collections::{BTreeMap, VecDeque};

use gpufleet_proto::v1::{DemandPoint, MarketElasticityResponse, MarketSignal, RegionTightness};

use crate::placement;
use gpufleet_scheduler::market::{GroupMarket, MarketSnapshot};

/// A task placed by one scheduling pass, for wait statistics.
#[derive(Debug, Clone)]
pub struct StartEvent {
    /// The job's first task (a job's wait is counted once).
    pub first_task: bool,
    pub provider: String,
    pub region: String,
    pub generation: i32,
    pub wait_secs: f64,
    pub gpus: u32,
}

/// The starts of the current minute, one entry per (provider, region,
/// generation) rather than one per start: a busy minute then holds a few
/// growing vectors, not two strings per placed task kept for up to a
/// minute among everything else the controller allocates (which leaves
/// the allocator's pages fragmented once they are all freed at once).
#[derive(Debug, Default)]
pub struct MinuteStarts {
    by_provider: BTreeMap<String, BTreeMap<String, BTreeMap<i32, GroupStarts>>>,
}

/// The starts of one group in one minute.
#[derive(Debug, Default)]
pub struct GroupStarts {
    waits: Vec<f64>,
    gpus: u32,
}

impl MinuteStarts {
    pub fn record(&mut self, start: &StartEvent) {
        let regions = match self.by_provider.get_mut(start.provider.as_str()) {
            Some(regions) => regions,
            None => self.by_provider.entry(start.provider.clone()).or_default(),
        };
        let generations = match regions.get_mut(start.region.as_str()) {
            Some(generations) => generations,
            None => regions.entry(start.region.clone()).or_default(),
        };
        let group = generations.entry(start.generation).or_default();
        group.waits.push(start.wait_secs);
        group.gpus += start.gpus;
    }

    fn of(&self, provider: &str, region: &str, generation: i32) -> Vec<&GroupStarts> {
        self.by_provider
            .get(provider)
            .and_then(|regions| regions.get(region))
            .and_then(|generations| generations.get(&generation))
            .into_iter()
            .collect()
    }

    /// Every provider's starts in `region` and `generation`.
    fn in_region(&self, region: &str, generation: i32) -> Vec<&GroupStarts> {
        self.by_provider
            .values()
            .filter_map(|regions| regions.get(region))
            .filter_map(|generations| generations.get(&generation))
            .collect()
    }
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted.get(rank.min(sorted.len() - 1)).copied()
}

fn weighted_median(asks: &[(u64, u32)]) -> u64 {
    let mut sorted = asks.to_vec();
    sorted.sort_unstable();
    let total: u64 = sorted.iter().map(|(_, n)| *n as u64).sum();
    let mut seen = 0u64;
    for (price, n) in sorted {
        seen += n as u64;
        if seen * 2 >= total {
            return price;
        }
    }
    0
}

fn signal(
    at_secs: u64,
    provider: &str,
    region: &str,
    generation: i32,
    g: &GroupMarket,
    starts: &[&GroupStarts],
) -> MarketSignal {
    let mut waits: Vec<f64> = starts
        .iter()
        .flat_map(|s| s.waits.iter().copied())
        .collect();
    waits.sort_by(f64::total_cmp);
    MarketSignal {
        at: Some(prost_types::Timestamp {
            seconds: at_secs as i64,
            nanos: 0,
        }),
        provider: provider.to_string(),
        region: region.to_string(),
        generation,
        supply_gpus: g.supply_gpus,
        allocated_gpus: g.allocated_gpus,
        free_gpus: g.free_gpus,
        pending_demand_gpus: g.pending_demand_gpus,
        tightness: g.pending_demand_gpus as f64 / g.free_gpus.max(1) as f64,
        queue_wait_p50_seconds: percentile(&waits, 50.0),
        queue_wait_p95_seconds: percentile(&waits, 95.0),
        ask_min_micro_usd: g.asks.iter().map(|(p, _)| *p).min().unwrap_or(0),
        ask_median_micro_usd: weighted_median(&g.asks),
        demand_curve: g
            .demand_curve
            .iter()
            .map(|&(price, gpus)| DemandPoint {
                price_micro_usd: price,
                gpus,
            })
            .collect(),
        started_gpus: starts.iter().map(|s| s.gpus).sum(),
        spot_demand_curve: g
            .spot_demand_curve
            .iter()
            .map(|&(price, gpus)| DemandPoint {
                price_micro_usd: price,
                gpus,
            })
            .collect(),
        spot_nodes: 0,
        supply_milli: g.supply_milli,
        allocated_milli: g.allocated_milli,
        pending_demand_milli: g.pending_demand_milli,
    }
}

/// Signals for one minute: per (provider, region, generation) and per
/// (region, generation) (provider empty).
pub fn signals_for_minute(
    at_secs: u64,
    snapshot: &MarketSnapshot,
    starts: &MinuteStarts,
) -> Vec<MarketSignal> {
    let mut out = Vec::new();
    let mut by_region: BTreeMap<(String, i32), GroupMarket> = BTreeMap::new();
    for ((provider, region, generation), g) in &snapshot.groups {
        let generation = placement::generation_wire(*generation);
        let here = starts.of(provider, region, generation);
        out.push(signal(at_secs, provider, region, generation, g, &here));
        let r = by_region.entry((region.clone(), generation)).or_default();
        r.supply_gpus += g.supply_gpus;
        r.allocated_gpus += g.allocated_gpus;
        r.free_gpus += g.free_gpus;
        // A job eligible with two providers of one region counts once per
        // provider here; take the larger rather than the sum.
        r.pending_demand_gpus = r.pending_demand_gpus.max(g.pending_demand_gpus);
        r.supply_milli += g.supply_milli;
        r.allocated_milli += g.allocated_milli;
        r.pending_demand_milli = r.pending_demand_milli.max(g.pending_demand_milli);
        r.asks.extend(g.asks.iter().copied());
        if r.demand_curve.is_empty() {
            r.demand_curve = g.demand_curve.clone();
        } else {
            for (point, other) in r.demand_curve.iter_mut().zip(&g.demand_curve) {
                point.1 = point.1.max(other.1);
            }
        }
    }
    for ((region, generation), g) in &by_region {
        let here = starts.in_region(region, *generation);
        out.push(signal(at_secs, "", region, *generation, g, &here));
    }
    out
}

/// Recorded signals, oldest first, bounded by retention.
#[derive(Debug, Default)]
pub struct MarketHistory {
    signals: VecDeque<MarketSignal>,
    pub unmet_demand_gpus: u32,
    retention_secs: u64,
}

fn at(signal: &MarketSignal) -> u64 {
    signal.at.map_or(0, |t| t.seconds.max(0) as u64)
}

impl MarketHistory {
    pub fn new(retention_secs: u64) -> Self {
        Self {
            signals: VecDeque::new(),
            unmet_demand_gpus: 0,
            retention_secs,
        }
    }

    pub fn push(&mut self, signal: MarketSignal) {
        self.signals.push_back(signal);
    }

    /// Drops signals past retention; returns them (for deletion from the store).
    pub fn prune(&mut self, now_secs: u64) -> Vec<MarketSignal> {
        let cutoff = now_secs.saturating_sub(self.retention_secs);
        let mut dropped = Vec::new();
        while self.signals.front().is_some_and(|s| at(s) < cutoff) {
            if let Some(s) = self.signals.pop_front() {
                dropped.push(s);
            }
        }
        dropped
    }

    pub fn len(&self) -> usize {
        self.signals.len()
    }

    pub fn is_empty(&self) -> bool {
        self.signals.is_empty()
    }

    /// Spot node-minutes per (provider, region, generation) since `since`.
    pub fn spot_node_minutes(&self, since_secs: u64) -> BTreeMap<(String, String, i32), u64> {
        let mut out: BTreeMap<(String, String, i32), u64> = BTreeMap::new();
        for s in self
            .signals
            .iter()
            .filter(|s| !s.provider.is_empty() && s.spot_nodes > 0 && at(s) >= since_secs)
        {
            *out.entry((s.provider.clone(), s.region.clone(), s.generation))
                .or_default() += u64::from(s.spot_nodes);
        }
        out
    }

    /// Regions (region-level signals) ranked by mean tightness since `since`.
    pub fn tightness(&self, since_secs: u64) -> Vec<RegionTightness> {
        // (region, generation) → (row, Σ tightness, per-minute p50s, p95s)
        type Acc = (RegionTightness, f64, Vec<f64>, Vec<f64>);
        let mut by: BTreeMap<(String, i32), Acc> = BTreeMap::new();
        for s in self
            .signals
            .iter()
            .filter(|s| s.provider.is_empty() && at(s) >= since_secs)
        {
            let entry = by
                .entry((s.region.clone(), s.generation))
                .or_insert_with(|| {
                    (
                        RegionTightness {
                            region: s.region.clone(),
                            generation: s.generation,
                            ..Default::default()
                        },
                        0.0,
                        Vec::new(),
                        Vec::new(),
                    )
                });
            entry.1 += s.tightness;
            entry.0.samples += 1;
            // The latest signal wins for the "now" fields.
            entry.0.tightness_now = s.tightness;
            entry.0.supply_gpus = s.supply_gpus;
            entry.0.free_gpus = s.free_gpus;
            entry.0.pending_demand_gpus = s.pending_demand_gpus;
            entry.0.ask_min_micro_usd = s.ask_min_micro_usd;
            if let Some(p50) = s.queue_wait_p50_seconds {
                entry.2.push(p50);
            }
            if let Some(p95) = s.queue_wait_p95_seconds {
                entry.3.push(p95);
            }
        }
        let mut out: Vec<RegionTightness> = by
            .into_values()
            .map(|(mut r, sum, mut p50s, mut p95s)| {
                r.tightness_mean = sum / r.samples.max(1) as f64;
                p50s.sort_by(f64::total_cmp);
                p95s.sort_by(f64::total_cmp);
                // Median of the per-minute medians; the worst minute's p95.
                r.queue_wait_p50_seconds = percentile(&p50s, 50.0);
                r.queue_wait_p95_seconds = p95s.last().copied();
                r
            })
            .collect();
        out.sort_by(|a, b| {
            b.tightness_mean
                .total_cmp(&a.tightness_mean)
                .then(a.region.cmp(&b.region))
        });
        out
    }

    /// Demand curve and elasticity estimates for one (region, generation).
    pub fn elasticity(
        &self,
        region: &str,
        generation: i32,
        since_secs: u64,
        bucket_secs: u64,
    ) -> MarketElasticityResponse {
        let bucket_secs = bucket_secs.max(60);
        let series: Vec<&MarketSignal> = self
            .signals
            .iter()
            .filter(|s| {
                s.provider.is_empty()
                    && s.region == region
                    && s.generation == generation
                    && at(s) >= since_secs
            })
            .collect();
        let mut response = MarketElasticityResponse {
            region: region.to_string(),
            generation,
            observations: series.len() as u32,
            ..Default::default()
        };
        let mut notes = Vec::new();
        if let Some(latest) = series.last() {
            response.demand_curve = latest.demand_curve.clone();
            response.spot_demand_curve = latest.spot_demand_curve.clone();
            response.ask_median_micro_usd = latest.ask_median_micro_usd;
            response.elasticity_from_curve =
                arc_elasticity(&latest.demand_curve, latest.ask_median_micro_usd);
            if response.elasticity_from_curve.is_none() {
                notes.push("curve: no pending demand near the median ask".to_string());
            }
        } else {
            notes.push(
                "no signals recorded for this region and generation in the window".to_string(),
            );
        }
        // Per bucket (mean ask, GPUs started).
        let mut hours: BTreeMap<u64, (f64, u32, u64)> = BTreeMap::new();
        for s in &series {
            let h = hours.entry(at(s) / bucket_secs).or_default();
            h.0 += s.ask_median_micro_usd as f64;
            h.1 += 1;
            h.2 += s.started_gpus as u64;
        }
        let points: Vec<(f64, f64)> = hours
            .values()
            .filter(|(_, n, started)| *n > 0 && *started > 0)
            .map(|(sum, n, started)| ((sum / *n as f64).max(1.0).ln(), (*started as f64).ln()))
            .collect();
        response.over_time_points = points.len() as u32;
        match log_log_fit(&points) {
            Some(fit) => {
                response.elasticity_over_time = Some(fit.slope);
                response.elasticity_over_time_std_error = fit.std_error;
                response.elasticity_over_time_r_squared = Some(fit.r_squared);
            }
            None => notes.push(format!(
                "over time: {} bucket(s) of {} with starts; needs at least 3 and a price spread of 1 % or more",
                points.len(),
                humantime::format_duration(std::time::Duration::from_secs(bucket_secs))
            )),
        }
        response.method = format!(
            "curve: arc elasticity of pending GPUs wanted at bid >= p between 0.9x and 1.1x the median ask; \
             over time: least-squares slope of ln(GPUs started per bucket) on ln(median ask), with its standard error \
             and R², a correlation that also reflects supply and time of day{}",
            if notes.is_empty() {
                String::new()
            } else {
                format!(". Missing: {}", notes.join("; "))
            }
        );
        response
    }
}

/// Q(p): GPUs wanted at a bid ≥ p, reading the step curve.
fn demand_at(curve: &[DemandPoint], price: u64) -> f64 {
    // The curve is cumulative from high bids down: Q at p is the value at the
    // first ladder price ≥ p.
    curve
        .iter()
        .find(|d| d.price_micro_usd >= price)
        .map_or(0.0, |d| d.gpus as f64)
}

fn arc_elasticity(curve: &[DemandPoint], ask: u64) -> Option<f64> {
    if ask == 0 || curve.is_empty() {
        return None;
    }
    let (p1, p2) = (ask as f64 * 0.9, ask as f64 * 1.1);
    let (q1, q2) = (demand_at(curve, p1 as u64), demand_at(curve, p2 as u64));
    if q1 + q2 == 0.0 {
        return None;
    }
    Some(((q2 - q1) / ((q1 + q2) / 2.0)) / ((p2 - p1) / ((p1 + p2) / 2.0)))
}

/// A least-squares line through (ln price, ln starts).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Fit {
    slope: f64,
    /// None with exactly three points and a perfect fit (no residual
    /// degrees of freedom to spare is fine; a zero residual gives 0).
    std_error: Option<f64>,
    r_squared: f64,
}

fn log_log_fit(points: &[(f64, f64)]) -> Option<Fit> {
    let slope = log_log_slope(points)?;
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let intercept = my - slope * mx;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let ss_res: f64 = points
        .iter()
        .map(|p| (p.1 - (intercept + slope * p.0)).powi(2))
        .sum();
    let ss_tot: f64 = points.iter().map(|p| (p.1 - my).powi(2)).sum();
    let r_squared = if ss_tot > 0.0 {
        1.0 - ss_res / ss_tot
    } else {
        1.0
    };
    let std_error = (n > 2.0).then(|| (ss_res / (n - 2.0) / sxx).sqrt());
    Some(Fit {
        slope,
        std_error,
        r_squared,
    })
}

fn log_log_slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 3 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let (min, max) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    // ln spread below ~1 % of price: no price movement to learn from.
    if sxx <= 0.0 || max - min < 0.01 {
        return None;
    }
    Some(sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scheduler's side of generation 6 (`StartEvent`s carry the wire value).
    const HOPPER: gpufleet_scheduler::Generation = gpufleet_scheduler::Generation::Hopper;

    fn curve(points: &[(u64, u32)]) -> Vec<DemandPoint> {
        points
            .iter()
            .map(|&(price_micro_usd, gpus)| DemandPoint {
                price_micro_usd,
                gpus,
            })
            .collect()
    }

    #[test]
    fn arc_elasticity_of_a_falling_curve() {
        // 100 GPUs wanted at ≥ $2.50, 50 at ≥ $3.00, 10 at ≥ $3.50.
        let c = curve(&[(2_500_000, 100), (3_000_000, 50), (3_500_000, 10)]);
        let e = arc_elasticity(&c, 2_800_000).unwrap();
        // Q(2.52)=50 (first ladder ≥ 2.52 is 3.00), Q(3.08)=10 → (−40/30)/(0.56/2.8) = −6.67
        assert!((e + 6.666).abs() < 0.01, "{e}");
        assert_eq!(arc_elasticity(&curve(&[(1, 0)]), 100), None);
    }

    #[test]
    fn slope_recovers_a_constant_elasticity() {
        // Q = 1000 × P^-1.5
        let points: Vec<(f64, f64)> = [2.0f64, 2.5, 3.0, 3.5]
            .iter()
            .map(|p| ((p * 1e6).ln(), (1000.0 * p.powf(-1.5)).ln()))
            .collect();
        let slope = log_log_slope(&points).unwrap();
        assert!((slope + 1.5).abs() < 1e-9, "{slope}");
        let flat: Vec<(f64, f64)> = (0..5).map(|i| (1e6f64.ln(), i as f64)).collect();
        assert_eq!(log_log_slope(&flat), None);
        let fit = log_log_fit(&points).unwrap();
        assert!(fit.std_error.unwrap() < 1e-9 && (fit.r_squared - 1.0).abs() < 1e-12);
        // Noisy: ln Q = 5 − 1.2 ln P ± 0.1 → a positive standard error, R² < 1.
        let noisy: Vec<(f64, f64)> = [(1.0f64, 0.1), (1.5, -0.1), (2.0, 0.1), (2.5, -0.1)]
            .iter()
            .map(|&(x, e)| (x, 5.0 - 1.2 * x + e))
            .collect();
        let fit = log_log_fit(&noisy).unwrap();
        assert!((fit.slope + 1.28).abs() < 1e-9, "{fit:?}");
        assert!(
            fit.std_error.unwrap() > 0.05 && fit.r_squared < 1.0,
            "{fit:?}"
        );
    }

    #[test]
    fn a_minutes_starts_are_counted_per_provider_and_per_region() {
        let mut snapshot = MarketSnapshot::default();
        for key in [("aws", "tight"), ("gcp", "tight"), ("aws", "slack")] {
            snapshot
                .groups
                .insert((key.0.into(), key.1.into(), HOPPER), GroupMarket::default());
        }
        let mut starts = MinuteStarts::default();
        let start = |provider: &str, region: &str, wait_secs, gpus| StartEvent {
            first_task: true,
            provider: provider.into(),
            region: region.into(),
            generation: 6,
            wait_secs,
            gpus,
        };
        for s in [
            start("aws", "tight", 30.0, 8),
            start("gcp", "tight", 10.0, 2),
            start("gcp", "tight", 12.0, 2),
            start("aws", "slack", 5.0, 1),
            // Another generation: counted nowhere here.
            StartEvent {
                generation: 7,
                ..start("aws", "tight", 99.0, 4)
            },
        ] {
            starts.record(&s);
        }
        let signals = signals_for_minute(600, &snapshot, &starts);
        let find = |provider: &str, region: &str| {
            signals
                .iter()
                .find(|s| s.provider == provider && s.region == region)
                .unwrap()
        };
        assert_eq!(find("aws", "tight").started_gpus, 8);
        assert_eq!(find("aws", "tight").queue_wait_p50_seconds, Some(30.0));
        assert_eq!(find("gcp", "tight").started_gpus, 4);
        assert_eq!(find("gcp", "tight").queue_wait_p50_seconds, Some(12.0));
        assert_eq!(find("", "tight").started_gpus, 12);
        assert_eq!(find("", "tight").queue_wait_p95_seconds, Some(30.0));
        assert_eq!(find("", "slack").started_gpus, 1);
        assert_eq!(find("", "slack").queue_wait_p50_seconds, Some(5.0));
    }

    #[test]
    fn tightness_ranks_and_region_signals_merge_providers() {
        let mut snapshot = MarketSnapshot::default();
        let group = |free, pending| GroupMarket {
            supply_gpus: 8,
            free_gpus: free,
            allocated_gpus: 8 - free,
            pending_demand_gpus: pending,
            demand_curve: vec![(1_000_000, pending)],
            asks: vec![(3_000_000, 8)],
            ..Default::default()
        };
        snapshot
            .groups
            .insert(("aws".into(), "tight".into(), HOPPER), group(1, 16));
        snapshot
            .groups
            .insert(("gcp".into(), "tight".into(), HOPPER), group(1, 16));
        snapshot
            .groups
            .insert(("aws".into(), "slack".into(), HOPPER), group(8, 0));
        let mut starts = MinuteStarts::default();
        starts.record(&StartEvent {
            first_task: true,
            provider: "aws".into(),
            region: "tight".into(),
            generation: 6,
            wait_secs: 30.0,
            gpus: 8,
        });
        let mut history = MarketHistory::new(86_400);
        for s in signals_for_minute(600, &snapshot, &starts) {
            history.push(s);
        }
        let ranked = history.tightness(0);
        assert_eq!(ranked[0].region, "tight");
        assert_eq!(ranked[0].free_gpus, 2);
        assert_eq!(ranked[0].pending_demand_gpus, 16);
        assert!((ranked[0].tightness_now - 8.0).abs() < 1e-9);
        assert_eq!(ranked[0].queue_wait_p50_seconds, Some(30.0));
        assert_eq!(ranked[1].tightness_now, 0.0);
        assert!(history.prune(1_000_000).len() == 5 && history.is_empty());
    }
}
