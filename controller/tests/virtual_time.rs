//! Leases, max runtimes and usage on virtual time: the controller reads
//! every time from its injected clock, so these run in milliseconds and
//! decide exactly at the configured boundaries. The store is the in-memory
//! one: nothing here is about durability.

mod common;

use std::sync::Arc;
use std::time::Duration;

use gpufleet_controller::store::MemoryStore;
use gpufleet_core::ManualClock;
use gpufleet_proto::v1::{
    JobSpec, JobState, NodeState, WorkloadSpec, WorkloadState, WorkloadStatus,
};
use prost_types::Timestamp;

const START_UNIX: u64 = 1_800_000_000;

fn controller(
    dir: &std::path::Path,
) -> anyhow::Result<(gpufleet_controller::Controller, Arc<ManualClock>)> {
    let clock = Arc::new(ManualClock::at_unix_secs(START_UNIX));
    let controller = common::open_on_clock(dir, Box::new(MemoryStore::new()), clock.clone())?;
    Ok((controller, clock))
}

fn one_gpu_job(max_runtime_seconds: u32) -> JobSpec {
    JobSpec {
        tasks: 1,
        gpus_per_task: 1,
        max_runtime_seconds,
        workload: Some(WorkloadSpec {
            argv: vec!["train".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn a_silent_node_turns_not_ready_then_lost_exactly_at_its_deadlines() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (controller, clock) = controller(dir.path())?;
    let not_ready_after = controller.config().node_not_ready_after;
    let lost_after = controller.config().node_lost_after;
    let gpus = common::gpus("n1", "H100-SXM-80GB", 2, 80 << 30);
    let _session = controller.connect_agent(common::hello("n1", gpus, Vec::new()))?;
    let job = controller.submit_job(one_gpu_job(0))?;
    controller.schedule_pass()?;
    let state = |c: &gpufleet_controller::Controller| c.get_node("n1").map(|n| n.state());

    clock.advance(not_ready_after - Duration::from_millis(1));
    controller.check_leases()?;
    assert_eq!(
        state(&controller)?,
        NodeState::Ready,
        "just inside its lease"
    );
    clock.advance(Duration::from_millis(1));
    controller.check_leases()?;
    assert_eq!(state(&controller)?, NodeState::NotReady);

    clock.advance(lost_after - not_ready_after - Duration::from_millis(1));
    controller.check_leases()?;
    assert_eq!(state(&controller)?, NodeState::NotReady);
    clock.advance(Duration::from_millis(1));
    controller.check_leases()?;
    assert_eq!(state(&controller)?, NodeState::Lost);

    controller.wait_settled()?;
    let job = controller.get_job(&job.id)?;
    assert_eq!(job.state(), JobState::Lost, "{}", job.message);
    let finished = job.finished_at.map(|t| t.seconds as u64);
    assert_eq!(
        finished,
        Some(START_UNIX + lost_after.as_secs()),
        "stamped by the clock"
    );
    Ok(())
}

#[test]
fn max_runtime_and_usage_follow_the_virtual_clock() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (controller, clock) = controller(dir.path())?;
    let gpus = common::gpus("n1", "H100-SXM-80GB", 1, 80 << 30);
    let _session = controller.connect_agent(common::hello("n1", gpus, Vec::new()))?;
    let job = controller.submit_job(one_gpu_job(600))?;
    assert_eq!(controller.schedule_pass()?, 1);
    let job = controller.get_job(&job.id)?;
    let task = &job.tasks[0];
    let started = Timestamp {
        seconds: START_UNIX as i64,
        nanos: 0,
    };
    controller.record_workload_status(
        "n1",
        WorkloadStatus {
            allocation_id: task.allocation_id.clone(),
            job_id: job.id.clone(),
            state: WorkloadState::Running as i32,
            gpu_uuids: task.gpu_uuids.clone(),
            started_at: Some(started),
            ..Default::default()
        },
    )?;
    // Keep the node's lease fresh while virtual time passes.
    for _ in 0..59 {
        clock.advance(Duration::from_secs(10));
        controller.accept_seq("n1", 0);
        controller.check_leases()?;
    }
    assert_eq!(
        controller.get_job(&job.id)?.state(),
        JobState::Running,
        "590 s in"
    );
    clock.advance(Duration::from_secs(10));
    controller.accept_seq("n1", 0);
    controller.check_leases()?;
    controller.wait_settled()?;
    let ended = controller.get_job(&job.id)?;
    assert_eq!(ended.state(), JobState::Failed);
    assert!(ended.message.contains("max runtime"), "{}", ended.message);
    assert_eq!(
        ended.finished_at.map(|t| t.seconds as u64),
        Some(START_UNIX + 600)
    );
    Ok(())
}
