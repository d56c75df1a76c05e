use super::*;
use gpufleet_proto::v1::{JobConstraints, WorkloadSpec};

fn models() -> SubmitRules {
    SubmitRules {
        models: vec![
            ModelFacts {
                name: "H100-SXM-80GB".into(),
                generation: GpuGeneration::Hopper as i32,
                memory_bytes: 80 << 30,
                compute_capability: (9, 0),
            },
            ModelFacts {
                name: "A100-SXM-80GB".into(),
                generation: GpuGeneration::Ampere as i32,
                memory_bytes: 80 << 30,
                compute_capability: (8, 0),
            },
        ],
        tenants: Vec::new(),
        queues: vec!["default".into()],
    }
}

fn spec(gpus: u32, argv: &[&str]) -> JobSpec {
    JobSpec {
        gpus_per_task: gpus,
        workload: Some(WorkloadSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn field_of(err: ControllerError) -> String {
    match err {
        ControllerError::InvalidArgument { field, .. } => field,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn gpu_units_are_checked_naming_the_field() {
    let mut s = spec(0, &["x"]);
    s.gpu_share_milli = 470;
    s.gpu_memory_bytes = 12 << 30;
    let s = job_spec(s, &models()).unwrap();
    assert_eq!(s.gpus_per_task, 1, "one share per task");
    let mut s = spec(1, &["x"]);
    s.mig_profile = "1G.10GB".into();
    let s = job_spec(s, &models()).unwrap();
    assert_eq!((s.mig_profile.as_str(), s.mig), ("1g.10gb", true));
    for (mutate, field) in [
        (
            (|s: &mut JobSpec| s.gpu_share_milli = 1000) as fn(&mut JobSpec),
            "spec.gpu_share_milli",
        ),
        (
            |s: &mut JobSpec| s.gpu_memory_bytes = 81 << 30,
            "spec.gpu_memory_bytes",
        ),
        (
            |s: &mut JobSpec| {
                s.gpu_share_milli = 500;
                s.gpus_per_task = 2;
            },
            "spec.gpus_per_task",
        ),
        (
            |s: &mut JobSpec| s.mig_profile = "1g 10gb".into(),
            "spec.mig_profile",
        ),
        (
            |s: &mut JobSpec| s.mig_profile = "x".repeat(33),
            "spec.mig_profile",
        ),
    ] {
        let mut s = spec(1, &["x"]);
        mutate(&mut s);
        assert_eq!(field_of(job_spec(s, &models()).unwrap_err()), field);
    }
}

#[test]
fn fills_defaults() {
    let s = job_spec(spec(2, &["true"]), &models()).unwrap();
    assert_eq!(s.tenant, "default");
    assert_eq!(s.tasks, 1);
}

#[test]
fn rejects_bad_input_naming_the_field() {
    assert_eq!(
        field_of(job_spec(spec(0, &["x"]), &models()).unwrap_err()),
        "spec.gpus_per_task"
    );
    assert_eq!(
        field_of(job_spec(spec(17, &["x"]), &models()).unwrap_err()),
        "spec.gpus_per_task"
    );
    assert_eq!(
        field_of(job_spec(spec(1, &[]), &models()).unwrap_err()),
        "spec.workload.argv"
    );
    let mut s = spec(1, &["x"]);
    s.constraints = Some(JobConstraints {
        generations: vec![99],
        ..Default::default()
    });
    let err = job_spec(s, &models()).unwrap_err();
    assert!(err.to_string().contains("hopper"), "{err}");
    let mut s = spec(1, &["x"]);
    s.constraints = Some(JobConstraints {
        models: vec!["Z9000".into()],
        ..Default::default()
    });
    let err = job_spec(s, &models()).unwrap_err();
    assert!(err.to_string().contains("H100-SXM-80GB"), "{err}");
    let mut s = spec(1, &["x"]);
    s.workload
        .as_mut()
        .unwrap()
        .env
        .insert("CUDA_VISIBLE_DEVICES".into(), "0".into());
    assert!(field_of(job_spec(s, &models()).unwrap_err()).contains("CUDA_VISIBLE_DEVICES"));
    // A gang's rendezvous variables are the agent's; a single task's
    // are its own.
    let mut s = spec(1, &["x"]);
    s.tasks = 2;
    s.workload
        .as_mut()
        .unwrap()
        .env
        .insert("MASTER_PORT".into(), "29500".into());
    assert!(field_of(job_spec(s, &models()).unwrap_err()).contains("MASTER_PORT"));
    let mut s = spec(1, &["x"]);
    s.workload
        .as_mut()
        .unwrap()
        .env
        .insert("MASTER_PORT".into(), "29500".into());
    assert!(job_spec(s, &models()).is_ok());
}

#[test]
fn an_image_job_may_leave_argv_empty_and_has_its_container_checked() {
    use gpufleet_proto::v1::{ContainerSpec, Mount};
    let image = |container: ContainerSpec| {
        let mut s = spec(1, &[]);
        s.workload.as_mut().unwrap().container = Some(container);
        s
    };
    let ok = ContainerSpec {
        image: "localhost/test:1".into(),
        ..Default::default()
    };
    job_spec(image(ok.clone()), &models()).unwrap();
    let mut no_image = image(ContainerSpec::default());
    assert_eq!(
        field_of(job_spec(no_image.clone(), &models()).unwrap_err()),
        "spec.workload.container.image"
    );
    no_image.workload.as_mut().unwrap().container = None;
    assert_eq!(
        field_of(job_spec(no_image, &models()).unwrap_err()),
        "spec.workload.argv"
    );
    let mut host_dir = image(ok.clone());
    host_dir.workload.as_mut().unwrap().working_dir = "/tmp".into();
    assert_eq!(
        field_of(job_spec(host_dir, &models()).unwrap_err()),
        "spec.workload.working_dir"
    );
    let bad_mount = ContainerSpec {
        mounts: vec![Mount {
            source: "data".into(),
            target: "/data".into(),
            read_only: false,
        }],
        ..ok
    };
    assert_eq!(
        field_of(job_spec(image(bad_mount), &models()).unwrap_err()),
        "spec.workload.container.mounts[0].source"
    );
}

#[test]
fn contradictions_are_rejected() {
    let mut s = spec(1, &["x"]);
    s.constraints = Some(JobConstraints {
        generations: vec![GpuGeneration::Hopper as i32],
        models: vec!["A100-SXM-80GB".into()],
        ..Default::default()
    });
    assert_eq!(
        field_of(job_spec(s, &models()).unwrap_err()),
        "spec.constraints.models[0]"
    );
    let mut s = spec(1, &["x"]);
    s.constraints = Some(JobConstraints {
        min_gpu_memory_bytes: 200 << 30,
        ..Default::default()
    });
    assert_eq!(
        field_of(job_spec(s, &models()).unwrap_err()),
        "spec.constraints"
    );
    let mut s = spec(1, &["x"]);
    s.constraints = Some(JobConstraints {
        providers: vec!["aws".into()],
        exclude_providers: vec!["aws".into()],
        ..Default::default()
    });
    assert_eq!(
        field_of(job_spec(s, &models()).unwrap_err()),
        "spec.constraints.exclude_providers"
    );
    let mut s = spec(1, &["x"]);
    s.priority = 5000;
    assert_eq!(
        field_of(job_spec(s, &models()).unwrap_err()),
        "spec.priority"
    );
    let mut s = spec(1, &["x"]);
    s.queue = "nope".into();
    assert!(
        job_spec(s, &models())
            .unwrap_err()
            .to_string()
            .contains("accepted: default")
    );
    let mut rules = models();
    rules.tenants = vec!["research".into()];
    let err = job_spec(spec(1, &["x"]), &rules).unwrap_err();
    assert!(err.to_string().contains("accepted: research"), "{err}");
}

#[test]
fn every_string_and_list_of_a_spec_is_bounded() {
    let mut s = spec(1, &["x"]);
    s.name = "n".repeat(300);
    let err = job_spec(s, &models()).unwrap_err();
    assert_eq!(err.to_string(), "spec.name: 300 bytes; at most 128");
    for name in ["evil\x1b]0;owned\x07", "two\nlines", "nul\0", "\u{202e}txt"] {
        let mut s = spec(1, &["x"]);
        s.name = name.into();
        assert_eq!(field_of(job_spec(s, &models()).unwrap_err()), "spec.name");
    }
    let mut s = spec(1, &["x"]);
    s.name = "train llama-3 (8B) — run #4".into();
    assert!(
        job_spec(s, &models()).is_ok(),
        "printable Unicode is a name"
    );
    let mut s = spec(1, &["x"]);
    s.queue = "q".repeat(limits::LABEL_BYTES + 1);
    assert_eq!(field_of(job_spec(s, &models()).unwrap_err()), "spec.queue");
    let mut s = spec(1, &["x"]);
    s.tenant = "t".repeat(limits::LABEL_BYTES + 1);
    let err = job_spec(s, &models()).unwrap_err();
    assert!(
        err.to_string().len() < 300,
        "the value is not echoed whole: {err}"
    );
    let mut s = spec(1, &["x"]);
    s.constraints = Some(JobConstraints {
        exclude_regions: vec!["r".into(); limits::CONSTRAINT_LIST_COUNT + 1],
        ..Default::default()
    });
    assert_eq!(
        field_of(job_spec(s, &models()).unwrap_err()),
        "spec.constraints.exclude_regions"
    );
    let mut s = spec(1, &["x"]);
    s.constraints = Some(JobConstraints {
        models: vec!["m".repeat(1000)],
        ..Default::default()
    });
    assert_eq!(
        field_of(job_spec(s, &models()).unwrap_err()),
        "spec.constraints.models[0]"
    );
    let mut s = spec(1, &["x", &"a".repeat(limits::ARG_BYTES + 1)]);
    s.workload.as_mut().unwrap().working_dir = "/tmp".into();
    assert_eq!(
        field_of(job_spec(s, &models()).unwrap_err()),
        "spec.workload.argv[1]"
    );
    let mut s = spec(1, &["x"]);
    s.workload.as_mut().unwrap().working_dir = "/".repeat(limits::WORKING_DIR_BYTES + 1);
    assert_eq!(
        field_of(job_spec(s, &models()).unwrap_err()),
        "spec.workload.working_dir"
    );
}

#[test]
fn reasons_filters_and_tokens() {
    assert!(cancel_reason("").is_ok());
    assert!(cancel_reason("superseded by job-06b0bdffc3f2a9c0").is_ok());
    assert_eq!(
        cancel_reason(&"x".repeat(15 << 20))
            .unwrap_err()
            .to_string(),
        format!(
            "reason: {} bytes; at most {}",
            15 << 20,
            limits::REASON_BYTES
        )
    );
    assert_eq!(field_of(cancel_reason("a\x1b[2J").unwrap_err()), "reason");
    assert_eq!(field_of(cordon_reason("a\nb").unwrap_err()), "reason");
    assert!(page_token("1700000000000000000:job-06b0bdffc3f2a9c0").is_ok());
    assert_eq!(
        field_of(page_token(&"9".repeat(limits::PAGE_TOKEN_BYTES + 1)).unwrap_err()),
        "page_token"
    );
    assert_eq!(
        field_of(filter_list("states", limits::FILTER_COUNT + 1).unwrap_err()),
        "states"
    );
    assert!(label_filter("tenant", "").is_ok());
    assert!(label_filter("tenant", "*").is_ok());
    assert_eq!(
        field_of(label_filter("region", &"r".repeat(100)).unwrap_err()),
        "region"
    );
    assert_eq!(
        field_of(id_filter("gpu_uuid", "GPU-\x1b").unwrap_err()),
        "gpu_uuid"
    );
}

#[test]
fn models_are_canonicalised() {
    let mut s = spec(1, &["x"]);
    s.constraints = Some(JobConstraints {
        models: vec!["h100-sxm-80gb".into()],
        ..Default::default()
    });
    let s = job_spec(s, &models()).unwrap();
    assert_eq!(s.constraints.unwrap().models, vec!["H100-SXM-80GB"]);
}

#[test]
fn ids_and_generations() {
    assert!(job_id("job_id", "job-0123456789ab").is_ok(), "an older id");
    assert!(job_id("job_id", "job-06b0bdffc3f2a9c0").is_ok());
    let issued = crate::history::new_job_id(std::time::SystemTime::now(), 0xabcdef1);
    assert!(job_id("job_id", &issued).is_ok(), "{issued}");
    assert!(job_id("job_id", "job-0123456789abc").is_err(), "13 digits");
    assert!(job_id("job_id", "job-").is_err());
    assert!(job_id("job_id", "job-0123456789AB").is_err());
    assert!(job_id("job_id", "../etc").is_err());
    assert!(node_id("n", "aws-use1-0").is_ok());
    assert!(node_id("n", "a/b").is_err());
}
