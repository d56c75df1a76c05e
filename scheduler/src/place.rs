//! Placement: the slots a job's tasks take now, by policy, all tasks of a
//! gang or none.

use crate::compiled::Compiled;
use crate::domain::{GpuUnit, JobInput, Locality, Policy, TaskPlacement};
use crate::fleet::{self, Fleet, NEVER};
use crate::units;

/// What orders the choice among slots besides the policy: the discount of
/// preferred regions, and the smallest share waiting in the pass's queue
/// (packing avoids leaving less than that on a GPU).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prefs {
    pub(crate) discount: f64,
    pub(crate) min_share: u32,
}

/// Places every task of a job or none.
pub(crate) fn place_job(
    fleet: &mut Fleet,
    job: &JobInput,
    compiled: &Compiled,
    classes: &[u32],
    policy: Policy,
    end: u64,
    prefs: Prefs,
) -> Option<Vec<TaskPlacement>> {
    let Prefs {
        discount,
        min_share,
    } = prefs;
    let whole = job.unit == GpuUnit::Whole;
    if classes.is_empty()
        || (whole
            && (job.gpus_per_task == 0 || job.gpus_per_task as usize > fleet::MAX_GPUS_PER_SLOT))
    {
        return None;
    }
    let tasks = job.tasks.max(1);
    let per_task = job.gpus_per_task;
    if policy == Policy::FirstFit {
        if !whole {
            return units::first_fit_units(fleet, job, classes, end);
        }
        return first_fit(fleet, classes, tasks, per_task, end, compiled.nvlink);
    }
    let groups = ordered_groups(fleet, compiled, classes, discount);
    // A gang prefers one network block, then (where its locality allows
    // more) one region; it spans them only when no single one has room.
    // Each tier narrows the locality groups; a narrowed group that equals
    // one already tried is not tried again.
    let mut tried: Vec<(usize, Option<u16>, usize)> = Vec::new();
    if tasks > 1 && (fleet.has_blocks || compiled.locality != Locality::Region) {
        // A part of a group holds the gang only if the group does: groups
        // that cannot are not narrowed (whole GPUs; units check per part).
        let viable: Vec<bool> = groups
            .iter()
            .map(|(_, list)| !whole || has_room(fleet, list, per_task, end, tasks))
            .collect();
        if fleet.has_blocks {
            let mut by_block = narrowed(fleet, &groups, &viable, &tried, |class| {
                (!fleet.blocks.names[class.block as usize].is_empty())
                    .then_some((class.region, class.block))
            });
            if let Some(placements) =
                place_tier(fleet, job, compiled, &mut by_block, policy, end, min_share)
            {
                return Some(placements);
            }
            tried.extend(
                by_block
                    .iter()
                    .map(|t| (t.parent, Some(t.region), t.classes.len())),
            );
        }
        if compiled.locality != Locality::Region {
            let mut by_region = narrowed(fleet, &groups, &viable, &tried, |class| {
                Some((class.region, 0))
            });
            if let Some(placements) =
                place_tier(fleet, job, compiled, &mut by_region, policy, end, min_share)
            {
                return Some(placements);
            }
            tried.extend(
                by_region
                    .iter()
                    .map(|t| (t.parent, Some(t.region), t.classes.len())),
            );
        }
    }
    let mut whole_groups: Vec<Tier> = groups
        .into_iter()
        .enumerate()
        .filter(|(i, (_, list))| {
            !tried
                .iter()
                .any(|&(p, _, len)| p == *i && len == list.len())
        })
        .map(|(parent, (_, classes))| Tier {
            parent,
            region: 0,
            classes,
        })
        .collect();
    place_tier(
        fleet,
        job,
        compiled,
        &mut whole_groups,
        policy,
        end,
        min_share,
    )
}

/// Where one gang may be placed at one tier of preference: a locality
/// group, or the part of one in a single region or network block.
struct Tier {
    /// Index of the locality group it narrows.
    parent: usize,
    /// Its region (narrowed tiers only).
    region: u16,
    /// (effective price, class), cheapest first.
    classes: Vec<(u64, u32)>,
}

