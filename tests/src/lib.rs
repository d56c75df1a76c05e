//! Test harness: real controllers and agents, in-process, talking gRPC over
//! `127.0.0.1:0`. Waits poll a condition with a deadline; nothing sleeps a
//! fixed time hoping things are done.

pub mod podman;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gpufleet_agent::{AgentConfig, NodeConfig, RunningAgent};
use gpufleet_controller::config::StoreConfig;
use gpufleet_controller::{ControllerConfig, RunningController};

pub mod etcd;
use gpufleet_proto::v1::fleet_client::FleetClient;
use gpufleet_proto::v1::jobs_client::JobsClient;
use gpufleet_proto::v1::telemetry_client::TelemetryClient;
use gpufleet_proto::v1::{
    GetJobRequest, Job, JobSpec, ListNodesRequest, NodeState, SubmitJobRequest, WorkloadSpec,
};
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The join token test controllers and agents share.
pub const JOIN_TOKEN: &str = "test-join-token";

/// Adds `authorization: Bearer <token>` to every call: the CLI's own.
pub use gpufleet_cli::client::BearerToken;

/// A client connection that carries a token.
pub type Authed = InterceptedService<Channel, BearerToken>;

/// Connects to `endpoint` with `token` on every call.
pub async fn authed(endpoint: &str, token: &str) -> anyhow::Result<Authed> {
    let channel = Channel::from_shared(endpoint.to_string())?
        .connect()
        .await?;
    Ok(InterceptedService::new(channel, BearerToken::with(token)?))
}

/// The bootstrap admin token a controller wrote in its data dir.
pub fn admin_token_in(controller_data_dir: &std::path::Path) -> anyhow::Result<String> {
    let path = controller_data_dir.join("admin.token");
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .trim()
        .to_string())
}

/// Generous: CI machines are small and busy.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `check` until it yields `Some`, or fails after `DEADLINE`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {DEADLINE:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A simulated node to start.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub id: String,
    pub provider: String,
    pub region: String,
    pub gpus: String,
    pub price: f64,
}

impl NodeSpec {
    pub fn new(id: &str, provider: &str, region: &str, gpus: &str, price: f64) -> Self {
        Self {
            id: id.into(),
            provider: provider.into(),
            region: region.into(),
            gpus: gpus.into(),
            price,
        }
    }
}

/// The fake NVML library (`tests/fake-nvml`), copied into `dir` as
/// `libnvidia-ml.so.1` so that it reads `dir/fake-nvml.json`. Cargo builds
/// it first because gpufleet-tests lists it as a dev-dependency; it lies
/// next to the test executable's `deps/` directory.
pub fn fake_nvml_in(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    const NAME: &str = "libgpufleet_fake_nvml.so";
    let exe = std::env::current_exe().context("cannot find the test executable")?;
    let deps = exe.parent().context("test executable has no directory")?;
    let candidates = [deps.join(NAME), deps.join("..").join(NAME)];
    let built = candidates.iter().find(|p| p.exists()).with_context(|| {
        format!(
            "{NAME} not built; run cargo build -p gpufleet-fake-nvml (looked in {candidates:?})"
        )
    })?;
    std::fs::create_dir_all(dir)?;
    let copy = dir.join("libnvidia-ml.so.1");
    std::fs::copy(built, &copy)
        .with_context(|| format!("cannot copy {} to {}", built.display(), copy.display()))?;
    Ok(copy)
}

/// The `gpufleet-test-shim` executable (this package's binary), which runs
/// the workload shims of the agents that tests start in-process: a test
/// executable cannot be its own shim. Cargo builds it before integration
/// tests; it lies next to their `deps/` directory.
pub fn test_shim() -> PathBuf {
    sibling_of_test_exe("gpufleet-test-shim")
}

/// The gang rendezvous program (`src/bin/rendezvous.rs`).
pub fn rendezvous_program() -> PathBuf {
    sibling_of_test_exe("gpufleet-rendezvous")
}

/// `name` in the directory above the test executable's `deps/` (where
/// cargo puts binaries), else next to it.
fn sibling_of_test_exe(name: &str) -> PathBuf {
    let Some(deps) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
    else {
        return PathBuf::from(name);
    };
    let above = deps.join("..").join(name);
    if above.exists() {
        above
    } else {
        deps.join(name)
    }
}

