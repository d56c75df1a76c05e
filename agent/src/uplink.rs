//! The connection to the controller: one long-lived `AgentControl.Connect`
//! stream, redialled with exponential backoff whenever it breaks.
//!
//! Up: a hello carrying every workload's current status (so status changes
//! missed while disconnected are recovered on reconnect), then telemetry
//! (which doubles as heartbeat), workload status changes and log responses.
//! Down: desired state (reconciled by the supervisor) and log requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpufleet_proto::v1::agent_control_client::AgentControlClient;
use gpufleet_proto::v1::agent_message::Body;
use gpufleet_proto::v1::controller_message;
use gpufleet_proto::v1::{
    AgentHello, AgentMessage, ControllerMessage, LogRequest, LogResponse, TelemetryBatch,
};
use rand::Rng;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tonic::{Code, Status};
use tracing::{debug, error, info, warn};

use crate::supervisor::Supervisor;
use crate::telemetry::Telemetry;

const OUTBOUND_CAPACITY: usize = 1024;
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the controller to answer the opened stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the uplink needs; runs until shutdown.
pub(crate) struct Uplink {
    pub(crate) controller: String,
    pub(crate) join_token: String,
    pub(crate) sample_interval: Duration,
    pub(crate) supervisor: Supervisor,
    pub(crate) telemetry: Arc<Telemetry>,
    seq: Arc<AtomicU64>,
    tls: Option<tonic::transport::ClientTlsConfig>,
    node_secret: Option<crate::identity::NodeSecret>,
}

/// The TLS settings for dialling the controller, from PEM files; `None`
/// for a plain `http://` controller. Without a CA, public roots are trusted.
pub(crate) fn client_tls(
    controller: &str,
    config: &crate::config::TlsClientConfig,
) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
    use anyhow::Context;
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    if !controller.trim().starts_with("https://") {
        return Ok(None);
    }
    let read = |path: &std::path::PathBuf, what: &str| {
        std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
    };
    let mut tls = match &config.ca {
        Some(ca) => ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(ca, "TLS CA (tls_ca)")?)),
        None => ClientTlsConfig::new().with_webpki_roots(),
    };
    if let (Some(cert), Some(key)) = (&config.cert, &config.key) {
        tls = tls.identity(Identity::from_pem(
            read(cert, "client certificate (tls_cert)")?,
            read(key, "client key (tls_key)")?,
        ));
    }
    Ok(Some(tls))
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot reach the controller at {url}: {cause}")]
    Connect { url: String, cause: String },
    #[error("the controller refused this agent ({code:?}): {message}")]
    Rejected { code: Code, message: String },
    #[error("the controller stream failed ({code:?}): {message}")]
    Stream { code: Code, message: String },
    #[error("the controller closed the stream")]
    Ended,
    #[error("the controller did not answer within {0:?}")]
    Timeout(Duration),
}

impl SessionError {
    fn from_status(status: Status, opening: bool) -> Self {
        let (code, message) = (status.code(), status.message().to_string());
        let refusal = matches!(
            code,
            Code::AlreadyExists
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::InvalidArgument
                | Code::FailedPrecondition
        );
        if refusal || (opening && code != Code::Unavailable && code != Code::Unknown) {
            SessionError::Rejected { code, message }
        } else {
            SessionError::Stream { code, message }
        }
    }
}

/// Exponential backoff with ±20% jitter, so a fleet that lost its
/// controller does not redial in lockstep.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            next: BACKOFF_INITIAL,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_INITIAL;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        base.mul_f64(rand::rng().random_range(0.8..1.2))
            .min(BACKOFF_MAX)
    }
}

/// First sequence number of this agent process. The controller ignores
/// anything at or below the last seq it applied, so a restarted agent must
/// never go back: starting at unix-millis × 1000 is above any earlier run
/// unless that run averaged over 1000 messages per millisecond.
fn initial_seq() -> u64 {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    millis.saturating_mul(1000)
}

