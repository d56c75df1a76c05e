//! Adapter between the controller's records and the pure scheduler: builds
//! its inputs from nodes and jobs, and keeps fair-share usage.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use gpufleet_proto::v1::{GpuHealth, Job, JobState, Node, NodeState, PlacementPolicy};

use crate::lifecycle::{is_desired, task_holds_gpus};
use crate::scheduler::{
    FairShare, GpuInput, JobInput, NodeInput, Policy, RunningInput, SchedulerConfig, TenantState,
};

pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ts_secs(ts: Option<&prost_types::Timestamp>) -> Option<u64> {
    ts.map(|t| t.seconds.max(0) as u64)
}

/// A node is schedulable when Ready, connected, and not cordoned.
pub fn node_input(node: &Node, connected: bool) -> NodeInput {
    let identity = node.identity.clone().unwrap_or_default();
    let mut gpus: Vec<&gpufleet_proto::v1::GpuStatus> = node.gpus.iter().collect();
    gpus.sort_by_key(|g| g.info.as_ref().map_or(0, |i| i.index));
    NodeInput {
        id: identity.node_id,
        provider: identity.provider,
        region: identity.region,
        price_per_gpu_hour_micro_usd: identity.price_per_gpu_hour_micro_usd,
        spot: identity.spot,
        schedulable: node.state() == NodeState::Ready && connected && !node.cordoned,
        gpus: gpus
            .into_iter()
            .filter_map(|g| {
                let info = g.info.as_ref()?;
                Some(GpuInput {
                    uuid: info.uuid.clone(),
                    model: info.model.clone(),
                    generation: info.generation,
                    memory_bytes: info.memory_bytes,
                    compute_capability: (
                        info.compute_capability_major,
                        info.compute_capability_minor,
                    ),
                    healthy: g.health() != GpuHealth::Unhealthy,
                })
            })
            .collect(),
        nvlink_groups: Vec::new(),
    }
}

/// Every task that holds GPUs, as running work.
pub fn running_inputs<'a>(jobs: impl Iterator<Item = &'a Job>) -> Vec<RunningInput> {
    let mut out = Vec::new();
    for job in jobs {
        let spec = job.spec.clone().unwrap_or_default();
        let evicting = !is_desired(job);
        for task in job.tasks.iter().filter(|t| task_holds_gpus(t)) {
            let start = ts_secs(task.started_at.as_ref()).or(ts_secs(job.scheduled_at.as_ref()));
            let expected_end = match (start, spec.max_runtime_seconds) {
                (Some(start), max) if max > 0 => Some(start + max as u64),
                _ => None,
            };
            out.push(RunningInput {
                job_id: job.id.clone(),
                tenant: spec.tenant.clone(),
                priority: spec.priority,
                preemptible: spec.preemptible,
                node_id: task.node_id.clone(),
                gpu_uuids: task.gpu_uuids.clone(),
                expected_end,
                evicting,
            });
        }
    }
    out
}

pub fn policy_of(policy: i32) -> Option<Policy> {
    match PlacementPolicy::try_from(policy).unwrap_or(PlacementPolicy::Unspecified) {
        PlacementPolicy::Cost => Some(Policy::Cost),
        PlacementPolicy::Pack => Some(Policy::Pack),
        PlacementPolicy::Spread => Some(Policy::Spread),
        PlacementPolicy::Unspecified => None,
    }
}

pub fn job_input(job: &Job) -> JobInput {
    let spec = job.spec.clone().unwrap_or_default();
    let submitted_at = job
        .created_at
        .map(|t| {
            (t.seconds.max(0) as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(t.nanos.max(0) as u64)
        })
        .unwrap_or(0);
    JobInput {
        id: job.id.clone(),
        tenant: spec.tenant.clone(),
        priority: spec.priority,
        preemptible: spec.preemptible,
        submitted_at,
        tasks: spec.tasks.max(1),
        gpus_per_task: spec.gpus_per_task,
        constraints: spec.constraints.clone().unwrap_or_default(),
        policy: policy_of(spec.placement_policy),
        max_runtime_secs: (spec.max_runtime_seconds > 0).then_some(spec.max_runtime_seconds as u64),
        not_before: ts_secs(job.not_before.as_ref()),
    }
}

/// GPUs held per tenant and generation, normalised GPUs per tenant.
pub fn tenant_allocation<'a>(
    jobs: impl Iterator<Item = &'a Job>,
    config: &SchedulerConfig,
) -> (HashMap<String, HashMap<i32, u32>>, HashMap<String, f64>) {
    let mut held: HashMap<String, HashMap<i32, u32>> = HashMap::new();
    let mut normalised: HashMap<String, f64> = HashMap::new();
    for job in jobs {
        let tenant = job
            .spec
            .as_ref()
            .map(|s| s.tenant.clone())
            .unwrap_or_default();
        for task in job.tasks.iter().filter(|t| task_holds_gpus(t)) {
            let gpus = task.gpu_uuids.len() as u32;
            *held
                .entry(tenant.clone())
                .or_default()
                .entry(task.generation)
                .or_insert(0) += gpus;
            *normalised.entry(tenant.clone()).or_insert(0.0) +=
                gpus as f64 * config.factor(task.generation);
        }
    }
    (held, normalised)
}

/// Rebuilds decayed usage from finished and running tasks, so fair share
/// survives a controller restart without a record of its own.
pub fn rebuild_fair_share<'a>(
    jobs: impl Iterator<Item = &'a Job>,
    config: &SchedulerConfig,
    half_life_secs: f64,
    now: u64,
) -> FairShare {
    let mut usage: HashMap<String, f64> = HashMap::new();
    for job in jobs {
        let tenant = job
            .spec
            .as_ref()
            .map(|s| s.tenant.clone())
            .unwrap_or_default();
        for task in &job.tasks {
            let Some(start) = ts_secs(task.started_at.as_ref()) else {
                continue;
            };
            let end = ts_secs(task.finished_at.as_ref()).unwrap_or(now).min(now);
            if end <= start {
                continue;
            }
            // Integral of gpus × 2^-(now - t)/h over [start, end], in hours.
            let gpus = task.gpu_uuids.len() as f64 * config.factor(task.generation);
            let h = half_life_secs.max(1.0);
            let k = std::f64::consts::LN_2 / h;
            let value = gpus / k
                * ((-k * (now - end) as f64).exp() - (-k * (now - start) as f64).exp())
                / 3600.0;
            *usage.entry(tenant.clone()).or_insert(0.0) += value;
        }
    }
    let mut fair = FairShare::new(half_life_secs);
    fair.restore(usage, now);
    fair
}

pub fn tenant_state(fair: &FairShare, held: HashMap<String, HashMap<i32, u32>>) -> TenantState {
    TenantState {
        usage: fair.usage().clone(),
        allocated: held,
    }
}

pub fn pending_jobs<'a>(jobs: impl Iterator<Item = &'a Job>) -> Vec<&'a Job> {
    jobs.filter(|j| j.state() == JobState::Pending).collect()
}
