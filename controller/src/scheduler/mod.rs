//! The scheduler: a pure, synchronous library. `(fleet, queue, config, now)
//! → decisions`: no I/O, no async, no locks, no clock of its own. The
//! controller, the benchmarks and the property tests share it.
//!
//! # One pass
//! 1. Jobs are ordered by priority (higher first); within a priority, the
//!    tenant with the lowest fair share goes next (see [`queue`]); within a
//!    tenant, the oldest job.
//! 2. Each job is matched against equivalence classes of nodes (provider,
//!    region, model, price, spot) — never against every node — and placed by
//!    its policy (below). A gang (several tasks) is placed whole or not at all,
//!    by default inside one region.
//! 3. The first job of each priority level that does not fit gets a
//!    *reservation*: the nodes where it will fit earliest (from the expected
//!    ends of running work, i.e. start + max runtime). Later jobs may use free
//!    GPUs on reserved nodes only if their own max runtime ends before the
//!    reservation's start — so they cannot delay it. Jobs without a max runtime
//!    never backfill into a reservation.
//! 4. A job that does not fit, is not preemptible, and outranks preemptible
//!    running work may evict the smallest set of such work that makes room.
//!    The victims are stopped with their grace period and queued again; the
//!    job is placed in a later pass, when their GPUs are free.
//!
//! # Placement policies and scoring
//! Among slots (a node's GPUs of one model) in eligible classes with at least
//! the task's GPUs free:
//! * `cost`: lowest effective price per GPU-hour; then the fewest free GPUs
//!   (pack); then class and slot order.
//! * `pack`: fewest free GPUs (best fit: partly used nodes fill first and
//!   whole nodes stay whole for 8-GPU tasks); then effective price.
//! * `spread`: most free GPUs; then effective price.
//!
//! The *effective price* is the node's price, discounted by
//! [`SchedulerConfig::preferred_region_discount`] (default 10 %) in a
//! preferred region: a soft preference that changes the order among GPUs
//! that satisfy every constraint and never admits one that does not. Ties
//! break by class id (first seen), then slot order, so a pass is
//! deterministic for a given input.

pub mod explain;
pub mod fleet;
pub mod market;
pub mod queue;

use std::collections::HashMap;

use gpufleet_proto::v1::{GpuGeneration, JobConstraints, Locality};

pub use fleet::{Fleet, GpuInput, NEVER, NodeInput, RunningInput};
pub use queue::FairShare;

/// `3930000` → `$3.93`.
pub fn format_usd(micro_usd: u64) -> String {
    let cents = (micro_usd + 5_000) / 10_000;
    format!("${}.{:02}", cents / 100, cents % 100)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    #[default]
    Cost,
    Pack,
    Spread,
    /// The naive baseline for benchmarks: first slot in node order that fits.
    FirstFit,
}

/// Machine-readable reasons a job is still pending.
pub mod reason {
    pub const NO_NODES: &str = "NO_NODES";
    pub const NO_FEASIBLE_NODES: &str = "NO_FEASIBLE_NODES";
    pub const INSUFFICIENT_FREE_GPUS: &str = "INSUFFICIENT_FREE_GPUS";
    pub const QUOTA_EXCEEDED: &str = "QUOTA_EXCEEDED";
    pub const BACKOFF: &str = "BACKOFF";
    pub const RESERVED_FOR_HIGHER_PRIORITY: &str = "RESERVED_FOR_HIGHER_PRIORITY";
    pub const PREEMPTING: &str = "PREEMPTING";
    pub const WAITING_FOR_SCHEDULER: &str = "WAITING_FOR_SCHEDULER";
}

