//! gRPC clients of the controller under test, built in one place so that
//! credentials (when the controller requires them) are added once.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use anyhow::bail;
use gpufleet_proto::v1::fleet_client::FleetClient;
use gpufleet_proto::v1::jobs_client::JobsClient;
use gpufleet_proto::v1::{ListNodesRequest, NodeState};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// `authorization: Bearer <admin token>` of the controller under test (the
/// latest one: `dispatch --etcd` starts a second controller).
static TOKEN: std::sync::RwLock<Option<MetadataValue<Ascii>>> = std::sync::RwLock::new(None);

/// Reads the bootstrap admin token the controller wrote in `data_dir`,
/// waiting for it briefly (a controller binary writes it as it starts).
pub async fn use_admin_token(controller_data_dir: &std::path::Path) -> anyhow::Result<()> {
    let path = controller_data_dir.join("admin.token");
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        match std::fs::read_to_string(&path) {
            Ok(text) if !text.trim().is_empty() => break text,
            _ if Instant::now() > deadline => {
                bail!("the controller wrote no admin token to {}", path.display())
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let value = MetadataValue::try_from(format!("Bearer {}", text.trim()))
        .context("the admin token is not a header value")?;
    *TOKEN.write().unwrap_or_else(|p| p.into_inner()) = Some(value);
    Ok(())
}

/// A connection that carries the admin token.
pub type Authed = InterceptedService<
    Channel,
    fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
>;

fn add_token(mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let token = TOKEN.read().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(value) = token {
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

/// A new connection to `endpoint` (`http://ADDR`).
pub async fn channel(endpoint: &str) -> anyhow::Result<Authed> {
    let channel = Endpoint::from_shared(endpoint.to_string())?
        .connect()
        .await?;
    Ok(InterceptedService::new(channel, add_token as fn(_) -> _))
}

/// A Jobs client on its own connection.
pub async fn jobs_client(endpoint: &str) -> anyhow::Result<JobsClient<Authed>> {
    Ok(JobsClient::new(channel(endpoint).await?))
}

pub async fn fleet_client(endpoint: &str) -> anyhow::Result<FleetClient<Authed>> {
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
