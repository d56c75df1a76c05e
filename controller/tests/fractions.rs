//! Shares of a GPU and MIG instances end to end through the controller's
//! library, on virtual time: placement, the desired state an agent
//! receives, the pending reason of a share that does not fit, capacity,
//! and the ledger billing a shared GPU once (0.5 + 0.5), never twice.

mod common;

use std::sync::Arc;
use std::time::Duration;

use gpufleet_controller::store::MemoryStore;
use gpufleet_controller::usage::RecordFilter;
use gpufleet_core::ManualClock;
use gpufleet_proto::v1::controller_message::Body;
use gpufleet_proto::v1::{
    Allocation, JobSpec, JobState, MigInstance, WorkloadSpec, WorkloadState, WorkloadStatus,
};
use prost_types::Timestamp;

const START_UNIX: u64 = 1_800_000_000;
const GIB: u64 = 1 << 30;

fn spec(name: &str) -> JobSpec {
    JobSpec {
        name: name.into(),
        tasks: 1,
        workload: Some(WorkloadSpec {
            argv: vec!["serve".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn share(name: &str, milli: u32, memory: u64) -> JobSpec {
    JobSpec {
        gpu_share_milli: milli,
        gpu_memory_bytes: memory,
        ..spec(name)
    }
}

fn at(secs: u64) -> Timestamp {
    Timestamp {
        seconds: secs as i64,
        nanos: 0,
    }
}

/// The latest desired set the node's session received.
fn latest_desired(
    session: &mut gpufleet_controller::state::AgentSession,
) -> Option<Vec<Allocation>> {
    let mut latest = None;
    while let Ok(message) = session.downlink.try_recv() {
        if let Some(Body::DesiredState(desired)) = message.body {
            latest = Some(desired.allocations);
        }
    }
    latest
}

#[test]
fn two_halves_share_a_gpu_beside_a_mig_job_and_are_billed_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let clock = Arc::new(ManualClock::at_unix_secs(START_UNIX));
    let controller =
        common::open_on_clock(dir.path(), Box::new(MemoryStore::new()), clock.clone())?;
    // GPU 0 whole; GPU 1 in MIG mode with a 1g.10gb and a 3g.40gb instance.
    let mut gpus = common::gpus("n1", "H100-SXM-80GB", 2, 80 * GIB);
    gpus[1].mig_enabled = true;
    gpus[1].mig_instances = vec![
        MigInstance {
            uuid: "MIG-n1-1-0".into(),
            profile: "1g.10gb".into(),
            memory_bytes: 10 * GIB,
            sm_share_milli: 143,
            ..Default::default()
        },
        MigInstance {
            uuid: "MIG-n1-1-1".into(),
            profile: "3g.40gb".into(),
            memory_bytes: 40 * GIB,
            sm_share_milli: 429,
            ..Default::default()
        },
    ];
    let mut session = controller.connect_agent(common::hello("n1", gpus, Vec::new()))?;

    let mig = controller.submit_job(JobSpec {
        mig_profile: "1g.10gb".into(),
        ..spec("mig")
    })?;
    // Submitted a millisecond apart: the queue's order is submit order.
    clock.advance(Duration::from_millis(1));
    let a = controller.submit_job(share("half-a", 500, 0))?;
    clock.advance(Duration::from_millis(1));
    let b = controller.submit_job(share("half-b", 500, 0))?;
    clock.advance(Duration::from_millis(1));
    let c = controller.submit_job(share("third", 470, 12 * GIB))?;
    assert_eq!(controller.schedule_pass()?, 3);
    controller.wait_settled()?;

    let mig = controller.get_job(&mig.id)?;
    assert_eq!(mig.tasks[0].gpu_uuids, vec!["MIG-n1-1-0"]);
    assert_eq!(mig.tasks[0].mig_profile, "1g.10gb");
    assert_eq!(
        mig.tasks[0].model, "H100-SXM-80GB",
        "the instance's GPU's model"
    );
    for job in [&a, &b] {
        let job = controller.get_job(&job.id)?;
        assert_eq!(job.state(), JobState::Scheduled);
        assert_eq!(
            job.tasks[0].gpu_uuids,
            vec!["GPU-n1-0"],
            "both halves on GPU 0"
        );
        assert_eq!(job.tasks[0].gpu_share_milli, 500);
    }
    let third = controller.get_job(&c.id)?;
    assert_eq!(third.state(), JobState::Pending);
    let reason = third.pending_reason.clone().unwrap_or_default();
    assert_eq!(reason.code, "INSUFFICIENT_FREE_GPUS");
    assert!(
        reason
            .message
            .starts_with("needs 470/1000 of a GPU with 12 GiB free: "),
        "{}",
        reason.message
    );

    // The agent is told exactly its devices and the shares' limits.
    let desired = latest_desired(&mut session).unwrap_or_default();
    assert_eq!(desired.len(), 3);
    for allocation in &desired {
        if allocation.job_id == mig.id {
            assert_eq!(allocation.gpu_uuids, vec!["MIG-n1-1-0"]);
            assert_eq!(
                allocation.gpu_share_milli, 0,
                "a MIG instance is whole to it"
            );
        } else {
            assert_eq!(allocation.gpu_uuids, vec!["GPU-n1-0"]);
            assert_eq!(allocation.gpu_share_milli, 500);
            assert_eq!(allocation.gpu_memory_limit_bytes, 40 * GIB);
        }
    }

    // Capacity tells the units apart.
    let total = controller.capacity(&[])?.total.unwrap_or_default();
    assert_eq!((total.total_gpus, total.free_gpus), (2, 0));
    assert_eq!((total.shared_gpus, total.shared_free_milli), (1, 0));
    assert_eq!(
        (
            total.mig_gpus,
            total.mig_instances,
            total.free_mig_instances
        ),
        (1, 2, 1)
    );
    assert_eq!(total.allocated_milli, 1000 + 143);

    // The node view names every holder of a shared or MIG GPU.
    let node = controller.get_node("n1")?;
    assert_eq!(node.allocated_gpus, 2);
    let holders = |i: usize| {
        node.gpus[i]
            .job_id
            .split(',')
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let mut shared = holders(0);
    shared.sort();
    let mut halves = vec![a.id.clone(), b.id.clone()];
    halves.sort();
    assert_eq!(shared, halves);
    assert_eq!(holders(1), vec![mig.id.clone()]);

    // All three run for 100 s, then the halves end.
    let mut tasks = Vec::new();
    for id in [&mig.id, &a.id, &b.id] {
        let job = controller.get_job(id)?;
        tasks.push((job.id.clone(), job.tasks[0].clone()));
    }
    for (job_id, task) in &tasks {
        controller.record_workload_status(
            "n1",
            WorkloadStatus {
                allocation_id: task.allocation_id.clone(),
                job_id: job_id.clone(),
                state: WorkloadState::Running as i32,
                gpu_uuids: task.gpu_uuids.clone(),
                started_at: Some(at(START_UNIX)),
                ..Default::default()
            },
        )?;
    }
    for _ in 0..10 {
        clock.advance(Duration::from_secs(10));
        controller.accept_seq("n1", 0);
        controller.check_leases()?;
    }
    for (job_id, task) in &tasks[1..] {
        controller.record_workload_status(
            "n1",
            WorkloadStatus {
                allocation_id: task.allocation_id.clone(),
                job_id: job_id.clone(),
                state: WorkloadState::Succeeded as i32,
                exit_code: Some(0),
                gpu_uuids: task.gpu_uuids.clone(),
                started_at: Some(at(START_UNIX)),
                finished_at: Some(at(START_UNIX + 100)),
                ..Default::default()
            },
        )?;
    }
    controller.wait_settled()?;
    let filter = RecordFilter {
        since_ms: 0,
        until_ms: (START_UNIX + 1000) * 1000,
        ..Default::default()
    };
    let (records, _) = controller.list_usage(&filter, 100, 0)?;
    assert_eq!(records.len(), 2, "the two halves ended");
    for r in &records {
        assert_eq!(r.gpu_share_milli, 500);
        assert_eq!(r.gpu_milliseconds, 50_000, "half a GPU for 100 s");
        // $2.00/GPU-hour × 0.5 × 100 s = $0.027778.
        assert_eq!(r.cost_micro_usd, 27_778);
    }
    let billed: u64 = records.iter().map(|r| r.gpu_milliseconds).sum();
    assert_eq!(billed, 100_000, "one GPU for 100 s, billed once");

    // The GPU is free again: the third share runs now.
    assert_eq!(controller.schedule_pass()?, 1);
    let third = controller.get_job(&c.id)?;
    assert_eq!(third.tasks[0].gpu_uuids, vec!["GPU-n1-0"]);
    assert_eq!(
        (
            third.tasks[0].gpu_share_milli,
            third.tasks[0].gpu_memory_limit_bytes
        ),
        (470, 12 * GIB)
    );
    Ok(())
}
