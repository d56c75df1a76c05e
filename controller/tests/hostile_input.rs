//! Random and hostile input at validation and config loading: never a
//! panic, and every rejection names the field (or key) at fault.

use std::collections::HashMap;

use gpufleet_controller::config::ControllerConfig;
use gpufleet_controller::error::ControllerError;
use gpufleet_controller::validate::{self, ModelFacts, SubmitRules};
use gpufleet_proto::v1::{JobConstraints, JobSpec, RetryPolicy, WorkloadSpec};
use proptest::prelude::*;

fn rules() -> SubmitRules {
    SubmitRules {
        models: vec![
            ModelFacts {
                name: "H100-SXM-80GB".into(),
                generation: 6,
                memory_bytes: 80 << 30,
                compute_capability: (9, 0),
            },
            ModelFacts {
                name: "L4".into(),
                generation: 5,
                memory_bytes: 24 << 30,
                compute_capability: (8, 9),
            },
        ],
        tenants: Vec::new(),
        queues: vec!["default".into()],
    }
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9-]{1,12}",
        ".{0,80}",
        Just("../../etc/passwd".to_string()),
        Just("a\u{0}b".to_string()),
        Just("x".repeat(70_000)),
    ]
}

fn spec_strategy() -> impl Strategy<Value = JobSpec> {
    (
        (
            any_text(),
            any_text(),
            any::<u32>(),
            any::<u32>(),
            any::<i32>(),
        ),
        (
            prop::collection::vec(any::<i32>(), 0..3),
            prop::collection::vec(any_text(), 0..3),
            any::<u64>(),
            prop::collection::vec(any_text(), 0..3),
            prop::collection::vec(any_text(), 0..3),
            any::<i32>(),
            any::<i32>(),
        ),
        (
            prop::collection::vec(any_text(), 0..4),
            prop::collection::hash_map(any_text(), any_text(), 0..3),
        ),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<i32>(),
            any_text(),
            any_text(),
        ),
    )
        .prop_map(
            |(
                (name, tenant, tasks, gpus, priority),
                (generations, models, memory, providers, regions, min_generation, locality),
                (argv, env),
                (runtime, retries, node_retries, backoff, policy, queue, class),
            )| JobSpec {
                name,
                tenant,
                tasks,
                gpus_per_task: gpus,
                priority,
                queue,
                workload_class: class,
                max_runtime_seconds: runtime,
                placement_policy: policy,
                retry: Some(RetryPolicy {
                    max_retries_on_failure: retries,
                    max_retries_on_node_loss: node_retries,
                    backoff_seconds: backoff,
                }),
                constraints: Some(JobConstraints {
                    generations,
                    models,
                    min_gpu_memory_bytes: memory,
                    providers,
                    regions,
                    min_generation,
                    locality,
                    ..Default::default()
                }),
                workload: Some(WorkloadSpec {
                    argv,
                    env,
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    #[test]
    fn job_specs_are_accepted_or_refused_by_field(spec in spec_strategy()) {
        match validate::job_spec(spec, &rules()) {
            Ok(valid) => {
                // What passes is within every documented limit.
                prop_assert!(valid.gpus_per_task >= 1 && valid.gpus_per_task <= validate::MAX_GPUS_PER_TASK);
                prop_assert!(valid.tasks >= 1 && valid.tasks <= validate::MAX_TASKS);
                prop_assert!((0..=validate::MAX_PRIORITY).contains(&valid.priority));
                prop_assert!(!valid.workload.unwrap_or_default().argv.is_empty());
            }
            Err(ControllerError::InvalidArgument { field, message }) => {
                prop_assert!(field.starts_with("spec"), "field {field:?}: {message}");
                prop_assert!(!message.is_empty());
            }
            Err(other) => prop_assert!(false, "unexpected error kind: {other:?}"),
        }
    }

    #[test]
    fn ids_never_panic(id in ".{0,40}") {
        let _ = validate::job_id("job_id", &id);
        let _ = validate::node_id("node_id", &id);
        let _ = gpufleet_core::parse_generation(&id);
    }

    #[test]
    fn config_files_are_loaded_or_refused_with_a_reason(text in prop_oneof![
        ".{0,200}",
        "(listen|data_dir|node_lost_after|default_policy|queues|usage_retention) = \"[a-z0-9:./ ]{0,20}\"",
        "\\[tenants\\.[a-z]{1,5}\\]\nweight = -?[0-9]{1,4}\\.?[0-9]?",
        "\\[generation_factors\\]\n[a-z]{1,8} = [0-9]{1,3}\\.[0-9]",
    ]) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let path = dir.path().join("controller.toml");
        std::fs::write(&path, &text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let argv = [std::ffi::OsStr::new("gpufleet-controller"), std::ffi::OsStr::new("--config"), path.as_os_str()];
        if let Err(e) = ControllerConfig::load(argv, &HashMap::new()) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

mod agent_messages {
    use std::sync::Arc;

    use gpufleet_controller::Controller;
    use gpufleet_controller::config::ControllerConfig;
    use gpufleet_controller::error::ControllerError;
    use gpufleet_controller::store::SledStore;
    use gpufleet_controller::telemetry::MemoryRollupStore;
    use gpufleet_proto::v1::{AgentHello, GpuInfo, GpuSample, NodeIdentity, WorkloadStatus};
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            "[a-z0-9.-]{1,10}",
            ".{0,30}",
            Just("node-a".to_string())
        ]
    }

    fn hello() -> impl Strategy<Value = AgentHello> {
        (
            text(),
            text(),
            text(),
            prop::collection::vec((text(), any::<u32>(), any::<i32>(), any::<u64>()), 0..4),
            prop::collection::vec((text(), text(), any::<i32>(), any::<u32>()), 0..3),
        )
            .prop_map(|(node_id, provider, region, gpus, workloads)| AgentHello {
                identity: Some(NodeIdentity {
                    node_id,
                    provider,
                    region,
                    ..Default::default()
                }),
                gpus: gpus
                    .into_iter()
                    .map(|(uuid, index, generation, memory_bytes)| GpuInfo {
                        uuid,
                        index,
                        generation,
                        memory_bytes,
                        ..Default::default()
                    })
                    .collect(),
                workloads: workloads
                    .into_iter()
                    .map(
                        |(allocation_id, job_id, state, task_index)| WorkloadStatus {
                            allocation_id,
                            job_id,
                            state,
                            task_index,
                            ..Default::default()
                        },
                    )
                    .collect(),
                ..Default::default()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Hostile hellos, statuses and samples: refused with a reason or
        /// absorbed, never a panic.
        #[test]
        fn hostile_agents_never_crash_the_controller(
            hellos in prop::collection::vec(hello(), 1..4),
            statuses in prop::collection::vec((text(), text(), any::<i32>()), 0..5),
            samples in prop::collection::vec((text(), prop::option::of(any::<u32>()), prop::option::of(any::<u64>()), any::<i64>()), 0..6),
        ) {
            let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
            let store = SledStore::open(dir.path()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let controller = Controller::open(
                ControllerConfig::for_data_dir(dir.path()),
                Box::new(store),
                Arc::new(MemoryRollupStore::default()),
                Vec::new(),
            )
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
            for hello in hellos {
                let node = hello.identity.as_ref().map(|i| i.node_id.clone()).unwrap_or_default();
                match controller.connect_agent(hello) {
                    Ok(_session) => {}
                    Err(ControllerError::InvalidArgument { field, .. }) => prop_assert!(field.starts_with("hello")),
                    Err(ControllerError::AlreadyExists(m)) | Err(ControllerError::PermissionDenied(m)) => {
                        prop_assert!(!m.is_empty())
                    }
                    Err(other) => prop_assert!(false, "unexpected: {other:?}"),
                }
                for (allocation_id, job_id, state) in &statuses {
                    let status = WorkloadStatus {
                        allocation_id: allocation_id.clone(),
                        job_id: job_id.clone(),
                        state: *state,
                        ..Default::default()
                    };
                    prop_assert!(controller.record_workload_status(&node, status).is_ok());
                }
                let batch: Vec<GpuSample> = samples
                    .iter()
                    .map(|(uuid, util, mem, secs)| GpuSample {
                        uuid: uuid.clone(),
                        gpu_utilization_percent: *util,
                        memory_used_bytes: *mem,
                        sampled_at: Some(prost_types::Timestamp { seconds: *secs, nanos: 0 }),
                        ..Default::default()
                    })
                    .collect();
                controller.record_telemetry(&node, batch);
                let _ = controller.accept_seq(&node, 7);
            }
            prop_assert!(controller.schedule_pass().is_ok());
            prop_assert!(controller.check_leases().is_ok());
        }
    }
}
