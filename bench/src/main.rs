//! `gpufleet-bench`: every gpufleet benchmark, one subcommand each. Each
//! prints a readable table and, as its last line, a one-line JSON summary.

mod agent_overhead;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// CPU and memory of a real gpufleet-agent sampling 8 GPUs through the
    /// fake NVML library every second.
    AgentOverhead(agent_overhead::Options),
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::AgentOverhead(o) => agent_overhead::run(o),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpufleet-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
