//! The fleet as the scheduler indexes it.
//!
//! Nodes are grouped into equivalence classes (provider, region, model,
//! price, spot, runtime, network block); each class keeps its schedulable nodes in buckets by free
//! GPU count, so one placement touches classes and buckets, not every node.
//! A node with GPUs of several models is split into one slot per model
//! (disjoint GPU sets), which keeps every slot homogeneous.
//!
//! Fractions of GPUs sit beside that index without slowing it: a GPU that
//! hosts shares leaves its slot's free GPUs (whole-GPU work never lands
//! beside shares) and is listed with its remaining share and memory in
//! its class's `shared`; a MIG-enabled GPU is never a whole GPU at all, and
//! its instances are listed in its class's `mig` (see `units.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use crate::domain::Generation;

/// GPUs per slot are tracked in a `u32` mask.
pub const MAX_GPUS_PER_SLOT: usize = 32;
/// Sentinel for "no known end".
pub const NEVER: u64 = u64::MAX;

/// A node as the controller describes it to the scheduler.
#[derive(Debug, Clone, Default)]
pub struct NodeInput {
    pub id: String,
    pub provider: String,
    pub region: String,
    pub price_per_gpu_hour_micro_usd: u64,
    pub spot: bool,
    /// Measured interruptions per node-hour × 1000 of spot capacity like
    /// this node's (provider, region, generation); 0 when unknown.
    pub interruption_milli_per_hour: u32,
    /// Ready and not cordoned or draining.
    pub schedulable: bool,
    /// In index order.
    pub gpus: Vec<GpuInput>,
    /// Sets of GPU positions that are all NVLink-connected; empty: no
    /// links (a multi-GPU NVLink request does not fit here).
    pub nvlink_groups: Vec<Vec<u32>>,
    /// Runs container images (its agent advertises the `oci` runtime).
    pub oci: bool,
    /// The network block the node sits in (the value of the controller's
    /// topology label, e.g. `topology.block`); empty: not known. A gang
    /// prefers nodes of one block.
    pub block: String,
}

#[derive(Debug, Clone, Default)]
pub struct GpuInput {
    pub uuid: String,
    pub model: String,
    pub generation: Generation,
    pub memory_bytes: u64,
    pub compute_capability: (u32, u32),
    pub healthy: bool,
    /// MIG mode is on: the GPU is schedulable only through its instances.
    pub mig_enabled: bool,
    /// Its MIG instances (ignored unless `mig_enabled`).
    pub mig_instances: Vec<MigInput>,
}

/// One MIG instance of a GPU: a schedulable unit of its own.
#[derive(Debug, Clone, Default)]
pub struct MigInput {
    /// `MIG-…`: what running allocations name it by.
    pub uuid: String,
    /// `1g.10gb`, `3g.40gb`, …
    pub profile: String,
    pub memory_bytes: u64,
    /// Its share of the GPU's SMs, thousandths.
    pub sm_share_milli: u32,
}

/// A GPU model as the fleet tells models apart: name, generation, memory,
/// compute capability.
type ModelKey<'a> = (&'a str, Generation, u64, (u32, u32));

/// What makes nodes one equivalence class: (provider, region, model,
/// price, spot, oci, network block).
type ClassKey = (u16, u16, u16, u64, bool, bool, u16);

