//! The oci runtime's pure parts; the runtime against real podman is in
//! tests/tests/containers.rs.

use super::*;
use gpufleet_proto::v1::{Mount, WorkloadSpec};

fn request(spec: ContainerSpec, gpus: &[&str], run_as: Option<(u32, u32)>) -> LaunchRequest {
    LaunchRequest {
        allocation: Allocation {
            allocation_id: "job-1.0".into(),
            job_id: "job-1".into(),
            workload: Some(WorkloadSpec {
                container: Some(spec),
                ..Default::default()
            }),
            ..Default::default()
        },
        local: false,
        argv: vec!["sh".into(), "-c".into(), "env".into()],
        env: vec![
            ("CUDA_VISIBLE_DEVICES".into(), "all".into()),
            ("X".into(), "1".into()),
        ],
        working_dir: None,
        run_as,
        gpu_uuids: gpus.iter().map(|g| g.to_string()).collect(),
        gpu_env: vec![("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE".into(), "50".into())],
        allocation_dir: "/tmp/a".into(),
        log_path: "/tmp/a/output.log".into(),
        log_max_bytes: 1024,
    }
}

fn build(
    spec: ContainerSpec,
    gpus: &[&str],
    cdi: bool,
    allowed: &[PathBuf],
) -> Result<Vec<String>, String> {
    RunArgs {
        name: "gpufleet-job-1.0",
        owner: "/var/lib/agent",
        network: "host",
        allowed_mounts: allowed,
        cdi,
    }
    .build(&request(spec.clone(), gpus, None), &spec)
}

fn image() -> ContainerSpec {
    ContainerSpec {
        image: "localhost/test:1".into(),
        ..Default::default()
    }
}

#[test]
fn gpus_go_by_cdi_name_when_a_spec_names_them_else_by_variable() {
    let args = build(image(), &["GPU-a", "GPU-b"], true, &[]).unwrap();
    let joined = args.join(" ");
    assert!(
        joined.contains("--device nvidia.com/gpu=GPU-a --device nvidia.com/gpu=GPU-b"),
        "{joined}"
    );
    assert!(joined.contains("--env NVIDIA_VISIBLE_DEVICES=GPU-a,GPU-b"));
    // The job's own CUDA_VISIBLE_DEVICES comes first, so podman keeps ours.
    let ours = args
        .iter()
        .rposition(|a| a == "CUDA_VISIBLE_DEVICES=GPU-a,GPU-b")
        .unwrap();
    let theirs = args
        .iter()
        .position(|a| a == "CUDA_VISIBLE_DEVICES=all")
        .unwrap();
    assert!(theirs < ours);
    let args = build(image(), &["GPU-a"], false, &[]).unwrap();
    assert!(!args.iter().any(|a| a == "--device"));
    assert!(args.iter().any(|a| a == "NVIDIA_VISIBLE_DEVICES=GPU-a"));
    let args = build(image(), &[], true, &[]).unwrap();
    assert!(args.iter().any(|a| a == "NVIDIA_VISIBLE_DEVICES=void"));
    // Labels, init, the image, then the command.
    let tail: Vec<_> = args.iter().rev().take(4).rev().cloned().collect();
    assert_eq!(tail, ["localhost/test:1", "sh", "-c", "env"]);
    assert!(args.iter().any(|a| a == "--init"));
    assert!(args.iter().any(|a| a == "io.gpufleet.allocation=job-1.0"));
}

#[test]
fn mounts_only_under_allowed_paths() {
    let allowed = tempfile::tempdir().unwrap();
    let inside = allowed.path().join("data");
    std::fs::create_dir(&inside).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let mount = |source: &std::path::Path| ContainerSpec {
        mounts: vec![Mount {
            source: source.display().to_string(),
            target: "/data".into(),
            read_only: true,
        }],
        ..image()
    };
    let roots = [allowed.path().to_path_buf()];
    let args = build(mount(&inside), &[], false, &roots).unwrap();
    let resolved = std::fs::canonicalize(&inside).unwrap();
    assert!(args.contains(&format!(
        "type=bind,source={},target=/data,readonly=true",
        resolved.display()
    )));
    let err = build(mount(outside.path()), &[], false, &roots).unwrap_err();
    assert!(err.contains("oci_allowed_mounts"), "{err}");
    // A symlink inside that points outside is judged by where it points.
    let link = allowed.path().join("escape");
    std::os::unix::fs::symlink(outside.path(), &link).unwrap();
    assert!(build(mount(&link), &[], false, &roots).is_err());
    // `..` cannot climb out either.
    let climb = allowed.path().join("data/../..");
    assert!(build(mount(&climb), &[], false, &roots).is_err());
}

#[test]
fn a_workload_user_allows_only_numeric_non_root_users() {
    let with = |user: &str| ContainerSpec {
        user: user.into(),
        ..image()
    };
    assert_eq!(
        container_user(&image(), Some((1000, 1000)))
            .unwrap()
            .as_deref(),
        Some("1000:1000")
    );
    assert_eq!(container_user(&image(), None).unwrap(), None);
    assert_eq!(
        container_user(&with("root"), None).unwrap().as_deref(),
        Some("root")
    );
    assert!(container_user(&with("root"), Some((1000, 1000))).is_err());
    assert!(container_user(&with("0"), Some((1000, 1000))).is_err());
    assert!(container_user(&with("1000:0"), Some((1000, 1000))).is_err());
    assert_eq!(
        container_user(&with("4321:4321"), Some((1000, 1000)))
            .unwrap()
            .as_deref(),
        Some("4321:4321")
    );
}

#[test]
fn entrypoint_shm_and_workdir_are_passed_as_given() {
    let spec = ContainerSpec {
        entrypoint: vec!["/bin/sh".into(), "-c".into()],
        shm_size_bytes: 1 << 30,
        workdir: "/work".into(),
        ..image()
    };
    let args = build(spec, &[], false, &[]).unwrap().join(" ");
    assert!(args.contains(r#"--entrypoint ["/bin/sh","-c"]"#), "{args}");
    assert!(args.contains("--shm-size 1073741824b"));
    assert!(args.contains("--workdir /work"));
}

#[test]
fn container_names_are_valid_and_stable() {
    assert_eq!(container_name("job-1.0"), "gpufleet-job-1.0");
    let odd = container_name("a b/c");
    assert!(odd.starts_with("gpufleet-x"));
    assert_eq!(odd, container_name("a b/c"));
    assert_ne!(odd, container_name("a b/d"));
}

#[test]
fn a_signal_exit_status_reads_as_the_signal() {
    let exit = |code: Option<i32>, signal: Option<i32>| {
        Ended::Exited(super::super::Exit {
            exit_code: code,
            signal,
            start_error: None,
            finished_at: std::time::UNIX_EPOCH,
        })
    };
    assert_eq!(
        container_ending(exit(Some(143), None)),
        exit(None, Some(15))
    );
    assert_eq!(container_ending(exit(Some(3), None)), exit(Some(3), None));
    assert_eq!(
        container_ending(exit(Some(125), None)),
        exit(Some(125), None)
    );
    assert_eq!(container_ending(exit(None, Some(9))), exit(None, Some(9)));
}

#[test]
fn base64_matches_the_standard() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"user:pa55"), "dXNlcjpwYTU1");
}
