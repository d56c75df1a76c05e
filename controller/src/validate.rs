//! Validation of client input into a normalised form. Every error names the
//! field at fault and the accepted values.

use gpufleet_proto::v1::{GpuGeneration, JobSpec};

use crate::error::{ControllerError, Result};
use crate::limits;

/// No GPU server has been built with more GPUs than this in one node
/// (DGX-2 / HGX-2: 16). Larger jobs use more tasks.
pub const MAX_GPUS_PER_TASK: u32 = 16;
pub const MAX_TASKS: u32 = 4096;
const RESERVED_ENV: &[&str] = &["CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"];
/// What the agent sets for every task of a gang (docs/workloads.md,
/// "Multi-node gangs"): a gang's own value would silently break its
/// rendezvous, so it is refused. Single-task jobs may set them.
const GANG_ENV: &[&str] = &[
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "LOCAL_WORLD_SIZE",
];

/// A job id as this controller issues them: `job-` and 16 lowercase hex
/// digits (`history::new_job_id`), or 12 for jobs submitted before ids
/// began with their submit time.
pub fn job_id(field: &str, id: &str) -> Result<()> {
    let ok = id.strip_prefix("job-").is_some_and(|digits| {
        matches!(digits.len(), 12 | 16)
            && digits
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(ControllerError::invalid(
            field,
            format!(
                "{:?} is not a job id; job ids look like job-06b0bdffc3f2a9c0",
                shown(id)
            ),
        ))
    }
}

/// Node ids become keys and file names: keep them to a safe alphabet.
pub fn node_id(field: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= limits::ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && id != "."
        && id != "..";
    if ok {
        Ok(())
    } else {
        Err(ControllerError::invalid(
            field,
            format!(
                "{:?} is not a valid node id: use 1-{} letters, digits, '-', '_' or '.'",
                shown(id),
                limits::ID_BYTES
            ),
        ))
    }
}

/// Tenant and queue names.
pub fn tenant_name(name: &str) -> Result<()> {
    label("tenant", name, "tenant name")
}

/// At most 64 characters of a value echoed in an error, so that an
/// oversized value is not sent back whole.
fn shown(value: &str) -> String {
    if value.len() <= 64 {
        value.to_string()
    } else {
        let cut: String = value.chars().take(64).collect();
        format!("{cut}… ({} bytes)", value.len())
    }
}

/// Labels (tenants, queues, workload classes, providers, regions):
/// 1-[`limits::LABEL_BYTES`] of `[A-Za-z0-9._-]`.
fn label(field: &str, value: &str, what: &str) -> Result<()> {
    let ok = !value.is_empty()
        && value.len() <= limits::LABEL_BYTES
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ControllerError::invalid(
            field,
            format!(
                "{:?} is not a valid {what}: use 1-{} letters, digits, '-', '_' or '.'",
                shown(value),
                limits::LABEL_BYTES
            ),
        ))
    }
}

/// Facts about a GPU model that constraints are checked against.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    pub name: String,
    pub generation: i32,
    pub memory_bytes: u64,
    pub compute_capability: (u32, u32),
}

/// What a submission is checked against besides its own consistency.
#[derive(Debug, Clone, Default)]
pub struct SubmitRules {
    pub models: Vec<ModelFacts>,
    /// Configured tenants; empty accepts any valid name.
    pub tenants: Vec<String>,
    pub queues: Vec<String>,
}

pub const MAX_PRIORITY: i32 = 1000;
const MAX_RUNTIME_SECS: u32 = 30 * 24 * 3600;
const MAX_RETRIES: u32 = 100;
const MAX_BACKOFF_SECS: u32 = 24 * 3600;

