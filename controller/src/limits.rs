//! Every limit on what a client or an agent may send the controller, in
//! one place, and the byte budget of what it answers. `validate.rs` and the
//! service adapters enforce them with errors that name the field and the
//! limit; `docs/limits.md` has one row per constant, with its reason.
//! Workload limits (argv, env, working dir) and the response budget are
//! shared with the agent and live in `gpufleet_core::limits`.

use gpufleet_proto::v1::{AgentHello, Job, Node};

use crate::error::{ControllerError, Result};

pub use gpufleet_core::limits::{
    ARG_BYTES, ARGV_BYTES, ARGV_COUNT, ENV_BYTES, ENV_COUNT, ENV_KEY_BYTES, ENV_VALUE_BYTES,
    RESPONSE_BUDGET_BYTES, Violation, WORKING_DIR_BYTES,
};

/// Job names and token names: shown in one table cell.
pub const NAME_BYTES: usize = 128;
/// Tenants, queues, workload classes, providers and regions (`[A-Za-z0-9._-]`).
pub const LABEL_BYTES: usize = 64;
/// Ids a client passes (node ids, GPU UUIDs, token ids): long enough for
/// any UUID or host name.
pub const ID_BYTES: usize = 128;
/// Cancel and cordon reasons: one line of text.
pub const REASON_BYTES: usize = 1024;
/// Entries in one constraint list (models, providers, regions, their
/// exclusions and preferences, generations).
pub const CONSTRAINT_LIST_COUNT: usize = 64;
/// A page token: this controller's tokens are under 64 bytes.
pub const PAGE_TOKEN_BYTES: usize = 256;
/// Entries in a filter of states or a `group_by` list.
pub const FILTER_COUNT: usize = 16;
/// A telemetry metric name.
pub const METRIC_BYTES: usize = 64;

/// GPUs (with MIG instances) one agent may report.
pub const HELLO_GPUS: usize = 256;
/// Profiles in one MIG layout (`SetMigLayout`): a GPU has 7 slices.
pub const MIG_LAYOUT_PROFILES: usize = 7;
/// MIG instances one GPU may report (NVML has at most 7 today).
pub const HELLO_MIG_INSTANCES: usize = 16;
/// `spec.mig_profile`, e.g. `1g.10gb` (NVML's longest are under 20 bytes).
pub const MIG_PROFILE_BYTES: usize = 32;
/// Workloads one agent may report in its hello.
pub const HELLO_WORKLOADS: usize = 4096;
/// A node's labels.
pub const NODE_LABEL_COUNT: usize = 64;
/// A node label's key.
pub const NODE_LABEL_KEY_BYTES: usize = 128;
/// A node label's value.
pub const NODE_LABEL_VALUE_BYTES: usize = 256;
/// Descriptive text an agent reports (zone, instance type, host name,
/// versions, GPU name, model, serial, PCI bus id).
pub const AGENT_TEXT_BYTES: usize = 256;
/// Workload runtimes one agent advertises (`process`, `oci`): room to grow.
pub const RUNTIMES: usize = 8;
/// A workload status message from an agent; longer ones are clipped (a
/// status is never refused: it carries state).
pub const STATUS_MESSAGE_BYTES: usize = 4096;
/// Stored free text served back (job and task messages, cordon reasons).
/// Records written before these limits existed may hold more: they are
/// clipped when served, so that one of them cannot break a listing.
pub const SERVED_TEXT_BYTES: usize = 4096;

impl From<Violation> for ControllerError {
    fn from(v: Violation) -> Self {
        ControllerError::invalid(v.field, v.message)
    }
}

pub fn check_bytes(field: &str, value: &str, max: usize) -> Result<()> {
    Ok(gpufleet_core::limits::check_bytes(field, value, max)?)
}

pub fn check_count(field: &str, count: usize, max: usize) -> Result<()> {
    Ok(gpufleet_core::limits::check_count(field, count, max)?)
}

/// A name: printable, at most [`NAME_BYTES`].
pub fn check_name(field: &str, value: &str) -> Result<()> {
    Ok(gpufleet_core::limits::check_name(field, value, NAME_BYTES)?)
}

