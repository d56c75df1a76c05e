//! gRPC clients of the controller under test, built in one place so that
//! credentials (when the controller requires them) are added once.

use std::time::{Duration, Instant};

use anyhow::bail;
use gpufleet_proto::v1::fleet_client::FleetClient;
use gpufleet_proto::v1::jobs_client::JobsClient;
use gpufleet_proto::v1::{ListNodesRequest, NodeState};
use tonic::transport::{Channel, Endpoint};

/// A new connection to `endpoint` (`http://ADDR`).
pub async fn channel(endpoint: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(endpoint.to_string())?
        .connect()
        .await?)
}

/// A Jobs client on its own connection.
pub async fn jobs_client(endpoint: &str) -> anyhow::Result<JobsClient<Channel>> {
    Ok(JobsClient::new(channel(endpoint).await?))
}

pub async fn fleet_client(endpoint: &str) -> anyhow::Result<FleetClient<Channel>> {
    Ok(FleetClient::new(channel(endpoint).await?))
}

/// Polls until `count` nodes are Ready and connected, or fails after `within`.
pub async fn wait_nodes_ready(
    endpoint: &str,
    count: usize,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let ready = match fleet_client(endpoint).await {
            Ok(mut fleet) => match fleet.list_nodes(ListNodesRequest::default()).await {
                Ok(nodes) => nodes
                    .into_inner()
                    .nodes
                    .iter()
                    .filter(|n| n.state() == NodeState::Ready && n.connected)
                    .count(),
                Err(_) => 0,
            },
            Err(_) => 0,
        };
        if ready >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {ready} of {count} nodes were Ready after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
