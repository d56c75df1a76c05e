//! Recovery windows that a random crash hits only by chance, driven step by
//! step through the controller library: a controller dropped without a
//! shutdown (its store reopened as after a SIGKILL) and agents reconnecting
//! with what they know. The real-process version is
//! `tests/tests/controller_crash.rs`.

use std::time::SystemTime;

use gpufleet_controller::Controller;
use gpufleet_controller::state::AgentSession;
use gpufleet_controller::usage::RecordFilter;
use gpufleet_proto::v1::{
    AgentHello, Job, JobSpec, JobState, RetryPolicy, UsageRecord, WorkloadSpec, WorkloadState,
    WorkloadStatus,
};
use prost_types::Timestamp;

mod common;
use common::open;

fn hello(node: &str, workloads: Vec<WorkloadStatus>) -> AgentHello {
    common::hello(
        node,
        common::gpus(node, "H100-SXM-80GB", 4, 80 << 30),
        workloads,
    )
}

fn spec(tasks: u32, retries: u32) -> JobSpec {
    JobSpec {
        tasks,
        // A whole node per task: a gang of two spans both nodes.
        gpus_per_task: 4,
        workload: Some(WorkloadSpec {
            argv: vec!["train".into()],
            ..Default::default()
        }),
        retry: Some(RetryPolicy {
            max_retries_on_failure: retries,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A task's status as its agent reports it: `state`, having run 1.5 s.
fn status(job: &Job, task: usize, state: WorkloadState, exit_code: i32) -> WorkloadStatus {
    let task = &job.tasks[task];
    let end = SystemTime::now();
    let start = end - std::time::Duration::from_millis(1500);
    WorkloadStatus {
        allocation_id: task.allocation_id.clone(),
        job_id: job.id.clone(),
        task_index: task.index,
        state: state as i32,
        exit_code: Some(exit_code),
        gpu_uuids: task.gpu_uuids.clone(),
        started_at: Some(Timestamp::from(start)),
        finished_at: (state != WorkloadState::Running).then(|| Timestamp::from(end)),
        ..Default::default()
    }
}

fn usage(controller: &Controller, job_id: &str) -> Vec<UsageRecord> {
    let filter = RecordFilter {
        until_ms: u64::MAX / 2,
        job_id: job_id.into(),
        ..Default::default()
    };
    controller.list_usage(&filter, 1000, 0).unwrap().0
}

fn allocated_gpus(controller: &Controller) -> anyhow::Result<u32> {
    Ok(controller
        .capacity(&[])?
        .total
        .map_or(0, |t| t.allocated_gpus))
}

/// Keeps the agent sessions (their downlinks) open, as connected agents do.
fn connect(controller: &Controller, hello: AgentHello) -> anyhow::Result<AgentSession> {
    Ok(controller.connect_agent(hello)?)
}

#[test]
fn a_retried_attempt_keeps_its_usage_record() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let controller = open(dir.path())?;
    let _a = connect(&controller, hello("node-a", Vec::new()))?;
    let job = controller.submit_job(spec(1, 1))?;
    assert_eq!(controller.schedule_pass()?, 1);
    let placed = controller.get_job(&job.id)?;
    controller.record_workload_status("node-a", status(&placed, 0, WorkloadState::Running, 0))?;
    controller.record_workload_status("node-a", status(&placed, 0, WorkloadState::Failed, 3))?;

    let requeued = controller.get_job(&job.id)?;
    assert_eq!(requeued.state(), JobState::Pending);
    assert_eq!(requeued.attempt, 1);
    assert!(requeued.tasks.is_empty(), "the retry starts with new tasks");
    // The failed attempt left the job's task list, not the ledger.
    let records = usage(&controller, &job.id);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].allocation_id, format!("{}.0", job.id));
    assert_eq!(records[0].ended_as, WorkloadState::Failed as i32);
    assert_eq!(records[0].gpu_milliseconds, 1500 * 4);
    Ok(())
}

/// A task is billed when it ends, in the write that ends it; whatever its
/// agent reports later (a replay, a late different ending, its hello after
/// the controller crashed) bills it no second time.
#[test]
fn an_ended_task_is_billed_once_whatever_is_reported_after() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let controller = open(dir.path())?;
    let a = connect(&controller, hello("node-a", Vec::new()))?;
    let job = controller.submit_job(spec(1, 0))?;
    assert_eq!(controller.schedule_pass()?, 1);
    let placed = controller.get_job(&job.id)?;
    controller.record_workload_status("node-a", status(&placed, 0, WorkloadState::Running, 0))?;
    let done = status(&placed, 0, WorkloadState::Succeeded, 0);
    controller.record_workload_status("node-a", done.clone())?;
    controller.record_workload_status("node-a", done.clone())?;
    controller.record_workload_status("node-a", status(&placed, 0, WorkloadState::Failed, 1))?;
    assert_eq!(usage(&controller, &job.id).len(), 1);
    controller.wait_settled()?;
    // A crash: the store reopened as it was, the agent's hello repeats the end.
    drop(a);
    drop(controller);
    let controller = open(dir.path())?;
    let _a = connect(&controller, hello("node-a", vec![done.clone()]))?;
    controller.record_workload_status("node-a", done)?;
    let records = usage(&controller, &job.id);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].ended_as, WorkloadState::Succeeded as i32);
    assert_eq!(controller.get_job(&job.id)?.state(), JobState::Succeeded);
    Ok(())
}

