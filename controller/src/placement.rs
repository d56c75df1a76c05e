//! The controller's adapter to the pure scheduler (`gpufleet-scheduler`):
//! converts protobuf nodes, jobs and constraints into the scheduler's own
//! types, its generations and verdicts back into wire values and
//! `PendingReason` / `RegionExplanation` messages, and rebuilds fair-share
//! usage from stored jobs. Every proto ↔ scheduler conversion lives here,
//! so the scheduler never sees the wire format and the rest of the
//! controller never sees the scheduler's internals.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use gpufleet_proto::v1 as proto;
use gpufleet_proto::v1::{
    GpuGeneration, GpuHealth, Job, JobConstraints, JobSpec, JobState, Node, NodeState,
    PlacementPolicy, TaskStatus,
};
use gpufleet_scheduler::explain::{self, Explanation};
use gpufleet_scheduler::{
    Constraints, FairShare, Fleet, Generation, GpuInput, GpuUnit, JobInput, Locality, MigInput,
    NodeInput, PendingReason, Policy, RunningInput, SchedulerConfig, TenantState,
};

use crate::lifecycle::{is_desired, task_holds_gpus};

pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ts_secs(ts: Option<&prost_types::Timestamp>) -> Option<u64> {
    ts.map(|t| t.seconds.max(0) as u64)
}

/// A node is schedulable when Ready, connected, and not cordoned.
pub fn node_input(node: &Node, connected: bool, block_label: &str) -> NodeInput {
    let identity = node.identity.clone().unwrap_or_default();
    // An empty key turns the block preference off (an empty label key
    // never names a block).
    let block = if block_label.is_empty() {
        String::new()
    } else {
        identity
            .labels
            .get(block_label)
            .cloned()
            .unwrap_or_default()
    };
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
                    generation: generation_from_wire(info.generation),
                    memory_bytes: info.memory_bytes,
                    compute_capability: (
                        info.compute_capability_major,
                        info.compute_capability_minor,
                    ),
                    healthy: g.health() != GpuHealth::Unhealthy,
                    mig_enabled: info.mig_enabled,
                    mig_instances: info
                        .mig_instances
                        .iter()
                        .map(|m| MigInput {
                            uuid: m.uuid.clone(),
                            profile: m.profile.clone(),
                            memory_bytes: m.memory_bytes,
                            sm_share_milli: m.sm_share_milli,
                        })
                        .collect(),
                })
            })
            .collect(),
        nvlink_groups: nvlink_groups(node),
        // Measured per (provider, region, generation); the controller's
        // fleet index fills it in (state::interruptions).
        interruption_milli_per_hour: 0,
        oci: node
            .identity
            .as_ref()
            .is_some_and(|i| i.runtimes.iter().any(|r| r == "oci")),
        block,
    }
}

/// Names shown in a placement note before "and N more".
const NOTE_NAMES: usize = 8;

/// What a gang's placement had to give up, in words (empty when nothing):
/// the scheduler spans regions or network blocks only when no single one
/// has room for every task, so spanning is always "had to". `block_label`
/// is the label that names blocks (empty: blocks are not considered).
pub fn placement_note(
    placements: &[gpufleet_scheduler::TaskPlacement],
    block_label: &str,
) -> String {
    if placements.len() < 2 {
        return String::new();
    }
    fn distinct<'a>(values: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
        let mut out: Vec<&str> = Vec::new();
        for v in values {
            if !out.contains(&v) {
                out.push(v);
            }
        }
        out
    }
    fn list(names: &[&str]) -> String {
        let shown: Vec<&str> = names.iter().take(NOTE_NAMES).copied().collect();
        let mut text = shown.join(", ");
        if names.len() > NOTE_NAMES {
            text.push_str(&format!(" and {} more", names.len() - NOTE_NAMES));
        }
        text
    }
    let tasks = placements.len();
    let regions = distinct(placements.iter().map(|p| p.region.as_str()));
    let blocks: Vec<&str> = distinct(placements.iter().map(|p| p.block.as_str()))
        .into_iter()
        .map(|b| if b.is_empty() { "(unlabelled)" } else { b })
        .collect();
    let labelled = !block_label.is_empty() && placements.iter().any(|p| !p.block.is_empty());
    let spans_blocks = labelled && blocks.len() > 1;
    if regions.len() > 1 {
        let mut note = format!(
            "the gang spans regions {}: no single region had room for all {tasks} tasks",
            list(&regions)
        );
        if spans_blocks {
            note.push_str(&format!(
                " (network blocks by {block_label}: {})",
                list(&blocks)
            ));
        }
        note
    } else if spans_blocks {
        format!(
            "the gang spans network blocks (by {block_label}) {}: no single block had room for all {tasks} tasks",
            list(&blocks)
        )
    } else {
        String::new()
    }
}