/// A reason: one printable line, at most [`REASON_BYTES`].
pub fn check_reason(field: &str, value: &str) -> Result<()> {
    Ok(gpufleet_core::limits::check_free_text(
        field,
        value,
        REASON_BYTES,
    )?)
}

/// A filter value or id that is compared, never stored: at most `max`
/// bytes and printable (it may be echoed back in an error).
pub fn check_filter(field: &str, value: &str, max: usize) -> Result<()> {
    Ok(gpufleet_core::limits::check_free_text(field, value, max)?)
}

/// The limits of an agent's hello: everything in it is stored in the
/// node's record and served by `ListNodes`.
pub fn check_hello(hello: &AgentHello) -> Result<()> {
    if let Some(identity) = &hello.identity {
        for (field, value) in [
            ("provider", &identity.provider),
            ("region", &identity.region),
        ] {
            check_filter(&format!("hello.identity.{field}"), value, LABEL_BYTES)?;
        }
        for (field, value) in [
            ("zone", &identity.zone),
            ("instance_type", &identity.instance_type),
            ("hostname", &identity.hostname),
            ("address", &identity.address),
        ] {
            check_filter(&format!("hello.identity.{field}"), value, AGENT_TEXT_BYTES)?;
        }
        check_count(
            "hello.identity.labels",
            identity.labels.len(),
            NODE_LABEL_COUNT,
        )?;
        check_count("hello.identity.runtimes", identity.runtimes.len(), RUNTIMES)?;
        for (i, runtime) in identity.runtimes.iter().enumerate() {
            check_filter(
                &format!("hello.identity.runtimes[{i}]"),
                runtime,
                LABEL_BYTES,
            )?;
        }
        for (key, value) in &identity.labels {
            let shown: String = key.chars().take(64).collect();
            check_filter(
                &format!("hello.identity.labels[{shown:?}] (key)"),
                key,
                NODE_LABEL_KEY_BYTES,
            )?;
            check_filter(
                &format!("hello.identity.labels[{shown:?}]"),
                value,
                NODE_LABEL_VALUE_BYTES,
            )?;
        }
    }
    for (field, value) in [
        ("agent_version", &hello.agent_version),
        ("driver_version", &hello.driver_version),
    ] {
        check_filter(&format!("hello.{field}"), value, AGENT_TEXT_BYTES)?;
    }
    check_count("hello.gpus", hello.gpus.len(), HELLO_GPUS)?;
    for (i, gpu) in hello.gpus.iter().enumerate() {
        for (field, value) in [
            ("uuid", &gpu.uuid),
            ("name", &gpu.name),
            ("model", &gpu.model),
            ("pci_bus_id", &gpu.pci_bus_id),
            ("serial", &gpu.serial),
            ("driver_version", &gpu.driver_version),
            ("cuda_driver_version", &gpu.cuda_driver_version),
        ] {
            check_filter(&format!("hello.gpus[{i}].{field}"), value, AGENT_TEXT_BYTES)?;
        }
        check_count(
            &format!("hello.gpus[{i}].nvlink_peers"),
            gpu.nvlink_peers.len(),
            HELLO_GPUS,
        )?;
        check_count(
            &format!("hello.gpus[{i}].mig_instances"),
            gpu.mig_instances.len(),
            HELLO_MIG_INSTANCES,
        )?;
        for (j, m) in gpu.mig_instances.iter().enumerate() {
            for (field, value) in [("uuid", &m.uuid), ("profile", &m.profile)] {
                check_filter(
                    &format!("hello.gpus[{i}].mig_instances[{j}].{field}"),
                    value,
                    AGENT_TEXT_BYTES,
                )?;
            }
        }
    }
    check_count(
        "hello.refused_mig_layouts",
        hello.refused_mig_layouts.len(),
        HELLO_GPUS,
    )?;
    for (i, l) in hello.refused_mig_layouts.iter().enumerate() {
        check_filter(
            &format!("hello.refused_mig_layouts[{i}].gpu_uuid"),
            &l.gpu_uuid,
            AGENT_TEXT_BYTES,
        )?;
        check_filter(
            &format!("hello.refused_mig_layouts[{i}].error"),
            &l.error,
            AGENT_TEXT_BYTES,
        )?;
        check_count(
            &format!("hello.refused_mig_layouts[{i}].profiles"),
            l.profiles.len(),
            MIG_LAYOUT_PROFILES,
        )?;
        for p in &l.profiles {
            check_filter(
                &format!("hello.refused_mig_layouts[{i}].profiles"),
                p,
                AGENT_TEXT_BYTES,
            )?;
        }
    }
    check_count("hello.workloads", hello.workloads.len(), HELLO_WORKLOADS)?;
    Ok(())
}

