//! The controller's core: node registry with leases, jobs and their
//! allocations, desired state per node. Everything here is plain Rust over
//! prost records; the gRPC services are adapters on top.
//!
//! One mutex guards the state. Critical sections never await; store writes
//! happen inside them so that a change is durable before it is announced
//! (write first, then act).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use gpufleet_proto::v1::{
    AgentHello, Allocation, CapacityDimension, CapacityGroup, ControllerMessage, DesiredState,
    GetCapacityResponse, GpuHealth, GpuSample, GpuStatus, HelloAck, Job, JobSpec, JobState,
    ListJobsResponse, LogChunk, LogRequest, LogResponse, Node, NodeState, PendingReason,
    TaskStatus, WorkloadState, WorkloadStatus, controller_message,
};
use prost_types::Timestamp;
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};

use crate::config::ControllerConfig;
use crate::error::{ControllerError, Result};
use crate::scheduler::{self, FleetSnapshot, GpuSlot, NodeSnapshot, PlacementRequest};
use crate::store::{Keyspace, Store, WriteBatch, load_all};
use crate::validate;

/// Capacity of each agent's downlink channel.
const DOWNLINK_CAPACITY: usize = 256;
/// How long a log request to an agent may take.
const LOG_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Agents are asked to send something at least this often.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

pub fn now_ts() -> Timestamp {
    Timestamp::from(SystemTime::now())
}

pub fn is_terminal_job(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost
    )
}

pub fn is_terminal_workload(state: WorkloadState) -> bool {
    matches!(
        state,
        WorkloadState::Succeeded
            | WorkloadState::Failed
            | WorkloadState::Stopped
            | WorkloadState::Lost
    )
}

/// A task holds its GPUs until the agent says it ended (or its node is lost).
fn task_holds_gpus(task: &TaskStatus) -> bool {
    !is_terminal_workload(task.state())
}

/// The live half of a node: what is not persisted.
struct NodeEntry {
    record: Node,
    last_seen: Instant,
    session: Option<Session>,
    generation: u64,
    last_seq: u64,
    /// Allocation ids last sent, to skip sending an unchanged set.
    last_sent: Option<Vec<String>>,
    /// A desired-state message could not be queued; resend on the next tick.
    resend: bool,
    latest: HashMap<String, GpuSample>,
}

struct Session {
    id: u64,
    tx: mpsc::Sender<ControllerMessage>,
}

#[derive(Default)]
struct State {
    nodes: BTreeMap<String, NodeEntry>,
    jobs: HashMap<String, Job>,
}

/// What an agent gets back for a successful hello.
pub struct AgentSession {
    pub node_id: String,
    pub session_id: u64,
    pub downlink: mpsc::Receiver<ControllerMessage>,
}

struct Inner {
    config: ControllerConfig,
    store: Box<dyn Store>,
    known_models: Vec<String>,
    state: Mutex<State>,
    job_events: broadcast::Sender<Job>,
    schedule: Notify,
    log_waiters: Mutex<HashMap<String, oneshot::Sender<LogResponse>>>,
    next_session: AtomicU64,
    /// Flipped once on shutdown; every stream and task watches it.
    closing: watch::Sender<bool>,
}

/// Cheap to clone; every clone is the same controller.
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

