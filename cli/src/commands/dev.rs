//! `gpufleet dev`: the whole system on one machine. An embedded controller
//! and one simulated agent per node, each a real gRPC peer on loopback.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use gpufleet_agent::{AgentConfig, NodeConfig, RunningAgent};
use gpufleet_controller::{ControllerConfig, RunningController};
use gpufleet_proto::v1::{JobSpec, JobState, NodeState, WorkloadSpec};
use tokio::net::TcpListener;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Controller listen address; 127.0.0.1:0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Keep state here (survives restarts); default: a temporary directory
    /// removed on exit.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Do not run the demo job at start.
    #[arg(long)]
    no_demo: bool,
    /// Start, run the demo job, print the results and exit (for CI and scripts).
    #[arg(long)]
    exit_after_demo: bool,
    /// Prices that move every minute (a local price file), steady demand
    /// for Hopper, and the spot node reclaimed two minutes in (a mock AWS
    /// metadata service): `gpufleet market …` then has data to answer.
    #[arg(long)]
    market_demo: bool,
}

/// One simulated node of the default fleet.
struct DevNode {
    id: &'static str,
    provider: &'static str,
    region: &'static str,
    zone: &'static str,
    instance_type: &'static str,
    gpus: &'static str,
    /// On-demand list price per GPU-hour, USD (late-2025 public prices).
    price: f64,
    spot: bool,
}

/// Four providers, five regions, three generations (Hopper, Ampere, Ada).
const FLEET: &[DevNode] = &[
    DevNode {
        id: "aws-use1-p5-0",
        provider: "aws",
        region: "us-east-1",
        zone: "us-east-1a",
        instance_type: "p5.48xlarge",
        gpus: "8xH100-SXM-80GB",
        price: 3.93,
        spot: false,
    },
    DevNode {
        id: "aws-usw2-g6-0",
        provider: "aws",
        region: "us-west-2",
        zone: "us-west-2b",
        instance_type: "g6.12xlarge",
        gpus: "4xL4",
        price: 1.15,
        spot: false,
    },
    DevNode {
        id: "azure-weu-nd96-0",
        provider: "azure",
        region: "westeurope",
        zone: "westeurope-1",
        instance_type: "Standard_ND96amsr_A100_v4",
        gpus: "8xA100-SXM-80GB",
        price: 4.10,
        spot: false,
    },
    DevNode {
        id: "lambda-usw1-a100-0",
        provider: "lambda",
        region: "us-west-1",
        zone: "",
        instance_type: "gpu_8x_a100_80gb_sxm4",
        gpus: "8xA100-SXM-80GB",
        price: 1.79,
        spot: false,
    },
    DevNode {
        id: "lambda-usw1-h100-0",
        provider: "lambda",
        region: "us-west-1",
        zone: "",
        instance_type: "gpu_8x_h100_sxm5",
        gpus: "8xH100-SXM-80GB",
        price: 2.99,
        spot: false,
    },
    DevNode {
        id: "nebius-eun1-h200-0",
        provider: "nebius",
        region: "eu-north1",
        zone: "eu-north1-a",
        instance_type: "gpu-h200-sxm",
        gpus: "8xH200-SXM-141GB",
        price: 3.50,
        spot: false,
    },
    DevNode {
        id: "nebius-eun1-l40s-0",
        provider: "nebius",
        region: "eu-north1",
        zone: "eu-north1-a",
        instance_type: "gpu-l40s-a",
        gpus: "2xL40S",
        price: 1.55,
        spot: true,
    },
];

/// The fleet's list prices, for the market demo's price file.
fn listed() -> Vec<super::dev_market::Listed> {
    FLEET
        .iter()
        .map(|n| super::dev_market::Listed {
            provider: n.provider,
            region: n.region,
            gpus: n.gpus,
            price: n.price,
            spot: n.spot,
        })
        .collect()
}