/// Work already holding GPUs.
#[derive(Debug, Clone, Default)]
pub struct RunningInput {
    pub job_id: String,
    pub tenant: String,
    pub priority: i32,
    pub preemptible: bool,
    pub node_id: String,
    /// GPUs of `node_id` it holds (a MIG instance's uuid for MIG work); a
    /// uuid that node does not have is ignored.
    pub gpu_uuids: Vec<String>,
    /// 0: whole, exclusive GPUs (or a MIG instance). Else the share it holds
    /// of its one GPU, thousandths.
    pub share_milli: u32,
    /// A share's GPU memory, bytes (0 = the same share of the GPU's memory).
    pub memory_bytes: u64,
    /// Unix seconds by which it will have ended (start + max runtime).
    pub expected_end: Option<u64>,
    /// Already being stopped (preempted, cancelled, drained).
    pub evicting: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct ModelInfo {
    pub(crate) name: String,
    pub(crate) generation: Generation,
    pub(crate) memory_bytes: u64,
    pub(crate) compute_capability: (u32, u32),
}

#[derive(Debug, Clone)]
pub(crate) struct Class {
    pub(crate) provider: u16,
    pub(crate) region: u16,
    pub(crate) model: u16,
    pub(crate) price: u64,
    pub(crate) spot: bool,
    /// See [`NodeInput::interruption_milli_per_hour`] (the highest of the
    /// class's nodes; they share provider, region and generation).
    pub(crate) interruption_milli: u32,
    /// Its nodes run container images.
    pub(crate) oci: bool,
    /// Its nodes' network block (id into `Fleet::blocks`; the empty name:
    /// not known).
    pub(crate) block: u16,
    /// `buckets[k]`: schedulable, unreserved slots with exactly k free GPUs.
    pub(crate) buckets: Vec<Vec<u32>>,
    /// Bit k set: `buckets[k]` is not empty (placement visits only those).
    pub(crate) nonempty: u64,
    /// Schedulable slots under a reservation (checked only by jobs that can
    /// prove they end in time).
    pub(crate) reserved: Vec<u32>,
    /// Every slot of the class, schedulable or not.
    pub(crate) slots: Vec<u32>,
    /// Schedulable slots by healthy GPU count: what fits when idle.
    pub(crate) healthy_hist: Vec<u32>,
    /// Lowest priority of preemptible running work here (i32::MAX: none).
    pub(crate) min_preemptible_priority: i32,
    /// Running allocations here that are already being evicted.
    pub(crate) evicting: u32,
    /// GPUs hosting shares on schedulable slots (ids into `Fleet::shared`).
    pub(crate) shared: Vec<u32>,
    /// MIG instances on schedulable slots (ids into `Fleet::mig_units`).
    pub(crate) mig: Vec<u32>,
}

#[derive(Debug, Clone)]
pub(crate) struct Slot {
    pub(crate) node: u32,
    pub(crate) class: u32,
    /// Positions (within the node) of this slot's GPUs.
    pub(crate) gpus: u32,
    pub(crate) healthy: u32,
    /// Healthy and not allocated (MIG-enabled and shared GPUs never are).
    pub(crate) free: u32,
    /// MIG-enabled GPUs: in `gpus`, never in `healthy` or `free`.
    pub(crate) mig: u32,
    /// GPUs hosting shares: healthy, not free.
    pub(crate) shared: u32,
    pub(crate) schedulable: bool,
    /// Index within its bucket (or reserved list).
    pub(crate) pos: u32,
    /// Index within its class's `slots`.
    pub(crate) class_pos: u32,
    /// 0 = not reserved; else work placed here must end by this time.
    pub(crate) reserved_until: u64,
    pub(crate) nvlink_groups: Vec<u32>,
}

#[derive(Debug, Clone)]
pub(crate) struct Running {
    pub(crate) job: u32,
    /// Whole GPUs it holds; for a share, its GPU (which frees only when
    /// every share on it ends); 0 for a MIG instance.
    pub(crate) mask: u32,
    /// A share or a MIG instance: evicting it frees no whole GPU.
    pub(crate) fractional: bool,
    /// A share's size on its GPU, as charged: (thousandths, bytes).
    pub(crate) share: (u32, u64),
    pub(crate) end: u64,
    pub(crate) priority: i32,
    pub(crate) preemptible: bool,
    pub(crate) evicting: bool,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Interner {
    pub(crate) names: Vec<String>,
    index: HashMap<String, u16>,
}

impl Interner {
    pub(crate) fn intern(&mut self, name: &str) -> u16 {
        if let Some(&id) = self.index.get(name) {
            return id;
        }
        let id = self.names.len() as u16;
        self.names.push(name.to_string());
        self.index.insert(name.to_string(), id);
        id
    }