impl Controller {
    /// Rebuilds the state from the store. Nodes come back NotReady and
    /// disconnected; they turn Ready when their agents reconnect.
    pub fn open(
        config: ControllerConfig,
        store: Box<dyn Store>,
        known_models: Vec<String>,
    ) -> Result<Self> {
        let mut state = State::default();
        let now = Instant::now();
        for mut node in load_all::<Node>(store.as_ref(), Keyspace::Nodes)? {
            let id = node
                .identity
                .as_ref()
                .map(|i| i.node_id.clone())
                .unwrap_or_default();
            node.connected = false;
            if node.state() == NodeState::Ready {
                node.set_state(NodeState::NotReady);
            }
            state.nodes.insert(
                id,
                NodeEntry {
                    record: node,
                    last_seen: now,
                    session: None,
                    generation: 0,
                    last_seq: 0,
                    last_sent: None,
                    resend: false,
                    latest: HashMap::new(),
                },
            );
        }
        for job in load_all::<Job>(store.as_ref(), Keyspace::Jobs)? {
            state.jobs.insert(job.id.clone(), job);
        }
        tracing::info!(
            nodes = state.nodes.len(),
            jobs = state.jobs.len(),
            "state loaded from store"
        );
        let (job_events, _) = broadcast::channel(1024);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                store,
                known_models,
                state: Mutex::new(state),
                job_events,
                schedule: Notify::new(),
                log_waiters: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
                closing: watch::channel(false).0,
            }),
        })
    }

    /// Ends every open stream and background loop.
    pub fn close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Resolves once `close` was called.
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closing = self.inner.closing.subscribe();
        async move {
            let _ = closing.wait_for(|closed| *closed).await;
        }
    }

    /// A handle that does not keep the controller (and its store) alive.
    pub fn downgrade(&self) -> std::sync::Weak<impl Sized + use<>> {
        Arc::downgrade(&self.inner)
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.inner.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves state that is still
        // consistent with the store (writes precede mutation), so continue.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn known_models(&self, state: &State) -> Vec<String> {
        let mut models: BTreeSet<String> = self.inner.known_models.iter().cloned().collect();
        for entry in state.nodes.values() {
            for gpu in &entry.record.gpus {
                if let Some(info) = gpu.info.as_ref().filter(|i| !i.model.is_empty()) {
                    models.insert(info.model.clone());
                }
            }
        }
        models.into_iter().collect()
    }

    // ---------------------------------------------------------------- jobs

    pub fn submit_job(&self, spec: JobSpec) -> Result<Job> {
        let mut state = self.lock();
        let spec = validate::job_spec(spec, &self.known_models(&state))?;
        let id = loop {
            let candidate = format!("job-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            if !state.jobs.contains_key(&candidate) {
                break candidate;
            }
        };
        let job = Job {
            id: id.clone(),
            spec: Some(spec),
            state: JobState::Pending as i32,
            pending_reason: Some(PendingReason {
                code: scheduler::reason::WAITING_FOR_SCHEDULER.to_string(),
                message: "waiting for the next scheduling pass".to_string(),
                exclusions: Vec::new(),
            }),
            created_at: Some(now_ts()),
            version: 1,
            ..Default::default()
        };
        let mut batch = WriteBatch::default();
        batch.put(Keyspace::Jobs, &id, &job);
        self.inner.store.apply(batch)?;
        state.jobs.insert(id.clone(), job.clone());
        drop(state);
        tracing::info!(job_id = %id, "job submitted");
        let _ = self.inner.job_events.send(job.clone());
        self.inner.schedule.notify_one();
        Ok(job)
    }

    pub fn get_job(&self, id: &str) -> Result<Job> {
        validate::job_id("job_id", id)?;
        self.lock()
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| ControllerError::NotFound(format!("job {id} does not exist")))
    }

    pub fn list_jobs(
        &self,
        states: &[JobState],
        tenant: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<ListJobsResponse> {
        let page_size = match page_size {
            0 => 100,
            n if n > 1000 => {
                return Err(ControllerError::invalid(
                    "page_size",
                    format!("is {n}; at most 1000"),
                ));
            }
            n => n as usize,
        };
        // Newest first: order by (created_at, id) descending. The token is
        // the sort key of the last job returned.
        let after = if page_token.is_empty() {
            None
        } else {
            Some(parse_page_token(page_token)?)
        };
        let state = self.lock();
        let mut jobs: Vec<&Job> = state
            .jobs
            .values()
            .filter(|job| states.is_empty() || states.contains(&job.state()))
            .filter(|job| {
                tenant.is_empty() || job.spec.as_ref().is_some_and(|s| s.tenant == tenant)
            })
            .filter(|job| after.as_ref().is_none_or(|key| sort_key(job) < *key))
            .collect();
        jobs.sort_by_key(|job| std::cmp::Reverse(sort_key(job)));
        let more = jobs.len() > page_size;
        jobs.truncate(page_size);
        let next_page_token = match (more, jobs.last()) {
            (true, Some(last)) => {
                let (nanos, id) = sort_key(last);
                format!("{nanos}:{id}")
            }
            _ => String::new(),
        };
        Ok(ListJobsResponse {
            jobs: jobs.into_iter().cloned().collect(),
            next_page_token,
        })
    }

    pub fn cancel_job(&self, id: &str, reason: &str) -> Result<Job> {
        validate::job_id("job_id", id)?;
        let mut state = self.lock();
        let Some(job) = state.jobs.get(id) else {
            return Err(ControllerError::NotFound(format!(
                "job {id} does not exist"
            )));
        };
        if is_terminal_job(job.state()) {
            return Ok(job.clone());
        }
        let mut job = job.clone();
        job.set_state(JobState::Cancelled);
        job.pending_reason = None;
        job.finished_at = Some(now_ts());
        job.message = if reason.is_empty() {
            "cancelled by request".to_string()
        } else {
            format!("cancelled: {reason}")
        };
        // Tasks the agent never acknowledged would otherwise hold their GPUs
        // forever: nothing is running to report an end.
        for task in &mut job.tasks {
            if task.state() == WorkloadState::Unspecified {
                task.set_state(WorkloadState::Stopped);
                task.message = "cancelled before it started".to_string();
                task.finished_at = Some(now_ts());
            }
        }
        job.version += 1;
        let nodes = job_nodes(&job);
        self.commit_jobs(&mut state, vec![job.clone()])?;
        for node_id in nodes {
            self.push_desired(&mut state, &node_id, false);
        }
        drop(state);
        tracing::info!(job_id = %id, "job cancelled");
        self.inner.schedule.notify_one();
        Ok(job)
    }

    /// Every job change, as it happens. Subscribe before reading the
    /// current job to miss nothing.
    pub fn subscribe_jobs(&self) -> broadcast::Receiver<Job> {
        self.inner.job_events.subscribe()
    }

    /// Persists changed jobs (one atomic batch), then updates memory and
    /// announces them.
    fn commit_jobs(&self, state: &mut State, jobs: Vec<Job>) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for job in &jobs {
            batch.put(Keyspace::Jobs, &job.id, job);
        }
        self.inner.store.apply(batch)?;
        for job in jobs {
            state.jobs.insert(job.id.clone(), job.clone());
            let _ = self.inner.job_events.send(job);
        }
        Ok(())
    }

    // ----------------------------------------------------------- scheduling

    /// Waits until something may have made a pending job placeable.
    pub async fn schedule_wanted(&self) {
        self.inner.schedule.notified().await;
    }

    pub fn request_schedule(&self) {
        self.inner.schedule.notify_one();
    }

    /// One scheduling pass over every pending job, oldest first.
    pub fn schedule_pass(&self) -> Result<usize> {
        let mut state = self.lock();
        let mut snapshot = snapshot(&state);
        let mut pending: Vec<&Job> = state
            .jobs
            .values()
            .filter(|j| j.state() == JobState::Pending)
            .collect();
        pending.sort_by_key(|j| sort_key(j));
        let mut changed = Vec::new();
        let mut placed = 0;
        let now = now_ts();
        for job in pending {
            let Some(spec) = job.spec.as_ref() else {
                continue;
            };
            let constraints = spec.constraints.clone().unwrap_or_default();
            let request = PlacementRequest {
                tasks: spec.tasks,
                gpus_per_task: spec.gpus_per_task,
                constraints: &constraints,
            };
            match snapshot.place(request) {
                Ok(placements) => {
                    let mut job = job.clone();
                    job.set_state(JobState::Scheduled);
                    job.pending_reason = None;
                    job.scheduled_at = Some(now);
                    job.tasks = placements
                        .into_iter()
                        .enumerate()
                        .map(|(index, p)| TaskStatus {
                            index: index as u32,
                            allocation_id: format!("{}.{index}", job.id),
                            node_id: p.node_id,
                            gpu_uuids: p.gpu_uuids,
                            provider: p.provider,
                            region: p.region,
                            price_per_gpu_hour_micro_usd: p.price_per_gpu_hour_micro_usd,
                            ..Default::default()
                        })
                        .collect();
                    job.version += 1;
                    tracing::info!(job_id = %job.id, nodes = ?job_nodes(&job), "job scheduled");
                    placed += 1;
                    changed.push(job);
                }
                Err(reason) => {
                    if job.pending_reason.as_ref() != Some(&reason) {
                        let mut job = job.clone();
                        job.pending_reason = Some(reason);
                        job.version += 1;
                        changed.push(job);
                    }
                }
            }
        }
        let touched: BTreeSet<String> = changed.iter().flat_map(job_nodes).collect();
        self.commit_jobs(&mut state, changed)?;
        for node_id in touched {
            self.push_desired(&mut state, &node_id, false);
        }
        Ok(placed)
    }

    // ------------------------------------------------------------ agents

    /// Registers an agent's stream. Refuses a node id that another live
    /// agent holds.
    pub fn connect_agent(&self, hello: AgentHello) -> Result<AgentSession> {
        let identity = hello
            .identity
            .clone()
            .ok_or_else(|| ControllerError::invalid("hello.identity", "is required"))?;
        validate::node_id("hello.identity.node_id", &identity.node_id)?;
        for (field, value) in [
            ("provider", &identity.provider),
            ("region", &identity.region),
        ] {
            if value.is_empty() {
                return Err(ControllerError::invalid(
                    format!("hello.identity.{field}"),
                    format!("is empty; configure the agent's {field}"),
                ));
            }
        }
        let token = &self.inner.config.join_token;
        if !token.is_empty() && hello.join_token != *token {
            return Err(ControllerError::PermissionDenied(format!(
                "node {}: the join token is wrong; configure the agent with the controller's join token",
                identity.node_id
            )));
        }
        let mut seen = HashSet::new();
        for gpu in &hello.gpus {
            if gpu.uuid.is_empty() || !seen.insert(gpu.uuid.as_str()) {
                return Err(ControllerError::invalid(
                    "hello.gpus",
                    format!(
                        "GPU UUIDs must be present and unique; {:?} is not",
                        gpu.uuid
                    ),
                ));
            }
        }

        let node_id = identity.node_id.clone();
        let mut state = self.lock();
        let now = Instant::now();
        if let Some(entry) = state.nodes.get(&node_id)
            && entry.session.is_some()
            && now.duration_since(entry.last_seen) < self.inner.config.node_not_ready_after
        {
            {
                return Err(ControllerError::AlreadyExists(format!(
                    "node id {node_id} is held by another connected agent (host {:?}); give each agent a distinct node id (--node-id)",
                    entry
                        .record
                        .identity
                        .as_ref()
                        .map(|i| i.hostname.as_str())
                        .unwrap_or("")
                )));
            }
        }
        let (tx, rx) = mpsc::channel(DOWNLINK_CAPACITY);
        let session_id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let previous = state.nodes.remove(&node_id);
        let registered_at = previous
            .as_ref()
            .and_then(|p| p.record.registered_at)
            .unwrap_or_else(now_ts);
        let record = Node {
            identity: Some(identity),
            state: NodeState::Ready as i32,
            gpus: hello
                .gpus
                .iter()
                .map(|info| GpuStatus {
                    info: Some(info.clone()),
                    health: GpuHealth::Healthy as i32,
                    ..Default::default()
                })
                .collect(),
            registered_at: Some(registered_at),
            last_seen_at: Some(now_ts()),
            connected: true,
            agent_version: hello.agent_version.clone(),
            driver_version: hello.driver_version.clone(),
            allocated_gpus: 0,
        };
        let mut batch = WriteBatch::default();
        batch.put(Keyspace::Nodes, &node_id, &record);
        self.inner.store.apply(batch)?;
        let generation = previous
            .as_ref()
            .map_or(0, |p| p.generation)
            .max(hello.applied_generation);
        let last_seq = previous.as_ref().map_or(0, |p| p.last_seq);
        state.nodes.insert(
            node_id.clone(),
            NodeEntry {
                record,
                last_seen: now,
                session: Some(Session {
                    id: session_id,
                    tx: tx.clone(),
                }),
                generation,
                last_seq,
                last_sent: None,
                resend: false,
                latest: previous.map(|p| p.latest).unwrap_or_default(),
            },
        );
        let ack = ControllerMessage {
            body: Some(controller_message::Body::HelloAck(HelloAck {
                node_id: node_id.clone(),
                last_seq,
                heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u32,
                server_time: Some(now_ts()),
            })),
        };
        // A fresh channel has room; failing here means the receiver is gone.
        let _ = tx.try_send(ack);

        // Reconcile what the agent reports against what we believe.
        let reported: HashMap<&str, &WorkloadStatus> = hello
            .workloads
            .iter()
            .map(|w| (w.allocation_id.as_str(), w))
            .collect();
        let mut changed = Vec::new();
        for job in state.jobs.values() {
            let mut job_changed = job.clone();
            let mut touched = false;
            for task in job_changed
                .tasks
                .iter_mut()
                .filter(|t| t.node_id == node_id)
            {
                if let Some(status) = reported.get(task.allocation_id.as_str()) {
                    touched |= apply_status(task, status);
                } else if matches!(
                    task.state(),
                    WorkloadState::Starting | WorkloadState::Running
                ) {
                    task.set_state(WorkloadState::Lost);
                    task.message = "the agent reconnected without this workload (it restarted or lost track of it)".to_string();
                    task.finished_at = Some(now_ts());
                    touched = true;
                }
            }
            if touched {
                derive_job_state(&mut job_changed);
                job_changed.version += 1;
                changed.push(job_changed);
            }
        }
        self.commit_jobs(&mut state, changed)?;
        self.push_desired(&mut state, &node_id, true);
        drop(state);
        tracing::info!(node_id = %node_id, gpus = hello.gpus.len(), session_id, "agent connected");
        self.inner.schedule.notify_one();
        Ok(AgentSession {
            node_id,
            session_id,
            downlink: rx,
        })
    }

    /// The agent's stream ended.
    pub fn disconnect_agent(&self, node_id: &str, session_id: u64) {
        let mut state = self.lock();
        if let Some(entry) = state.nodes.get_mut(node_id)
            && entry.session.as_ref().is_some_and(|s| s.id == session_id)
        {
            entry.session = None;
            entry.record.connected = false;
            tracing::info!(node_id, "agent disconnected");
        }
    }

    /// Returns false when the message is a duplicate (already applied).
    pub fn accept_seq(&self, node_id: &str, seq: u64) -> bool {
        let mut state = self.lock();
        let Some(entry) = state.nodes.get_mut(node_id) else {
            return false;
        };
        entry.last_seen = Instant::now();
        if seq != 0 && seq <= entry.last_seq {
            return false;
        }
        entry.last_seq = entry.last_seq.max(seq);
        if let Some(session) = &entry.session {
            let ack = ControllerMessage {
                body: Some(controller_message::Body::Ack(gpufleet_proto::v1::Ack {
                    seq,
                })),
            };
            // Acks are cumulative: dropping one when the channel is full is harmless.
            let _ = session.tx.try_send(ack);
        }
        true
    }

    pub fn record_telemetry(&self, node_id: &str, samples: Vec<GpuSample>) {
        let mut state = self.lock();
        let mut returned = false;
        if let Some(entry) = state.nodes.get_mut(node_id) {
            entry.last_seen = Instant::now();
            entry.record.last_seen_at = Some(now_ts());
            for sample in samples {
                // The agent judges GPU health (XIDs, ECC, remaps); the
                // scheduler and capacity read it from here. Older agents
                // leave it unspecified, which keeps what the hello set.
                if sample.health != GpuHealth::Unspecified as i32
                    && let Some(gpu) = entry
                        .record
                        .gpus
                        .iter_mut()
                        .find(|g| g.info.as_ref().is_some_and(|i| i.uuid == sample.uuid))
                {
                    returned |= gpu.health == GpuHealth::Unhealthy as i32
                        && sample.health != GpuHealth::Unhealthy as i32;
                    gpu.health = sample.health;
                }
                entry.latest.insert(sample.uuid.clone(), sample);
            }
        }
        drop(state);
        if returned {
            // A GPU came back into service: pending jobs may fit now.
            self.request_schedule();
        }
    }

    /// Applies a workload status event from `node_id`.
    pub fn record_workload_status(&self, node_id: &str, status: WorkloadStatus) -> Result<()> {
        let mut state = self.lock();
        if let Some(entry) = state.nodes.get_mut(node_id) {
            entry.last_seen = Instant::now();
        }
        let job_id = if status.job_id.is_empty() {
            status
                .allocation_id
                .split('.')
                .next()
                .unwrap_or_default()
                .to_string()
        } else {
            status.job_id.clone()
        };
        let Some(job) = state.jobs.get(&job_id) else {
            tracing::debug!(node_id, allocation_id = %status.allocation_id, "status for an unknown job ignored");
            return Ok(());
        };
        let mut job = job.clone();
        let Some(task) = job
            .tasks
            .iter_mut()
            .find(|t| t.allocation_id == status.allocation_id && t.node_id == node_id)
        else {
            return Ok(());
        };
        let released = !is_terminal_workload(task.state()) && is_terminal_workload(status.state());
        if !apply_status(task, &status) {
            return Ok(());
        }
        let was_terminal = is_terminal_job(job.state());
        derive_job_state(&mut job);
        job.version += 1;
        let now_terminal = is_terminal_job(job.state());
        let nodes = job_nodes(&job);
        tracing::info!(job_id = %job.id, allocation_id = %status.allocation_id, state = ?status.state(), job_state = ?job.state(), "workload status");
        self.commit_jobs(&mut state, vec![job])?;
        if now_terminal && !was_terminal {
            for node in nodes {
                self.push_desired(&mut state, &node, false);
            }
        }
        drop(state);
        if released {
            self.inner.schedule.notify_one();
        }
        Ok(())
    }

    /// Sends the node its whole desired allocation set if it changed (or
    /// always, with `force`).
    fn push_desired(&self, state: &mut State, node_id: &str, force: bool) {
        let allocations = desired_allocations(state, node_id);
        let Some(entry) = state.nodes.get_mut(node_id) else {
            return;
        };
        let ids: Vec<String> = allocations
            .iter()
            .map(|a| a.allocation_id.clone())
            .collect();
        if !force && !entry.resend && entry.last_sent.as_ref() == Some(&ids) {
            return;
        }
        let Some(session) = &entry.session else {
            return;
        };
        entry.generation += 1;
        let message = ControllerMessage {
            body: Some(controller_message::Body::DesiredState(DesiredState {
                generation: entry.generation,
                allocations,
            })),
        };
        match session.tx.try_send(message) {
            Ok(()) => {
                entry.last_sent = Some(ids);
                entry.resend = false;
            }
            Err(_) => entry.resend = true,
        }
    }

    // -------------------------------------------------------------- leases

    /// Moves silent nodes to NotReady, then Lost; ends the tasks of lost
    /// nodes. Call about once a second.
    pub fn check_leases(&self) -> Result<()> {
        let mut state = self.lock();
        let now = Instant::now();
        let config = &self.inner.config;
        let mut node_updates = Vec::new();
        let mut lost_nodes = Vec::new();
        for (id, entry) in &mut state.nodes {
            let silent = now.duration_since(entry.last_seen);
            let next = match entry.record.state() {
                NodeState::Ready
                    if silent >= config.node_not_ready_after || entry.session.is_none() =>
                {
                    Some(NodeState::NotReady)
                }
                NodeState::NotReady if silent >= config.node_lost_after => Some(NodeState::Lost),
                _ => None,
            };
            if let Some(next) = next {
                tracing::warn!(node_id = %id, silent_for = ?silent, state = ?next, "node lease missed");
                entry.record.set_state(next);
                node_updates.push((id.clone(), entry.record.clone()));
                if next == NodeState::Lost {
                    lost_nodes.push(id.clone());
                }
            }
        }
        let mut batch = WriteBatch::default();
        for (id, record) in &node_updates {
            batch.put(Keyspace::Nodes, id, record);
        }
        self.inner.store.apply(batch)?;

        let mut changed = Vec::new();
        if !lost_nodes.is_empty() {
            for job in state.jobs.values() {
                let mut job = job.clone();
                let mut touched = false;
                for task in job
                    .tasks
                    .iter_mut()
                    .filter(|t| lost_nodes.contains(&t.node_id))
                {
                    if task_holds_gpus(task) {
                        task.set_state(WorkloadState::Lost);
                        task.message = format!("node {} was lost", task.node_id);
                        task.finished_at = Some(now_ts());
                        touched = true;
                    }
                }
                if touched {
                    derive_job_state(&mut job);
                    job.version += 1;
                    changed.push(job);
                }
            }
        }
        let touched: BTreeSet<String> = changed.iter().flat_map(job_nodes).collect();
        self.commit_jobs(&mut state, changed)?;
        let resend: Vec<String> = state
            .nodes
            .iter()
            .filter(|(_, e)| e.resend)
            .map(|(id, _)| id.clone())
            .collect();
        for node_id in touched.into_iter().chain(resend) {
            self.push_desired(&mut state, &node_id, false);
        }
        if !node_updates.is_empty() {
            self.inner.schedule.notify_one();
        }
        Ok(())
    }

    // ---------------------------------------------------------------- logs

    /// Reads part of an allocation's log from its agent.
    pub async fn fetch_log(
        &self,
        node_id: &str,
        allocation_id: &str,
        offset: u64,
        max_bytes: u32,
    ) -> Result<LogChunk> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let tx = {
            let state = self.lock();
            let entry = state.nodes.get(node_id).ok_or_else(|| {
                ControllerError::NotFound(format!("node {node_id} is not registered"))
            })?;
            entry
                .session
                .as_ref()
                .map(|s| s.tx.clone())
                .ok_or_else(|| {
                    ControllerError::Unavailable(format!(
                        "node {node_id} is not connected; its logs are readable again once its agent reconnects"
                    ))
                })?
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        self.log_waiters().insert(request_id.clone(), reply_tx);
        let request = ControllerMessage {
            body: Some(controller_message::Body::LogRequest(LogRequest {
                request_id: request_id.clone(),
                allocation_id: allocation_id.to_string(),
                offset,
                max_bytes,
            })),
        };
        if tx.send(request).await.is_err() {
            self.log_waiters().remove(&request_id);
            return Err(ControllerError::Unavailable(format!(
                "node {node_id} disconnected"
            )));
        }
        let reply = tokio::time::timeout(LOG_REQUEST_TIMEOUT, reply_rx).await;
        self.log_waiters().remove(&request_id);
        match reply {
            Ok(Ok(response)) if response.error.is_empty() => Ok(response.chunk.unwrap_or_default()),
            Ok(Ok(response)) => Err(ControllerError::FailedPrecondition(format!(
                "node {node_id} could not read the log of {allocation_id}: {}",
                response.error
            ))),
            Ok(Err(_)) => Err(ControllerError::Unavailable(format!(
                "node {node_id} disconnected"
            ))),
            Err(_) => Err(ControllerError::Unavailable(format!(
                "node {node_id} did not answer a log request within {}s",
                LOG_REQUEST_TIMEOUT.as_secs()
            ))),
        }
    }

    pub fn complete_log_request(&self, response: LogResponse) {
        if let Some(waiter) = self.log_waiters().remove(&response.request_id) {
            let _ = waiter.send(response);
        }
    }

    fn log_waiters(&self) -> MutexGuard<'_, HashMap<String, oneshot::Sender<LogResponse>>> {
        self.inner
            .log_waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    // --------------------------------------------------------------- fleet

    pub fn list_nodes(&self, provider: &str, region: &str, states: &[NodeState]) -> Vec<Node> {
        let state = self.lock();
        state
            .nodes
            .values()
            .filter(|e| {
                let identity = e.record.identity.clone().unwrap_or_default();
                (provider.is_empty() || identity.provider == provider)
                    && (region.is_empty() || identity.region == region)
                    && (states.is_empty() || states.contains(&e.record.state()))
            })
            .map(|e| node_view(&state, e))
            .collect()
    }

    pub fn get_node(&self, node_id: &str) -> Result<Node> {
        validate::node_id("node_id", node_id)?;
        let state = self.lock();
        state
            .nodes
            .get(node_id)
            .map(|e| node_view(&state, e))
            .ok_or_else(|| ControllerError::NotFound(format!("node {node_id} is not registered")))
    }

    pub fn capacity(&self, group_by: &[CapacityDimension]) -> Result<GetCapacityResponse> {
        for (i, dim) in group_by.iter().enumerate() {
            if *dim == CapacityDimension::Unspecified {
                return Err(ControllerError::invalid(
                    format!("group_by[{i}]"),
                    "accepted dimensions: provider, region, generation, model",
                ));
            }
        }
        let state = self.lock();
        let held = held_gpus(&state);
        // Group key (provider, region, generation, model) → totals and the nodes counted.
        type GroupKey = (String, String, i32, String);
        let mut groups: BTreeMap<GroupKey, (CapacityGroup, BTreeSet<String>)> = BTreeMap::new();
        let mut total = (CapacityGroup::default(), BTreeSet::new());
        for (node_id, entry) in &state.nodes {
            if entry.record.state() == NodeState::Lost {
                continue;
            }
            let identity = entry.record.identity.clone().unwrap_or_default();
            let ready = entry.record.state() == NodeState::Ready;
            for gpu in &entry.record.gpus {
                let info = gpu.info.clone().unwrap_or_default();
                let key = (
                    if group_by.contains(&CapacityDimension::Provider) {
                        identity.provider.clone()
                    } else {
                        String::new()
                    },
                    if group_by.contains(&CapacityDimension::Region) {
                        identity.region.clone()
                    } else {
                        String::new()
                    },
                    if group_by.contains(&CapacityDimension::Generation) {
                        info.generation
                    } else {
                        0
                    },
                    if group_by.contains(&CapacityDimension::Model) {
                        info.model.clone()
                    } else {
                        String::new()
                    },
                );
                let healthy = ready && gpu.health() != GpuHealth::Unhealthy;
                let allocated = held.contains_key(&info.uuid);
                let price = identity.price_per_gpu_hour_micro_usd;
                let group = groups.entry(key.clone()).or_insert_with(|| {
                    (
                        CapacityGroup {
                            provider: key.0.clone(),
                            region: key.1.clone(),
                            generation: key.2,
                            model: key.3.clone(),
                            min_price_per_gpu_hour_micro_usd: u64::MAX,
                            ..Default::default()
                        },
                        BTreeSet::new(),
                    )
                });
                if total.1.is_empty() && total.0.total_gpus == 0 {
                    total.0.min_price_per_gpu_hour_micro_usd = u64::MAX;
                }
                for (g, nodes) in [(&mut group.0, &mut group.1), (&mut total.0, &mut total.1)] {
                    nodes.insert(node_id.clone());
                    g.nodes = nodes.len() as u32;
                    g.total_gpus += 1;
                    g.healthy_gpus += healthy as u32;
                    g.allocated_gpus += allocated as u32;
                    g.free_gpus += (healthy && !allocated) as u32;
                    g.min_price_per_gpu_hour_micro_usd =
                        g.min_price_per_gpu_hour_micro_usd.min(price);
                    g.max_price_per_gpu_hour_micro_usd =
                        g.max_price_per_gpu_hour_micro_usd.max(price);
                }
            }
        }
        let fix = |mut g: CapacityGroup| {
            if g.min_price_per_gpu_hour_micro_usd == u64::MAX {
                g.min_price_per_gpu_hour_micro_usd = 0;
            }
            g
        };
        Ok(GetCapacityResponse {
            groups: if group_by.is_empty() {
                Vec::new()
            } else {
                groups.into_values().map(|(g, _)| fix(g)).collect()
            },
            total: Some(fix(total.0)),
            as_of: Some(now_ts()),
        })
    }
}