pub async fn run(args: DevArgs) -> anyhow::Result<ExitCode> {
    init_tracing();
    let (data_dir, _temp) = match &args.data_dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("gpufleet-dev-")
                .tempdir()
                .context("cannot create a temporary data dir")?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    let listener = TcpListener::bind(args.listen).await.with_context(|| {
        format!(
            "cannot listen on {}; another gpufleet dev or controller may be running: stop it or pass --listen 127.0.0.1:0",
            args.listen
        )
    })?;
    let mut config = ControllerConfig::for_data_dir(data_dir.join("controller"));
    config.listen = listener.local_addr()?;
    let prices_file = data_dir.join("prices.csv");
    let metadata = if args.market_demo {
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        super::dev_market::write_prices(&prices_file, &listed(), 0)?;
        config.price_sources = vec![
            gpufleet_controller::pricing::source::PriceSource::parse(&format!(
                "file:{}",
                prices_file.display()
            ))
            .map_err(anyhow::Error::msg)?,
        ];
        config.price_refresh_interval = Duration::from_secs(10);
        Some(gpufleet_agent::interruption::mock::MockMetadata::start().await?)
    } else {
        None
    };
    let admin_token_file = config.admin_token_file.clone();
    let join_token_file = config.data_dir.join("join.token");
    let controller = gpufleet_controller::start(config, Some(listener)).await?;
    let endpoint = controller.endpoint();
    let read_secret = |path: &std::path::Path, what: &str| {
        std::fs::read_to_string(path)
            .map(|t| t.trim().to_string())
            .with_context(|| format!("cannot read the {what} at {}", path.display()))
    };
    let (join_token, admin_token) = match (
        read_secret(&join_token_file, "join token"),
        read_secret(&admin_token_file, "admin token"),
    ) {
        (Ok(join), Ok(admin)) => (join, admin),
        (Err(e), _) | (_, Err(e)) => {
            shutdown(Vec::new(), controller).await;
            return Err(e);
        }
    };

    let mut agents = Vec::new();
    let watch = match (&metadata, FLEET.iter().any(|n| n.spot)) {
        (Some(m), true) => Some(super::dev_market::watch(m)?),
        _ => None,
    };
    for node in FLEET {
        let watch = if node.spot { watch.clone() } else { None };
        match start_agent(node, &endpoint, &join_token, &data_dir, watch).await {
            Ok(agent) => agents.push(agent),
            Err(e) => {
                shutdown(agents, controller).await;
                return Err(e.context(format!("cannot start simulated node {}", node.id)));
            }
        }
    }
    if let Err(e) = wait_until_ready(&controller, FLEET.len()).await {
        shutdown(agents, controller).await;
        return Err(e);
    }

    let total_gpus: usize = agents.iter().map(|a| a.gpu_uuids().len()).sum();
    say!("gpufleet dev: controller at {endpoint}");
    say!(
        "fleet: {} nodes, {total_gpus} simulated GPUs across aws, azure, lambda and nebius (5 regions; Hopper, Ampere, Ada)",
        agents.len()
    );
    say!("data dir: {}", data_dir.display());
    say!("metrics: http://{}/metrics", controller.metrics_addr());
    say!(
        "admin token: {} (also in {})",
        admin_token,
        admin_token_file.display()
    );
    say!();

    let market = metadata.map(|metadata| {
        say!(
            "market demo: prices in {} move every minute; the spot node {} is reclaimed in 2 minutes",
            prices_file.display(),
            FLEET.iter().find(|n| n.spot).map_or("-", |n| n.id)
        );
        say!();
        tokio::spawn(super::dev_market::run(
            endpoint.clone(),
            admin_token.clone(),
            prices_file.clone(),
            listed(),
            metadata,
        ))
    });
    let mut outcome = ExitCode::SUCCESS;
    if !args.no_demo {
        match demo_job(&endpoint, &admin_token).await {
            Ok(true) => {}
            Ok(false) => outcome = ExitCode::FAILURE,
            Err(e) => {
                eprintln!("demo job failed: {e:#}");
                outcome = ExitCode::FAILURE;
            }
        }
        say!();
    }

    if !args.exit_after_demo {
        say!("Try, in another terminal:");
        say!("  export GPUFLEET_CONTROLLER={endpoint}");
        say!("  export GPUFLEET_TOKEN={admin_token}");
        say!("  gpufleet capacity --by provider,region,generation");
        say!(
            "  gpufleet jobs submit --gpus 2 --generation hopper --max-price 3.50 -- sh -c 'echo $CUDA_VISIBLE_DEVICES'"
        );
        say!("  gpufleet jobs logs <JOB_ID>        (and: gpufleet nodes, gpufleet jobs list)");
        if market.is_some() {
            say!("  gpufleet market prices --since 1h");
            say!("  gpufleet market interruptions");
            say!(
                "  gpufleet market elasticity --region us-west-1 --generation hopper --bucket 1m   (a number after a few minutes)"
            );
        }
        say!();
        say!("Ctrl-C stops everything.");
        wait_for_signal().await;
        say!("stopping…");
    }
    if let Some(market) = market {
        market.abort();
    }
    shutdown(agents, controller).await;
    Ok(outcome)
}

