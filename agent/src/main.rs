//! `gpufleet-agent`: parse config → init tracing → start → wait for
//! SIGINT/SIGTERM → shut down with a deadline.
//!
//! Exit codes: 0 clean stop, 1 runtime failure, 2 bad configuration.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use gpufleet_agent::{AgentConfig, ConfigOverrides};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// The controller's allocator: less CPU per workload start and status
/// than glibc's malloc (`gpufleet-bench dispatch`). The shim host, this
/// executable too, uses it as well.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

/// GPU host agent of gpufleet: reports GPU telemetry to the controller and
/// runs the workloads it is given.
///
/// Every option is also an environment variable and a key of the TOML file
/// given with --config. Precedence: flag > environment > file > default.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML config file.
    #[arg(long, env = "GPUFLEET_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Controller URL [default: http://127.0.0.1:7070].
    #[arg(long, env = "GPUFLEET_CONTROLLER", value_name = "URL")]
    controller: Option<String>,
    /// Token proving this agent may join the controller [default: none].
    #[arg(
        long,
        env = "GPUFLEET_JOIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    join_token: Option<String>,
    /// Node id [default: /etc/machine-id, else the hostname].
    #[arg(long, env = "GPUFLEET_NODE_ID", value_name = "ID")]
    node_id: Option<String>,
    /// Cloud or owner, e.g. aws, azure, lambda [default: onprem].
    #[arg(long, env = "GPUFLEET_PROVIDER")]
    provider: Option<String>,
    /// Provider region, e.g. us-east-1 [default: local].
    #[arg(long, env = "GPUFLEET_REGION")]
    region: Option<String>,
    /// Availability zone [default: none].
    #[arg(long, env = "GPUFLEET_ZONE")]
    zone: Option<String>,
    /// Instance type, e.g. p5.48xlarge [default: none].
    #[arg(long, env = "GPUFLEET_INSTANCE_TYPE")]
    instance_type: Option<String>,
    /// Price of one GPU for one hour, in USD [default: 0].
    #[arg(long, env = "GPUFLEET_PRICE_PER_GPU_HOUR", value_name = "USD")]
    price_per_gpu_hour: Option<String>,
    /// Spot / preemptible capacity [default: false].
    #[arg(long, env = "GPUFLEET_SPOT", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    spot: Option<String>,
    /// Node labels, k=v,k=v [default: none].
    #[arg(long, env = "GPUFLEET_LABELS", value_name = "K=V,...")]
    labels: Option<String>,
    /// GPU backend: nvml or simulated [default: nvml].
    #[arg(long, env = "GPUFLEET_GPU_BACKEND", value_name = "nvml|simulated")]
    gpu_backend: Option<String>,
    /// Simulated GPUs, e.g. 8xH100-SXM-80GB or 2xL4,1xT4.
    #[arg(long, env = "GPUFLEET_SIMULATED_GPUS", value_name = "LIST")]
    simulated_gpus: Option<String>,
    /// Directory for allocation files and logs [default: /var/lib/gpufleet-agent].
    #[arg(long, env = "GPUFLEET_DATA_DIR", value_name = "DIR")]
    data_dir: Option<String>,
    /// GPU sampling and telemetry interval [default: 5s].
    #[arg(long, env = "GPUFLEET_SAMPLE_INTERVAL", value_name = "DURATION")]
    sample_interval: Option<String>,
    /// Address of the local Agent API [default: 127.0.0.1:7071].
    #[arg(long, env = "GPUFLEET_LISTEN", value_name = "ADDR")]
    listen: Option<String>,
    /// Time between SIGTERM and SIGKILL when stopping a workload [default: 10s].
    #[arg(long, env = "GPUFLEET_STOP_GRACE_PERIOD", value_name = "DURATION")]
    stop_grace_period: Option<String>,
    /// Bound of the outbox of events not yet acknowledged by the controller,
    /// e.g. 64MiB; over it the oldest telemetry is dropped [default: 64MiB].
    #[arg(long, env = "GPUFLEET_OUTBOX_MAX_BYTES", value_name = "SIZE")]
    outbox_max_bytes: Option<String>,
    /// Prometheus /metrics address, or "off" [default: 127.0.0.1:9400].
    #[arg(long, env = "GPUFLEET_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// NVML library to load [default: libnvidia-ml.so.1 from the loader path].
    #[arg(long, env = "GPUFLEET_NVML_LIBRARY_PATH", value_name = "PATH")]
    nvml_library_path: Option<String>,
    /// Also read XIDs from /dev/kmsg where readable [default: true].
    #[arg(long, env = "GPUFLEET_READ_KMSG", value_name = "BOOL")]
    read_kmsg: Option<String>,
    /// Fault-free time before an unhealthy GPU returns to service [default: 10m].
    #[arg(long, env = "GPUFLEET_HEALTH_CLEAN_PERIOD", value_name = "DURATION")]
    health_clean_period: Option<String>,
    /// GPUs this host must have; fewer marks its GPUs unhealthy [default: not checked].
    #[arg(long, env = "GPUFLEET_EXPECTED_GPU_COUNT", value_name = "N")]
    expected_gpu_count: Option<String>,
    /// XIDs that mark a GPU unhealthy [default: 48,63,64,74,79,92,94,95,119,120].
    #[arg(long, env = "GPUFLEET_CRITICAL_XIDS", value_name = "LIST")]
    critical_xids: Option<String>,
    /// XIDs blamed on the job, not the GPU [default: 13,31,43,45,68].
    #[arg(long, env = "GPUFLEET_APPLICATION_XIDS", value_name = "LIST")]
    application_xids: Option<String>,
    /// HW/thermal slowdown lasting this long marks a GPU degraded [default: 60s].
    #[arg(
        long,
        env = "GPUFLEET_SLOWDOWN_DEGRADED_AFTER",
        value_name = "DURATION"
    )]
    slowdown_degraded_after: Option<String>,
    /// Correctable ECC errors per minute that mark a GPU degraded [default: 100].
    #[arg(long, env = "GPUFLEET_SBE_STORM_PER_MINUTE", value_name = "N")]
    sbe_storm_per_minute: Option<String>,
    /// CA (PEM) that signed the controller's certificate; use with an https:// controller.
    #[arg(long, env = "GPUFLEET_TLS_CA", value_name = "PEM")]
    tls_ca: Option<String>,
    /// This agent's client certificate (PEM), for mutual TLS.
    #[arg(long, env = "GPUFLEET_TLS_CERT", value_name = "PEM")]
    tls_cert: Option<String>,
    /// This agent's client key (PEM), for mutual TLS.
    #[arg(long, env = "GPUFLEET_TLS_KEY", value_name = "PEM")]
    tls_key: Option<String>,
    /// Run workloads as this unprivileged user (and its primary group); needs the agent to run as root.
    #[arg(long, env = "GPUFLEET_WORKLOAD_USER", value_name = "USER")]
    workload_user: Option<String>,
    /// Bearer token the local Agent API requires; mandatory when --listen is not loopback.
    #[arg(
        long,
        env = "GPUFLEET_API_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    api_token: Option<String>,
    /// Cap on each allocation's output log, e.g. 64MiB; output beyond it is dropped [default: 64MiB].
    #[arg(long, env = "GPUFLEET_LOG_MAX_BYTES", value_name = "SIZE")]
    log_max_bytes: Option<String>,
    /// How long a finished allocation's directory and log are kept after their last write, e.g. 7d or 12h; "off" keeps them [default: 7d].
    #[arg(long, env = "GPUFLEET_LOG_RETENTION", value_name = "DURATION")]
    log_retention: Option<String>,
    /// Most workload starts in progress at once (1-1024); more wait their turn [default: 16].
    #[arg(long, env = "GPUFLEET_MAX_CONCURRENT_STARTS", value_name = "N")]
    max_concurrent_starts: Option<String>,
    /// On SIGTERM, leave running workloads running for the next start to
    /// re-adopt (true), or stop them with their grace period (false) [default: true].
    #[arg(long, env = "GPUFLEET_KEEP_WORKLOADS_ON_EXIT", value_name = "BOOL")]
    keep_workloads_on_exit: Option<String>,
    /// Log format.
    #[arg(long, env = "GPUFLEET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