/// GPUs (by position in index order) that NVLink connects, directly or
/// through a shared NVSwitch. Empty when no GPU reports links (unknown).
fn nvlink_groups(node: &Node) -> Vec<Vec<u32>> {
    let mut infos: Vec<&gpufleet_proto::v1::GpuInfo> =
        node.gpus.iter().filter_map(|g| g.info.as_ref()).collect();
    infos.sort_by_key(|i| i.index);
    if infos.iter().all(|i| i.nvlink_peers.is_empty()) {
        return Vec::new();
    }
    let position: HashMap<&str, usize> = infos
        .iter()
        .enumerate()
        .map(|(p, i)| (i.uuid.as_str(), p))
        .collect();
    let mut parent: Vec<usize> = (0..infos.len()).collect();
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    let mut switches: HashMap<&str, usize> = HashMap::new();
    for (p, info) in infos.iter().enumerate() {
        for peer in &info.nvlink_peers {
            let other = if !peer.remote_gpu_uuid.is_empty() {
                position.get(peer.remote_gpu_uuid.as_str()).copied()
            } else if !peer.remote_pci_bus_id.is_empty() {
                // Every GPU on one NVSwitch reaches every other.
                Some(*switches.entry(peer.remote_pci_bus_id.as_str()).or_insert(p))
            } else {
                None
            };
            if let Some(o) = other {
                let (a, b) = (find(&mut parent, p), find(&mut parent, o));
                parent[a] = b;
            }
        }
    }
    let mut groups: HashMap<usize, Vec<u32>> = HashMap::new();
    for p in 0..infos.len() {
        let root = find(&mut parent, p);
        groups.entry(root).or_default().push(p as u32);
    }
    let mut out: Vec<Vec<u32>> = groups.into_values().filter(|g| g.len() > 1).collect();
    out.sort();
    out
}

/// Every task that holds GPUs, as running work.
pub fn running_inputs<'a>(jobs: impl Iterator<Item = &'a Job>) -> Vec<RunningInput> {
    let mut out = Vec::new();
    let no_spec = JobSpec::default();
    // Called on every pass over every job ever kept, most of them finished:
    // look before cloning anything.
    for job in jobs.filter(|j| j.tasks.iter().any(task_holds_gpus)) {
        let spec = job.spec.as_ref().unwrap_or(&no_spec);
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
                // A MIG instance is found by its uuid; only a share is
                // charged to a GPU it shares.
                share_milli: if task.mig_profile.is_empty() {
                    task.gpu_share_milli
                } else {
                    0
                },
                memory_bytes: task.gpu_memory_limit_bytes,
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
    let no_spec = JobSpec::default();
    let spec = job.spec.as_ref().unwrap_or(&no_spec);
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
        unit: unit_of(spec),
        constraints: Constraints {
            // An image job runs only where an agent has the oci runtime.
            require_oci: spec
                .workload
                .as_ref()
                .is_some_and(|w| w.container.is_some()),
            ..spec
                .constraints
                .as_ref()
                .map(constraints)
                .unwrap_or_default()
        },
        policy: policy_of(spec.placement_policy),
        max_runtime_secs: (spec.max_runtime_seconds > 0).then_some(spec.max_runtime_seconds as u64),
        not_before: ts_secs(job.not_before.as_ref()),
    }
}

