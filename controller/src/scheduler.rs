//! The first scheduler: a pure, synchronous function of a fleet snapshot and
//! a job's request. No I/O, no locks, no clocks — which is what lets the
//! controller, tests and benchmarks share it.
//!
//! Policy (`cost`): among GPUs that satisfy every hard constraint, take the
//! cheapest price per GPU-hour; among equally priced nodes prefer the one with
//! the fewest free eligible GPUs (packing keeps whole nodes free for large
//! tasks); ties break by node id, and GPUs within a node by index, so the
//! result is deterministic. A gang is placed whole or not at all.

use std::collections::{BTreeMap, BTreeSet};

use gpufleet_proto::v1::{ConstraintExclusion, JobConstraints, PendingReason};

/// One GPU as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct GpuSlot {
    pub uuid: String,
    pub index: u32,
    pub model: String,
    /// `GpuGeneration` as its wire value.
    pub generation: i32,
    pub memory_bytes: u64,
    pub healthy: bool,
    pub allocated: bool,
}

/// One node as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct NodeSnapshot {
    pub node_id: String,
    pub provider: String,
    pub region: String,
    pub price_per_gpu_hour_micro_usd: u64,
    /// Connected and within its lease.
    pub ready: bool,
    pub gpus: Vec<GpuSlot>,
}

/// What a job asks for.
#[derive(Debug, Clone, Copy)]
pub struct PlacementRequest<'a> {
    pub tasks: u32,
    pub gpus_per_task: u32,
    pub constraints: &'a JobConstraints,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPlacement {
    pub node_id: String,
    pub provider: String,
    pub region: String,
    pub price_per_gpu_hour_micro_usd: u64,
    pub gpu_uuids: Vec<String>,
}

pub mod reason {
    pub const NO_NODES: &str = "NO_NODES";
    pub const NO_FEASIBLE_NODES: &str = "NO_FEASIBLE_NODES";
    pub const INSUFFICIENT_FREE_GPUS: &str = "INSUFFICIENT_FREE_GPUS";
    pub const WAITING_FOR_SCHEDULER: &str = "WAITING_FOR_SCHEDULER";
}

/// Names used in `ConstraintExclusion.constraint`, in evaluation order: a
/// node or GPU is charged to the first constraint it violates.
const CONSTRAINT_ORDER: &[&str] = &[
    "node_not_ready",
    "provider",
    "region",
    "max_price",
    "generation",
    "model",
    "min_gpu_memory",
    "unhealthy",
    "gpus_per_task",
    "free_gpus",
];

#[derive(Default)]
struct Exclusion {
    nodes: BTreeSet<String>,
    gpus: u32,
    values: BTreeSet<String>,
}

/// A fleet snapshot that placements are carved out of, one job after another
/// within a scheduling pass.
#[derive(Debug, Clone, Default)]
pub struct FleetSnapshot {
    nodes: Vec<NodeSnapshot>,
}

impl FleetSnapshot {
    pub fn new(mut nodes: Vec<NodeSnapshot>) -> Self {
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        for node in &mut nodes {
            node.gpus.sort_by_key(|gpu| gpu.index);
        }
        Self { nodes }
    }

    pub fn nodes(&self) -> &[NodeSnapshot] {
        &self.nodes
    }

