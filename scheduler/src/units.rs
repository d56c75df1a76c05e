//! Fractions of GPUs: shares of a GPU (thousandths of its compute and an
//! amount of its memory) and MIG instances, as schedulable units beside
//! whole GPUs.
//!
//! Rules kept here, and checked by the property tests:
//! * a GPU hosting shares never also hosts exclusive work (it leaves its
//!   slot's free GPUs when its first share lands, and whole-GPU work only
//!   takes free GPUs); a MIG-enabled GPU is never a whole GPU nor shared;
//! * the shares on a GPU never add up to more than 1000 thousandths or more
//!   than its memory; a MIG instance holds one task at most.
//!
//! Shares pack best-fit: a task goes to the GPU already shared whose
//! remaining share it fills most closely, and opens a free GPU (on the
//! fullest node, so whole nodes stay whole) only when none has room. MIG
//! tasks take the smallest matching free instance. Placement policy orders
//! classes as for whole GPUs (`cost`: price first).

use std::collections::HashMap;

use crate::compiled::Compiled;
use crate::domain::{GpuUnit, JobInput, Policy, TaskPlacement};
use crate::fleet::{self, Fleet, NEVER};

/// A GPU hosting shares: what is left of it.
#[derive(Debug, Clone)]
pub(crate) struct SharedGpu {
    pub(crate) slot: u32,
    pub(crate) pos: u32,
    pub(crate) free_milli: u32,
    pub(crate) free_memory: u64,
}

/// One MIG instance.
#[derive(Debug, Clone)]
pub(crate) struct MigUnit {
    pub(crate) slot: u32,
    pub(crate) uuid: String,
    pub(crate) profile: String,
    pub(crate) memory_bytes: u64,
    pub(crate) sm_share_milli: u32,
    pub(crate) healthy: bool,
    pub(crate) free: bool,
}

/// A share's (thousandths, memory bytes) on a GPU of `gpu_memory` bytes, or
/// `None` when it could not fit even an idle GPU of that size.
pub(crate) fn resolve_share(milli: u32, memory_bytes: u64, gpu_memory: u64) -> Option<(u32, u64)> {
    let per_mille = |bytes: u64| -> u64 {
        if gpu_memory == 0 {
            return u64::MAX;
        }
        (bytes as u128 * 1000).div_ceil(gpu_memory as u128) as u64
    };
    let milli = match (milli, memory_bytes) {
        (0, 0) => return None,
        (0, mem) => per_mille(mem).max(1),
        (m, _) => m as u64,
    };
    let memory = if memory_bytes == 0 {
        (gpu_memory as u128 * milli as u128 / 1000) as u64
    } else {
        memory_bytes
    };
    (milli <= GpuUnit::WHOLE_MILLI as u64 && memory <= gpu_memory).then_some((milli as u32, memory))
}

/// How many shares of (`m` thousandths, `mem` bytes) fit in what is left of
/// a GPU; memory 0 takes none.
fn shares_fitting(free_milli: u32, free_memory: u64, m: u32, mem: u64) -> u64 {
    let by_share = u64::from(free_milli / m.max(1));
    free_memory
        .checked_div(mem)
        .map_or(by_share, |by_memory| by_share.min(by_memory))
}

/// Charges a running share to its GPU while the fleet is built; returns
/// what it charged (thousandths, bytes).
pub(crate) fn charge_share(
    fleet: &mut Fleet,
    index: &mut HashMap<(u32, u32), u32>,
    slot: u32,
    pos: u32,
    milli: u32,
    memory_bytes: u64,
) -> (u32, u64) {
    let gpu_memory = fleet.models
        [fleet.classes[fleet.slots[slot as usize].class as usize].model as usize]
        .memory_bytes;
    let id = *index.entry((slot, pos)).or_insert_with(|| {
        fleet.shared.push(SharedGpu {
            slot,
            pos,
            free_milli: GpuUnit::WHOLE_MILLI,
            free_memory: gpu_memory,
        });
        (fleet.shared.len() - 1) as u32
    });
    fleet.slots[slot as usize].shared |= 1 << pos;
    // A share that never fit (an older record, a GPU that shrank) still
    // holds what it can: never more than the GPU.
    let (milli, memory) = resolve_share(milli, memory_bytes, gpu_memory)
        .unwrap_or((GpuUnit::WHOLE_MILLI, gpu_memory));
    let gpu = &mut fleet.shared[id as usize];
    gpu.free_milli = gpu.free_milli.saturating_sub(milli);
    gpu.free_memory = gpu.free_memory.saturating_sub(memory);
    (milli, memory)
}

