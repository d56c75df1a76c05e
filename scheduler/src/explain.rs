//! Why a job is pending: per constraint (how many nodes and GPUs each
//! excluded) and per region (what the region has and what stops the job
//! there). Built on demand from the fleet as a pass left it; never on the
//! scheduling hot path.

use std::collections::{BTreeMap, BTreeSet};

use crate::compiled::{Compiled, model_matches};
use crate::domain::{GpuUnit, JobInput, Locality};
use crate::fleet::{self, Fleet};
use crate::format_usd;
use crate::reason::PendingReason;
use crate::units;

/// What excluded nodes or GPUs, in evaluation order: a node or GPU is
/// charged to the first one it violates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExcludedBy {
    NodeNotReady,
    /// An image job on a node whose agent has no `oci` runtime.
    Runtime,
    Provider,
    Region,
    MaxPrice,
    Spot,
    /// The job requires spot; this capacity is on-demand.
    OnDemand,
    /// Spot capacity interrupted more often than the job allows.
    InterruptionRate,
    GpuModel,
    Unhealthy,
    GpusPerTask,
    /// No NVLink group of the task's size (or no links at all).
    NvLink,
    FreeGpus,
}

impl ExcludedBy {
    /// The machine-readable name, e.g. `"max_price"`.
    pub fn name(self) -> &'static str {
        match self {
            ExcludedBy::NodeNotReady => "node_not_ready",
            ExcludedBy::Runtime => "runtime",
            ExcludedBy::Provider => "provider",
            ExcludedBy::Region => "region",
            ExcludedBy::MaxPrice => "max_price",
            ExcludedBy::Spot => "spot",
            ExcludedBy::OnDemand => "on_demand",
            ExcludedBy::InterruptionRate => "interruption_rate",
            ExcludedBy::GpuModel => "gpu_model",
            ExcludedBy::Unhealthy => "unhealthy",
            ExcludedBy::GpusPerTask => "gpus_per_task",
            ExcludedBy::NvLink => "nvlink",
            ExcludedBy::FreeGpus => "free_gpus",
        }
    }
}

/// How much of the fleet one constraint excluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConstraintExclusion {
    pub constraint: ExcludedBy,
    pub nodes_excluded: u32,
    pub gpus_excluded: u32,
    /// Human-readable, with up to five examples.
    pub detail: String,
}

/// What one (provider, region) offers the job and what stops it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegionVerdict {
    Fits,
    RegionFilter,
    ProviderFilter,
    OverBid,
    NoMatchingGpus,
    AllAllocated,
    InsufficientFree,
    SpotOnly,
    /// Only on-demand capacity; the job requires spot.
    OnDemandOnly,
    /// Its spot capacity is interrupted more often than the job allows.
    InterruptedTooOften,
    NotReady,
    /// No node here runs container images.
    NoOciRuntime,
}

