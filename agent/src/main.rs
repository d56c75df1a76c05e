//! `gpufleet-agent`: parse config → init tracing → start → wait for
//! SIGINT/SIGTERM → shut down with a deadline.
//!
//! Exit codes: 0 clean stop, 1 runtime failure, 2 bad configuration.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use gpufleet_agent::AgentConfig;
use gpufleet_agent::config::{self, ConfigError, LogFormat};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

/// The controller's allocator: less CPU per workload start and status
/// than glibc's malloc (`gpufleet-bench dispatch`). The shim host, this
/// executable too, uses it as well.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

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
    // The environment is read here, once; the loader takes it as a map.
    let env: HashMap<String, String> = std::env::vars().collect();
    let config::Loaded { config, log_format } = match config::load(std::env::args_os(), &env) {
        Ok(loaded) => loaded,
        // Help and version exit 0; a flag clap refuses exits 2 with usage.
        Err(ConfigError::Usage(e)) => e.exit(),
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