/// A binary of another workspace package (`gpufleet-agent`,
/// `gpufleet-controller`), built into the same target directory. Cargo
/// builds those only for their own tests or when asked, so the error says
/// how.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = sibling_of_test_exe(name);
    if !path.exists() {
        bail!(
            "{name} is not built (looked for {}); run `cargo build -p {name}` or `cargo test --workspace` first",
            path.display()
        );
    }
    Ok(path)
}

/// Replaces the fake NVML's JSON atomically (write, then rename), so the
/// library never reads a half-written file.
pub fn write_fake_nvml_config(dir: &std::path::Path, json: &str) -> anyhow::Result<()> {
    let tmp = dir.join("fake-nvml.json.tmp");
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, dir.join("fake-nvml.json"))?;
    Ok(())
}

/// A controller plus agents, each with its own data dir under one temp dir.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub controller: Option<RunningController>,
    pub controller_addr: SocketAddr,
    pub agents: Vec<RunningAgent>,
    /// The controller's bootstrap admin token; the harness's clients use it.
    pub admin_token: String,
    /// (NotReady after, Lost after) for the controller's leases.
    leases: (Duration, Duration),
    /// Changes to the test controller's config, applied at every start.
    configure: fn(&mut ControllerConfig),
    /// Where the controller keeps its state (sled in its data dir, or
    /// etcd: [`Cluster::start_on_etcd`]).
    store: StoreConfig,
}

/// The default test fleet: two nodes on two providers.
pub fn two_nodes() -> Vec<NodeSpec> {
    vec![
        NodeSpec::new("node-a", "aws", "us-east-1", "4xH100-SXM-80GB", 3.93),
        NodeSpec::new("node-b", "lambda", "us-west-1", "4xA100-SXM-80GB", 1.79),
    ]
}

impl Cluster {
    pub async fn start(nodes: &[NodeSpec]) -> anyhow::Result<Self> {
        Self::start_with_leases(nodes, (Duration::from_secs(15), Duration::from_secs(60))).await
    }

    /// Like `start`, with short leases for tests of node loss.
    pub async fn start_with_leases(
        nodes: &[NodeSpec],
        leases: (Duration, Duration),
    ) -> anyhow::Result<Self> {
        Self::start_configured(nodes, leases, |_| {}).await
    }

    /// Like `start_with_leases`, with `configure` applied to the
    /// controller's config (limits, timeouts) at every start.
    pub async fn start_configured(
        nodes: &[NodeSpec],
        leases: (Duration, Duration),
        configure: fn(&mut ControllerConfig),
    ) -> anyhow::Result<Self> {
        Self::start_in(tempfile::tempdir()?, nodes, leases, configure).await
    }

    /// Like `start_configured`, in a temp dir the caller prepared (e.g.
    /// `dir/controller` a link to a small filesystem).
    pub async fn start_in(
        dir: tempfile::TempDir,
        nodes: &[NodeSpec],
        leases: (Duration, Duration),
        configure: fn(&mut ControllerConfig),
    ) -> anyhow::Result<Self> {
        Self::start_in_store(dir, nodes, leases, configure, StoreConfig::Sled).await
    }

    /// Like `start`, with the controller's state in etcd (a 3-member
    /// cluster shared by the test process, a prefix of its own). None when
    /// etcd cannot run here (outside CI; see [`etcd::shared`]).
    pub async fn start_on_etcd(nodes: &[NodeSpec]) -> anyhow::Result<Option<Self>> {
        let Some(store) = etcd::fresh_store_config()? else {
            return Ok(None);
        };
        let leases = (Duration::from_secs(15), Duration::from_secs(60));
        Self::start_in_store(tempfile::tempdir()?, nodes, leases, |_| {}, store)
            .await
            .map(Some)
    }