/// Lists shared GPUs and MIG instances of schedulable slots in their
/// classes, once running work has been charged. A shared GPU that also
/// runs exclusive work (inconsistent input) or is unhealthy takes no more.
pub(crate) fn index_units(fleet: &mut Fleet) {
    let mut exclusive = vec![0u32; fleet.slots.len()];
    for (slot, runs) in fleet.running_by_slot.iter().enumerate() {
        for &r in runs {
            let run = &fleet.running[r as usize];
            if !run.fractional {
                exclusive[slot] |= run.mask;
            }
        }
    }
    for id in 0..fleet.shared.len() {
        let (slot, bit) = {
            let gpu = &fleet.shared[id];
            (gpu.slot as usize, 1u32 << gpu.pos)
        };
        let s = &fleet.slots[slot];
        if exclusive[slot] & bit != 0 || s.healthy & bit == 0 {
            fleet.shared[id].free_milli = 0;
            fleet.shared[id].free_memory = 0;
        }
        if s.schedulable {
            let class = s.class as usize;
            fleet.classes[class].shared.push(id as u32);
        }
    }
    for id in 0..fleet.mig_units.len() {
        let s = &fleet.slots[fleet.mig_units[id].slot as usize];
        if s.schedulable {
            let class = s.class as usize;
            fleet.classes[class].mig.push(id as u32);
        }
    }
}

fn mig_matches(unit: &MigUnit, want: &GpuUnit) -> bool {
    match want {
        GpuUnit::Mig {
            profile: Some(p), ..
        } => unit.profile.eq_ignore_ascii_case(p),
        GpuUnit::Mig {
            profile: None,
            min_memory_bytes,
            min_sm_share_milli,
        } => unit.memory_bytes >= *min_memory_bytes && unit.sm_share_milli >= *min_sm_share_milli,
        _ => false,
    }
}

/// Tasks of this unit a class could hold if nothing ran (schedulable slots).
pub(crate) fn idle_tasks(fleet: &Fleet, unit: &GpuUnit, class_idx: u32) -> u64 {
    let class = &fleet.classes[class_idx as usize];
    match unit {
        GpuUnit::Whole => 0,
        GpuUnit::Share {
            milli,
            memory_bytes,
        } => {
            let gpu_memory = fleet.models[class.model as usize].memory_bytes;
            let Some((m, mem)) = resolve_share(*milli, *memory_bytes, gpu_memory) else {
                return 0;
            };
            let per_gpu = shares_fitting(GpuUnit::WHOLE_MILLI, gpu_memory, m, mem);
            let gpus: u64 = class
                .healthy_hist
                .iter()
                .enumerate()
                .map(|(k, n)| k as u64 * *n as u64)
                .sum();
            gpus * per_gpu
        }
        GpuUnit::Mig { .. } => class
            .mig
            .iter()
            .filter(|&&u| {
                let unit_ = &fleet.mig_units[u as usize];
                unit_.healthy && mig_matches(unit_, unit)
            })
            .count() as u64,
    }
}

