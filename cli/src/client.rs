//! Connecting to the controller, and turning failures into one clear line.
//!
//! `--controller` may name several controllers that share etcd
//! (`URL,URL,URL`, docs/ha.md): [`channel`] asks each in turn whether it
//! serves (gRPC health); a standby answers NOT_SERVING, and its answer to a
//! call names the leader (`gpufleet-leader`), which is dialled next. So a
//! command reaches the leader whichever controller it was pointed at.

use anyhow::Context;
use gpufleet_proto::v1::fleet_client::FleetClient;
use gpufleet_proto::v1::jobs_client::JobsClient;
use gpufleet_proto::v1::telemetry_client::TelemetryClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

static CA_FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
static TOKEN: std::sync::OnceLock<Option<MetadataValue<Ascii>>> = std::sync::OnceLock::new();

/// The `--ca-file` of this invocation (set once, before any call).
pub fn set_ca_file(path: Option<std::path::PathBuf>) {
    let _ = CA_FILE.set(path);
}

/// The token of this invocation, from `--token` or `--token-file` (set
/// once, before any call).
pub fn set_token(
    token: Option<String>,
    token_file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let text = match (token, token_file) {
        (Some(token), _) => Some(token),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --token-file {}", path.display()))?,
        ),
        (None, None) => None,
    };
    let value =
        match text.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
            Some(token) => Some(MetadataValue::try_from(format!("Bearer {token}")).context(
                "the token has characters that cannot be sent in a header; copy it again",
            )?),
            None => None,
        };
    let _ = TOKEN.set(value);
    Ok(())
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Debug, Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// A given token (rather than this invocation's flags).
    pub fn with(token: &str) -> anyhow::Result<Self> {
        Ok(Self(Some(
            MetadataValue::try_from(format!("Bearer {token}"))
                .context("the token has characters that cannot be sent in a header")?,
        )))
    }

    /// Sends no token (a client that relies on the controller's refusal).
    pub fn none() -> Self {
        Self(None)
    }
}

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A connection to the controller that carries the token.
pub type Authed = InterceptedService<Channel, BearerToken>;

pub async fn channel(address: &str) -> anyhow::Result<Authed> {
    let channel = leader_channel(address).await?;
    Ok(InterceptedService::new(
        channel,
        BearerToken(TOKEN.get().cloned().flatten()),
    ))
}

async fn raw_channel(address: &str) -> anyhow::Result<Channel> {
    let uri = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(uri.clone())
        .with_context(|| {
            format!(
                "--controller {address:?} is not a valid address; use e.g. http://127.0.0.1:7070"
            )
        })?
        .connect_timeout(std::time::Duration::from_secs(5));
    let endpoint = match CA_FILE.get().and_then(|p| p.as_ref()) {
        Some(ca) => {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read --ca-file {}", ca.display()))?;
            endpoint
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(pem)),
                )
                .context("invalid TLS settings")?
        }
        // Without --ca-file, an https controller needs a publicly trusted certificate.
        None if uri.starts_with("https://") => endpoint
            .tls_config(tonic::transport::ClientTlsConfig::new().with_webpki_roots())
            .context("invalid TLS settings")?,
        None => endpoint,
    };
    endpoint.connect().await.with_context(|| {
        format!(
            "cannot reach the controller at {uri}; is it running? Start a local one with `gpufleet dev`, or point --controller / GPUFLEET_CONTROLLER at yours"
        )
    })
}

