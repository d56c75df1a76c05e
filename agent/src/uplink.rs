//! The connection to the controller: one long-lived `AgentControl.Connect`
//! stream, redialled with exponential backoff whenever it breaks.
//!
//! With several controllers (`controller = "URL,URL,URL"`, docs/ha.md) the
//! agent dials one at a time: a standby answers `UNAVAILABLE` naming the
//! leader, and the agent dials that leader at once; a controller that
//! cannot be reached makes it try the next one. The hello on every new
//! stream resyncs the new leader with what runs here.
//!
//! Up: a hello carrying every workload's current status, then every event
//! still in the [`Outbox`] (telemetry and workload status changes, written
//! there first by the sampler and [`record_statuses`]) in seq order, then
//! new events as they are appended; log responses and heartbeats go
//! unsequenced (seq 0). The controller acknowledges each seq it applied and
//! the outbox forgets everything up to it, so a partition or a restart of
//! either side replays exactly what is not yet applied.
//! Down: desired state (reconciled by the supervisor), log requests, acks.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpufleet_proto::v1::agent_control_client::AgentControlClient;
use gpufleet_proto::v1::agent_message::Body;
use gpufleet_proto::v1::controller_message;
use gpufleet_proto::v1::{
    AgentHello, AgentMessage, ControllerMessage, LogRequest, LogResponse, TelemetryBatch,
    WorkloadStatus,
};
use rand::Rng;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tonic::{Code, Status};
use tracing::{debug, error, info, warn};

use crate::outbox::Outbox;
use crate::supervisor::Supervisor;
use crate::telemetry::Telemetry;