impl Args {
    fn overrides(self) -> ConfigOverrides {
        ConfigOverrides {
            config: self.config,
            controller: self.controller,
            join_token: self.join_token,
            node_id: self.node_id,
            provider: self.provider,
            region: self.region,
            zone: self.zone,
            instance_type: self.instance_type,
            price_per_gpu_hour: self.price_per_gpu_hour,
            spot: self.spot,
            labels: self.labels,
            gpu_backend: self.gpu_backend,
            simulated_gpus: self.simulated_gpus,
            data_dir: self.data_dir,
            sample_interval: self.sample_interval,
            listen: self.listen,
            stop_grace_period: self.stop_grace_period,
            metrics_listen: self.metrics_listen,
            nvml_library_path: self.nvml_library_path,
            read_kmsg: self.read_kmsg,
            health_clean_period: self.health_clean_period,
            expected_gpu_count: self.expected_gpu_count,
            critical_xids: self.critical_xids,
            tls_ca: self.tls_ca,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            workload_user: self.workload_user,
            api_token: self.api_token,
            outbox_max_bytes: self.outbox_max_bytes,
            log_max_bytes: self.log_max_bytes,
            log_retention: self.log_retention,
            max_concurrent_starts: self.max_concurrent_starts,
            keep_workloads_on_exit: self.keep_workloads_on_exit,
            application_xids: self.application_xids,
            slowdown_degraded_after: self.slowdown_degraded_after,
            sbe_storm_per_minute: self.sbe_storm_per_minute,
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("GPUFLEET_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    // Each workload's shim is this executable started with a hidden argument.
    if let Some(code) = gpufleet_agent::shim::dispatch() {
        return code;
    }
    let args = Args::parse();
    let log_format = args.log_format;
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match AgentConfig::load(&env, args.overrides()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gpufleet-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing(log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gpufleet-agent: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            eprintln!("gpufleet-agent: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn run(config: AgentConfig) -> anyhow::Result<()> {
    // Workloads get their grace period, plus time for the rest.
    let deadline = config.stop_grace_period + Duration::from_secs(5);
    let agent = gpufleet_agent::start(config, None).await?;
    wait_for_signal().await?;
    info!("shutting down");
    match tokio::time::timeout(deadline, agent.shutdown()).await {
        Ok(result) => result,
        Err(_) => {
            warn!(?deadline, "shutdown did not finish in time; exiting anyway");
            Ok(())
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
