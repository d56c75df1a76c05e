//! Preemption: the fewest lower-priority preemptible allocations whose
//! eviction makes room for a whole-GPU job that does not fit. Shares count
//! as victims only all together: a shared GPU is freed by evicting every
//! share on it (each preemptible and of a lower priority); MIG instances
//! never are (their GPU stays in MIG mode).

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
            // (priority, GPUs freed, victims): one whole-GPU allocation, or
            // every share on one shared GPU (its highest priority).
            let mut candidates: Vec<(i32, u32, Vec<u32>)> = Vec::new();
            // Per shared GPU (its bit): the shares not yet being evicted,
            // and whether each of them may be evicted for this job.
            let mut shared: Vec<(u32, Vec<u32>, i32, bool)> = Vec::new();
            for &r in &fleet.running_by_slot[slot as usize] {
                let run = &fleet.running[r as usize];
                if run.fractional {
                    // A MIG instance holds no whole GPU (its GPU stays in
                    // MIG mode): never a useful victim. A share frees its
                    // GPU only with every other share on it.
                    if run.mask == 0 || run.mask & s.shared == 0 {
                        continue;
                    }
                    let at = match shared.iter().position(|(bit, ..)| *bit == run.mask) {
                        Some(at) => at,
                        None => {
                            shared.push((run.mask, Vec::new(), i32::MIN, true));
                            shared.len() - 1
                        }
                    };
                    let gpu = &mut shared[at];
                    if !run.evicting {
                        gpu.1.push(r);
                        gpu.2 = gpu.2.max(run.priority);
                        gpu.3 &= run.preemptible && run.priority < job.priority;
                    }
                    continue;
                }
                if run.evicting {
                    available |= run.mask & s.healthy;
                } else if run.preemptible && run.priority < job.priority {
                    candidates.push((run.priority, run.mask.count_ones(), vec![r]));
                }
            }
            for (bit, victims, priority, evictable) in shared {
                if victims.is_empty() {
                    // Every share on it is already being evicted.
                    available |= bit & s.healthy;
                } else if evictable {
                    candidates.push((priority, 1, victims));
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
                        Some((_, gpus, runs)) => {
                            for r in runs {
                                available |= fleet.running[r as usize].mask & s.healthy;
                                victims.push(r);
                            }
                            cost += gpus;
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