/// Tasks of this unit a class could take now (unreserved capacity; a job
/// with an end before a reservation may also use the reserved slots).
fn free_tasks(fleet: &Fleet, unit: &GpuUnit, class_idx: u32, end: u64) -> u64 {
    let class = &fleet.classes[class_idx as usize];
    match unit {
        GpuUnit::Whole => 0,
        GpuUnit::Share {
            milli,
            memory_bytes,
        } => {
            let gpu_memory = fleet.models[class.model as usize].memory_bytes;
            let Some((m, mem)) = resolve_share(*milli, *memory_bytes, gpu_memory) else {
                return 0;
            };
            let fit =
                |free_milli: u32, free_memory: u64| shares_fitting(free_milli, free_memory, m, mem);
            let mut tasks: u64 = class
                .shared
                .iter()
                .map(|&g| {
                    let gpu = &fleet.shared[g as usize];
                    fit(gpu.free_milli, gpu.free_memory)
                })
                .sum();
            let mut free_gpus: u64 = class
                .buckets
                .iter()
                .enumerate()
                .map(|(k, b)| k as u64 * b.len() as u64)
                .sum();
            if end != NEVER {
                for &slot in &class.reserved {
                    let s = &fleet.slots[slot as usize];
                    if end <= s.reserved_until {
                        free_gpus += s.free.count_ones() as u64;
                    }
                }
            }
            tasks += free_gpus * fit(GpuUnit::WHOLE_MILLI, gpu_memory);
            tasks
        }
        GpuUnit::Mig { .. } => class
            .mig
            .iter()
            .filter(|&&u| {
                let unit_ = &fleet.mig_units[u as usize];
                unit_.free && mig_matches(unit_, unit)
            })
            .count() as u64,
    }
}

/// Whether the job's tasks fit the eligible classes' groups if nothing ran.
pub(crate) fn fits_when_idle(
    fleet: &Fleet,
    job: &JobInput,
    compiled: &Compiled,
    classes: &[u32],
) -> bool {
    per_group_fits(fleet, job, compiled, classes, |c| {
        idle_tasks(fleet, &job.unit, c)
    })
}

fn per_group_fits(
    fleet: &Fleet,
    job: &JobInput,
    compiled: &Compiled,
    classes: &[u32],
    tasks_of: impl Fn(u32) -> u64,
) -> bool {
    let mut per_group: HashMap<u16, u64> = HashMap::new();
    for &c in classes {
        let group = compiled.group_of(&fleet.classes[c as usize]);
        *per_group.entry(group).or_insert(0) += tasks_of(c);
    }
    per_group.values().any(|&t| t >= job.tasks.max(1) as u64)
}

/// One task's pick, so that an incomplete gang can give it back.
#[derive(Debug, Clone, Copy)]
enum Pick {
    /// Onto a GPU already shared: (shared id, milli, memory).
    Existing(u32, u32, u64),
    /// Opens a free GPU of a slot: (slot, position, milli, memory).
    Open(u32, u32, u32, u64),
    Mig(u32),
}

/// Places every task of a share or MIG job, or none.
pub(crate) fn place_units<'a>(
    fleet: &mut Fleet,
    job: &JobInput,
    groups: impl IntoIterator<Item = &'a [(u64, u32)]>,
    policy: Policy,
    end: u64,
    min_share: u32,
) -> Option<Vec<TaskPlacement>> {
    let tasks = job.tasks.max(1);
    for group in groups {
        let room: u64 = group
            .iter()
            .map(|&(_, c)| free_tasks(fleet, &job.unit, c, end))
            .sum();
        if room < tasks as u64 {
            continue;
        }
        let mut taken: Vec<Pick> = Vec::with_capacity(tasks as usize);
        for _ in 0..tasks {
            let pick = match &job.unit {
                GpuUnit::Whole => None,
                GpuUnit::Share {
                    milli,
                    memory_bytes,
                } => best_share(fleet, group, *milli, *memory_bytes, policy, end, min_share),
                GpuUnit::Mig { .. } => best_mig(fleet, group, &job.unit, policy),
            };
            match pick {
                Some(pick) => {
                    apply(fleet, pick);
                    taken.push(pick);
                }
                None => break,
            }
        }
        if let Some(placements) = finish(fleet, taken, tasks) {
            return Some(placements);
        }
    }
    None
}

