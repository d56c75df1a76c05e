//! gpufleet agent: reports a GPU host's telemetry to the controller and runs
//! the workloads it is given (or that the local `Agent` API starts).
//!
//! [`start`] builds everything and returns a [`RunningAgent`] handle;
//! `main.rs` only parses configuration and waits for a signal.

pub mod backend;
pub mod config;
pub mod gang;
pub mod health;
pub mod identity;
pub mod interruption;
pub mod kmsg;
pub mod limits;
pub mod log_retention;
pub mod metrics;
pub mod outbox;
pub mod runtime;
pub mod service;
pub mod sharing;
pub mod shim;
pub mod store;
pub mod supervisor;
pub mod telemetry;
mod uplink;
mod workload_store;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use gpufleet_proto::v1::NodeIdentity;
use gpufleet_proto::v1::agent_server::AgentServer;
use runtime::WorkloadRuntime as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

pub use backend::GpuBackend;
pub use backend::simulated::{SimFault, SimulatedBackend};
pub use config::{
    AgentConfig, ConfigError, GpuBackendKind, MonitoringConfig, NodeConfig, TlsClientConfig,
};
pub use gpufleet_core::catalog;
pub use gpufleet_core::catalog::{ModelSpec, parse_gpu_declaration};
pub use health::{HealthPolicy, HealthTracker};
pub use outbox::{Outbox, OutboxStats};
pub use service::AgentService;
pub use supervisor::{Recovery, Source, Supervisor, SupervisorError, SupervisorSettings};
pub use telemetry::Telemetry;

/// A started agent. Call [`RunningAgent::shutdown`] to stop it cleanly.
#[derive(Debug)]
pub struct RunningAgent {
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    node_id: String,
    backend: Arc<dyn GpuBackend>,
    telemetry: Arc<Telemetry>,
    gpu_uuids: Vec<String>,
    supervisor: Supervisor,
    /// `keep_workloads_on_exit`: shutdown leaves workloads running.
    keep_workloads: bool,
    outbox: Arc<Outbox>,
    stop_recorder: watch::Sender<bool>,
    recorder: JoinHandle<()>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    tasks: Vec<JoinHandle<()>>,
}

