//! Delivery across a partition: the controller goes away while the agent
//! keeps sampling (every 200 ms); the agent's outbox holds what it cannot
//! send, and after the controller is back every held sample arrives, once.

use std::time::{Duration, SystemTime};

use gpufleet_agent::RunningAgent;
use gpufleet_proto::v1::{GetHistoryRequest, GetLatestRequest, JobState, WorkloadState};
use gpufleet_tests::{Cluster, NodeSpec, eventually, http_get};
use prost_types::Timestamp;

fn node() -> NodeSpec {
    NodeSpec::new("node-p", "aws", "us-east-1", "2xL4", 0.8)
}

/// Samples of every GPU of `node_id` in the controller's history (stored
/// minutes, queued ones and the current one), by GPU.
async fn history_samples(
    cluster: &Cluster,
    node_id: &str,
    since: SystemTime,
) -> anyhow::Result<Vec<u64>> {
    let mut telemetry = cluster.telemetry().await?;
    let history = telemetry
        .get_history(GetHistoryRequest {
            node_id: node_id.into(),
            metric: "util".into(),
            start: Some(Timestamp::from(since - Duration::from_secs(120))),
            end: Some(Timestamp::from(
                SystemTime::now() + Duration::from_secs(120),
            )),
            step_seconds: 60,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut counts: Vec<u64> = history
        .series
        .iter()
        .map(|s| s.points.iter().map(|p| p.samples).sum())
        .collect();
    counts.sort();
    Ok(counts)
}

/// Waits until the agent has taken `rounds` more sampling rounds.
async fn wait_rounds(agent: &RunningAgent, gpus: u64, rounds: u64) -> anyhow::Result<()> {
    let target = agent.outbox_stats().appended_samples + gpus * rounds;
    eventually(&format!("{rounds} more sampling rounds"), || async move {
        Ok((agent.outbox_stats().appended_samples >= target).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_taken_while_the_controller_is_away_arrive_once() -> anyhow::Result<()> {
    let since = SystemTime::now();
    let mut cluster = Cluster::start(&[node()]).await?;
    let gpus = cluster.agents[0].gpu_uuids().len() as u64;
    // Connected: what the agent sends is acknowledged and leaves the outbox.
    wait_rounds(&cluster.agents[0], gpus, 3).await?;
    eventually("the outbox to drain", || async {
        Ok((cluster.agents[0].outbox_stats().events <= 1).then_some(()))
    })
    .await?;

    cluster.stop_controller().await?;
    let before_outage = cluster.agents[0].outbox_stats();
    // 15 rounds (3 s at 200 ms) with nowhere to send them.
    wait_rounds(&cluster.agents[0], gpus, 15).await?;
    let during = cluster.agents[0].outbox_stats();
    assert!(
        during.events >= before_outage.events + 15,
        "the outbox holds the outage's samples: {before_outage:?} then {during:?}"
    );
    assert_eq!(during.dropped_events, 0, "64 MiB holds 3 s of samples");

    cluster.start_controller().await?;
    cluster.wait_ready(1).await?;
    // Every sample the agent ever took is in the history exactly once: the
    // ones from before the outage (written at the controller's shutdown)
    // and the ones replayed after it. The agent keeps sampling, so compare
    // against its count read after the history: the history may lag (more
    // arrives later) but may never exceed it.
    let agent = &cluster.agents[0];
    let counts = eventually("every sample in the history", || async {
        let counts = history_samples(&cluster, "node-p", since).await?;
        let produced = agent.outbox_stats().appended_samples / gpus;
        for &count in &counts {
            assert!(
                count <= produced,
                "a GPU has {count} samples in the history but the agent took only {produced}: some arrived twice"
            );
        }
        let complete = counts.len() as u64 == gpus && counts.iter().all(|&c| c == produced);
        Ok(complete.then_some(counts))
    })
    .await?;
    assert!(counts[0] >= 18, "{counts:?}");

    // The replayed samples were accepted, not dropped as stale.
    let mut telemetry = cluster.telemetry().await?;
    let latest = telemetry
        .get_latest(GetLatestRequest::default())
        .await?
        .into_inner();
    let stats = latest
        .nodes
        .iter()
        .find(|n| n.node_id == "node-p")
        .ok_or_else(|| anyhow::anyhow!("node-p has no telemetry stats"))?;
    assert_eq!(stats.samples_dropped, 0, "{stats:?}");
    assert!(stats.samples_accepted >= 15 * gpus, "{stats:?}");
    eventually("the outbox to drain after the replay", || async {
        Ok((cluster.agents[0].outbox_stats().events <= 1).then_some(()))
    })
    .await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_drops_old_telemetry_counts_it_and_keeps_status() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(&[]).await?;
    let mut config = cluster.agent_config(&node());
    // A few rounds of two GPUs' samples.
    config.outbox_max_bytes = 4096;
    config.monitoring.metrics_listen = Some("127.0.0.1:0".parse()?);
    cluster.add_agent_with(config).await?;
    cluster.wait_ready(1).await?;
    let gpus = cluster.agents[0].gpu_uuids().len() as u64;

    let job = cluster.submit(1, &["sh", "-c", "sleep 1"]).await?;
    cluster
        .wait_job(&job.id, "running", |j| j.state() == JobState::Running)
        .await?;
    cluster.stop_controller().await?;

    // The job ends during the outage; its status waits in the outbox.
    let agent = &cluster.agents[0];
    eventually("the job to end on the agent", || async {
        let done = agent
            .supervisor()
            .statuses()
            .iter()
            .any(|s| s.state() == WorkloadState::Succeeded);
        Ok(done.then_some(()))
    })
    .await?;
    let dropped = eventually("the outbox to drop telemetry", || async {
        let stats = agent.outbox_stats();
        Ok((stats.dropped_events > 0).then_some(stats))
    })
    .await?;
    wait_rounds(agent, gpus, 5).await?;
    let stats = agent.outbox_stats();
    assert!(stats.status_events >= 1, "{stats:?}");
    assert!(stats.dropped_events > dropped.dropped_events, "{stats:?}");
    assert_eq!(
        stats.dropped_samples,
        stats.dropped_events * gpus,
        "{stats:?}"
    );
    let metrics_addr = agent
        .metrics_addr()
        .ok_or_else(|| anyhow::anyhow!("the agent serves no /metrics"))?;
    let scrape = http_get(metrics_addr, "/metrics").await?;
    let exported = scrape
        .lines()
        .find(|l| l.starts_with("gpufleet_agent_outbox_dropped_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no outbox drop counter in {scrape}"))?;
    assert!(exported >= stats.dropped_events, "{exported} in {scrape}");
    assert!(scrape.contains("# TYPE gpufleet_agent_outbox_bytes gauge"));
    // Log retention's pass ran at start (nothing old to delete).
    assert!(
        scrape.contains("# TYPE gpufleet_agent_allocation_dirs_deleted_total counter"),
        "{scrape}"
    );

    cluster.start_controller().await?;
    let done = cluster
        .wait_job(&job.id, "succeeded", |j| j.state() == JobState::Succeeded)
        .await?;
    assert_eq!(done.tasks[0].exit_code, Some(0));
    eventually("the status events to be acknowledged", || async {
        Ok((cluster.agents[0].outbox_stats().status_events == 0).then_some(()))
    })
    .await?;
    cluster.shutdown().await
}