/// The naive baseline for shares and MIG: slots in node order, the first
/// GPU (or instance) with room; gangs anywhere.
pub(crate) fn first_fit_units(
    fleet: &mut Fleet,
    job: &JobInput,
    classes: &[u32],
    end: u64,
) -> Option<Vec<TaskPlacement>> {
    let tasks = job.tasks.max(1) as usize;
    let mut allowed = vec![false; fleet.classes.len()];
    for &c in classes {
        allowed[c as usize] = true;
    }
    let mut taken: Vec<Pick> = Vec::new();
    match &job.unit {
        GpuUnit::Whole => return None,
        GpuUnit::Mig { .. } => {
            for id in 0..fleet.mig_units.len() as u32 {
                if taken.len() == tasks {
                    break;
                }
                let unit = &fleet.mig_units[id as usize];
                let s = &fleet.slots[unit.slot as usize];
                if s.schedulable
                    && allowed[s.class as usize]
                    && unit.free
                    && mig_matches(unit, &job.unit)
                {
                    apply(fleet, Pick::Mig(id));
                    taken.push(Pick::Mig(id));
                }
            }
        }
        GpuUnit::Share {
            milli,
            memory_bytes,
        } => {
            let mut shared_at: HashMap<(u32, u32), u32> = HashMap::new();
            for (id, gpu) in fleet.shared.iter().enumerate() {
                shared_at.insert((gpu.slot, gpu.pos), id as u32);
            }
            'slots: for slot in 0..fleet.slots.len() as u32 {
                let s = &fleet.slots[slot as usize];
                if !s.schedulable || !allowed[s.class as usize] {
                    continue;
                }
                let gpu_memory =
                    fleet.models[fleet.classes[s.class as usize].model as usize].memory_bytes;
                let Some((m, mem)) = resolve_share(*milli, *memory_bytes, gpu_memory) else {
                    continue;
                };
                for pos in 0..fleet::MAX_GPUS_PER_SLOT as u32 {
                    while taken.len() < tasks {
                        let s = &fleet.slots[slot as usize];
                        let bit = 1u32 << pos;
                        let pick = if let Some(&id) = shared_at.get(&(slot, pos)) {
                            let gpu = &fleet.shared[id as usize];
                            (gpu.free_milli >= m && gpu.free_memory >= mem)
                                .then_some(Pick::Existing(id, m, mem))
                        } else if s.free & bit != 0
                            && (s.reserved_until == 0 || end <= s.reserved_until)
                        {
                            shared_at.insert((slot, pos), fleet.shared.len() as u32);
                            Some(Pick::Open(slot, pos, m, mem))
                        } else {
                            None
                        };
                        match pick {
                            Some(pick) => {
                                apply(fleet, pick);
                                taken.push(pick);
                            }
                            None => break,
                        }
                    }
                    if taken.len() == tasks {
                        break 'slots;
                    }
                }
            }
        }
    }
    finish(fleet, taken, tasks as u32)
}