/// How long [`leader_channel`] waits for one controller's answer.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A connection to the leader among the comma-separated `addresses`.
pub async fn leader_channel(addresses: &str) -> anyhow::Result<Channel> {
    use gpufleet_core::leader::{LEADER_METADATA, MAX_CONTROLLERS, controller_list};
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let mut candidates: std::collections::VecDeque<String> =
        controller_list(addresses).into_iter().collect();
    if candidates.len() > MAX_CONTROLLERS {
        anyhow::bail!("--controller names more than {MAX_CONTROLLERS} controllers");
    }
    if candidates.len() <= 1 {
        // One controller: no probe, its own answers say the rest.
        return raw_channel(candidates.pop_front().as_deref().unwrap_or(addresses)).await;
    }
    let mut tried = std::collections::HashSet::new();
    let mut last_error = None;
    while let Some(url) = candidates.pop_front() {
        if !tried.insert(url.clone()) || tried.len() > 2 * MAX_CONTROLLERS {
            continue;
        }
        let channel = match tokio::time::timeout(2 * PROBE_TIMEOUT, raw_channel(&url)).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                last_error = Some(e);
                continue;
            }
            Err(_) => {
                last_error = Some(anyhow::anyhow!(
                    "{url} did not answer within {:?}",
                    2 * PROBE_TIMEOUT
                ));
                continue;
            }
        };
        // A controller that accepts connections but does not answer (a
        // paused process) is skipped after PROBE_TIMEOUT.
        let health = tokio::time::timeout(
            PROBE_TIMEOUT,
            HealthClient::new(channel.clone()).check(HealthCheckRequest {
                service: String::new(),
            }),
        )
        .await;
        if matches!(&health, Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving) {
            return Ok(channel);
        }
        // Not serving: a standby names the leader in its answer to any
        // call (it reads nothing: this one carries no token).
        let probe = tokio::time::timeout(
            PROBE_TIMEOUT,
            FleetClient::new(channel.clone())
                .list_nodes(gpufleet_proto::v1::ListNodesRequest::default()),
        )
        .await;
        let probe = match probe {
            Ok(probe) => probe,
            Err(_) => {
                last_error = Some(anyhow::anyhow!(
                    "{url} did not answer within {PROBE_TIMEOUT:?}"
                ));
                continue;
            }
        };
        match probe {
            Err(status) if status.code() == tonic::Code::Unavailable => {
                if let Some(leader) = status
                    .metadata()
                    .get(LEADER_METADATA)
                    .and_then(|v| v.to_str().ok())
                {
                    candidates.push_front(leader.to_string());
                }
                last_error = Some(anyhow::Error::new(status));
            }
            // A leader whose store cannot write says so itself.
            _ => return Ok(channel),
        }
    }
    Err(last_error
        .unwrap_or_else(|| anyhow::anyhow!("no controller answered"))
        .context(format!("no leader among the controllers {addresses}")))
}

pub async fn jobs(address: &str) -> anyhow::Result<JobsClient<Authed>> {
    Ok(JobsClient::new(channel(address).await?))
}

pub async fn fleet(address: &str) -> anyhow::Result<FleetClient<Authed>> {
    Ok(FleetClient::new(channel(address).await?))
}

pub async fn telemetry(address: &str) -> anyhow::Result<TelemetryClient<Authed>> {
    Ok(TelemetryClient::new(channel(address).await?))
}

/// The error chain as one line; gRPC statuses show their code and message.
pub fn describe(err: &anyhow::Error) -> String {
    if let Some(status) = err.downcast_ref::<tonic::Status>() {
        return format!("{} ({:?}){}", status.message(), status.code(), hint(status));
    }
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        if let Some(status) = cause.downcast_ref::<tonic::Status>() {
            text.push_str(&format!(
                ": {} ({:?}){}",
                status.message(),
                status.code(),
                hint(status)
            ));
            break;
        }
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

/// [`describe`], naming the controller when the connection to it failed
/// (it died or went away mid-call or mid-stream), so that the message
/// says which server was lost rather than only "broken pipe".
pub fn describe_for(err: &anyhow::Error, address: &str) -> String {
    let text = describe(err);
    let status = err.chain().find_map(|c| c.downcast_ref::<tonic::Status>());
    // A status the server sent has no source; one the client made from
    // a transport failure has.
    let connection_lost = status.is_some_and(|s| std::error::Error::source(s).is_some());
    if connection_lost {
        format!("lost the connection to the controller at {address}: {text}")
    } else {
        text
    }
}

fn hint(status: &tonic::Status) -> &'static str {
    if status.code() == tonic::Code::Unauthenticated && TOKEN.get().cloned().flatten().is_none() {
        "\nhint: pass --token or --token-file, or set GPUFLEET_TOKEN"
    } else {
        ""
    }
}