/// A job as served: stored free text clipped to [`SERVED_TEXT_BYTES`]
/// (see there).
pub fn clip_job(job: &mut Job) {
    let clip = gpufleet_core::limits::clip;
    clip(&mut job.message, SERVED_TEXT_BYTES);
    clip(&mut job.placement_note, SERVED_TEXT_BYTES);
    if let Some(spec) = &mut job.spec {
        clip(&mut spec.name, NAME_BYTES);
    }
    if let Some(reason) = &mut job.pending_reason {
        clip(&mut reason.message, SERVED_TEXT_BYTES);
    }
    for task in &mut job.tasks {
        clip(&mut task.message, SERVED_TEXT_BYTES);
    }
    for line in &mut job.history {
        clip(line, SERVED_TEXT_BYTES);
    }
}

/// A node as served: its cordon reason clipped (see [`SERVED_TEXT_BYTES`]).
pub fn clip_node(node: &mut Node) {
    gpufleet_core::limits::clip(&mut node.cordon_reason, SERVED_TEXT_BYTES);
}

/// Refuses a response whose encoded size passes [`RESPONSE_BUDGET_BYTES`]
/// when it cannot be paged: `fix` says how to ask for less.
pub fn check_response(what: &str, encoded_len: usize, fix: &str) -> Result<()> {
    if encoded_len > RESPONSE_BUDGET_BYTES {
        return Err(ControllerError::ResourceExhausted(format!(
            "{what} would be {encoded_len} bytes, over the {RESPONSE_BUDGET_BYTES}-byte response budget (gRPC clients accept 4 MiB by default); {fix}"
        )));
    }
    Ok(())
}