/// The best GPU for one share in a group: (score, pick), lower is better.
fn best_share(
    fleet: &Fleet,
    group: &[(u64, u32)],
    milli: u32,
    memory_bytes: u64,
    policy: Policy,
    end: u64,
    min_share: u32,
) -> Option<Pick> {
    let mut best: Option<((u64, u64, u64), Pick)> = None;
    // Best fit, except that a leftover no waiting share could use (a
    // sliver) ranks after every leftover that one could.
    let waste = |left: u32| -> u64 {
        let sliver = left > 0 && left < min_share;
        (u64::from(sliver) << 32) | u64::from(left)
    };
    for &(price, c) in group {
        if policy == Policy::Cost
            && let Some(((best_price, _, _), _)) = best
            && price > best_price
        {
            break; // classes are in price order
        }
        let class = &fleet.classes[c as usize];
        let gpu_memory = fleet.models[class.model as usize].memory_bytes;
        let Some((m, mem)) = resolve_share(milli, memory_bytes, gpu_memory) else {
            continue;
        };
        // Best fit among GPUs already shared: the least share left over.
        let existing = class
            .shared
            .iter()
            .filter(|&&g| {
                let gpu = &fleet.shared[g as usize];
                // A reserved slot (held for a job ordered earlier, e.g. one
                // evicting these very shares) takes only work that ends in
                // time.
                let reserved = fleet.slots[gpu.slot as usize].reserved_until;
                gpu.free_milli >= m && gpu.free_memory >= mem && (reserved == 0 || end <= reserved)
            })
            .min_by_key(|&&g| (waste(fleet.shared[g as usize].free_milli - m), g))
            .map(|&g| (waste(fleet.shared[g as usize].free_milli - m), g));
        // Else a free GPU on the fullest node (emptiest for `spread`).
        let open = if existing.is_some() && policy != Policy::Spread {
            None
        } else {
            open_gpu(fleet, c, policy, end)
        };
        let candidate = match (policy, existing, open) {
            (Policy::Spread, _, Some((k, slot, pos))) => {
                Some(((0, u64::MAX - k, price), Pick::Open(slot, pos, m, mem)))
            }
            (Policy::Spread, Some((left, g)), None) => {
                Some(((1, u64::MAX - left, price), Pick::Existing(g, m, mem)))
            }
            (Policy::Cost, Some((left, g)), _) => {
                Some(((price, 0, left), Pick::Existing(g, m, mem)))
            }
            (Policy::Cost, None, Some((k, slot, pos))) => {
                Some(((price, 1, k), Pick::Open(slot, pos, m, mem)))
            }
            (_, Some((left, g)), _) => Some(((0, left, price), Pick::Existing(g, m, mem))),
            (_, None, Some((k, slot, pos))) => Some(((1, k, price), Pick::Open(slot, pos, m, mem))),
            (_, None, None) => None,
        };
        if let Some((score, pick)) = candidate
            && best.is_none_or(|(b, _)| score < b)
        {
            best = Some((score, pick));
        }
    }
    best.map(|(_, pick)| pick)
}

/// A free GPU of a class to open for shares: (free GPUs on its slot, slot,
/// position), from the fullest slot (the emptiest for `spread`).
fn open_gpu(fleet: &Fleet, c: u32, policy: Policy, end: u64) -> Option<(u64, u32, u32)> {
    let class = &fleet.classes[c as usize];
    let ks: Box<dyn Iterator<Item = usize>> = if policy == Policy::Spread {
        Box::new((1..=fleet::MAX_GPUS_PER_SLOT).rev())
    } else {
        Box::new(1..=fleet::MAX_GPUS_PER_SLOT)
    };
    let mut found = None;
    for k in ks {
        if let Some(&slot) = class.buckets[k].last() {
            found = Some((k as u64, slot));
            break;
        }
    }
    if end != NEVER {
        for &slot in &class.reserved {
            let s = &fleet.slots[slot as usize];
            let k = s.free.count_ones() as u64;
            if k == 0 || end > s.reserved_until {
                continue;
            }
            let better = match found {
                None => true,
                Some((fk, _)) if policy == Policy::Spread => k > fk,
                Some((fk, _)) => k < fk,
            };
            if better {
                found = Some((k, slot));
            }
        }
    }
    let (k, slot) = found?;
    let free = fleet.slots[slot as usize].free;
    Some((k, slot, free.trailing_zeros()))
}

/// The smallest matching free MIG instance of a group.
fn best_mig(fleet: &Fleet, group: &[(u64, u32)], want: &GpuUnit, policy: Policy) -> Option<Pick> {
    let mut best: Option<((u64, u64, u64), u32)> = None;
    for &(price, c) in group {
        if policy == Policy::Cost
            && let Some(((best_price, _, _), _)) = best
            && price > best_price
        {
            break;
        }
        for &u in &fleet.classes[c as usize].mig {
            let unit = &fleet.mig_units[u as usize];
            if !unit.free || !mig_matches(unit, want) {
                continue;
            }
            let size = (unit.sm_share_milli as u64, unit.memory_bytes);
            let score = match policy {
                Policy::Cost => (price, size.0, size.1),
                _ => (size.0, size.1, price),
            };
            if best.is_none_or(|(b, _)| score < b) {
                best = Some((score, u));
            }
        }
    }
    best.map(|(_, u)| Pick::Mig(u))
}

