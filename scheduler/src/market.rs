//! Supply and demand per (provider, region, generation), from the scheduler's
//! own index: what pending jobs could run where, and at what bids.

use std::collections::{BTreeMap, HashMap};

use crate::compiled::Compiled;
use crate::domain::{Constraints, Generation, GpuUnit, JobInput};
use crate::fleet::{self, Fleet};
use crate::reserve::fits_when_idle;
use crate::units;

/// The price ladder of demand curves, micro-USD per GPU-hour.
pub const PRICE_LADDER: &[u64] = &[
    250_000, 500_000, 750_000, 1_000_000, 1_500_000, 2_000_000, 2_500_000, 3_000_000, 3_500_000,
    4_000_000, 5_000_000, 6_000_000, 8_000_000, 10_000_000,
];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupMarket {
    /// Healthy whole GPUs (not MIG-enabled) on schedulable nodes.
    pub supply_gpus: u32,
    /// Of them, held whole or hosting shares.
    pub allocated_gpus: u32,
    pub free_gpus: u32,
    /// GPUs of pending jobs whose every constraint (bid included) this
    /// group meets; a share or MIG job counts as its thousandths, the sum
    /// rounded up to whole GPUs.
    pub pending_demand_gpus: u32,
    /// GPUs of pending jobs eligible here but for price, at each ladder
    /// price (shares counted as for `pending_demand_gpus`).
    pub demand_curve: Vec<(u64, u32)>,
    /// Thousandths of GPUs allocated: 1000 per GPU held whole, each share's
    /// and each held MIG instance's thousandths.
    pub allocated_milli: u64,
    /// Thousandths of GPUs offered: 1000 per healthy whole GPU plus the
    /// healthy MIG instances' SM shares.
    pub supply_milli: u64,
    /// `pending_demand_gpus` exactly, in thousandths.
    pub pending_demand_milli: u64,
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
    unit: GpuUnit,
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
        // From the class's counts, not its slots: a snapshot costs the
        // same for 10 nodes of a class as for 10,000.
        let supply: u32 = (1..=fleet::MAX_GPUS_PER_SLOT)
            .map(|k| k as u32 * class.healthy_hist[k])
            .sum();
        let free: u32 = (1..=fleet::MAX_GPUS_PER_SLOT)
            .map(|k| k as u32 * class.buckets[k].len() as u32)
            .sum::<u32>()
            + class
                .reserved
                .iter()
                .map(|&slot| fleet.slots[slot as usize].free.count_ones())
                .sum::<u32>();
        group.supply_gpus += supply;
        group.free_gpus += free;
        group.allocated_gpus += supply.saturating_sub(free);
        group.supply_milli += supply as u64 * 1000;
        if supply > 0 {
            group.asks.push((class.price, supply));
        }
        // Held whole: healthy, not free, not hosting shares.
        let mut hosting_shares = 0u64;
        for &g in &class.shared {
            let gpu = &fleet.shared[g as usize];
            if fleet.slots[gpu.slot as usize].healthy & (1 << gpu.pos) != 0 {
                hosting_shares += 1;
                group.allocated_milli += (1000 - gpu.free_milli.min(1000)) as u64;
            }
        }
        group.allocated_milli +=
            u64::from(supply.saturating_sub(free)).saturating_sub(hosting_shares) * 1000;
        for &u in &class.mig {
            let unit = &fleet.mig_units[u as usize];
            if unit.healthy {
                group.supply_milli += unit.sm_share_milli as u64;
                if !unit.free {
                    group.allocated_milli += unit.sm_share_milli as u64;
                }
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
        /// Bid → thousandths of GPUs asked.
        by_bid: HashMap<u64, u64>,
    }
    let mut shapes: HashMap<ShapeWithoutBid, Shape<'_>> = HashMap::new();
    for job in pending {
        let mut constraints = job.constraints.clone();
        constraints.max_price_per_gpu_hour_micro_usd = None;
        let key = ShapeWithoutBid {
            constraints,
            tasks: job.tasks,
            gpus_per_task: job.gpus_per_task,
            unit: job.unit.clone(),
        };
        // Thousandths of GPUs: a share counts as its part of a GPU.
        let gpus = job.tasks.max(1) as u64 * job.unit.requested_milli(job.gpus_per_task);
        let entry = shapes.entry(key).or_insert_with(|| {
            let mut no_price = job.clone();
            no_price.constraints.max_price_per_gpu_hour_micro_usd = None;
            let compiled = Compiled::new(fleet, &no_price);
            // A class can take the job's tasks at all only with nodes big enough.
            let per_task = job.gpus_per_task.max(1) as usize;
            let whole = job.unit == GpuUnit::Whole;
            let without: Vec<usize> = (0..fleet.classes.len())
                .filter(|&c| {
                    compiled.class_ok(&fleet.classes[c])
                        && if whole {
                            per_task <= fleet::MAX_GPUS_PER_SLOT
                                && fleet.classes[c].healthy_hist[per_task..]
                                    .iter()
                                    .any(|&n| n > 0)
                        } else {
                            units::idle_tasks(fleet, &job.unit, c as u32) > 0
                        }
                })
                .collect();
            let ids: Vec<u32> = without.iter().map(|&c| c as u32).collect();
            let fits = |job: &JobInput, compiled: &Compiled, ids: &[u32]| {
                if whole {
                    fits_when_idle(fleet, job, compiled, ids)
                } else {
                    units::fits_when_idle(fleet, job, compiled, ids)
                }
            };
            let feasible_at_any_price = !ids.is_empty() && fits(&no_price, &compiled, &ids);
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
    // Demand is summed in thousandths and rounded up to GPUs at the end.
    let mut unmet_milli = 0u64;
    let mut curves: HashMap<&(String, String, Generation), Vec<u64>> = HashMap::new();
    // The same, counting only jobs that accept spot capacity.
    let mut spot_curves: HashMap<&(String, String, Generation), Vec<u64>> = HashMap::new();
    for shape in shapes.values() {
        let gpus_total: u64 = shape.by_bid.values().sum();
        if !shape.feasible_at_any_price {
            unmet_milli += gpus_total;
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
            let curve = curves
                .entry(group_key)
                .or_insert_with(|| vec![0; PRICE_LADDER.len()]);
            add_bids(curve, &shape.by_bid);
            if shape.compiled.allow_spot {
                let curve = spot_curves
                    .entry(group_key)
                    .or_insert_with(|| vec![0; PRICE_LADDER.len()]);
                add_bids(curve, &shape.by_bid);
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
            let fits = if job.unit == GpuUnit::Whole {
                fits_when_idle(fleet, job, &shape.compiled, &with_price)
            } else {
                units::fits_when_idle(fleet, job, &shape.compiled, &with_price)
            };
            if with_price.is_empty() || !fits {
                unmet_milli += gpus;
                continue;
            }
            let mut counted: Vec<&(String, String, Generation)> = Vec::new();
            for &c in &with_price {
                let group_key = &class_group[c as usize];
                if !counted.contains(&group_key) {
                    counted.push(group_key);
                    if let Some(g) = out.groups.get_mut(group_key) {
                        g.pending_demand_milli += gpus;
                    }
                }
            }
        }
    }
    let gpus_of = |milli: u64| u32::try_from(milli.div_ceil(1000)).unwrap_or(u32::MAX);
    out.unmet_demand_gpus = gpus_of(unmet_milli);
    for (key, g) in out.groups.iter_mut() {
        g.pending_demand_gpus = gpus_of(g.pending_demand_milli);
        let curve = curves.get(key);
        g.demand_curve = PRICE_LADDER
            .iter()
            .enumerate()
            .map(|(i, &p)| (p, gpus_of(curve.map_or(0, |c| c[i]))))
            .collect();
        if let Some(curve) = spot_curves.get(key) {
            g.spot_demand_curve = PRICE_LADDER
                .iter()
                .enumerate()
                .map(|(i, &p)| (p, gpus_of(curve[i])))
                .collect();
        }
    }
    out
}

/// Adds each bid's demand (thousandths) to the ladder prices it covers.
fn add_bids(curve: &mut [u64], by_bid: &HashMap<u64, u64>) {
    for (bid, gpus) in by_bid {
        for (point, price) in curve.iter_mut().zip(PRICE_LADDER) {
            if bid >= price {
                *point += gpus;
            }
        }
    }
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

    /// Supply, free and allocated GPUs read from the classes' counts equal
    /// what the slots themselves say, with unhealthy GPUs, cordoned nodes,
    /// shares and reservations about.
    #[test]
    fn supply_from_class_counts_equals_the_slots() {
        use crate::sim::workload::Rng;
        let mut rng = Rng::new(3);
        for _ in 0..200 {
            let (nodes, running) = crate::test_support::random_fleet(&mut rng, 2);
            let mut fleet = Fleet::build(&nodes, &running);
            for slot in 0..fleet.slots.len() as u32 {
                if rng.below(4) == 0 {
                    fleet.reserve(slot, 100);
                }
            }
            let m = snapshot(&fleet, &[]);
            let mut want: BTreeMap<String, (u32, u32, u64, u32)> = BTreeMap::new();
            for s in fleet.slots.iter().filter(|s| s.schedulable) {
                let class = &fleet.classes[s.class as usize];
                let w = want
                    .entry(fleet.regions.names[class.region as usize].clone())
                    .or_default();
                w.0 += s.healthy.count_ones();
                w.1 += s.free.count_ones();
                w.2 += (s.healthy & !s.free & !s.shared).count_ones() as u64 * 1000;
                if s.healthy.count_ones() > 0 {
                    w.3 += s.healthy.count_ones();
                }
            }
            for (key, g) in &m.groups {
                let w = want.get(&key.1).copied().unwrap_or_default();
                let shares: u64 = fleet
                    .shared
                    .iter()
                    .filter(|gpu| {
                        let s = &fleet.slots[gpu.slot as usize];
                        fleet.regions.names[fleet.classes[s.class as usize].region as usize]
                            == key.1
                            && s.schedulable
                            && s.healthy & (1 << gpu.pos) != 0
                    })
                    .map(|gpu| (1000 - gpu.free_milli.min(1000)) as u64)
                    .sum();
                assert_eq!(
                    (g.supply_gpus, g.free_gpus, g.allocated_gpus),
                    (w.0, w.1, w.0 - w.1)
                );
                assert_eq!(g.allocated_milli, w.2 + shares);
                assert_eq!(g.asks.iter().map(|(_, n)| n).sum::<u32>(), w.3);
            }
        }
    }
}
