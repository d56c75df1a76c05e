//! Stop requests: which grace period applies, stops that come while a
//! workload still starts, and waiting for the end.

use std::time::Duration;

use gpufleet_proto::v1::{WorkloadState, WorkloadStatus};
use tokio::sync::watch;

use super::workload::Workload;
use super::{Supervisor, SupervisorError};

impl Supervisor {
    /// Asks the runtime to stop the workload (a polite signal, a kill after
    /// the grace period). Returns a receiver that turns true once it has
    /// ended. A workload still starting is stopped once its start settles:
    /// not started at all if its runtime was not yet let start it, else
    /// signalled.
    pub(super) fn request_stop(
        &self,
        w: &mut Workload,
        grace: Option<Duration>,
    ) -> watch::Receiver<bool> {
        if w.terminal() || w.stop_requested {
            return w.done.clone();
        }
        if w.state == WorkloadState::Starting {
            w.stop_requested = true;
            w.stop_grace = grace;
            // Kept if the start task is not waiting yet; ignored once it
            // has its permit (it then checks `stop_requested`).
            w.stop_while_queued.notify_one();
        } else if w.pid > 0 {
            w.stop_requested = true;
            w.stop_grace = grace;
            self.signal_stop(w);
        }
        w.done.clone()
    }

    /// Whether a stop was requested for a workload (true once it is gone).
    pub(super) fn stop_requested(&self, allocation_id: &str) -> bool {
        self.lock()
            .workloads
            .get(allocation_id)
            .is_none_or(|w| w.stop_requested)
    }

    /// Carries out a requested stop through the runtime, with the grace
    /// period the stop asked for, else the workload's own, else the
    /// agent's default.
    pub(super) fn signal_stop(&self, w: &Workload) {
        let Some(running) = &w.running else {
            return;
        };
        let grace = w
            .stop_grace
            .filter(|g| !g.is_zero())
            .or_else(|| {
                w.allocation
                    .workload
                    .as_ref()
                    .map(|s| Duration::from_secs(u64::from(s.stop_grace_period_seconds)))
                    .filter(|g| !g.is_zero())
            })
            .unwrap_or(self.inner.settings.default_grace);
        running.stop(grace, w.done.clone());
    }

    /// Stops a workload (SIGTERM, then SIGKILL after `grace` or the
    /// workload's own grace period) and waits until it has ended.
    pub async fn stop(
        &self,
        allocation_id: &str,
        grace: Option<Duration>,
    ) -> Result<WorkloadStatus, SupervisorError> {
        let done = {
            let mut st = self.lock();
            let w = st
                .workloads
                .get_mut(allocation_id)
                .ok_or_else(|| SupervisorError::NotFound(allocation_id.to_string()))?;
            self.request_stop(w, grace)
        };
        self.wait_done(allocation_id, done).await
    }
}
