//! The job state machine, as pure functions over job records.
//!
//! `Pending → Scheduled → Running → Succeeded | Failed | Cancelled | Lost`,
//! plus `Requeuing`: the job's tasks are being stopped so it can be queued
//! again — after a preemption, a drain eviction, or a failure or lost node
//! that its retry policy covers. A requeuing job returns to `Pending` (with
//! `attempt + 1`) once none of its tasks holds GPUs any more.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use gpufleet_proto::v1::{
    Gang, Job, JobState, PendingReason, TaskStatus, WorkloadState, WorkloadStatus,
};
use prost_types::Timestamp;

use gpufleet_scheduler::reason;

pub use gpufleet_core::{is_terminal_job, is_terminal_workload};

/// A task holds its GPUs until the agent says it ended (or its node is lost).
pub fn task_holds_gpus(task: &TaskStatus) -> bool {
    !is_terminal_workload(task.state())
}

pub fn job_nodes(job: &Job) -> BTreeSet<String> {
    job.tasks.iter().map(|t| t.node_id.clone()).collect()
}

/// Whether the job's tasks should be running on their nodes.
pub fn is_desired(job: &Job) -> bool {
    matches!(
        job.state(),
        JobState::Scheduled | JobState::Pulling | JobState::Running
    )
}

/// Applies an agent's status to a task; returns whether anything changed.
/// A terminal task never goes back to running.
/// `now` stamps a task that ended without the agent saying when.
pub fn apply_status(task: &mut TaskStatus, status: &WorkloadStatus, now: SystemTime) -> bool {
    if is_terminal_workload(task.state()) || status.state() == WorkloadState::Unspecified {
        return false;
    }
    let before = task.clone();
    task.set_state(status.state());
    task.exit_code = status.exit_code;
    task.signal = status.signal;
    task.message = status.message.clone();
    // Rank 0's port is chosen once per attempt; the first report stands.
    if task.rendezvous_port == 0 {
        task.rendezvous_port = status.rendezvous_port;
    }
    if status.started_at.is_some() {
        task.started_at = status.started_at;
    }
    if status.finished_at.is_some() {
        task.finished_at = status.finished_at;
    } else if is_terminal_workload(status.state()) && task.finished_at.is_none() {
        task.finished_at = Some(Timestamp::from(now));
    }
    // A task never ends before it starts, whatever an agent's clock said:
    // usage is end − start.
    if let (Some(start), Some(end)) = (task.started_at, task.finished_at)
        && (end.seconds, end.nanos) < (start.seconds, start.nanos)
    {
        task.finished_at = Some(start);
    }
    *task != before
}

/// The gang facts of task `index` for its agent; `None` for a single-task
/// job. MASTER_PORT is 0 until task 0's agent reported the port it chose.
pub fn gang_for(job: &Job, index: u32) -> Option<Gang> {
    if job.tasks.len() < 2 {
        return None;
    }
    let peers: Vec<String> = job.tasks.iter().map(|t| t.address.clone()).collect();
    let rank0 = job.tasks.iter().find(|t| t.index == 0)?;
    Some(Gang {
        rank: index,
        world_size: job.tasks.len() as u32,
        master_addr: rank0.address.clone(),
        master_port: rank0.rendezvous_port,
        peers,
    })
}

/// Moves the job to Requeuing (its tasks will be stopped), or straight back
/// to Pending when nothing of it runs. `backoff` delays the next placement.
/// Returns the tasks a return to Pending retired (see [`settle_requeue`]).
pub fn requeue(
    job: &mut Job,
    why: String,
    backoff: Option<Duration>,
    now: SystemTime,
) -> Vec<TaskStatus> {
    job.history.push(format!("attempt {}: {why}", job.attempt));
    job.set_state(JobState::Requeuing);
    job.message = why;
    job.not_before = backoff
        .filter(|d| !d.is_zero())
        .map(|d| Timestamp::from(now + d));
    settle_requeue(job)
}

/// A requeuing job whose tasks all ended goes back to the queue. Returns
/// the ended attempt's tasks, which the job no longer lists: their usage
/// records are still to be written from them.
pub fn settle_requeue(job: &mut Job) -> Vec<TaskStatus> {
    if job.state() != JobState::Requeuing || job.tasks.iter().any(task_holds_gpus) {
        return Vec::new();
    }
    job.set_state(JobState::Pending);
    job.attempt += 1;
    let retired = std::mem::take(&mut job.tasks);
    job.scheduled_at = None;
    // It described the ended attempt's placement.
    job.placement_note.clear();
    job.started_at = None;
    job.exit_code = None;
    job.pending_reason = Some(PendingReason {
        code: reason::WAITING_FOR_SCHEDULER.to_string(),
        message: "queued again; waiting for the next scheduling pass".to_string(),
        exclusions: Vec::new(),
    });
    retired
}