    pub(crate) fn get(&self, name: &str) -> Option<u16> {
        self.index.get(name).copied()
    }
}

/// What the running half of a build looks nodes and GPUs up in.
#[derive(Debug, Clone)]
pub(crate) struct NodeLookup<K> {
    pub(crate) node_index: HashMap<K, u32>,
    /// Per node, per GPU position in `NodeInput::gpus`: its slot and bit.
    pub(crate) gpu_slots: Vec<Vec<Option<(u32, u32)>>>,
    /// Per node: the range of its MIG instances in `Fleet::mig_units`.
    pub(crate) node_mig: Vec<(u32, u32)>,
}

/// The node half of a [`Fleet`], indexed once for many passes over the
/// same nodes with different running work (for a caller that rebuilds
/// the fleet every pass; the simulator keeps a [`crate::live::LiveFleet`]
/// instead). `template.build(nodes,
/// running)` equals `Fleet::build(nodes, running)` for the nodes the
/// template was made from.
#[derive(Debug, Clone)]
pub struct FleetTemplate {
    fleet: Fleet,
    lookup: NodeLookup<String>,
}

impl FleetTemplate {
    pub fn new(nodes: &[NodeInput]) -> Self {
        let (fleet, lookup) = Fleet::index_nodes(nodes, str::to_string);
        FleetTemplate { fleet, lookup }
    }

    /// `nodes` must be the ones given to [`FleetTemplate::new`].
    pub fn build(&self, nodes: &[NodeInput], running: &[RunningInput]) -> Fleet {
        let mut fleet = self.fleet.clone();
        fleet.add_running(nodes, &self.lookup, running);
        fleet
    }
}

/// The scheduler's index of the fleet for one pass.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    /// Shared, so that a [`FleetTemplate`] hands them to each pass
    /// without copying every name.
    pub(crate) node_ids: Arc<Vec<String>>,
    /// Per node: GPU UUIDs by position.
    pub(crate) node_gpus: Arc<Vec<Vec<String>>>,
    pub(crate) slots: Vec<Slot>,
    pub(crate) classes: Vec<Class>,
    /// Class ids by ascending price, then id.
    pub(crate) classes_by_price: Vec<u32>,
    pub(crate) providers: Interner,
    pub(crate) regions: Interner,
    /// Network blocks by name; `""` (unlabelled) when any node has none.
    pub(crate) blocks: Interner,
    /// Some node names a network block: gangs try one block first.
    pub(crate) has_blocks: bool,
    pub(crate) models: Vec<ModelInfo>,
    pub(crate) running: Vec<Running>,
    pub(crate) running_jobs: Vec<String>,
    /// Running allocation ids per slot.
    pub(crate) running_by_slot: Vec<Vec<u32>>,
    /// GPUs hosting shares.
    pub(crate) shared: Vec<crate::units::SharedGpu>,
    /// Every MIG instance, node by node.
    pub(crate) mig_units: Vec<crate::units::MigUnit>,
    /// Nodes whose GPUs beyond `MAX_GPUS_PER_SLOT` per model were ignored.
    pub skipped_gpus: u32,
    /// Kept only by a [`crate::live::LiveFleet`]: what a pass changed, so
    /// that the fleet can be put back in order without visiting every slot.
    pub(crate) dirty: Option<Dirty>,
    /// When each slot could first host one task, for reservations.
    pub(crate) earliest_fit: crate::reserve::EarliestFit,
}

/// Slots whose free GPUs or reservation changed, and the bucket lists
/// (class, free count; [`RESERVED_LIST`]: the class's reserved list) whose
/// order changed, since the live fleet last settled.
#[derive(Debug, Clone, Default)]
pub(crate) struct Dirty {
    pub(crate) slots: Vec<u32>,
    pub(crate) buckets: Vec<(u32, u32)>,
}

/// The bucket key [`Dirty::buckets`] gives a class's reserved list.
pub(crate) const RESERVED_LIST: u32 = MAX_GPUS_PER_SLOT as u32 + 1;

impl Fleet {
    /// Builds the index. Running allocations mark their GPUs allocated;
    /// unknown nodes or GPUs in them are ignored.
    pub fn build(nodes: &[NodeInput], running: &[RunningInput]) -> Self {
        let (mut fleet, lookup) = Fleet::index_nodes(nodes, |id| id);
        fleet.add_running(nodes, &lookup, running);
        fleet
    }