/// Builds the GPU backend, the workload supervisor, the sampler, the
/// controller uplink and the local `Agent` API (with health and reflection),
/// and starts them. `listener` replaces binding `config.listen` (tests pass
/// one bound to `127.0.0.1:0`).
pub async fn start(
    config: AgentConfig,
    listener: Option<TcpListener>,
) -> anyhow::Result<RunningAgent> {
    config.validate()?;
    let node_id = config
        .node
        .id
        .clone()
        .unwrap_or_else(config::default_node_id);
    let backend = {
        let config = config.clone();
        let node_id = node_id.clone();
        // NVML initialisation blocks (and may take seconds on big hosts).
        tokio::task::spawn_blocking(move || build_backend(&config, &node_id))
            .await
            .context("GPU backend initialisation panicked")??
    };
    let gpus = backend.gpus();
    let gpu_uuids: Vec<String> = gpus.iter().map(|g| g.uuid.clone()).collect();
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;

    // One sled database per agent; sled's lock file makes a second agent
    // on the same data_dir fail here rather than corrupt it.
    let outbox = {
        let data_dir = config.data_dir.clone();
        let max_bytes = config.outbox_max_bytes;
        tokio::task::spawn_blocking(move || {
            Outbox::open(&data_dir, max_bytes, uplink::initial_seq())
        })
        .await
        .context("opening the agent's database panicked")?
        .context("cannot open the agent's outbox")?
    };
    let outbox = Arc::new(outbox);
    let backlog = outbox.stats();
    if backlog.events > 0 {
        info!(
            events = backlog.events,
            bytes = backlog.bytes,
            "events from before the restart wait in the outbox for the controller"
        );
    }

    let address = match &config.node.address {
        Some(address) => address.clone(),
        None => match config::default_advertise_address() {
            Ok(address) => address,
            Err((fallback, why)) => {
                warn!(
                    address = %fallback,
                    %why,
                    "no private address found; gang peers on other nodes may not reach this one: set node.address (--advertise-address)"
                );
                fallback
            }
        },
    };
    info!(%address, "address advertised to gang peers");
    let mut settings = SupervisorSettings::new(config.data_dir.clone());
    settings.default_grace = config.stop_grace_period;
    settings.log_max_bytes = config.log_max_bytes;
    settings.max_concurrent_starts = config.max_concurrent_starts;
    settings.gpu_sharing = crate::sharing::GpuSharing::detect(
        config.gpu_sharing.mode,
        &config.gpu_sharing.mps_pipe_directory,
    );
    tracing::info!(
        gpu_sharing = settings.gpu_sharing.name(),
        "how shared GPU allocations are enforced"
    );
    if let Some(program) = &config.shim_program {
        settings.shim_program = program.clone();
    }
    let runtime = workload_runtime(&config, &settings).await?;
    let identity = NodeIdentity {
        node_id: node_id.clone(),
        address,
        provider: config.node.provider.clone(),
        region: config.node.region.clone(),
        zone: config.node.zone.clone(),
        instance_type: config.node.instance_type.clone(),
        price_per_gpu_hour_micro_usd: config.price_micro_usd(),
        spot: config.node.spot,
        labels: config.node.labels.clone().into_iter().collect(),
        hostname: hostname::get()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        runtimes: runtime.runtimes(),
    };
    let telemetry = Arc::new(Telemetry::new(
        identity,
        backend.as_ref(),
        config.monitoring.health.clone(),
    ));
    if config.monitoring.read_kmsg && config.gpu_backend == GpuBackendKind::Nvml {
        telemetry.start_kmsg_reader();
    }
    let supervisor = Supervisor::with_runtime(backend.clone(), settings, runtime.clone());
    if let Some(name) = &config.workload_user {
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| anyhow::anyhow!("cannot look up workload_user {name:?}: {e}"))?
            .ok_or_else(|| anyhow::anyhow!("workload_user {name:?} does not exist on this host; create it or change the setting"))?;
        if !nix::unistd::geteuid().is_root() {
            anyhow::bail!(
                "workload_user {name:?} needs the agent to run as root (it runs as uid {}); run it as root or drop the setting",
                nix::unistd::geteuid()
            );
        }
        supervisor.run_as(user.uid.as_raw(), user.gid.as_raw());
        info!(user = %name, uid = user.uid.as_raw(), "workloads run as an unprivileged user");
    }
    // Before the uplink starts, so its first hello reports them.
    let recovery = supervisor.recover();
    if recovery != Recovery::default() {
        info!(
            adopted = recovery.adopted.len(),
            finished = recovery.finished.len(),
            lost = recovery.lost.len(),
            unreadable = recovery.unreadable.len(),
            "recovered the workloads of an earlier run"
        );
    }

    let listener = match listener {
        Some(l) => l,
        None => TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?,
    };
    let local_addr = listener
        .local_addr()
        .context("listener has no local address")?;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    // Status changes are recorded from the start, whether or not the
    // controller is reachable, until after the workloads are stopped.
    let (stop_recorder, stop_recorder_rx) = watch::channel(false);
    let recorder = tokio::spawn(uplink::record_statuses(
        supervisor.clone(),
        outbox.clone(),
        stop_recorder_rx,
    ));
    // A full disk degrades the outbox; this reopens it once writes work.
    tasks.push(tokio::spawn(
        outbox.clone().keep_recovering(shutdown_rx.clone()),
    ));
    tasks.push(tokio::spawn(telemetry.clone().run_sampler(
        backend.clone(),
        supervisor.clone(),
        outbox.clone(),
        config.sample_interval,
        shutdown_rx.clone(),
    )));
    let retention_stats = Arc::new(log_retention::RetentionStats::default());
    if let Some(retention) = config.log_retention {
        tasks.push(tokio::spawn(log_retention::run(
            supervisor.clone(),
            retention,
            retention_stats.clone(),
            shutdown_rx.clone(),
        )));
    }
    let metrics_addr = match config.monitoring.metrics_listen {
        Some(addr) => {
            let (local, task) = metrics::serve(
                addr,
                telemetry.clone(),
                outbox.clone(),
                retention_stats.clone(),
                shutdown_rx.clone(),
            )
            .await?;
            tasks.push(task);
            Some(local)
        }
        None => None,
    };
    let tls = uplink::client_tls(&config.controller, &config.tls)?;
    let node_secret = identity::NodeSecret::load(&config.data_dir).with_context(|| {
        format!(
            "cannot read the node secret in {}",
            config.data_dir.display()
        )
    })?;
    let uplink = uplink::Uplink::new(
        config.controller.clone(),
        config.join_token.clone(),
        config.sample_interval,
        supervisor.clone(),
        telemetry.clone(),
        outbox.clone(),
    )
    .with_tls(tls)
    .with_node_secret(node_secret);
    tasks.push(tokio::spawn(uplink.run(shutdown_rx.clone())));
    if let Some(spot) = &config.interruptions {
        tasks.push(tokio::spawn(interruption::watch(
            interruption::cloud::Metadata::new(
                spot.cloud,
                spot.endpoint.clone(),
                std::time::Duration::from_secs(5),
            ),
            supervisor.clone(),
            outbox.clone(),
            interruption::WatchSettings {
                poll_interval: spot.poll_interval,
                stop_margin: spot.stop_margin,
            },
            shutdown_rx.clone(),
        )));
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentServer<AgentService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(gpufleet_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build the gRPC reflection service")?;
    let service = AgentService::new(supervisor.clone(), telemetry.clone());
    if !local_addr.ip().is_loopback() && config.api_token.is_none() {
        anyhow::bail!(
            "listen: {local_addr} is not a loopback address, so the Agent API would be open to the network: set api_token (GPUFLEET_API_TOKEN), or listen on 127.0.0.1"
        );
    }
    let api_token = config.api_token.clone();
    let mut server_shutdown = shutdown_rx;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(AgentServer::with_interceptor(service, move |request| {
                service::check_api_token(api_token.as_deref(), request)
            }))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = server_shutdown.wait_for(|s| *s).await;
            }),
    );
    info!(
        %node_id,
        listen = %local_addr,
        backend = backend.name(),
        gpus = gpu_uuids.len(),
        controller = %config.controller,
        metrics = ?metrics_addr,
        "agent started"
    );
    Ok(RunningAgent {
        local_addr,
        metrics_addr,
        node_id,
        backend,
        telemetry,
        gpu_uuids,
        supervisor,
        keep_workloads: config.keep_workloads_on_exit,
        outbox,
        stop_recorder,
        recorder,
        shutdown,
        server,
        tasks,
    })
}

