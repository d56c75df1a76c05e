//! Preemption: the fewest lower-priority preemptible allocations whose
//! eviction makes room for a job that does not fit. For a whole-GPU job,
//! shares count as victims only all together: a shared GPU is freed by
//! evicting every share on it (each preemptible and of a lower priority).
//! A one-task share job evicts the fewest thousandths of a GPU that make
//! room for it. MIG instances are never victims (their GPU stays in MIG
//! mode), and MIG jobs do not preempt.

use std::collections::HashMap;

use crate::compiled::Compiled;
use crate::domain::{GpuUnit, JobInput};
use crate::fleet::Fleet;
use crate::units::resolve_share;

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
            // (priority, GPUs freed, place in the slot's list, victims): one
            // whole-GPU allocation, or every share on one shared GPU (its
            // highest priority). Ties go by the slot's list order, which a
            // fresh build and a live fleet agree on (allocation ids differ).
            let mut candidates: Vec<(i32, u32, usize, Vec<u32>)> = Vec::new();
            // Per shared GPU (its bit): the shares not yet being evicted,
            // and whether each of them may be evicted for this job, and
            // where its first such share is listed.
            let mut shared: Vec<(u32, Vec<u32>, i32, bool, usize)> = Vec::new();
            for (at, &r) in fleet.running_by_slot[slot as usize].iter().enumerate() {
                let run = &fleet.running[r as usize];
                if run.fractional {
                    // A MIG instance holds no whole GPU (its GPU stays in
                    // MIG mode): never a useful victim. A share frees its
                    // GPU only with every other share on it.
                    if run.mask == 0 || run.mask & s.shared == 0 {
                        continue;
                    }
                    let gpu = match shared.iter().position(|(bit, ..)| *bit == run.mask) {
                        Some(gpu) => gpu,
                        None => {
                            shared.push((run.mask, Vec::new(), i32::MIN, true, at));
                            shared.len() - 1
                        }
                    };
                    let gpu = &mut shared[gpu];
                    if !run.evicting {
                        // Where its first evictable share is listed (the
                        // tie-break a fresh build and a live fleet share).
                        if gpu.1.is_empty() {
                            gpu.4 = at;
                        }
                        gpu.1.push(r);
                        gpu.2 = gpu.2.max(run.priority);
                        gpu.3 &= run.preemptible && run.priority < job.priority;
                    }
                    continue;
                }
                if run.evicting {
                    available |= run.mask & s.healthy;
                } else if run.preemptible && run.priority < job.priority {
                    candidates.push((run.priority, run.mask.count_ones(), at, vec![r]));
                }
            }
            for (bit, victims, priority, evictable, at) in shared {
                if victims.is_empty() {
                    // Every share on it is already being evicted.
                    available |= bit & s.healthy;
                } else if evictable {
                    candidates.push((priority, 1, at, victims));
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
                        Some((_, gpus, _, runs)) => {
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
    // Ties between groups go to the lowest group id (as reservations'):
    // the map's iteration order must not pick (it differs between runs).
    let best = per_group
        .into_iter()
        .filter(|(_, list)| list.len() >= tasks)
        .map(|(group, mut list)| {
            list.sort_by_key(|(cost, slot, _)| (*cost, *slot));
            list.truncate(tasks);
            let cost: u32 = list.iter().map(|(c, _, _)| *c).sum();
            (cost, group, list)
        })
        .min_by_key(|(cost, group, _)| (*cost, *group))?;
    let (_, _, list) = best;
    let uses_evicting = list.iter().any(|(_, slot, _)| {
        fleet.running_by_slot[*slot as usize]
            .iter()
            .any(|&r| fleet.running[r as usize].evicting)
    });
    if list.iter().all(|(_, _, v)| v.is_empty()) && !uses_evicting {
        return None;
    }
    let victims: Vec<u32> = list
        .iter()
        .flat_map(|(_, _, v)| v.iter().copied())
        .collect();
    let slots: Vec<u32> = list.iter().map(|(_, slot, _)| *slot).collect();
    Some(evict(fleet, &victims, &slots, now))
}

/// Marks the jobs of `victims` (running allocation ids) as being evicted —
/// every allocation of each, so a gang's other tasks count as room for
/// later jobs of the pass — and holds `slots` for the preemptor; returns
/// the victim job ids, sorted (a set: the same for a fresh build and a
/// live fleet, whose allocation ids differ).
fn evict(fleet: &mut Fleet, victims: &[u32], slots: &[u32], now: u64) -> Vec<String> {
    let mut names: Vec<String> = victims
        .iter()
        .map(|&r| fleet.running_jobs[fleet.running[r as usize].job as usize].clone())
        .collect();
    names.sort_unstable();
    names.dedup();
    // Hold the room: nothing may start on these slots until the job runs.
    for &slot in slots {
        fleet.reserve(slot, now.max(1));
    }
    // Victims' allocations are now being evicted (for later jobs this pass).
    let mut newly_evicting = Vec::new();
    for (r, run) in fleet.running.iter_mut().enumerate() {
        if !run.evicting
            && names
                .binary_search(&fleet.running_jobs[run.job as usize])
                .is_ok()
        {
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
    names
}

/// For a one-task share job that does not fit: the cheapest room that
/// evicting lower-priority preemptible work makes, in thousandths of GPUs
/// evicted: shares on one shared GPU (lowest priority first, then the
/// smallest), or a whole-GPU allocation whose GPU then hosts the share.
/// Work already being evicted counts as room (then no new victims). Returns
/// the victim job ids, or None if eviction cannot help.
pub(crate) fn preempt_share(
    fleet: &mut Fleet,
    job: &JobInput,
    classes: &[u32],
    now: u64,
) -> Option<Vec<String>> {
    let GpuUnit::Share {
        milli,
        memory_bytes,
    } = job.unit
    else {
        return None;
    };
    if job.tasks > 1 {
        return None;
    }
    // (thousandths evicted, slot, victims)
    let mut best: Option<(u64, u32, Vec<u32>)> = None;
    let mut consider = |cost: u64, slot: u32, victims: Vec<u32>| {
        if best
            .as_ref()
            .is_none_or(|(c, s, _)| (cost, slot) < (*c, *s))
        {
            best = Some((cost, slot, victims));
        }
    };
    for &c in classes {
        let class = &fleet.classes[c as usize];
        let gpu_memory = fleet.models[class.model as usize].memory_bytes;
        let Some((m, mem)) = resolve_share(milli, memory_bytes, gpu_memory) else {
            continue;
        };
        // Shares on one shared GPU.
        for &g in &class.shared {
            let gpu = &fleet.shared[g as usize];
            let s = &fleet.slots[gpu.slot as usize];
            let bit = 1u32 << gpu.pos;
            if s.reserved_until != 0 || s.healthy & bit == 0 {
                continue;
            }
            let (mut free_milli, mut free_memory) = (gpu.free_milli, gpu.free_memory);
            // (priority, share, place in the slot's list, allocation).
            let mut candidates: Vec<(i32, u32, usize, u32)> = Vec::new();
            let mut exclusive = false;
            let mut being_evicted = false;
            for (at, &r) in fleet.running_by_slot[gpu.slot as usize].iter().enumerate() {
                let run = &fleet.running[r as usize];
                if run.mask & bit == 0 {
                    continue;
                }
                if !run.fractional {
                    exclusive = true; // inconsistent input: never shared out
                } else if run.evicting {
                    free_milli += run.share.0;
                    free_memory += run.share.1;
                    being_evicted = true;
                } else if run.preemptible && run.priority < job.priority {
                    candidates.push((run.priority, run.share.0, at, r));
                }
            }
            if exclusive {
                continue;
            }
            candidates.sort_unstable();
            let mut victims = Vec::new();
            let mut cost = 0u64;
            for (_, share, _, r) in candidates {
                if free_milli >= m && free_memory >= mem {
                    break;
                }
                free_milli += share;
                free_memory += fleet.running[r as usize].share.1;
                cost += u64::from(share);
                victims.push(r);
            }
            // Room without victims or evictions would have placed it.
            if free_milli >= m && free_memory >= mem && (!victims.is_empty() || being_evicted) {
                consider(cost, gpu.slot, victims);
            }
        }
        // A whole-GPU allocation (or one being evicted) frees its GPUs.
        if mem > gpu_memory {
            continue;
        }
        for &slot in &class.slots {
            let s = &fleet.slots[slot as usize];
            if !s.schedulable || s.reserved_until != 0 {
                continue;
            }
            for &r in &fleet.running_by_slot[slot as usize] {
                let run = &fleet.running[r as usize];
                if run.fractional || run.mask & s.healthy == 0 {
                    continue;
                }
                if run.evicting {
                    consider(0, slot, Vec::new());
                } else if run.preemptible && run.priority < job.priority {
                    let cost = u64::from(run.mask.count_ones()) * u64::from(GpuUnit::WHOLE_MILLI);
                    consider(cost, slot, vec![r]);
                }
            }
        }
    }
    let (_, slot, victims) = best?;
    Some(evict(fleet, &victims, &[slot], now))
}