    /// The node half of [`Fleet::build`]: slots, classes and models, no
    /// running work and no buckets yet. `key` gives the node index's key
    /// for a node id (borrowed for one pass, owned for a template).
    pub(crate) fn index_nodes<'n, K>(
        nodes: &'n [NodeInput],
        key: impl Fn(&'n str) -> K,
    ) -> (Self, NodeLookup<K>)
    where
        K: std::hash::Hash + Eq,
    {
        let mut fleet = Fleet::default();
        let mut node_ids: Vec<String> = Vec::with_capacity(nodes.len());
        let mut node_gpus: Vec<Vec<String>> = Vec::with_capacity(nodes.len());
        // Keys borrow from `nodes`: a pass rebuilds the fleet, and a key
        // copied per GPU was most of the build.
        let mut model_index: HashMap<ModelKey<'_>, u16> = HashMap::new();
        let mut class_index: HashMap<ClassKey, u32> = HashMap::new();
        let mut node_index: HashMap<K, u32> = HashMap::with_capacity(nodes.len());
        // Per node, per GPU position in `NodeInput::gpus`: its slot and bit.
        let mut gpu_slots: Vec<Vec<Option<(u32, u32)>>> = Vec::with_capacity(nodes.len());

        // Per node: the range of its MIG instances in `fleet.mig_units`.
        let mut node_mig: Vec<(u32, u32)> = Vec::with_capacity(nodes.len());
        for node in nodes {
            let node_idx = node_ids.len() as u32;
            let mig_start = fleet.mig_units.len() as u32;
            node_index.entry(key(node.id.as_str())).or_insert(node_idx);
            let mut slots_of_gpus = vec![None; node.gpus.len()];
            node_ids.push(node.id.clone());
            node_gpus.push(node.gpus.iter().map(|g| g.uuid.clone()).collect());
            let provider = fleet.providers.intern(&node.provider);
            let region = fleet.regions.intern(&node.region);
            let block = fleet.blocks.intern(&node.block);
            fleet.has_blocks |= !node.block.is_empty();
            // One slot per model on this node.
            let mut slots_of_node: Vec<(u16, u32)> = Vec::new();
            let mut previous_model: Option<(ModelKey<'_>, u16)> = None;
            for (pos, gpu) in node.gpus.iter().enumerate() {
                if pos >= MAX_GPUS_PER_SLOT {
                    fleet.skipped_gpus += 1;
                    continue;
                }
                let key = (
                    gpu.model.as_str(),
                    gpu.generation,
                    gpu.memory_bytes,
                    gpu.compute_capability,
                );
                // A node's GPUs are nearly always one model: the previous
                // GPU's answer saves a hash per GPU.
                let model = match previous_model {
                    Some((previous_key, model)) if previous_key == key => model,
                    _ => *model_index.entry(key).or_insert_with(|| {
                        fleet.models.push(ModelInfo {
                            name: gpu.model.clone(),
                            generation: gpu.generation,
                            memory_bytes: gpu.memory_bytes,
                            compute_capability: gpu.compute_capability,
                        });
                        (fleet.models.len() - 1) as u16
                    }),
                };
                previous_model = Some((key, model));
                let slot_idx = match slots_of_node.iter().find(|(m, _)| *m == model) {
                    Some((_, s)) => *s,
                    None => {
                        let class_key = (
                            provider,
                            region,
                            model,
                            node.price_per_gpu_hour_micro_usd,
                            node.spot,
                            node.oci,
                            block,
                        );
                        let class = *class_index.entry(class_key).or_insert_with(|| {
                            fleet.classes.push(Class {
                                provider,
                                region,
                                model,
                                price: node.price_per_gpu_hour_micro_usd,
                                spot: node.spot,
                                interruption_milli: 0,
                                oci: node.oci,
                                block,
                                buckets: vec![Vec::new(); MAX_GPUS_PER_SLOT + 1],
                                nonempty: 0,
                                reserved: Vec::new(),
                                slots: Vec::new(),
                                healthy_hist: vec![0; MAX_GPUS_PER_SLOT + 1],
                                min_preemptible_priority: i32::MAX,
                                evicting: 0,
                                shared: Vec::new(),
                                mig: Vec::new(),
                            });
                            (fleet.classes.len() - 1) as u32
                        });
                        let rate = &mut fleet.classes[class as usize].interruption_milli;
                        *rate = (*rate).max(node.interruption_milli_per_hour);
                        let slot = fleet.slots.len() as u32;
                        let class_pos = fleet.classes[class as usize].slots.len() as u32;
                        fleet.slots.push(Slot {
                            node: node_idx,
                            class,
                            class_pos,
                            gpus: 0,
                            healthy: 0,
                            free: 0,
                            mig: 0,
                            shared: 0,
                            schedulable: node.schedulable,
                            pos: 0,
                            reserved_until: 0,
                            nvlink_groups: Vec::new(),
                        });
                        fleet.classes[class as usize].slots.push(slot);
                        slots_of_node.push((model, slot));
                        slot
                    }
                };
                let bit = 1u32 << pos;
                let slot = &mut fleet.slots[slot_idx as usize];
                slot.gpus |= bit;
                if gpu.mig_enabled {
                    slot.mig |= bit;
                    for instance in &gpu.mig_instances {
                        fleet.mig_units.push(crate::units::MigUnit {
                            slot: slot_idx,
                            uuid: instance.uuid.clone(),
                            profile: instance.profile.clone(),
                            memory_bytes: instance.memory_bytes,
                            sm_share_milli: instance.sm_share_milli,
                            healthy: gpu.healthy,
                            free: gpu.healthy,
                        });
                    }
                } else if gpu.healthy {
                    slot.healthy |= bit;
                    slot.free |= bit;
                }
                slots_of_gpus[pos] = Some((slot_idx, pos as u32));
            }
            gpu_slots.push(slots_of_gpus);
            node_mig.push((mig_start, fleet.mig_units.len() as u32));
            for (_, slot_idx) in &slots_of_node {
                let slot = &mut fleet.slots[*slot_idx as usize];
                slot.nvlink_groups = node
                    .nvlink_groups
                    .iter()
                    .map(|group| {
                        group
                            .iter()
                            .filter(|&&p| (p as usize) < MAX_GPUS_PER_SLOT)
                            .fold(0u32, |mask, &p| mask | (1 << p))
                            & slot.gpus
                    })
                    .filter(|mask| *mask != 0)
                    .collect();
            }
        }

        fleet.node_ids = Arc::new(node_ids);
        fleet.node_gpus = Arc::new(node_gpus);
        let lookup = NodeLookup {
            node_index,
            gpu_slots,
            node_mig,
        };
        (fleet, lookup)
    }

    /// The running half of [`Fleet::build`]: marks running work, then
    /// indexes units, buckets and classes by price.
    pub(crate) fn add_running<K>(
        &mut self,
        nodes: &[NodeInput],
        lookup: &NodeLookup<K>,
        running: &[RunningInput],
    ) where
        K: std::hash::Hash + Eq + std::borrow::Borrow<str>,
    {
        let fleet = self;
        let NodeLookup {
            node_index,
            gpu_slots,
            node_mig,
        } = lookup;
        fleet.running_by_slot = vec![Vec::new(); fleet.slots.len()];
        // (slot, position) → id in `fleet.shared`.
        let mut shared_index: HashMap<(u32, u32), u32> = HashMap::new();
        for alloc in running {
            let job = fleet.running_jobs.len() as u32;
            fleet.running_jobs.push(alloc.job_id.clone());
            let mut per_slot: Vec<(u32, u32)> = Vec::new();
            // A running allocation's GPUs are on its node: found there by
            // uuid among at most a node's GPUs.
            let node = node_index.get(alloc.node_id.as_str()).copied();
            // MIG work names its instance; the instance's slot is charged.
            let mut fractional = alloc.share_milli > 0;
            let mut share = (0u32, 0u64);
            for uuid in &alloc.gpu_uuids {
                let found = node.and_then(|n| {
                    let at = nodes[n as usize].gpus.iter().position(|g| g.uuid == *uuid);
                    match at {
                        Some(at) => gpu_slots[n as usize][at],
                        None => {
                            let (start, end) = node_mig[n as usize];
                            let unit = (start..end)
                                .find(|&u| fleet.mig_units[u as usize].uuid == *uuid)?;
                            let unit = &mut fleet.mig_units[unit as usize];
                            unit.free = false;
                            fractional = true;
                            Some((unit.slot, MAX_GPUS_PER_SLOT as u32))
                        }
                    }
                });
                if let Some((slot, pos)) = found {
                    // A MIG instance holds no whole GPU: an empty mask.
                    let bit = if pos as usize >= MAX_GPUS_PER_SLOT {
                        0
                    } else {
                        1 << pos
                    };
                    if bit != 0 && alloc.share_milli > 0 {
                        share = crate::units::charge_share(
                            fleet,
                            &mut shared_index,
                            slot,
                            pos,
                            alloc.share_milli,
                            alloc.memory_bytes,
                        );
                    }
                    match per_slot.iter_mut().find(|(s, _)| *s == slot) {
                        Some((_, mask)) => *mask |= bit,
                        None => per_slot.push((slot, bit)),
                    }
                }
            }
            for (slot, mask) in per_slot {
                fleet.slots[slot as usize].free &= !mask;
                let class = &mut fleet.classes[fleet.slots[slot as usize].class as usize];
                if alloc.evicting {
                    class.evicting += 1;
                } else if alloc.preemptible {
                    class.min_preemptible_priority =
                        class.min_preemptible_priority.min(alloc.priority);
                }
                let id = fleet.running.len() as u32;
                fleet.running.push(Running {
                    job,
                    mask,
                    fractional,
                    share,
                    end: alloc.expected_end.unwrap_or(NEVER),
                    priority: alloc.priority,
                    preemptible: alloc.preemptible,
                    evicting: alloc.evicting,
                });
                fleet.running_by_slot[slot as usize].push(id);
            }
        }

        crate::units::index_units(fleet);
        for slot_idx in 0..fleet.slots.len() {
            if fleet.slots[slot_idx].schedulable {
                fleet.bucket_insert(slot_idx as u32);
                let slot = &fleet.slots[slot_idx];
                fleet.classes[slot.class as usize].healthy_hist
                    [slot.healthy.count_ones() as usize] += 1;
            }
        }
        let mut order: Vec<u32> = (0..fleet.classes.len() as u32).collect();
        order.sort_by_key(|&c| (fleet.classes[c as usize].price, c));
        fleet.classes_by_price = order;
    }

    pub fn node_count(&self) -> usize {
        self.node_ids.len()
    }

    pub fn gpu_count(&self) -> usize {
        self.slots
            .iter()
            .map(|s| s.gpus.count_ones() as usize)
            .sum()
    }

    pub fn free_gpu_count(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.schedulable)
            .map(|s| s.free.count_ones() as usize)
            .sum()
    }

