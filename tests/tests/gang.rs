//! Multi-node gangs end to end: three agents on loopback, a real
//! rendezvous over the MASTER_ADDR:MASTER_PORT rank 0's agent chose, a
//! gang that fails and restarts as one, and a gang that keeps to one
//! network block (`topology.block` labels) until it outgrows every block,
//! and then says so.

use std::collections::BTreeSet;

use gpufleet_proto::v1::{ExplainJobRequest, Job, JobSpec, JobState, RetryPolicy, WorkloadSpec};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_keeps_to_one_network_block_and_says_when_it_cannot() -> anyhow::Result<()> {
    // One region; node-0 (block b1) is the cheapest, node-1 and node-2
    // (block b2) dearer.
    let mut cluster = Cluster::start(&[]).await?;
    for (i, block, price) in [(0, "b1", 1.0), (1, "b2", 3.0), (2, "b2", 3.0)] {
        let node = NodeSpec::new(
            &format!("node-{i}"),
            "aws",
            "us-east-1",
            "1xH100-SXM-80GB",
            price,
        );
        let mut config = cluster.agent_config(&node);
        config
            .node
            .labels
            .insert("topology.block".into(), block.into());
        cluster.add_agent_with(config).await?;
    }
    cluster.wait_ready(3).await?;
    let argv = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let nodes_of =
        |job: &Job| -> BTreeSet<String> { job.tasks.iter().map(|t| t.node_id.clone()).collect() };

    // Two tasks fit in b2: the gang goes there, though node-0 is cheaper.
    let pair = JobSpec {
        tasks: 2,
        ..gang(argv(&["true"]), 0)
    };
    let pair = cluster.submit_spec(pair).await?;
    let pair = cluster.wait_job(&pair.id, "to end", is_terminal).await?;
    assert_eq!(pair.state(), JobState::Succeeded, "{pair:?}");
    assert_eq!(
        nodes_of(&pair),
        BTreeSet::from(["node-1".to_string(), "node-2".to_string()])
    );
    assert_eq!(pair.placement_note, "", "one block: nothing to say");

    // Three tasks fit in no block: it spans b1 and b2, and says so in the
    // job (every watcher sees it with the Scheduled version) and in explain.
    let trio = cluster.submit_spec(gang(argv(&["sleep", "30"]), 0)).await?;
    let trio = cluster
        .wait_job(&trio.id, "to run", |j| j.state() == JobState::Running)
        .await?;
    assert_eq!(nodes_of(&trio).len(), 3);
    // Shown with --nocapture; docs/workloads.md quotes it.
    println!("Placement: {}", trio.placement_note);
    assert!(
        trio.placement_note
            .starts_with("the gang spans network blocks (by topology.block) b")
            && trio.placement_note.contains("b1")
            && trio.placement_note.contains("b2")
            && trio
                .placement_note
                .ends_with("no single block had room for all 3 tasks"),
        "{}",
        trio.placement_note
    );
    let mut jobs = cluster.jobs().await?;
    let explained = jobs
        .explain_job(ExplainJobRequest {
            job_id: trio.id.clone(),
        })
        .await?
        .into_inner();
    assert!(
        explained
            .summary
            .contains(&format!("placed, but {}", trio.placement_note)),
        "{}",
        explained.summary
    );
    jobs.cancel_job(gpufleet_proto::v1::CancelJobRequest {
        job_id: trio.id.clone(),
        reason: String::new(),
    })
    .await?;
    cluster.shutdown().await
}