#[derive(Debug, Clone, Default)]
pub struct TenantPolicy {
    /// Relative share; default 1.
    pub weight: f64,
    /// Most GPUs the tenant may hold at once.
    pub max_gpus: Option<u32>,
    /// Most GPUs of one generation (wire value) at once.
    pub max_gpus_per_generation: HashMap<i32, u32>,
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub default_policy: Policy,
    /// Unknown tenants get weight 1 and no quota.
    pub tenants: HashMap<String, TenantPolicy>,
    /// Normalisation of GPU-hours by generation (wire value); default 1.
    pub generation_factors: HashMap<i32, f64>,
    /// Reservations per pass (one per priority level at most).
    pub max_reservations: usize,
    /// Preemption attempts per pass.
    pub max_preemptions: usize,
    pub preferred_region_discount: f64,
    /// Record the time of every decision in [`PassResult::decision_nanos`].
    pub measure_decisions: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            default_policy: Policy::Cost,
            tenants: HashMap::new(),
            generation_factors: HashMap::new(),
            max_reservations: 8,
            max_preemptions: 16,
            preferred_region_discount: 0.10,
            measure_decisions: false,
        }
    }
}

impl SchedulerConfig {
    pub fn weight(&self, tenant: &str) -> f64 {
        self.tenants
            .get(tenant)
            .map_or(1.0, |t| if t.weight > 0.0 { t.weight } else { 1.0 })
    }

    pub fn factor(&self, generation: i32) -> f64 {
        self.generation_factors
            .get(&generation)
            .copied()
            .unwrap_or(1.0)
    }
}

/// One pending job as the scheduler sees it.
#[derive(Debug, Clone, Default)]
pub struct JobInput {
    pub id: String,
    pub tenant: String,
    pub priority: i32,
    pub preemptible: bool,
    /// Orders jobs of one tenant (e.g. submit time in nanoseconds).
    pub submitted_at: u64,
    pub tasks: u32,
    pub gpus_per_task: u32,
    pub constraints: JobConstraints,
    pub policy: Option<Policy>,
    pub max_runtime_secs: Option<u64>,
    /// Unix seconds before which the job is not placed (retry backoff).
    pub not_before: Option<u64>,
}

/// What tenants hold now and have used, for fair share and quotas.
#[derive(Debug, Clone, Default)]
pub struct TenantState {
    /// Decayed normalised GPU-hours ([`FairShare::usage`]).
    pub usage: HashMap<String, f64>,
    /// GPUs held now per tenant, per generation.
    pub allocated: HashMap<String, HashMap<i32, u32>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPlacement {
    pub node_id: String,
    pub provider: String,
    pub region: String,
    pub price_per_gpu_hour_micro_usd: u64,
    pub gpu_uuids: Vec<String>,
    /// `GpuGeneration` wire value of the GPUs.
    pub generation: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Placed(Vec<TaskPlacement>),
    /// Victims (job ids) must be stopped and queued again; the job waits.
    Preempting {
        victims: Vec<String>,
    },
    Pending {
        code: &'static str,
    },
}

#[derive(Debug, Default)]
pub struct PassResult {
    /// One entry per input job, in input order.
    pub outcomes: Vec<Outcome>,
    pub placed: usize,
    pub reservations: usize,
    /// (job index, nanoseconds) per decision, in queue order, when
    /// [`SchedulerConfig::measure_decisions`] is set (benchmarks).
    pub decision_nanos: Vec<(usize, u64)>,
}

/// A job's constraints resolved against one fleet's interned names.
pub(crate) struct Compiled {
    models: Vec<bool>,
    providers_allow: Option<Vec<u16>>,
    providers_deny: Vec<u16>,
    regions_allow: Option<Vec<u16>>,
    regions_deny: Vec<u16>,
    preferred: Vec<u16>,
    max_price: u64,
    allow_spot: bool,
    pub(crate) locality: Locality,
    pub(crate) nvlink: bool,
}

pub(crate) fn model_matches(constraints: &JobConstraints, model: &fleet::ModelInfo) -> bool {
    (constraints.generations.is_empty() || constraints.generations.contains(&model.generation))
        && (constraints.min_generation == GpuGeneration::Unspecified as i32
            || model.generation >= constraints.min_generation)
        && (constraints.models.is_empty()
            || constraints
                .models
                .iter()
                .any(|m| m.eq_ignore_ascii_case(&model.name)))
        && model.memory_bytes >= constraints.min_gpu_memory_bytes
        && model.compute_capability
            >= (
                constraints.min_compute_capability_major,
                constraints.min_compute_capability_minor,
            )
}

impl Compiled {
    pub(crate) fn new(fleet: &Fleet, job: &JobInput) -> Self {
        let c = &job.constraints;
        let names = |list: &[String], interner: &fleet::Interner| -> Vec<u16> {
            list.iter().filter_map(|n| interner.get(n)).collect()
        };
        let locality = match Locality::try_from(c.locality).unwrap_or(Locality::Unspecified) {
            Locality::Unspecified if job.tasks > 1 => Locality::Region,
            Locality::Unspecified => Locality::Any,
            other => other,
        };
        Self {
            models: fleet.models.iter().map(|m| model_matches(c, m)).collect(),
            providers_allow: (!c.providers.is_empty())
                .then(|| names(&c.providers, &fleet.providers)),
            providers_deny: names(&c.exclude_providers, &fleet.providers),
            regions_allow: (!c.regions.is_empty()).then(|| names(&c.regions, &fleet.regions)),
            regions_deny: names(&c.exclude_regions, &fleet.regions),
            preferred: names(&c.preferred_regions, &fleet.regions),
            max_price: c.max_price_per_gpu_hour_micro_usd.unwrap_or(u64::MAX),
            allow_spot: c.allow_spot,
            locality,
            nvlink: c.require_nvlink,
        }
    }

