//! Builds the controller and serves it: gRPC services plus health and
//! reflection, the scheduling loop and the lease checker.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use gpufleet_proto::v1::agent_control_server::AgentControlServer;
use gpufleet_proto::v1::fleet_server::FleetServer;
use gpufleet_proto::v1::jobs_server::JobsServer;
use gpufleet_proto::v1::secrets_server::SecretsServer;
use gpufleet_proto::v1::telemetry_server::TelemetryServer;
use gpufleet_proto::v1::tokens_server::TokensServer;
use gpufleet_proto::v1::usage_server::UsageServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

use crate::config::{ControllerConfig, StoreConfig};
use crate::service::guard::{AGENT_MESSAGE_BYTES, RESPONSE_BYTES, service_request_limit};
use crate::service::{
    AgentControlService, FleetService, Guarded, JobsService, SecretsService, Settled,
    TelemetryService, TokensService, UsageService,
};
use crate::state::Controller;
use crate::store::etcd::election::{Election, ElectionOptions, Leadership};
use crate::store::{EtcdStore, SledStore, Store};
use crate::telemetry::segments::{ROLLUP_DIR, SegmentRollupStore};
use crate::validate::ModelFacts;

/// HTTP/2 receive window per stream: request bytes one call may send
/// before the controller reads them.
const HTTP2_STREAM_WINDOW: u32 = 1024 * 1024;
/// HTTP/2 receive window per connection, shared by its streams.
const HTTP2_CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;
/// Calls one connection may have open at once (streams included).
const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Streams a client may open and reset before the controller accepted them
/// (the "rapid reset" flood); over it the connection is closed.
const HTTP2_MAX_PENDING_RESETS: usize = 20;

/// Finished telemetry minutes are written this often, a paced share of
/// the queue each time ([`crate::telemetry::paced_flush_budget`]).
pub const ROLLUP_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// The agents' applied seqs are stored this often.
const AGENT_SEQ_PERSIST_INTERVAL: Duration = Duration::from_secs(5);
/// Finished jobs deleted per garbage-collection round (every 5 s).
const JOB_GC_BATCH: usize = 10_000;
/// Rollups past the retention are deleted this often.
const ROLLUP_PRUNE_INTERVAL: Duration = Duration::from_secs(600);

pub struct RunningController {
    controller: Controller,
    local_addr: SocketAddr,
    metrics_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    metrics_shutdown: Option<oneshot::Sender<()>>,
    metrics: JoinHandle<std::io::Result<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    background: Vec<JoinHandle<()>>,
    /// Held while this in-process controller leads (etcd store).
    leadership: Option<std::sync::Arc<Leadership>>,
}

impl RunningController {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://ADDR`, ready for a client.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// Where `/metrics` is served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    /// Stops serving (open streams are ended) and releases the store.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.controller.close();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(tx) = self.metrics_shutdown.take() {
            let _ = tx.send(());
        }
        for task in self.background.drain(..) {
            task.abort();
            let _ = task.await;
        }
        // Agent streams stop applying at the close; wait for the last
        // message in hand, so the flush below and the saved seqs agree.
        let streams_deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.controller.agent_streams() > 0 {
            if tokio::time::Instant::now() > streams_deadline {
                tracing::warn!(
                    streams = self.controller.agent_streams(),
                    "agent streams still open 5s after shutdown began"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // What the last flush missed: the unfinished minutes are kept too.
        let end_of_time = self.controller.now() + Duration::from_secs(3600);
        if let Err(e) = self.controller.telemetry().flush(end_of_time) {
            tracing::warn!(error = %e, "telemetry rollups not written at shutdown");
        }
        if let Err(e) = self.controller.persist_agent_seqs() {
            tracing::warn!(error = %e, "agents' applied seqs not written at shutdown; they may replay events once");
        }
        // Everything queued is durable (and what waited for it was sent)
        // before the store is released.
        if let Err(e) = self.controller.settled().await {
            tracing::warn!(error = %e, "changes not stored at shutdown");
        }
        match tokio::time::timeout(Duration::from_secs(5), &mut self.metrics).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "metrics server failed"),
            Ok(_) => {}
            Err(_) => self.metrics.abort(),
        }
        match tokio::time::timeout(Duration::from_secs(10), &mut self.server).await {
            Ok(joined) => joined
                .context("controller server task panicked")?
                .context("controller server failed")?,
            Err(_) => {
                self.server.abort();
                tracing::warn!("controller server did not stop within 10s; aborted");
            }
        }
        // The store is released when the last handle goes; stream tasks
        // drop theirs as they notice the close.
        let weak = self.controller.downgrade();
        drop(self.controller);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while weak.strong_count() > 0 {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!(
                    "controller state still in use 10s after shutdown; the store stays locked"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(leadership) = self.leadership.take().and_then(std::sync::Arc::into_inner) {
            leadership.resign().await;
        }
        Ok(())
    }
}

/// The listener's TLS settings from PEM files; `None` for plain gRPC.
pub(crate) fn server_tls(
    config: &crate::config::TlsServerConfig,
) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let (Some(cert), Some(key)) = (&config.cert, &config.key) else {
        return Ok(None);
    };
    let read = |path: &std::path::PathBuf, what: &str| {
        std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read(cert, "TLS certificate (tls_cert)")?,
        read(key, "TLS key (tls_key)")?,
    ));
    if let Some(ca) = &config.client_ca {
        // Optional at the TLS layer, so CLI and scheduler clients need no
        // certificate; AgentControl.Connect refuses agents without one.
        tls = tls
            .client_ca_root(Certificate::from_pem(read(
                ca,
                "client CA (tls_client_ca)",
            )?))
            .client_auth_optional(true);
    }
    Ok(Some(tls))
}