/// How many of `entries`, in order, fit in the response budget (at least
/// one, so that a page always moves forward).
pub fn fitting<T: prost::Message>(entries: &[T]) -> usize {
    let mut total = 0;
    for (i, entry) in entries.iter().enumerate() {
        // Tag and length prefix of a repeated field: at most 1 + 10 bytes.
        total += entry.encoded_len() + 11;
        if total > RESPONSE_BUDGET_BYTES && i > 0 {
            return i;
        }
    }
    entries.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::{GpuInfo, NodeIdentity, TaskStatus};

    fn field_of(err: ControllerError) -> String {
        match err {
            ControllerError::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn reasons_are_one_bounded_printable_line() {
        assert!(check_reason("reason", "node maintenance").is_ok());
        let err = check_reason("reason", &"x".repeat(15 << 20)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("reason: {} bytes; at most {REASON_BYTES}", 15 << 20)
        );
        assert_eq!(
            field_of(check_reason("reason", "a\nb").unwrap_err()),
            "reason"
        );
        assert_eq!(
            field_of(check_reason("reason", "\x1b]0;owned\x07").unwrap_err()),
            "reason"
        );
    }

    #[test]
    fn hello_fields_are_bounded() {
        let hello = |identity: NodeIdentity, gpus: Vec<GpuInfo>| AgentHello {
            identity: Some(identity),
            gpus,
            ..Default::default()
        };
        let base = NodeIdentity {
            node_id: "n1".into(),
            provider: "aws".into(),
            region: "us-east-1".into(),
            ..Default::default()
        };
        assert!(check_hello(&hello(base.clone(), Vec::new())).is_ok());
        let mut id = base.clone();
        id.hostname = "h".repeat(AGENT_TEXT_BYTES + 1);
        assert_eq!(
            field_of(check_hello(&hello(id, Vec::new())).unwrap_err()),
            "hello.identity.hostname"
        );
        let mut id = base.clone();
        for i in 0..=NODE_LABEL_COUNT {
            id.labels.insert(format!("k{i}"), "v".into());
        }
        assert_eq!(
            field_of(check_hello(&hello(id, Vec::new())).unwrap_err()),
            "hello.identity.labels"
        );
        let mut id = base.clone();
        id.labels
            .insert("team".into(), "v".repeat(NODE_LABEL_VALUE_BYTES + 1));
        assert_eq!(
            field_of(check_hello(&hello(id, Vec::new())).unwrap_err()),
            "hello.identity.labels[\"team\"]"
        );
        let gpu = GpuInfo {
            uuid: "GPU-1".into(),
            name: "NVIDIA\x1b[2J".into(),
            ..Default::default()
        };
        assert_eq!(
            field_of(check_hello(&hello(base.clone(), vec![gpu])).unwrap_err()),
            "hello.gpus[0].name"
        );
        let mig = |n: usize, profile: &str| GpuInfo {
            uuid: "GPU-1".into(),
            mig_enabled: true,
            mig_instances: vec![
                gpufleet_proto::v1::MigInstance {
                    uuid: "MIG-1".into(),
                    profile: profile.into(),
                    ..Default::default()
                };
                n
            ],
            ..Default::default()
        };
        assert!(check_hello(&hello(base.clone(), vec![mig(7, "1g.10gb")])).is_ok());
        assert_eq!(
            field_of(
                check_hello(&hello(
                    base.clone(),
                    vec![mig(HELLO_MIG_INSTANCES + 1, "1g.10gb")]
                ))
                .unwrap_err()
            ),
            "hello.gpus[0].mig_instances"
        );
        assert_eq!(
            field_of(check_hello(&hello(base.clone(), vec![mig(1, "1g\n")])).unwrap_err()),
            "hello.gpus[0].mig_instances[0].profile"
        );
        let mut refusing = hello(base.clone(), vec![]);
        refusing.refused_mig_layouts = vec![gpufleet_proto::v1::MigLayout {
            gpu_uuid: "GPU-1".into(),
            profiles: vec!["1g.10gb".into()],
            error: "no\nway".into(),
        }];
        assert_eq!(
            field_of(check_hello(&refusing).unwrap_err()),
            "hello.refused_mig_layouts[0].error"
        );
        let gpus = vec![GpuInfo::default(); HELLO_GPUS + 1];
        assert_eq!(
            field_of(check_hello(&hello(base, gpus)).unwrap_err()),
            "hello.gpus"
        );
    }

    #[test]
    fn stored_text_is_clipped_when_served() {
        let mut job = Job {
            message: format!("cancelled: {}", "x".repeat(15 << 20)),
            tasks: vec![TaskStatus {
                message: "y".repeat(SERVED_TEXT_BYTES * 2),
                ..Default::default()
            }],
            ..Default::default()
        };
        clip_job(&mut job);
        assert!(job.message.len() <= SERVED_TEXT_BYTES);
        assert!(job.message.starts_with("cancelled: xxx"));
        assert!(job.tasks[0].message.len() <= SERVED_TEXT_BYTES);
    }

    #[test]
    fn responses_fit_the_budget() {
        let job = |bytes: usize| Job {
            message: "m".repeat(bytes),
            ..Default::default()
        };
        let jobs: Vec<Job> = (0..10).map(|_| job(1 << 20)).collect();
        assert_eq!(fitting(&jobs), 2, "three 1 MiB jobs pass 3 MiB");
        assert_eq!(fitting(&[job(5 << 20)]), 1, "one always fits");
        assert_eq!(fitting(&jobs[..2]), 2);
        assert!(check_response("the list", 5 << 20, "filter it").is_err());
        assert!(check_response("the list", 1 << 20, "filter it").is_ok());
    }
}