/// A share of a GPU or a MIG instance (docs/gpus.md): one per task, so
/// `gpus_per_task` is 1 (filled in when left 0).
fn gpu_unit(spec: &mut JobSpec, rules: &SubmitRules) -> Result<()> {
    let mig = spec.mig || !spec.mig_profile.is_empty();
    let share = spec.gpu_share_milli > 0 || spec.gpu_memory_bytes > 0;
    if !mig && !share {
        return Ok(());
    }
    let field = if mig {
        if spec.mig_profile.is_empty() {
            "spec.mig"
        } else {
            "spec.mig_profile"
        }
    } else if spec.gpu_share_milli > 0 {
        "spec.gpu_share_milli"
    } else {
        "spec.gpu_memory_bytes"
    };
    match spec.gpus_per_task {
        0 => spec.gpus_per_task = 1,
        1 => {}
        n => {
            return Err(ControllerError::invalid(
                "spec.gpus_per_task",
                format!(
                    "is {n}, but {field} asks for one unit per task: leave gpus_per_task at 1 and use tasks for more"
                ),
            ));
        }
    }
    if !spec.mig_profile.is_empty() {
        limits::check_filter(
            "spec.mig_profile",
            &spec.mig_profile,
            limits::MIG_PROFILE_BYTES,
        )?;
        let ok = spec
            .mig_profile
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-' | '_'));
        if !ok {
            return Err(ControllerError::invalid(
                "spec.mig_profile",
                format!(
                    "{:?} is not a MIG profile name; use NVML's, such as 1g.10gb or 3g.40gb",
                    spec.mig_profile
                ),
            ));
        }
        spec.mig_profile = spec.mig_profile.to_ascii_lowercase();
        spec.mig = true;
    }
    let top = if mig { 1000 } else { 999 };
    if spec.gpu_share_milli > top {
        let fix = if mig {
            "a MIG instance holds at most its whole GPU's SMs (1000)"
        } else {
            "a share is 1 to 999 thousandths of a GPU; for whole GPUs leave it 0 and use gpus_per_task"
        };
        return Err(ControllerError::invalid(
            "spec.gpu_share_milli",
            format!("is {}; {fix}", spec.gpu_share_milli),
        ));
    }
    let largest = rules.models.iter().map(|m| m.memory_bytes).max();
    if let Some(largest) = largest
        && spec.gpu_memory_bytes > largest
    {
        return Err(ControllerError::invalid(
            "spec.gpu_memory_bytes",
            format!(
                "is {} bytes, more than any known GPU model has ({largest} bytes); ask for less or for whole GPUs",
                spec.gpu_memory_bytes
            ),
        ));
    }
    Ok(())
}