/// A client-facing service as it is served: guarded, then settled.
fn client_service<S>(service: S, controller: &Controller) -> Guarded<Settled<S>> {
    Guarded::new(
        Settled::new(service, controller.clone()),
        controller.clone(),
    )
}

/// Opens the store, rebuilds state and starts serving. Pass a bound
/// listener (tests bind `127.0.0.1:0`) or `None` to bind `config.listen`.
/// Flips every service's health (and the server's, "") to NOT_SERVING while
/// the store cannot write, and back to SERVING once it can.
async fn report_store_health(
    mut degraded: tokio::sync::watch::Receiver<crate::store::Degraded>,
    reporter: tonic_health::server::HealthReporter,
) {
    const SERVICES: [&str; 8] = [
        "",
        <JobsServer<JobsService> as tonic::server::NamedService>::NAME,
        <FleetServer<FleetService> as tonic::server::NamedService>::NAME,
        <UsageServer<UsageService> as tonic::server::NamedService>::NAME,
        <AgentControlServer<AgentControlService> as tonic::server::NamedService>::NAME,
        <TelemetryServer<TelemetryService> as tonic::server::NamedService>::NAME,
        <TokensServer<TokensService> as tonic::server::NamedService>::NAME,
        <SecretsServer<SecretsService> as tonic::server::NamedService>::NAME,
    ];
    loop {
        let status = if degraded.borrow_and_update().is_degraded() {
            tonic_health::ServingStatus::NotServing
        } else {
            tonic_health::ServingStatus::Serving
        };
        for service in SERVICES {
            reporter.set_service_status(service, status).await;
        }
        if degraded.changed().await.is_err() {
            return;
        }
    }
}

pub async fn start(
    config: ControllerConfig,
    listener: Option<TcpListener>,
) -> anyhow::Result<RunningController> {
    let listener = match listener {
        Some(listener) => listener,
        None => TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?,
    };
    let local_addr = listener.local_addr()?;
    // TCP_NODELAY: the desired state is a small write often queued behind
    // another unacknowledged one (an Ack); with Nagle on it waits for the
    // agent's delayed ACK, ~40 ms on Linux. The builder's own nodelay
    // setting does not reach a listener passed in like this one.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (store, leadership): (Box<dyn Store>, _) = match &config.store {
        StoreConfig::Sled => {
            std::fs::create_dir_all(&config.data_dir)
                .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
            let store = SledStore::open_with_cache(&config.data_dir, config.store_cache_bytes)?;
            (Box::new(store), None)
        }
        // In-process (tests, benchmarks): wait to be elected, then lead;
        // the binary serves standby answers meanwhile (`crate::ha::run`).
        StoreConfig::Etcd(etcd) => {
            let client = crate::ha::connect(etcd).await?;
            let election = Election::new(
                std::sync::Arc::clone(&client),
                ElectionOptions {
                    advertise: crate::ha::advertise_url(&config, etcd, local_addr),
                    ttl: etcd.leader_lease,
                },
            );
            let leadership = election.campaign().await;
            let store = EtcdStore::new(client);
            store.set_fence(Some(leadership.fence.clone()));
            (Box::new(store), Some(leadership))
        }
    };
    let mut running = start_serving(config, store, incoming, local_addr).await?;
    if let Some(leadership) = leadership {
        let controller = running.controller.clone();
        running.leadership = Some(std::sync::Arc::new(leadership));
        let held = running.leadership.clone();
        running.background.push(tokio::spawn(async move {
            if let Some(held) = held {
                held.lost().await;
                tracing::error!("lost the leadership; this controller stops acting");
                controller.close();
            }
        }));
    }
    Ok(running)
}

