//! Supply and demand per (provider, region, generation), from the scheduler's
//! own index: what pending jobs could run where, and at what bids.

use std::collections::{BTreeMap, HashMap};

use crate::compiled::Compiled;
use crate::domain::{Constraints, Generation, JobInput};
use crate::fleet::{self, Fleet};
use crate::reserve::fits_when_idle;

/// The price ladder of demand curves, micro-USD per GPU-hour.
pub const PRICE_LADDER: &[u64] = &[
    250_000, 500_000, 750_000, 1_000_000, 1_500_000, 2_000_000, 2_500_000, 3_000_000, 3_500_000,
    4_000_000, 5_000_000, 6_000_000, 8_000_000, 10_000_000,
];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupMarket {
    pub supply_gpus: u32,
    pub allocated_gpus: u32,
    pub free_gpus: u32,
    /// GPUs of pending jobs whose every constraint (bid included) this group meets.
    pub pending_demand_gpus: u32,
    /// GPUs of pending jobs eligible here but for price, at each ladder price.
    pub demand_curve: Vec<(u64, u32)>,
    /// (price, healthy GPUs) offered, for ask statistics.
    pub asks: Vec<(u64, u32)>,
    /// The demand curve of pending jobs that accept spot capacity.
    pub spot_demand_curve: Vec<(u64, u32)>,
}

#[derive(Debug, Clone, Default)]
pub struct MarketSnapshot {
    /// (provider, region, generation) → market.
    pub groups: BTreeMap<(String, String, Generation), GroupMarket>,
    /// GPUs of pending jobs that no set of nodes could ever satisfy.
    pub unmet_demand_gpus: u32,
}

/// A request without its bid: jobs of one shape can use the same classes
/// at any price.
#[derive(PartialEq, Eq, Hash)]
struct ShapeWithoutBid {
    constraints: Constraints,
    tasks: u32,
    gpus_per_task: u32,
}