/// Builds the GPU backend the config asks for. Here, in the agent's
/// startup, so that `backend` knows nothing of the configuration.
fn build_backend(config: &AgentConfig, node_id: &str) -> anyhow::Result<Arc<dyn GpuBackend>> {
    Ok(match config.gpu_backend {
        GpuBackendKind::Nvml => Arc::new(backend::nvml::NvmlBackend::new(
            config
                .monitoring
                .nvml_library_path
                .as_deref()
                .map(|p| p.as_os_str()),
        )?),
        GpuBackendKind::Simulated => {
            Arc::new(SimulatedBackend::new(node_id, &config.simulated_gpus)?)
        }
    })
}

impl RunningAgent {
    /// Address the local `Agent` API actually listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Address `/metrics` is served on, when enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The GPU backend (tests reach the simulated one through
    /// [`GpuBackend::as_simulated`] to inject faults).
    pub fn backend(&self) -> &Arc<dyn GpuBackend> {
        &self.backend
    }

    /// Latest samples, health and static GPU facts.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// UUIDs of this node's GPUs, in index order.
    pub fn gpu_uuids(&self) -> Vec<String> {
        self.gpu_uuids.clone()
    }

    /// Size and counters of the outbox of events for the controller.
    pub fn outbox_stats(&self) -> OutboxStats {
        self.outbox.stats()
    }

    /// The workload manager, for embedding and tests.
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// Stops the uplink, the sampler and the local API, then stops every
    /// running workload (SIGTERM, grace period, SIGKILL) so nothing is left
    /// orphaned. A task's panic is re-raised as an error.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        if self.keep_workloads {
            let running = self.supervisor.detach().await;
            if running > 0 {
                info!(
                    running,
                    "leaving workloads running; the next agent start re-adopts them"
                );
            }
        } else {
            // Workloads first: a following log stream ends only when its
            // workload does, and the server drains open streams before exiting.
            self.supervisor.shutdown().await;
        }
        let mut first_error = None;
        // The workloads' last statuses go into the outbox for the next run.
        let _ = self.stop_recorder.send(true);
        if let Err(e) = self.recorder.await {
            first_error.get_or_insert_with(|| anyhow::anyhow!("status recorder failed: {e}"));
        }
        for task in self.tasks {
            if let Err(e) = task.await {
                first_error.get_or_insert_with(|| anyhow::anyhow!("agent task failed: {e}"));
            }
        }
        match self.server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert_with(|| anyhow::anyhow!("local API server failed: {e}"));
            }
            Err(e) => {
                first_error
                    .get_or_insert_with(|| anyhow::anyhow!("local API server task failed: {e}"));
            }
        }
        if let Err(e) = self.outbox.flush() {
            first_error.get_or_insert_with(|| anyhow::anyhow!("cannot flush the outbox: {e}"));
        }
        info!("agent stopped");
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The process runtime, plus the oci runtime when configured (podman must
/// answer, else the agent does not start: a node that advertised `oci`
/// without it would fail every image job placed on it).
async fn workload_runtime(
    config: &AgentConfig,
    settings: &SupervisorSettings,
) -> anyhow::Result<Arc<runtime::oci::Runtimes>> {
    let process = Arc::new(runtime::process::ProcessRuntime::new(
        settings.data_dir.clone(),
        settings.shim_program.clone(),
        settings.shim_launch,
    ));
    let oci = match config.oci.clone() {
        Some(oci) => {
            let data_dir = config.data_dir.clone();
            let process = process.clone();
            let built = tokio::task::spawn_blocking(move || {
                runtime::oci::OciRuntime::new(oci, &data_dir, process)
            })
            .await
            .context("starting the oci runtime panicked")?;
            Some(built.map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    Ok(Arc::new(runtime::oci::Runtimes::new(process, oci)))
}