    pub(crate) fn class_ok(&self, class: &fleet::Class) -> bool {
        self.models[class.model as usize]
            && class.price <= self.max_price
            && (self.allow_spot || !class.spot)
            && self
                .providers_allow
                .as_ref()
                .is_none_or(|a| a.contains(&class.provider))
            && !self.providers_deny.contains(&class.provider)
            && self
                .regions_allow
                .as_ref()
                .is_none_or(|a| a.contains(&class.region))
            && !self.regions_deny.contains(&class.region)
    }

    fn effective_price(&self, class: &fleet::Class, discount: f64) -> u64 {
        if self.preferred.contains(&class.region) {
            (class.price as f64 * (1.0 - discount)) as u64
        } else {
            class.price
        }
    }

    fn group_of(&self, class: &fleet::Class) -> u16 {
        match self.locality {
            Locality::Region => class.region,
            Locality::Provider => class.provider,
            _ => 0,
        }
    }
}

/// Runs one scheduling pass. `fleet` is updated with every placement, so the
/// caller may inspect it afterwards (e.g. to explain pending jobs).
pub fn schedule(
    fleet: &mut Fleet,
    jobs: &[JobInput],
    config: &SchedulerConfig,
    tenants: &TenantState,
    now: u64,
) -> PassResult {
    let mut ctx = PassCtx {
        config,
        now,
        result: PassResult {
            outcomes: vec![
                Outcome::Pending {
                    code: reason::WAITING_FOR_SCHEDULER
                };
                jobs.len()
            ],
            ..Default::default()
        },
        allocated: tenants
            .allocated
            .iter()
            .map(|(t, per_gen)| (t.as_str(), per_gen.clone()))
            .collect(),
        reservations: 0,
        preemptions: 0,
        level_reserved: false,
        failed: HashMap::new(),
    };
    if fleet.slots.is_empty() {
        for outcome in &mut ctx.result.outcomes {
            *outcome = Outcome::Pending {
                code: reason::NO_NODES,
            };
        }
        return ctx.result;
    }
    let share_now = |tenant: &str| -> f64 {
        let usage = tenants.usage.get(tenant).copied().unwrap_or(0.0);
        let running: f64 = tenants
            .allocated
            .get(tenant)
            .map(|per_gen| {
                per_gen
                    .iter()
                    .map(|(g, n)| *n as f64 * config.factor(*g))
                    .sum()
            })
            .unwrap_or(0.0);
        usage + running
    };

    let mut levels: Vec<i32> = jobs.iter().map(|j| j.priority).collect();
    levels.sort_unstable_by(|a, b| b.cmp(a));
    levels.dedup();
    for level in levels {
        let members: Vec<(usize, &str, u64)> = jobs
            .iter()
            .enumerate()
            .filter(|(_, j)| j.priority == level)
            .map(|(i, j)| (i, j.tenant.as_str(), j.submitted_at))
            .collect();
        let mut queue = queue::LevelQueue::new(members, share_now, |t| config.weight(t));
        ctx.level_reserved = false;
        while let Some((index, tenant_slot)) = queue.pop() {
            let started = config.measure_decisions.then(std::time::Instant::now);
            let (outcome, granted) = decide(fleet, &jobs[index], &mut ctx);
            if matches!(outcome, Outcome::Placed(_)) {
                ctx.result.placed += 1;
            }
            ctx.result.outcomes[index] = outcome;
            queue.done(tenant_slot, granted);
            if let Some(started) = started {
                ctx.result
                    .decision_nanos
                    .push((index, started.elapsed().as_nanos() as u64));
            }
        }
    }
    ctx.result.reservations = ctx.reservations;
    ctx.result
}

/// Mutable state of one pass.
struct PassCtx<'a> {
    config: &'a SchedulerConfig,
    now: u64,
    result: PassResult,
    /// GPUs held per tenant and generation, including this pass's placements.
    allocated: HashMap<&'a str, HashMap<i32, u32>>,
    reservations: usize,
    preemptions: usize,
    /// The current priority level already had its reservation attempt.
    level_reserved: bool,
    /// Request shape → (earliest end that failed, reason).
    failed: HashMap<Vec<u8>, (u64, &'static str)>,
}

/// Everything that decides whether a request fits, as bytes.
fn request_shape(job: &JobInput, policy: Policy) -> Vec<u8> {
    use prost::Message;
    let mut key = job.constraints.encode_to_vec();
    key.extend_from_slice(&job.tasks.max(1).to_le_bytes());
    key.extend_from_slice(&job.gpus_per_task.to_le_bytes());
    key.extend_from_slice(&job.priority.to_le_bytes());
    key.push(job.preemptible as u8);
    key.push(policy as u8);
    key
}

/// One decision: place, preempt for, or explain one job. Returns the outcome
/// and the normalised GPUs granted (for fair share).
fn decide<'a>(fleet: &mut Fleet, job: &'a JobInput, ctx: &mut PassCtx<'a>) -> (Outcome, f64) {
    let config = ctx.config;
    let now = ctx.now;
    if job.not_before.is_some_and(|t| t > now) {
        return (
            Outcome::Pending {
                code: reason::BACKOFF,
            },
            0.0,
        );
    }
    let quota = config.tenants.get(&job.tenant);
    let policy = job.policy.unwrap_or(config.default_policy);
    let end = job
        .max_runtime_secs
        .map_or(NEVER, |r| now.saturating_add(r));
    // Requests of the same shape that already failed this pass fail again
    // (capacity only shrinks within a pass). The head of a level is always
    // evaluated in full so that it can get its reservation.
    // The naive baseline keeps no such memory.
    let shape = (quota.is_none() && policy != Policy::FirstFit).then(|| request_shape(job, policy));
    if ctx.level_reserved
        && let Some(key) = &shape
        && let Some((failed_end, code)) = ctx.failed.get(key)
        && end >= *failed_end
    {
        return (Outcome::Pending { code }, 0.0);
    }
    let compiled = Compiled::new(fleet, job);
    let total_gpus = job.tasks.max(1) * job.gpus_per_task;
    let held = ctx.allocated.get(job.tenant.as_str());
    if let Some(max) = quota.and_then(|q| q.max_gpus) {
        let now_held: u32 = held.map_or(0, |h| h.values().sum());
        if now_held + total_gpus > max {
            return (
                Outcome::Pending {
                    code: reason::QUOTA_EXCEEDED,
                },
                0.0,
            );
        }
    }
    // Classes the job may use, honouring per-generation quotas.
    let mut over_quota = false;
    let classes: Vec<u32> = fleet
        .classes_by_price
        .iter()
        .copied()
        .filter(|&c| {
            let class = &fleet.classes[c as usize];
            if !compiled.class_ok(class) {
                return false;
            }
            let generation = fleet.models[class.model as usize].generation;
            let within = match quota.and_then(|q| q.max_gpus_per_generation.get(&generation)) {
                Some(max) => {
                    held.and_then(|h| h.get(&generation)).copied().unwrap_or(0) + total_gpus <= *max
                }
                None => true,
            };
            over_quota |= !within;
            within
        })
        .collect();
    if classes.is_empty() && over_quota {
        return (
            Outcome::Pending {
                code: reason::QUOTA_EXCEEDED,
            },
            0.0,
        );
    }
    if let Some(placements) = place_job(
        fleet,
        job,
        &compiled,
        &classes,
        policy,
        end,
        config.preferred_region_discount,
    ) {
        let granted: f64 = placements
            .iter()
            .map(|p| p.gpu_uuids.len() as f64 * config.factor(p.generation))
            .sum();
        let per_gen = ctx.allocated.entry(job.tenant.as_str()).or_default();
        for p in &placements {
            *per_gen.entry(p.generation).or_insert(0) += p.gpu_uuids.len() as u32;
        }
        return (Outcome::Placed(placements), granted);
    }
    let ever = fits_when_idle(fleet, job, &compiled, &classes);
    let mut code = if classes.is_empty() || !ever {
        reason::NO_FEASIBLE_NODES
    } else if reserved_capacity_would_fit(fleet, job, &compiled, &classes) {
        reason::RESERVED_FOR_HIGHER_PRIORITY
    } else {
        reason::INSUFFICIENT_FREE_GPUS
    };
    if ever
        && !job.preemptible
        && ctx.preemptions < config.max_preemptions
        && preemption_possible(fleet, job, &classes)
        && let Some(victims) = preempt(fleet, job, &compiled, &classes, now)
    {
        ctx.preemptions += 1;
        return (Outcome::Preempting { victims }, 0.0);
    }
    if ever && !ctx.level_reserved && ctx.reservations < config.max_reservations {
        // One attempt per level: the head job's.
        ctx.level_reserved = true;
        if reserve(fleet, job, &compiled, &classes, now) {
            ctx.reservations += 1;
            if code == reason::RESERVED_FOR_HIGHER_PRIORITY {
                code = reason::INSUFFICIENT_FREE_GPUS;
            }
        }
    }
    if let Some(key) = shape {
        // Free capacity only shrinks within a pass: the same request with
        // the same or a later end fails again.
        let entry = ctx.failed.entry(key).or_insert((end, code));
        if end < entry.0 {
            *entry = (end, code);
        }
    }
    (Outcome::Pending { code }, 0.0)
}