/// Applies an agent's status to a task; returns whether anything changed.
/// A terminal task never goes back to running.
fn apply_status(task: &mut TaskStatus, status: &WorkloadStatus) -> bool {
    if is_terminal_workload(task.state()) || status.state() == WorkloadState::Unspecified {
        return false;
    }
    let before = task.clone();
    task.set_state(status.state());
    task.exit_code = status.exit_code;
    task.signal = status.signal;
    task.message = status.message.clone();
    if status.started_at.is_some() {
        task.started_at = status.started_at;
    }
    if status.finished_at.is_some() {
        task.finished_at = status.finished_at;
    } else if is_terminal_workload(status.state()) && task.finished_at.is_none() {
        task.finished_at = Some(now_ts());
    }
    *task != before
}

/// Derives a non-terminal job's state from its tasks.
fn derive_job_state(job: &mut Job) {
    if is_terminal_job(job.state()) {
        return;
    }
    let now = now_ts();
    let states: Vec<WorkloadState> = job.tasks.iter().map(|t| t.state()).collect();
    if let Some(task) = job
        .tasks
        .iter()
        .find(|t| t.state() == WorkloadState::Lost)
        .cloned()
    {
        job.set_state(JobState::Lost);
        job.message = format!("task {}: {}", task.index, task.message);
        job.finished_at = Some(now);
    } else if let Some(task) = job
        .tasks
        .iter()
        .find(|t| matches!(t.state(), WorkloadState::Failed | WorkloadState::Stopped))
        .cloned()
    {
        job.set_state(JobState::Failed);
        job.exit_code = task.exit_code;
        job.message = match (task.state(), task.exit_code, task.signal) {
            (WorkloadState::Stopped, _, _) => {
                format!("task {} was stopped outside the controller", task.index)
            }
            (_, _, Some(signal)) => format!("task {} was killed by signal {signal}", task.index),
            (_, Some(code), _) => format!("task {} exited with code {code}", task.index),
            _ => format!("task {} failed: {}", task.index, task.message),
        };
        job.finished_at = Some(now);
    } else if !states.is_empty() && states.iter().all(|s| *s == WorkloadState::Succeeded) {
        job.set_state(JobState::Succeeded);
        job.exit_code = Some(0);
        job.message = "all tasks exited with code 0".to_string();
        job.finished_at = Some(now);
    } else if job.state() == JobState::Scheduled
        && !states.is_empty()
        && states
            .iter()
            .all(|s| matches!(s, WorkloadState::Running | WorkloadState::Succeeded))
    {
        job.set_state(JobState::Running);
        job.started_at = Some(now);
    }
}

