//! `gpufleet-bench`: every gpufleet benchmark, a subcommand each. Each
//! prints a readable table and, as its last line, a one-line JSON summary.

// A binary crate: `pub` only marks what modules share.
#![allow(unreachable_pub)]

mod ingest;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "gpufleet-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Controller telemetry ingest from many agents, against a bare tonic
    /// stream server in the same run; controller memory per GPU.
    Ingest(ingest::IngestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ingest(args) => ingest::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpufleet-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