/// Splits each viable locality group by `key` (classes whose key is `None`
/// are left out), keeping price order; parts already tried are dropped.
fn narrowed(
    fleet: &Fleet,
    groups: &[(u16, Vec<(u64, u32)>)],
    viable: &[bool],
    tried: &[(usize, Option<u16>, usize)],
    key: impl Fn(&fleet::Class) -> Option<(u16, u16)>,
) -> Vec<Tier> {
    // (parent group, key, classes)
    type Part = (usize, (u16, u16), Vec<(u64, u32)>);
    let mut out: Vec<Part> = Vec::new();
    for (parent, (_, list)) in groups.iter().enumerate() {
        if !viable[parent] {
            continue;
        }
        let first = out.len();
        for &(price, c) in list {
            let Some(k) = key(&fleet.classes[c as usize]) else {
                continue;
            };
            match out[first..].iter_mut().find(|(_, ok, _)| *ok == k) {
                Some((_, _, part)) => part.push((price, c)),
                None => out.push((parent, k, vec![(price, c)])),
            }
        }
    }
    let mut tiers: Vec<Tier> = out
        .into_iter()
        .filter(|(parent, (region, _), part)| {
            !tried
                .iter()
                .any(|&(p, r, len)| p == *parent && r == Some(*region) && len == part.len())
        })
        .map(|(parent, (region, _), classes)| Tier {
            parent,
            region,
            classes,
        })
        .collect();
    // Cheapest part first, as groups are ordered.
    tiers.sort_by_key(|t| t.classes.first().map_or(u64::MAX, |&(price, _)| price));
    tiers
}

/// Places every task of the job inside one of `tiers` (tried in order), or
/// none.
fn place_tier(
    fleet: &mut Fleet,
    job: &JobInput,
    compiled: &Compiled,
    tiers: &mut [Tier],
    policy: Policy,
    end: u64,
    min_share: u32,
) -> Option<Vec<TaskPlacement>> {
    let tasks = job.tasks.max(1);
    let per_task = job.gpus_per_task;
    if job.unit != GpuUnit::Whole {
        if policy == Policy::Spread {
            tiers.sort_by_key(|t| std::cmp::Reverse(group_free(fleet, &t.classes, 1)));
        }
        let groups = tiers.iter().map(|t| &t.classes[..]);
        return units::place_units(fleet, job, groups, policy, end, min_share);
    }
    if policy == Policy::Spread {
        // Emptiest group first.
        tiers.sort_by_key(|t| std::cmp::Reverse(group_free(fleet, &t.classes, per_task)));
    }
    for tier in tiers.iter() {
        let group = &tier.classes;
        if !has_room(fleet, group, per_task, end, tasks) {
            continue;
        }
        let mut taken: Vec<(u32, u32)> = Vec::with_capacity(tasks as usize);
        for _ in 0..tasks {
            match best_slot(fleet, group, per_task, policy, end, compiled.nvlink) {
                Some((slot, mask)) => {
                    fleet.take(slot, mask);
                    taken.push((slot, mask));
                }
                None => break,
            }
        }
        if let Some(placements) = finish_gang(fleet, taken, tasks) {
            return Some(placements);
        }
    }
    None
}

/// Eligible classes by effective price, grouped by locality (a group is
/// where one gang may be placed), groups in order of their cheapest class.
fn ordered_groups(
    fleet: &Fleet,
    compiled: &Compiled,
    classes: &[u32],
    discount: f64,
) -> Vec<(u16, Vec<(u64, u32)>)> {
    let mut ordered: Vec<(u64, u32)> = classes
        .iter()
        .map(|&c| {
            (
                compiled.effective_price(&fleet.classes[c as usize], discount),
                c,
            )
        })
        .collect();
    ordered.sort_unstable();
    let mut groups: Vec<(u16, Vec<(u64, u32)>)> = Vec::new();
    for (price, c) in ordered {
        let group = compiled.group_of(&fleet.classes[c as usize]);
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, list)) => list.push((price, c)),
            None => groups.push((group, vec![(price, c)])),
        }
    }
    groups
}

/// Turns a complete gang's tentative picks into placements, or gives an
/// incomplete gang's picks back.
fn finish_gang(
    fleet: &mut Fleet,
    taken: Vec<(u32, u32)>,
    tasks: u32,
) -> Option<Vec<TaskPlacement>> {
    if taken.len() == tasks as usize {
        return Some(
            taken
                .into_iter()
                .map(|(slot, mask)| placement(fleet, slot, mask))
                .collect(),
        );
    }
    for (slot, mask) in taken {
        fleet.give_back(slot, mask);
    }
    None
}

fn placement(fleet: &Fleet, slot: u32, mask: u32) -> TaskPlacement {
    let s = &fleet.slots[slot as usize];
    let class = &fleet.classes[s.class as usize];
    TaskPlacement {
        node_id: fleet.node_ids[s.node as usize].clone(),
        provider: fleet.providers.names[class.provider as usize].clone(),
        region: fleet.regions.names[class.region as usize].clone(),
        block: fleet.blocks.names[class.block as usize].clone(),
        price_per_gpu_hour_micro_usd: class.price,
        gpu_uuids: fleet.uuids(slot, mask),
        generation: fleet.models[class.model as usize].generation,
        share_milli: 0,
        memory_limit_bytes: 0,
        mig_profile: None,
    }
}

fn group_free(fleet: &Fleet, group: &[(u64, u32)], per_task: u32) -> u64 {
    group_capacity(fleet, group, per_task, NEVER, u64::MAX)
}