fn apply(fleet: &mut Fleet, pick: Pick) {
    match pick {
        Pick::Existing(g, m, mem) => {
            let gpu = &mut fleet.shared[g as usize];
            gpu.free_milli -= m;
            gpu.free_memory -= mem;
        }
        Pick::Open(slot, pos, m, mem) => {
            fleet.take(slot, 1 << pos);
            let s = &mut fleet.slots[slot as usize];
            s.shared |= 1 << pos;
            let class = s.class as usize;
            let gpu_memory = fleet.models[fleet.classes[class].model as usize].memory_bytes;
            let id = fleet.shared.len() as u32;
            fleet.shared.push(SharedGpu {
                slot,
                pos,
                free_milli: GpuUnit::WHOLE_MILLI - m,
                free_memory: gpu_memory - mem,
            });
            fleet.classes[class].shared.push(id);
        }
        Pick::Mig(u) => fleet.mig_units[u as usize].free = false,
    }
}

/// Undoes `apply`; picks are given back newest first, so an opened GPU is
/// the last of `fleet.shared` and of its class's list.
fn give_back(fleet: &mut Fleet, pick: Pick) {
    match pick {
        Pick::Existing(g, m, mem) => {
            let gpu = &mut fleet.shared[g as usize];
            gpu.free_milli += m;
            gpu.free_memory += mem;
        }
        Pick::Open(slot, pos, _, _) => {
            fleet.shared.pop();
            let class = fleet.slots[slot as usize].class as usize;
            fleet.classes[class].shared.pop();
            fleet.slots[slot as usize].shared &= !(1 << pos);
            fleet.give_back(slot, 1 << pos);
        }
        Pick::Mig(u) => fleet.mig_units[u as usize].free = true,
    }
}

fn finish(fleet: &mut Fleet, taken: Vec<Pick>, tasks: u32) -> Option<Vec<TaskPlacement>> {
    if taken.len() == tasks as usize {
        return Some(taken.into_iter().map(|p| placement(fleet, p)).collect());
    }
    for pick in taken.into_iter().rev() {
        give_back(fleet, pick);
    }
    None
}

fn placement(fleet: &Fleet, pick: Pick) -> TaskPlacement {
    let (slot, uuid, share_milli, memory_limit_bytes, mig_profile) = match pick {
        Pick::Existing(g, m, mem) => {
            let gpu = &fleet.shared[g as usize];
            let uuids = fleet.uuids(gpu.slot, 1 << gpu.pos);
            (gpu.slot, uuids, m, mem, None)
        }
        Pick::Open(slot, pos, m, mem) => (slot, fleet.uuids(slot, 1 << pos), m, mem, None),
        Pick::Mig(u) => {
            let unit = &fleet.mig_units[u as usize];
            (
                unit.slot,
                vec![unit.uuid.clone()],
                unit.sm_share_milli.max(1),
                0,
                Some(unit.profile.clone()),
            )
        }
    };
    let s = &fleet.slots[slot as usize];
    let class = &fleet.classes[s.class as usize];
    TaskPlacement {
        node_id: fleet.node_ids[s.node as usize].clone(),
        provider: fleet.providers.names[class.provider as usize].clone(),
        region: fleet.regions.names[class.region as usize].clone(),
        block: fleet.blocks.names[class.block as usize].clone(),
        price_per_gpu_hour_micro_usd: class.price,
        gpu_uuids: uuid,
        generation: fleet.models[class.model as usize].generation,
        share_milli,
        memory_limit_bytes,
        mig_profile,
    }
}

/// Shared GPUs and MIG instances by slot, built once per explanation so
/// that looking a slot up does not walk every unit of the fleet.
#[derive(Default)]
pub(crate) struct BySlot {
    shared: HashMap<u32, Vec<u32>>,
    mig: HashMap<u32, Vec<u32>>,
}