const OUTBOUND_CAPACITY: usize = 1024;
/// Outbox events read per sled scan while replaying.
const REPLAY_BATCH: usize = 256;
const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most status changes written to the outbox with one disk sync.
const MAX_STATUS_BATCH: usize = 256;
/// Longest wait for the controller to answer the opened stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the uplink needs; runs until shutdown.
pub(crate) struct Uplink {
    /// Every controller this agent was given.
    controllers: Vec<String>,
    /// The one it dials now.
    pub(crate) controller: std::sync::Mutex<String>,
    pub(crate) join_token: String,
    pub(crate) sample_interval: Duration,
    pub(crate) supervisor: Supervisor,
    pub(crate) telemetry: Arc<Telemetry>,
    outbox: Arc<Outbox>,
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
    #[error("{url} is a standby; the leader is at {leader}")]
    Redirected { url: String, leader: String },
    #[error("the controller did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Outbox(#[from] crate::outbox::OutboxError),
    #[error("a MIG layout was applied or refused; saying hello again")]
    InventoryChanged,
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

/// The leader a standby named in its answer.
fn leader_hint(status: &Status) -> Option<String> {
    status
        .metadata()
        .get(gpufleet_core::leader::LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.starts_with("http://") || v.starts_with("https://"))
        .map(str::to_string)
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

/// Lowest sequence number of this agent process. The controller ignores
/// anything at or below the last seq it applied, so a restarted agent must
/// never go back: starting at unix-millis × 1000 is above any earlier run
/// unless that run averaged over 1000 messages per millisecond, and the
/// outbox starts above whatever it still holds in any case.
pub(crate) fn initial_seq() -> u64 {
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
        outbox: Arc<Outbox>,
    ) -> Self {
        let controllers = gpufleet_core::leader::controller_list(&controller);
        Self {
            controller: std::sync::Mutex::new(controllers.first().cloned().unwrap_or(controller)),
            controllers,
            join_token,
            sample_interval,
            supervisor,
            telemetry,
            outbox,
            tls: None,
            node_secret: None,
        }
    }

    /// The controller dialled now.
    fn target(&self) -> String {
        self.controller
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// After a failed session: the named leader, or the next controller.
    fn retarget(&self, err: &SessionError) {
        let current = self.target();
        let next = match err {
            SessionError::Redirected { leader, .. } => leader.clone(),
            _ if self.controllers.len() > 1 => {
                gpufleet_core::leader::next_controller(&self.controllers, &current, None)
            }
            _ => return,
        };
        if next != current {
            info!(from = %current, to = %next, "dialling another controller");
            *self.controller.lock().unwrap_or_else(|p| p.into_inner()) = next;
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
            self.retarget(&err);
            if let SessionError::Redirected { .. } = err {
                // A standby named the leader: dial it now.
                backoff.reset();
                info!("{err}");
                continue;
            }
            let text = err.to_string();
            if matches!(err, SessionError::InventoryChanged) {
                info!(controller = %self.target(), "{text}");
            } else if outage.as_deref() != Some(text.as_str()) {
                match err {
                    SessionError::Rejected { .. } => {
                        error!(controller = %self.target(), "{text}; retrying")
                    }
                    _ => warn!(controller = %self.target(), "{text}; retrying"),
                }
                outage = Some(text);
            } else {
                debug!(controller = %self.target(), "{text}; retrying");
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
            // Live, not the GPUs at start: a MIG layout may have changed.
            gpus: self.supervisor.gpus(),
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
            refused_mig_layouts: self.supervisor.refused_mig_layouts(),
        }
    }

    /// One stream's lifetime. Sets `healthy` once the controller accepted
    /// the hello.
    async fn session(&self, healthy: &mut bool) -> Result<(), SessionError> {
        let url = self.target();
        let connect_err = |cause: String| SessionError::Connect {
            url: url.clone(),
            cause,
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| connect_err(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            // A controller that stops answering without closing the
            // connection (paused, partitioned) is left within 15 s, so the
            // agent finds the new leader soon after a failover (docs/ha.md).
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
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

        let (tx, rx) = mpsc::channel::<AgentMessage>(OUTBOUND_CAPACITY);
        // The hello is not sequenced: the controller's answer says which
        // seqs it already applied, and the replay starts above that.
        // Cannot fail: the receiver is alive and the channel empty.
        let _ = tx.send(unsequenced(Body::Hello(self.hello()))).await;

        let response = tokio::time::timeout(OPEN_TIMEOUT, client.connect(ReceiverStream::new(rx)))
            .await
            .map_err(|_| SessionError::Timeout(OPEN_TIMEOUT))?
            .map_err(|s| match leader_hint(&s) {
                Some(leader) if leader != url => SessionError::Redirected {
                    url: url.clone(),
                    leader,
                },
                _ => SessionError::from_status(s, true),
            })?;
        let mut inbound = response.into_inner();

        let mut heartbeat = self.sample_interval;
        let mut heartbeat_tick = ticker(heartbeat);
        let mut last_sent = Instant::now();
        // Highest seq handed to the stream; `None` until the hello ack says
        // where to start.
        let mut sent_up_to: Option<u64> = None;
        let mut backlog: VecDeque<AgentMessage> = VecDeque::new();
        let inventory = self.supervisor.inventory_changed();
        loop {
            // Registered before reading the outbox, so an append between
            // the read and the wait still wakes us.
            let appended = self.outbox.appended();
            tokio::pin!(appended);
            appended.as_mut().enable();
            if let (Some(after), true) = (sent_up_to, backlog.is_empty()) {
                backlog.extend(self.outbox.after(after, REPLAY_BATCH)?);
            }
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(m)) => {
                        if let Some(hb) = self.handle(m, &tx, healthy, &mut sent_up_to)? {
                            heartbeat = hb;
                            heartbeat_tick = ticker(heartbeat);
                        }
                    }
                    Ok(None) => return Err(SessionError::Ended),
                    Err(status) => return Err(SessionError::from_status(status, !*healthy)),
                },
                permit = tx.reserve(), if !backlog.is_empty() => {
                    let permit = permit.map_err(|_| SessionError::Ended)?;
                    if let Some(message) = backlog.pop_front() {
                        sent_up_to = Some(message.seq);
                        permit.send(message);
                        last_sent = Instant::now();
                    }
                },
                _ = &mut appended, if sent_up_to.is_some() && backlog.is_empty() => {},
                // A new hello carries the new GPUs; the outbox replays
                // whatever the controller has not acknowledged.
                _ = inventory.notified() => return Err(SessionError::InventoryChanged),
                _ = heartbeat_tick.tick() => {
                    if last_sent.elapsed() >= heartbeat {
                        let _ = tx.try_send(unsequenced(Body::Telemetry(TelemetryBatch::default())));
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
        tx: &mpsc::Sender<AgentMessage>,
        healthy: &mut bool,
        sent_up_to: &mut Option<u64>,
    ) -> Result<Option<Duration>, SessionError> {
        let Some(body) = message.body else {
            return Ok(None);
        };
        Ok(match body {
            controller_message::Body::HelloAck(ack) => {
                *healthy = true;
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
                // Everything up to last_seq is applied; never hand out a seq
                // at or below it (e.g. after this host's clock went back).
                self.outbox.ack(ack.last_seq)?;
                self.outbox.raise_next_seq(ack.last_seq);
                *sent_up_to = Some(ack.last_seq);
                let backlog = self.outbox.stats().events;
                info!(node_id = %ack.node_id, controller = %self.target(), backlog, "connected to the controller");
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
                    // Replies are correlated by request id, not sequenced.
                    let _ = tx.send(unsequenced(Body::LogResponse(response))).await;
                });
                None
            }
            controller_message::Body::Ack(ack) => {
                // Acks are cumulative; 0 acknowledges an unsequenced message.
                if ack.seq > 0 {
                    self.outbox.ack(ack.seq)?;
                }
                None
            }
        })
    }
}

/// A message outside the outbox's sequence (hello, heartbeat, log reply):
/// the controller applies it without touching its last applied seq.
fn unsequenced(body: Body) -> AgentMessage {
    AgentMessage {
        seq: 0,
        body: Some(body),
    }
}

/// Writes every workload status change to the outbox until `stop`, so
/// changes made while the controller is unreachable are delivered, in
/// order, after it is back. Stopped after the workloads are (at shutdown),
/// so their last statuses are kept for the next run to send.
pub(crate) async fn record_statuses(
    supervisor: Supervisor,
    outbox: Arc<Outbox>,
    mut stop: watch::Receiver<bool>,
) {
    let mut events = supervisor.subscribe();
    loop {
        let (statuses, last) = tokio::select! {
            biased;
            event = events.recv() => match event {
                Ok(status) => (with_queued(status, &mut events, &supervisor), false),
                // Missed some changes: the current statuses cover them.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    warn!(missed, "workload status changes came faster than the outbox took them; recording the current statuses");
                    (supervisor.statuses(), false)
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = stop.wait_for(|s| *s) => {
                let mut rest = Vec::new();
                loop {
                    match events.try_recv() {
                        Ok(status) => rest.push(status),
                        Err(broadcast::error::TryRecvError::Lagged(_)) => {
                            rest = supervisor.statuses();
                            break;
                        }
                        Err(_) => break,
                    }
                }
                (rest, true)
            }
        };
        if !statuses.is_empty() {
            append_statuses(&outbox, statuses).await;
        }
        if last {
            return;
        }
    }
}

/// `first` and the changes already queued behind it (up to
/// [`MAX_STATUS_BATCH`]): what came in while the last batch was being
/// written goes to disk as one batch.
fn with_queued(
    first: WorkloadStatus,
    events: &mut broadcast::Receiver<WorkloadStatus>,
    supervisor: &Supervisor,
) -> Vec<WorkloadStatus> {
    let mut statuses = vec![first];
    while statuses.len() < MAX_STATUS_BATCH {
        match events.try_recv() {
            Ok(status) => statuses.push(status),
            Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                warn!(
                    missed,
                    "workload status changes came faster than the outbox took them; recording the current statuses"
                );
                statuses.extend(supervisor.statuses());
            }
            Err(_) => break,
        }
    }
    statuses
}

async fn append_statuses(outbox: &Arc<Outbox>, statuses: Vec<WorkloadStatus>) {
    let outbox = outbox.clone();
    // Status appends are flushed to disk (once per batch): off the async
    // workers.
    let written = tokio::task::spawn_blocking(move || {
        outbox.append_all(statuses.into_iter().map(Body::WorkloadStatus))
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            error!(error = %e, "cannot record a workload status change in the outbox; the hello after the next reconnect carries it")
        }
        Err(e) => error!(error = %e, "recording a workload status change panicked"),
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