    /// Places every task or none. On success the chosen GPUs are marked
    /// allocated in this snapshot; on failure it explains what excluded what.
    pub fn place(
        &mut self,
        request: PlacementRequest<'_>,
    ) -> Result<Vec<TaskPlacement>, PendingReason> {
        let tasks = request.tasks.max(1);
        let per_task = request.gpus_per_task;
        let constraints = request.constraints;
        let mut exclusions: BTreeMap<&'static str, Exclusion> = BTreeMap::new();
        // (node position, free eligible GPU positions)
        let mut candidates: Vec<(usize, Vec<usize>)> = Vec::new();
        // Tasks the feasible nodes could hold if they were idle.
        let mut capacity_in_tasks: u64 = 0;

        if self.nodes.is_empty() {
            return Err(PendingReason {
                code: reason::NO_NODES.to_string(),
                message: "no nodes have registered with the controller yet; start an agent"
                    .to_string(),
                exclusions: Vec::new(),
            });
        }

        for (node_pos, node) in self.nodes.iter().enumerate() {
            let gpu_count = node.gpus.len() as u32;
            let node_violation = if !node.ready {
                Some(("node_not_ready", node.node_id.clone()))
            } else if !constraints.providers.is_empty()
                && !constraints.providers.contains(&node.provider)
            {
                Some(("provider", node.provider.clone()))
            } else if !constraints.regions.is_empty() && !constraints.regions.contains(&node.region)
            {
                Some(("region", node.region.clone()))
            } else if constraints
                .max_price_per_gpu_hour_micro_usd
                .is_some_and(|max| node.price_per_gpu_hour_micro_usd > max)
            {
                Some((
                    "max_price",
                    format!(
                        "{} at {}/h",
                        node.region,
                        format_usd(node.price_per_gpu_hour_micro_usd)
                    ),
                ))
            } else {
                None
            };
            if let Some((constraint, value)) = node_violation {
                let entry = exclusions.entry(constraint).or_default();
                entry.nodes.insert(node.node_id.clone());
                entry.gpus += gpu_count;
                entry.values.insert(value);
                continue;
            }

            let mut eligible = Vec::new();
            let mut free = Vec::new();
            for (gpu_pos, gpu) in node.gpus.iter().enumerate() {
                let violation = if !constraints.generations.is_empty()
                    && !constraints.generations.contains(&gpu.generation)
                {
                    Some(("generation", generation_label(gpu.generation)))
                } else if !constraints.models.is_empty()
                    && !constraints
                        .models
                        .iter()
                        .any(|m| m.eq_ignore_ascii_case(&gpu.model))
                {
                    Some(("model", gpu.model.clone()))
                } else if gpu.memory_bytes < constraints.min_gpu_memory_bytes {
                    Some((
                        "min_gpu_memory",
                        format!("{} ({} GiB)", gpu.model, gpu.memory_bytes >> 30),
                    ))
                } else if !gpu.healthy {
                    Some(("unhealthy", gpu.uuid.clone()))
                } else {
                    None
                };
                match violation {
                    Some((constraint, value)) => {
                        let entry = exclusions.entry(constraint).or_default();
                        entry.nodes.insert(node.node_id.clone());
                        entry.gpus += 1;
                        entry.values.insert(value);
                    }
                    None => {
                        eligible.push(gpu_pos);
                        if !gpu.allocated {
                            free.push(gpu_pos);
                        }
                    }
                }
            }
            if eligible.is_empty() {
                continue;
            }
            if (eligible.len() as u32) < per_task {
                let entry = exclusions.entry("gpus_per_task").or_default();
                entry.nodes.insert(node.node_id.clone());
                entry.gpus += eligible.len() as u32;
                entry
                    .values
                    .insert(format!("{} has {}", node.node_id, eligible.len()));
                continue;
            }
            capacity_in_tasks += (eligible.len() as u32 / per_task.max(1)) as u64;
            if (free.len() as u32) < per_task {
                let entry = exclusions.entry("free_gpus").or_default();
                entry.nodes.insert(node.node_id.clone());
                entry.gpus += (eligible.len() - free.len()) as u32;
                entry
                    .values
                    .insert(format!("{} has {} free", node.node_id, free.len()));
            }
            candidates.push((node_pos, free));
        }

        let feasible_nodes = candidates.len();
        let mut placements = Vec::with_capacity(tasks as usize);
        for _ in 0..tasks {
            let best = candidates
                .iter()
                .enumerate()
                .filter(|(_, (_, free))| free.len() as u32 >= per_task)
                .min_by(|(_, (a_pos, a_free)), (_, (b_pos, b_free))| {
                    let (a, b) = (&self.nodes[*a_pos], &self.nodes[*b_pos]);
                    a.price_per_gpu_hour_micro_usd
                        .cmp(&b.price_per_gpu_hour_micro_usd)
                        .then(a_free.len().cmp(&b_free.len()))
                        .then(a.node_id.cmp(&b.node_id))
                })
                .map(|(i, _)| i);
            let Some(candidate) = best else {
                return Err(self.explain(
                    request,
                    exclusions,
                    feasible_nodes,
                    capacity_in_tasks,
                    placements.len(),
                ));
            };
            let (node_pos, free) = &mut candidates[candidate];
            let taken: Vec<usize> = free.drain(..per_task as usize).collect();
            let node = &self.nodes[*node_pos];
            placements.push((
                *node_pos,
                taken.clone(),
                TaskPlacement {
                    node_id: node.node_id.clone(),
                    provider: node.provider.clone(),
                    region: node.region.clone(),
                    price_per_gpu_hour_micro_usd: node.price_per_gpu_hour_micro_usd,
                    gpu_uuids: taken.iter().map(|&g| node.gpus[g].uuid.clone()).collect(),
                },
            ));
        }

        Ok(placements
            .into_iter()
            .map(|(node_pos, taken, placement)| {
                for gpu_pos in taken {
                    self.nodes[node_pos].gpus[gpu_pos].allocated = true;
                }
                placement
            })
            .collect())
    }