impl RegionVerdict {
    /// The machine-readable name, e.g. `"over_bid"`.
    pub fn name(self) -> &'static str {
        match self {
            RegionVerdict::Fits => "fits",
            RegionVerdict::RegionFilter => "region_filter",
            RegionVerdict::ProviderFilter => "provider_filter",
            RegionVerdict::OverBid => "over_bid",
            RegionVerdict::NoMatchingGpus => "no_matching_gpus",
            RegionVerdict::AllAllocated => "all_allocated",
            RegionVerdict::InsufficientFree => "insufficient_free",
            RegionVerdict::SpotOnly => "spot_only",
            RegionVerdict::OnDemandOnly => "on_demand_only",
            RegionVerdict::InterruptedTooOften => "interrupted_too_often",
            RegionVerdict::NotReady => "not_ready",
            RegionVerdict::NoOciRuntime => "no_oci_runtime",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionExplanation {
    pub provider: String,
    pub region: String,
    /// GPUs on schedulable nodes.
    pub total_gpus: u32,
    /// Of those, GPUs whose model, generation, memory and compute capability fit.
    pub matching_gpus: u32,
    /// Matching, healthy and free now.
    pub free_matching_gpus: u32,
    /// 0 when no GPU here is priced for the job.
    pub min_price_per_gpu_hour_micro_usd: u64,
    pub verdict: RegionVerdict,
    pub detail: String,
}

/// Why a job is pending, for people and for programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The reason explained (`None`: the caller had no known reason, e.g.
    /// for a job that is not pending).
    pub reason: Option<PendingReason>,
    /// One line: what the job needs, why it waits, and what each
    /// constraint excluded.
    pub message: String,
    pub exclusions: Vec<ConstraintExclusion>,
    /// Per (provider, region), in name order.
    pub regions: Vec<RegionExplanation>,
    /// One paragraph a person can act on: why it waits, region by region.
    pub summary: String,
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// A region's figures while the fleet is walked; the verdict is settled at
/// the end.
struct RegionTally {
    provider: String,
    region: String,
    total_gpus: u32,
    matching_gpus: u32,
    free_matching_gpus: u32,
    min_price_per_gpu_hour_micro_usd: u64,
    verdict: Option<RegionVerdict>,
}

#[derive(Default)]
struct Tally {
    nodes: BTreeSet<u32>,
    gpus: u64,
    values: BTreeSet<String>,
}

/// Builds the pending reason's message (with per-constraint exclusions), a
/// per-region breakdown, and a one-paragraph summary, against the fleet as
/// `fleet` holds it (e.g. as a pass left it). `reason: None` explains the
/// request without a verdict (worded like `InsufficientFreeGpus`).
pub fn explain(fleet: &Fleet, job: &JobInput, reason: Option<PendingReason>) -> Explanation {
    let compiled = Compiled::new(fleet, job);
    let c = &job.constraints;
    let per_task = job.gpus_per_task.max(1);
    let tasks = job.tasks.max(1);
    let whole = job.unit == GpuUnit::Whole;
    let by_slot = if whole {
        units::BySlot::default()
    } else {
        units::BySlot::new(fleet)
    };
    // Shares and MIG: per (provider, region), tasks that fit now.
    let mut unit_room: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut tallies: BTreeMap<ExcludedBy, Tally> = BTreeMap::new();
    let mut regions: BTreeMap<(String, String), RegionTally> = BTreeMap::new();

    for class in &fleet.classes {
        let provider = fleet.providers.names[class.provider as usize].clone();
        let region = fleet.regions.names[class.region as usize].clone();
        let model = &fleet.models[class.model as usize];
        let entry = regions
            .entry((provider.clone(), region.clone()))
            .or_insert_with(|| RegionTally {
                provider: provider.clone(),
                region: region.clone(),
                total_gpus: 0,
                matching_gpus: 0,
                free_matching_gpus: 0,
                min_price_per_gpu_hour_micro_usd: u64::MAX,
                verdict: None,
            });
        let model_ok = model_matches(c, model);
        for &slot in &class.slots {
            let s = &fleet.slots[slot as usize];
            let gpus = s.gpus.count_ones() as u64;
            let violation: Option<(ExcludedBy, String)> = if !s.schedulable {
                Some((
                    ExcludedBy::NodeNotReady,
                    fleet.node_ids[s.node as usize].clone(),
                ))
            } else if compiled.oci && !class.oci {
                Some((ExcludedBy::Runtime, fleet.node_ids[s.node as usize].clone()))
            } else if compiled
                .providers_allow
                .as_ref()
                .is_some_and(|a| !a.contains(&class.provider))
                || compiled.providers_deny.contains(&class.provider)
            {
                Some((ExcludedBy::Provider, provider.clone()))
            } else if compiled
                .regions_allow
                .as_ref()
                .is_some_and(|a| !a.contains(&class.region))
                || compiled.regions_deny.contains(&class.region)
            {
                Some((ExcludedBy::Region, region.clone()))
            } else if class.price > compiled.max_price {
                Some((
                    ExcludedBy::MaxPrice,
                    format!("{region} at {}/h", format_usd(class.price)),
                ))
            } else if class.spot && !compiled.allow_spot {
                Some((ExcludedBy::Spot, fleet.node_ids[s.node as usize].clone()))
            } else if !class.spot && compiled.require_spot {
                Some((
                    ExcludedBy::OnDemand,
                    fleet.node_ids[s.node as usize].clone(),
                ))
            } else if !compiled.spot_ok(class) {
                Some((
                    ExcludedBy::InterruptionRate,
                    format!(
                        "{region} at {:.2} interruptions per node-hour",
                        class.interruption_milli as f64 / 1000.0
                    ),
                ))
            } else if !model_ok {
                Some((
                    ExcludedBy::GpuModel,
                    format!("{} ({})", model.name, model.generation.label()),
                ))
            } else {
                None
            };
            if s.schedulable {
                entry.total_gpus += gpus as u32;
            }
            if let Some((name, value)) = violation {
                let tally = tallies.entry(name).or_default();
                tally.nodes.insert(s.node);
                tally.gpus += gpus;
                tally.values.insert(value);
                if entry
                    .verdict
                    .is_none_or(|v| v == RegionVerdict::NoMatchingGpus)
                {
                    entry.verdict = Some(match name {
                        ExcludedBy::NodeNotReady => RegionVerdict::NotReady,
                        ExcludedBy::Runtime => RegionVerdict::NoOciRuntime,
                        ExcludedBy::Provider => RegionVerdict::ProviderFilter,
                        ExcludedBy::Region => RegionVerdict::RegionFilter,
                        ExcludedBy::MaxPrice
                        | ExcludedBy::Spot
                        | ExcludedBy::OnDemand
                        | ExcludedBy::InterruptionRate
                            if !model_ok =>
                        {
                            RegionVerdict::NoMatchingGpus
                        }
                        ExcludedBy::MaxPrice => RegionVerdict::OverBid,
                        ExcludedBy::Spot => RegionVerdict::SpotOnly,
                        ExcludedBy::OnDemand => RegionVerdict::OnDemandOnly,
                        ExcludedBy::InterruptionRate => RegionVerdict::InterruptedTooOften,
                        _ => RegionVerdict::NoMatchingGpus,
                    });
                }
                if name == ExcludedBy::MaxPrice {
                    entry.min_price_per_gpu_hour_micro_usd =
                        entry.min_price_per_gpu_hour_micro_usd.min(class.price);
                    entry.matching_gpus += if model_ok { gpus as u32 } else { 0 };
                    entry.free_matching_gpus += if model_ok { s.free.count_ones() } else { 0 };
                }
                continue;
            }
            entry.matching_gpus += gpus as u32;
            entry.free_matching_gpus += s.free.count_ones();
            entry.min_price_per_gpu_hour_micro_usd =
                entry.min_price_per_gpu_hour_micro_usd.min(class.price);
            // MIG-enabled GPUs are not unhealthy, only not whole.
            let unhealthy = (s.gpus & !s.healthy & !s.mig).count_ones() as u64;
            if unhealthy > 0 {
                let tally = tallies.entry(ExcludedBy::Unhealthy).or_default();
                tally.nodes.insert(s.node);
                tally.gpus += unhealthy;
                tally.values.insert(fleet.node_ids[s.node as usize].clone());
            }
            if !whole {
                let (now, idle) = units::slot_room(fleet, &by_slot, &job.unit, slot);
                *unit_room
                    .entry((provider.clone(), region.clone()))
                    .or_default() += now;
                if idle == 0 {
                    let tally = tallies.entry(ExcludedBy::GpusPerTask).or_default();
                    tally.nodes.insert(s.node);
                    tally.gpus += gpus;
                    tally.values.insert(format!(
                        "{} has no {}",
                        fleet.node_ids[s.node as usize],
                        units::kind_name(&job.unit)
                    ));
                } else if now == 0 {
                    let tally = tallies.entry(ExcludedBy::FreeGpus).or_default();
                    tally.nodes.insert(s.node);
                    tally.gpus += gpus;
                    tally.values.insert(format!(
                        "{} has {}",
                        fleet.node_ids[s.node as usize],
                        units::slot_left(fleet, &by_slot, &job.unit, slot)
                    ));
                }
            } else if s.healthy.count_ones() < per_task {
                let tally = tallies.entry(ExcludedBy::GpusPerTask).or_default();
                tally.nodes.insert(s.node);
                tally.gpus += s.healthy.count_ones() as u64;
                tally.values.insert(format!(
                    "{} has {}",
                    fleet.node_ids[s.node as usize],
                    s.healthy.count_ones()
                ));
            } else if compiled.nvlink
                && per_task > 1
                && !s
                    .nvlink_groups
                    .iter()
                    .any(|g| (g & s.healthy).count_ones() >= per_task)
            {
                let tally = tallies.entry(ExcludedBy::NvLink).or_default();
                tally.nodes.insert(s.node);
                tally.gpus += s.healthy.count_ones() as u64;
                tally.values.insert(if s.nvlink_groups.is_empty() {
                    format!("{} reports no NVLink", fleet.node_ids[s.node as usize])
                } else {
                    format!(
                        "{} links at most {}",
                        fleet.node_ids[s.node as usize],
                        s.nvlink_groups
                            .iter()
                            .map(|g| (g & s.healthy).count_ones())
                            .max()
                            .unwrap_or(0)
                    )
                });
            } else if s.free.count_ones() < per_task {
                let tally = tallies.entry(ExcludedBy::FreeGpus).or_default();
                tally.nodes.insert(s.node);
                tally.gpus += (s.healthy & !s.free).count_ones() as u64;
                tally.values.insert(format!(
                    "{} has {} free",
                    fleet.node_ids[s.node as usize],
                    s.free.count_ones()
                ));
            }
        }
    }

    // Verdicts for regions that match the hardware and the filters.
    let region_list: Vec<RegionExplanation> = regions
        .into_values()
        .map(|r| {
            let min_price = if r.min_price_per_gpu_hour_micro_usd == u64::MAX {
                0
            } else {
                r.min_price_per_gpu_hour_micro_usd
            };
            let price = format_usd(min_price);
            let verdict = match r.verdict {
                Some(
                    v @ (RegionVerdict::OverBid
                    | RegionVerdict::NoOciRuntime
                    | RegionVerdict::RegionFilter
                    | RegionVerdict::ProviderFilter),
                ) => v,
                Some(v) if r.matching_gpus == 0 => v,
                _ if r.matching_gpus == 0 => RegionVerdict::NoMatchingGpus,
                _ if !whole => {
                    let room = unit_room
                        .get(&(r.provider.clone(), r.region.clone()))
                        .copied()
                        .unwrap_or(0);
                    if room == 0 {
                        RegionVerdict::AllAllocated
                    } else if room < tasks as u64 {
                        RegionVerdict::InsufficientFree
                    } else {
                        RegionVerdict::Fits
                    }
                }
                _ if r.free_matching_gpus == 0 => RegionVerdict::AllAllocated,
                _ if r.free_matching_gpus < per_task * tasks => RegionVerdict::InsufficientFree,
                _ => RegionVerdict::Fits,
            };
            let detail = match verdict {
                RegionVerdict::RegionFilter => format!("{} excluded by region filter", r.region),
                RegionVerdict::ProviderFilter => {
                    format!("{} ({}) excluded by provider filter", r.region, r.provider)
                }
                RegionVerdict::OverBid => format!(
                    "{} has {} matching GPUs, {} free, at {price}/h (over bid)",
                    r.region, r.matching_gpus, r.free_matching_gpus
                ),
                RegionVerdict::NotReady => format!("{} has no ready nodes", r.region),
                RegionVerdict::NoOciRuntime => format!(
                    "{} has no node that runs container images (no agent there has the oci runtime)",
                    r.region
                ),
                RegionVerdict::SpotOnly => {
                    format!("{} offers only spot capacity (spot not allowed)", r.region)
                }
                RegionVerdict::OnDemandOnly => {
                    format!(
                        "{} offers only on-demand capacity (spot required)",
                        r.region
                    )
                }
                RegionVerdict::InterruptedTooOften => format!(
                    "{}'s spot capacity is interrupted more often than the job allows",
                    r.region
                ),
                RegionVerdict::NoMatchingGpus => {
                    format!("{} has no GPUs of the requested kind", r.region)
                }
                RegionVerdict::AllAllocated => format!(
                    "{} has {} matching GPUs, all allocated",
                    r.region, r.matching_gpus
                ),
                RegionVerdict::InsufficientFree => format!(
                    "{} has {} of {} matching GPUs free at {price}/h",
                    r.region, r.free_matching_gpus, r.matching_gpus
                ),
                RegionVerdict::Fits => format!(
                    "{} has {} matching GPUs free at {price}/h",
                    r.region, r.free_matching_gpus
                ),
            };
            RegionExplanation {
                provider: r.provider,
                region: r.region,
                total_gpus: r.total_gpus,
                matching_gpus: r.matching_gpus,
                free_matching_gpus: r.free_matching_gpus,
                min_price_per_gpu_hour_micro_usd: min_price,
                verdict,
                detail,
            }
        })
        .collect();

    let gens: Vec<&str> = c.generations.iter().map(|g| g.label()).collect();
    let mut need = if whole {
        let mut need = format!("needs {tasks} task{} × {per_task}", plural(tasks as u64));
        if !gens.is_empty() {
            need.push_str(&format!(" {}", gens.join("/")));
        } else if let Some(min) = c.min_generation {
            need.push_str(&format!(" ≥{}", min.label()));
        }
        need.push_str(&format!(" GPU{}", plural(per_task as u64)));
        need
    } else {
        // "needs 470/1000 of a GPU with 12 GiB free"
        let mut need = if tasks == 1 {
            format!("needs {}", job.unit.describe(1))
        } else {
            format!("needs {tasks} tasks × {}", job.unit.describe(1))
        };
        if !gens.is_empty() {
            need.push_str(&format!(" ({})", gens.join("/")));
        } else if let Some(min) = c.min_generation {
            need.push_str(&format!(" (≥{})", min.label()));
        }
        need
    };
    if let Some(max) = c.max_price_per_gpu_hour_micro_usd {
        need.push_str(&format!(" ≤ {}/h", format_usd(max)));
    }
    match compiled.locality {
        Locality::Region if tasks > 1 => need.push_str(" in one region"),
        Locality::Provider if tasks > 1 => need.push_str(" with one provider"),
        _ => {}
    }

    let mut exclusions = Vec::new();
    let mut parts = Vec::new();
    for (&name, tally) in &tallies {
        let shown: Vec<&str> = tally.values.iter().map(String::as_str).take(5).collect();
        let more = tally.values.len().saturating_sub(shown.len());
        let shown = if more > 0 {
            format!("{} and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        };
        let detail = match name {
            ExcludedBy::NodeNotReady => format!("nodes not ready or cordoned: {shown}"),
            ExcludedBy::Runtime => format!(
                "cannot run container images (their agents have no oci runtime; set oci_enabled): {shown}"
            ),
            ExcludedBy::Provider => format!("provider not allowed: {shown}"),
            ExcludedBy::Region => format!("region not allowed: {shown}"),
            ExcludedBy::MaxPrice => format!(
                "over the bid of {}/h: {shown}",
                format_usd(c.max_price_per_gpu_hour_micro_usd.unwrap_or(0))
            ),
            ExcludedBy::Spot => format!("spot capacity not allowed: {shown}"),
            ExcludedBy::OnDemand => format!("on-demand capacity, the job requires spot: {shown}"),
            ExcludedBy::InterruptionRate => format!(
                "spot interrupted more often than the job's {:.2} per node-hour: {shown}",
                c.max_interruption_milli_per_hour.unwrap_or(0) as f64 / 1000.0
            ),
            ExcludedBy::GpuModel => format!("GPU model does not match: {shown}"),
            ExcludedBy::Unhealthy => format!("unhealthy GPUs on: {shown}"),
            ExcludedBy::GpusPerTask if !whole => format!("no such unit: {shown}"),
            ExcludedBy::GpusPerTask => {
                format!("fewer than {per_task} matching GPUs on one node: {shown}")
            }
            ExcludedBy::NvLink => {
                format!("no {per_task} NVLink-connected GPUs (--nvlink): {shown}")
            }
            ExcludedBy::FreeGpus if !whole => format!("not enough left: {shown}"),
            ExcludedBy::FreeGpus => format!("allocated to other jobs: {shown}"),
        };
        let nodes = tally.nodes.len() as u64;
        parts.push(format!(
            "{nodes} node{} / {} GPU{} excluded ({detail})",
            plural(nodes),
            tally.gpus,
            plural(tally.gpus)
        ));
        exclusions.push(ConstraintExclusion {
            constraint: name,
            nodes_excluded: nodes as u32,
            gpus_excluded: tally.gpus as u32,
            detail,
        });
    }
    let head = match reason {
        Some(PendingReason::NoNodes) => "no nodes have registered; start an agent".to_string(),
        Some(PendingReason::NoFeasibleNodes) => {
            // How many such tasks the eligible nodes could ever hold, in the
            // best region (or provider) when the job must stay in one.
            let mut per_group: BTreeMap<u16, u64> = BTreeMap::new();
            for (idx, class) in fleet
                .classes
                .iter()
                .enumerate()
                .filter(|(_, c)| compiled.class_ok(c))
            {
                let tasks: u64 = if whole {
                    (per_task as usize..=fleet::MAX_GPUS_PER_SLOT)
                        .map(|k| class.healthy_hist[k] as u64 * (k as u64 / per_task as u64))
                        .sum()
                } else {
                    units::idle_tasks(fleet, &job.unit, idx as u32)
                };
                *per_group.entry(compiled.group_of(class)).or_insert(0) += tasks;
            }
            let best = per_group.values().copied().max().unwrap_or(0);
            if best == 0 {
                format!("{need}: no node satisfies the constraints, even when idle")
            } else {
                let scope = match compiled.locality {
                    Locality::Region => " in one region",
                    Locality::Provider => " with one provider",
                    _ => "",
                };
                format!(
                    "{need}: the nodes that satisfy the constraints hold at most {best} such task{}{scope}, even when idle",
                    plural(best)
                )
            }
        }
        Some(PendingReason::QuotaExceeded) => {
            format!("{need}: tenant {} would exceed its GPU quota", job.tenant)
        }
        Some(PendingReason::Backoff) => format!("{need}: waiting for its retry backoff to pass"),
        Some(PendingReason::ReservedForHigherPriority) => {
            format!("{need}: free GPUs are reserved for a higher-priority job")
        }
        Some(PendingReason::Preempting) => {
            format!("{need}: evicting lower-priority preemptible work to make room")
        }
        Some(PendingReason::WaitingForScheduler) => {
            format!("{need}: waiting for the next scheduling pass")
        }
        Some(PendingReason::InsufficientFreeGpus) | None if !whole => {
            format!("{need}: no GPU has that much free now; waiting for running work to end")
        }
        Some(PendingReason::InsufficientFreeGpus) | None => {
            format!("{need}: not enough free GPUs now; waiting for running work to end")
        }
    };
    let message = if parts.is_empty() {
        head.clone()
    } else {
        format!("{head}; {}", parts.join("; "))
    };
    let interesting: Vec<&str> = region_list
        .iter()
        .filter(|r| r.total_gpus > 0 || r.verdict != RegionVerdict::NoMatchingGpus)
        .map(|r| r.detail.as_str())
        .collect();
    let summary = if interesting.is_empty() {
        head
    } else {
        format!("{head}: {}", interesting.join("; "))
    };
    Explanation {
        reason,
        message,
        exclusions,
        regions: region_list,
        summary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Constraints, Generation};
    use crate::test_support::node;

    #[test]
    fn an_image_job_fits_only_where_an_agent_runs_images_and_explain_says_so() {
        let mut with_oci = node("a", "r1", 3_000_000, "H100-SXM-80GB", Generation::Hopper);
        with_oci.oci = true;
        let cheap = node("b", "r2", 1_000_000, "H100-SXM-80GB", Generation::Hopper);
        let job = JobInput {
            id: "img".into(),
            tasks: 1,
            gpus_per_task: 1,
            constraints: Constraints {
                require_oci: true,
                ..Default::default()
            },
            ..Default::default()
        };
        // The cheaper node cannot run it; the oci node can.
        let mut fleet = Fleet::build(&[with_oci, cheap.clone()], &[]);
        let r = crate::schedule(
            &mut fleet,
            std::slice::from_ref(&job),
            &crate::SchedulerConfig::default(),
            &crate::TenantState::default(),
            0,
        );
        match &r.outcomes[0] {
            crate::Outcome::Placed(tasks) => assert_eq!(tasks[0].node_id, "a"),
            other => panic!("{other:?}"),
        }
        // Without any: pending, and explain names the runtime.
        let fleet = Fleet::build(&[cheap], &[]);
        let e = explain(&fleet, &job, Some(PendingReason::NoFeasibleNodes));
        let names: Vec<&str> = e.exclusions.iter().map(|x| x.constraint.name()).collect();
        assert_eq!(names, ["runtime"]);
        assert!(
            e.message.contains("cannot run container images"),
            "{}",
            e.message
        );
        assert_eq!(e.regions[0].verdict, RegionVerdict::NoOciRuntime);
        assert!(
            e.summary.contains("no node that runs container images"),
            "{}",
            e.summary
        );
    }

    #[test]
    fn exclusions_and_region_verdicts_are_named_and_worded() {
        let fleet = Fleet::build(
            &[
                node("a", "r1", 3_000_000, "H100-SXM-80GB", Generation::Hopper),
                node("b", "r2", 1_500_000, "A100-SXM-80GB", Generation::Ampere),
                node("c", "r3", 1_000_000, "H100-SXM-80GB", Generation::Hopper),
            ],
            &[],
        );
        let job = JobInput {
            tasks: 1,
            gpus_per_task: 4,
            constraints: Constraints {
                generations: vec![Generation::Hopper],
                max_price_per_gpu_hour_micro_usd: Some(2_000_000),
                ..Default::default()
            },
            ..Default::default()
        };
        let e = explain(&fleet, &job, Some(PendingReason::InsufficientFreeGpus));
        assert_eq!(e.reason, Some(PendingReason::InsufficientFreeGpus));
        let names: Vec<&str> = e.exclusions.iter().map(|x| x.constraint.name()).collect();
        assert_eq!(names, ["max_price", "gpu_model"]);
        assert_eq!(
            e.message,
            "needs 1 task × 4 Hopper GPUs ≤ $2.00/h: not enough free GPUs now; waiting for \
             running work to end; 1 node / 8 GPUs excluded (over the bid of $2.00/h: r1 at \
             $3.00/h); 1 node / 8 GPUs excluded (GPU model does not match: A100-SXM-80GB (Ampere))"
        );
        let verdicts: Vec<(&str, &str)> = e
            .regions
            .iter()
            .map(|r| (r.region.as_str(), r.verdict.name()))
            .collect();
        assert_eq!(
            verdicts,
            [
                ("r1", "over_bid"),
                ("r2", "no_matching_gpus"),
                ("r3", "fits")
            ]
        );
        assert_eq!(
            e.regions[2].detail,
            "r3 has 8 matching GPUs free at $1.00/h"
        );
    }
}