fn job_nodes(job: &Job) -> BTreeSet<String> {
    job.tasks.iter().map(|t| t.node_id.clone()).collect()
}

/// GPU UUID → (job id, allocation id) for every GPU a task still holds.
fn held_gpus(state: &State) -> HashMap<String, (String, String)> {
    let mut held = HashMap::new();
    for job in state.jobs.values() {
        for task in job.tasks.iter().filter(|t| task_holds_gpus(t)) {
            for uuid in &task.gpu_uuids {
                held.insert(uuid.clone(), (job.id.clone(), task.allocation_id.clone()));
            }
        }
    }
    held
}

fn desired_allocations(state: &State, node_id: &str) -> Vec<Allocation> {
    let mut allocations: Vec<Allocation> = state
        .jobs
        .values()
        .filter(|job| matches!(job.state(), JobState::Scheduled | JobState::Running))
        .flat_map(|job| {
            job.tasks
                .iter()
                .filter(|t| t.node_id == node_id && task_holds_gpus(t))
                .map(move |t| Allocation {
                    allocation_id: t.allocation_id.clone(),
                    job_id: job.id.clone(),
                    task_index: t.index,
                    gpu_uuids: t.gpu_uuids.clone(),
                    workload: job.spec.as_ref().and_then(|s| s.workload.clone()),
                })
        })
        .collect();
    allocations.sort_by(|a, b| a.allocation_id.cmp(&b.allocation_id));
    allocations
}