/// Validates a submitted spec and fills defaults (tenant, tasks, queue).
pub fn job_spec(mut spec: JobSpec, rules: &SubmitRules) -> Result<JobSpec> {
    let known_models: Vec<String> = rules.models.iter().map(|m| m.name.clone()).collect();
    let known_models = known_models.as_slice();
    limits::check_name("spec.name", &spec.name)?;
    if spec.tenant.is_empty() {
        spec.tenant = "default".to_string();
    }
    label("spec.tenant", &spec.tenant, "tenant")?;
    if !rules.tenants.is_empty() && !rules.tenants.contains(&spec.tenant) {
        return Err(ControllerError::invalid(
            "spec.tenant",
            format!(
                "{:?} is not a configured tenant; accepted: {}",
                spec.tenant,
                rules.tenants.join(", ")
            ),
        ));
    }
    if spec.queue.is_empty() {
        spec.queue = "default".to_string();
    }
    label("spec.queue", &spec.queue, "queue name")?;
    if !rules.queues.is_empty() && !rules.queues.contains(&spec.queue) {
        return Err(ControllerError::invalid(
            "spec.queue",
            format!(
                "{:?} is not a configured queue; accepted: {}",
                spec.queue,
                rules.queues.join(", ")
            ),
        ));
    }
    if !spec.workload_class.is_empty() {
        label(
            "spec.workload_class",
            &spec.workload_class,
            "workload class",
        )?;
    }
    if !(0..=MAX_PRIORITY).contains(&spec.priority) {
        return Err(ControllerError::invalid(
            "spec.priority",
            format!(
                "is {}; accepted: 0 to {MAX_PRIORITY} (higher runs first)",
                spec.priority
            ),
        ));
    }
    if spec.max_runtime_seconds > MAX_RUNTIME_SECS {
        return Err(ControllerError::invalid(
            "spec.max_runtime_seconds",
            format!(
                "is {}; at most {MAX_RUNTIME_SECS} (30 days)",
                spec.max_runtime_seconds
            ),
        ));
    }
    if let Some(retry) = &spec.retry {
        for (field, value) in [
            (
                "spec.retry.max_retries_on_failure",
                retry.max_retries_on_failure,
            ),
            (
                "spec.retry.max_retries_on_node_loss",
                retry.max_retries_on_node_loss,
            ),
        ] {
            if value > MAX_RETRIES {
                return Err(ControllerError::invalid(
                    field,
                    format!("is {value}; at most {MAX_RETRIES}"),
                ));
            }
        }
        if retry.backoff_seconds > MAX_BACKOFF_SECS {
            return Err(ControllerError::invalid(
                "spec.retry.backoff_seconds",
                format!(
                    "is {}; at most {MAX_BACKOFF_SECS} (one day)",
                    retry.backoff_seconds
                ),
            ));
        }
    }
    if gpufleet_proto::v1::PlacementPolicy::try_from(spec.placement_policy).is_err() {
        return Err(ControllerError::invalid(
            "spec.placement_policy",
            format!(
                "{} is not a policy; accepted: cost, pack, spread",
                spec.placement_policy
            ),
        ));
    }
    if spec.tasks == 0 {
        spec.tasks = 1;
    }
    if spec.tasks > MAX_TASKS {
        return Err(ControllerError::invalid(
            "spec.tasks",
            format!(
                "is {}; at most {MAX_TASKS} tasks per job are accepted",
                spec.tasks
            ),
        ));
    }
    gpu_unit(&mut spec, rules)?;
    if spec.gpus_per_task == 0 {
        return Err(ControllerError::invalid(
            "spec.gpus_per_task",
            "must be at least 1 (pass --gpus N)",
        ));
    }
    if spec.gpus_per_task > MAX_GPUS_PER_TASK {
        return Err(ControllerError::invalid(
            "spec.gpus_per_task",
            format!(
                "is {}, but no GPU server holds more than {MAX_GPUS_PER_TASK} GPUs; split the job into tasks (--tasks) of at most {MAX_GPUS_PER_TASK} GPUs",
                spec.gpus_per_task
            ),
        ));
    }

    let constraints = spec.constraints.get_or_insert_with(Default::default);
    for (name, count) in [
        ("generations", constraints.generations.len()),
        ("models", constraints.models.len()),
        ("providers", constraints.providers.len()),
        ("exclude_providers", constraints.exclude_providers.len()),
        ("regions", constraints.regions.len()),
        ("exclude_regions", constraints.exclude_regions.len()),
        ("preferred_regions", constraints.preferred_regions.len()),
    ] {
        limits::check_count(
            &format!("spec.constraints.{name}"),
            count,
            limits::CONSTRAINT_LIST_COUNT,
        )?;
    }
    if gpufleet_proto::v1::SpotPolicy::try_from(constraints.spot).is_err() {
        return Err(ControllerError::invalid(
            "spec.constraints.spot",
            format!(
                "{} is not a spot policy; accepted: 1 (never), 2 (allowed), 3 (required)",
                constraints.spot
            ),
        ));
    }
    if let Some(rate) = constraints.max_interruptions_per_hour
        && !(rate.is_finite() && rate >= 0.0)
    {
        return Err(ControllerError::invalid(
            "spec.constraints.max_interruptions_per_hour",
            format!("{rate} is not a rate of 0 or more interruptions per node-hour, like 0.05"),
        ));
    }
    for (i, value) in constraints.generations.iter().enumerate() {
        let known = GpuGeneration::try_from(*value)
            .ok()
            .filter(|g| *g != GpuGeneration::Unspecified);
        if known.is_none() {
            return Err(ControllerError::invalid(
                format!("spec.constraints.generations[{i}]"),
                format!(
                    "{value} is not a known GPU generation; accepted: {}",
                    gpufleet_core::generation_names().join(", ")
                ),
            ));
        }
    }
    for (i, model) in constraints.models.iter_mut().enumerate() {
        limits::check_filter(
            &format!("spec.constraints.models[{i}]"),
            model,
            limits::LABEL_BYTES,
        )?;
        match known_models.iter().find(|m| m.eq_ignore_ascii_case(model)) {
            Some(canonical) => *model = canonical.clone(),
            None => {
                return Err(ControllerError::invalid(
                    format!("spec.constraints.models[{i}]"),
                    format!(
                        "{model:?} is not a known GPU model; accepted: {}",
                        known_models.join(", ")
                    ),
                ));
            }
        }
    }
    for (list, name) in [
        (&constraints.providers, "providers"),
        (&constraints.exclude_providers, "exclude_providers"),
        (&constraints.regions, "regions"),
        (&constraints.exclude_regions, "exclude_regions"),
        (&constraints.preferred_regions, "preferred_regions"),
    ] {
        for (i, value) in list.iter().enumerate() {
            let what = if name.contains("provider") {
                "provider name"
            } else {
                "region name"
            };
            label(&format!("spec.constraints.{name}[{i}]"), value, what)?;
        }
    }
    if !constraints.providers.is_empty()
        && constraints
            .providers
            .iter()
            .all(|p| constraints.exclude_providers.contains(p))
    {
        return Err(ControllerError::invalid(
            "spec.constraints.exclude_providers",
            "excludes every allowed provider, so nothing could ever run the job",
        ));
    }
    if !constraints.regions.is_empty()
        && constraints
            .regions
            .iter()
            .all(|r| constraints.exclude_regions.contains(r))
    {
        return Err(ControllerError::invalid(
            "spec.constraints.exclude_regions",
            "excludes every allowed region, so nothing could ever run the job",
        ));
    }
    for (i, region) in constraints.preferred_regions.iter().enumerate() {
        if constraints.exclude_regions.contains(region)
            || (!constraints.regions.is_empty() && !constraints.regions.contains(region))
        {
            return Err(ControllerError::invalid(
                format!("spec.constraints.preferred_regions[{i}]"),
                format!(
                    "{region:?} is excluded by the region constraints, so preferring it has no effect"
                ),
            ));
        }
    }
    if constraints.min_generation != 0
        && GpuGeneration::try_from(constraints.min_generation)
            .ok()
            .filter(|g| *g != GpuGeneration::Unspecified)
            .is_none()
    {
        return Err(ControllerError::invalid(
            "spec.constraints.min_generation",
            format!(
                "{} is not a known GPU generation; accepted: {}",
                constraints.min_generation,
                gpufleet_core::generation_names().join(", ")
            ),
        ));
    }
    if gpufleet_proto::v1::Locality::try_from(constraints.locality).is_err() {
        return Err(ControllerError::invalid(
            "spec.constraints.locality",
            format!(
                "{} is not a locality; accepted: any, region, provider",
                constraints.locality
            ),
        ));
    }
    // Hardware constraints must leave at least one model that exists.
    let fits = |m: &ModelFacts| {
        (constraints.generations.is_empty() || constraints.generations.contains(&m.generation))
            && (constraints.min_generation == 0 || m.generation >= constraints.min_generation)
            && m.memory_bytes >= constraints.min_gpu_memory_bytes
            && m.compute_capability
                >= (
                    constraints.min_compute_capability_major,
                    constraints.min_compute_capability_minor,
                )
    };
    for (i, name) in constraints.models.iter().enumerate() {
        if let Some(model) = rules.models.iter().find(|m| &m.name == name)
            && !fits(model)
        {
            return Err(ControllerError::invalid(
                format!("spec.constraints.models[{i}]"),
                format!(
                    "{name} ({}, {} GiB, compute capability {}.{}) contradicts the generation, memory or compute-capability constraints",
                    gpufleet_core::generation_name(
                        GpuGeneration::try_from(model.generation)
                            .unwrap_or(GpuGeneration::Unspecified)
                    ),
                    model.memory_bytes >> 30,
                    model.compute_capability.0,
                    model.compute_capability.1
                ),
            ));
        }
    }
    if constraints.models.is_empty() && !rules.models.is_empty() && !rules.models.iter().any(fits) {
        let largest = rules
            .models
            .iter()
            .map(|m| m.memory_bytes)
            .max()
            .unwrap_or(0);
        return Err(ControllerError::invalid(
            "spec.constraints",
            format!(
                "no GPU model satisfies the generation, minimum memory and compute-capability constraints together (the largest GPU has {} GiB)",
                largest >> 30
            ),
        ));
    }

    let workload = spec.workload.get_or_insert_with(Default::default);
    if let Some(container) = &workload.container {
        // An image job's argv is the container's command; empty runs the
        // image's own. Its directory is the container's --workdir.
        if !workload.working_dir.is_empty() {
            return Err(ControllerError::invalid(
                "spec.workload.working_dir",
                "is a host directory and cannot be used with an image; give the container's directory with --workdir (spec.workload.container.workdir)",
            ));
        }
        if container.image.is_empty() {
            return Err(ControllerError::invalid(
                "spec.workload.container.image",
                "is required for a container job: give it with --image",
            ));
        }
    } else if workload.argv.is_empty() {
        return Err(ControllerError::invalid(
            "spec.workload.argv",
            "must not be empty: give the command to run after `--`, e.g. `gpufleet jobs submit --gpus 1 -- python train.py`",
        ));
    }
    if workload.argv.first().is_some_and(String::is_empty) {
        return Err(ControllerError::invalid(
            "spec.workload.argv[0]",
            "the program to run must not be an empty string",
        ));
    }
    gpufleet_core::limits::check_workload("spec.workload", workload)?;
    for key in workload.env.keys() {
        let valid_key = !key.is_empty()
            && !key.as_bytes()[0].is_ascii_digit()
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_key {
            return Err(ControllerError::invalid(
                format!("spec.workload.env[{key:?}]"),
                "variable names use letters, digits and '_' and do not start with a digit",
            ));
        }
        if RESERVED_ENV.contains(&key.as_str()) || key.starts_with("GPUFLEET_") {
            return Err(ControllerError::invalid(
                format!("spec.workload.env[{key:?}]"),
                "is set by the agent from the allocation and cannot be overridden",
            ));
        }
        if spec.tasks > 1 && GANG_ENV.contains(&key.as_str()) {
            return Err(ControllerError::invalid(
                format!("spec.workload.env[{key:?}]"),
                "is set by the agent for every task of a gang (a job of 2 or more tasks) and cannot be overridden; see docs/workloads.md, \"Multi-node gangs\"",
            ));
        }
    }
    Ok(spec)
}