    pub(crate) fn bucket_insert(&mut self, slot_idx: u32) {
        self.mark_dirty(slot_idx);
        let slot = &self.slots[slot_idx as usize];
        let class = &mut self.classes[slot.class as usize];
        let list = if slot.reserved_until != 0 {
            &mut class.reserved
        } else {
            let k = slot.free.count_ones() as usize;
            class.nonempty |= 1 << k;
            &mut class.buckets[k]
        };
        let pos = list.len() as u32;
        list.push(slot_idx);
        self.slots[slot_idx as usize].pos = pos;
    }

    pub(crate) fn bucket_remove(&mut self, slot_idx: u32) {
        self.mark_dirty(slot_idx);
        let slot = &self.slots[slot_idx as usize];
        let pos = slot.pos as usize;
        let class = &mut self.classes[slot.class as usize];
        let list = if slot.reserved_until != 0 {
            &mut class.reserved
        } else {
            let k = slot.free.count_ones() as usize;
            if class.buckets[k].len() == 1 {
                class.nonempty &= !(1 << k);
            }
            &mut class.buckets[k]
        };
        list.swap_remove(pos);
        if let Some(&moved) = list.get(pos) {
            self.slots[moved as usize].pos = pos as u32;
        }
    }

    /// Marks `mask` allocated on a slot, keeping the buckets right.
    /// Notes a slot and the bucket list it sits in as changed (live
    /// fleets only).
    fn mark_dirty(&mut self, slot_idx: u32) {
        if let Some(dirty) = &mut self.dirty {
            let slot = &self.slots[slot_idx as usize];
            let list = if slot.reserved_until != 0 {
                RESERVED_LIST
            } else {
                slot.free.count_ones()
            };
            dirty.slots.push(slot_idx);
            if slot.schedulable {
                dirty.buckets.push((slot.class, list));
            }
        }
    }

