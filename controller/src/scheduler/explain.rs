//! Why a job is pending: per constraint (how many nodes and GPUs each
//! excluded) and per region (what the region has and what stops the job
//! there). Built on demand from the fleet as a pass left it; never on the
//! scheduling hot path.

use std::collections::BTreeMap;

use gpufleet_proto::v1::{ConstraintExclusion, GpuGeneration, PendingReason, RegionExplanation};

use super::fleet::Fleet;
use super::{Compiled, JobInput, format_usd, model_matches, reason};

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn generation_label(generation: i32) -> String {
    GpuGeneration::try_from(generation)
        .map(|g| {
            let name = g
                .as_str_name()
                .trim_start_matches("GPU_GENERATION_")
                .to_ascii_lowercase();
            let mut chars = name.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .unwrap_or_else(|_| format!("generation {generation}"))
}

/// Constraint names in evaluation order; a node or GPU is charged to the
/// first one it violates.
const ORDER: &[&str] = &[
    "node_not_ready",
    "provider",
    "region",
    "max_price",
    "spot",
    "gpu_model",
    "unhealthy",
    "gpus_per_task",
    "free_gpus",
];

#[derive(Default)]
struct Tally {
    nodes: std::collections::BTreeSet<u32>,
    gpus: u64,
    values: std::collections::BTreeSet<String>,
}

/// Builds the pending reason (with per-constraint exclusions), a per-region
/// breakdown, and a one-paragraph summary.
pub fn explain(
    fleet: &Fleet,
    job: &JobInput,
    code: &str,
) -> (PendingReason, Vec<RegionExplanation>, String) {
    let compiled = Compiled::new(fleet, job);
    let c = &job.constraints;
    let per_task = job.gpus_per_task.max(1);
    let tasks = job.tasks.max(1);
    let mut tallies: BTreeMap<&'static str, Tally> = BTreeMap::new();
    let mut regions: BTreeMap<(String, String), RegionExplanation> = BTreeMap::new();

    for class in &fleet.classes {
        let provider = fleet.providers.names[class.provider as usize].clone();
        let region = fleet.regions.names[class.region as usize].clone();
        let model = &fleet.models[class.model as usize];
        let entry = regions
            .entry((provider.clone(), region.clone()))
            .or_insert_with(|| RegionExplanation {
                provider: provider.clone(),
                region: region.clone(),
                min_price_per_gpu_hour_micro_usd: u64::MAX,
                ..Default::default()
            });
        let model_ok = model_matches(c, model);
        for &slot in &class.slots {
            let s = &fleet.slots[slot as usize];
            let gpus = s.gpus.count_ones() as u64;
            let violation: Option<(&'static str, String)> = if !s.schedulable {
                Some(("node_not_ready", fleet.node_ids[s.node as usize].clone()))
            } else if compiled
                .providers_allow
                .as_ref()
                .is_some_and(|a| !a.contains(&class.provider))
                || compiled.providers_deny.contains(&class.provider)
            {
                Some(("provider", provider.clone()))
            } else if compiled
                .regions_allow
                .as_ref()
                .is_some_and(|a| !a.contains(&class.region))
                || compiled.regions_deny.contains(&class.region)
            {
                Some(("region", region.clone()))
            } else if class.price > compiled.max_price {
                Some((
                    "max_price",
                    format!("{region} at {}/h", format_usd(class.price)),
                ))
            } else if class.spot && !compiled.allow_spot {
                Some(("spot", fleet.node_ids[s.node as usize].clone()))
            } else if !model_ok {
                Some((
                    "gpu_model",
                    format!("{} ({})", model.name, generation_label(model.generation)),
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
                if entry.verdict.is_empty() || entry.verdict == "no_matching_gpus" {
                    entry.verdict = match name {
                        "node_not_ready" => "not_ready",
                        "provider" => "provider_filter",
                        "region" => "region_filter",
                        "max_price" | "spot" if !model_ok => "no_matching_gpus",
                        "max_price" => "over_bid",
                        "spot" => "spot_only",
                        _ => "no_matching_gpus",
                    }
                    .to_string();
                }
                if name == "max_price" {
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
            let unhealthy = (s.gpus & !s.healthy).count_ones() as u64;
            if unhealthy > 0 {
                let tally = tallies.entry("unhealthy").or_default();
                tally.nodes.insert(s.node);
                tally.gpus += unhealthy;
                tally.values.insert(fleet.node_ids[s.node as usize].clone());
            }
            if s.healthy.count_ones() < per_task {
                let tally = tallies.entry("gpus_per_task").or_default();
                tally.nodes.insert(s.node);
                tally.gpus += s.healthy.count_ones() as u64;
                tally.values.insert(format!(
                    "{} has {}",
                    fleet.node_ids[s.node as usize],
                    s.healthy.count_ones()
                ));
            } else if s.free.count_ones() < per_task {
                let tally = tallies.entry("free_gpus").or_default();
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
    let mut region_list: Vec<RegionExplanation> = regions.into_values().collect();
    for r in &mut region_list {
        if r.min_price_per_gpu_hour_micro_usd == u64::MAX {
            r.min_price_per_gpu_hour_micro_usd = 0;
        }
        let price = format_usd(r.min_price_per_gpu_hour_micro_usd);
        if r.verdict.is_empty()
            || (r.matching_gpus > 0
                && r.verdict != "over_bid"
                && r.verdict != "region_filter"
                && r.verdict != "provider_filter")
        {
            r.verdict = if r.matching_gpus == 0 {
                "no_matching_gpus"
            } else if r.free_matching_gpus == 0 {
                "all_allocated"
            } else if r.free_matching_gpus < per_task * tasks {
                "insufficient_free"
            } else {
                "fits"
            }
            .to_string();
        }
        r.detail = match r.verdict.as_str() {
            "region_filter" => format!("{} excluded by region filter", r.region),
            "provider_filter" => {
                format!("{} ({}) excluded by provider filter", r.region, r.provider)
            }
            "over_bid" => format!(
                "{} has {} matching GPUs, {} free, at {price}/h (over bid)",
                r.region, r.matching_gpus, r.free_matching_gpus
            ),
            "not_ready" => format!("{} has no ready nodes", r.region),
            "spot_only" => format!("{} offers only spot capacity (spot not allowed)", r.region),
            "no_matching_gpus" => format!("{} has no GPUs of the requested kind", r.region),
            "all_allocated" => format!(
                "{} has {} matching GPUs, all allocated",
                r.region, r.matching_gpus
            ),
            "insufficient_free" => format!(
                "{} has {} of {} matching GPUs free at {price}/h",
                r.region, r.free_matching_gpus, r.matching_gpus
            ),
            _ => format!(
                "{} has {} matching GPUs free at {price}/h",
                r.region, r.free_matching_gpus
            ),
        };
    }

    let mut need = format!("needs {tasks} task{} × {per_task}", plural(tasks as u64));
    let gens: Vec<String> = c.generations.iter().map(|g| generation_label(*g)).collect();
    if !gens.is_empty() {
        need.push_str(&format!(" {}", gens.join("/")));
    } else if c.min_generation != 0 {
        need.push_str(&format!(" ≥{}", generation_label(c.min_generation)));
    }
    need.push_str(&format!(" GPU{}", plural(per_task as u64)));
    if let Some(max) = c.max_price_per_gpu_hour_micro_usd {
        need.push_str(&format!(" ≤ {}/h", format_usd(max)));
    }
    match compiled.locality {
        gpufleet_proto::v1::Locality::Region if tasks > 1 => need.push_str(" in one region"),
        gpufleet_proto::v1::Locality::Provider if tasks > 1 => need.push_str(" with one provider"),
        _ => {}
    }

    let mut exclusions = Vec::new();
    let mut parts = Vec::new();
    for name in ORDER {
        let Some(tally) = tallies.get(name) else {
            continue;
        };
        let shown: Vec<&str> = tally.values.iter().map(String::as_str).take(5).collect();
        let more = tally.values.len().saturating_sub(shown.len());
        let shown = if more > 0 {
            format!("{} and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        };
        let detail = match *name {
            "node_not_ready" => format!("nodes not ready or cordoned: {shown}"),
            "provider" => format!("provider not allowed: {shown}"),
            "region" => format!("region not allowed: {shown}"),
            "max_price" => format!(
                "over the bid of {}/h: {shown}",
                format_usd(c.max_price_per_gpu_hour_micro_usd.unwrap_or(0))
            ),
            "spot" => format!("spot capacity not allowed: {shown}"),
            "gpu_model" => format!("GPU model does not match: {shown}"),
            "unhealthy" => format!("unhealthy GPUs on: {shown}"),
            "gpus_per_task" => format!("fewer than {per_task} matching GPUs on one node: {shown}"),
            _ => format!("allocated to other jobs: {shown}"),
        };
        let nodes = tally.nodes.len() as u64;
        parts.push(format!(
            "{nodes} node{} / {} GPU{} excluded ({detail})",
            plural(nodes),
            tally.gpus,
            plural(tally.gpus)
        ));
        exclusions.push(ConstraintExclusion {
            constraint: (*name).to_string(),
            nodes_excluded: nodes as u32,
            gpus_excluded: tally.gpus as u32,
            detail,
        });
    }
    let head = match code {
        reason::NO_NODES => "no nodes have registered; start an agent".to_string(),
        reason::NO_FEASIBLE_NODES => {
            // How many such tasks the eligible nodes could ever hold, in the
            // best region (or provider) when the job must stay in one.
            let mut per_group: BTreeMap<u16, u64> = BTreeMap::new();
            for class in fleet.classes.iter().filter(|c| compiled.class_ok(c)) {
                let tasks: u64 = (per_task as usize..=super::fleet::MAX_GPUS_PER_SLOT)
                    .map(|k| class.healthy_hist[k] as u64 * (k as u64 / per_task as u64))
                    .sum();
                *per_group.entry(compiled.group_of(class)).or_insert(0) += tasks;
            }
            let best = per_group.values().copied().max().unwrap_or(0);
            if best == 0 {
                format!("{need}: no node satisfies the constraints, even when idle")
            } else {
                let scope = match compiled.locality {
                    gpufleet_proto::v1::Locality::Region => " in one region",
                    gpufleet_proto::v1::Locality::Provider => " with one provider",
                    _ => "",
                };
                format!(
                    "{need}: the nodes that satisfy the constraints hold at most {best} such task{}{scope}, even when idle",
                    plural(best)
                )
            }
        }
        reason::QUOTA_EXCEEDED => {
            format!("{need}: tenant {} would exceed its GPU quota", job.tenant)
        }
        reason::BACKOFF => format!("{need}: waiting for its retry backoff to pass"),
        reason::RESERVED_FOR_HIGHER_PRIORITY => {
            format!("{need}: free GPUs are reserved for a higher-priority job")
        }
        reason::PREEMPTING => {
            format!("{need}: evicting lower-priority preemptible work to make room")
        }
        reason::WAITING_FOR_SCHEDULER => format!("{need}: waiting for the next scheduling pass"),
        _ => format!("{need}: not enough free GPUs now; waiting for running work to end"),
    };
    let message = if parts.is_empty() {
        head.clone()
    } else {
        format!("{head}; {}", parts.join("; "))
    };
    let interesting: Vec<&str> = region_list
        .iter()
        .filter(|r| r.total_gpus > 0 || r.verdict != "no_matching_gpus")
        .map(|r| r.detail.as_str())
        .collect();
    let summary = if interesting.is_empty() {
        head
    } else {
        format!("{head}: {}", interesting.join("; "))
    };
    (
        PendingReason {
            code: code.to_string(),
            message,
            exclusions,
        },
        region_list,
        summary,
    )
}
