//! Image jobs end to end on real podman: a controller and agents whose
//! `oci` runtime is on, the local busybox test image, and a test CDI spec
//! whose devices are dummy nodes named for the simulated GPUs' UUIDs.
//! Each test names its own node, so its CDI spec and containers are its
//! own. Needs podman (tests/podman/setup.sh; see `podman_ready`).

use std::collections::HashMap;

use gpufleet_agent::backend::simulated::simulated_uuid;
use gpufleet_agent::runtime::oci::OciSettings;
use gpufleet_proto::v1::{
    CancelJobRequest, ContainerSpec, Job, JobSpec, JobState, Mount, PullPolicy, WatchJobRequest,
    WorkloadSpec, WorkloadState,
};
use gpufleet_tests::podman::{
    ContainerGuard, TEST_IMAGE, containers_of, podman_ready, remove_test_cdi_spec,
    write_test_cdi_spec,
};
use gpufleet_tests::{Cluster, NodeSpec, eventually, job_log};
use tokio_stream::StreamExt;

/// A cluster of one node `node_id` with `gpus` simulated L4s whose agent
/// runs containers, mounts allowed under `allowed`, and (with `cdi`) a
/// CDI spec for its GPUs.
async fn cluster(
    node_id: &str,
    gpus: u32,
    cdi: bool,
    allowed: Vec<std::path::PathBuf>,
) -> anyhow::Result<(Cluster, ContainerGuard)> {
    let uuids: Vec<String> = (0..gpus).map(|i| simulated_uuid(node_id, i)).collect();
    let spec_name = format!("gpufleet-test-{node_id}");
    if cdi {
        write_test_cdi_spec(&spec_name, &uuids)?;
    } else {
        remove_test_cdi_spec(&spec_name);
    }
    let mut cluster = Cluster::start(&[]).await?;
    let node = NodeSpec::new(node_id, "aws", "us-east-1", &format!("{gpus}xL4"), 0.8);
    let mut oci = OciSettings::new("podman".into());
    oci.allowed_mounts = allowed;
    let config = gpufleet_agent::AgentConfig {
        oci: Some(oci),
        ..cluster.agent_config(&node)
    };
    let guard = ContainerGuard::new(&config.data_dir);
    cluster.add_agent_with(config).await?;
    cluster.wait_ready(1).await?;
    Ok((cluster, guard))
}

