//! When a job that does not fit now could fit: if nothing ran at all, if
//! reservations were ignored, and where it fits earliest (its reservation,
//! which later jobs may backfill only if they end before it starts).

use std::collections::HashMap;

use crate::compiled::Compiled;
use crate::domain::JobInput;
use crate::fleet::{self, Fleet, NEVER};

/// Whether the job fits the eligible classes if nothing ran at all.
pub(crate) fn fits_when_idle(
    fleet: &Fleet,
    job: &JobInput,
    compiled: &Compiled,
    classes: &[u32],
) -> bool {
    let per_task = job.gpus_per_task.max(1) as usize;
    let mut per_group: HashMap<u16, u64> = HashMap::new();
    for &c in classes {
        let class = &fleet.classes[c as usize];
        let tasks: u64 = (per_task..=fleet::MAX_GPUS_PER_SLOT)
            .map(|k| class.healthy_hist[k] as u64 * (k / per_task) as u64)
            .sum();
        let group = per_group.entry(compiled.group_of(class)).or_insert(0);
        *group += tasks;
        // Enough in one group already: the rest cannot change the answer.
        if *group >= job.tasks.max(1) as u64 {
            return true;
        }
    }
    false
}

/// Whether the job would fit now if reservations were ignored.
pub(crate) fn reserved_capacity_would_fit(
    fleet: &Fleet,
    job: &JobInput,
    compiled: &Compiled,
    classes: &[u32],
) -> bool {
    let per_task = job.gpus_per_task.max(1);
    let mut per_group: HashMap<u16, u64> = HashMap::new();
    for &c in classes {
        let class = &fleet.classes[c as usize];
        let mut tasks = 0u64;
        for k in per_task as usize..=fleet::MAX_GPUS_PER_SLOT {
            tasks += class.buckets[k].len() as u64 * (k as u64 / per_task as u64);
        }
        for &slot in &class.reserved {
            tasks += (fleet.slots[slot as usize].free.count_ones() / per_task) as u64;
        }
        let group = per_group.entry(compiled.group_of(class)).or_insert(0);
        *group += tasks;
        // Enough in one group already: the rest cannot change the answer.
        if *group >= job.tasks.max(1) as u64 {
            return true;
        }
    }
    false
}

/// Reserves the slots where the job fits earliest. Returns whether it did.
pub(crate) fn reserve(
    fleet: &mut Fleet,
    job: &JobInput,
    compiled: &Compiled,
    classes: &[u32],
    now: u64,
) -> bool {
    let per_task = job.gpus_per_task.max(1);
    let tasks = job.tasks.max(1) as usize;
    // Per group: (time a task slot becomes available, slot).
    let mut per_group: HashMap<u16, Vec<(u64, u32)>> = HashMap::new();
    for &c in classes {
        let class = &fleet.classes[c as usize];
        let group = compiled.group_of(class);
        for &slot in &class.slots {
            let s = &fleet.slots[slot as usize];
            if !s.schedulable || s.healthy.count_ones() < per_task {
                continue;
            }
            // A GPU hosting shares frees only when all of them end: its
            // latest end.
            let mut shared_end: HashMap<u32, u64> = HashMap::new();
            let mut ends: Vec<(u64, u32)> = Vec::new();
            for &r in &fleet.running_by_slot[slot as usize] {
                let run = &fleet.running[r as usize];
                if run.fractional {
                    if run.mask != 0 {
                        let end = shared_end.entry(run.mask).or_insert(0);
                        *end = (*end).max(run.end);
                    }
                } else {
                    ends.push((run.end, (run.mask & s.healthy).count_ones()));
                }
            }
            ends.extend(
                shared_end
                    .into_iter()
                    .map(|(mask, end)| (end, (mask & s.healthy).count_ones())),
            );
            ends.sort_unstable();
            let mut free = s.free.count_ones();
            let capacity = s.healthy.count_ones() / per_task;
            let mut next = ends.into_iter();
            let list = per_group.entry(group).or_default();
            for m in 1..=capacity {
                let mut at = now;
                while free < m * per_task {
                    match next.next() {
                        Some((end, gpus)) => {
                            free += gpus;
                            at = end;
                        }
                        None => {
                            at = NEVER;
                            break;
                        }
                    }
                }
                list.push((at, slot));
            }
        }
    }
    // Ties between groups go to the lowest group id: the map's iteration
    // order must not pick (it differs between runs).
    let best = per_group
        .into_iter()
        .filter(|(_, list)| list.len() >= tasks)
        .map(|(group, mut list)| {
            list.sort_unstable();
            list.truncate(tasks);
            let at = list.last().map_or(NEVER, |(t, _)| *t);
            (at, group, list)
        })
        .min_by_key(|(at, group, _)| (*at, *group));
    let Some((at, _, list)) = best else {
        return false;
    };
    for (_, slot) in list {
        fleet.reserve(slot, at);
    }
    true
}