    pub(crate) fn take(&mut self, slot_idx: u32, mask: u32) {
        self.mark_dirty(slot_idx);
        self.earliest_fit.touch(slot_idx, self.slots.len());
        let schedulable = self.slots[slot_idx as usize].schedulable;
        if schedulable {
            self.bucket_remove(slot_idx);
        }
        self.slots[slot_idx as usize].free &= !mask;
        if schedulable {
            self.bucket_insert(slot_idx);
        }
    }

    /// Returns `mask` to a slot's free GPUs.
    pub(crate) fn give_back(&mut self, slot_idx: u32, mask: u32) {
        self.mark_dirty(slot_idx);
        self.earliest_fit.touch(slot_idx, self.slots.len());
        let schedulable = self.slots[slot_idx as usize].schedulable;
        if schedulable {
            self.bucket_remove(slot_idx);
        }
        let slot = &mut self.slots[slot_idx as usize];
        slot.free |= mask & slot.healthy;
        if schedulable {
            self.bucket_insert(slot_idx);
        }
    }

    /// Puts a slot under a reservation ending at `until` (keeps the earliest).
    pub(crate) fn reserve(&mut self, slot_idx: u32, until: u64) {
        let slot = &self.slots[slot_idx as usize];
        if !slot.schedulable {
            return;
        }
        let current = slot.reserved_until;
        let until = until.max(1);
        if current != 0 && current <= until {
            return;
        }
        self.bucket_remove(slot_idx);
        self.slots[slot_idx as usize].reserved_until = until;
        self.bucket_insert(slot_idx);
    }

