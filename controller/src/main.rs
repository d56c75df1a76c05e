//! `gpufleet-controller`: config → tracing → serve → wait for a signal → drain.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use gpufleet_controller::config::{ConfigFile, ControllerConfig};

/// mimalloc, counting live bytes for `gpufleet_controller_heap_bytes`:
/// next to RSS it tells memory the controller holds from memory the
/// allocator keeps. One relaxed atomic add per allocation. mimalloc over
/// glibc's malloc: 5-10 % less CPU per job through the whole dispatch path
/// (`gpufleet-bench dispatch`, BENCHMARKS.md), and it returns freed pages
/// to the system by itself.
#[global_allocator]
static ALLOCATOR: cap::Cap<mimalloc::MiMalloc> = cap::Cap::new(mimalloc::MiMalloc, usize::MAX);

/// The gpufleet controller: aggregates GPU capacity across clouds and
/// regions, schedules jobs onto agents, and serves the gRPC API.
#[derive(Debug, Parser)]
#[command(name = "gpufleet-controller", version)]
struct Args {
    /// TOML config file; flags and GPUFLEET_* variables override its keys.
    #[arg(long, env = "GPUFLEET_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:7070].
    #[arg(long)]
    listen: Option<String>,
    /// Directory of the embedded store [default: /var/lib/gpufleet/controller].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// How long finished jobs are kept before they are deleted (their usage
    /// records stay) [default: 7d].
    #[arg(long)]
    finished_job_retention: Option<String>,
    /// The embedded store's page cache, e.g. 16MiB; the store's memory is a
    /// multiple of it [default: 4MiB].
    #[arg(long)]
    store_cache: Option<String>,
    /// Token agents must present to join [default: generated at the first
    /// start, written to join.token in the data dir].
    #[arg(long)]
    join_token: Option<String>,
    /// Where the first start writes the bootstrap admin token (mode 0600)
    /// [default: admin.token in the data dir].
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Requests per second each client token may make; 0 = no limit [default: 1000].
    #[arg(long)]
    rate_limit_per_token: Option<u32>,
    /// Requests a token may make at once above its rate [default: 2 × the rate].
    #[arg(long)]
    rate_limit_burst: Option<u32>,
    /// Silence after which a node is NotReady [default: 15s].
    #[arg(long)]
    node_not_ready_after: Option<String>,
    /// Silence after which a node is Lost and its jobs end [default: 60s].
    #[arg(long)]
    node_lost_after: Option<String>,
    /// Placement policy for jobs that name none: cost, pack or spread [default: cost].
    #[arg(long)]
    default_policy: Option<String>,
    /// Half-life of past usage in fair share [default: 24h].
    #[arg(long)]
    fair_share_half_life: Option<String>,
    /// How long usage records are kept [default: 400d].
    #[arg(long)]
    usage_retention: Option<String>,
    /// How long per-minute market signals are kept [default: 30d].
    #[arg(long)]
    market_retention: Option<String>,
    /// How long per-minute telemetry rollups are kept [default: 7d].
    #[arg(long)]
    telemetry_retention: Option<String>,
    /// HTTP address of the Prometheus /metrics endpoint [default: 127.0.0.1:9401].
    #[arg(long)]
    metrics_listen: Option<String>,
    /// PEM certificate chain for TLS on the gRPC listener.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the gRPC listener.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// PEM CA of agents' client certificates: agents must present one (mutual TLS).
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Log format.
    #[arg(long, env = "GPUFLEET_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// Exit code for configuration errors, distinct from runtime failures (1).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    gpufleet_controller::memory::set_heap_probe(|| ALLOCATOR.allocated());
    let args = Args::parse();
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let overrides = ConfigFile {
        listen: args.listen.clone(),
        data_dir: args.data_dir.clone(),
        join_token: args.join_token.clone(),
        admin_token_file: args.admin_token_file.clone(),
        finished_job_retention: args.finished_job_retention.clone(),
        store_cache: args.store_cache.clone(),
        rate_limit_per_token: args.rate_limit_per_token,
        rate_limit_burst: args.rate_limit_burst,
        node_not_ready_after: args.node_not_ready_after.clone(),
        node_lost_after: args.node_lost_after.clone(),
        telemetry_retention: args.telemetry_retention.clone(),
        metrics_listen: args.metrics_listen.clone(),
        tls_cert: args.tls_cert.clone(),
        tls_key: args.tls_key.clone(),
        tls_client_ca: args.tls_client_ca.clone(),
        default_policy: args.default_policy.clone(),
        fair_share_half_life: args.fair_share_half_life.clone(),
        usage_retention: args.usage_retention.clone(),
        market_retention: args.market_retention.clone(),
        ..Default::default()
    };
    let config = match ControllerConfig::load(args.config.as_deref(), &env, overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("gpufleet-controller: invalid configuration: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    init_tracing(&args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("gpufleet-controller: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpufleet-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: ControllerConfig) -> anyhow::Result<()> {
    let running = gpufleet_controller::start(config, None).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("GPUFLEET_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