/// The group could take `tasks` tasks of `per_task` GPUs now (upper bound;
/// stops counting once they would fit).
fn has_room(fleet: &Fleet, group: &[(u64, u32)], per_task: u32, end: u64, tasks: u32) -> bool {
    group_capacity(fleet, group, per_task, end, tasks as u64) >= tasks as u64
}

/// Tasks of `per_task` GPUs the group could take now (upper bound), or at
/// least `enough` once that many are counted.
fn group_capacity(
    fleet: &Fleet,
    group: &[(u64, u32)],
    per_task: u32,
    end: u64,
    enough: u64,
) -> u64 {
    let mut total = 0u64;
    for &(_, c) in group {
        if total >= enough {
            break;
        }
        let class = &fleet.classes[c as usize];
        let mut ks = fleet::buckets_from(class, per_task);
        while ks != 0 {
            let k = ks.trailing_zeros() as usize;
            ks &= ks - 1;
            total += class.buckets[k].len() as u64 * (k as u64 / per_task as u64);
        }
        if end != NEVER {
            for &slot in &class.reserved {
                let s = &fleet.slots[slot as usize];
                if end <= s.reserved_until {
                    total += (s.free.count_ones() / per_task) as u64;
                }
            }
        }
    }
    total
}

fn best_slot(
    fleet: &Fleet,
    group: &[(u64, u32)],
    per_task: u32,
    policy: Policy,
    end: u64,
    nvlink: bool,
) -> Option<(u32, u32)> {
    // (score, slot, mask): lower is better.
    let mut best: Option<((u64, u64), u32, u32)> = None;
    for &(price, c) in group {
        if policy == Policy::Cost
            && let Some(((best_price, _), _, _)) = best
            && price > best_price
        {
            break; // classes are in price order
        }
        let class = &fleet.classes[c as usize];
        let mut ks = fleet::buckets_from(class, per_task);
        let mut found: Option<(u64, u32, u32)> = None;
        while ks != 0 {
            // Fewest free GPUs first; the most for spread.
            let k = if policy == Policy::Spread {
                63 - ks.leading_zeros() as usize
            } else {
                ks.trailing_zeros() as usize
            };
            ks &= !(1 << k);
            let bucket = &class.buckets[k];
            // The most recently added slot of a bucket first: cheap, and
            // deterministic for a given input.
            let candidate = bucket
                .iter()
                .rev()
                .find_map(|&slot| fleet.pick_gpus(slot, per_task, nvlink).map(|m| (slot, m)));
            if let Some((slot, mask)) = candidate {
                found = Some((k as u64, slot, mask));
                break;
            }
        }
        if end != NEVER {
            for &slot in &class.reserved {
                let s = &fleet.slots[slot as usize];
                if end > s.reserved_until {
                    continue;
                }
                let k = s.free.count_ones() as u64;
                let better = match (policy, found) {
                    (_, None) => true,
                    (Policy::Spread, Some((fk, _, _))) => k > fk,
                    (_, Some((fk, _, _))) => k < fk,
                };
                if better && let Some(mask) = fleet.pick_gpus(slot, per_task, nvlink) {
                    found = Some((k, slot, mask));
                }
            }
        }
        let Some((k, slot, mask)) = found else {
            continue;
        };
        let score = match policy {
            Policy::Cost => (price, k),
            Policy::Pack => (k, price),
            Policy::Spread | Policy::FirstFit => (u64::MAX - k, price),
        };
        if best.is_none_or(|(b, _, _)| score < b) {
            best = Some((score, slot, mask));
        }
    }
    best.map(|(_, slot, mask)| (slot, mask))
}

/// The naive baseline: slots in node order, first that fits; gangs anywhere.
fn first_fit(
    fleet: &mut Fleet,
    classes: &[u32],
    tasks: u32,
    per_task: u32,
    end: u64,
    nvlink: bool,
) -> Option<Vec<TaskPlacement>> {
    let mut allowed = vec![false; fleet.classes.len()];
    for &c in classes {
        allowed[c as usize] = true;
    }
    let mut taken = Vec::new();
    for slot in 0..fleet.slots.len() as u32 {
        if taken.len() == tasks as usize {
            break;
        }
        let s = &fleet.slots[slot as usize];
        if !s.schedulable
            || !allowed[s.class as usize]
            || (s.reserved_until != 0 && end > s.reserved_until)
        {
            continue;
        }
        while taken.len() < tasks as usize {
            match fleet.pick_gpus(slot, per_task, nvlink) {
                Some(mask) => {
                    fleet.take(slot, mask);
                    taken.push((slot, mask));
                }
                None => break,
            }
        }
    }
    finish_gang(fleet, taken, tasks)
}
