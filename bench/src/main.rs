//! `gpufleet-bench`: every benchmark of the project, one subcommand each.
//! Each prints a readable table and, as its last line, a one-line JSON
//! summary of its figures. Results are recorded in BENCHMARKS.md.

// A binary crate: `pub` only marks what modules share.
#![allow(unreachable_pub)]

mod abuse;
mod agent_overhead;
mod clients;
mod dispatch;
mod failover;
mod ingest;
mod load;
mod report;
mod scheduler;
mod scheduler_mixed;
mod sim_agent;
mod simulate;
mod store_growth;
mod telemetry_history;
mod usage_query;
mod workload_spawn;

use std::process::ExitCode;

/// The controller's and the agent's allocator (mimalloc), counting live
/// bytes: `ingest` reports the heap next to RSS, so that what the
/// controller holds is told apart from what the allocator keeps. One
/// relaxed atomic add per allocation, the same for every server a
/// benchmark compares.
#[global_allocator]
static ALLOCATOR: cap::Cap<mimalloc::MiMalloc> = cap::Cap::new(mimalloc::MiMalloc, usize::MAX);

/// Bytes allocated and not yet freed, process-wide.
pub fn heap_bytes() -> usize {
    ALLOCATOR.allocated()
}

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "gpufleet-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Scheduler: 10,000 nodes × 8 GPUs, 100,000 pending jobs; against a
    /// first-fit baseline on the same inputs; fragmentation after churn.
    Scheduler(scheduler::Args),
    /// Controller telemetry ingest from many agents, against a bare tonic
    /// stream server in the same run; controller memory per GPU.
    Ingest(ingest::IngestArgs),
    /// CPU and memory of a real gpufleet-agent sampling 8 GPUs through the
    /// fake NVML library every second.
    AgentOverhead(agent_overhead::Options),
    /// Usage reports over one year of hourly rollups; cost of recording market signals.
    UsageQuery(usage_query::Args),
    /// Extra cost of starting workloads under their shim, against spawning
    /// them directly in the same run; memory of one shim.
    WorkloadSpawn(workload_spawn::Args),
    /// Trivial jobs end to end through a real controller and agent: jobs/s
    /// and submit → running latency, against bare process spawning.
    Dispatch(dispatch::DispatchArgs),
    /// Many simulated agents streaming telemetry plus a steady job
    /// submission rate against one controller: errors, submit latency and
    /// the controller's memory over time.
    Load(load::LoadArgs),
    /// Leader SIGKILL → a job submitted at that instant running, with three
    /// controllers on a local 3-member etcd and 100 agents.
    Failover(failover::FailoverArgs),
    /// Memory the controller's store keeps per retained finished job once
    /// its page cache is full (sled's per-page bookkeeping).
    StoreGrowth(store_growth::Args),
    /// One GPU's telemetry history read from the store: rollups keyed
    /// minute first against node first, in the same run.
    TelemetryHistory(telemetry_history::Args),
    /// A well-behaved client's latency alone and under abuse (streams never
    /// read, oversized requests with and without a token); the
    /// controller's peak RSS.
    Abuse(abuse::AbuseArgs),
    /// The trace-driven simulator: the openb trace and a synthetic month
    /// replayed per policy (wall time, simulated s per wall s) against
    /// baseline-first-fit in the same run; the inflation experiment.
    Simulate(simulate::Args),
}

fn main() -> ExitCode {
    // `workload-spawn` runs the agent's supervisor in this process, whose
    // workload shims are this executable started with a hidden argument.
    if let Some(code) = gpufleet_agent::shim::dispatch() {
        return code;
    }
    let result = match Cli::parse().command {
        Command::Scheduler(args) => scheduler::run(args),
        Command::Ingest(args) => ingest::run(args),
        Command::AgentOverhead(args) => agent_overhead::run(args),
        Command::UsageQuery(args) => usage_query::run(args),
        Command::WorkloadSpawn(args) => workload_spawn::run(args),
        Command::Dispatch(args) => dispatch::run(args),
        Command::Load(args) => load::run(args),
        Command::Failover(args) => failover::run(args),
        Command::StoreGrowth(args) => store_growth::run(args),
        Command::TelemetryHistory(args) => telemetry_history::run(args),
        Command::Abuse(args) => abuse::run(args),
        Command::Simulate(args) => simulate::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpufleet-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