    /// GPU UUIDs of a mask on a slot, in position order.
    pub(crate) fn uuids(&self, slot_idx: u32, mask: u32) -> Vec<String> {
        let slot = &self.slots[slot_idx as usize];
        let gpus = &self.node_gpus[slot.node as usize];
        let mut uuids = Vec::with_capacity(mask.count_ones() as usize);
        let mut rest = mask;
        while rest != 0 {
            let p = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            uuids.extend(gpus.get(p).cloned());
        }
        uuids
    }

    /// Picks `count` GPUs from `free`: inside one NVLink group when asked
    /// (a slot that reports no links has none: it cannot serve such a
    /// request), else the lowest positions.
    pub(crate) fn pick_gpus(&self, slot_idx: u32, count: u32, nvlink: bool) -> Option<u32> {
        let slot = &self.slots[slot_idx as usize];
        let free = slot.free;
        if free.count_ones() < count {
            return None;
        }
        if nvlink && count > 1 {
            return slot
                .nvlink_groups
                .iter()
                .map(|group| group & free)
                .filter(|avail| avail.count_ones() >= count)
                .min_by_key(|avail| avail.count_ones())
                .map(|avail| lowest_bits(avail, count));
        }
        Some(lowest_bits(free, count))
    }
}

/// The `count` lowest set bits of `mask`.
pub(crate) fn lowest_bits(mut mask: u32, count: u32) -> u32 {
    let mut out = 0;
    for _ in 0..count {
        let bit = mask & mask.wrapping_neg();
        out |= bit;
        mask &= !bit;
    }
    out
}

/// The non-empty buckets of a class with at least `per_task` free GPUs,
/// as a bit set.
pub(crate) fn buckets_from(class: &Class, per_task: u32) -> u64 {
    // Lists must change through `bucket_insert` and `bucket_remove` only.
    debug_assert!(
        class
            .buckets
            .iter()
            .enumerate()
            .all(|(k, list)| list.is_empty() == (class.nonempty & (1 << k) == 0)),
        "a bucket list changed without its bit"
    );
    class.nonempty & (u64::MAX << per_task.min(63))
}