/// Places every task of a job or none.
fn place_job(
    fleet: &mut Fleet,
    job: &JobInput,
    compiled: &Compiled,
    classes: &[u32],
    policy: Policy,
    end: u64,
    discount: f64,
) -> Option<Vec<TaskPlacement>> {
    if classes.is_empty()
        || job.gpus_per_task == 0
        || job.gpus_per_task as usize > fleet::MAX_GPUS_PER_SLOT
    {
        return None;
    }
    let tasks = job.tasks.max(1);
    let per_task = job.gpus_per_task;
    if policy == Policy::FirstFit {
        return first_fit(fleet, classes, tasks, per_task, end, compiled.nvlink);
    }
    // Classes by effective price, grouped by locality.
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
    if policy == Policy::Spread {
        // Emptiest group first.
        groups.sort_by_key(|(_, list)| std::cmp::Reverse(group_free(fleet, list, per_task)));
    }
    for (_, group) in &groups {
        if group_capacity(fleet, group, per_task, end) < tasks as u64 {
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
        price_per_gpu_hour_micro_usd: class.price,
        gpu_uuids: fleet.uuids(slot, mask),
        generation: fleet.models[class.model as usize].generation,
    }
}

fn group_free(fleet: &Fleet, group: &[(u64, u32)], per_task: u32) -> u64 {
    group_capacity(fleet, group, per_task, NEVER)
}

/// Tasks of `per_task` GPUs the group could take now (upper bound).
fn group_capacity(fleet: &Fleet, group: &[(u64, u32)], per_task: u32, end: u64) -> u64 {
    let mut total = 0u64;
    for &(_, c) in group {
        let class = &fleet.classes[c as usize];
        for k in per_task as usize..=fleet::MAX_GPUS_PER_SLOT {
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
        let ks: Box<dyn Iterator<Item = usize>> = if policy == Policy::Spread {
            Box::new((per_task as usize..=fleet::MAX_GPUS_PER_SLOT).rev())
        } else {
            Box::new(per_task as usize..=fleet::MAX_GPUS_PER_SLOT)
        };
        let mut found: Option<(u64, u32, u32)> = None;
        for k in ks {
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

/// Whether the job fits the eligible classes if nothing ran at all.
fn fits_when_idle(fleet: &Fleet, job: &JobInput, compiled: &Compiled, classes: &[u32]) -> bool {
    let per_task = job.gpus_per_task.max(1) as usize;
    let mut per_group: HashMap<u16, u64> = HashMap::new();
    for &c in classes {
        let class = &fleet.classes[c as usize];
        let tasks: u64 = (per_task..=fleet::MAX_GPUS_PER_SLOT)
            .map(|k| class.healthy_hist[k] as u64 * (k / per_task) as u64)
            .sum();
        *per_group.entry(compiled.group_of(class)).or_insert(0) += tasks;
    }
    per_group.values().any(|&t| t >= job.tasks.max(1) as u64)
}

/// Whether eviction could possibly help: preemptible lower-priority work,
/// or work already being evicted, runs in an eligible class.
fn preemption_possible(fleet: &Fleet, job: &JobInput, classes: &[u32]) -> bool {
    classes.iter().any(|&c| {
        let class = &fleet.classes[c as usize];
        class.min_preemptible_priority < job.priority || class.evicting > 0
    })
}

/// Whether the job would fit now if reservations were ignored.
fn reserved_capacity_would_fit(
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
        *per_group.entry(compiled.group_of(class)).or_insert(0) += tasks;
    }
    per_group.values().any(|&t| t >= job.tasks.max(1) as u64)
}

/// Reserves the slots where the job fits earliest. Returns whether it did.
fn reserve(
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
            let mut ends: Vec<(u64, u32)> = fleet.running_by_slot[slot as usize]
                .iter()
                .map(|&r| {
                    let run = &fleet.running[r as usize];
                    (run.end, (run.mask & s.healthy).count_ones())
                })
                .collect();
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
    let best = per_group
        .into_values()
        .filter(|list| list.len() >= tasks)
        .map(|mut list| {
            list.sort_unstable();
            list.truncate(tasks);
            let at = list.last().map_or(NEVER, |(t, _)| *t);
            (at, list)
        })
        .min_by_key(|(at, _)| *at);
    let Some((at, list)) = best else { return false };
    for (_, slot) in list {
        fleet.reserve(slot, at);
    }
    true
}

/// Finds the fewest lower-priority preemptible allocations whose eviction
/// makes room for the whole job; marks their slots so nothing else takes
/// the room. Returns the victim job ids, or None if eviction cannot help.
fn preempt(
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

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::GpuGeneration;

    fn node(id: &str, region: &str, price: u64, gpus: u32) -> NodeInput {
        NodeInput {
            id: id.into(),
            provider: "aws".into(),
            region: region.into(),
            price_per_gpu_hour_micro_usd: price,
            spot: false,
            schedulable: true,
            gpus: (0..gpus)
                .map(|g| GpuInput {
                    uuid: format!("GPU-{id}-{g}"),
                    model: "H100-SXM-80GB".into(),
                    generation: GpuGeneration::Hopper as i32,
                    memory_bytes: 80 << 30,
                    compute_capability: (9, 0),
                    healthy: true,
                })
                .collect(),
            nvlink_groups: Vec::new(),
        }
    }

    fn job(id: &str, gpus: u32, policy: Policy) -> JobInput {
        JobInput {
            id: id.into(),
            tenant: "t".into(),
            tasks: 1,
            gpus_per_task: gpus,
            policy: Some(policy),
            ..Default::default()
        }
    }

    fn placed_node(outcome: &Outcome) -> String {
        match outcome {
            Outcome::Placed(tasks) => tasks[0].node_id.clone(),
            other => panic!("not placed: {other:?}"),
        }
    }

    fn run(
        nodes: &[NodeInput],
        running: &[RunningInput],
        jobs: &[JobInput],
        config: &SchedulerConfig,
        tenants: &TenantState,
    ) -> PassResult {
        let mut fleet = Fleet::build(nodes, running);
        schedule(&mut fleet, jobs, config, tenants, 1000)
    }

    fn running_on(node: &str, gpus: u32, tenant: &str) -> RunningInput {
        RunningInput {
            job_id: format!("run-{node}"),
            tenant: tenant.into(),
            node_id: node.into(),
            gpu_uuids: (0..gpus).map(|g| format!("GPU-{node}-{g}")).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn policies_choose_as_documented() {
        // a: 8 GPUs, 6 busy (2 free); b: 8 free; same price.
        let nodes = [node("a", "r1", 1_000_000, 8), node("b", "r1", 1_000_000, 8)];
        let busy = [running_on("a", 6, "x")];
        let config = SchedulerConfig::default();
        let pack = run(
            &nodes,
            &busy,
            &[job("j", 1, Policy::Pack)],
            &config,
            &TenantState::default(),
        );
        assert_eq!(
            placed_node(&pack.outcomes[0]),
            "a",
            "pack fills the partly used node"
        );
        let spread = run(
            &nodes,
            &busy,
            &[job("j", 1, Policy::Spread)],
            &config,
            &TenantState::default(),
        );
        assert_eq!(
            placed_node(&spread.outcomes[0]),
            "b",
            "spread takes the emptiest"
        );
        // Cost: cheaper wins over fuller.
        let nodes = [node("a", "r1", 2_000_000, 8), node("b", "r1", 1_000_000, 8)];
        let cost = run(
            &nodes,
            &busy,
            &[job("j", 1, Policy::Cost)],
            &config,
            &TenantState::default(),
        );
        assert_eq!(placed_node(&cost.outcomes[0]), "b");
    }

    #[test]
    fn preferred_region_is_soft() {
        let nodes = [
            node("cheap", "r1", 1_000_000, 8),
            node("pref", "r2", 1_050_000, 8),
            node("dear", "r3", 2_000_000, 8),
        ];
        let mut j = job("j", 1, Policy::Cost);
        j.constraints.preferred_regions = vec!["r2".into()];
        let r = run(
            &nodes,
            &[],
            &[j.clone()],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        assert_eq!(
            placed_node(&r.outcomes[0]),
            "pref",
            "5 % dearer but preferred (10 % discount)"
        );
        j.constraints.preferred_regions = vec!["r3".into()];
        let r = run(
            &nodes,
            &[],
            &[j],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        assert_eq!(
            placed_node(&r.outcomes[0]),
            "cheap",
            "a preference never outweighs a 2x price"
        );
    }

    #[test]
    fn quotas_hold_jobs_back() {
        let nodes = [node("a", "r1", 1_000_000, 8)];
        let mut config = SchedulerConfig::default();
        config.tenants.insert(
            "t".into(),
            TenantPolicy {
                weight: 1.0,
                max_gpus: Some(4),
                max_gpus_per_generation: HashMap::from([(GpuGeneration::Hopper as i32, 3)]),
            },
        );
        let jobs = [job("a", 2, Policy::Cost), job("b", 2, Policy::Cost)];
        let r = run(&nodes, &[], &jobs, &config, &TenantState::default());
        assert!(matches!(r.outcomes[0], Outcome::Placed(_)));
        // 2 held + 2 more would exceed the Hopper quota of 3 (within the 4 total).
        assert_eq!(
            r.outcomes[1],
            Outcome::Pending {
                code: reason::QUOTA_EXCEEDED
            }
        );
        if let Some(t) = config.tenants.get_mut("t") {
            t.max_gpus_per_generation.clear();
        }
        let tenants = TenantState {
            allocated: HashMap::from([(
                "t".to_string(),
                HashMap::from([(GpuGeneration::Hopper as i32, 3)]),
            )]),
            ..Default::default()
        };
        let r = run(&nodes, &[], &[job("c", 2, Policy::Cost)], &config, &tenants);
        assert_eq!(
            r.outcomes[0],
            Outcome::Pending {
                code: reason::QUOTA_EXCEEDED
            }
        );
    }

    #[test]
    fn nvlink_tasks_stay_inside_one_group() {
        let mut n = node("a", "r1", 1, 4);
        n.nvlink_groups = vec![vec![0, 1], vec![2, 3]];
        let busy = [RunningInput {
            job_id: "busy".into(),
            node_id: "a".into(),
            gpu_uuids: vec!["GPU-a-1".into()],
            ..Default::default()
        }];
        let mut j = job("j", 2, Policy::Cost);
        j.constraints.require_nvlink = true;
        let r = run(
            &[n.clone()],
            &busy,
            &[j.clone()],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        match &r.outcomes[0] {
            Outcome::Placed(tasks) => assert_eq!(tasks[0].gpu_uuids, vec!["GPU-a-2", "GPU-a-3"]),
            other => panic!("{other:?}"),
        }
        // Without the requirement the lowest free GPUs are taken.
        j.constraints.require_nvlink = false;
        let r = run(
            &[n],
            &busy,
            &[j],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        match &r.outcomes[0] {
            Outcome::Placed(tasks) => assert_eq!(tasks[0].gpu_uuids, vec!["GPU-a-0", "GPU-a-2"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backoff_and_no_nodes() {
        let mut j = job("j", 1, Policy::Cost);
        j.not_before = Some(5000);
        let r = run(
            &[node("a", "r1", 1, 1)],
            &[],
            &[j.clone()],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        assert_eq!(
            r.outcomes[0],
            Outcome::Pending {
                code: reason::BACKOFF
            }
        );
        let r = run(
            &[],
            &[],
            &[j],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        assert_eq!(
            r.outcomes[0],
            Outcome::Pending {
                code: reason::NO_NODES
            }
        );
    }

    #[test]
    fn preemption_picks_the_cheapest_victims_and_spares_higher_priorities() {
        let nodes = [node("a", "r1", 1, 4), node("b", "r1", 1, 4)];
        let running = [
            RunningInput {
                priority: 5,
                preemptible: true,
                ..running_on("a", 4, "x")
            },
            RunningInput {
                job_id: "run-b".into(),
                priority: 1,
                preemptible: true,
                ..running_on("b", 2, "x")
            },
            RunningInput {
                job_id: "run-b2".into(),
                priority: 50,
                preemptible: true,
                node_id: "b".into(),
                gpu_uuids: vec!["GPU-b-2".into(), "GPU-b-3".into()],
                ..Default::default()
            },
        ];
        let mut urgent = job("urgent", 2, Policy::Cost);
        urgent.priority = 10;
        let r = run(
            &nodes,
            &running,
            &[urgent.clone()],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        assert_eq!(
            r.outcomes[0],
            Outcome::Preempting {
                victims: vec!["run-b".into()]
            },
            "2 GPUs of priority 1 beat 4 of priority 5"
        );
        urgent.preemptible = true;
        let r = run(
            &nodes,
            &running,
            &[urgent],
            &SchedulerConfig::default(),
            &TenantState::default(),
        );
        assert!(
            matches!(r.outcomes[0], Outcome::Pending { .. }),
            "preemptible jobs never preempt"
        );
    }
}
