//! A metadata service on loopback that serves the three clouds' documented
//! interruption formats (see [`super::cloud`]): the test double behind the
//! agent's interruption watcher, and the mock spot notice of `gpufleet dev`.
//! [`MockMetadata::announce`] makes it announce an interruption.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use tokio::sync::watch;

/// What the service announces now.
#[derive(Debug, Clone, Default)]
struct Announced {
    /// (action, deadline); None: nothing pending.
    notice: Option<(String, SystemTime)>,
    /// Bumped at each announcement (GCP's etag).
    version: u64,
}

/// A running mock metadata service.
#[derive(Clone)]
pub struct MockMetadata {
    addr: SocketAddr,
    state: Arc<Mutex<Announced>>,
    changed: watch::Sender<u64>,
    /// IMDSv2 tokens handed out (a test checks the agent asks for one).
    tokens: Arc<Mutex<u64>>,
}

type Shared = (Arc<Mutex<Announced>>, watch::Sender<u64>, Arc<Mutex<u64>>);

const TOKEN: &str = "mock-imdsv2-token";

impl MockMetadata {
    /// Serves on 127.0.0.1, a free port, until the runtime stops.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(Announced::default()));
        let (changed, _) = watch::channel(0);
        let tokens = Arc::new(Mutex::new(0));
        let shared: Shared = (state.clone(), changed.clone(), tokens.clone());
        let app = Router::new()
            .route("/latest/api/token", put(aws_token))
            .route("/latest/meta-data/spot/instance-action", get(aws_action))
            .route(
                "/latest/meta-data/events/recommendations/rebalance",
                get(aws_rebalance),
            )
            .route("/computeMetadata/v1/instance/preempted", get(gcp_preempted))
            .route("/metadata/scheduledevents", get(azure_events))
            .with_state(shared);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            state,
            changed,
            tokens,
        })
    }

    /// Its address, for the agent's `interruptions.endpoint`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Announces `action` ("terminate", "preempt", "rebalance") with
    /// `deadline`.
    pub fn announce(&self, action: &str, deadline: SystemTime) {
        let version = {
            let mut state = lock(&self.state);
            state.notice = Some((action.to_string(), deadline));
            state.version += 1;
            state.version
        };
        self.changed.send_replace(version);
    }

    /// IMDSv2 tokens handed out so far.
    pub fn tokens_issued(&self) -> u64 {
        *lock(&self.tokens)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn text(status: StatusCode, body: String) -> Response {
    (status, body).into_response()
}

async fn aws_token(State((_, _, tokens)): State<Shared>, headers: HeaderMap) -> Response {
    if headers
        .get("X-aws-ec2-metadata-token-ttl-seconds")
        .is_none()
    {
        return text(StatusCode::BAD_REQUEST, "missing TTL header".into());
    }
    *lock(&tokens) += 1;
    text(StatusCode::OK, TOKEN.into())
}

fn aws_authorized(headers: &HeaderMap) -> bool {
    headers.get("X-aws-ec2-metadata-token") == Some(&HeaderValue::from_static(TOKEN))
}

async fn aws_action(State((state, _, _)): State<Shared>, headers: HeaderMap) -> Response {
    if !aws_authorized(&headers) {
        return text(StatusCode::UNAUTHORIZED, String::new());
    }
    match lock(&state).notice.clone() {
        Some((action, deadline)) if action != "rebalance" => text(
            StatusCode::OK,
            format!(
                "{{\"action\": \"{}\", \"time\": \"{}\"}}",
                if action == "preempt" {
                    "terminate"
                } else {
                    &action
                },
                rfc3339(deadline)
            ),
        ),
        _ => text(StatusCode::NOT_FOUND, "Not Found".into()),
    }
}

async fn aws_rebalance(State((state, _, _)): State<Shared>, headers: HeaderMap) -> Response {
    if !aws_authorized(&headers) {
        return text(StatusCode::UNAUTHORIZED, String::new());
    }
    match lock(&state).notice.clone() {
        Some((action, deadline)) if action == "rebalance" => text(
            StatusCode::OK,
            format!(
                "{{\"noticeTime\": \"{}\"}}",
                rfc3339(deadline - crate::interruption::cloud::AWS_NOTICE)
            ),
        ),
        _ => text(StatusCode::NOT_FOUND, "Not Found".into()),
    }
}

async fn gcp_preempted(
    State((state, changed, _)): State<Shared>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let query: std::collections::HashMap<&str, &str> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .collect();
    if headers.get("Metadata-Flavor") != Some(&HeaderValue::from_static("Google")) {
        return text(
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header".into(),
        );
    }
    let version = lock(&state).version;
    let waits = query.get("wait_for_change") == Some(&"true");
    if waits && query.get("last_etag") == Some(&version.to_string().as_str()) {
        let secs: u64 = query
            .get("timeout_sec")
            .and_then(|s| s.parse().ok())
            .unwrap_or(60);
        let mut rx = changed.subscribe();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(secs),
            rx.wait_for(|v| *v != version),
        )
        .await;
    }
    let state = lock(&state).clone();
    let preempted = state
        .notice
        .as_ref()
        .is_some_and(|(action, _)| action != "rebalance");
    let mut response = text(
        StatusCode::OK,
        if preempted { "TRUE" } else { "FALSE" }.into(),
    );
    if let Ok(etag) = HeaderValue::from_str(&state.version.to_string()) {
        response.headers_mut().insert("ETag", etag);
    }
    response
}

async fn azure_events(State((state, _, _)): State<Shared>, headers: HeaderMap) -> Response {
    if headers.get("Metadata") != Some(&HeaderValue::from_static("true")) {
        return text(StatusCode::BAD_REQUEST, "Metadata header required".into());
    }
    let state = lock(&state).clone();
    let events = match &state.notice {
        Some((action, deadline)) if action != "rebalance" => format!(
            "[{{\"EventId\": \"602d9444-d2cd-49c7-8624-8643e7171297\", \"EventStatus\": \"Scheduled\", \
             \"EventType\": \"Preempt\", \"ResourceType\": \"VirtualMachine\", \"Resources\": [\"gpufleet-mock\"], \
             \"NotBefore\": \"{}\", \"Description\": \"Spot VM eviction\", \"EventSource\": \"Platform\", \
             \"DurationInSeconds\": -1}}]",
            httpdate::fmt_http_date(*deadline)
        ),
        _ => "[]".to_string(),
    };
    text(
        StatusCode::OK,
        format!(
            "{{\"DocumentIncarnation\": {}, \"Events\": {events}}}",
            state.version
        ),
    )
}