    fn explain(
        &self,
        request: PlacementRequest<'_>,
        exclusions: BTreeMap<&'static str, Exclusion>,
        feasible_nodes: usize,
        capacity_in_tasks: u64,
        placeable_tasks: usize,
    ) -> PendingReason {
        let tasks = request.tasks.max(1);
        let need = format!(
            "needs {tasks} task{} × {} GPU{}",
            plural(tasks),
            request.gpus_per_task,
            plural(request.gpus_per_task)
        );
        let mut parts = Vec::new();
        let mut list = Vec::new();
        for name in CONSTRAINT_ORDER {
            let Some(exclusion) = exclusions.get(name) else {
                continue;
            };
            let values: Vec<&str> = exclusion
                .values
                .iter()
                .map(String::as_str)
                .take(5)
                .collect();
            let more = exclusion.values.len().saturating_sub(values.len());
            let shown = if more > 0 {
                format!("{} and {more} more", values.join(", "))
            } else {
                values.join(", ")
            };
            let detail = match *name {
                "node_not_ready" => format!("nodes not ready: {shown}"),
                "provider" => format!("provider not allowed: {shown}"),
                "region" => format!("region not allowed: {shown}"),
                "max_price" => format!(
                    "over the bid of {}/h: {shown}",
                    format_usd(
                        request
                            .constraints
                            .max_price_per_gpu_hour_micro_usd
                            .unwrap_or(0)
                    )
                ),
                "generation" => format!("generation not allowed: {shown}"),
                "model" => format!("model not allowed: {shown}"),
                "min_gpu_memory" => format!(
                    "less than {} GiB per GPU: {shown}",
                    request.constraints.min_gpu_memory_bytes >> 30
                ),
                "unhealthy" => format!("unhealthy GPUs: {shown}"),
                "gpus_per_task" => format!(
                    "fewer than {} eligible GPUs on one node: {shown}",
                    request.gpus_per_task
                ),
                _ => format!("allocated to other jobs: {shown}"),
            };
            parts.push(format!(
                "{} node{} / {} GPU{} excluded ({detail})",
                exclusion.nodes.len(),
                plural(exclusion.nodes.len() as u32),
                exclusion.gpus,
                plural(exclusion.gpus)
            ));
            list.push(ConstraintExclusion {
                constraint: (*name).to_string(),
                nodes_excluded: exclusion.nodes.len() as u32,
                gpus_excluded: exclusion.gpus,
                detail,
            });
        }
        let (code, head) = if feasible_nodes == 0 {
            (
                reason::NO_FEASIBLE_NODES,
                format!("{need}: no node satisfies the constraints"),
            )
        } else if capacity_in_tasks < tasks as u64 {
            (
                reason::NO_FEASIBLE_NODES,
                format!(
                    "{need}: the {feasible_nodes} eligible node{} could hold at most {capacity_in_tasks} such task{} even when idle",
                    plural(feasible_nodes as u32),
                    plural(capacity_in_tasks as u32)
                ),
            )
        } else {
            (
                reason::INSUFFICIENT_FREE_GPUS,
                format!(
                    "{need}: {feasible_nodes} node{} could run it but only {placeable_tasks} task{} fit{} now; waiting for GPUs to free up",
                    plural(feasible_nodes as u32),
                    plural(placeable_tasks as u32),
                    if placeable_tasks == 1 { "s" } else { "" }
                ),
            )
        };
        let message = if parts.is_empty() {
            head
        } else {
            format!("{head}; {}", parts.join("; "))
        };
        PendingReason {
            code: code.to_string(),
            message,
            exclusions: list,
        }
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn generation_label(generation: i32) -> String {
    gpufleet_proto::v1::GpuGeneration::try_from(generation)
        .map(|g| {
            g.as_str_name()
                .trim_start_matches("GPU_GENERATION_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| format!("generation {generation}"))
}

/// `3930000` → `$3.93`.
pub fn format_usd(micro_usd: u64) -> String {
    let cents = (micro_usd + 5_000) / 10_000;
    format!("${}.{:02}", cents / 100, cents % 100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::GpuGeneration;

    fn node(
        id: &str,
        provider: &str,
        region: &str,
        price: u64,
        gpus: u32,
        generation: GpuGeneration,
    ) -> NodeSnapshot {
        NodeSnapshot {
            node_id: id.into(),
            provider: provider.into(),
            region: region.into(),
            price_per_gpu_hour_micro_usd: price,
            ready: true,
            gpus: (0..gpus)
                .map(|i| GpuSlot {
                    uuid: format!("GPU-{id}-{i}"),
                    index: i,
                    model: "H100-SXM-80GB".into(),
                    generation: generation as i32,
                    memory_bytes: 80 << 30,
                    healthy: true,
                    allocated: false,
                })
                .collect(),
        }
    }

    fn request(tasks: u32, gpus: u32, constraints: &JobConstraints) -> PlacementRequest<'_> {
        PlacementRequest {
            tasks,
            gpus_per_task: gpus,
            constraints,
        }
    }

    #[test]
    fn picks_cheapest_then_packs() {
        let mut fleet = FleetSnapshot::new(vec![
            node("a", "aws", "us-east-1", 3_930_000, 8, GpuGeneration::Hopper),
            node(
                "b",
                "lambda",
                "us-west-1",
                2_990_000,
                8,
                GpuGeneration::Hopper,
            ),
        ]);
        let c = JobConstraints::default();
        let first = fleet.place(request(1, 2, &c)).unwrap();
        assert_eq!(first[0].node_id, "b");
        assert_eq!(first[0].gpu_uuids, vec!["GPU-b-0", "GPU-b-1"]);
        let second = fleet.place(request(1, 2, &c)).unwrap();
        assert_eq!(second[0].gpu_uuids, vec!["GPU-b-2", "GPU-b-3"]);
    }

    #[test]
    fn gang_is_all_or_nothing() {
        let mut fleet = FleetSnapshot::new(vec![
            node("a", "aws", "r", 1, 8, GpuGeneration::Hopper),
            node("b", "aws", "r", 1, 4, GpuGeneration::Hopper),
        ]);
        let c = JobConstraints::default();
        let err = fleet.place(request(2, 8, &c)).unwrap_err();
        assert_eq!(err.code, reason::NO_FEASIBLE_NODES, "{}", err.message);
        assert!(
            err.message.contains("at most 1 such task"),
            "{}",
            err.message
        );
        assert!(
            fleet
                .nodes()
                .iter()
                .all(|n| n.gpus.iter().all(|g| !g.allocated)),
            "a failed gang must not hold GPUs"
        );
        let ok = fleet.place(request(2, 4, &c)).unwrap();
        assert_eq!(ok.len(), 2);
        let mut all: Vec<_> = ok.iter().flat_map(|p| p.gpu_uuids.clone()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 8, "no GPU twice");
    }

    #[test]
    fn explains_constraints() {
        let mut fleet = FleetSnapshot::new(vec![
            node("a", "aws", "us-east-1", 3_400_000, 8, GpuGeneration::Hopper),
            node(
                "b",
                "azure",
                "westeurope",
                1_000_000,
                8,
                GpuGeneration::Ampere,
            ),
        ]);
        let c = JobConstraints {
            generations: vec![GpuGeneration::Hopper as i32],
            max_price_per_gpu_hour_micro_usd: Some(3_000_000),
            ..Default::default()
        };
        let err = fleet.place(request(1, 8, &c)).unwrap_err();
        assert_eq!(err.code, reason::NO_FEASIBLE_NODES);
        let names: Vec<_> = err
            .exclusions
            .iter()
            .map(|e| e.constraint.as_str())
            .collect();
        assert_eq!(names, vec!["max_price", "generation"]);
        assert!(
            err.message.contains("us-east-1 at $3.40/h"),
            "{}",
            err.message
        );
        assert_eq!(err.exclusions[1].gpus_excluded, 8);
    }

    #[test]
    fn unready_and_unhealthy_are_never_used() {
        let mut a = node("a", "aws", "r", 1, 2, GpuGeneration::Hopper);
        a.ready = false;
        let mut b = node("b", "aws", "r", 2, 2, GpuGeneration::Hopper);
        b.gpus[0].healthy = false;
        let mut fleet = FleetSnapshot::new(vec![a, b]);
        let c = JobConstraints::default();
        let ok = fleet.place(request(1, 1, &c)).unwrap();
        assert_eq!(ok[0].gpu_uuids, vec!["GPU-b-1"]);
        let err = fleet.place(request(1, 1, &c)).unwrap_err();
        assert_eq!(err.code, reason::INSUFFICIENT_FREE_GPUS);
    }

    #[test]
    fn usd_formatting_rounds_to_cents() {
        assert_eq!(format_usd(3_930_000), "$3.93");
        assert_eq!(format_usd(0), "$0.00");
        assert_eq!(format_usd(1_234_999), "$1.23");
        assert_eq!(format_usd(1_235_000), "$1.24");
    }
}
