//! Preemption: the fewest lower-priority preemptible allocations whose
//! eviction makes room for a job that does not fit.

use std::collections::HashMap;

use crate::compiled::Compiled;
use crate::domain::JobInput;
use crate::fleet::Fleet;

/// Whether eviction could possibly help: preemptible lower-priority work,
/// or work already being evicted, runs in an eligible class.
pub(crate) fn preemption_possible(fleet: &Fleet, job: &JobInput, classes: &[u32]) -> bool {
    classes.iter().any(|&c| {
        let class = &fleet.classes[c as usize];
        class.min_preemptible_priority < job.priority || class.evicting > 0
    })
}

/// Finds the fewest lower-priority preemptible allocations whose eviction
/// makes room for the whole job; marks their slots so nothing else takes
/// the room. Returns the victim job ids, or None if eviction cannot help.
pub(crate) fn preempt(
    fleet: &mut Fleet,
    job: &JobInput,
    compiled: &Compiled,
    classes: &[u32],
    now: u64,
) -> Option<Vec<String>> {
    let per_task = job.gpus_per_task.max(1);
    let tasks = job.tasks.max(1) as usize;
    // Per group: candidate (victim GPUs needed, slot, victim allocations).
    let mut per_group: HashMap<u16, Vec<(u32, u32, Vec<u32>)>> = HashMap::new();
    for &c in classes {
        let class = &fleet.classes[c as usize];
        let group = compiled.group_of(class);
        for &slot in &class.slots {
            let s = &fleet.slots[slot as usize];
            // A reserved slot is held for a job ordered earlier.
            if !s.schedulable || s.reserved_until != 0 || s.healthy.count_ones() < per_task {
                continue;
            }
            let mut available = s.free;
            let mut candidates: Vec<(i32, u32, u32)> = Vec::new();
            for &r in &fleet.running_by_slot[slot as usize] {
                let run = &fleet.running[r as usize];
                // A share or MIG instance frees no whole GPU when evicted
                // (other shares may stay on its GPU): never a useful victim.
                if run.fractional {
                    continue;
                }
                if run.evicting {
                    available |= run.mask & s.healthy;
                } else if run.preemptible && run.priority < job.priority {
                    candidates.push((run.priority, run.mask.count_ones(), r));
                }
            }
            candidates.sort_unstable();
            let list = per_group.entry(group).or_default();
            // How many tasks this slot can host with evictions.
            let mut victims = Vec::new();
            let mut cost = 0;
            let capacity = s.healthy.count_ones() / per_task;
            let mut cand = candidates.into_iter();
            for m in 1..=capacity {
                while available.count_ones() < m * per_task {
                    match cand.next() {
                        Some((_, gpus, r)) => {
                            available |= fleet.running[r as usize].mask & s.healthy;
                            cost += gpus;
                            victims.push(r);
                        }
                        None => break,
                    }
                }
                if available.count_ones() < m * per_task {
                    break;
                }
                list.push((cost, slot, victims.clone()));
            }
        }
    }
    let best = per_group
        .into_values()
        .filter(|list| list.len() >= tasks)
        .map(|mut list| {
            list.sort_by_key(|(cost, slot, _)| (*cost, *slot));
            list.truncate(tasks);
            let cost: u32 = list.iter().map(|(c, _, _)| *c).sum();
            (cost, list)
        })
        .min_by_key(|(cost, _)| *cost)?;
    let (_, list) = best;
    let uses_evicting = list.iter().any(|(_, slot, _)| {
        fleet.running_by_slot[*slot as usize]
            .iter()
            .any(|&r| fleet.running[r as usize].evicting)
    });
    if list.iter().all(|(_, _, v)| v.is_empty()) && !uses_evicting {
        return None;
    }
    let mut victim_jobs: Vec<u32> = list
        .iter()
        .flat_map(|(_, _, v)| v.iter().map(|&r| fleet.running[r as usize].job))
        .collect();
    victim_jobs.sort_unstable();
    victim_jobs.dedup();
    // Hold the room: nothing may start on these slots until the job runs.
    for (_, slot, _) in &list {
        fleet.reserve(*slot, now.max(1));
    }
    // Victims' allocations are now being evicted (for later jobs this pass).
    let mut newly_evicting = Vec::new();
    for (r, run) in fleet.running.iter_mut().enumerate() {
        if victim_jobs.contains(&run.job) && !run.evicting {
            run.evicting = true;
            newly_evicting.push(r);
        }
    }
    for (slot, runs) in fleet.running_by_slot.iter().enumerate() {
        let n = runs
            .iter()
            .filter(|r| newly_evicting.contains(&(**r as usize)))
            .count() as u32;
        if n > 0 {
            let class = fleet.slots[slot].class as usize;
            fleet.classes[class].evicting += n;
        }
    }
    Some(
        victim_jobs
            .into_iter()
            .map(|j| fleet.running_jobs[j as usize].clone())
            .collect(),
    )
}