fn image_job(gpus: u32, argv: &[&str], container: ContainerSpec) -> JobSpec {
    JobSpec {
        gpus_per_task: gpus,
        workload: Some(WorkloadSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: HashMap::from([("GREETING".to_string(), "hello from the job".to_string())]),
            container: Some(ContainerSpec {
                image: if container.image.is_empty() {
                    TEST_IMAGE.into()
                } else {
                    container.image.clone()
                },
                ..container
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ended(job: &Job) -> bool {
    gpufleet_core::is_terminal_job(job.state())
}

/// Every job state the controller published, in order, until it ended.
async fn watch_states(
    cluster: &Cluster,
    job_id: &str,
) -> anyhow::Result<tokio::task::JoinHandle<Vec<(JobState, String)>>> {
    let mut jobs = cluster.jobs().await?;
    let job_id = job_id.to_string();
    Ok(tokio::spawn(async move {
        let mut seen: Vec<(JobState, String)> = Vec::new();
        let Ok(stream) = jobs.watch_job(WatchJobRequest { job_id }).await else {
            return seen;
        };
        let mut stream = stream.into_inner();
        while let Some(Ok(job)) = stream.next().await {
            let message = job
                .tasks
                .first()
                .map(|t| t.message.clone())
                .unwrap_or_default();
            if seen.last().map(|(s, _)| *s) != Some(job.state()) {
                seen.push((job.state(), message));
            }
            if ended(&job) {
                break;
            }
        }
        seen
    }))
}

/// Waits until podman has no container of the allocation any more.
async fn wait_container_removed(allocation_id: &str) -> anyhow::Result<()> {
    eventually(
        &format!("the container of {allocation_id} to be removed"),
        || async { Ok(containers_of(allocation_id)?.is_empty().then_some(())) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_job_sees_exactly_its_gpus_its_env_and_its_mounts() -> anyhow::Result<()> {
    if !podman_ready("an_image_job_sees_exactly_its_gpus_its_env_and_its_mounts")? {
        return Ok(());
    }
    let host = tempfile::tempdir()?;
    let data = host.path().join("data");
    std::fs::create_dir(&data)?;
    std::fs::write(data.join("input.txt"), "mounted input\n")?;
    let node = "oci-gpus";
    let (cluster, _guard) = cluster(node, 4, true, vec![host.path().to_path_buf()]).await?;
    let script = "ls /dev/nvidia*; env | sort; cat /data/input.txt; \
                  touch /data/x 2>/dev/null && echo data-writable || echo data-read-only; \
                  echo shm=$(df -k /dev/shm | tail -1 | awk '{print $2}'); pwd; id -u";
    let job = cluster
        .submit_spec(image_job(
            2,
            &["sh", "-c", script],
            ContainerSpec {
                mounts: vec![Mount {
                    source: data.display().to_string(),
                    target: "/data".into(),
                    read_only: true,
                }],
                shm_size_bytes: 128 << 20,
                workdir: "/tmp".into(),
                user: "1234:1234".into(),
                ..Default::default()
            },
        ))
        .await?;
    let job = cluster.wait_job(&job.id, "to end", ended).await?;
    let log = job_log(&cluster, &job.id, 0).await?;
    assert_eq!(job.state(), JobState::Succeeded, "{job:?}\n{log}");
    println!("{log}");
    let gpus = &job.tasks[0].gpu_uuids;
    assert_eq!(gpus.len(), 2);
    // Exactly two device nodes, and they are the allocated GPUs'.
    let devices: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("/dev/nvidia"))
        .collect();
    assert_eq!(devices.len(), 2, "{log}");
    let cdi: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("GPUFLEET_TEST_CDI_"))
        .filter_map(|l| l.split_once('=').map(|(_, uuid)| uuid))
        .collect();
    let mut expected: Vec<&str> = gpus.iter().map(String::as_str).collect();
    let mut seen = cdi.clone();
    expected.sort();
    seen.sort();
    assert_eq!(
        seen, expected,
        "the CDI devices are the allocated GPUs\n{log}"
    );
    let visible = gpus.join(",");
    assert!(
        log.contains(&format!("CUDA_VISIBLE_DEVICES={visible}\n")),
        "{log}"
    );
    assert!(
        log.contains(&format!("NVIDIA_VISIBLE_DEVICES={visible}\n")),
        "{log}"
    );
    assert!(log.contains("GREETING=hello from the job\n"), "{log}");
    assert!(
        log.contains(&format!("GPUFLEET_JOB_ID={}\n", job.id)),
        "{log}"
    );
    assert!(log.contains("mounted input\n"), "{log}");
    assert!(log.contains("data-read-only\n"), "{log}");
    assert!(log.contains("shm=131072\n"), "{log}");
    assert!(log.contains("/tmp\n1234\n"), "{log}");
    // Removed once its status and log were collected.
    wait_container_removed(&job.tasks[0].allocation_id).await?;
    remove_test_cdi_spec(&format!("gpufleet-test-{node}"));
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_cdi_spec_gpus_go_by_nvidia_visible_devices() -> anyhow::Result<()> {
    if !podman_ready("without_a_cdi_spec_gpus_go_by_nvidia_visible_devices")? {
        return Ok(());
    }
    let (cluster, _guard) = cluster("oci-nocdi", 2, false, Vec::new()).await?;
    let job = cluster
        .submit_spec(image_job(
            1,
            &["sh", "-c", "ls /dev/nvidia* 2>&1 | head -1; env"],
            ContainerSpec::default(),
        ))
        .await?;
    let job = cluster.wait_job(&job.id, "to end", ended).await?;
    let log = job_log(&cluster, &job.id, 0).await?;
    assert_eq!(job.state(), JobState::Succeeded, "{job:?}\n{log}");
    let gpu = &job.tasks[0].gpu_uuids[0];
    assert!(
        log.contains(&format!("NVIDIA_VISIBLE_DEVICES={gpu}\n")),
        "{log}"
    );
    assert!(!log.contains("GPUFLEET_TEST_CDI_"), "{log}");
    assert!(
        log.contains("No such file or directory"),
        "no device without the hook\n{log}"
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_outside_the_allowed_paths_fails_the_task_with_the_reason() -> anyhow::Result<()> {
    if !podman_ready("a_mount_outside_the_allowed_paths_fails_the_task_with_the_reason")? {
        return Ok(());
    }
    let allowed = tempfile::tempdir()?;
    let (cluster, _guard) =
        cluster("oci-mounts", 1, false, vec![allowed.path().to_path_buf()]).await?;
    let job = cluster
        .submit_spec(image_job(
            1,
            &["true"],
            ContainerSpec {
                mounts: vec![Mount {
                    source: "/etc".into(),
                    target: "/host-etc".into(),
                    read_only: true,
                }],
                ..Default::default()
            },
        ))
        .await?;
    let job = cluster.wait_job(&job.id, "to end", ended).await?;
    assert_eq!(job.state(), JobState::Failed, "{job:?}");
    let message = &job.tasks[0].message;
    assert!(message.contains("oci_allowed_mounts"), "{message}");
    assert!(containers_of(&job.tasks[0].allocation_id)?.is_empty());
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_container_politely_then_by_force_after_the_grace() -> anyhow::Result<()> {
    if !podman_ready("cancel_stops_a_container_politely_then_by_force_after_the_grace")? {
        return Ok(());
    }
    let (cluster, _guard) = cluster("oci-cancel", 2, false, Vec::new()).await?;
    // One handles SIGTERM (forwarded by the container's init); one ignores
    // it and is killed when the grace period is over.
    let polite =
        "trap 'echo got SIGTERM; exit 0' TERM; echo started; while true; do sleep 0.1; done";
    let stubborn = "trap '' TERM; echo started; while true; do sleep 0.1; done";
    let mut ids = Vec::new();
    for script in [polite, stubborn] {
        let mut spec = image_job(1, &["sh", "-c", script], ContainerSpec::default());
        if let Some(w) = spec.workload.as_mut() {
            w.stop_grace_period_seconds = 1;
        }
        let job = cluster.submit_spec(spec).await?;
        cluster
            .wait_job(&job.id, "to run", |j| j.state() == JobState::Running)
            .await?;
        eventually("the container to print", || async {
            Ok(job_log_now(&cluster, &job.id)
                .await?
                .contains("started")
                .then_some(()))
        })
        .await?;
        ids.push(job.id);
    }
    let mut jobs = cluster.jobs().await?;
    for id in &ids {
        jobs.cancel_job(CancelJobRequest {
            job_id: id.clone(),
            reason: "test".into(),
        })
        .await?;
    }
    // The job is Cancelled at once; its task ends once its agent says so.
    let task_ended = |j: &Job| {
        j.tasks
            .first()
            .is_some_and(|t| gpufleet_core::is_terminal_workload(t.state()))
    };
    let polite_job = cluster
        .wait_job(&ids[0], "its task to end", task_ended)
        .await?;
    let stubborn_job = cluster
        .wait_job(&ids[1], "its task to end", task_ended)
        .await?;
    let task = &polite_job.tasks[0];
    assert_eq!(polite_job.state(), JobState::Cancelled);
    assert_eq!(task.state(), WorkloadState::Stopped, "{task:?}");
    assert!(job_log(&cluster, &ids[0], 0).await?.contains("got SIGTERM"));
    let task = &stubborn_job.tasks[0];
    assert_eq!(task.state(), WorkloadState::Stopped, "{task:?}");
    assert_eq!(task.signal, Some(9), "killed after the grace: {task:?}");
    for job in [&polite_job, &stubborn_job] {
        wait_container_removed(&job.tasks[0].allocation_id).await?;
    }
    cluster.shutdown().await
}

/// The log as far as it is now (not following).
async fn job_log_now(cluster: &Cluster, job_id: &str) -> anyhow::Result<String> {
    let mut jobs = cluster.jobs().await?;
    let mut stream = jobs
        .stream_job_logs(gpufleet_proto::v1::StreamJobLogsRequest {
            job_id: job_id.to_string(),
            task_index: 0,
            offset: 0,
            follow: false,
        })
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend(chunk?.data);
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_fails_with_the_registrys_reason_after_pulling() -> anyhow::Result<()> {
    if !podman_ready("a_missing_image_fails_with_the_registrys_reason_after_pulling")? {
        return Ok(());
    }
    let (cluster, _guard) = cluster("oci-missing", 1, false, Vec::new()).await?;
    // Nothing serves a registry on localhost: podman's pull is refused.
    let missing = "localhost/gpufleet-missing:1";
    let job = cluster
        .submit_spec(image_job(
            1,
            &["true"],
            ContainerSpec {
                image: missing.into(),
                ..Default::default()
            },
        ))
        .await?;
    let states = watch_states(&cluster, &job.id).await?;
    let job = cluster.wait_job(&job.id, "to end", ended).await?;
    let states = states.await?;
    assert_eq!(job.state(), JobState::Failed, "{job:?}");
    let message = &job.tasks[0].message;
    assert!(
        message.starts_with(&format!("cannot pull image {missing}: ")),
        "{message}"
    );
    // Podman's (the registry's) own words, not a generic error.
    assert!(message.contains("localhost"), "{message}");
    assert!(
        states
            .iter()
            .any(|(s, m)| *s == JobState::Pulling && m.contains("pulling")),
        "the job showed Pulling with progress: {states:?}"
    );
    println!("states: {states:?}\nmessage: {message}");

    // With --pull never, the node says it does not have it.
    let job = cluster
        .submit_spec(image_job(
            1,
            &["true"],
            ContainerSpec {
                image: missing.into(),
                pull: PullPolicy::Never as i32,
                ..Default::default()
            },
        ))
        .await?;
    let job = cluster.wait_job(&job.id, "to end", ended).await?;
    assert_eq!(job.state(), JobState::Failed);
    let message = &job.tasks[0].message;
    assert!(message.contains("not on this node"), "{message}");
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_credentials_go_by_reference_and_are_never_stored_with_the_job()
-> anyhow::Result<()> {
    use gpufleet_proto::v1::PutRegistrySecretRequest;
    use gpufleet_proto::v1::secrets_client::SecretsClient;
    if !podman_ready("registry_credentials_go_by_reference_and_are_never_stored_with_the_job")? {
        return Ok(());
    }
    let (cluster, _guard) = cluster("oci-secret", 1, false, Vec::new()).await?;
    let password = "pw-7c1d0f-never-in-a-record";
    let with_secret = |name: &str| {
        image_job(
            1,
            &["true"],
            ContainerSpec {
                image: "localhost/gpufleet-private:1".into(),
                registry_secret: name.into(),
                ..Default::default()
            },
        )
    };
    // A job that names a secret its tenant does not have is refused.
    let err = cluster.submit_spec(with_secret("ghcr")).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("has no registry secret"),
        "{err:#}"
    );
    SecretsClient::new(cluster.channel().await?)
        .put_registry_secret(PutRegistrySecretRequest {
            tenant: String::new(),
            name: "ghcr".into(),
            registry: "localhost".into(),
            username: "bot".into(),
            password: password.into(),
        })
        .await?;
    let job = cluster.submit_spec(with_secret("ghcr")).await?;
    let job = cluster.wait_job(&job.id, "to end", ended).await?;
    // The pull ran (with the credential) and failed with podman's reason.
    assert_eq!(job.state(), JobState::Failed);
    assert!(
        job.tasks[0].message.contains("cannot pull image"),
        "{job:?}"
    );
    assert!(!format!("{job:?}").contains(password));
    // Neither the controller's store nor the agent's files hold it in a job
    // or workload record; the agent's pull credential file is gone.
    let agent_dir = cluster.data_dir().join("agents").join("oci-secret");
    for file in walk(&agent_dir)? {
        let bytes = std::fs::read(&file).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(password),
            "{} holds the password",
            file.display()
        );
    }
    cluster.shutdown().await
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    Ok(files)
}

/// Needs no podman: the agent has no oci runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_job_waits_for_a_node_that_runs_images_and_explain_says_why() -> anyhow::Result<()>
{
    let cluster =
        Cluster::start(&[NodeSpec::new("plain", "aws", "us-east-1", "2xL4", 0.8)]).await?;
    let nodes = cluster
        .fleet()
        .await?
        .list_nodes(gpufleet_proto::v1::ListNodesRequest::default())
        .await?
        .into_inner()
        .nodes;
    let runtimes = &nodes[0].identity.as_ref().map(|i| i.runtimes.clone());
    assert_eq!(runtimes.as_deref(), Some(&["process".to_string()][..]));
    let job = cluster
        .submit_spec(image_job(1, &["true"], ContainerSpec::default()))
        .await?;
    let job = cluster
        .wait_job(&job.id, "an explained pending reason", |j| {
            j.pending_reason
                .as_ref()
                .is_some_and(|r| r.message.contains("container images"))
        })
        .await?;
    assert_eq!(job.state(), JobState::Pending);
    let reason = job.pending_reason.unwrap_or_default();
    println!("{}", reason.message);
    assert!(
        reason.exclusions.iter().any(|e| e.constraint == "runtime"),
        "{reason:?}"
    );
    cluster.shutdown().await
}