/// What one task of a job takes: whole GPUs, a share, or a MIG instance.
pub fn unit_of(spec: &JobSpec) -> GpuUnit {
    if spec.mig || !spec.mig_profile.is_empty() {
        GpuUnit::Mig {
            profile: (!spec.mig_profile.is_empty()).then(|| spec.mig_profile.clone()),
            min_memory_bytes: spec.gpu_memory_bytes,
            min_sm_share_milli: spec.gpu_share_milli,
        }
    } else if spec.gpu_share_milli > 0 || spec.gpu_memory_bytes > 0 {
        GpuUnit::Share {
            milli: spec.gpu_share_milli,
            memory_bytes: spec.gpu_memory_bytes,
        }
    } else {
        GpuUnit::Whole
    }
}

/// Thousandths of GPUs a task holds: 1000 per whole GPU, else its share
/// (a MIG instance's share of its GPU's SMs). What fair share, quotas and
/// the ledger count.
pub fn task_milli_gpus(task: &TaskStatus) -> u64 {
    if task.gpu_share_milli > 0 {
        task.gpu_share_milli as u64
    } else {
        task.gpu_uuids.len() as u64 * 1000
    }
}

/// Thousandths of GPUs held per tenant and generation, normalised GPUs per
/// tenant.
pub fn tenant_allocation<'a>(
    jobs: impl Iterator<Item = &'a Job>,
    config: &SchedulerConfig,
) -> (
    HashMap<String, HashMap<Generation, u64>>,
    HashMap<String, f64>,
) {
    let mut held: HashMap<String, HashMap<Generation, u64>> = HashMap::new();
    let mut normalised: HashMap<String, f64> = HashMap::new();
    for job in jobs.filter(|j| j.tasks.iter().any(task_holds_gpus)) {
        let tenant = job
            .spec
            .as_ref()
            .map(|s| s.tenant.clone())
            .unwrap_or_default();
        for task in job.tasks.iter().filter(|t| task_holds_gpus(t)) {
            let milli = task_milli_gpus(task);
            let generation = generation_from_wire(task.generation);
            *held
                .entry(tenant.clone())
                .or_default()
                .entry(generation)
                .or_insert(0) += milli;
            *normalised.entry(tenant.clone()).or_insert(0.0) +=
                milli as f64 / 1000.0 * config.factor(generation);
        }
    }
    (held, normalised)
}

/// Rebuilds decayed usage from finished and running tasks, so fair share
/// survives a controller restart without a record of its own.
/// Folds one job's GPU time into decayed per-tenant usage (GPU-hours, each
/// moment weighted 2^-(now - t)/half-life), for rebuilding fair share from
/// stored jobs one at a time.
pub fn add_fair_share_usage(
    usage: &mut HashMap<String, f64>,
    job: &Job,
    config: &SchedulerConfig,
    half_life_secs: f64,
    now: u64,
) {
    let tenant = job.spec.as_ref().map(|s| s.tenant.as_str()).unwrap_or("");
    for task in &job.tasks {
        let Some(start) = ts_secs(task.started_at.as_ref()) else {
            continue;
        };
        let end = ts_secs(task.finished_at.as_ref()).unwrap_or(now).min(now);
        if end <= start {
            continue;
        }
        // Integral of gpus × 2^-(now - t)/h over [start, end], in hours.
        let gpus = task_milli_gpus(task) as f64 / 1000.0
            * config.factor(generation_from_wire(task.generation));
        let h = half_life_secs.max(1.0);
        let k = std::f64::consts::LN_2 / h;
        let value = gpus / k
            * ((-k * (now - end) as f64).exp() - (-k * (now - start) as f64).exp())
            / 3600.0;
        *usage.entry(tenant.to_string()).or_insert(0.0) += value;
    }
}

pub fn tenant_state(
    fair: &FairShare,
    held: HashMap<String, HashMap<Generation, u64>>,
) -> TenantState {
    TenantState {
        usage: fair.usage().clone(),
        allocated: held,
    }
}

pub fn pending_jobs<'a>(jobs: impl Iterator<Item = &'a Job>) -> Vec<&'a Job> {
    jobs.filter(|j| j.state() == JobState::Pending).collect()
}

