//! The clouds' documented spot-interruption notices, read from their
//! instance metadata services:
//!
//! - **AWS**: `PUT /latest/api/token` (IMDSv2), then
//!   `GET /latest/meta-data/spot/instance-action` (404 until a notice;
//!   `{"action": "terminate", "time": "…Z"}`, two minutes ahead) and
//!   `GET /latest/meta-data/events/recommendations/rebalance`
//!   (`{"noticeTime": "…Z"}`, a recommendation, not a reclaim).
//! - **GCP**: `GET /computeMetadata/v1/instance/preempted?wait_for_change=true`
//!   with `Metadata-Flavor: Google`: `TRUE` once preempted; 30 seconds
//!   notice. The request waits on the server for a change (etag).
//! - **Azure**: `GET /metadata/scheduledevents?api-version=2020-07-01` with
//!   `Metadata: true`: an event of type `Preempt` whose `NotBefore` (an
//!   RFC 1123 date) is the deadline, 30 seconds or more ahead.
//!
//! Endpoints are configurable, so tests (and `gpufleet dev`) point them at
//! the mock server in [`super::mock`], which serves these same formats.

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::http::{self, Endpoint};

/// Notice periods the clouds document, used when an answer has no time.
pub const AWS_NOTICE: Duration = Duration::from_secs(120);
pub const GCP_NOTICE: Duration = Duration::from_secs(30);
pub const AZURE_NOTICE: Duration = Duration::from_secs(30);
/// How long a GCP request may wait on the server for a change.
const GCP_WAIT_SECS: u64 = 30;

/// A pending interruption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// "aws", "gcp" or "azure".
    pub source: &'static str,
    /// "terminate", "stop", "hibernate", "preempt" or "rebalance".
    pub action: String,
    pub deadline: SystemTime,
    /// The document as served.
    pub detail: String,
}

impl Notice {
    /// A rebalance recommendation reclaims nothing yet.
    pub fn reclaims(&self) -> bool {
        self.action != "rebalance"
    }
}

/// Which cloud's metadata service to watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    Aws,
    Gcp,
    Azure,
}

impl Cloud {
    pub fn parse(text: &str) -> Result<Option<Self>, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "none" => Ok(None),
            "aws" => Ok(Some(Self::Aws)),
            "gcp" => Ok(Some(Self::Gcp)),
            "azure" => Ok(Some(Self::Azure)),
            other => Err(format!(
                "{other:?} is not a cloud whose interruption notices the agent reads; use none, aws, gcp or azure"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Aws => "aws",
            Self::Gcp => "gcp",
            Self::Azure => "azure",
        }
    }

    /// The metadata service's documented address.
    pub fn default_endpoint(self) -> &'static str {
        match self {
            Self::Aws | Self::Azure => "169.254.169.254:80",
            Self::Gcp => "metadata.google.internal:80",
        }
    }
}

/// A cloud's metadata service, with what it needs between polls.
#[derive(Debug)]
pub struct Metadata {
    cloud: Cloud,
    endpoint: Endpoint,
    timeout: Duration,
    aws_token: Option<String>,
    gcp_etag: Option<String>,
}