fn backoff_for(job: &Job, retries_used: u32) -> Option<Duration> {
    let base = job.spec.as_ref()?.retry.as_ref()?.backoff_seconds as u64;
    // Doubles per retry, capped at one hour.
    let secs = base.saturating_mul(1u64 << retries_used.min(12)).min(3600);
    Some(Duration::from_secs(secs))
}

/// Derives a job's state from its tasks, applying its retry policy.
/// Returns the tasks a return to the queue retired (see [`settle_requeue`]).
pub fn derive_job_state(job: &mut Job, now: SystemTime) -> Vec<TaskStatus> {
    if job.state() == JobState::Requeuing {
        return settle_requeue(job);
    }
    if is_terminal_job(job.state()) {
        return Vec::new();
    }
    let wall = now;
    let now = Timestamp::from(now);
    let retry = job.spec.as_ref().and_then(|s| s.retry).unwrap_or_default();
    if let Some(task) = job
        .tasks
        .iter()
        .find(|t| matches!(t.state(), WorkloadState::Lost | WorkloadState::Interrupted))
        .cloned()
    {
        let why = format!("task {}: {}", task.index, task.message);
        if job.node_loss_retries < retry.max_retries_on_node_loss {
            let backoff = backoff_for(job, job.node_loss_retries);
            job.node_loss_retries += 1;
            return requeue(job, why, backoff, wall);
        }
        job.set_state(JobState::Lost);
        job.message = why;
        job.finished_at = Some(now);
        return Vec::new();
    }
    if let Some(task) = job
        .tasks
        .iter()
        .find(|t| matches!(t.state(), WorkloadState::Failed | WorkloadState::Stopped))
        .cloned()
    {
        let why = match (task.state(), task.exit_code, task.signal) {
            (WorkloadState::Stopped, _, _) => {
                format!("task {} was stopped outside the controller", task.index)
            }
            (_, _, Some(signal)) => format!("task {} was killed by signal {signal}", task.index),
            (_, Some(code), _) => format!("task {} exited with code {code}", task.index),
            _ => format!("task {} failed: {}", task.index, task.message),
        };
        if job.failure_retries < retry.max_retries_on_failure {
            let backoff = backoff_for(job, job.failure_retries);
            job.failure_retries += 1;
            return requeue(job, why, backoff, wall);
        }
        job.set_state(JobState::Failed);
        job.exit_code = task.exit_code;
        job.message = why;
        job.finished_at = Some(now);
        return Vec::new();
    }
    let states: Vec<WorkloadState> = job.tasks.iter().map(|t| t.state()).collect();
    if !states.is_empty() && states.iter().all(|s| *s == WorkloadState::Succeeded) {
        job.set_state(JobState::Succeeded);
        job.exit_code = Some(0);
        job.message = "all tasks exited with code 0".to_string();
        job.finished_at = Some(now);
    } else if matches!(job.state(), JobState::Scheduled | JobState::Pulling) && !states.is_empty() {
        if states
            .iter()
            .all(|s| matches!(s, WorkloadState::Running | WorkloadState::Succeeded))
        {
            job.set_state(JobState::Running);
            job.started_at = Some(now);
        } else if states.contains(&WorkloadState::Pulling) {
            // A task's image is being pulled: its message says how far.
            job.set_state(JobState::Pulling);
        } else {
            job.set_state(JobState::Scheduled);
        }
    }
    Vec::new()
}