pub fn generation_from_proto(generation: GpuGeneration) -> Generation {
    match generation {
        GpuGeneration::Unspecified => Generation::Unspecified,
        GpuGeneration::Pascal => Generation::Pascal,
        GpuGeneration::Volta => Generation::Volta,
        GpuGeneration::Turing => Generation::Turing,
        GpuGeneration::Ampere => Generation::Ampere,
        GpuGeneration::Ada => Generation::Ada,
        GpuGeneration::Hopper => Generation::Hopper,
        GpuGeneration::Blackwell => Generation::Blackwell,
    }
}

pub fn generation_to_proto(generation: Generation) -> GpuGeneration {
    match generation {
        Generation::Unspecified => GpuGeneration::Unspecified,
        Generation::Pascal => GpuGeneration::Pascal,
        Generation::Volta => GpuGeneration::Volta,
        Generation::Turing => GpuGeneration::Turing,
        Generation::Ampere => GpuGeneration::Ampere,
        Generation::Ada => GpuGeneration::Ada,
        Generation::Hopper => GpuGeneration::Hopper,
        Generation::Blackwell => GpuGeneration::Blackwell,
    }
}

/// The configuration name of a generation: `hopper`, `ampere`, …
pub fn generation_name(generation: Generation) -> &'static str {
    gpufleet_core::generation_name(generation_to_proto(generation))
}

/// A `GpuGeneration` wire value; one this build does not know (a newer
/// agent's) counts as `Unspecified`. Submitted constraints never carry
/// one: validation rejects them.
pub fn generation_from_wire(value: i32) -> Generation {
    GpuGeneration::try_from(value).map_or(Generation::Unspecified, generation_from_proto)
}

pub fn generation_wire(generation: Generation) -> i32 {
    generation_to_proto(generation) as i32
}

fn locality_from_wire(value: i32) -> Locality {
    match proto::Locality::try_from(value).unwrap_or(proto::Locality::Unspecified) {
        proto::Locality::Unspecified => Locality::Unspecified,
        proto::Locality::Any => Locality::Any,
        proto::Locality::Region => Locality::Region,
        proto::Locality::Provider => Locality::Provider,
    }
}

/// A job's constraints as the scheduler reads them.
pub fn constraints(c: &JobConstraints) -> Constraints {
    Constraints {
        generations: c
            .generations
            .iter()
            .map(|g| generation_from_wire(*g))
            .collect(),
        models: c.models.clone(),
        min_gpu_memory_bytes: c.min_gpu_memory_bytes,
        providers: c.providers.clone(),
        regions: c.regions.clone(),
        max_price_per_gpu_hour_micro_usd: c.max_price_per_gpu_hour_micro_usd,
        min_generation: match generation_from_wire(c.min_generation) {
            Generation::Unspecified => None,
            min => Some(min),
        },
        min_compute_capability: (
            c.min_compute_capability_major,
            c.min_compute_capability_minor,
        ),
        exclude_providers: c.exclude_providers.clone(),
        exclude_regions: c.exclude_regions.clone(),
        preferred_regions: c.preferred_regions.clone(),
        allow_spot: match c.spot() {
            proto::SpotPolicy::Unspecified => c.allow_spot,
            proto::SpotPolicy::Never => false,
            proto::SpotPolicy::Allowed | proto::SpotPolicy::Required => true,
        },
        require_spot: c.spot() == proto::SpotPolicy::Required,
        max_interruption_milli_per_hour: c
            .max_interruptions_per_hour
            .map(|rate| (rate.max(0.0) * 1000.0).round().min(u32::MAX as f64) as u32),
        locality: locality_from_wire(c.locality),
        require_nvlink: c.require_nvlink,
        // From the workload, not the constraints message: see `job_input`.
        require_oci: false,
    }
}

/// The pending reason a pass records on a job: the verdict, explained
/// against the fleet as the pass left it.
pub fn explain_pending(
    fleet: &Fleet,
    job: &JobInput,
    reason: PendingReason,
) -> proto::PendingReason {
    let explanation = explain::explain(fleet, job, Some(reason));
    pending_reason(reason.code(), explanation).0
}

