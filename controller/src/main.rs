//! `gpufleet-controller`: config → tracing → serve → wait for a signal → drain.

use std::collections::HashMap;
use std::process::ExitCode;

use gpufleet_controller::config::{self, ConfigError, ControllerConfig};

/// mimalloc, counting live bytes for `gpufleet_controller_heap_bytes`:
/// next to RSS it tells memory the controller holds from memory the
/// allocator keeps. One relaxed atomic add per allocation. mimalloc over
/// glibc's malloc: 5-10 % less CPU per job through the whole dispatch path
/// (`gpufleet-bench dispatch`, BENCHMARKS.md), and it returns freed pages
/// to the system by itself.
#[global_allocator]
static ALLOCATOR: cap::Cap<mimalloc::MiMalloc> = cap::Cap::new(mimalloc::MiMalloc, usize::MAX);

/// Exit code for configuration errors, distinct from runtime failures (1).
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    gpufleet_controller::memory::set_heap_probe(|| ALLOCATOR.allocated());
    // The environment is read here, once; the loader takes it as a map.
    let env: HashMap<String, String> = std::env::vars().collect();
    let loaded = match config::load(std::env::args_os(), &env) {
        Ok(loaded) => loaded,
        // Help and version exit 0; a flag clap refuses exits 2 with usage.
        Err(ConfigError::Usage(e)) => e.exit(),
        Err(e) => {
            eprintln!("gpufleet-controller: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let config = loaded.config;
    if loaded.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    init_tracing(&loaded.log_format);
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
    let work = async {
        match loaded.migrate_from_sled {
            Some(dir) => migrate(config, dir).await,
            None => run(config).await,
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpufleet-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(config: ControllerConfig, dir: std::path::PathBuf) -> anyhow::Result<()> {
    let config::StoreConfig::Etcd(etcd) = &config.store else {
        anyhow::bail!(
            "--migrate-from-sled copies into etcd: also set store = \"etcd\" and etcd_endpoints"
        );
    };
    let copied = gpufleet_controller::ha::migrate_from_sled(etcd, dir.clone()).await?;
    for (space, count) in copied {
        println!("{space:?}: {count} records");
    }
    println!(
        "copied {} into etcd; start the controllers with store = \"etcd\"",
        dir.display()
    );
    Ok(())
}

async fn run(config: ControllerConfig) -> anyhow::Result<()> {
    if let config::StoreConfig::Etcd(etcd) = config.store.clone() {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let ended =
            gpufleet_controller::ha::run(config, *etcd, listener, shutdown_signal()).await?;
        if ended == gpufleet_controller::ha::Ended::LostLeadership {
            // At once, without unwinding: nothing this process holds may
            // act after this instant (see ha.rs).
            tracing::error!(
                "lost the leadership; exiting so the supervisor restarts this controller as a standby"
            );
            std::process::exit(gpufleet_controller::ha::EXIT_LOST_LEADERSHIP);
        }
        return Ok(());
    }
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
