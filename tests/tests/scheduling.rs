//! Scheduling behaviour through the real controller and agents: preemption,
//! retries, max runtime, cordon and drain, explanations.

use std::time::Duration;

use gpufleet_proto::v1::{
    CordonNodeRequest, DrainNodeRequest, ExplainJobRequest, GetNodeRequest, JobConstraints,
    JobSpec, JobState, RetryPolicy, UncordonNodeRequest, WorkloadSpec, WorkloadState,
};
use gpufleet_tests::{Cluster, NodeSpec};

fn one_node() -> Vec<NodeSpec> {
    vec![NodeSpec::new(
        "solo",
        "aws",
        "us-east-1",
        "4xH100-SXM-80GB",
        3.93,
    )]
}

fn spec(gpus: u32, argv: &[&str]) -> JobSpec {
    JobSpec {
        gpus_per_task: gpus,
        workload: Some(WorkloadSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stop_grace_period_seconds: 1,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn terminal(job: &gpufleet_proto::v1::Job) -> bool {
    matches!(
        job.state(),
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_job_preempts_preemptible_work_which_runs_again_later() -> anyhow::Result<()>
{
    let cluster = Cluster::start(&one_node()).await?;
    let victim = cluster
        .submit_spec(JobSpec {
            preemptible: true,
            priority: 1,
            ..spec(4, &["sleep", "300"])
        })
        .await?;
    cluster
        .wait_job(&victim.id, "to run", |j| j.state() == JobState::Running)
        .await?;

    let urgent = cluster
        .submit_spec(JobSpec {
            priority: 100,
            ..spec(2, &["sh", "-c", "echo urgent"])
        })
        .await?;
    let urgent = cluster.wait_job(&urgent.id, "to end", terminal).await?;
    assert_eq!(urgent.state(), JobState::Succeeded, "{urgent:?}");

    // The victim was stopped, counted, and queued again; with the node free
    // again it runs its second attempt.
    let victim = cluster
        .wait_job(&victim.id, "second attempt running", |j| {
            j.attempt == 1 && j.state() == JobState::Running
        })
        .await?;
    assert_eq!(victim.preemptions, 1);
    assert!(
        victim.history[0].contains("preempted"),
        "{:?}",
        victim.history
    );

    // A non-preemptible job is never evicted, even for a higher priority.
    let mut jobs = cluster.jobs().await?;
    jobs.cancel_job(gpufleet_proto::v1::CancelJobRequest {
        job_id: victim.id.clone(),
        reason: String::new(),
    })
    .await?;
    let steady = cluster
        .submit_spec(JobSpec {
            priority: 1,
            ..spec(4, &["sleep", "300"])
        })
        .await?;
    cluster
        .wait_job(&steady.id, "to run", |j| j.state() == JobState::Running)
        .await?;
    let waiting = cluster
        .submit_spec(JobSpec {
            priority: 100,
            ..spec(2, &["true"])
        })
        .await?;
    let waiting = cluster
        .wait_job(&waiting.id, "a verdict", |j| {
            j.pending_reason
                .as_ref()
                .is_some_and(|r| r.code != "WAITING_FOR_SCHEDULER")
        })
        .await?;
    assert_eq!(waiting.state(), JobState::Pending);
    let steady = jobs
        .get_job(gpufleet_proto::v1::GetJobRequest {
            job_id: steady.id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(steady.state(), JobState::Running);
    assert_eq!(steady.preemptions, 0);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_job_is_retried_by_its_policy_then_succeeds() -> anyhow::Result<()> {
    let cluster = Cluster::start(&one_node()).await?;
    let marker = cluster.data_dir().join("attempted");
    let mut retried = spec(
        1,
        &[
            "sh",
            "-c",
            "if [ -f \"$MARKER\" ]; then echo second; else touch \"$MARKER\"; exit 9; fi",
        ],
    );
    retried
        .workload
        .as_mut()
        .map(|w| w.env.insert("MARKER".into(), marker.display().to_string()));
    retried.retry = Some(RetryPolicy {
        max_retries_on_failure: 2,
        ..Default::default()
    });
    let job = cluster.submit_spec(retried).await?;
    let job = cluster.wait_job(&job.id, "to end", terminal).await?;
    assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
    assert_eq!(job.attempt, 1);
    assert_eq!(job.failure_retries, 1);
    assert!(
        job.history[0].contains("exited with code 9"),
        "{:?}",
        job.history
    );
    assert_eq!(
        gpufleet_tests::job_log(&cluster, &job.id, 0).await?.trim(),
        "second"
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_runtime_stops_a_job() -> anyhow::Result<()> {
    let cluster = Cluster::start(&one_node()).await?;
    let job = cluster
        .submit_spec(JobSpec {
            max_runtime_seconds: 1,
            ..spec(1, &["sleep", "300"])
        })
        .await?;
    let job = cluster.wait_job(&job.id, "to end", terminal).await?;
    assert_eq!(job.state(), JobState::Failed);
    assert!(job.message.contains("max runtime"), "{}", job.message);
    let job = cluster
        .wait_job(&job.id, "its task to stop", |j| {
            j.tasks[0].state() == WorkloadState::Stopped
        })
        .await?;
    assert_eq!(job.tasks[0].signal, Some(15));
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cordon_keeps_new_work_off_and_drain_evicts_at_the_deadline() -> anyhow::Result<()> {
    let nodes = vec![
        NodeSpec::new("cheap", "lambda", "us-west-1", "2xH100-SXM-80GB", 2.99),
        NodeSpec::new("dear", "aws", "us-west-1", "2xH100-SXM-80GB", 3.93),
    ];
    let cluster = Cluster::start(&nodes).await?;
    let mut fleet = cluster.fleet().await?;
    let node = fleet
        .cordon_node(CordonNodeRequest {
            node_id: "cheap".into(),
            reason: "maintenance".into(),
        })
        .await?
        .into_inner();
    assert!(node.cordoned);
    let job = cluster.submit(1, &["true"]).await?;
    let job = cluster.wait_job(&job.id, "to end", terminal).await?;
    assert_eq!(
        job.tasks[0].node_id, "dear",
        "the cordoned cheaper node got no work"
    );
    fleet
        .uncordon_node(UncordonNodeRequest {
            node_id: "cheap".into(),
        })
        .await?;

    // A long job lands on the cheap node; draining it evicts the job, which
    // is queued again and runs on the other node.
    let long = cluster
        .submit_spec(JobSpec {
            ..spec(2, &["sleep", "300"])
        })
        .await?;
    let long = cluster
        .wait_job(&long.id, "to run", |j| j.state() == JobState::Running)
        .await?;
    assert_eq!(long.tasks[0].node_id, "cheap");
    fleet
        .drain_node(DrainNodeRequest {
            node_id: "cheap".into(),
            deadline_seconds: 0,
        })
        .await?;
    let long = cluster
        .wait_job(&long.id, "to run again elsewhere", |j| {
            j.attempt == 1 && j.state() == JobState::Running
        })
        .await?;
    assert_eq!(long.tasks[0].node_id, "dear");
    assert!(long.history[0].contains("drained"), "{:?}", long.history);
    let node = fleet
        .get_node(GetNodeRequest {
            node_id: "cheap".into(),
        })
        .await?
        .into_inner();
    assert!(node.cordoned && node.drain_deadline.is_some());
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_breaks_capacity_down_by_region() -> anyhow::Result<()> {
    let nodes = vec![
        NodeSpec::new("euw", "aws", "eu-west-1", "4xH100-SXM-80GB", 2.50),
        NodeSpec::new("euc", "aws", "eu-central-1", "4xH100-SXM-80GB", 3.40),
        NodeSpec::new("use", "aws", "us-east-1", "4xH100-SXM-80GB", 2.00),
    ];
    let cluster = Cluster::start(&nodes).await?;
    let busy = cluster
        .submit_spec(JobSpec {
            constraints: Some(JobConstraints {
                regions: vec!["eu-west-1".into()],
                ..Default::default()
            }),
            ..spec(4, &["sleep", "300"])
        })
        .await?;
    cluster
        .wait_job(&busy.id, "to run", |j| j.state() == JobState::Running)
        .await?;
    let job = cluster
        .submit_spec(JobSpec {
            constraints: Some(JobConstraints {
                exclude_regions: vec!["us-east-1".into()],
                max_price_per_gpu_hour_micro_usd: Some(3_000_000),
                ..Default::default()
            }),
            ..spec(4, &["true"])
        })
        .await?;
    cluster
        .wait_job(&job.id, "a verdict", |j| {
            j.pending_reason
                .as_ref()
                .is_some_and(|r| r.code != "WAITING_FOR_SCHEDULER")
        })
        .await?;
    let mut jobs = cluster.jobs().await?;
    let explained = jobs
        .explain_job(ExplainJobRequest {
            job_id: job.id.clone(),
        })
        .await?
        .into_inner();
    let verdict = |region: &str| {
        explained
            .regions
            .iter()
            .find(|r| r.region == region)
            .map(|r| (r.verdict.clone(), r.detail.clone()))
            .unwrap_or_default()
    };
    assert_eq!(
        verdict("eu-west-1").0,
        "all_allocated",
        "{:?}",
        explained.regions
    );
    assert_eq!(verdict("eu-central-1").0, "over_bid");
    assert!(
        verdict("eu-central-1").1.contains("$3.40/h (over bid)"),
        "{}",
        verdict("eu-central-1").1
    );
    assert_eq!(verdict("us-east-1").0, "region_filter");
    assert!(
        explained
            .summary
            .contains("eu-west-1 has 4 matching GPUs, all allocated"),
        "{}",
        explained.summary
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    cluster.shutdown().await
}
