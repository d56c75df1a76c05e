//! The controller's core: node registry with leases, jobs and their
//! allocations, desired state per node. Everything here is plain Rust over
//! prost records; the gRPC services are adapters on top.
//!
//! One mutex guards the state. Critical sections never await and never wait
//! for the disk: a change's writes are queued to the store inside them (so
//! the order of writes is the order of changes), and what the change
//! announces is held until those writes are durable (see [`crate::commit`]):
//! nothing leaves the controller (a reply, a job event, a desired state, an
//! ack) that depends on a write not yet durable — write first, then act.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use gpufleet_proto::v1::{
    AgentHello, Allocation, CapacityDimension, CapacityGroup, ControllerMessage, DesiredState,
    GetCapacityResponse, GpuHealth, GpuSample, GpuStatus, HelloAck, Job, JobSpec, JobState,
    ListJobsResponse, LogChunk, LogRequest, LogResponse, Node, NodeState, PendingReason,
    TaskStatus, WorkloadState, WorkloadStatus, controller_message,
};
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};

use crate::auth::{Action, Authority, Principal, TokenRecord};
use crate::commit::GroupCommit;
use crate::config::ControllerConfig;
use crate::error::{ControllerError, Result};
use crate::history;
use crate::lifecycle::{
    apply_status, derive_job_state, enforce_max_runtime, is_desired, job_nodes, requeue,
    task_holds_gpus,
};
use crate::placement;
use crate::scheduler::{self, FairShare, Fleet, NodeInput, Outcome};
use crate::store::{Keyspace, Store, StoreError, WriteBatch, load_all, load_all_by_id};
use crate::telemetry::{RollupStore, TelemetryHub};
use crate::usage;
use crate::validate;

/// Ledger records dropped by retention per market minute, at most (the
/// rest follow on later minutes), so the state lock is never held long.
const LEDGER_PRUNE_BATCH: usize = 10_000;
/// Capacity of each agent's downlink channel.
const DOWNLINK_CAPACITY: usize = 256;
/// Stored jobs one `ListJobs` call examines at most (about 50-150 ms of
/// store reads, without the state lock): a filter that few jobs match
/// returns a short page and a token to go on instead of walking a store
/// of millions in one call.
const LIST_SCAN_BUDGET: usize = 10_000;
/// How long a log request to an agent may take.
const LOG_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Agents are asked to send something at least this often.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

pub use crate::lifecycle::{is_terminal_job, is_terminal_workload, now_ts};

/// The live half of a node: what is not persisted.
struct NodeEntry {
    record: Node,
    last_seen: Instant,
    session: Option<Session>,
    generation: u64,
    /// Highest seq applied from the agent; events at or below it are
    /// duplicates (replays). The one field here that is persisted, lazily,
    /// by `persist_agent_seqs` (keyspace `AgentSeq`).
    last_seq: u64,
    /// `last_seq` as last written to the store.
    persisted_seq: u64,
    /// Allocation ids last sent, to skip sending an unchanged set.
    last_sent: Option<Vec<String>>,
}

struct Session {
    id: u64,
    // Boxed: a channel allocates 32 slots up front, and a 90-byte message
    // per slot made idle sessions cost ~3 KiB per node.
    tx: mpsc::Sender<Box<ControllerMessage>>,
    /// A desired state could not be queued on `tx` (set where it is sent,
    /// once durable); resend on the next tick.
    undelivered: Arc<AtomicBool>,
}

struct State {
    nodes: BTreeMap<String, NodeEntry>,
    /// Resident jobs only (see [`history`]): settled ones are in the store.
    jobs: HashMap<String, Job>,
    /// Settled jobs still in the store, by final state.
    settled: history::SettledCounts,
    /// Where finished-job retention goes on from.
    expiry: history::ExpiryCursor,
    fair: FairShare,
    ledger: usage::Ledger,
    market: usage::market::MarketHistory,
    /// Jobs placed since the last market minute.
    starts: usage::market::MinuteStarts,
    last_market_minute: u64,
}

/// What an agent gets back for a successful hello.
pub struct AgentSession {
    pub node_id: String,
    pub session_id: u64,
    pub downlink: mpsc::Receiver<Box<ControllerMessage>>,
}

/// Upper bounds (seconds) of the queue-wait histogram's buckets.
pub const WAIT_BUCKETS: [f64; 11] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14_400.0,
];

/// Created → scheduled waits of placed jobs, for `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct WaitHistogram {
    /// Per bucket (not cumulative); waits above the last bound count only in `count`.
    pub counts: [u64; 11],
    pub count: u64,
    pub sum: f64,
}

impl WaitHistogram {
    pub fn observe(&mut self, secs: f64) {
        if let Some(i) = WAIT_BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += secs;
    }
}

/// Per-allocation telemetry for the usage ledger. Its own lock, so that
/// ingest does not wait for the state lock. Order: state, then this.
#[derive(Default)]
struct UsageFeed {
    /// GPU UUID → allocation id holding it.
    gpu_owner: HashMap<String, String>,
    /// Telemetry of running allocations, by allocation id.
    acc: HashMap<String, usage::Accumulator>,
    /// Last health reported per GPU UUID (absent: healthy).
    health: HashMap<String, i32>,
    queue_wait: WaitHistogram,
    /// GPUs an operator returned to service → latest fault time (ns) known then.
    overrides: HashMap<String, i128>,
}

struct Inner {
    usage_feed: Mutex<UsageFeed>,
    auth: Authority,
    config: ControllerConfig,
    /// Writes are queued here under the state lock; announcements wait in
    /// it until they are durable.
    store: GroupCommit,
    known_models: Vec<validate::ModelFacts>,
    state: Mutex<State>,
    /// Latest samples and rollups; its own locks, so ingest never waits
    /// for the state lock. Order: state lock, then telemetry locks.
    telemetry: TelemetryHub,
    job_events: broadcast::Sender<Job>,
    schedule: Notify,
    log_waiters: Mutex<HashMap<String, oneshot::Sender<LogResponse>>>,
    next_session: AtomicU64,
    /// Flipped once on shutdown; every stream and task watches it.
    closing: watch::Sender<bool>,
    /// Agent streams whose messages are still being applied.
    agent_streams: AtomicUsize,
}

/// See [`Controller::agent_stream_started`].
pub struct AgentStreamGuard {
    controller: Controller,
}