/// Fails a job that ran longer than its max runtime (retry policy applies).
/// None when the job is within its limit; else the tasks a return to the
/// queue retired (see [`settle_requeue`]).
pub fn enforce_max_runtime(job: &mut Job, now: SystemTime) -> Option<Vec<TaskStatus>> {
    let limit = job
        .spec
        .as_ref()
        .map(|s| s.max_runtime_seconds)
        .filter(|s| *s > 0)?;
    if !is_desired(job) {
        return None;
    }
    let started = job
        .started_at
        .or(job.scheduled_at)
        .and_then(|t| SystemTime::try_from(t).ok())?;
    if now.duration_since(started).unwrap_or_default() < Duration::from_secs(limit as u64) {
        return None;
    }
    let why = format!(
        "exceeded its max runtime of {}",
        humantime::format_duration(Duration::from_secs(limit as u64))
    );
    let retry = job.spec.as_ref().and_then(|s| s.retry).unwrap_or_default();
    if job.failure_retries < retry.max_retries_on_failure {
        let backoff = backoff_for(job, job.failure_retries);
        job.failure_retries += 1;
        return Some(requeue(job, why, backoff, now));
    }
    job.set_state(JobState::Failed);
    job.message = why;
    job.finished_at = Some(Timestamp::from(now));
    Some(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::{JobSpec, RetryPolicy};

    #[test]
    fn a_job_shows_pulling_while_a_task_pulls_its_image_then_running() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let mut job = job_with_tasks(
            &[WorkloadState::Pulling, WorkloadState::Starting],
            RetryPolicy::default(),
        );
        job.set_state(JobState::Scheduled);
        derive_job_state(&mut job, now);
        assert_eq!(job.state(), JobState::Pulling);
        assert!(is_desired(&job));
        job.tasks[0].set_state(WorkloadState::Starting);
        derive_job_state(&mut job, now);
        assert_eq!(job.state(), JobState::Scheduled);
        job.tasks[0].set_state(WorkloadState::Pulling);
        derive_job_state(&mut job, now);
        job.tasks[0].set_state(WorkloadState::Running);
        job.tasks[1].set_state(WorkloadState::Running);
        derive_job_state(&mut job, now);
        assert_eq!(job.state(), JobState::Running);
        assert!(job.started_at.is_some());
    }

    fn job_with_tasks(states: &[WorkloadState], retry: RetryPolicy) -> Job {
        let mut job = Job {
            id: "job-000000000001".into(),
            spec: Some(JobSpec {
                retry: Some(retry),
                ..Default::default()
            }),
            state: JobState::Running as i32,
            ..Default::default()
        };
        job.tasks = states
            .iter()
            .enumerate()
            .map(|(i, s)| TaskStatus {
                index: i as u32,
                state: *s as i32,
                exit_code: Some(3),
                ..Default::default()
            })
            .collect();
        job
    }

    #[test]
    fn a_task_never_ends_before_it_starts() {
        let mut task = TaskStatus::default();
        let ts = |ms: i64| prost_types::Timestamp {
            seconds: ms / 1000,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        };
        let status = WorkloadStatus {
            state: WorkloadState::Succeeded as i32,
            exit_code: Some(0),
            started_at: Some(ts(10_500)),
            // An exit recorded with a coarser clock, a moment "earlier".
            finished_at: Some(ts(10_499)),
            ..Default::default()
        };
        assert!(apply_status(&mut task, &status, SystemTime::UNIX_EPOCH));
        assert_eq!(task.finished_at, Some(ts(10_500)));
    }

    #[test]
    fn failure_without_retries_fails_the_job() {
        let mut job = job_with_tasks(&[WorkloadState::Failed], RetryPolicy::default());
        derive_job_state(&mut job, SystemTime::UNIX_EPOCH);
        assert_eq!(job.state(), JobState::Failed);
        assert_eq!(job.exit_code, Some(3));
    }

    #[test]
    fn failure_with_retries_requeues_after_the_other_tasks_stop() {
        let retry = RetryPolicy {
            max_retries_on_failure: 1,
            backoff_seconds: 10,
            ..Default::default()
        };
        let mut job = job_with_tasks(&[WorkloadState::Failed, WorkloadState::Running], retry);
        derive_job_state(&mut job, SystemTime::UNIX_EPOCH);
        assert_eq!(job.state(), JobState::Requeuing);
        assert!(job.not_before.is_some());
        job.tasks[1].set_state(WorkloadState::Stopped);
        let retired = derive_job_state(&mut job, SystemTime::UNIX_EPOCH);
        assert_eq!(job.state(), JobState::Pending);
        assert_eq!(job.attempt, 1);
        assert!(job.tasks.is_empty());
        // The ended attempt's tasks come back, for their usage records.
        let states: Vec<WorkloadState> = retired.iter().map(|t| t.state()).collect();
        assert_eq!(states, [WorkloadState::Failed, WorkloadState::Stopped]);
        assert_eq!(job.history.len(), 1);
        // The budget is spent: the next failure is final.
        job.set_state(JobState::Running);
        job.tasks = vec![TaskStatus {
            state: WorkloadState::Failed as i32,
            exit_code: Some(1),
            ..Default::default()
        }];
        derive_job_state(&mut job, SystemTime::UNIX_EPOCH);
        assert_eq!(job.state(), JobState::Failed);
    }

    #[test]
    fn lost_node_uses_its_own_budget() {
        let retry = RetryPolicy {
            max_retries_on_node_loss: 1,
            ..Default::default()
        };
        let mut job = job_with_tasks(&[WorkloadState::Lost], retry);
        derive_job_state(&mut job, SystemTime::UNIX_EPOCH);
        assert_eq!(
            job.state(),
            JobState::Pending,
            "nothing left running: straight back to the queue"
        );
        assert_eq!(job.node_loss_retries, 1);
        assert!(job.not_before.is_none());
    }
}
