//! `gpufleet`: the command line for operators and scripts.

// A binary crate: nothing is reachable from outside, so `pub` only marks
// what modules share.
#![allow(unreachable_pub)]

#[macro_use]
mod output;
mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gpufleet_cli::client;

use crate::output::Format;

/// gpufleet: one GPU fleet across clouds and regions.
#[derive(Debug, Parser)]
#[command(name = "gpufleet", version, propagate_version = true)]
pub struct Cli {
    /// Controller address.
    #[arg(
        long,
        global = true,
        env = "GPUFLEET_CONTROLLER",
        default_value = "http://127.0.0.1:7070"
    )]
    pub controller: String,
    /// Output format: human-readable table, or JSON (protobuf JSON mapping;
    /// one object per line for streams).
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    pub output: Format,
    /// CA (PEM) that signed the controller's certificate; for an https:// controller.
    #[arg(long, global = true, env = "GPUFLEET_CA_FILE", value_name = "PEM")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Bearer token for the controller (`gpufleet dev` prints one; a new
    /// controller writes an admin token to admin.token in its data dir).
    #[arg(long, global = true, env = "GPUFLEET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the token (used when --token is not given).
    #[arg(long, global = true, env = "GPUFLEET_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a local fleet: an embedded controller plus simulated GPU agents
    /// across several providers and regions, talking real gRPC on loopback.
    Dev(commands::dev::DevArgs),
    /// List the fleet's nodes, or show one.
    Nodes(commands::nodes::NodesArgs),
    /// GPU capacity: total, healthy, allocated and free, grouped.
    Capacity(commands::nodes::CapacityArgs),
    /// Submit, inspect, cancel and follow jobs.
    Jobs(commands::jobs::JobsArgs),
    /// The usage ledger: who used which GPUs, for how long, at what cost.
    Usage(commands::usage::UsageArgs),
    /// Market signals: tight regions, demand curves, price elasticity.
    Market(commands::market::MarketArgs),
    /// Live fleet table: every GPU's utilisation, memory, temperature,
    /// power and job, refreshing (`--once` for one frame).
    Top(commands::top::TopArgs),
    /// GPU telemetry history (terminal chart) and fleet aggregates.
    Telemetry(commands::telemetry::TelemetryArgs),
    /// Client tokens: create, list, revoke (admin), and whoami.
    Tokens(commands::tokens::TokensArgs),
    /// Registry credentials of a tenant's image jobs: put (password on stdin), list, delete.
    Secrets(commands::secrets::SecretsArgs),
    /// Print a shell completion script: bash, zsh or fish.
    Completions(commands::completions::CompletionsArgs),
    /// Replay a workload (openb trace or synthetic) through the scheduler in
    /// virtual time, every policy side by side. Local; no controller.
    Simulate(Box<commands::simulate::SimulateArgs>),
}

fn main() -> ExitCode {
    // `gpufleet dev` runs agents in this process: their workload shims are
    // this executable started with a hidden argument.
    if let Some(code) = gpufleet_agent::shim::dispatch() {
        return code;
    }
    let cli = Cli::parse();
    let address = cli.controller.clone();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<output::StdoutClosed>().is_some() => {
            eprintln!("gpufleet: {e}");
            ExitCode::from(141)
        }
        Err(e) => {
            // Server messages may echo what a client sent: escaped too.
            eprintln!(
                "error: {}",
                output::safe(&client::describe_for(&e, &address))
            );
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    client::set_ca_file(cli.ca_file.clone());
    client::set_token(cli.token.clone(), cli.token_file.as_deref())?;
    if cli.output == output::Format::Csv
        && !matches!(cli.command, Command::Usage(_) | Command::Market(_))
    {
        anyhow::bail!(
            "-o csv is available for `usage` and `market` reports; use -o table or -o json here"
        );
    }
    match cli.command {
        Command::Dev(args) => commands::dev::run(args).await,
        Command::Nodes(args) => commands::nodes::nodes(&cli.controller, cli.output, args).await,
        Command::Capacity(args) => {
            commands::nodes::capacity(&cli.controller, cli.output, args).await
        }
        Command::Jobs(args) => commands::jobs::run(&cli.controller, cli.output, args).await,
        Command::Usage(args) => commands::usage::usage(&cli.controller, cli.output, args).await,
        Command::Market(args) => commands::market::market(&cli.controller, cli.output, args).await,
        Command::Top(args) => commands::top::run(&cli.controller, cli.output, args).await,
        Command::Telemetry(args) => {
            commands::telemetry::run(&cli.controller, cli.output, args).await
        }
        Command::Tokens(args) => commands::tokens::run(&cli.controller, cli.output, args).await,
        Command::Secrets(args) => commands::secrets::run(&cli.controller, cli.output, args).await,
        Command::Completions(args) => commands::completions::run(&args),
        Command::Simulate(args) => commands::simulate::run(cli.output, &args),
    }
}

pub(crate) fn now() -> prost_types::Timestamp {
    prost_types::Timestamp::from(std::time::SystemTime::now())
}