/// Serves `store` on `incoming` (bound at `local_addr`): rebuilds the
/// state from the store, starts the background loops and the gRPC and
/// metrics servers.
pub(crate) async fn start_serving<I>(
    config: ControllerConfig,
    store: Box<dyn Store>,
    incoming: I,
    local_addr: SocketAddr,
) -> anyhow::Result<RunningController>
where
    I: tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static,
{
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let tls_config = config.tls.clone();
    let rollups = SegmentRollupStore::open(&config.data_dir.join(ROLLUP_DIR))?;
    let metrics_listener = TcpListener::bind(config.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (metrics_listen)",
                config.metrics_listen
            )
        })?;
    let metrics_addr = metrics_listener.local_addr()?;
    let known_models: Vec<ModelFacts> = gpufleet_core::catalog::MODELS
        .iter()
        .map(|m| ModelFacts {
            name: m.model.to_string(),
            generation: m.generation as i32,
            memory_bytes: m.memory_bytes,
            compute_capability: m.compute_capability,
        })
        .collect();
    let controller = Controller::open(config, store, std::sync::Arc::new(rollups), known_models)?;

    let mut background = Vec::new();
    let scheduler = controller.clone();
    background.push(tokio::spawn(async move {
        loop {
            // A pass on every relevant change, and at least once a second
            // so that leases and readiness changes are picked up.
            let _ = tokio::time::timeout(Duration::from_secs(1), scheduler.schedule_wanted()).await;
            if let Err(e) = scheduler.schedule_pass() {
                tracing::error!(error = %e, "scheduling pass failed");
            }
        }
    }));
    let leases = controller.clone();
    background.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut ticks: u64 = 0;
        loop {
            tick.tick().await;
            ticks += 1;
            if let Err(e) = leases.check_leases() {
                tracing::error!(error = %e, "lease check failed");
            }
            // Every 5 s, a bounded batch, so a backlog is worked off
            // without holding the state lock long.
            if ticks.is_multiple_of(10) {
                match leases.gc_finished_jobs(leases.now(), JOB_GC_BATCH) {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::debug!(deleted = n, "finished jobs past their retention deleted")
                    }
                    Err(e) => tracing::error!(error = %e, "deleting finished jobs failed"),
                }
            }
            if let Err(e) = leases.record_market_minute() {
                tracing::error!(error = %e, "recording market signals failed");
            }
        }
    }));

    for (index, source) in controller
        .config()
        .price_sources
        .iter()
        .cloned()
        .enumerate()
    {
        let prices = controller.clone();
        let every = controller.config().price_refresh_interval;
        background.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // A fetch may take up to one interval (at most a minute).
                let fetched = source.fetch(every.min(Duration::from_secs(60))).await;
                if let Err(e) = prices.apply_price_refresh(index, fetched) {
                    tracing::error!(source = %source, error = %e, "applying prices failed");
                }
            }
        }));
    }
    background.push(tokio::spawn(crate::memory::trim_periodically(
        crate::memory::TRIM_INTERVAL,
    )));
    let telemetry = controller.clone();
    background.push(tokio::spawn(async move {
        let mut flush = tokio::time::interval(ROLLUP_FLUSH_INTERVAL);
        let mut seqs = tokio::time::interval(AGENT_SEQ_PERSIST_INTERVAL);
        let mut prune = tokio::time::interval(ROLLUP_PRUNE_INTERVAL);
        loop {
            // Store I/O: off the async workers.
            let hub = telemetry.clone();
            let work = tokio::select! {
                _ = flush.tick() => tokio::task::spawn_blocking(move || {
                    let telemetry = hub.telemetry();
                    let budget = crate::telemetry::paced_flush_budget(telemetry.queued_records());
                    telemetry.flush_oldest(hub.now(), budget).map(|_| ())
                }),
                // Samples of a stored seq whose minute is still queued are
                // lost if the controller dies now: a crash loses samples
                // (as it loses every GPU's current minute) rather than
                // applying a replay twice.
                _ = seqs.tick() => tokio::task::spawn_blocking(move || {
                    hub.persist_agent_seqs().map(|_| ())
                }),
                _ = prune.tick() => tokio::task::spawn_blocking(move || {
                    let removed = hub.telemetry().prune(hub.now())?;
                    if removed > 0 {
                        tracing::info!(removed, "telemetry rollups past retention deleted");
                    }
                    Ok(())
                }),
            };
            match work.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "telemetry rollup write failed"),
                Err(e) => tracing::error!(error = %e, "telemetry rollup task failed"),
            }
        }
    }));
    let (metrics_shutdown, metrics_shutdown_rx) = oneshot::channel::<()>();
    let metrics = tokio::spawn(crate::metrics::serve(
        metrics_listener,
        controller.clone(),
        async {
            let _ = metrics_shutdown_rx.await;
        },
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<JobsServer<JobsService>>()
        .await;
    health_reporter
        .set_serving::<FleetServer<FleetService>>()
        .await;
    health_reporter
        .set_serving::<UsageServer<UsageService>>()
        .await;
    health_reporter
        .set_serving::<AgentControlServer<AgentControlService>>()
        .await;
    health_reporter
        .set_serving::<TelemetryServer<TelemetryService>>()
        .await;
    health_reporter
        .set_serving::<TokensServer<TokensService>>()
        .await;
    health_reporter
        .set_serving::<SecretsServer<SecretsService>>()
        .await;
    // Alive (standbys report it too; docs/ha.md): a liveness probe's service.
    health_reporter
        .set_service_status(
            crate::ha::LIVENESS_SERVICE,
            tonic_health::ServingStatus::Serving,
        )
        .await;
    background.push(tokio::spawn(report_store_health(
        controller.store_health().subscribe(),
        health_reporter,
    )));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(gpufleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the reflection service")?;

    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    // HTTP/2 bounds (docs/grpc.md, "Limits on streams"). The windows are
    // what a connection may send us before we read it; a client that stops
    // reading its socket altogether is found by the keepalive and closed.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .initial_stream_window_size(HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
        .max_concurrent_streams(HTTP2_MAX_CONCURRENT_STREAMS)
        .http2_max_pending_accept_reset_streams(Some(HTTP2_MAX_PENDING_RESETS));
    if let Some(tls) = server_tls(&tls_config)? {
        builder = builder
            .tls_config(tls)
            .context("invalid TLS configuration")?;
    }
    // Client services: the guard authenticates before a body is read and
    // caps it per RPC (service/guard.rs); tonic's decoding limit is the
    // service's largest cap, so the guard's clearer refusal comes first.
    // Every reply then waits until the changes it may show are durable.
    // AgentControl authenticates in its hello and keeps a per-message
    // limit; its messages wait in the store's queue instead.
    use tonic::server::NamedService;
    let decode = service_request_limit;
    let router = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(client_service(
            JobsServer::new(JobsService::new(controller.clone()))
                .max_decoding_message_size(decode(JobsServer::<JobsService>::NAME))
                .max_encoding_message_size(RESPONSE_BYTES),
            &controller,
        ))
        .add_service(client_service(
            FleetServer::new(FleetService::new(controller.clone()))
                .max_decoding_message_size(decode(FleetServer::<FleetService>::NAME))
                .max_encoding_message_size(RESPONSE_BYTES),
            &controller,
        ))
        .add_service(client_service(
            UsageServer::new(UsageService::new(controller.clone()))
                .max_decoding_message_size(decode(UsageServer::<UsageService>::NAME))
                .max_encoding_message_size(RESPONSE_BYTES),
            &controller,
        ))
        .add_service(client_service(
            TokensServer::new(TokensService::new(controller.clone()))
                .max_decoding_message_size(decode(TokensServer::<TokensService>::NAME))
                .max_encoding_message_size(RESPONSE_BYTES),
            &controller,
        ))
        .add_service(client_service(
            SecretsServer::new(SecretsService::new(controller.clone()))
                .max_decoding_message_size(decode(SecretsServer::<SecretsService>::NAME))
                .max_encoding_message_size(RESPONSE_BYTES),
            &controller,
        ))
        .add_service(client_service(
            TelemetryServer::new(TelemetryService::new(controller.clone()))
                .max_decoding_message_size(decode(TelemetryServer::<TelemetryService>::NAME))
                .max_encoding_message_size(RESPONSE_BYTES),
            &controller,
        ))
        .add_service(
            AgentControlServer::new(AgentControlService::new(controller.clone()))
                .max_decoding_message_size(AGENT_MESSAGE_BYTES)
                .max_encoding_message_size(AGENT_MESSAGE_BYTES),
        );
    let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = shutdown_rx.await;
    }));
    tracing::info!(%local_addr, metrics = %crate::metrics::url(metrics_addr), "controller serving");
    Ok(RunningController {
        controller,
        local_addr,
        metrics_addr,
        shutdown: Some(shutdown_tx),
        metrics_shutdown: Some(metrics_shutdown),
        metrics,
        server,
        background,
        leadership: None,
    })
}
