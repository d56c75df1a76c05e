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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use gpufleet_core::{SharedClock, SystemClock};
use gpufleet_proto::v1::{ControllerMessage, Job, LogResponse, Node, NodeState};
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};

use crate::auth::{Action, Authority, Principal, TokenRecord};
use crate::commit::GroupCommit;
use crate::config::ControllerConfig;
use crate::error::Result;
use crate::history;
use crate::lifecycle::task_holds_gpus;
use crate::placement;
use crate::store::{Keyspace, Store, StoreHealth, load_all, load_all_by_id};
use crate::telemetry::{ReportingRollups, RollupStore, TelemetryHub};
use crate::usage;
use crate::validate;
use gpufleet_scheduler::FairShare;

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

pub use gpufleet_core::{is_terminal_job, is_terminal_workload};

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
    /// Prices from the price sources, and their history.
    prices: crate::pricing::PriceBook,
    /// Spot interruptions, oldest first (bounded; all in the store).
    interruptions: std::collections::VecDeque<gpufleet_proto::v1::Interruption>,
    /// Spot interruption rates the scheduler prices by, recomputed each
    /// market minute and at each interruption.
    interruption_rates: interruptions::InterruptionRates,
    /// Job ids this controller issued lately (the collision check).
    issued_ids: job_ids::IssuedIds,
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
    /// GPU (or MIG instance) UUID → allocation ids holding it: one, or
    /// every share of a shared GPU.
    gpu_owner: HashMap<String, Vec<String>>,
    /// Telemetry of running allocations, by allocation id.
    acc: HashMap<String, usage::Accumulator>,
    /// Last health reported per GPU UUID (absent: healthy).
    health: HashMap<String, i32>,
    queue_wait: WaitHistogram,
    /// GPUs an operator returned to service → latest fault time (ns) known then.
    overrides: HashMap<String, i128>,
}

impl UsageFeed {
    fn own(&mut self, uuid: &str, allocation_id: &str) {
        let owners = self.gpu_owner.entry(uuid.to_string()).or_default();
        if !owners.iter().any(|a| a == allocation_id) {
            owners.push(allocation_id.to_string());
        }
    }

    fn disown(&mut self, uuid: &str, allocation_id: &str) {
        if let Some(owners) = self.gpu_owner.get_mut(uuid) {
            owners.retain(|a| a != allocation_id);
            if owners.is_empty() {
                self.gpu_owner.remove(uuid);
            }
        }
    }
}

