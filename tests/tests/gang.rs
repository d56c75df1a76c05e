//! Multi-node gangs end to end: three agents on loopback, a real
//! rendezvous over the MASTER_ADDR:MASTER_PORT rank 0's agent chose, and a
//! gang that fails and restarts as one.

use gpufleet_proto::v1::{Job, JobSpec, JobState, RetryPolicy, WorkloadSpec};
use gpufleet_tests::{Cluster, NodeSpec, job_log, rendezvous_program};

fn three_nodes() -> Vec<NodeSpec> {
    (0..3)
        .map(|i| {
            NodeSpec::new(
                &format!("node-{i}"),
                "aws",
                "us-east-1",
                "1xH100-SXM-80GB",
                3.0,
            )
        })
        .collect()
}

fn is_terminal(job: &Job) -> bool {
    matches!(
        job.state(),
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost
    )
}

fn gang(argv: Vec<String>, retries: u32) -> JobSpec {
    JobSpec {
        tasks: 3,
        gpus_per_task: 1,
        workload: Some(WorkloadSpec {
            argv,
            ..Default::default()
        }),
        retry: Some(RetryPolicy {
            max_retries_on_failure: retries,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_task_gang_finds_its_peers() -> anyhow::Result<()> {
    let cluster = Cluster::start(&three_nodes()).await?;
    let program = rendezvous_program().display().to_string();
    let job = cluster.submit_spec(gang(vec![program], 0)).await?;
    let job = cluster.wait_job(&job.id, "to end", is_terminal).await?;
    let mut logs = Vec::new();
    for rank in 0..3 {
        logs.push(job_log(&cluster, &job.id, rank).await?);
    }
    assert_eq!(job.state(), JobState::Succeeded, "{job:?}\n{logs:#?}");
    // Shown with --nocapture; docs/workloads.md quotes it.
    for (rank, log) in logs.iter().enumerate() {
        println!("--- rank {rank}\n{log}");
    }
    let port = job.tasks[0].rendezvous_port;
    assert_ne!(port, 0, "rank 0's port is recorded with the job");
    for (rank, log) in logs.iter().enumerate() {
        for line in [
            format!("RANK={rank}"),
            format!("NODE_RANK={rank}"),
            "LOCAL_RANK=0".to_string(),
            "LOCAL_WORLD_SIZE=1".to_string(),
            "WORLD_SIZE=3".to_string(),
            "MASTER_ADDR=127.0.0.1".to_string(),
            format!("MASTER_PORT={port}"),
            "GPUFLEET_PEERS=127.0.0.1,127.0.0.1,127.0.0.1".to_string(),
        ] {
            assert!(
                log.lines().any(|l| l == line),
                "rank {rank} lacks {line}:\n{log}"
            );
        }
    }
    assert!(
        logs[0].contains("rendezvous complete: world_size=3, ranks heard={1, 2}"),
        "{}",
        logs[0]
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_rank_restarts_the_whole_gang_once() -> anyhow::Result<()> {
    let cluster = Cluster::start(&three_nodes()).await?;
    let marker = tempfile::tempdir()?;
    let marker = marker.path().join("failed-once");
    let argv = vec![
        rendezvous_program().display().to_string(),
        "--fail-once".to_string(),
        marker.display().to_string(),
    ];
    let mut spec = gang(argv, 1);
    // No backoff, so the test does not wait for it.
    if let Some(retry) = spec.retry.as_mut() {
        retry.backoff_seconds = 0;
    }
    let job = cluster.submit_spec(spec).await?;
    let job = cluster.wait_job(&job.id, "to end", is_terminal).await?;
    assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
    assert_eq!(job.attempt, 1, "one restart of the whole gang: {job:?}");
    assert_eq!(job.failure_retries, 1);
    assert!(
        job.history
            .iter()
            .any(|h| h.contains("task 2 exited with code 1")),
        "{:?}",
        job.history
    );
    // Every task of the new attempt ran again, with a new rendezvous.
    assert!(
        job.tasks.iter().all(|t| t.allocation_id.ends_with(".1")),
        "{:?}",
        job.tasks
    );
    assert!(marker.exists());
    cluster.shutdown().await
}