/// Computes supply and demand. Jobs with the same request shape are
/// evaluated once.
pub fn snapshot(fleet: &Fleet, pending: &[JobInput]) -> MarketSnapshot {
    let mut out = MarketSnapshot::default();
    let mut class_group: Vec<(String, String, Generation)> =
        Vec::with_capacity(fleet.classes.len());
    for class in &fleet.classes {
        let key = (
            fleet.providers.names[class.provider as usize].clone(),
            fleet.regions.names[class.region as usize].clone(),
            fleet.models[class.model as usize].generation,
        );
        let group = out.groups.entry(key.clone()).or_default();
        for &slot in &class.slots {
            let s = &fleet.slots[slot as usize];
            if !s.schedulable {
                continue;
            }
            let healthy = s.healthy.count_ones();
            let free = s.free.count_ones();
            group.supply_gpus += healthy;
            group.free_gpus += free;
            group.allocated_gpus += healthy - free;
            if healthy > 0 {
                group.asks.push((class.price, healthy));
            }
        }
        class_group.push(key);
    }
    // Jobs are grouped by request shape without the bid (classes they could
    // use at any price), then by bid within a shape: the class filter runs
    // once per shape, the price cut once per (shape, bid).
    struct Shape<'a> {
        /// The first job of the shape: what decides a fit is the same for all.
        representative: &'a JobInput,
        compiled: Compiled,
        without: Vec<usize>,
        feasible_at_any_price: bool,
        by_bid: HashMap<u64, u32>,
    }
    let mut shapes: HashMap<ShapeWithoutBid, Shape<'_>> = HashMap::new();
    for job in pending {
        let mut constraints = job.constraints.clone();
        constraints.max_price_per_gpu_hour_micro_usd = None;
        let key = ShapeWithoutBid {
            constraints,
            tasks: job.tasks,
            gpus_per_task: job.gpus_per_task,
        };
        let gpus = job.tasks.max(1) * job.gpus_per_task;
        let entry = shapes.entry(key).or_insert_with(|| {
            let mut no_price = job.clone();
            no_price.constraints.max_price_per_gpu_hour_micro_usd = None;
            let compiled = Compiled::new(fleet, &no_price);
            // A class can take the job's tasks at all only with nodes big enough.
            let per_task = job.gpus_per_task.max(1) as usize;
            let without: Vec<usize> = (0..fleet.classes.len())
                .filter(|&c| {
                    per_task <= fleet::MAX_GPUS_PER_SLOT
                        && compiled.class_ok(&fleet.classes[c])
                        && fleet.classes[c].healthy_hist[per_task..]
                            .iter()
                            .any(|&n| n > 0)
                })
                .collect();
            let ids: Vec<u32> = without.iter().map(|&c| c as u32).collect();
            let feasible_at_any_price =
                !ids.is_empty() && fits_when_idle(fleet, &no_price, &compiled, &ids);
            Shape {
                representative: job,
                compiled,
                without,
                feasible_at_any_price,
                by_bid: HashMap::new(),
            }
        });
        let bid = job
            .constraints
            .max_price_per_gpu_hour_micro_usd
            .unwrap_or(u64::MAX);
        *entry.by_bid.entry(bid).or_insert(0) += gpus;
    }
    for shape in shapes.values() {
        let gpus_total: u32 = shape.by_bid.values().sum();
        if !shape.feasible_at_any_price {
            out.unmet_demand_gpus += gpus_total;
            continue;
        }
        // Demand curve: eligible here at any price, counted where bid ≥ p.
        let mut counted: Vec<&(String, String, Generation)> = Vec::new();
        for &c in &shape.without {
            let group_key = &class_group[c];
            if counted.contains(&group_key) {
                continue;
            }
            counted.push(group_key);
            if let Some(g) = out.groups.get_mut(group_key) {
                if g.demand_curve.is_empty() {
                    g.demand_curve = PRICE_LADDER.iter().map(|&p| (p, 0)).collect();
                }
                let spot = shape.compiled.allow_spot;
                if spot && g.spot_demand_curve.is_empty() {
                    g.spot_demand_curve = PRICE_LADDER.iter().map(|&p| (p, 0)).collect();
                }
                for (bid, gpus) in &shape.by_bid {
                    for point in &mut g.demand_curve {
                        if *bid >= point.0 {
                            point.1 += gpus;
                        }
                    }
                    if spot {
                        for point in &mut g.spot_demand_curve {
                            if *bid >= point.0 {
                                point.1 += gpus;
                            }
                        }
                    }
                }
            }
        }
        // Pending demand: where the job could run at its bid.
        let job = shape.representative;
        for (bid, gpus) in &shape.by_bid {
            let with_price: Vec<u32> = shape
                .without
                .iter()
                .filter(|&&c| fleet.classes[c].price <= *bid)
                .map(|&c| c as u32)
                .collect();
            // Locality does not depend on the bid: the shape's compiled form serves.
            if with_price.is_empty() || !fits_when_idle(fleet, job, &shape.compiled, &with_price) {
                out.unmet_demand_gpus += gpus;
                continue;
            }
            let mut counted: Vec<&(String, String, Generation)> = Vec::new();
            for &c in &with_price {
                let group_key = &class_group[c as usize];
                if !counted.contains(&group_key) {
                    counted.push(group_key);
                    if let Some(g) = out.groups.get_mut(group_key) {
                        g.pending_demand_gpus += gpus;
                    }
                }
            }
        }
    }
    for g in out.groups.values_mut() {
        if g.demand_curve.is_empty() {
            g.demand_curve = PRICE_LADDER.iter().map(|&p| (p, 0)).collect();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::node;

    #[test]
    fn supply_demand_and_curve() {
        let nodes = [
            node("a", "r1", 3_000_000, "H100-SXM-80GB", Generation::Hopper),
            node("b", "r2", 1_500_000, "A100-SXM-80GB", Generation::Ampere),
        ];
        let fleet = Fleet::build(&nodes, &[]);
        let job = |gpus: u32, bid: Option<u64>, generation: Option<Generation>| JobInput {
            tasks: 1,
            gpus_per_task: gpus,
            constraints: Constraints {
                max_price_per_gpu_hour_micro_usd: bid,
                generations: generation.map(|g| vec![g]).unwrap_or_default(),
                ..Default::default()
            },
            ..Default::default()
        };
        let pending = [
            job(4, Some(2_000_000), Some(Generation::Hopper)),
            job(2, None, None),
            job(16, None, None),
        ];
        let m = snapshot(&fleet, &pending);
        let hopper = &m.groups[&("aws".into(), "r1".into(), Generation::Hopper)];
        assert_eq!((hopper.supply_gpus, hopper.free_gpus), (8, 8));
        // The 4-GPU job bids $2.00 < $3.00: not pending demand here, but on the curve.
        assert_eq!(hopper.pending_demand_gpus, 2);
        let at = |p: u64| {
            hopper
                .demand_curve
                .iter()
                .find(|(price, _)| *price == p)
                .map(|(_, g)| *g)
        };
        assert_eq!(at(2_000_000), Some(4 + 2));
        assert_eq!(at(2_500_000), Some(2));
        // 16 GPUs per task fit no node; the under-bidding Hopper job fits nowhere at its bid.
        assert_eq!(m.unmet_demand_gpus, 16 + 4);
    }
}