struct Inner {
    /// Every time domain code reads: leases, scheduling, usage, market.
    clock: SharedClock,
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
    /// Client streams open now, per token and in all.
    stream_quotas: crate::stream_quota::StreamQuotas,
    /// Tenants' registry credentials for image jobs.
    secrets: crate::secrets::RegistrySecrets,
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
        Self::open_with_clock(config, store, rollups, known_models, SystemClock::shared())
    }

    /// [`Self::open`] on the given clock: tests and the simulator pass a
    /// [`gpufleet_core::ManualClock`] to run leases, scheduling, usage and
    /// market minutes on virtual time.
    pub fn open_with_clock(
        config: ControllerConfig,
        store: Box<dyn Store>,
        rollups: Arc<dyn RollupStore>,
        known_models: Vec<validate::ModelFacts>,
        clock: SharedClock,
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
            last_market_minute: clock.unix_secs() / 60,
            prices: Default::default(),
            interruptions: Default::default(),
            interruption_rates: Default::default(),
            issued_ids: Default::default(),
        };
        let health = StoreHealth::new();
        let store = GroupCommit::with_health(store, health.clone())?;
        let migrated = history::migrate(&store)?;
        let secrets = crate::secrets::RegistrySecrets::load(&store)?;
        if migrated > 0 {
            tracing::info!(
                entries = migrated,
                "brought the indexes of a store written by an older controller up to date"
            );
        }
        let now = clock.monotonic();
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
        let now_secs = clock.unix_secs();
        // One job at a time: settled jobs only feed fair share and counts.
        let mut fair_usage = HashMap::new();
        crate::store::visit::<Job>(
            &store,
            Keyspace::Jobs,
            crate::store::IdRange::default(),
            |_, job| {
                state.issued_ids.loaded(history::submit_second(&job.id));
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
                        feed.own(uuid, &task.allocation_id);
                    }
                }
                state.jobs.insert(job.id.clone(), job);
                Ok(true)
            },
        )?;
        let records = state.ledger.load(&store, now_secs)?;
        state.prices = prices::load_book(
            &store,
            config.price_sources.iter().map(|s| s.to_string()).collect(),
        )?;
        state.interruptions = interruptions::load(&store)?.into();
        for signal in load_all::<gpufleet_proto::v1::MarketSignal>(&store, Keyspace::Market)? {
            state.market.push(signal);
        }
        state.interruption_rates = interruptions::scheduler_rates(&state, now_secs);
        state.fair = FairShare::new(config.fair_share_half_life.as_secs_f64());
        state.fair.restore(fair_usage, now_secs);
        tracing::info!(
            nodes = state.nodes.len(),
            live_jobs = state.jobs.len(),
            finished_jobs = state.settled.values().sum::<u64>(),
            usage_records = records,
            "state loaded from store"
        );
        let mut auth =
            Authority::load(&store, &config.join_token, config.rate_limit, clock.clone())?;
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
        let rollups = Arc::new(ReportingRollups::new(rollups, health));
        let telemetry = TelemetryHub::new(rollups, config.telemetry_retention);
        let stream_quotas = crate::stream_quota::StreamQuotas::new(config.streams);
        Ok(Self {
            inner: Arc::new(Inner {
                clock,
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
                stream_quotas,
                secrets,
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

    /// The clock this controller reads.
    pub fn clock(&self) -> &SharedClock {
        &self.inner.clock
    }

    /// Wall-clock time now, by this controller's clock.
    pub fn now(&self) -> SystemTime {
        self.inner.clock.now()
    }

    fn now_ts(&self) -> prost_types::Timestamp {
        prost_types::Timestamp::from(self.inner.clock.now())
    }

    pub fn config(&self) -> &ControllerConfig {
        &self.inner.config
    }

    /// Tokens, node identities and rate limits.
    pub fn auth(&self) -> &Authority {
        &self.inner.auth
    }

    /// Client streams open now, and their caps.
    pub fn stream_quotas(&self) -> &crate::stream_quota::StreamQuotas {
        &self.inner.stream_quotas
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

    /// Creates or replaces a tenant's registry credential.
    pub fn put_registry_secret(
        &self,
        tenant: &str,
        name: &str,
        registry: &str,
        username: &str,
        password: &str,
    ) -> Result<gpufleet_proto::v1::RegistrySecret> {
        let now = self.inner.clock.unix_secs();
        let secret = gpufleet_proto::v1::RegistrySecret {
            tenant: tenant.to_string(),
            name: name.to_string(),
            registry: registry.to_string(),
            username: username.to_string(),
            updated_at: None,
        };
        self.inner
            .secrets
            .put(&self.inner.store, secret, password, now)
    }

    pub fn delete_registry_secret(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<gpufleet_proto::v1::RegistrySecret> {
        self.inner.secrets.delete(&self.inner.store, tenant, name)
    }

    /// Registry credentials without their passwords; `None`: every tenant's.
    pub fn list_registry_secrets(
        &self,
        tenant: Option<&str>,
    ) -> Vec<gpufleet_proto::v1::RegistrySecret> {
        self.inner.secrets.list(tenant)
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

    /// Resolves once every change made so far is durable (and what it
    /// announced has been sent). A reply that shows state must wait for it
    /// first: the gRPC services do (see `service::Settled`).
    pub async fn settled(&self) -> Result<()> {
        Ok(self.inner.store.settled().await?)
    }

    /// Resolves once batch `number` of the store's queue is durable: for a
    /// reply that showed only what that batch (and those before it) wrote.
    pub async fn durable(&self, number: u64) -> Result<()> {
        Ok(self.inner.store.durable(number).await?)
    }

    /// Whether the store's writes work (`/metrics`, health, and the gRPC
    /// layer, which refuses changes while they do not).
    pub fn store_health(&self) -> &Arc<StoreHealth> {
        self.inner.store.health()
    }

    /// What this controller asked of its store so far (`/metrics`, benchmarks).
    pub fn store_traffic(&self) -> crate::store::TrafficSnapshot {
        self.inner.store.traffic().snapshot()
    }

    /// [`Self::settled`], blocking the thread: for tests and tools outside
    /// an async runtime.
    pub fn wait_settled(&self) -> Result<()> {
        let store = &self.inner.store;
        Ok(store.wait_durable(store.written())?)
    }
}

mod capacity;
mod gpu_health;
pub mod interruptions;
mod job_ids;
mod jobs;
mod ledger;
mod logs;
mod mig_layout;
mod nodes;
pub mod prices;
mod scheduling;
mod sessions;