/// A cancel reason: one printable line of at most [`limits::REASON_BYTES`].
pub fn cancel_reason(reason: &str) -> Result<()> {
    limits::check_reason("reason", reason)
}

/// A cordon reason, under the same rule as a cancel reason.
/// A MIG layout: 1 to 7 profile names like `3g.40gb` or `1c.3g.40gb`
/// (whether they fit the GPU is the agent's to say; it knows the model).
pub fn mig_profiles(field: &str, profiles: &[String]) -> Result<()> {
    limits::check_count(field, profiles.len(), limits::MIG_LAYOUT_PROFILES)?;
    for p in profiles {
        let number = |s: &str, suffix: &str| {
            s.strip_suffix(suffix).is_some_and(|n| {
                !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit())
            })
        };
        let parts: Vec<&str> = p.split('.').collect();
        let ok = match parts.as_slice() {
            [g, m] => number(g, "g") && number(m, "gb"),
            [c, g, m] => number(c, "c") && number(g, "g") && number(m, "gb"),
            _ => false,
        };
        if !ok {
            return Err(ControllerError::invalid(
                field,
                format!(
                    "{:?} is not a MIG profile; write <slices>g.<memory>gb, e.g. 1g.10gb",
                    p.chars().take(32).collect::<String>()
                ),
            ));
        }
    }
    Ok(())
}

pub fn cordon_reason(reason: &str) -> Result<()> {
    limits::check_reason("reason", reason)
}

/// A page token passed back: bounded, printable.
pub fn page_token(token: &str) -> Result<()> {
    limits::check_filter("page_token", token, limits::PAGE_TOKEN_BYTES)
}

/// A list of enum values to filter or group by.
pub fn filter_list(field: &str, count: usize) -> Result<()> {
    limits::check_count(field, count, limits::FILTER_COUNT)
}

/// A tenant, provider or region filter: empty (no filter) or a label.
pub fn label_filter(field: &str, value: &str) -> Result<()> {
    if value.is_empty() || value == "*" {
        return Ok(());
    }
    limits::check_filter(field, value, limits::LABEL_BYTES)
}

/// An id compared against stored ones (GPU UUIDs, token ids, models):
/// bounded, printable.
pub fn id_filter(field: &str, value: &str) -> Result<()> {
    limits::check_filter(field, value, limits::ID_BYTES)
}

#[cfg(test)]
mod tests;
