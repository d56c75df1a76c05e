//! A fleet kept between passes: starts and departures are applied to one
//! [`Fleet`] instead of rebuilding it from every running allocation each
//! pass (what the simulator does; the controller builds a fresh fleet per
//! pass with [`Fleet::build`]).
//!
//! Decisions must not change: before each pass the live fleet is put back
//! in exactly the state [`Fleet::build`] gives for the same nodes and
//! running work in order of their keys. A pass leaves reservations, bucket
//! lists in the order its takes left them and shares it opened; settling
//! clears the reservations, recomputes the slots that changed from the
//! running work, sorts the bucket lists that changed (a fresh build lists
//! slots in slot order) and rebuilds the shared-GPU list (ids in the order
//! running shares name them). Only changed slots and lists are visited,
//! plus the running shares, if any.
//!
//! Running work may be preemptible: each class's lowest preemptible
//! priority is kept from per-class counts, and a pass's evictions (work it
//! marked as being evicted, and the class counts of it) are cleared when
//! settling, as running work here is never being evicted (a caller stops
//! the victims it is told of, or they run on unmarked). Each slot's list of
//! running allocations is kept in key order (then task order), as a fresh
//! build lists them: preemption breaks ties by that order.
//!
//! Limits: nodes must have no MIG-enabled GPUs ([`LiveFleet::new`] refuses
//! them): the per-pass state those carry is not put back.

use std::collections::{BTreeMap, HashMap};

use crate::fleet::{Dirty, Fleet, MAX_GPUS_PER_SLOT, NEVER, NodeInput, NodeLookup, Running};

/// Work that started, as the live fleet is told of it.
#[derive(Debug, Clone, Default)]
pub struct LiveRun {
    pub job_id: String,
    pub priority: i32,
    pub node_id: String,
    /// GPUs of `node_id` it holds; a uuid that node does not have is ignored.
    pub gpu_uuids: Vec<String>,
    /// 0: whole, exclusive GPUs. Else its share of its one GPU, thousandths.
    pub share_milli: u32,
    /// A share's GPU memory, bytes (0 = the same share of the GPU's memory).
    pub memory_bytes: u64,
    /// Unix seconds by which it will have ended.
    pub expected_end: Option<u64>,
    /// May be evicted for higher-priority work.
    pub preemptible: bool,
}

/// Why [`LiveFleet::new`] refused the nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigNotSupported {
    pub node_id: String,
}

impl std::fmt::Display for MigNotSupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node `{}` has a MIG-enabled GPU: a live fleet does not track MIG instances; \
             build the fleet per pass with Fleet::build",
            self.node_id
        )
    }
}

impl std::error::Error for MigNotSupported {}

#[derive(Debug, Clone, Default)]
struct LiveJob {
    /// Its running allocation ids (one per slot).
    runs: Vec<u32>,
    /// Shares it charges: (slot, position, milli, memory).
    shares: Vec<(u32, u32, u32, u64)>,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct LiveFleet {
    fleet: Fleet,
    lookup: NodeLookup<String>,
    /// Running work by key (the order a fresh build would be given it).
    jobs: BTreeMap<u64, LiveJob>,
    /// Keys of running work that holds shares.
    share_jobs: BTreeMap<u64, ()>,
    /// Per running allocation id: its slot and its job's key.
    run_slot: Vec<u32>,
    run_key: Vec<u64>,
    /// Per running allocation id: its place in a fresh build's order (its
    /// job's key, then its place among that job's allocations).
    run_order: Vec<(u64, u32)>,
    /// Per class: how many preemptible allocations run there, per priority.
    preemptible: Vec<BTreeMap<i32, u32>>,
    /// Classes whose preemptible work changed since the last settle.
    preemptible_touched: Vec<u32>,
    /// Preemptible allocations running, plus those departed since the last
    /// settle (a pass may have marked them): without any, no pass marked
    /// evictions.
    preemptible_runs: usize,
    /// Of those, the departed ones.
    preemptible_departed: usize,
    /// Slots changed by starts and departures since the last settle.
    touched: Vec<u32>,
    /// The shared-GPU list may differ from a fresh build's.
    shares_dirty: bool,
}

impl LiveFleet {
    /// The fleet of `nodes` with nothing running.
    pub fn new(nodes: &[NodeInput]) -> Result<Self, MigNotSupported> {
        if let Some(node) = nodes.iter().find(|n| n.gpus.iter().any(|g| g.mig_enabled)) {
            return Err(MigNotSupported {
                node_id: node.id.clone(),
            });
        }
        let (mut fleet, lookup) = Fleet::index_nodes(nodes, str::to_string);
        fleet.add_running(nodes, &lookup, &[]);
        fleet.dirty = Some(Dirty::default());
        let classes = fleet.classes.len();
        Ok(LiveFleet {
            fleet,
            lookup,
            jobs: BTreeMap::new(),
            share_jobs: BTreeMap::new(),
            run_slot: Vec::new(),
            run_key: Vec::new(),
            run_order: Vec::new(),
            preemptible: vec![BTreeMap::new(); classes],
            preemptible_touched: Vec::new(),
            preemptible_runs: 0,
            preemptible_departed: 0,
            touched: Vec::new(),
            shares_dirty: false,
        })
    }