impl Drop for AgentStreamGuard {
    fn drop(&mut self) {
        self.controller
            .inner
            .agent_streams
            .fetch_sub(1, Ordering::SeqCst);
    }
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
        rollups: Arc<dyn RollupStore>,
        known_models: Vec<validate::ModelFacts>,
    ) -> Result<Self> {
        let mut state = State {
            nodes: BTreeMap::new(),
            jobs: HashMap::new(),
            settled: history::SettledCounts::new(),
            expiry: history::ExpiryCursor::default(),
            fair: FairShare::new(config.fair_share_half_life.as_secs_f64()),
            ledger: usage::Ledger::new(config.usage_retention),
            market: usage::market::MarketHistory::new(config.market_retention.as_secs()),
            starts: Default::default(),
            last_market_minute: placement::unix_secs(SystemTime::now()) / 60,
        };
        let store = GroupCommit::new(store)?;
        let migrated = history::migrate(&store)?;
        if migrated > 0 {
            tracing::info!(
                entries = migrated,
                "brought the indexes of a store written by an older controller up to date"
            );
        }
        let now = Instant::now();
        let seqs: HashMap<String, u64> = load_all_by_id::<u64>(&store, Keyspace::AgentSeq)?
            .into_iter()
            .collect();
        for mut node in load_all::<Node>(&store, Keyspace::Nodes)? {
            let id = node
                .identity
                .as_ref()
                .map(|i| i.node_id.clone())
                .unwrap_or_default();
            node.connected = false;
            if node.state() == NodeState::Ready {
                node.set_state(NodeState::NotReady);
            }
            let applied_seq = seqs.get(&id).copied().unwrap_or(0);
            state.nodes.insert(
                id,
                NodeEntry {
                    record: node,
                    last_seen: now,
                    session: None,
                    generation: 0,
                    last_seq: applied_seq,
                    persisted_seq: applied_seq,
                    last_sent: None,
                },
            );
        }
        let mut feed = UsageFeed::default();
        let now_secs = placement::unix_secs(SystemTime::now());
        // One job at a time: settled jobs only feed fair share and counts.
        let mut fair_usage = HashMap::new();
        crate::store::visit::<Job>(
            &store,
            Keyspace::Jobs,
            crate::store::IdRange::default(),
            |_, job| {
                placement::add_fair_share_usage(
                    &mut fair_usage,
                    &job,
                    &config.scheduler,
                    config.fair_share_half_life.as_secs_f64(),
                    now_secs,
                );
                if !history::is_resident(&job) {
                    *state.settled.entry(job.state()).or_insert(0) += 1;
                    return Ok(true);
                }
                for task in job.tasks.iter().filter(|t| task_holds_gpus(t)) {
                    for uuid in &task.gpu_uuids {
                        feed.gpu_owner
                            .insert(uuid.clone(), task.allocation_id.clone());
                    }
                }
                state.jobs.insert(job.id.clone(), job);
                Ok(true)
            },
        )?;
        let records = state.ledger.load(&store, now_secs)?;
        for signal in load_all::<gpufleet_proto::v1::MarketSignal>(&store, Keyspace::Market)? {
            state.market.push(signal);
        }
        state.fair = FairShare::new(config.fair_share_half_life.as_secs_f64());
        state.fair.restore(fair_usage, now_secs);
        tracing::info!(
            nodes = state.nodes.len(),
            live_jobs = state.jobs.len(),
            finished_jobs = state.settled.values().sum::<u64>(),
            usage_records = records,
            "state loaded from store"
        );
        let mut auth = Authority::load(&store, &config.join_token, config.rate_limit)?;
        let join_token_file = config.data_dir.join("join.token");
        if let Some(path) = auth.ensure_join_token(&store, &join_token_file)? {
            tracing::info!(path = %path.display(), "generated the join token agents need (mode 0600)");
        }
        if let Some(path) = auth.bootstrap_admin(&store, &config.admin_token_file)? {
            tracing::info!(
                path = %path.display(),
                "first start: wrote an admin token (mode 0600); use it to create other tokens with `gpufleet tokens create`"
            );
        }
        let (job_events, _) = broadcast::channel(1024);
        let telemetry = TelemetryHub::new(rollups, config.telemetry_retention);
        Ok(Self {
            inner: Arc::new(Inner {
                usage_feed: Mutex::new(feed),
                auth,
                telemetry,
                config,
                store,
                known_models,
                state: Mutex::new(state),
                job_events,
                schedule: Notify::new(),
                log_waiters: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
                closing: watch::channel(false).0,
                agent_streams: AtomicUsize::new(0),
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

    /// Tokens, node identities and rate limits.
    pub fn auth(&self) -> &Authority {
        &self.inner.auth
    }

    /// Checks the caller of a client call (see [`Authority::authorize`]).
    pub fn authorize(&self, header: Option<&str>, action: Action) -> Result<Principal> {
        self.inner.auth.authorize(header, action)
    }

    pub fn create_token(
        &self,
        name: &str,
        role: gpufleet_proto::v1::Role,
        tenant: &str,
        ttl: Option<Duration>,
    ) -> Result<(TokenRecord, String)> {
        self.inner
            .auth
            .create_token(&self.inner.store, name, role, tenant, ttl)
    }

    pub fn revoke_token(&self, id: &str) -> Result<TokenRecord> {
        self.inner.auth.revoke_token(&self.inner.store, id)
    }

    /// Forgets the agent identity bound to a node id.
    pub fn reset_node_identity(&self, node_id: &str) -> Result<bool> {
        validate::node_id("node_id", node_id)?;
        self.inner.auth.reset_node(&self.inner.store, node_id)
    }

    pub fn telemetry(&self) -> &TelemetryHub {
        &self.inner.telemetry
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves state that is still
        // consistent with the store (writes precede mutation), so continue.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The catalog plus any model a node reported that the catalog lacks.
    fn submit_rules(&self, state: &State) -> validate::SubmitRules {
        let mut models = self.inner.known_models.clone();
        for entry in state.nodes.values() {
            for info in entry.record.gpus.iter().filter_map(|g| g.info.as_ref()) {
                if !info.model.is_empty() && !models.iter().any(|m| m.name == info.model) {
                    models.push(validate::ModelFacts {
                        name: info.model.clone(),
                        generation: info.generation,
                        memory_bytes: info.memory_bytes,
                        compute_capability: (
                            info.compute_capability_major,
                            info.compute_capability_minor,
                        ),
                    });
                }
            }
        }
        models.sort_by(|a, b| a.name.cmp(&b.name));
        let config = &self.inner.config;
        let mut tenants: Vec<String> = config.scheduler.tenants.keys().cloned().collect();
        tenants.sort();
        validate::SubmitRules {
            models,
            tenants,
            queues: config.queues.clone(),
        }
    }

    // ---------------------------------------------------------------- jobs

    pub fn submit_job(&self, spec: JobSpec) -> Result<Job> {
        let mut state = self.lock();
        let spec = validate::job_spec(spec, &self.submit_rules(&state))?;
        // 28 random bits per second: a collision is rare but would
        // overwrite a finished job's record, so it is checked. Every job is
        // in the store from its submit on; the read goes to the store's
        // queue, then to sled (a lookup among the newest keys, which stay
        // cached: see `history::new_job_id`; never a sync).
        // One clock read for the id and the creation time: listings order
        // by the id's second, then the creation time.
        let now = SystemTime::now();
        let id = loop {
            let candidate = history::new_job_id(now, uuid::Uuid::new_v4().as_u128() as u32);
            if !state.jobs.contains_key(&candidate)
                && history::get(&self.inner.store, &candidate)?.is_none()
            {
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
            created_at: Some(now.into()),
            version: 1,
            ..Default::default()
        };
        let mut batch = WriteBatch::default();
        batch.put(Keyspace::Jobs, &id, &job);
        history::index(&mut batch, None, &job);
        self.inner.store.write(batch);
        state.jobs.insert(id.clone(), job.clone());
        self.announce_job(job.clone());
        drop(state);
        tracing::info!(job_id = %id, "job submitted");
        self.inner.schedule.notify_one();
        Ok(job)
    }

    pub fn get_job(&self, id: &str) -> Result<Job> {
        validate::job_id("job_id", id)?;
        self.find_job(&self.lock(), id)?.ok_or_else(|| {
            ControllerError::NotFound(format!(
                "job {id} does not exist (finished jobs are kept for {}; their usage records stay: gpufleet usage records --job {id})",
                humantime::format_duration(self.inner.config.finished_job_retention)
            ))
        })
    }

    /// A resident job from memory, else a settled one from the store.
    fn find_job(&self, state: &State, id: &str) -> Result<Option<Job>> {
        if let Some(job) = state.jobs.get(id) {
            return Ok(Some(job.clone()));
        }
        Ok(history::get(&self.inner.store, id)?)
    }

    /// Deletes finished jobs that ended more than `finished_job_retention`
    /// before `now`, from the store and then from memory, at most `limit` per
    /// call so that the state lock is never held long. Their usage records
    /// stay in the ledger. Returns how many were deleted.
    pub fn gc_finished_jobs(&self, now: SystemTime, limit: usize) -> Result<usize> {
        let cutoff = now
            .checked_sub(self.inner.config.finished_job_retention)
            .map_or(0, placement::unix_secs);
        let store = &self.inner.store;
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut batch = WriteBatch::default();
        let mut deleted = Vec::new();
        // A finished job whose tasks still hold GPUs (a lost node not yet
        // given up) is resident and stays until they end.
        let jobs = &state.jobs;
        let resident = |id: &str| jobs.contains_key(id);
        for entry in history::finished_before(store, cutoff, limit, &resident, &mut state.expiry)? {
            history::delete(&mut batch, &entry);
            if let Some(job) = &entry.job {
                deleted.push(job.state());
            }
        }
        if batch.is_empty() {
            return Ok(0);
        }
        self.inner.store.write(batch);
        for job_state in &deleted {
            if let Some(count) = state.settled.get_mut(job_state) {
                *count = count.saturating_sub(1);
            }
        }
        Ok(deleted.len())
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
        // Newest first: by submit second, creation time and id, descending
        // (`history::ListKey`). The token is the key of the last job returned.
        let after = if page_token.is_empty() {
            None
        } else {
            Some(parse_page_token(page_token)?)
        };
        let wanted = |job: &Job| {
            (states.is_empty() || states.contains(&job.state()))
                && (tenant.is_empty() || job.spec.as_ref().is_some_and(|s| s.tenant == tenant))
        };
        let below_token = |job: &Job| {
            after
                .as_ref()
                .is_none_or(|key| history::ListKey::of(job) < *key)
        };
        let newest_first = |jobs: &mut Vec<Job>| {
            jobs.sort_by_cached_key(|job| std::cmp::Reverse(history::ListKey::of(job)))
        };
        let token = |key: &history::ListKey| format!("{}:{}", key.nanos, key.id);
        let only_live = !states.is_empty() && states.iter().all(|s| !is_terminal_job(*s));
        if only_live {
            // Only resident jobs can be in these states: no store walk.
            let mut jobs: Vec<Job> = self
                .lock()
                .jobs
                .values()
                .filter(|job| wanted(job) && below_token(job))
                .cloned()
                .collect();
            newest_first(&mut jobs);
            let more = jobs.len() > page_size;
            jobs.truncate(page_size);
            let next_page_token = match (more, jobs.last()) {
                (true, Some(last)) => token(&history::ListKey::of(last)),
                _ => String::new(),
            };
            return Ok(ListJobsResponse {
                jobs,
                next_page_token,
            });
        }

        // The store walk runs without the state lock: a filter few jobs
        // match can examine many records.
        // A record that does not contain the tenant's name is not the
        // tenant's: passed over without decoding it.
        let tenant_bytes = tenant.as_bytes();
        let may_match = |bytes: &[u8]| {
            tenant_bytes.is_empty() || bytes.windows(tenant_bytes.len()).any(|w| w == tenant_bytes)
        };
        let listed = history::newest_first(
            &self.inner.store,
            after.as_ref(),
            page_size + 1,
            LIST_SCAN_BUDGET,
            &may_match,
            &mut |stored| wanted(&stored).then_some(stored),
        )?;
        // Everything at or above `covered` (and below the token) was
        // examined: where the walk stopped, or the last of a full page's
        // matches; None when the walk reached the oldest job.
        let covered = match listed.resume {
            Some(resume) => Some(resume),
            None if listed.jobs.len() > page_size => listed.jobs.last().map(history::ListKey::of),
            None => None,
        };
        let in_covered = |job: &Job| {
            covered
                .as_ref()
                .is_none_or(|c| history::ListKey::of(job) >= *c)
        };
        // Resident jobs are newer than their stored records by at most a
        // commit: listed as they are now, including those whose stored
        // record did not match but whose current state does.
        let mut jobs = Vec::with_capacity(listed.jobs.len());
        {
            let state = self.lock();
            for stored in listed.jobs {
                match state.jobs.get(&stored.id) {
                    Some(resident) => {
                        if wanted(resident) {
                            jobs.push(resident.clone());
                        }
                    }
                    None => jobs.push(stored),
                }
            }
            let seen: HashSet<&str> = jobs.iter().map(|job| job.id.as_str()).collect();
            let resident: Vec<Job> = state
                .jobs
                .values()
                .filter(|job| {
                    !seen.contains(job.id.as_str())
                        && wanted(job)
                        && below_token(job)
                        && in_covered(job)
                })
                .cloned()
                .collect();
            jobs.extend(resident);
        }
        newest_first(&mut jobs);
        let next_page_token = if jobs.len() > page_size {
            jobs.truncate(page_size);
            jobs.last()
                .map(|last| token(&history::ListKey::of(last)))
                .unwrap_or_default()
        } else {
            // A short page (even an empty one) with a token: the walk
            // stopped at its budget, or found more matches than fit.
            covered.as_ref().map(token).unwrap_or_default()
        };
        Ok(ListJobsResponse {
            jobs,
            next_page_token,
        })
    }

    pub fn cancel_job(&self, id: &str, reason: &str) -> Result<Job> {
        validate::job_id("job_id", id)?;
        let mut state = self.lock();
        let Some(mut job) = self.find_job(&state, id)? else {
            return Err(ControllerError::NotFound(format!(
                "job {id} does not exist"
            )));
        };
        if is_terminal_job(job.state()) {
            return Ok(job);
        }
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

    /// Sends a job change to watchers once its writes are durable. Call it
    /// under the state lock, after the change's write, so that watchers see
    /// changes in the order they were made.
    fn announce_job(&self, job: Job) {
        let events = self.inner.job_events.clone();
        self.inner.store.hold(move || {
            let _ = events.send(job);
        });
    }

    /// Resolves once every change made so far is durable (and what it
    /// announced has been sent). A reply that shows state must wait for it
    /// first: the gRPC services do (see `service::Settled`).
    pub async fn settled(&self) -> Result<()> {
        Ok(self.inner.store.settled().await?)
    }

    /// [`Self::settled`], blocking the thread: for tests and tools outside
    /// an async runtime.
    pub fn wait_settled(&self) -> Result<()> {
        let store = &self.inner.store;
        Ok(store.wait_durable(store.written())?)
    }

    /// Every job change, once durable. Subscribe before reading the
    /// current job to miss nothing.
    pub fn subscribe_jobs(&self) -> broadcast::Receiver<Job> {
        self.inner.job_events.subscribe()
    }

    /// Persists changed jobs (one atomic batch), then updates memory and
    /// announces them.
    fn commit_jobs(&self, state: &mut State, jobs: Vec<Job>) -> Result<()> {
        self.commit_jobs_retiring(state, jobs, Vec::new())
    }

    /// Like `commit_jobs`, where `retired` holds tasks that a return to the
    /// queue dropped from these jobs (see `lifecycle::settle_requeue`):
    /// they ended with this change, so their usage records belong in the
    /// same batch.
    fn commit_jobs_retiring(
        &self,
        state: &mut State,
        jobs: Vec<Job>,
        retired: Vec<TaskStatus>,
    ) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        let now_ms = placement::unix_secs(SystemTime::now()) * 1000;
        let mut records = Vec::new();
        let store = &self.inner.store;
        for job in &jobs {
            batch.put(Keyspace::Jobs, &job.id, job);
            history::index(&mut batch, state.jobs.get(&job.id), job);
            // A task that just ended gets its ledger record in the same
            // atomic batch: written exactly once, whatever restarts later.
            let before = state.jobs.get(&job.id);
            let prefix = format!("{}.", job.id);
            let retired_here = retired
                .iter()
                .filter(|t| t.allocation_id.starts_with(&prefix));
            for task in job.tasks.iter().chain(retired_here) {
                let was_holding = before
                    .and_then(|b| {
                        b.tasks
                            .iter()
                            .find(|t| t.allocation_id == task.allocation_id)
                    })
                    .is_some_and(task_holds_gpus);
                if !was_holding
                    || task_holds_gpus(task)
                    || usage::has_record(store, &task.allocation_id)?
                {
                    continue;
                }
                let facts = node_facts(state, &task.node_id);
                let feed = self.usage_feed();
                if let Some(record) = usage::build_record(
                    job,
                    task,
                    &facts,
                    feed.acc.get(&task.allocation_id),
                    now_ms,
                ) {
                    usage::put_record(&mut batch, &record);
                    records.push(record);
                }
            }
        }
        self.inner.store.write(batch);
        let now_secs = now_ms / 1000;
        let mut feed = self.usage_feed();
        for record in records {
            feed.acc.remove(&record.allocation_id);
            state.ledger.add(&record, now_secs);
        }
        for job in jobs {
            if let Some(before) = state.jobs.get(&job.id) {
                for task in &before.tasks {
                    for uuid in &task.gpu_uuids {
                        if feed.gpu_owner.get(uuid) == Some(&task.allocation_id) {
                            feed.gpu_owner.remove(uuid);
                        }
                    }
                }
            }
            for task in job.tasks.iter().filter(|t| task_holds_gpus(t)) {
                for uuid in &task.gpu_uuids {
                    feed.gpu_owner
                        .insert(uuid.clone(), task.allocation_id.clone());
                }
            }
            if history::is_resident(&job) {
                state.jobs.insert(job.id.clone(), job.clone());
            } else {
                // Settled: it can never change again; the store has it.
                state.jobs.remove(&job.id);
                *state.settled.entry(job.state()).or_insert(0) += 1;
            }
            self.announce_job(job);
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

    /// One scheduling pass over every pending job. Returns how many were placed.
    pub fn schedule_pass(&self) -> Result<usize> {
        let mut state = self.lock();
        let config = &self.inner.config.scheduler;
        let now = placement::unix_secs(SystemTime::now());
        let (held, running_norm) = placement::tenant_allocation(state.jobs.values(), config);
        state.fair.advance(now, &running_norm);
        let pending = placement::pending_jobs(state.jobs.values());
        // Every finished task asks for a pass; with nothing queued there is
        // nothing to decide, and building the fleet index is most of a pass.
        if pending.is_empty() {
            return Ok(0);
        }
        let mut fleet = fleet_index(&state);
        let inputs: Vec<scheduler::JobInput> =
            pending.iter().map(|j| placement::job_input(j)).collect();
        let tenants = placement::tenant_state(&state.fair, held);
        let result = scheduler::schedule(&mut fleet, &inputs, config, &tenants, now);

        let ts = now_ts();
        let mut changed = Vec::new();
        let mut starts = Vec::new();
        let mut victims: BTreeSet<String> = BTreeSet::new();
        for ((job, input), outcome) in pending.iter().zip(&inputs).zip(result.outcomes) {
            match outcome {
                Outcome::Placed(placements) => {
                    let mut job = (*job).clone();
                    job.set_state(JobState::Scheduled);
                    job.pending_reason = None;
                    job.scheduled_at = Some(ts);
                    job.not_before = None;
                    job.tasks = placements
                        .into_iter()
                        .enumerate()
                        .map(|(index, p)| {
                            let model = state
                                .nodes
                                .get(&p.node_id)
                                .and_then(|e| {
                                    e.record
                                        .gpus
                                        .iter()
                                        .filter_map(|g| g.info.as_ref())
                                        .find(|i| p.gpu_uuids.first() == Some(&i.uuid))
                                })
                                .map(|i| i.model.clone())
                                .unwrap_or_default();
                            TaskStatus {
                                index: index as u32,
                                // Unique per attempt: an agent never re-runs an
                                // allocation id it has seen finish.
                                allocation_id: if job.attempt == 0 {
                                    format!("{}.{index}", job.id)
                                } else {
                                    format!("{}.{index}.{}", job.id, job.attempt)
                                },
                                node_id: p.node_id,
                                gpu_uuids: p.gpu_uuids,
                                provider: p.provider,
                                region: p.region,
                                price_per_gpu_hour_micro_usd: p.price_per_gpu_hour_micro_usd,
                                generation: placement::generation_wire(p.generation),
                                model,
                                ..Default::default()
                            }
                        })
                        .collect();
                    job.version += 1;
                    tracing::info!(job_id = %job.id, nodes = ?job_nodes(&job), "job scheduled");
                    let wait_secs = job
                        .created_at
                        .and_then(|t| SystemTime::try_from(t).ok())
                        .and_then(|t| SystemTime::now().duration_since(t).ok())
                        .map_or(0.0, |d| d.as_secs_f64());
                    for task in &job.tasks {
                        starts.push(usage::market::StartEvent {
                            first_task: task.index == 0,
                            provider: task.provider.clone(),
                            region: task.region.clone(),
                            generation: task.generation,
                            wait_secs,
                            gpus: task.gpu_uuids.len() as u32,
                        });
                    }
                    changed.push(job);
                }
                Outcome::Preempting { victims: evict } => {
                    victims.extend(evict);
                    let reason = gpufleet_proto::v1::PendingReason {
                        code: scheduler::reason::PREEMPTING.to_string(),
                        message: "evicting lower-priority preemptible work to make room"
                            .to_string(),
                        exclusions: Vec::new(),
                    };
                    if job.pending_reason.as_ref() != Some(&reason) {
                        let mut job = (*job).clone();
                        job.pending_reason = Some(reason);
                        job.version += 1;
                        changed.push(job);
                    }
                }
                Outcome::Pending(verdict) => {
                    // The full explanation only when the verdict changes:
                    // it is the costly part of a pass.
                    let same = job
                        .pending_reason
                        .as_ref()
                        .is_some_and(|r| r.code == verdict.code());
                    if !same {
                        let reason = placement::explain_pending(&fleet, input, verdict);
                        let mut job = (*job).clone();
                        job.pending_reason = Some(reason);
                        job.version += 1;
                        changed.push(job);
                    }
                }
            }
        }
        let placed = changed
            .iter()
            .filter(|j| j.state() == JobState::Scheduled)
            .count();
        let mut retired = Vec::new();
        for victim in &victims {
            if let Some(job) = state.jobs.get(victim)
                && is_desired(job)
            {
                let mut job = job.clone();
                job.preemptions += 1;
                retired.extend(requeue(
                    &mut job,
                    "preempted by a higher-priority job".to_string(),
                    None,
                ));
                job.version += 1;
                tracing::info!(job_id = %job.id, "job preempted");
                changed.push(job);
            }
        }
        let touched: BTreeSet<String> = changed.iter().flat_map(job_nodes).collect();
        self.commit_jobs_retiring(&mut state, changed, retired)?;
        {
            let mut feed = self.usage_feed();
            for start in &starts {
                // One observation per job (its first task carries the wait).
                if start.first_task {
                    feed.queue_wait.observe(start.wait_secs);
                }
            }
        }
        for start in &starts {
            state.starts.record(start);
        }
        for node_id in touched {
            self.push_desired(&mut state, &node_id, false);
        }
        Ok(placed)
    }

    /// Once a minute: records market signals (and prunes what retention
    /// drops). Called from the lease ticker.
    pub fn record_market_minute(&self) -> Result<bool> {
        let minute = placement::unix_secs(SystemTime::now()) / 60;
        if minute <= self.lock().last_market_minute {
            return Ok(false);
        }
        self.record_market_at(minute)?;
        Ok(true)
    }

    /// Records the market signals of `minute` (Unix minutes) from the fleet
    /// and queue as they are now. The ticker calls it once a minute; tests
    /// and tools may call it directly.
    pub fn record_market_at(&self, minute: u64) -> Result<()> {
        let mut state = self.lock();
        let now = placement::unix_secs(SystemTime::now()).max(minute * 60);
        state.last_market_minute = state.last_market_minute.max(minute);
        let fleet = fleet_index(&state);
        let pending: Vec<scheduler::JobInput> = placement::pending_jobs(state.jobs.values())
            .into_iter()
            .map(placement::job_input)
            .collect();
        let snapshot = scheduler::market::snapshot(&fleet, &pending);
        let starts = std::mem::take(&mut state.starts);
        let signals = usage::market::signals_for_minute(minute * 60, &snapshot, &starts);
        let mut batch = WriteBatch::default();
        for signal in &signals {
            batch.put(Keyspace::Market, &market_key(signal), signal);
        }
        for old in state.market.prune(now) {
            batch.delete(Keyspace::Market, &market_key(&old));
        }
        // Ledger retention: a walk that stops at the first record still
        // kept, so cheap when there is nothing to drop.
        let store = &self.inner.store;
        state
            .ledger
            .prune(store, &mut batch, now, LEDGER_PRUNE_BATCH)?;
        self.inner.store.write(batch);
        state.market.unmet_demand_gpus = snapshot.unmet_demand_gpus;
        for signal in signals {
            state.market.push(signal);
        }
        Ok(())
    }

    /// Why a job is pending, per constraint and per region, against the
    /// fleet as it is now.
    pub fn explain_job(&self, id: &str) -> Result<gpufleet_proto::v1::ExplainJobResponse> {
        validate::job_id("job_id", id)?;
        let state = self.lock();
        let job = self
            .find_job(&state, id)?
            .ok_or_else(|| ControllerError::NotFound(format!("job {id} does not exist")))?;
        let fleet = fleet_index(&state);
        let input = placement::job_input(&job);
        let code = match job.state() {
            JobState::Pending => job
                .pending_reason
                .as_ref()
                .map(|r| r.code.clone())
                .unwrap_or_else(|| scheduler::reason::WAITING_FOR_SCHEDULER.to_string()),
            _ => String::new(),
        };
        let (mut reason, regions, mut summary) = placement::explain_job(&fleet, &input, &code);
        if job.state() != JobState::Pending {
            reason.code = String::new();
            summary = format!(
                "job {} is {} (not pending); this is how the fleet looks to its request now: {summary}",
                job.id,
                job.state()
                    .as_str_name()
                    .trim_start_matches("JOB_STATE_")
                    .to_ascii_lowercase()
            );
        }
        Ok(gpufleet_proto::v1::ExplainJobResponse {
            job: Some(job),
            reason: Some(reason),
            regions,
            summary,
        })
    }

    // ---------------------------------------------------------------- usage

    /// Live records of running allocations, up to now.
    fn live_usage(&self, state: &State, now_ms: u64) -> Vec<gpufleet_proto::v1::UsageRecord> {
        let feed = self.usage_feed();
        let mut out = Vec::new();
        for job in state.jobs.values() {
            for task in job.tasks.iter().filter(|t| task_holds_gpus(t)) {
                let facts = node_facts(state, &task.node_id);
                if let Some(r) = usage::build_record(
                    job,
                    task,
                    &facts,
                    feed.acc.get(&task.allocation_id),
                    now_ms,
                ) {
                    out.push(r);
                }
            }
        }
        out
    }

    pub fn usage_report(
        &self,
        query: &usage::ReportQuery,
        include_running: bool,
    ) -> gpufleet_proto::v1::UsageReportResponse {
        let state = self.lock();
        let now = placement::unix_secs(SystemTime::now());
        let live = if include_running {
            self.live_usage(&state, now * 1000)
        } else {
            Vec::new()
        };
        state.ledger.report(query, &live, now)
    }

    /// Ledger records (and live ones when asked, first) matching `filter`,
    /// one page.
    pub fn list_usage(
        &self,
        filter: &usage::RecordFilter,
        page_size: usize,
        offset: usize,
    ) -> Result<(Vec<gpufleet_proto::v1::UsageRecord>, bool)> {
        let state = self.lock();
        let now_ms = placement::unix_secs(SystemTime::now()) * 1000;
        let live: Vec<gpufleet_proto::v1::UsageRecord> = if filter.include_running {
            self.live_usage(&state, now_ms)
                .into_iter()
                .filter(|r| filter.matches(r))
                .collect()
        } else {
            Vec::new()
        };
        let live_count = live.len();
        let mut page: Vec<_> = live.into_iter().skip(offset).take(page_size + 1).collect();
        if page.len() > page_size {
            page.truncate(page_size);
            return Ok((page, true));
        }
        let (stored, more) = state.ledger.list(
            &self.inner.store,
            filter,
            offset.saturating_sub(live_count),
            page_size - page.len(),
        )?;
        page.extend(stored);
        Ok((page, more))
    }

    pub fn market_tightness(&self, since_secs: u64) -> gpufleet_proto::v1::MarketTightnessResponse {
        let state = self.lock();
        gpufleet_proto::v1::MarketTightnessResponse {
            regions: state.market.tightness(since_secs),
            unmet_demand_gpus: state.market.unmet_demand_gpus,
        }
    }

    pub fn market_elasticity(
        &self,
        region: &str,
        generation: i32,
        since_secs: u64,
    ) -> gpufleet_proto::v1::MarketElasticityResponse {
        self.lock()
            .market
            .elasticity(region, generation, since_secs)
    }

    // ---------------------------------------------------------- maintenance

    pub fn cordon_node(&self, node_id: &str, reason: &str) -> Result<Node> {
        self.update_node(node_id, |node| {
            node.cordoned = true;
            node.cordon_reason = if reason.is_empty() {
                "cordoned by an operator".to_string()
            } else {
                reason.to_string()
            };
        })
    }

    pub fn uncordon_node(&self, node_id: &str) -> Result<Node> {
        let node = self.update_node(node_id, |node| {
            node.cordoned = false;
            node.cordon_reason.clear();
            node.drain_deadline = None;
        })?;
        self.inner.schedule.notify_one();
        Ok(node)
    }

    /// Returns a GPU to service now. The agent keeps reporting the fault
    /// until its clean period passes; those reports are ignored until the
    /// fault is seen *again* (a reason's `last_seen` moves past the one
    /// known now) or the agent reports the GPU healthy.
    pub fn uncordon_gpu(&self, node_id: &str, uuid: &str) -> Result<Node> {
        validate::node_id("node_id", node_id)?;
        {
            let state = self.lock();
            let entry = state.nodes.get(node_id).ok_or_else(|| {
                ControllerError::NotFound(format!("node {node_id} is not registered"))
            })?;
            if !entry
                .record
                .gpus
                .iter()
                .any(|g| g.info.as_ref().is_some_and(|i| i.uuid == uuid))
            {
                return Err(ControllerError::NotFound(format!(
                    "node {node_id} has no GPU {uuid:?}; `gpufleet nodes get {node_id}` lists its GPUs"
                )));
            }
        }
        let seen = self
            .inner
            .telemetry
            .latest_for_node(node_id)
            .get(uuid)
            .map_or(0, last_fault_seen);
        {
            let mut feed = self.usage_feed();
            feed.overrides.insert(uuid.to_string(), seen);
            feed.health
                .insert(uuid.to_string(), GpuHealth::Healthy as i32);
        }
        let node = self.update_node(node_id, |node| {
            for gpu in &mut node.gpus {
                if gpu.info.as_ref().is_some_and(|i| i.uuid == uuid) {
                    gpu.health = GpuHealth::Healthy as i32;
                }
            }
        })?;
        tracing::info!(
            node_id,
            gpu = uuid,
            "GPU returned to service by an operator"
        );
        self.inner.schedule.notify_one();
        Ok(node)
    }

    /// Cordons the node; work still running at the deadline is evicted and
    /// queued again.
    pub fn drain_node(&self, node_id: &str, deadline: Duration) -> Result<Node> {
        let at = SystemTime::now() + deadline;
        let node = self.update_node(node_id, |node| {
            node.cordoned = true;
            node.cordon_reason = "draining".to_string();
            node.drain_deadline = Some(prost_types::Timestamp::from(at));
        })?;
        self.check_leases()?;
        Ok(node)
    }

    fn update_node(&self, node_id: &str, change: impl FnOnce(&mut Node)) -> Result<Node> {
        validate::node_id("node_id", node_id)?;
        let mut state = self.lock();
        let entry = state.nodes.get(node_id).ok_or_else(|| {
            ControllerError::NotFound(format!("node {node_id} is not registered"))
        })?;
        let mut record = entry.record.clone();
        change(&mut record);
        let mut batch = WriteBatch::default();
        batch.put(Keyspace::Nodes, node_id, &record);
        self.inner.store.write(batch);
        if let Some(entry) = state.nodes.get_mut(node_id) {
            entry.record = record;
        }
        let entry = &state.nodes[node_id];
        Ok(node_view(&state, entry, &self.inner.telemetry))
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
        self.inner
            .auth
            .check_join_token(&identity.node_id, &hello.join_token)?;
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
        // After the live-session check, so that an agent refused as a
        // duplicate never binds (or rebinds) the id.
        // The binding of a first registration is written with the node's
        // record: one flushed batch per registration.
        let mut batch = WriteBatch::default();
        let identity_check =
            self.inner
                .auth
                .check_node(&mut batch, &node_id, &hello.node_secret)?;
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
            // Maintenance state belongs to operators; a reconnect keeps it.
            cordoned: previous.as_ref().is_some_and(|p| p.record.cordoned),
            cordon_reason: previous
                .as_ref()
                .map(|p| p.record.cordon_reason.clone())
                .unwrap_or_default(),
            drain_deadline: previous.as_ref().and_then(|p| p.record.drain_deadline),
        };
        batch.put(Keyspace::Nodes, &node_id, &record);
        self.inner.store.write(batch);
        let issued_secret = self.inner.auth.bound(identity_check);
        let uuids: Vec<String> = hello.gpus.iter().map(|g| g.uuid.clone()).collect();
        self.inner.telemetry.register_node(&node_id, &uuids);
        let generation = previous
            .as_ref()
            .map_or(0, |p| p.generation)
            .max(hello.applied_generation);
        let last_seq = previous.as_ref().map_or(0, |p| p.last_seq);
        let persisted_seq = previous.as_ref().map_or(0, |p| p.persisted_seq);
        state.nodes.insert(
            node_id.clone(),
            NodeEntry {
                record,
                last_seen: now,
                session: Some(Session {
                    id: session_id,
                    tx: tx.clone(),
                    undelivered: Arc::new(AtomicBool::new(false)),
                }),
                generation,
                last_seq,
                persisted_seq,
                last_sent: None,
            },
        );
        let ack = ControllerMessage {
            body: Some(controller_message::Body::HelloAck(HelloAck {
                node_id: node_id.clone(),
                last_seq,
                heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u32,
                server_time: Some(now_ts()),
                node_secret: issued_secret.unwrap_or_default(),
            })),
        };
        // After the hello's writes (the node's record, a new identity
        // binding whose secret the ack carries). A fresh channel has room;
        // failing here means the receiver is gone.
        self.inner.store.hold(move || {
            let _ = tx.try_send(Box::new(ack));
        });

        // Reconcile what the agent reports against what we believe.
        let reported: HashMap<&str, &WorkloadStatus> = hello
            .workloads
            .iter()
            .map(|w| (w.allocation_id.as_str(), w))
            .collect();
        let mut changed = Vec::new();
        let mut retired = Vec::new();
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
                } else if task.state() == WorkloadState::Unspecified && !is_desired(job) {
                    // The agent never received it, and the job no longer
                    // wants it (e.g. a gang partner failed while the
                    // controller was down): nothing will ever report its
                    // end, so release its GPUs now.
                    task.set_state(WorkloadState::Stopped);
                    task.message =
                        "never started: the job no longer needed it when its agent reconnected"
                            .to_string();
                    task.finished_at = Some(now_ts());
                    touched = true;
                }
            }
            if touched {
                retired.extend(derive_job_state(&mut job_changed));
                job_changed.version += 1;
                changed.push(job_changed);
            }
        }
        self.commit_jobs_retiring(&mut state, changed, retired)?;
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

    /// Refreshes the node's lease; returns false when the message is a
    /// duplicate (already applied), or when the controller is shutting
    /// down: what is not acknowledged the agent sends again to the next
    /// controller. Apply the message, then `applied_seq`.
    pub fn accept_seq(&self, node_id: &str, seq: u64) -> bool {
        if *self.inner.closing.borrow() {
            return false;
        }
        let mut state = self.lock();
        let Some(entry) = state.nodes.get_mut(node_id) else {
            return false;
        };
        entry.last_seen = Instant::now();
        entry.record.last_seen_at = Some(now_ts());
        seq == 0 || seq > entry.last_seq
    }

    /// Marks message `seq` applied and acknowledges it. Only after the
    /// message's effects are in the store (write first, then act): an
    /// agent may forget what was acknowledged.
    pub fn applied_seq(&self, node_id: &str, seq: u64) {
        if seq == 0 {
            // Unsequenced (hellos, heartbeats): nothing to acknowledge.
            return;
        }
        let mut state = self.lock();
        let Some(entry) = state.nodes.get_mut(node_id) else {
            return;
        };
        entry.last_seq = entry.last_seq.max(seq);
        if let Some(session) = &entry.session {
            let ack = ControllerMessage {
                body: Some(controller_message::Body::Ack(gpufleet_proto::v1::Ack {
                    seq,
                })),
            };
            // Sent once the message's effects are durable (its writes were
            // queued before this). Acks are cumulative: dropping one when
            // the channel is full is harmless.
            let tx = session.tx.clone();
            self.inner.store.hold(move || {
                let _ = tx.try_send(Box::new(ack));
            });
        }
    }

    /// Writes each agent's highest applied seq that changed since the last
    /// call, so a restarted controller keeps dropping replays of events it
    /// already applied. Called after each telemetry flush and at shutdown;
    /// returns how many were written.
    pub fn persist_agent_seqs(&self) -> std::result::Result<usize, StoreError> {
        let changed: Vec<(String, u64)> = self
            .lock()
            .nodes
            .iter()
            .filter(|(_, e)| e.last_seq != e.persisted_seq)
            .map(|(id, e)| (id.clone(), e.last_seq))
            .collect();
        if changed.is_empty() {
            return Ok(0);
        }
        let mut batch = WriteBatch::default();
        for (id, seq) in &changed {
            batch.put(Keyspace::AgentSeq, id, seq);
        }
        // Queued after the writes of every message these seqs cover, and
        // writes become durable in order: once this one is, so are they.
        self.inner.store.apply(batch)?;
        let mut state = self.lock();
        for (id, seq) in &changed {
            if let Some(entry) = state.nodes.get_mut(id) {
                entry.persisted_seq = entry.persisted_seq.max(*seq);
            }
        }
        Ok(changed.len())
    }

    /// Counts an agent stream until the guard is dropped, so shutdown can
    /// wait for ingest to stop before its last flush.
    pub fn agent_stream_started(&self) -> AgentStreamGuard {
        self.inner.agent_streams.fetch_add(1, Ordering::SeqCst);
        AgentStreamGuard {
            controller: self.clone(),
        }
    }

    /// Agent streams still being read.
    pub fn agent_streams(&self) -> usize {
        self.inner.agent_streams.load(Ordering::SeqCst)
    }

    /// Validates and keeps a batch of samples. Takes only the telemetry
    /// locks: `accept_seq`, called for every message, already refreshed the
    /// node's lease.
    pub fn record_telemetry(&self, node_id: &str, samples: Vec<GpuSample>) {
        // GPU health, as the agent judges it (XIDs, ECC, remaps). The state
        // lock is taken only when a GPU's health changes, so ingest stays
        // off the state lock in the common case.
        let mut changes: Vec<(String, i32)> = Vec::new();
        {
            // Samples of allocated GPUs feed their allocation's usage record.
            let mut feed = self.usage_feed();
            let feed = &mut *feed;
            for sample in &samples {
                if let Some(allocation) = feed.gpu_owner.get(&sample.uuid) {
                    feed.acc.entry(allocation.clone()).or_default().add(sample);
                }
                // An operator's uncordon holds until the fault is seen again.
                if let Some(&seen) = feed.overrides.get(&sample.uuid) {
                    if sample.health == GpuHealth::Healthy as i32 || last_fault_seen(sample) > seen
                    {
                        feed.overrides.remove(&sample.uuid);
                    } else {
                        continue;
                    }
                }
                // Older agents leave health unspecified: keep what the hello set.
                if sample.health != GpuHealth::Unspecified as i32 {
                    let known = feed
                        .health
                        .get(&sample.uuid)
                        .copied()
                        .unwrap_or(GpuHealth::Healthy as i32);
                    if known != sample.health {
                        feed.health.insert(sample.uuid.clone(), sample.health);
                        changes.push((sample.uuid.clone(), sample.health));
                    }
                }
            }
        }
        if !changes.is_empty() {
            let mut returned = false;
            let mut state = self.lock();
            if let Some(entry) = state.nodes.get_mut(node_id) {
                for (uuid, health) in &changes {
                    if let Some(gpu) = entry
                        .record
                        .gpus
                        .iter_mut()
                        .find(|g| g.info.as_ref().is_some_and(|i| &i.uuid == uuid))
                    {
                        returned |= gpu.health == GpuHealth::Unhealthy as i32
                            && *health != GpuHealth::Unhealthy as i32;
                        tracing::info!(node_id, gpu = %uuid, health = ?GpuHealth::try_from(*health).unwrap_or_default(), "GPU health changed");
                        gpu.health = *health;
                    }
                }
            }
            // A running job on a GPU that turned Unhealthy is told so: the
            // line lands in its history, and the log says which job to check.
            let sick: Vec<&String> = changes
                .iter()
                .filter(|(_, h)| *h == GpuHealth::Unhealthy as i32)
                .map(|(uuid, _)| uuid)
                .collect();
            let mut reported: BTreeMap<String, Job> = BTreeMap::new();
            if !sick.is_empty() {
                let reasons: HashMap<&str, String> = samples
                    .iter()
                    .map(|s| {
                        let why: Vec<String> =
                            s.health_reasons.iter().map(|r| r.message.clone()).collect();
                        (s.uuid.as_str(), why.join("; "))
                    })
                    .collect();
                for job in state.jobs.values() {
                    for task in job
                        .tasks
                        .iter()
                        .filter(|t| task_holds_gpus(t) && t.node_id == node_id)
                    {
                        for uuid in task.gpu_uuids.iter().filter(|u| sick.contains(u)) {
                            tracing::warn!(job_id = %job.id, node_id, gpu = %uuid, "a GPU of a running job became unhealthy");
                            let job = reported.entry(job.id.clone()).or_insert_with(|| {
                                let mut job = job.clone();
                                job.version += 1;
                                job
                            });
                            job.history.push(format!(
                                "GPU {uuid} on {node_id} became unhealthy while task {} ran: {}",
                                task.index,
                                reasons.get(uuid.as_str()).cloned().unwrap_or_default()
                            ));
                        }
                    }
                }
            }
            if let Err(e) = self.commit_jobs(&mut state, reported.into_values().collect()) {
                tracing::error!(error = %e, "cannot record an unhealthy GPU on its job");
            }
            drop(state);
            if returned {
                // A GPU came back into service: pending jobs may fit now.
                self.request_schedule();
            }
        }
        self.inner
            .telemetry
            .ingest(node_id, samples, SystemTime::now());
    }

    /// The queue-wait histogram so far.
    pub fn queue_wait(&self) -> WaitHistogram {
        self.usage_feed().queue_wait.clone()
    }

    fn usage_feed(&self) -> MutexGuard<'_, UsageFeed> {
        self.inner
            .usage_feed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Job counts by state, for `/metrics`.
    /// Jobs held in memory: the live ones (see [`history`]).
    pub fn resident_jobs(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Jobs by state, resident and settled.
    pub fn job_counts(&self) -> BTreeMap<JobState, u64> {
        let state = self.lock();
        let mut counts = state.settled.clone();
        for job in state.jobs.values() {
            *counts.entry(job.state()).or_insert(0) += 1;
        }
        counts
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
        let was_desired = is_desired(&job);
        let retired = derive_job_state(&mut job);
        job.version += 1;
        let left_desired = was_desired && !is_desired(&job);
        let requeued = job.state() == JobState::Pending;
        let nodes = job_nodes(&job);
        tracing::info!(job_id = %job.id, allocation_id = %status.allocation_id, state = ?status.state(), job_state = ?job.state(), "workload status");
        self.commit_jobs_retiring(&mut state, vec![job], retired)?;
        if left_desired {
            for node in nodes {
                self.push_desired(&mut state, &node, false);
            }
        }
        drop(state);
        if released || requeued {
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
        let Some(session) = &entry.session else {
            return;
        };
        let retry = session.undelivered.swap(false, Ordering::SeqCst);
        if !force && !retry && entry.last_sent.as_ref() == Some(&ids) {
            return;
        }
        entry.generation += 1;
        let message = ControllerMessage {
            body: Some(controller_message::Body::DesiredState(DesiredState {
                generation: entry.generation,
                allocations,
            })),
        };
        // Sent once the writes it reflects are durable, in order with the
        // node's other messages. A full channel is retried on the next
        // lease tick (the whole set: re-sending is always safe).
        let tx = session.tx.clone();
        let undelivered = session.undelivered.clone();
        self.inner.store.hold(move || {
            if tx.try_send(Box::new(message)).is_err() {
                undelivered.store(true, Ordering::SeqCst);
            }
        });
        entry.last_sent = Some(ids);
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
        self.inner.store.write(batch);

        let mut changed = Vec::new();
        let mut retired = Vec::new();
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
                    retired.extend(derive_job_state(&mut job));
                    job.version += 1;
                    changed.push(job);
                }
            }
        }
        // Max runtimes, and drains whose deadline passed.
        let wall = SystemTime::now();
        let drained: BTreeSet<String> = state
            .nodes
            .iter()
            .filter(|(_, e)| {
                e.record
                    .drain_deadline
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .is_some_and(|deadline| deadline <= wall)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for job in state.jobs.values() {
            if changed.iter().any(|c: &Job| c.id == job.id) {
                continue;
            }
            let mut job = job.clone();
            if let Some(ended) = enforce_max_runtime(&mut job, wall) {
                tracing::info!(job_id = %job.id, "job exceeded its max runtime");
                retired.extend(ended);
                job.version += 1;
                changed.push(job);
            } else if is_desired(&job)
                && job
                    .tasks
                    .iter()
                    .any(|t| drained.contains(&t.node_id) && task_holds_gpus(t))
            {
                let nodes: Vec<String> = job_nodes(&job)
                    .into_iter()
                    .filter(|n| drained.contains(n))
                    .collect();
                retired.extend(requeue(
                    &mut job,
                    format!("evicted: node {} was drained", nodes.join(",")),
                    None,
                ));
                job.version += 1;
                changed.push(job);
            }
        }
        let touched: BTreeSet<String> = changed.iter().flat_map(job_nodes).collect();
        let requeued = changed.iter().any(|j| j.state() == JobState::Pending);
        self.commit_jobs_retiring(&mut state, changed, retired)?;
        if requeued {
            self.inner.schedule.notify_one();
        }
        let resend: Vec<String> = state
            .nodes
            .iter()
            .filter(|(_, e)| {
                e.session
                    .as_ref()
                    .is_some_and(|s| s.undelivered.load(Ordering::SeqCst))
            })
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
        if tx.send(Box::new(request)).await.is_err() {
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
            .map(|e| node_view(&state, e, &self.inner.telemetry))
            .collect()
    }

    pub fn get_node(&self, node_id: &str) -> Result<Node> {
        validate::node_id("node_id", node_id)?;
        let state = self.lock();
        state
            .nodes
            .get(node_id)
            .map(|e| node_view(&state, e, &self.inner.telemetry))
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

/// When the sample's latest health fault was seen, in nanoseconds (0: none).
fn last_fault_seen(sample: &GpuSample) -> i128 {
    sample
        .health_reasons
        .iter()
        .filter_map(|r| r.last_seen.as_ref())
        .map(|t| t.seconds as i128 * 1_000_000_000 + t.nanos as i128)
        .max()
        .unwrap_or(0)
}

fn market_key(signal: &gpufleet_proto::v1::MarketSignal) -> String {
    format!(
        "{:012}/{}/{}/{}",
        signal.at.map_or(0, |t| t.seconds),
        signal.provider,
        signal.region,
        signal.generation
    )
}

fn node_facts(state: &State, node_id: &str) -> usage::NodeFacts {
    state
        .nodes
        .get(node_id)
        .and_then(|e| e.record.identity.as_ref())
        .map(|i| usage::NodeFacts {
            zone: i.zone.clone(),
            spot: i.spot,
        })
        .unwrap_or_default()
}

/// The scheduler's view of the fleet now.
fn fleet_index(state: &State) -> Fleet {
    let nodes: Vec<NodeInput> = state
        .nodes
        .values()
        .map(|e| placement::node_input(&e.record, e.session.is_some()))
        .collect();
    let running = placement::running_inputs(state.jobs.values());
    Fleet::build(&nodes, &running)
}

fn node_view(state: &State, entry: &NodeEntry, telemetry: &TelemetryHub) -> Node {
    let held = held_gpus(state);
    let mut node = entry.record.clone();
    let node_id = node
        .identity
        .as_ref()
        .map(|i| i.node_id.as_str())
        .unwrap_or_default();
    let mut latest = telemetry.latest_for_node(node_id);
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
        gpu.latest = latest.remove(&uuid).map(Box::new);
    }
    node.allocated_gpus = allocated;
    node
}

fn parse_page_token(token: &str) -> Result<history::ListKey> {
    let invalid = || {
        ControllerError::invalid(
            "page_token",
            "is not a token this server issued; pass next_page_token unchanged",
        )
    };
    let (nanos, id) = token.split_once(':').ok_or_else(invalid)?;
    let nanos = nanos.parse().map_err(|_| invalid())?;
    if id.is_empty() {
        // Where a listing stopped between two seconds (`second_start`).
        if nanos % 1_000_000_000 != 0 {
            return Err(invalid());
        }
        return Ok(history::second_start(nanos / 1_000_000_000));
    }
    validate::job_id("page_token", id).map_err(|_| invalid())?;
    Ok(history::ListKey::new(nanos, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_are_a_jobs_key_or_a_seconds_start() {
        let id = "job-00000041f0000300";
        let key = parse_page_token(&format!("1055000000123:{id}")).unwrap();
        assert_eq!(key, history::ListKey::new(1_055_000_000_123, id));
        // Where a budgeted listing stopped: below every job of second 1,055.
        let start = parse_page_token("1055000000000:").unwrap();
        assert_eq!(start, history::second_start(1_055));
        assert!(start < key);
        assert!(history::second_start(1_054) < start);
        for bad in ["1055000000123:", "x:", "1055", ":job-1", "12:not an id"] {
            let err = parse_page_token(bad).unwrap_err().to_string();
            assert!(err.contains("page_token"), "{bad}: {err}");
        }
    }
}
