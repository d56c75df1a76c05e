//! `gpufleet-test-shim`: the workload shim for agents that tests start
//! in-process (a test executable cannot dispatch to the shim itself).

use std::process::ExitCode;

fn main() -> ExitCode {
    gpufleet_agent::shim::dispatch().unwrap_or_else(|| {
        eprintln!("gpufleet-test-shim: only runs as `gpufleet-test-shim __shim-host` or `gpufleet-test-shim __shim <records file>`");
        ExitCode::from(2)
    })
}
