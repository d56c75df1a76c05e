//! After an agent restart: the workloads the runtime still runs are
//! watched again, those that ended while the agent was away get their real
//! outcome, and those gone without one are reported lost.

use gpufleet_proto::v1::WorkloadState;
use tokio::sync::watch;
use tracing::info;

use super::workload::Workload;
use super::{Source, Supervisor};
use crate::runtime::FoundState;

/// What [`Supervisor::recover`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Still running: watched again, stoppable as before.
    pub adopted: Vec<String>,
    /// Ended while the agent was away; their real outcome is reported.
    pub finished: Vec<String>,
    /// Gone without a recorded outcome: reported `Lost`.
    pub lost: Vec<String>,
    /// Records that could not be read (each named with the reason).
    pub unreadable: Vec<String>,
}

impl Supervisor {
    /// Re-adopts the workloads an earlier agent run left with the runtime
    /// (for the process runtime: those recorded under
    /// `data_dir/workloads`). Call once, at start, before anything else
    /// uses the supervisor.
    pub fn recover(&self) -> Recovery {
        let adoption = {
            let st = self.lock();
            let known = |id: &str| st.workloads.contains_key(id);
            self.inner.runtime.adopt(&known)
        };
        let mut found = Recovery {
            unreadable: adoption.unreadable,
            ..Recovery::default()
        };
        let mut st = self.lock();
        for f in adoption.found {
            let id = f.allocation.allocation_id.clone();
            if st.workloads.contains_key(&id) {
                continue;
            }
            let source = if f.local {
                Source::Local
            } else {
                Source::Controller
            };
            let (done_tx, done_rx) = watch::channel(false);
            let mut w = Workload::starting(f.allocation, source, done_rx);
            w.state = WorkloadState::Running;
            w.pid = f.pid;
            w.started_at = f.started_at;
            w.stop_requested = f.stop_requested;
            w.reached_runtime = true;
            let ended = match f.state {
                FoundState::Running(running) => {
                    info!(allocation_id = %id, pid = w.pid, "re-adopted a running workload");
                    w.running = Some(running.clone());
                    self.watch_until_ended(&id, running, done_tx.clone());
                    found.adopted.push(id.clone());
                    false
                }
                FoundState::Ended(exit) => {
                    w.apply_exit(&exit);
                    found.finished.push(id.clone());
                    true
                }
                FoundState::Lost(message) => {
                    w.end(WorkloadState::Lost, message);
                    found.lost.push(id.clone());
                    true
                }
            };
            if ended {
                info!(allocation_id = %id, state = ?w.state, message = %w.message, "recovered a workload that ended while the agent was down");
                let _ = done_tx.send(true);
                if source == Source::Local {
                    // Local results are kept until the next restart, not
                    // forever.
                    self.forget_in_runtime(&w);
                }
            }
            let status = w.status();
            st.workloads.insert(id, w);
            self.emit(&mut st, status);
        }
        found
    }
}
