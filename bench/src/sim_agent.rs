//! Simulated agents: raw `AgentControl` streams that look like real agents
//! to a controller (hello with GPUs, telemetry batches, workload status),
//! without NVML or processes. Shared by `ingest` and `load`.

use std::time::SystemTime;

use gpufleet_proto::v1::agent_control_client::AgentControlClient;
use gpufleet_proto::v1::{
    AgentHello, AgentMessage, ControllerMessage, GpuInfo, GpuSample, NodeIdentity, agent_message,
};
use prost_types::Timestamp;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

/// The join token of the benchmarks' controllers and agents.
pub const BENCH_JOIN_TOKEN: &str = "bench-join-token";

/// Node id of simulated agent `node`.
pub fn node_id(node: usize) -> String {
    format!("bench-{node:05}")
}

pub fn gpu_uuid(node: usize, gpu: usize) -> String {
    format!("GPU-{node:08x}-0000-4000-8000-{gpu:012x}")
}

/// The first message of a simulated agent: `gpus` H100s, spread over four
/// providers and seven regions by node number.
pub fn hello_message(node: usize, gpus: usize) -> AgentMessage {
    AgentMessage {
        seq: 1,
        body: Some(agent_message::Body::Hello(AgentHello {
            identity: Some(NodeIdentity {
                node_id: node_id(node),
                provider: ["aws", "gcp", "lambda", "coreweave"][node % 4].into(),
                region: format!("region-{}", node % 7),
                ..Default::default()
            }),
            gpus: (0..gpus)
                .map(|g| GpuInfo {
                    index: g as u32,
                    uuid: gpu_uuid(node, g),
                    model: "H100-SXM-80GB".into(),
                    memory_bytes: 80 << 30,
                    ..Default::default()
                })
                .collect(),
            join_token: BENCH_JOIN_TOKEN.to_string(),
            // Fixed per node, so a reconnecting simulated agent is still
            // the node it registered as.
            node_secret: format!("bench-node-secret-{node:05}-0123456789"),
            ..Default::default()
        })),
    }
}

/// One batch: every GPU of the node at time `at`.
pub fn batch(uuids: &[String], at: SystemTime, k: u64) -> Vec<GpuSample> {
    let ts = Timestamp::from(at);
    uuids
        .iter()
        .enumerate()
        .map(|(i, uuid)| GpuSample {
            uuid: uuid.clone(),
            index: i as u32,
            sampled_at: Some(ts),
            gpu_utilization_percent: Some(((k + i as u64) % 101) as u32),
            memory_utilization_percent: Some(40),
            memory_used_bytes: Some(40 << 30),
            memory_total_bytes: Some(80 << 30),
            temperature_celsius: Some(60),
            power_usage_milliwatts: Some(500_000),
            power_limit_milliwatts: Some(700_000),
            sm_clock_mhz: Some(1980),
            memory_clock_mhz: Some(2619),
            ..Default::default()
        })
        .collect()
}

/// An open `AgentControl.Connect` stream: messages up through `uplink`,
/// the controller's answers from `downlink`.
pub struct Connection {
    pub uplink: mpsc::Sender<AgentMessage>,
    pub downlink: Streaming<ControllerMessage>,
}

/// Dials `endpoint` on its own connection and opens the stream, sending
/// `first` (a hello, for a controller) before anything else.
pub async fn connect(endpoint: String, first: Option<AgentMessage>) -> anyhow::Result<Connection> {
    let channel: Channel = Endpoint::from_shared(endpoint)?.connect().await?;
    let (uplink, rx) = mpsc::channel::<AgentMessage>(32);
    if let Some(first) = first {
        uplink.send(first).await?;
    }
    let mut client = AgentControlClient::new(channel);
    let downlink = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    Ok(Connection { uplink, downlink })
}