async fn start_agent(
    node: &DevNode,
    endpoint: &str,
    join_token: &str,
    data_dir: &std::path::Path,
    interruptions: Option<gpufleet_agent::config::InterruptionConfig>,
) -> anyhow::Result<RunningAgent> {
    let node_config = NodeConfig {
        // Every agent of this fleet runs on this host.
        address: Some("127.0.0.1".into()),
        id: Some(node.id.to_string()),
        provider: node.provider.to_string(),
        region: node.region.to_string(),
        zone: node.zone.to_string(),
        instance_type: node.instance_type.to_string(),
        price_per_gpu_hour_usd: node.price,
        spot: node.spot,
        labels: BTreeMap::from([("gpufleet.dev/simulated".to_string(), "true".to_string())]),
    };
    let config = AgentConfig {
        sample_interval: Duration::from_secs(2),
        stop_grace_period: Duration::from_secs(5),
        interruptions,
        ..AgentConfig::simulated(
            endpoint,
            join_token,
            node_config,
            vec![node.gpus.to_string()],
            data_dir.join("agents").join(node.id),
        )
    };
    let listener = TcpListener::bind(config.listen).await?;
    gpufleet_agent::start(config, Some(listener)).await
}

async fn wait_until_ready(controller: &RunningController, nodes: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = controller
            .controller()
            .list_nodes("", "", &[NodeState::Ready])
            .len();
        if ready >= nodes {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {ready} of {nodes} simulated nodes registered within 30s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs one 2-GPU job through the real path — the gRPC API with the admin
/// token, the scheduler, an agent — and prints where it ran and what it
/// printed. Returns whether it succeeded.
async fn demo_job(endpoint: &str, token: &str) -> anyhow::Result<bool> {
    use gpufleet_proto::v1::jobs_client::JobsClient;
    use gpufleet_proto::v1::{GetJobRequest, StreamJobLogsRequest, SubmitJobRequest};
    let channel = tonic::transport::Channel::from_shared(endpoint.to_string())?
        .connect()
        .await
        .with_context(|| format!("cannot reach the embedded controller at {endpoint}"))?;
    let authed = tonic::service::interceptor::InterceptedService::new(
        channel,
        crate::client::BearerToken::with(token)?,
    );
    let mut jobs = JobsClient::new(authed);
    let job = jobs
        .submit_job(SubmitJobRequest {
            spec: Some(JobSpec {
                name: "hello-gpus".to_string(),
                gpus_per_task: 2,
                workload: Some(WorkloadSpec {
                    argv: vec![
                        "sh".into(),
                        "-c".into(),
                        "echo \"hello from $GPUFLEET_JOB_ID on $CUDA_VISIBLE_DEVICES\"".into(),
                    ],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .job
        .context("the controller answered without a job")?;
    say!(
        "demo: submitted {} (2 GPUs, cheapest that fit): gpufleet jobs submit --name hello-gpus --gpus 2 -- sh -c 'echo …'",
        job.id
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let job = loop {
        let job = jobs
            .get_job(GetJobRequest {
                job_id: job.id.clone(),
            })
            .await?
            .into_inner();
        if gpufleet_core::is_terminal_job(job.state()) {
            break job;
        }
        if Instant::now() > deadline {
            bail!(
                "job {} did not finish within 30s (state {:?})",
                job.id,
                job.state()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let task = job.tasks.first().cloned().unwrap_or_default();
    say!(
        "demo: {} {:?} on {} ({}/{}, {}/GPU-hour)",
        job.id,
        job.state(),
        task.node_id,
        task.provider,
        task.region,
        gpufleet_scheduler::format_usd(task.price_per_gpu_hour_micro_usd)
    );
    let mut logs = jobs
        .stream_job_logs(StreamJobLogsRequest {
            job_id: job.id.clone(),
            task_index: 0,
            offset: 0,
            follow: false,
        })
        .await?
        .into_inner();
    let mut text = Vec::new();
    while let Some(chunk) = logs.message().await? {
        text.extend(chunk.data);
    }
    say!("demo: log: {}", String::from_utf8_lossy(&text).trim_end());
    Ok(job.state() == JobState::Succeeded)
}

async fn shutdown(agents: Vec<RunningAgent>, controller: RunningController) {
    for agent in agents {
        let id = agent.node_id().to_string();
        if let Err(e) = agent.shutdown().await {
            eprintln!("agent {id}: {e:#}");
        }
    }
    if let Err(e) = controller.shutdown().await {
        eprintln!("controller: {e:#}");
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

fn init_tracing() {
    // Quiet by default so the printed guide stays readable; GPUFLEET_LOG=info shows more.
    let filter = tracing_subscriber::EnvFilter::try_from_env("GPUFLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
