//! Helpers shared by the agent's integration tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use gpufleet_agent::backend::simulated::SimulatedBackend;
use gpufleet_agent::supervisor::{Supervisor, SupervisorSettings};
use gpufleet_proto::v1::{Allocation, WorkloadSpec};

pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `f` until it returns `Some`, failing the test after [`DEADLINE`].
pub async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn backend(node: &str, gpus: &str) -> Arc<SimulatedBackend> {
    Arc::new(SimulatedBackend::new(node, &[gpus.to_string()]).unwrap())
}

/// The agent binary, which runs each workload's shim.
pub const SHIM: &str = env!("CARGO_BIN_EXE_gpufleet-agent");

pub fn settings(dir: &std::path::Path) -> SupervisorSettings {
    let mut settings = SupervisorSettings::new(dir.to_path_buf());
    settings.default_grace = Duration::from_secs(5);
    settings.shim_program = SHIM.into();
    settings
}

pub fn supervisor(dir: &std::path::Path, backend: Arc<SimulatedBackend>) -> Supervisor {
    Supervisor::new(backend, settings(dir))
}

pub fn allocation(id: &str, argv: &[&str], gpus: &[String]) -> Allocation {
    Allocation {
        gang: None,
        allocation_id: id.to_string(),
        job_id: "job-000000000001".to_string(),
        task_index: 0,
        gpu_uuids: gpus.to_vec(),
        workload: Some(WorkloadSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: HashMap::new(),
            working_dir: String::new(),
            stop_grace_period_seconds: 0,
            container: None,
        }),
        ..Default::default()
    }
}