    async fn start_in_store(
        dir: tempfile::TempDir,
        nodes: &[NodeSpec],
        leases: (Duration, Duration),
        configure: fn(&mut ControllerConfig),
        store: StoreConfig,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let controller_addr = listener.local_addr()?;
        let mut config = controller_config(&dir.path().join("controller"), controller_addr, leases);
        config.store = store.clone();
        configure(&mut config);
        let controller = gpufleet_controller::start(config, Some(listener)).await?;
        let admin_token = admin_token_in(&dir.path().join("controller"))?;
        let mut cluster = Self {
            dir,
            controller: Some(controller),
            controller_addr,
            agents: Vec::new(),
            admin_token,
            leases,
            configure,
            store,
        };
        for node in nodes {
            cluster.add_agent(node).await?;
        }
        cluster.wait_ready(nodes.len()).await?;
        Ok(cluster)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.controller_addr)
    }

    pub fn agent_config(&self, node: &NodeSpec) -> AgentConfig {
        let node_config = NodeConfig {
            // Every agent of this fleet runs on this host.
            address: Some("127.0.0.1".into()),
            id: Some(node.id.clone()),
            provider: node.provider.clone(),
            region: node.region.clone(),
            zone: String::new(),
            instance_type: "test".into(),
            price_per_gpu_hour_usd: node.price,
            spot: false,
            labels: BTreeMap::new(),
        };
        AgentConfig {
            sample_interval: Duration::from_millis(200),
            stop_grace_period: Duration::from_secs(2),
            log_max_bytes: 1 << 20,
            shim_program: Some(test_shim()),
            ..AgentConfig::simulated(
                self.endpoint(),
                JOIN_TOKEN,
                node_config,
                vec![node.gpus.clone()],
                self.dir.path().join("agents").join(&node.id),
            )
        }
    }

    pub async fn add_agent(&mut self, node: &NodeSpec) -> anyhow::Result<()> {
        self.add_agent_with(self.agent_config(node)).await
    }

    /// Starts an agent from a config (e.g. `agent_config` switched to the
    /// nvml backend with a fake library).
    pub async fn add_agent_with(&mut self, config: AgentConfig) -> anyhow::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let agent = gpufleet_agent::start(config, Some(listener)).await?;
        self.agents.push(agent);
        Ok(())
    }

    pub async fn wait_ready(&self, count: usize) -> anyhow::Result<()> {
        let endpoint = self.endpoint();
        let token = self.admin_token.clone();
        eventually(&format!("{count} Ready nodes"), || {
            let endpoint = endpoint.clone();
            let token = token.clone();
            async move {
                let Ok(mut fleet) = fleet_client(&endpoint, &token).await else {
                    return Ok(None);
                };
                let Ok(nodes) = fleet.list_nodes(ListNodesRequest::default()).await else {
                    return Ok(None);
                };
                let ready = nodes
                    .into_inner()
                    .nodes
                    .iter()
                    .filter(|n| n.state() == NodeState::Ready && n.connected)
                    .count();
                Ok((ready >= count).then_some(()))
            }
        })
        .await
    }

    pub async fn jobs(&self) -> anyhow::Result<JobsClient<Authed>> {
        jobs_client(&self.endpoint(), &self.admin_token).await
    }

    pub async fn fleet(&self) -> anyhow::Result<FleetClient<Authed>> {
        fleet_client(&self.endpoint(), &self.admin_token).await
    }

    pub async fn telemetry(&self) -> anyhow::Result<TelemetryClient<Authed>> {
        Ok(TelemetryClient::new(
            authed(&self.endpoint(), &self.admin_token).await?,
        ))
    }

    /// A connection with the admin token, for any service's client.
    pub async fn channel(&self) -> anyhow::Result<Authed> {
        authed(&self.endpoint(), &self.admin_token).await
    }

    /// The controller's `/metrics` body.
    pub async fn scrape_metrics(&self) -> anyhow::Result<String> {
        let addr = self
            .controller
            .as_ref()
            .context("the controller is stopped")?
            .metrics_addr();
        http_get(addr, "/metrics").await
    }

    pub async fn submit(&self, gpus: u32, argv: &[&str]) -> anyhow::Result<Job> {
        self.submit_spec(JobSpec {
            gpus_per_task: gpus,
            workload: Some(WorkloadSpec {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
    }

    pub async fn submit_spec(&self, spec: JobSpec) -> anyhow::Result<Job> {
        let mut jobs = self.jobs().await?;
        jobs.submit_job(SubmitJobRequest { spec: Some(spec) })
            .await?
            .into_inner()
            .job
            .context("no job in the answer")
    }

    /// Waits until the job satisfies `done`.
    pub async fn wait_job(
        &self,
        id: &str,
        what: &str,
        done: impl Fn(&Job) -> bool,
    ) -> anyhow::Result<Job> {
        let jobs = self.jobs().await?;
        let done = &done;
        eventually(&format!("job {id}: {what}"), || {
            let mut jobs = jobs.clone();
            let request = GetJobRequest {
                job_id: id.to_string(),
            };
            async move {
                let job = jobs.get_job(request).await?.into_inner();
                Ok(done(&job).then_some(job))
            }
        })
        .await
    }

    /// Stops the controller and starts a new one on the same address and
    /// data dir; agents reconnect by themselves.
    pub async fn restart_controller(&mut self) -> anyhow::Result<()> {
        self.stop_controller().await?;
        self.start_controller().await
    }

    /// Stops the controller (agents keep running and keep redialling).
    pub async fn stop_controller(&mut self) -> anyhow::Result<()> {
        if let Some(controller) = self.controller.take() {
            controller.shutdown().await?;
        }
        Ok(())
    }

    /// Starts a controller on the address and data dir of the stopped one.
    pub async fn start_controller(&mut self) -> anyhow::Result<()> {
        if self.controller.is_some() {
            bail!("the controller is already running");
        }
        // The port was just released; rebinding it may take a moment.
        let addr = self.controller_addr;
        let listener = eventually("the controller port to be free again", || async move {
            Ok(TcpListener::bind(addr).await.ok())
        })
        .await?;
        let mut config = controller_config(&self.dir.path().join("controller"), addr, self.leases);
        config.store = self.store.clone();
        (self.configure)(&mut config);
        let controller = gpufleet_controller::start(config, Some(listener)).await?;
        self.controller = Some(controller);
        Ok(())
    }

    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for agent in self.agents.drain(..) {
            agent.shutdown().await?;
        }
        if let Some(controller) = self.controller.take() {
            controller.shutdown().await?;
        }
        Ok(())
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

fn controller_config(
    dir: &std::path::Path,
    addr: SocketAddr,
    leases: (Duration, Duration),
) -> ControllerConfig {
    let mut config = ControllerConfig::for_data_dir(dir);
    config.listen = addr;
    config.node_not_ready_after = leases.0;
    config.node_lost_after = leases.1;
    config.join_token = JOIN_TOKEN.to_string();
    config
}

pub async fn jobs_client(endpoint: &str, token: &str) -> anyhow::Result<JobsClient<Authed>> {
    Ok(JobsClient::new(authed(endpoint, token).await?))
}

pub async fn fleet_client(endpoint: &str, token: &str) -> anyhow::Result<FleetClient<Authed>> {
    Ok(FleetClient::new(authed(endpoint, token).await?))
}

/// Collects a job task's whole log through the controller.
pub async fn job_log(cluster: &Cluster, job_id: &str, task_index: u32) -> anyhow::Result<String> {
    use tokio_stream::StreamExt;
    let mut jobs = cluster.jobs().await?;
    let mut stream = jobs
        .stream_job_logs(gpufleet_proto::v1::StreamJobLogsRequest {
            job_id: job_id.to_string(),
            task_index,
            offset: 0,
            follow: true,
        })
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend(chunk?.data);
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A minimal HTTP/1.1 GET; returns the body of a 200 answer.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8(response)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of HTTP headers")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}");
    }
    // `Connection: close` answers are not chunked by axum when the length
    // is known; decode chunks anyway to stay correct if that changes.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        loop {
            let (size, after) = rest.split_once("\r\n").context("bad chunk")?;
            let size = usize::from_str_radix(size.trim(), 16)?;
            if size == 0 {
                break;
            }
            out.push_str(after.get(..size).context("short chunk")?);
            rest = after.get(size + 2..).context("short chunk")?;
        }
        return Ok(out);
    }
    Ok(body.to_string())
}
