//! One workload as the supervisor tracks it: its state machine
//! (`Starting` → `Running` → a terminal state, or straight to one) and
//! the status it reports.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gpufleet_proto::v1::{Allocation, WorkloadState, WorkloadStatus};
use nix::sys::signal::Signal;
use tokio::sync::{Notify, watch};

use super::Source;
use crate::runtime::{Exit, RunningWorkload};

pub(super) struct Workload {
    pub(super) allocation: Allocation,
    pub(super) source: Source,
    pub(super) state: WorkloadState,
    /// The workload's main pid (its process group with the process
    /// runtime); 0 until known.
    pub(super) pid: u32,
    /// The runtime's handle while it runs (`None`: not started, or ended).
    pub(super) running: Option<Arc<dyn RunningWorkload>>,
    /// Handed to the runtime (launched or adopted), which may then keep
    /// something of it to forget.
    pub(super) reached_runtime: bool,
    pub(super) exit_code: Option<i32>,
    pub(super) signal: Option<i32>,
    pub(super) message: String,
    /// While `Starting`: its runtime is pulling its image, reported as
    /// `Pulling` (the state machine itself stays `Starting`).
    pub(super) pulling: bool,
    pub(super) started_at: Option<SystemTime>,
    pub(super) finished_at: Option<SystemTime>,
    pub(super) stop_requested: bool,
    /// The grace period the stop asked for (`None`: the workload's own).
    pub(super) stop_grace: Option<Duration>,
    /// Wakes the workload's start task when a stop comes while it waits
    /// for its turn to start.
    pub(super) stop_while_queued: Arc<Notify>,
    /// Becomes true once the workload is terminal.
    pub(super) done: watch::Receiver<bool>,
    /// Wakes the start task of a gang rank that waits for rank 0's
    /// rendezvous port once a desired state brought it.
    pub(super) port_known: Arc<Notify>,
    /// Set when a spot interruption stops it: it then ends `Interrupted`
    /// with this message, not `Stopped`.
    pub(super) interrupted: Option<String>,
    /// Why the agent stopped it on its own (a GPU memory overrun): it then
    /// ends Failed with this reason rather than Stopped.
    pub(super) enforced: Option<String>,
}

impl Workload {
    /// A workload about to start.
    pub(super) fn starting(
        allocation: Allocation,
        source: Source,
        done: watch::Receiver<bool>,
    ) -> Self {
        Self {
            allocation,
            source,
            state: WorkloadState::Starting,
            pid: 0,
            running: None,
            reached_runtime: false,
            exit_code: None,
            signal: None,
            message: String::new(),
            pulling: false,
            started_at: None,
            finished_at: None,
            stop_requested: false,
            stop_grace: None,
            stop_while_queued: Arc::new(Notify::new()),
            done,
            port_known: Arc::new(Notify::new()),
            interrupted: None,
            enforced: None,
        }
    }

    /// A gang rank other than 0 whose launch waits for rank 0's port.
    pub(super) fn awaiting_port(&self) -> bool {
        awaits_port(&self.allocation)
    }

    pub(super) fn status(&self) -> WorkloadStatus {
        WorkloadStatus {
            allocation_id: self.allocation.allocation_id.clone(),
            job_id: self.allocation.job_id.clone(),
            task_index: self.allocation.task_index,
            state: if self.state == WorkloadState::Starting && self.pulling {
                WorkloadState::Pulling as i32
            } else {
                self.state as i32
            },
            exit_code: self.exit_code,
            signal: self.signal,
            message: self.message.clone(),
            pid: self.pid,
            gpu_uuids: self.allocation.gpu_uuids.clone(),
            started_at: self.started_at.map(prost_types::Timestamp::from),
            finished_at: self.finished_at.map(prost_types::Timestamp::from),
            rendezvous_port: self
                .allocation
                .gang
                .as_ref()
                .filter(|g| g.rank == 0)
                .map_or(0, |g| g.master_port),
        }
    }

    pub(super) fn terminal(&self) -> bool {
        gpufleet_core::is_terminal_workload(self.state)
    }

    /// Ends it as `state` with `message`, now.
    pub(super) fn end(&mut self, state: WorkloadState, message: String) {
        self.state = state;
        self.message = message;
        self.finished_at = Some(SystemTime::now());
        self.running = None;
    }

    /// Takes the outcome the runtime recorded.
    pub(super) fn apply_exit(&mut self, exit: &Exit) {
        self.exit_code = exit.exit_code;
        self.signal = exit.signal;
        // The record may have millisecond precision and another clock
        // reading; `started_at` was taken after the runtime answered. A
        // workload that exits at once could seem to end before it started:
        // it never does.
        let finished = exit.finished_at;
        self.finished_at = Some(self.started_at.map_or(finished, |s| finished.max(s)));
        (self.state, self.message) = outcome(self.stop_requested, exit);
        if let Some(reason) = &self.enforced
            && exit.start_error.is_none()
        {
            (self.state, self.message) = (WorkloadState::Failed, reason.clone());
        } else if let Some(why) = &self.interrupted
            && matches!(self.state, WorkloadState::Stopped | WorkloadState::Failed)
            && exit.start_error.is_none()
        {
            self.state = WorkloadState::Interrupted;
            self.message = format!("{why}; {}", self.message);
        }
        self.running = None;
    }
}

/// Whether `allocation` is a gang rank other than 0 that does not know
/// rank 0's rendezvous port yet.
pub(super) fn awaits_port(allocation: &Allocation) -> bool {
    allocation
        .gang
        .as_ref()
        .is_some_and(|g| g.rank != 0 && g.master_port == 0)
}

/// The status message of a rank that waits for rank 0's port.
pub(super) const WAITING_FOR_PORT: &str = "waiting for rank 0's rendezvous port";

/// The state and message for a workload that ended as `exit` says.
fn outcome(stop_requested: bool, exit: &Exit) -> (WorkloadState, String) {
    if let Some(error) = &exit.start_error {
        return (WorkloadState::Failed, error.clone());
    }
    match (stop_requested, exit.exit_code, exit.signal) {
        (true, _, Some(sig)) => (
            WorkloadState::Stopped,
            format!("stopped (signal {})", signal_name(sig)),
        ),
        (true, _, _) => (WorkloadState::Stopped, "stopped".to_string()),
        (false, Some(0), _) => (WorkloadState::Succeeded, String::new()),
        (false, Some(code), _) => (WorkloadState::Failed, format!("exited with code {code}")),
        (false, None, Some(sig)) => (
            WorkloadState::Failed,
            format!("killed by signal {}", signal_name(sig)),
        ),
        (false, None, None) => (
            WorkloadState::Failed,
            "ended for an unknown reason".to_string(),
        ),
    }
}

fn signal_name(sig: i32) -> String {
    match Signal::try_from(sig) {
        Ok(s) => format!("{sig} ({})", s.as_str()),
        Err(_) => sig.to_string(),
    }
}