/// `ExplainJob`'s answer for a job whose stored pending code is `code`
/// (empty, or a code this version does not know, explains the request
/// without a verdict): the reason (carrying `code` as given), the regions,
/// and the summary.
pub fn explain_job(
    fleet: &Fleet,
    job: &JobInput,
    code: &str,
) -> (proto::PendingReason, Vec<proto::RegionExplanation>, String) {
    let explanation = explain::explain(fleet, job, PendingReason::from_code(code));
    pending_reason(code, explanation)
}

fn pending_reason(
    code: &str,
    explanation: Explanation,
) -> (proto::PendingReason, Vec<proto::RegionExplanation>, String) {
    let reason = proto::PendingReason {
        code: code.to_string(),
        message: explanation.message,
        exclusions: explanation
            .exclusions
            .into_iter()
            .map(|e| proto::ConstraintExclusion {
                constraint: e.constraint.name().to_string(),
                nodes_excluded: e.nodes_excluded,
                gpus_excluded: e.gpus_excluded,
                detail: e.detail,
            })
            .collect(),
    };
    let regions = explanation
        .regions
        .into_iter()
        .map(|r| proto::RegionExplanation {
            provider: r.provider,
            region: r.region,
            total_gpus: r.total_gpus,
            matching_gpus: r.matching_gpus,
            free_matching_gpus: r.free_matching_gpus,
            min_price_per_gpu_hour_micro_usd: r.min_price_per_gpu_hour_micro_usd,
            verdict: r.verdict.name().to_string(),
            detail: r.detail,
        })
        .collect();
    (reason, regions, explanation.summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::{GpuInfo, GpuStatus, NvLinkPeer};

    #[test]
    fn a_placement_note_says_what_a_gang_had_to_span() {
        let task = |region: &str, block: &str| gpufleet_scheduler::TaskPlacement {
            node_id: "n".into(),
            provider: "aws".into(),
            region: region.into(),
            block: block.into(),
            price_per_gpu_hour_micro_usd: 1,
            gpu_uuids: vec!["GPU-1".into()],
            generation: Generation::Hopper,
            share_milli: 0,
            memory_limit_bytes: 0,
            mig_profile: None,
        };
        let label = "topology.block";
        assert_eq!(placement_note(&[task("r1", "b1")], label), "", "one task");
        assert_eq!(
            placement_note(&[task("r1", "b1"), task("r1", "b1")], label),
            ""
        );
        assert_eq!(
            placement_note(&[task("r1", ""), task("r1", "")], label),
            "",
            "unlabelled nodes: nothing known to say"
        );
        assert_eq!(
            placement_note(&[task("r1", "b1"), task("r1", "b2"), task("r1", "")], label),
            "the gang spans network blocks (by topology.block) b1, b2, (unlabelled): no single block had room for all 3 tasks"
        );
        assert_eq!(
            placement_note(&[task("r1", "b1"), task("r1", "b2")], ""),
            "",
            "blocks off"
        );
        assert_eq!(
            placement_note(&[task("r1", "b1"), task("r2", "b1")], label),
            "the gang spans regions r1, r2: no single region had room for all 2 tasks"
        );
        assert_eq!(
            placement_note(&[task("r1", "b1"), task("r2", "b2")], label),
            "the gang spans regions r1, r2: no single region had room for all 2 tasks (network blocks by topology.block: b1, b2)"
        );
        let many: Vec<_> = (0..10).map(|i| task(&format!("r{i}"), "")).collect();
        assert!(
            placement_note(&many, label)
                .starts_with("the gang spans regions r0, r1, r2, r3, r4, r5, r6, r7 and 2 more:"),
            "{}",
            placement_note(&many, label)
        );
    }

    #[test]
    fn generations_convert_both_ways() {
        for generation in Generation::ALL {
            assert_eq!(
                generation_from_wire(generation_wire(generation)),
                generation
            );
        }
        assert_eq!(generation_from_wire(99), Generation::Unspecified);
    }

    #[test]
    fn constraints_carry_every_field() {
        let wire = JobConstraints {
            generations: vec![GpuGeneration::Hopper as i32, GpuGeneration::Ampere as i32],
            models: vec!["H100-SXM-80GB".into()],
            min_gpu_memory_bytes: 40 << 30,
            providers: vec!["aws".into()],
            regions: vec!["r1".into()],
            max_price_per_gpu_hour_micro_usd: Some(2_000_000),
            min_generation: GpuGeneration::Ampere as i32,
            min_compute_capability_major: 8,
            min_compute_capability_minor: 6,
            exclude_providers: vec!["gcp".into()],
            exclude_regions: vec!["r2".into()],
            preferred_regions: vec!["r3".into()],
            allow_spot: true,
            locality: proto::Locality::Provider as i32,
            require_nvlink: true,
            ..Default::default()
        };
        assert_eq!(
            constraints(&wire),
            Constraints {
                generations: vec![Generation::Hopper, Generation::Ampere],
                models: vec!["H100-SXM-80GB".into()],
                min_gpu_memory_bytes: 40 << 30,
                providers: vec!["aws".into()],
                regions: vec!["r1".into()],
                max_price_per_gpu_hour_micro_usd: Some(2_000_000),
                min_generation: Some(Generation::Ampere),
                min_compute_capability: (8, 6),
                exclude_providers: vec!["gcp".into()],
                exclude_regions: vec!["r2".into()],
                preferred_regions: vec!["r3".into()],
                allow_spot: true,
                locality: Locality::Provider,
                require_nvlink: true,
                ..Default::default()
            }
        );
        assert_eq!(
            constraints(&JobConstraints::default()),
            Constraints::default(),
            "unset on the wire is unset for the scheduler"
        );
    }

    #[test]
    fn explained_reasons_keep_their_codes_and_names() {
        let fleet = Fleet::build(&[], &[]);
        let job = JobInput {
            tasks: 2,
            gpus_per_task: 8,
            ..Default::default()
        };
        let reason = explain_pending(&fleet, &job, PendingReason::NoNodes);
        assert_eq!(reason.code, "NO_NODES");
        assert_eq!(reason.message, "no nodes have registered; start an agent");
        let (reason, regions, summary) = explain_job(&fleet, &job, "SOMETHING_OLDER");
        assert_eq!(
            reason.code, "SOMETHING_OLDER",
            "a stored code is kept as given"
        );
        assert!(regions.is_empty());
        assert_eq!(
            summary,
            "needs 2 tasks × 8 GPUs in one region: not enough free GPUs now; waiting for running work to end"
        );
    }

    fn gpu(index: u32, peers: Vec<NvLinkPeer>) -> GpuStatus {
        GpuStatus {
            info: Some(GpuInfo {
                index,
                uuid: format!("GPU-{index}"),
                nvlink_peers: peers,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn to_gpu(uuid: u32) -> NvLinkPeer {
        NvLinkPeer {
            remote_gpu_uuid: format!("GPU-{uuid}"),
            ..Default::default()
        }
    }

    fn to_switch(bus: &str) -> NvLinkPeer {
        NvLinkPeer {
            remote_pci_bus_id: bus.into(),
            ..Default::default()
        }
    }

    #[test]
    fn nvlink_groups_from_direct_links_and_switches() {
        let node = Node {
            gpus: vec![
                gpu(0, vec![to_gpu(1)]),
                gpu(1, vec![to_gpu(0)]),
                gpu(2, vec![to_switch("sw0")]),
                gpu(3, vec![to_switch("sw0")]),
                gpu(4, vec![to_switch("sw0")]),
                gpu(5, vec![]),
            ],
            ..Default::default()
        };
        assert_eq!(nvlink_groups(&node), vec![vec![0, 1], vec![2, 3, 4]]);
        let unknown = Node {
            gpus: vec![gpu(0, vec![]), gpu(1, vec![])],
            ..Default::default()
        };
        assert!(nvlink_groups(&unknown).is_empty());
    }
}