#[derive(Deserialize)]
struct AwsAction {
    action: String,
    time: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AwsRebalance {
    notice_time: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AzureEvents {
    #[serde(default)]
    events: Vec<AzureEvent>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AzureEvent {
    event_type: String,
    #[serde(default)]
    not_before: String,
}

fn rfc3339(text: &str, what: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(text.trim())
        .map_err(|e| format!("{what} {text:?} is not an RFC 3339 time: {e}"))
}

impl Metadata {
    pub fn new(cloud: Cloud, endpoint: Endpoint, timeout: Duration) -> Self {
        Self {
            cloud,
            endpoint,
            timeout,
            aws_token: None,
            gcp_etag: None,
        }
    }

    pub fn cloud(&self) -> Cloud {
        self.cloud
    }

    /// Whether the service itself waits for a change (no pause needed
    /// between polls).
    pub fn long_polls(&self) -> bool {
        self.cloud == Cloud::Gcp
    }

    /// One look at the service: a notice, or None while there is none.
    pub async fn poll(&mut self, now: SystemTime) -> Result<Option<Notice>, String> {
        match self.cloud {
            Cloud::Aws => self.poll_aws(now).await,
            Cloud::Gcp => self.poll_gcp(now).await,
            Cloud::Azure => self.poll_azure(now).await,
        }
    }

    async fn aws_get(&mut self, path: &str) -> Result<http::Answer, String> {
        for _ in 0..2 {
            let token = match &self.aws_token {
                Some(token) => token.clone(),
                None => {
                    let answer = http::call(
                        &self.endpoint,
                        hyper::Method::PUT,
                        "/latest/api/token",
                        &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
                        self.timeout,
                    )
                    .await?;
                    if answer.status != 200 {
                        return Err(format!(
                            "the IMDSv2 token request answered {}",
                            answer.status
                        ));
                    }
                    self.aws_token = Some(answer.body.trim().to_string());
                    answer.body.trim().to_string()
                }
            };
            let answer = http::call(
                &self.endpoint,
                hyper::Method::GET,
                path,
                &[("X-aws-ec2-metadata-token", token.as_str())],
                self.timeout,
            )
            .await?;
            if answer.status == 401 {
                // The token expired: take a new one, once.
                self.aws_token = None;
                continue;
            }
            return Ok(answer);
        }
        Err("the metadata service refused a fresh IMDSv2 token".to_string())
    }

    async fn poll_aws(&mut self, now: SystemTime) -> Result<Option<Notice>, String> {
        let answer = self
            .aws_get("/latest/meta-data/spot/instance-action")
            .await?;
        match answer.status {
            200 => {
                let action: AwsAction = serde_json::from_str(&answer.body)
                    .map_err(|e| format!("spot/instance-action is not the documented JSON: {e}"))?;
                let deadline = rfc3339(&action.time, "spot/instance-action time")?;
                return Ok(Some(Notice {
                    source: "aws",
                    action: action.action,
                    deadline,
                    detail: answer.body,
                }));
            }
            404 => {}
            other => return Err(format!("spot/instance-action answered {other}")),
        }
        let answer = self
            .aws_get("/latest/meta-data/events/recommendations/rebalance")
            .await?;
        match answer.status {
            200 => {
                let rebalance: AwsRebalance = serde_json::from_str(&answer.body).map_err(|e| {
                    format!("events/recommendations/rebalance is not the documented JSON: {e}")
                })?;
                let noticed = rfc3339(&rebalance.notice_time, "rebalance noticeTime")?;
                Ok(Some(Notice {
                    source: "aws",
                    action: "rebalance".to_string(),
                    deadline: noticed.max(now) + AWS_NOTICE,
                    detail: answer.body,
                }))
            }
            404 => Ok(None),
            other => Err(format!("events/recommendations/rebalance answered {other}")),
        }
    }

    async fn poll_gcp(&mut self, now: SystemTime) -> Result<Option<Notice>, String> {
        let mut path = format!(
            "/computeMetadata/v1/instance/preempted?wait_for_change=true&timeout_sec={GCP_WAIT_SECS}"
        );
        if let Some(etag) = &self.gcp_etag {
            path.push_str("&last_etag=");
            path.push_str(etag);
        }
        let answer = http::call(
            &self.endpoint,
            hyper::Method::GET,
            &path,
            &[("Metadata-Flavor", "Google")],
            self.timeout + Duration::from_secs(GCP_WAIT_SECS),
        )
        .await?;
        if answer.status != 200 {
            return Err(format!("instance/preempted answered {}", answer.status));
        }
        self.gcp_etag = answer
            .etag
            .filter(|e| e.chars().all(|c| c.is_ascii_alphanumeric()));
        match answer.body.trim() {
            "TRUE" => Ok(Some(Notice {
                source: "gcp",
                action: "preempt".to_string(),
                deadline: now + GCP_NOTICE,
                detail: answer.body,
            })),
            "FALSE" => Ok(None),
            other => Err(format!(
                "instance/preempted answered {other:?}, not TRUE or FALSE"
            )),
        }
    }

    async fn poll_azure(&mut self, now: SystemTime) -> Result<Option<Notice>, String> {
        let answer = http::call(
            &self.endpoint,
            hyper::Method::GET,
            "/metadata/scheduledevents?api-version=2020-07-01",
            &[("Metadata", "true")],
            self.timeout,
        )
        .await?;
        if answer.status != 200 {
            return Err(format!("scheduledevents answered {}", answer.status));
        }
        let events: AzureEvents = serde_json::from_str(&answer.body)
            .map_err(|e| format!("scheduledevents is not the documented JSON: {e}"))?;
        let Some(event) = events.events.iter().find(|e| e.event_type == "Preempt") else {
            return Ok(None);
        };
        let deadline = if event.not_before.trim().is_empty() {
            now + AZURE_NOTICE
        } else {
            httpdate::parse_http_date(event.not_before.trim()).map_err(|e| {
                format!(
                    "NotBefore {:?} is not an RFC 1123 date: {e}",
                    event.not_before
                )
            })?
        };
        Ok(Some(Notice {
            source: "azure",
            action: "preempt".to_string(),
            deadline,
            detail: answer.body,
        }))
    }
}
