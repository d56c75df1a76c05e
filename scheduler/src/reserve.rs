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
/// Where it fits only once work with no expected end (no max runtime) has
/// left, the reservation is "until never" on the lowest group and slot:
/// no work without a max runtime lands there, so the slot drains for it.
pub(crate) fn reserve(
    fleet: &mut Fleet,
    job: &JobInput,
    compiled: &Compiled,
    classes: &[u32],
    now: u64,
) -> bool {
    if job.tasks.max(1) == 1 {
        return reserve_one(fleet, job.gpus_per_task.max(1), compiled, classes, now);
    }
    reserve_walk(fleet, job, compiled, classes, now)
}

/// The general case (any number of tasks): every eligible slot's running
/// work walked.
fn reserve_walk(
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
    let mut ends: Vec<(u64, u32)> = Vec::new();
    for &c in classes {
        let class = &fleet.classes[c as usize];
        let group = compiled.group_of(class);
        for &slot in &class.slots {
            let s = &fleet.slots[slot as usize];
            if !s.schedulable || s.healthy.count_ones() < per_task {
                continue;
            }
            release_events(fleet, slot, &mut ends);
            let mut free = s.free.count_ones();
            let capacity = s.healthy.count_ones() / per_task;
            let mut next = ends.iter();
            let list = per_group.entry(group).or_default();
            // The m-th task fits once enough has been given back for m:
            // never earlier than the (m-1)-th.
            let mut at = now;
            for m in 1..=capacity {
                while free < m * per_task {
                    match next.next() {
                        Some(&(end, gpus)) => {
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

/// A one-task reservation: the same choice as the general case (earliest
/// time, then lowest group, then lowest slot), read from the
/// [`EarliestFit`] tables instead of walking every slot's running work.
fn reserve_one(
    fleet: &mut Fleet,
    width: u32,
    compiled: &Compiled,
    classes: &[u32],
    now: u64,
) -> bool {
    let mut index = std::mem::take(&mut fleet.earliest_fit);
    index.refresh(fleet);
    let mut best: Option<(u64, u16, u32)> = None;
    for &c in classes {
        let group = compiled.group_of(&fleet.classes[c as usize]);
        let first = index.table(fleet, c, width).first();
        let keys = [
            first.now.map(|slot| (now, group, slot)),
            first.at.map(|(at, slot)| (at, group, slot)),
        ];
        for key in keys.into_iter().flatten() {
            if best.is_none_or(|b| key < b) {
                best = Some(key);
            }
        }
    }
    fleet.earliest_fit = index;
    let Some((at, _, slot)) = best else {
        return false;
    };
    fleet.reserve(slot, at);
    true
}

/// When running work on a slot gives GPUs back, sorted: (time, healthy
/// GPUs freed). A GPU hosting shares frees only when all of them end: its
/// latest end. MIG instances free no whole GPU.
fn release_events(fleet: &Fleet, slot: u32, ends: &mut Vec<(u64, u32)>) {
    ends.clear();
    let s = &fleet.slots[slot as usize];
    // (GPU mask, latest end) of shared GPUs: few per slot.
    let mut shared: Vec<(u32, u64)> = Vec::new();
    for &r in &fleet.running_by_slot[slot as usize] {
        let run = &fleet.running[r as usize];
        if run.fractional {
            if run.mask != 0 {
                match shared.iter_mut().find(|(mask, _)| *mask == run.mask) {
                    Some((_, end)) => *end = (*end).max(run.end),
                    None => shared.push((run.mask, run.end)),
                }
            }
        } else {
            ends.push((run.end, (run.mask & s.healthy).count_ones()));
        }
    }
    ends.extend(
        shared
            .into_iter()
            .map(|(mask, end)| (end, (mask & s.healthy).count_ones())),
    );
    ends.sort_unstable();
}

/// Task widths whose tables one class keeps at most (16 bytes per slot each).
const MAX_WIDTHS_PER_CLASS: usize = 8;

/// When one task of `width` GPUs could first run on a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fit {
    /// Not schedulable, or too few healthy GPUs: never.
    Excluded,
    /// Enough GPUs are free now.
    Now,
    /// When running work has given enough back ([`NEVER`]: it never does).
    At(u64),
}

/// Per class and task width, when each of the class's slots could first
/// host one task: what every one-task reservation asks. Kept between
/// reservations (and, in a [`crate::live::LiveFleet`], between passes);
/// only slots whose free GPUs or running work changed are recomputed, so a
/// reservation costs a scan of small entries rather than a walk of every
/// slot's running work.
#[derive(Debug, Clone, Default)]
pub(crate) struct EarliestFit {
    /// Per class: one table per task width asked for.
    tables: Vec<Vec<Table>>,
    /// Slots changed since the tables were last brought up to date.
    dirty: Vec<u32>,
    /// Some table exists (else changes need not be noted).
    active: bool,
}

impl EarliestFit {
    /// Notes that a slot's free GPUs or running work changed.
    pub(crate) fn touch(&mut self, slot: u32, slots: usize) {
        if !self.active {
            return;
        }
        self.dirty.push(slot);
        // Bounded: past this many notes a rebuild costs no more.
        if self.dirty.len() > slots.max(64) {
            self.clear();
        }
    }

    fn clear(&mut self) {
        self.tables.clear();
        self.dirty.clear();
        self.active = false;
    }

    /// Recomputes the entries of changed slots.
    fn refresh(&mut self, fleet: &Fleet) {
        if self.dirty.is_empty() {
            return;
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        let mut ends = Vec::new();
        for &slot in &dirty {
            let s = &fleet.slots[slot as usize];
            let Some(tables) = self.tables.get_mut(s.class as usize) else {
                continue;
            };
            for table in tables.iter_mut() {
                if let Some(entry) = table.fits.get_mut(s.class_pos as usize) {
                    *entry = fit(fleet, slot, table.width, &mut ends);
                    table.first = None;
                }
            }
        }
        dirty.clear();
        self.dirty = dirty;
    }

    /// The class's table for `width`, built on first use.
    fn table(&mut self, fleet: &Fleet, class: u32, width: u32) -> &mut Table {
        if self.tables.len() < fleet.classes.len() {
            self.tables.resize_with(fleet.classes.len(), Vec::new);
        }
        self.active = true;
        let tables = &mut self.tables[class as usize];
        let at = match tables.iter().position(|t| t.width == width) {
            Some(at) => at,
            None => {
                // Bounded: a class keeps tables for a few widths (a queue
                // asks for 1, 2, 4, 8 GPUs mostly); more start it over.
                if tables.len() >= MAX_WIDTHS_PER_CLASS {
                    tables.clear();
                }
                let mut ends = Vec::new();
                let fits = fleet.classes[class as usize]
                    .slots
                    .iter()
                    .map(|&slot| fit(fleet, slot, width, &mut ends))
                    .collect();
                tables.push(Table {
                    width,
                    fits,
                    first: None,
                });
                tables.len() - 1
            }
        };
        let table = &mut tables[at];
        if table.first.is_none() {
            table.first = Some(First::of(&table.fits, &fleet.classes[class as usize].slots));
        }
        table
    }
}

/// One class's entries for one task width, and where it fits first.
#[derive(Debug, Clone)]
struct Table {
    width: u32,
    /// One entry per slot of `Class::slots`, in order.
    fits: Vec<Fit>,
    /// Kept until an entry changes.
    first: Option<First>,
}

impl Table {
    fn first(&self) -> First {
        self.first.unwrap_or_default()
    }
}

/// The earliest of a class's entries: the lowest slot that fits now, and
/// the earliest (time, lowest slot) that fits later. Which of the two is
/// earlier depends on `now`, so both are kept.
#[derive(Debug, Clone, Copy, Default)]
struct First {
    now: Option<u32>,
    at: Option<(u64, u32)>,
}

impl First {
    fn of(fits: &[Fit], slots: &[u32]) -> First {
        let mut first = First::default();
        for (fit, &slot) in fits.iter().zip(slots) {
            match *fit {
                Fit::Excluded => {}
                Fit::Now => {
                    if first.now.is_none_or(|s| slot < s) {
                        first.now = Some(slot);
                    }
                }
                Fit::At(at) => {
                    if first.at.is_none_or(|b| (at, slot) < b) {
                        first.at = Some((at, slot));
                    }
                }
            }
        }
        first
    }
}

/// When one task of `width` GPUs could first run on `slot`.
fn fit(fleet: &Fleet, slot: u32, width: u32, ends: &mut Vec<(u64, u32)>) -> Fit {
    let s = &fleet.slots[slot as usize];
    if !s.schedulable || s.healthy.count_ones() < width {
        return Fit::Excluded;
    }
    let mut free = s.free.count_ones();
    if free >= width {
        return Fit::Now;
    }
    release_events(fleet, slot, ends);
    for &(end, gpus) in ends.iter() {
        free += gpus;
        if free >= width {
            return Fit::At(end);
        }
    }
    Fit::At(NEVER)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Constraints, Locality};
    use crate::fleet::{GpuInput, NodeInput, RunningInput};
    use crate::sim::workload::Rng;
    use crate::{Generation, Policy};

    /// The one-task reservation read from the kept tables chooses what the
    /// general walk chooses, also after GPUs were taken and given back.
    #[test]
    fn earliest_fit_tables_choose_as_the_walk() {
        let mut rng = Rng::new(7);
        for round in 0..200 {
            let (nodes, running) = crate::test_support::random_fleet(&mut rng, 3);
            let mut kept = Fleet::build(&nodes, &running);
            // Up to 12 widths: past 8 a class's tables start over.
            for step in 0..12 {
                let job = JobInput {
                    id: "head".into(),
                    tasks: 1,
                    gpus_per_task: 1 + rng.below(12) as u32,
                    constraints: Constraints {
                        locality: if rng.below(2) == 0 {
                            Locality::Region
                        } else {
                            Locality::Any
                        },
                        ..Default::default()
                    },
                    policy: Some(Policy::Cost),
                    ..Default::default()
                };
                let compiled = Compiled::new(&kept, &job);
                let classes: Vec<u32> = kept.classes_by_price.clone();
                let mut walked = kept.clone();
                let a = reserve(&mut kept, &job, &compiled, &classes, 50);
                let b = reserve_walk(&mut walked, &job, &compiled, &classes, 50);
                let held = |f: &Fleet| f.slots.iter().map(|s| s.reserved_until).collect::<Vec<_>>();
                assert_eq!(
                    (a, held(&kept)),
                    (b, held(&walked)),
                    "round {round} step {step}"
                );
                // Change some slots' free GPUs between reservations.
                for slot in 0..kept.slots.len() as u32 {
                    let free = kept.slots[slot as usize].free;
                    match rng.below(4) {
                        0 if free != 0 => kept.take(slot, free & free.wrapping_neg()),
                        1 => {
                            let healthy = kept.slots[slot as usize].healthy;
                            kept.give_back(slot, healthy & !free);
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// A slot that can host several tasks: the second fits no earlier than
    /// the first (the reservation once treated it as fitting now).
    #[test]
    fn a_later_task_on_a_slot_never_fits_before_an_earlier_one() {
        let node = |id: &str, gpus: u32| NodeInput {
            id: id.into(),
            provider: "p".into(),
            region: "r".into(),
            price_per_gpu_hour_micro_usd: 1,
            schedulable: true,
            gpus: (0..gpus)
                .map(|g| GpuInput {
                    uuid: format!("{id}-{g}"),
                    model: "H100".into(),
                    generation: Generation::Hopper,
                    healthy: true,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let busy = |id: &str, gpus: u32, end: u64| RunningInput {
            job_id: format!("run-{id}"),
            node_id: id.into(),
            gpu_uuids: (0..gpus).map(|g| format!("{id}-{g}")).collect(),
            expected_end: Some(end),
            ..Default::default()
        };
        // a: 4 GPUs busy until 100; b: 2 GPUs busy until 50.
        let nodes = [node("a", 4), node("b", 2)];
        let mut fleet = Fleet::build(&nodes, &[busy("a", 4, 100), busy("b", 2, 50)]);
        let job = JobInput {
            id: "head".into(),
            tasks: 1,
            gpus_per_task: 2,
            ..Default::default()
        };
        let compiled = Compiled::new(&fleet, &job);
        let classes = fleet.classes_by_price.clone();
        let mut walked = fleet.clone();
        for (f, done) in [
            (
                &mut fleet,
                reserve as fn(&mut Fleet, &JobInput, &Compiled, &[u32], u64) -> bool,
            ),
            (&mut walked, reserve_walk),
        ] {
            assert!(done(f, &job, &compiled, &classes, 10));
            let held: Vec<u64> = f.slots.iter().map(|s| s.reserved_until).collect();
            assert_eq!(held, vec![0, 50], "b frees 2 GPUs at 50, before a at 100");
        }
        // With no expected end the job still holds the first slot (until
        // never), so that it drains for it.
        let mut unknown = Fleet::build(&nodes, &[busy("a", 4, NEVER), busy("b", 2, NEVER)]);
        assert!(reserve(&mut unknown, &job, &compiled, &classes, 10));
        let held: Vec<u64> = unknown.slots.iter().map(|s| s.reserved_until).collect();
        assert_eq!(held, vec![NEVER, 0]);
    }
}
