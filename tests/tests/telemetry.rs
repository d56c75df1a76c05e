//! Fleet telemetry end to end: simulated agents sample every 200 ms; the
//! controller keeps latest samples and rollups, answers the Telemetry API
//! and exposes fleet gauges on /metrics.

use std::time::{Duration, SystemTime};

use gpufleet_proto::v1::agent_control_client::AgentControlClient;
use gpufleet_proto::v1::{
    AgentHello, AgentMessage, CapacityDimension, GetAggregatesRequest, GetHistoryRequest,
    GetLatestRequest, GpuInfo, GpuSample, NodeIdentity, TelemetryBatch, agent_message,
};
use gpufleet_tests::{Cluster, eventually, two_nodes};
use prost_types::Timestamp;
use tonic::Code;
use tonic::transport::Channel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_history_aggregates_and_metrics() -> anyhow::Result<()> {
    let cluster = Cluster::start(&two_nodes()).await?;
    let mut telemetry = cluster.telemetry().await?;

    // Every GPU of both nodes reports.
    let latest = eventually("a sample from all 8 GPUs", || {
        let mut telemetry = telemetry.clone();
        async move {
            let response = telemetry
                .get_latest(GetLatestRequest::default())
                .await?
                .into_inner();
            let reporting = response.gpus.iter().filter(|g| g.sample.is_some()).count();
            Ok((response.gpus.len() == 8 && reporting == 8).then_some(response))
        }
    })
    .await?;
    for gpu in &latest.gpus {
        let sample = gpu.sample.as_ref().expect("checked above");
        assert_eq!(Some(&sample.uuid), gpu.info.as_ref().map(|i| &i.uuid));
        assert!(sample.gpu_utilization_percent.is_some());
    }
    assert_eq!(latest.nodes.len(), 2);
    assert!(
        latest
            .nodes
            .iter()
            .all(|n| n.samples_accepted > 0 && n.samples_dropped == 0)
    );

    // Filters: by provider, and by one GPU.
    let aws = telemetry
        .get_latest(GetLatestRequest {
            provider: "aws".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(aws.gpus.len(), 4);
    assert!(aws.gpus.iter().all(|g| g.node_id == "node-a"));
    let uuid = aws.gpus[0].info.clone().unwrap_or_default().uuid;
    let one = telemetry
        .get_latest(GetLatestRequest {
            gpu_uuid: uuid.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(one.gpus.len(), 1);

    // History: the current minute is there before any flush.
    let start = Timestamp::from(SystemTime::now() - Duration::from_secs(600));
    let history = telemetry
        .get_history(GetHistoryRequest {
            gpu_uuid: uuid.clone(),
            metric: "util".into(),
            start: Some(start),
            step_seconds: 60,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(history.metric, "gpu_utilization_percent");
    assert_eq!(history.series.len(), 1);
    let points = &history.series[0].points;
    assert!(!points.is_empty(), "{history:?}");
    assert!(points.iter().all(|p| p.samples > 0 && p.max >= p.mean));
    // By node: one series per GPU.
    let by_node = telemetry
        .get_history(GetHistoryRequest {
            node_id: "node-b".into(),
            metric: "power_usage_milliwatts".into(),
            start: Some(start),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(by_node.series.len(), 4);
    // Tiny steps and huge ranges are refused with the limit named.
    let err = telemetry
        .get_history(GetHistoryRequest {
            gpu_uuid: uuid.clone(),
            metric: "util".into(),
            start: Some(Timestamp::from(
                SystemTime::now() - Duration::from_secs(30 * 86_400),
            )),
            step_seconds: 60,
            ..Default::default()
        })
        .await
        .expect_err("a month at one minute is over the cap");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("10000"), "{}", err.message());
    let err = telemetry
        .get_history(GetHistoryRequest {
            gpu_uuid: uuid.clone(),
            metric: "no_such_metric".into(),
            start: Some(start),
            ..Default::default()
        })
        .await
        .expect_err("unknown metric");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("gpu_utilization_percent"));

    // Aggregates group by provider.
    let aggregates = telemetry
        .get_aggregates(GetAggregatesRequest {
            group_by: vec![CapacityDimension::Provider as i32],
        })
        .await?
        .into_inner();
    let groups: Vec<(&str, u32, u32)> = aggregates
        .groups
        .iter()
        .map(|g| (g.provider.as_str(), g.gpus, g.reporting_gpus))
        .collect();
    assert_eq!(groups, vec![("aws", 4, 4), ("lambda", 4, 4)]);
    let total = aggregates.total.unwrap_or_default();
    assert_eq!(total.gpus, 8);
    assert!(total.total_power_watts > 0.0, "{total:?}");
    assert!(total.memory_total_bytes >= 8 * 80_000_000_000, "{total:?}");

    // /metrics has the fleet gauges.
    let metrics = cluster.scrape_metrics().await?;
    for line in [
        "gpufleet_fleet_gpus{provider=\"aws\",region=\"us-east-1\",generation=\"hopper\",state=\"total\"} 4",
        "gpufleet_fleet_gpus{provider=\"lambda\",region=\"us-west-1\",generation=\"ampere\",state=\"free\"} 4",
        "gpufleet_gpus_reporting{provider=\"aws\",region=\"us-east-1\",generation=\"hopper\"} 4",
        "gpufleet_nodes{state=\"ready\"} 2",
        "gpufleet_telemetry_samples_dropped_total{node=\"node-a\",reason=\"out_of_range\"} 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    assert!(metrics.contains("# TYPE gpufleet_gpu_power_watts gauge"));
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_samples_are_dropped_and_counted_never_stored() -> anyhow::Result<()> {
    let cluster = Cluster::start(&[]).await?;
    let channel = Channel::from_shared(cluster.endpoint())?.connect().await?;
    let mut client = AgentControlClient::new(channel);
    let now = SystemTime::now();
    let good = |util: u32, at: SystemTime| GpuSample {
        uuid: "GPU-raw-0".into(),
        sampled_at: Some(Timestamp::from(at)),
        gpu_utilization_percent: Some(util),
        memory_used_bytes: Some(1),
        memory_total_bytes: Some(2),
        ..Default::default()
    };
    let mut overfull = good(10, now + Duration::from_millis(2));
    overfull.memory_used_bytes = Some(3);
    let batch = vec![
        good(40, now),
        good(101, now + Duration::from_millis(1)),
        overfull,
        GpuSample {
            uuid: "GPU-not-mine".into(),
            ..good(10, now + Duration::from_millis(3))
        },
        // The same instant again: a repeat (stale). An earlier time would
        // be accepted into its minute, as replays after a partition are.
        good(10, now),
        good(10, now + Duration::from_secs(86_400)),
        GpuSample {
            sampled_at: None,
            ..good(10, now + Duration::from_millis(4))
        },
    ];
    let messages = vec![
        AgentMessage {
            seq: 1,
            body: Some(agent_message::Body::Hello(AgentHello {
                identity: Some(NodeIdentity {
                    node_id: "raw".into(),
                    provider: "onprem".into(),
                    region: "lab".into(),
                    ..Default::default()
                }),
                gpus: vec![GpuInfo {
                    uuid: "GPU-raw-0".into(),
                    ..Default::default()
                }],
                join_token: gpufleet_tests::JOIN_TOKEN.into(),
                ..Default::default()
            })),
        },
        AgentMessage {
            seq: 2,
            body: Some(agent_message::Body::Telemetry(TelemetryBatch {
                samples: batch,
            })),
        },
    ];
    // Keep the stream open until the counters show up.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for message in messages {
        tx.send(message).await?;
    }
    let _downlink = client
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?;
    let mut telemetry = cluster.telemetry().await?;
    let response = eventually("the raw node's counters", || {
        let mut telemetry = telemetry.clone();
        async move {
            let response = telemetry
                .get_latest(GetLatestRequest {
                    node_id: "raw".into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let done = response
                .nodes
                .first()
                .is_some_and(|n| n.samples_accepted + n.samples_dropped == 7);
            Ok(done.then_some(response))
        }
    })
    .await?;
    let stats = &response.nodes[0];
    assert_eq!(stats.samples_accepted, 1);
    assert_eq!(stats.samples_dropped, 6);
    assert_eq!(stats.dropped_by_reason.get("out_of_range"), Some(&2));
    assert_eq!(stats.dropped_by_reason.get("unknown_gpu"), Some(&1));
    assert_eq!(stats.dropped_by_reason.get("stale"), Some(&1));
    assert_eq!(stats.dropped_by_reason.get("future"), Some(&1));
    assert_eq!(stats.dropped_by_reason.get("bad_timestamp"), Some(&1));
    // Only the good sample is the latest; history holds only its value.
    assert_eq!(
        response.gpus[0]
            .sample
            .as_ref()
            .and_then(|s| s.gpu_utilization_percent),
        Some(40)
    );
    let history = telemetry
        .get_history(GetHistoryRequest {
            gpu_uuid: "GPU-raw-0".into(),
            metric: "util".into(),
            start: Some(Timestamp::from(now - Duration::from_secs(120))),
            ..Default::default()
        })
        .await?
        .into_inner();
    let points = &history.series[0].points;
    assert_eq!(points.len(), 1);
    assert_eq!(
        (points[0].mean, points[0].max, points[0].samples),
        (40.0, 40.0, 1)
    );
    let metrics = cluster.scrape_metrics().await?;
    assert!(
        metrics.contains(
            "gpufleet_telemetry_samples_dropped_total{node=\"raw\",reason=\"out_of_range\"} 2\n"
        ),
        "{metrics}"
    );
    drop(tx);
    cluster.shutdown().await
}