impl BySlot {
    pub(crate) fn new(fleet: &Fleet) -> Self {
        let mut out = BySlot::default();
        for (id, gpu) in fleet.shared.iter().enumerate() {
            out.shared.entry(gpu.slot).or_default().push(id as u32);
        }
        for (id, unit) in fleet.mig_units.iter().enumerate() {
            out.mig.entry(unit.slot).or_default().push(id as u32);
        }
        out
    }

    fn shared<'a>(&'a self, fleet: &'a Fleet, slot: u32) -> impl Iterator<Item = &'a SharedGpu> {
        self.shared
            .get(&slot)
            .into_iter()
            .flatten()
            .map(|&g| &fleet.shared[g as usize])
    }

    fn mig<'a>(&'a self, fleet: &'a Fleet, slot: u32) -> impl Iterator<Item = &'a MigUnit> {
        self.mig
            .get(&slot)
            .into_iter()
            .flatten()
            .map(|&u| &fleet.mig_units[u as usize])
    }
}

/// What a slot offers one task of this unit: (tasks that fit now, tasks
/// that would fit if nothing ran). For explanations, off the hot path.
pub(crate) fn slot_room(fleet: &Fleet, by_slot: &BySlot, unit: &GpuUnit, slot: u32) -> (u64, u64) {
    let s = &fleet.slots[slot as usize];
    let class = &fleet.classes[s.class as usize];
    match unit {
        GpuUnit::Whole => (0, 0),
        GpuUnit::Share {
            milli,
            memory_bytes,
        } => {
            let gpu_memory = fleet.models[class.model as usize].memory_bytes;
            let Some((m, mem)) = resolve_share(*milli, *memory_bytes, gpu_memory) else {
                return (0, 0);
            };
            let fit =
                |free_milli: u32, free_memory: u64| shares_fitting(free_milli, free_memory, m, mem);
            let whole = fit(GpuUnit::WHOLE_MILLI, gpu_memory);
            let mut now = s.free.count_ones() as u64 * whole;
            for gpu in by_slot.shared(fleet, slot) {
                now += fit(gpu.free_milli, gpu.free_memory);
            }
            (now, s.healthy.count_ones() as u64 * whole)
        }
        GpuUnit::Mig { .. } => {
            let units = by_slot
                .mig(fleet, slot)
                .filter(|u| u.healthy && mig_matches(u, unit));
            let (mut now, mut idle) = (0, 0);
            for u in units {
                idle += 1;
                now += u64::from(u.free);
            }
            (now, idle)
        }
    }
}

/// What is left of a slot for this unit, in words: "300/1000 and 10 GiB
/// free at most", "no free 1g.10gb instance".
pub(crate) fn slot_left(fleet: &Fleet, by_slot: &BySlot, unit: &GpuUnit, slot: u32) -> String {
    let s = &fleet.slots[slot as usize];
    match unit {
        GpuUnit::Mig { .. } => format!("no free {}", kind_name(unit)),
        _ => {
            let best = by_slot
                .shared(fleet, slot)
                .max_by_key(|g| (g.free_milli, g.free_memory));
            match best {
                Some(g) if s.free == 0 => format!(
                    "{}/1000 and {} free at most",
                    g.free_milli,
                    crate::domain::gib(g.free_memory)
                ),
                _ => "no free GPU".to_string(),
            }
        }
    }
}

/// "GPU that can be shared", "1g.10gb MIG instance", "matching MIG instance".
pub(crate) fn kind_name(unit: &GpuUnit) -> String {
    match unit {
        GpuUnit::Whole => "GPU".to_string(),
        GpuUnit::Share { .. } => "GPU without MIG large enough".to_string(),
        GpuUnit::Mig {
            profile: Some(p), ..
        } => format!("{p} MIG instance"),
        GpuUnit::Mig { .. } => "matching MIG instance".to_string(),
    }
}