#[test]
fn a_gang_partner_its_agent_never_received_is_released_after_a_crash() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let job = {
        let controller = open(dir.path())?;
        let _a = connect(&controller, hello("node-a", Vec::new()))?;
        let _b = connect(&controller, hello("node-b", Vec::new()))?;
        let job = controller.submit_job(spec(2, 0))?;
        assert_eq!(controller.schedule_pass()?, 1);
        let placed = controller.get_job(&job.id)?;
        assert_eq!(placed.state(), JobState::Scheduled);
        // Dropped without close or shutdown: what a SIGKILL leaves.
        placed
    };
    let a = job
        .tasks
        .iter()
        .position(|t| t.node_id == "node-a")
        .ok_or_else(|| anyhow::anyhow!("no task on node-a: {job:?}"))?;
    let b = 1 - a;

    let controller = open(dir.path())?;
    // node-a ran its task to a failure while the controller was down;
    // node-b never received its allocation.
    let _a = connect(
        &controller,
        hello("node-a", vec![status(&job, a, WorkloadState::Failed, 3)]),
    )?;
    let failed = controller.get_job(&job.id)?;
    assert_eq!(failed.state(), JobState::Failed);
    assert_eq!(failed.exit_code, Some(3));
    let _b = connect(&controller, hello("node-b", Vec::new()))?;

    let ended = controller.get_job(&job.id)?;
    assert_eq!(ended.tasks[b].state(), WorkloadState::Stopped, "{ended:?}");
    assert_eq!(
        allocated_gpus(&controller)?,
        0,
        "no task of an ended job may keep GPUs"
    );
    let records = usage(&controller, &job.id);
    assert_eq!(
        records.len(),
        1,
        "only the task that ran is billed: {records:?}"
    );
    assert_eq!(records[0].allocation_id, job.tasks[a].allocation_id);
    Ok(())
}

#[test]
fn a_retried_gang_whose_partner_never_started_is_queued_again_after_a_crash() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let job = {
        let controller = open(dir.path())?;
        let _a = connect(&controller, hello("node-a", Vec::new()))?;
        let _b = connect(&controller, hello("node-b", Vec::new()))?;
        let job = controller.submit_job(spec(2, 1))?;
        assert_eq!(controller.schedule_pass()?, 1);
        controller.get_job(&job.id)?
    };
    let a = job
        .tasks
        .iter()
        .position(|t| t.node_id == "node-a")
        .ok_or_else(|| anyhow::anyhow!("no task on node-a: {job:?}"))?;

    let controller = open(dir.path())?;
    let _a = connect(
        &controller,
        hello("node-a", vec![status(&job, a, WorkloadState::Failed, 3)]),
    )?;
    assert_eq!(
        controller.get_job(&job.id)?.state(),
        JobState::Requeuing,
        "waits for its other task to end"
    );
    let _b = connect(&controller, hello("node-b", Vec::new()))?;

    let requeued = controller.get_job(&job.id)?;
    assert_eq!(requeued.state(), JobState::Pending, "{requeued:?}");
    assert_eq!(requeued.attempt, 1);
    assert_eq!(controller.schedule_pass()?, 1, "the retry is placed");
    let records = usage(&controller, &job.id);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].allocation_id, job.tasks[a].allocation_id);
    Ok(())
}

#[test]
fn finished_jobs_are_deleted_after_their_retention_and_their_usage_stays() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let controller = open(dir.path())?;
    let _a = connect(&controller, hello("node-a", Vec::new()))?;
    let done = controller.submit_job(spec(1, 0))?;
    let running = controller.submit_job(spec(1, 0))?;
    assert_eq!(controller.schedule_pass()?, 1);
    let placed = controller.get_job(&done.id)?;
    controller.record_workload_status("node-a", status(&placed, 0, WorkloadState::Running, 0))?;
    controller.record_workload_status("node-a", status(&placed, 0, WorkloadState::Succeeded, 0))?;
    assert_eq!(controller.get_job(&done.id)?.state(), JobState::Succeeded);
    let retention = controller.config().finished_job_retention;

    // Within the retention nothing goes; past it, only the finished job.
    assert_eq!(controller.gc_finished_jobs(SystemTime::now(), 100)?, 0);
    let later = SystemTime::now() + retention + std::time::Duration::from_secs(60);
    assert_eq!(controller.gc_finished_jobs(later, 100)?, 1);
    let err = controller.get_job(&done.id).unwrap_err();
    assert!(err.to_string().contains("kept for"), "{err}");
    assert!(controller.get_job(&running.id).is_ok(), "live jobs stay");
    assert_eq!(usage(&controller, &done.id).len(), 1, "usage records stay");

    // Gone from the store too: a restarted controller does not bring it back.
    drop(_a);
    drop(controller);
    let controller = open(dir.path())?;
    assert!(controller.get_job(&done.id).is_err());
    assert!(controller.get_job(&running.id).is_ok());
    assert_eq!(usage(&controller, &done.id).len(), 1);
    Ok(())
}