impl Uplink {
    pub(crate) fn with_tls(mut self, tls: Option<tonic::transport::ClientTlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    pub(crate) fn with_node_secret(mut self, secret: crate::identity::NodeSecret) -> Self {
        self.node_secret = Some(secret);
        self
    }

    pub(crate) fn new(
        controller: String,
        join_token: String,
        sample_interval: Duration,
        supervisor: Supervisor,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            controller,
            join_token,
            sample_interval,
            supervisor,
            telemetry,
            seq: Arc::new(AtomicU64::new(initial_seq())),
            tls: None,
            node_secret: None,
        }
    }

    /// Connects, serves the session, and reconnects until `shutdown`.
    pub(crate) async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new();
        // What was last logged loudly, so that one outage logs once at
        // warn/error and the retries at debug.
        let mut outage: Option<String> = None;
        loop {
            let mut healthy = false;
            let result = tokio::select! {
                r = self.session(&mut healthy) => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            if healthy {
                backoff.reset();
                outage = None;
            }
            let err = match result {
                Ok(()) => SessionError::Ended,
                Err(e) => e,
            };
            let text = err.to_string();
            if outage.as_deref() != Some(text.as_str()) {
                match err {
                    SessionError::Rejected { .. } => {
                        error!(controller = %self.controller, "{text}; retrying")
                    }
                    _ => warn!(controller = %self.controller, "{text}; retrying"),
                }
                outage = Some(text);
            } else {
                debug!(controller = %self.controller, "{text}; retrying");
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    fn hello(&self) -> AgentHello {
        AgentHello {
            identity: Some(self.telemetry.identity.clone()),
            gpus: self.telemetry.gpus.clone(),
            join_token: self.join_token.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            driver_version: self.telemetry.driver_version.clone(),
            workloads: self.supervisor.statuses(),
            applied_generation: self.supervisor.applied_generation(),
            telemetry_interval_ms: u32::try_from(self.sample_interval.as_millis())
                .unwrap_or(u32::MAX),
            node_secret: self
                .node_secret
                .as_ref()
                .map(|s| s.get())
                .unwrap_or_default(),
        }
    }

    /// One stream's lifetime. Sets `healthy` once the controller accepted
    /// the hello.
    async fn session(&self, healthy: &mut bool) -> Result<(), SessionError> {
        let connect_err = |cause: String| SessionError::Connect {
            url: self.controller.clone(),
            cause,
        };
        let mut endpoint = Endpoint::from_shared(self.controller.clone())
            .map_err(|e| connect_err(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| connect_err(error_chain(&e)))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| connect_err(error_chain(&e)))?;
        let mut client = AgentControlClient::new(channel);

        // Subscribe before reading the statuses for the hello, so no change
        // falls between the two (a duplicate is harmless).
        let mut status_rx = self.supervisor.subscribe();
        let mut samples_rx = self.telemetry.subscribe();
        samples_rx.mark_unchanged();

        let (tx, rx) = mpsc::channel::<Body>(OUTBOUND_CAPACITY);
        // seq is assigned as tonic pulls each message, so seqs are strictly
        // increasing in wire order even with several producers.
        let seq = self.seq.clone();
        let outbound = ReceiverStream::new(rx).map(move |body| AgentMessage {
            seq: seq.fetch_add(1, Ordering::Relaxed),
            body: Some(body),
        });
        // Cannot fail: the receiver is alive and the channel empty.
        let _ = tx.send(Body::Hello(self.hello())).await;

        let response = tokio::time::timeout(OPEN_TIMEOUT, client.connect(outbound))
            .await
            .map_err(|_| SessionError::Timeout(OPEN_TIMEOUT))?
            .map_err(|s| SessionError::from_status(s, true))?;
        let mut inbound = response.into_inner();

        let mut heartbeat = self.sample_interval;
        let mut heartbeat_tick = ticker(heartbeat);
        let mut last_sent = Instant::now();
        let mut dropped_batches: u64 = 0;
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(m)) => {
                        if let Some(hb) = self.handle(m, &tx, healthy) {
                            heartbeat = hb;
                            heartbeat_tick = ticker(heartbeat);
                        }
                    }
                    Ok(None) => return Err(SessionError::Ended),
                    Err(status) => return Err(SessionError::from_status(status, !*healthy)),
                },
                event = status_rx.recv() => {
                    let statuses = match event {
                        Ok(status) => vec![status],
                        // Missed some changes: the current statuses cover them.
                        Err(broadcast::error::RecvError::Lagged(_)) => self.supervisor.statuses(),
                        Err(broadcast::error::RecvError::Closed) => return Err(SessionError::Ended),
                    };
                    for status in statuses {
                        // Status changes are never dropped: wait for room.
                        tx.send(Body::WorkloadStatus(status)).await.map_err(|_| SessionError::Ended)?;
                    }
                    last_sent = Instant::now();
                },
                changed = samples_rx.changed() => {
                    if changed.is_err() {
                        return Err(SessionError::Ended);
                    }
                    let samples = samples_rx.borrow_and_update().as_ref().clone();
                    // Telemetry may be dropped when the stream is backed up;
                    // the next batch supersedes it.
                    if tx.try_send(Body::Telemetry(TelemetryBatch { samples })).is_err() {
                        dropped_batches += 1;
                        debug!(dropped_batches, "outbound queue full; telemetry batch dropped");
                    }
                    last_sent = Instant::now();
                },
                _ = heartbeat_tick.tick() => {
                    if last_sent.elapsed() >= heartbeat {
                        let _ = tx.try_send(Body::Telemetry(TelemetryBatch::default()));
                        last_sent = Instant::now();
                    }
                },
            }
        }
    }

    /// Handles one controller message; returns a new heartbeat interval when
    /// the controller set one.
    fn handle(
        &self,
        message: ControllerMessage,
        tx: &mpsc::Sender<Body>,
        healthy: &mut bool,
    ) -> Option<Duration> {
        match message.body? {
            controller_message::Body::HelloAck(ack) => {
                *healthy = true;
                // Never send at or below what the controller already applied
                // (e.g. after this host's clock went backwards).
                self.seq
                    .fetch_max(ack.last_seq.saturating_add(1), Ordering::Relaxed);
                if !ack.node_secret.is_empty()
                    && let Some(secret) = &self.node_secret
                {
                    match secret.save(&ack.node_secret) {
                        Ok(()) => {
                            info!(node_id = %ack.node_id, path = %secret.path().display(), "node identity bound; node secret stored")
                        }
                        Err(e) => error!(
                            node_id = %ack.node_id,
                            path = %secret.path().display(),
                            error = %e,
                            "cannot store the node secret: after a restart this agent cannot register as this node until an admin runs `gpufleet nodes reset-identity`"
                        ),
                    }
                }
                info!(node_id = %ack.node_id, controller = %self.controller, "connected to the controller");
                (ack.heartbeat_interval_ms > 0)
                    .then(|| Duration::from_millis(u64::from(ack.heartbeat_interval_ms)))
            }
            controller_message::Body::DesiredState(desired) => {
                debug!(
                    generation = desired.generation,
                    allocations = desired.allocations.len(),
                    "desired state"
                );
                self.supervisor.reconcile(&desired);
                None
            }
            controller_message::Body::LogRequest(request) => {
                let supervisor = self.supervisor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let response = answer_log_request(&supervisor, request).await;
                    let _ = tx.send(Body::LogResponse(response)).await;
                });
                None
            }
            controller_message::Body::Ack(_) => None,
        }
    }
}

async fn answer_log_request(supervisor: &Supervisor, request: LogRequest) -> LogResponse {
    match supervisor
        .read_log(&request.allocation_id, request.offset, request.max_bytes)
        .await
    {
        Ok(chunk) => LogResponse {
            request_id: request.request_id,
            chunk: Some(chunk),
            error: String::new(),
        },
        Err(e) => LogResponse {
            request_id: request.request_id,
            chunk: None,
            error: e.to_string(),
        },
    }
}

/// Ticks often enough to notice when a heartbeat is due.
fn ticker(heartbeat: Duration) -> tokio::time::Interval {
    let period = (heartbeat / 2).max(Duration::from_millis(50));
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// `e: cause: cause`, since transport errors hide the useful part in sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(160) && first <= Duration::from_millis(240));
        for _ in 0..20 {
            assert!(b.next_delay() <= BACKOFF_MAX);
        }
        assert!(b.next_delay() >= BACKOFF_MAX.mul_f64(0.8));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(240));
    }

    #[test]
    fn seq_starts_above_any_earlier_run() {
        let a = initial_seq();
        assert!(a > 1_700_000_000_000_000);
    }
}