fn snapshot(state: &State) -> FleetSnapshot {
    let held = held_gpus(state);
    FleetSnapshot::new(
        state
            .nodes
            .iter()
            .map(|(id, entry)| {
                let identity = entry.record.identity.clone().unwrap_or_default();
                NodeSnapshot {
                    node_id: id.clone(),
                    provider: identity.provider,
                    region: identity.region,
                    price_per_gpu_hour_micro_usd: identity.price_per_gpu_hour_micro_usd,
                    ready: entry.record.state() == NodeState::Ready && entry.session.is_some(),
                    gpus: entry
                        .record
                        .gpus
                        .iter()
                        .filter_map(|gpu| {
                            let info = gpu.info.as_ref()?;
                            Some(GpuSlot {
                                uuid: info.uuid.clone(),
                                index: info.index,
                                model: info.model.clone(),
                                generation: info.generation,
                                memory_bytes: info.memory_bytes,
                                healthy: gpu.health() != GpuHealth::Unhealthy,
                                allocated: held.contains_key(&info.uuid),
                            })
                        })
                        .collect(),
                }
            })
            .collect(),
    )
}

fn node_view(state: &State, entry: &NodeEntry) -> Node {
    let held = held_gpus(state);
    let mut node = entry.record.clone();
    node.connected = entry.session.is_some();
    let mut allocated = 0;
    for gpu in &mut node.gpus {
        let uuid = gpu
            .info
            .as_ref()
            .map(|i| i.uuid.clone())
            .unwrap_or_default();
        if let Some((job_id, allocation_id)) = held.get(&uuid) {
            gpu.job_id = job_id.clone();
            gpu.allocation_id = allocation_id.clone();
            allocated += 1;
        }
        gpu.latest = entry.latest.get(&uuid).cloned();
    }
    node.allocated_gpus = allocated;
    node
}

fn sort_key(job: &Job) -> (i128, String) {
    let nanos = job
        .created_at
        .map(|t| t.seconds as i128 * 1_000_000_000 + t.nanos as i128)
        .unwrap_or(0);
    (nanos, job.id.clone())
}

fn parse_page_token(token: &str) -> Result<(i128, String)> {
    let invalid = || {
        ControllerError::invalid(
            "page_token",
            "is not a token this server issued; pass next_page_token unchanged",
        )
    };
    let (nanos, id) = token.split_once(':').ok_or_else(invalid)?;
    let nanos = nanos.parse().map_err(|_| invalid())?;
    validate::job_id("page_token", id).map_err(|_| invalid())?;
    Ok((nanos, id.to_string()))
}