    /// The fleet for one pass, in the state [`Fleet::build`] gives for the
    /// nodes and the running work in key order. The pass may change it
    /// freely; the next call puts it back.
    pub fn pass_fleet(&mut self) -> &mut Fleet {
        self.settle();
        &mut self.fleet
    }

    /// Records work that started. `key` orders running work as a fresh
    /// build's input would be ordered (a key already running is replaced).
    pub fn start(&mut self, key: u64, run: &LiveRun) {
        self.start_tasks(key, std::slice::from_ref(run));
    }

    /// Records a job of several tasks (a gang, possibly on several nodes)
    /// that started, under one key: a fresh build's input lists them in
    /// this order. A key already running is replaced.
    pub fn start_tasks(&mut self, key: u64, tasks: &[LiveRun]) {
        self.depart(key);
        let mut job = LiveJob::default();
        for run in tasks {
            self.add_task(key, run, &mut job);
        }
        if !job.shares.is_empty() {
            self.share_jobs.insert(key, ());
            self.shares_dirty = true;
        }
        if !job.runs.is_empty() {
            self.jobs.insert(key, job);
        }
    }

    fn add_task(&mut self, key: u64, run: &LiveRun, job: &mut LiveJob) {
        let Some(&node) = self.lookup.node_index.get(run.node_id.as_str()) else {
            return;
        };
        let gpus = &self.fleet.node_gpus[node as usize];
        let mut per_slot: Vec<(u32, u32)> = Vec::new();
        let mut share = (0u32, 0u64);
        for uuid in &run.gpu_uuids {
            let Some(at) = gpus.iter().position(|g| g == uuid) else {
                continue;
            };
            let Some((slot, pos)) = self.lookup.gpu_slots[node as usize][at] else {
                continue;
            };
            let bit = 1u32 << pos;
            if run.share_milli > 0 {
                let gpu_memory = self.gpu_memory(slot);
                share = crate::units::resolve_share(run.share_milli, run.memory_bytes, gpu_memory)
                    .unwrap_or((crate::domain::GpuUnit::WHOLE_MILLI, gpu_memory));
                job.shares.push((slot, pos, share.0, share.1));
            }
            match per_slot.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, mask)) => *mask |= bit,
                None => per_slot.push((slot, bit)),
            }
        }
        for (slot, mask) in per_slot {
            let id = self.fleet.running.len() as u32;
            self.fleet.running.push(Running {
                job: id,
                mask,
                fractional: run.share_milli > 0,
                share,
                end: run.expected_end.unwrap_or(NEVER),
                priority: run.priority,
                preemptible: run.preemptible,
                evicting: false,
            });
            if run.preemptible {
                let class = self.fleet.slots[slot as usize].class;
                *self.preemptible[class as usize]
                    .entry(run.priority)
                    .or_insert(0) += 1;
                self.preemptible_touched.push(class);
                self.preemptible_runs += 1;
            }
            self.fleet.running_jobs.push(run.job_id.clone());
            // The slot's list stays in key order (then task order), as a
            // fresh build lists it: usually at the end.
            let order = (key, job.runs.len() as u32);
            let list = &mut self.fleet.running_by_slot[slot as usize];
            let at = list
                .iter()
                .rposition(|&r| self.run_order[r as usize] < order)
                .map_or(0, |p| p + 1);
            list.insert(at, id);
            self.run_slot.push(slot);
            self.run_key.push(key);
            self.run_order.push(order);
            job.runs.push(id);
            self.touched.push(slot);
        }
    }

    /// Records that the work with this key left (nothing if none runs).
    pub fn depart(&mut self, key: u64) {
        let Some(mut job) = self.jobs.remove(&key) else {
            return;
        };
        if self.share_jobs.remove(&key).is_some() {
            self.shares_dirty = true;
        }
        while let Some(id) = job.runs.pop() {
            self.remove_run(id, &mut job);
        }
    }

    /// Removes one running allocation; the last one takes its id.
    fn remove_run(&mut self, id: u32, leaving: &mut LiveJob) {
        let slot = self.run_slot[id as usize];
        self.touched.push(slot);
        let run = &self.fleet.running[id as usize];
        if run.preemptible {
            let class = self.fleet.slots[slot as usize].class;
            let counts = &mut self.preemptible[class as usize];
            if let Some(n) = counts.get_mut(&run.priority) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&run.priority);
                }
            }
            self.preemptible_touched.push(class);
            self.preemptible_departed += 1;
        }
        let list = &mut self.fleet.running_by_slot[slot as usize];
        if let Some(at) = list.iter().position(|&r| r == id) {
            // In order: the list stays in key order.
            list.remove(at);
        }
        let last = (self.fleet.running.len() - 1) as u32;
        self.fleet.running.swap_remove(id as usize);
        self.fleet.running_jobs.swap_remove(id as usize);
        self.run_slot.swap_remove(id as usize);
        self.run_key.swap_remove(id as usize);
        self.run_order.swap_remove(id as usize);
        if id == last {
            return;
        }
        // The allocation that was last is now `id`.
        self.fleet.running[id as usize].job = id;
        let moved_slot = self.run_slot[id as usize];
        for r in &mut self.fleet.running_by_slot[moved_slot as usize] {
            if *r == last {
                *r = id;
            }
        }
        let moved_key = self.run_key[id as usize];
        let runs = match self.jobs.get_mut(&moved_key) {
            Some(job) => &mut job.runs,
            None => &mut leaving.runs,
        };
        for r in runs {
            if *r == last {
                *r = id;
            }
        }
    }

    fn gpu_memory(&self, slot: u32) -> u64 {
        let class = self.fleet.slots[slot as usize].class;
        self.fleet.models[self.fleet.classes[class as usize].model as usize].memory_bytes
    }

    /// Puts the fleet back in the state a fresh build gives.
    fn settle(&mut self) {
        let fleet = &mut self.fleet;
        let mut dirty = fleet.dirty.take().unwrap_or_default();
        let mut slots = std::mem::take(&mut self.touched);
        slots.append(&mut dirty.slots);
        slots.sort_unstable();
        slots.dedup();
        fleet.dirty = Some(dirty);
        // Work a pass marked as being evicted runs on unmarked: nothing
        // here is being evicted (see the module documentation). Only
        // preemptible work is ever marked.
        let marked = self.preemptible_runs > 0;
        self.preemptible_runs -= std::mem::take(&mut self.preemptible_departed);
        if marked && fleet.classes.iter().any(|c| c.evicting > 0) {
            for class in &mut fleet.classes {
                class.evicting = 0;
            }
            for run in &mut fleet.running {
                run.evicting = false;
            }
        }
        let mut classes = std::mem::take(&mut self.preemptible_touched);
        classes.sort_unstable();
        classes.dedup();
        for class in classes {
            fleet.classes[class as usize].min_preemptible_priority = self.preemptible
                [class as usize]
                .keys()
                .next()
                .copied()
                .unwrap_or(i32::MAX);
        }
        for &slot in &slots {
            let schedulable = fleet.slots[slot as usize].schedulable;
            if schedulable {
                fleet.bucket_remove(slot);
            }
            let (mut occupied, mut shared) = (0u32, 0u32);
            for &r in &fleet.running_by_slot[slot as usize] {
                let run = &fleet.running[r as usize];
                occupied |= run.mask;
                if run.fractional {
                    shared |= run.mask;
                }
            }
            fleet.earliest_fit.touch(slot, fleet.slots.len());
            let s = &mut fleet.slots[slot as usize];
            s.free = s.healthy & !occupied;
            s.shared = shared;
            s.reserved_until = 0;
            if schedulable {
                fleet.bucket_insert(slot);
            }
        }
        let mut dirty = fleet.dirty.take().unwrap_or_default();
        dirty.buckets.sort_unstable();
        dirty.buckets.dedup();
        for &(class, list) in &dirty.buckets {
            let class = &mut fleet.classes[class as usize];
            let list = if list as usize > MAX_GPUS_PER_SLOT {
                &mut class.reserved
            } else {
                &mut class.buckets[list as usize]
            };
            // A fresh build lists slots in slot order. The list was in order
            // before the pass moved a few slots: a run-adaptive (stable)
            // sort puts it back in about one walk.
            list.sort();
            for (pos, &slot) in list.iter().enumerate() {
                fleet.slots[slot as usize].pos = pos as u32;
            }
        }
        dirty.slots.clear();
        dirty.buckets.clear();
        fleet.dirty = Some(dirty);
        // Shares a pass opened or charged are recounted from running work.
        if self.shares_dirty || !fleet.shared.is_empty() {
            self.rebuild_shared();
        }
    }

    /// The shared-GPU list as [`Fleet::build`] makes it: ids in the order
    /// running shares (by key) first name their GPUs.
    fn rebuild_shared(&mut self) {
        self.shares_dirty = false;
        let fleet = &mut self.fleet;
        for class in &mut fleet.classes {
            class.shared.clear();
        }
        fleet.shared.clear();
        let mut index: HashMap<(u32, u32), u32> = HashMap::new();
        for key in self.share_jobs.keys() {
            let Some(job) = self.jobs.get(key) else {
                continue;
            };
            for &(slot, pos, milli, memory) in &job.shares {
                let id = *index.entry((slot, pos)).or_insert_with(|| {
                    let class = fleet.slots[slot as usize].class as usize;
                    fleet.shared.push(crate::units::SharedGpu {
                        slot,
                        pos,
                        free_milli: crate::domain::GpuUnit::WHOLE_MILLI,
                        free_memory: fleet.models[fleet.classes[class].model as usize].memory_bytes,
                    });
                    (fleet.shared.len() - 1) as u32
                });
                let gpu = &mut fleet.shared[id as usize];
                gpu.free_milli = gpu.free_milli.saturating_sub(milli);
                gpu.free_memory = gpu.free_memory.saturating_sub(memory);
            }
        }
        // As `units::index_units`: a shared GPU that also runs exclusive
        // work or is unhealthy takes no more.
        for id in 0..fleet.shared.len() {
            let (slot, bit) = (fleet.shared[id].slot as usize, 1u32 << fleet.shared[id].pos);
            let exclusive = fleet.running_by_slot[slot]
                .iter()
                .map(|&r| &fleet.running[r as usize])
                .filter(|run| !run.fractional)
                .fold(0u32, |m, run| m | run.mask);
            let s = &fleet.slots[slot];
            if exclusive & bit != 0 || s.healthy & bit == 0 {
                fleet.shared[id].free_milli = 0;
                fleet.shared[id].free_memory = 0;
            }
            if s.schedulable {
                let class = s.class as usize;
                fleet.classes[class].shared.push(id as u32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::{LiveFleet, LiveRun};
    use crate::config::{SchedulerConfig, TenantState};
    use crate::domain::{GpuUnit, JobInput, Outcome, Policy};
    use crate::fleet::{Fleet, GpuInput, NodeInput, RunningInput};
    use crate::pass::schedule;

    /// Everything a pass can read, with running work by job id rather than
    /// by allocation id (those differ by construction; no decision reads
    /// them, only each slot's list order, compared here).
    fn canonical(f: &Fleet) -> String {
        let mut running: Vec<Vec<String>> = f
            .running_by_slot
            .iter()
            .map(|runs| {
                let v: Vec<String> = runs
                    .iter()
                    .map(|&r| {
                        let run = &f.running[r as usize];
                        format!(
                            "{} {} {} {:?} {} {} {} {}",
                            f.running_jobs[run.job as usize],
                            run.mask,
                            run.fractional,
                            run.share,
                            run.end,
                            run.priority,
                            run.preemptible,
                            run.evicting
                        )
                    })
                    .collect();
                v
            })
            .collect();
        running.push(vec![format!("{}", f.running.len())]);
        format!(
            "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
            f.slots, f.classes, f.classes_by_price, f.shared, f.mig_units, running, f.node_ids
        )
    }

    fn nodes(shapes: &[(u8, u8, bool, u8)]) -> Vec<NodeInput> {
        let models = [("A100", 80u64 << 30), ("T4", 16 << 30), ("H100", 0)];
        shapes
            .iter()
            .enumerate()
            .map(|(i, &(gpus, model, schedulable, unhealthy))| {
                let (name, memory) = models[model as usize % models.len()];
                NodeInput {
                    id: format!("n{i}"),
                    provider: "p".into(),
                    region: if i % 3 == 0 { "r1" } else { "r2" }.into(),
                    price_per_gpu_hour_micro_usd: 1_000_000 + (model as u64 % 3) * 500_000,
                    schedulable,
                    gpus: (0..gpus)
                        .map(|p| GpuInput {
                            uuid: format!("n{i}/{p}"),
                            model: name.into(),
                            memory_bytes: memory,
                            healthy: p != unhealthy,
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }
            })
            .collect()
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A pass over jobs of (GPUs or share milli, is share, priority,
        /// max runtime, preemptible, tasks); what it places starts, the
        /// victims it names leave.
        Pass(Vec<(u8, bool, i8, Option<u16>, bool, u8)>, u8),
        /// The n-th running job (mod count) leaves.
        Depart(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (
                prop::collection::vec(
                    (
                        1u8..9,
                        any::<bool>(),
                        -1i8..2,
                        prop::option::of(1u16..200),
                        any::<bool>(),
                        1u8..3
                    ),
                    1..6
                ),
                0u8..4
            )
                .prop_map(|(jobs, p)| Op::Pass(jobs, p)),
            any::<u16>().prop_map(Op::Depart),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// After any sequence of passes (their placements started) and
        /// departures, the live fleet a pass gets equals a fresh build of
        /// the same nodes and running work.
        #[test]
        fn live_fleet_equals_a_fresh_build(
            shapes in prop::collection::vec((1u8..9, 0u8..3, prop::bool::weighted(0.9), 0u8..12), 1..7),
            ops in prop::collection::vec(op(), 1..40),
        ) {
            let nodes = nodes(&shapes);
            let mut live = LiveFleet::new(&nodes).expect("no MIG");
            let mut running: BTreeMap<u64, Vec<RunningInput>> = BTreeMap::new();
            let mut next_key = 0u64;
            let mut now = 1_000u64;
            for op in ops {
                now += 7;
                match op {
                    Op::Depart(n) => {
                        if !running.is_empty() {
                            let key = *running.keys().nth(n as usize % running.len()).expect("in range");
                            running.remove(&key);
                            live.depart(key);
                        }
                    }
                    Op::Pass(jobs, policy) => {
                        let jobs: Vec<JobInput> = jobs
                            .iter()
                            .enumerate()
                            .map(|(i, &(size, share, priority, runtime, preemptible, tasks))| JobInput {
                                id: format!("j{}", next_key + i as u64),
                                tenant: format!("t{}", i % 2),
                                priority: i32::from(priority),
                                preemptible,
                                submitted_at: now * 1000 + i as u64,
                                tasks: u32::from(tasks),
                                gpus_per_task: if share { 1 } else { u32::from(size) },
                                unit: if share {
                                    GpuUnit::Share { milli: u32::from(size) * 110, memory_bytes: 0 }
                                } else {
                                    GpuUnit::Whole
                                },
                                max_runtime_secs: runtime.map(u64::from),
                                ..Default::default()
                            })
                            .collect();
                        let config = SchedulerConfig {
                            default_policy: [Policy::Cost, Policy::Pack, Policy::Spread, Policy::FirstFit]
                                [policy as usize % 4],
                            ..Default::default()
                        };
                        let result = schedule(live.pass_fleet(), &jobs, &config, &TenantState::default(), now);
                        let mut victims: Vec<String> = Vec::new();
                        for (job, outcome) in jobs.iter().zip(&result.outcomes) {
                            let key = next_key;
                            next_key += 1;
                            let tasks = match outcome {
                                Outcome::Placed(tasks) => tasks,
                                Outcome::Preempting { victims: v } => {
                                    victims.extend(v.iter().cloned());
                                    continue;
                                }
                                Outcome::Pending(_) => continue,
                            };
                            let end = job.max_runtime_secs.map(|r| now + r);
                            let runs: Vec<LiveRun> = tasks.iter().map(|task| LiveRun {
                                job_id: job.id.clone(),
                                priority: job.priority,
                                node_id: task.node_id.clone(),
                                gpu_uuids: task.gpu_uuids.clone(),
                                share_milli: task.share_milli,
                                memory_bytes: 0,
                                expected_end: end,
                                preemptible: job.preemptible,
                            }).collect();
                            live.start_tasks(key, &runs);
                            running.insert(key, runs.iter().map(|run| RunningInput {
                                job_id: run.job_id.clone(),
                                priority: run.priority,
                                preemptible: run.preemptible,
                                node_id: run.node_id.clone(),
                                gpu_uuids: run.gpu_uuids.clone(),
                                share_milli: run.share_milli,
                                expected_end: end,
                                ..Default::default()
                            }).collect());
                        }
                        // Victims are stopped, every task of them.
                        let keys: Vec<u64> = running
                            .iter()
                            .filter(|(_, tasks)| tasks.iter().any(|t| victims.contains(&t.job_id)))
                            .map(|(k, _)| *k)
                            .collect();
                        for key in keys {
                            running.remove(&key);
                            live.depart(key);
                        }
                    }
                }
                let inputs: Vec<RunningInput> = running.values().flatten().cloned().collect();
                let fresh = Fleet::build(&nodes, &inputs);
                prop_assert_eq!(canonical(live.pass_fleet()), canonical(&fresh));
                // The kept fleet decides as the fresh one, reservations
                // included (its earliest-fit tables carried from earlier
                // passes): a queue too large to fit, heads of every width.
                let probe: Vec<JobInput> = (1..=8u32)
                    .rev()
                    .map(|width| JobInput {
                        id: format!("probe{width}"),
                        tenant: "probe".into(),
                        priority: 100 + width as i32,
                        tasks: 1 + width % 2,
                        gpus_per_task: width,
                        max_runtime_secs: Some(u64::from(width) * 50),
                        ..Default::default()
                    })
                    .collect();
                let (mut kept, mut built) = (live.pass_fleet().clone(), fresh.clone());
                let config = SchedulerConfig::default();
                let a = schedule(&mut kept, &probe, &config, &TenantState::default(), now);
                let b = schedule(&mut built, &probe, &config, &TenantState::default(), now);
                prop_assert_eq!(a.outcomes, b.outcomes);
                let held = |f: &Fleet| f.slots.iter().map(|s| s.reserved_until).collect::<Vec<_>>();
                prop_assert_eq!(held(&kept), held(&built));
            }
        }
    }
}