#[test]
fn settled_jobs_leave_memory_and_are_still_served_from_the_store() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let controller = open(dir.path())?;
    let agent = connect(&controller, hello("node-a", Vec::new()))?;
    // Five jobs run to success one after another (each takes the whole node).
    let mut succeeded = Vec::new();
    for _ in 0..5 {
        let job = controller.submit_job(spec(1, 0))?;
        assert_eq!(controller.schedule_pass()?, 1);
        let placed = controller.get_job(&job.id)?;
        controller
            .record_workload_status("node-a", status(&placed, 0, WorkloadState::Running, 0))?;
        controller
            .record_workload_status("node-a", status(&placed, 0, WorkloadState::Succeeded, 0))?;
        succeeded.push(job.id);
    }
    // One cancelled while queued, one left running, one left pending.
    let cancelled = controller.submit_job(spec(1, 0))?;
    controller.cancel_job(&cancelled.id, "test")?;
    let running = controller.submit_job(spec(1, 0))?;
    assert_eq!(controller.schedule_pass()?, 1);
    let placed = controller.get_job(&running.id)?;
    controller.record_workload_status("node-a", status(&placed, 0, WorkloadState::Running, 0))?;
    let pending = controller.submit_job(spec(1, 0))?;
    controller.schedule_pass()?;

    let check = |controller: &Controller| -> anyhow::Result<()> {
        assert_eq!(
            controller.resident_jobs(),
            2,
            "only the live jobs stay in memory"
        );
        let counts = controller.job_counts();
        assert_eq!(counts.get(&JobState::Succeeded), Some(&5));
        assert_eq!(counts.get(&JobState::Cancelled), Some(&1));
        assert_eq!(counts.get(&JobState::Running), Some(&1));
        assert_eq!(counts.get(&JobState::Pending), Some(&1));
        // Settled jobs are read back whole.
        let first = controller.get_job(&succeeded[0])?;
        assert_eq!(first.state(), JobState::Succeeded);
        assert_eq!(first.tasks.len(), 1);
        assert_eq!(
            controller.cancel_job(&succeeded[0], "late")?.state(),
            JobState::Succeeded,
            "cancelling a finished job changes nothing"
        );
        assert!(
            controller
                .explain_job(&cancelled.id)?
                .summary
                .contains("not pending")
        );
        // Pages of two walk every job once, newest first.
        let mut listed = Vec::new();
        let mut token = String::new();
        loop {
            let page = controller.list_jobs(&[], "", 2, &token)?;
            listed.extend(page.jobs.iter().map(|j| j.id.clone()));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let mut expected: Vec<String> = succeeded.clone();
        expected.extend([cancelled.id.clone(), running.id.clone(), pending.id.clone()]);
        expected.reverse();
        assert_eq!(listed, expected);
        let done = controller.list_jobs(&[JobState::Succeeded], "", 100, "")?;
        assert_eq!(done.jobs.len(), 5);
        let live = controller.list_jobs(&[JobState::Running, JobState::Pending], "", 100, "")?;
        let live: Vec<&str> = live.jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(live, [pending.id.as_str(), running.id.as_str()]);
        // The ledger pages through the store too, newest first.
        let filter = RecordFilter {
            until_ms: u64::MAX / 2,
            ..Default::default()
        };
        let (first_page, more) = controller.list_usage(&filter, 3, 0)?;
        assert!(more);
        let (second_page, more) = controller.list_usage(&filter, 3, 3)?;
        assert!(!more);
        let mut jobs: Vec<String> = first_page
            .iter()
            .chain(&second_page)
            .map(|r| r.job_id.clone())
            .collect();
        assert_eq!(jobs.len(), 5);
        jobs.sort();
        let mut expected = succeeded.clone();
        expected.sort();
        assert_eq!(jobs, expected);
        Ok(())
    };
    check(&controller)?;
    // A restarted controller loads only the live jobs back into memory.
    drop(agent);
    drop(controller);
    let controller = open(dir.path())?;
    check(&controller)?;
    Ok(())
}
