//! Launching an admitted workload through the runtime, off the state lock
//! and at most `max_concurrent_starts` at a time, then watching it until it
//! ends.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use gpufleet_proto::v1::{Allocation, WorkloadState};
use tokio::sync::watch;
use tracing::{info, warn};

use super::admission::Admitted;
use super::workload::awaits_port;
use super::{Source, Supervisor};
use crate::runtime::{Ended, LaunchControl, LaunchError, LaunchRequest, Launched, RunningWorkload};

/// What a start task does once it holds a start permit.
enum Launch {
    Go,
    /// Stopped while it waited: end it without starting anything.
    Withdrawn,
    /// The agent is detaching (or the workload is gone): start nothing.
    Abandon,
}

/// Counts one launch in progress for [`Supervisor::detach`] until dropped.
struct LaunchInProgress<'a>(&'a watch::Sender<usize>);

impl Drop for LaunchInProgress<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// What the runtime may ask of the supervisor during one launch.
struct Control<'a> {
    supervisor: &'a Supervisor,
    id: &'a str,
}

impl LaunchControl for Control<'_> {
    fn withdrawn(&self) -> bool {
        self.supervisor.stop_requested(self.id)
    }

    fn progress(&self, message: &str) {
        self.report(false, message);
    }

    fn pulling(&self, message: &str) {
        self.report(true, message);
    }
}

impl Control<'_> {
    /// Publishes a launch step as the `Starting` (or `Pulling`) status.
    fn report(&self, pulling: bool, message: &str) {
        let mut st = self.supervisor.lock();
        let Some(w) = st.workloads.get_mut(self.id) else {
            return;
        };
        if w.state != WorkloadState::Starting || (w.message == message && w.pulling == pulling) {
            return;
        }
        w.message = gpufleet_core::limits::escape_unsafe(message).into_owned();
        w.pulling = pulling;
        let status = w.status();
        self.supervisor.emit(&mut st, status);
    }
}

impl Supervisor {
    /// Starts an admitted workload on a task of its own: waits for a start
    /// permit, runs the runtime's launch on a blocking thread, then records
    /// how the start went. Starts run concurrently and never under the
    /// state lock, so one slow launch holds up neither the others nor the
    /// uplink. The task is not cancelled when the returned handle is
    /// dropped.
    pub(super) fn spawn_start(
        &self,
        allocation: Allocation,
        source: Source,
        admitted: Admitted,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        let Admitted {
            done,
            stop_while_queued,
            port_known,
        } = admitted;
        tokio::spawn(async move {
            let id = allocation.allocation_id.clone();
            let mut allocation = allocation;
            // A gang rank other than 0 holds its launch until a desired
            // state brings rank 0's port (level-triggered: any later one).
            while awaits_port(&allocation) {
                tokio::select! {
                    () = port_known.notified() => {}
                    () = stop_while_queued.notified() => {
                        this.finish_start(&id, Err(LaunchError::Withdrawn), &done);
                        return;
                    }
                }
                match this.lock().workloads.get(&id) {
                    Some(w) => allocation = w.allocation.clone(),
                    None => return,
                }
            }
            let permits = this.inner.start_permits.clone();
            let permit = tokio::select! {
                // Never closed, so only `Ok`.
                permit = permits.acquire_owned() => permit.ok(),
                () = stop_while_queued.notified() => None,
            };
            let Some(permit) = permit else {
                this.finish_start(&id, Err(LaunchError::Withdrawn), &done);
                return;
            };
            match this.begin_launch(&id) {
                Launch::Go => {}
                Launch::Withdrawn => {
                    this.finish_start(&id, Err(LaunchError::Withdrawn), &done);
                    return;
                }
                Launch::Abandon => return,
            }
            let _in_progress = LaunchInProgress(&this.inner.launching);
            let launcher = this.clone();
            let launched = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let request = launcher.launch_request(allocation, source);
                let control = Control {
                    supervisor: &launcher,
                    id: request.allocation_id(),
                };
                launcher.inner.runtime.launch(&request, &control)
            })
            .await
            .unwrap_or_else(|e| {
                Err(LaunchError::Failed(format!(
                    "starting the workload failed unexpectedly: {e}"
                )))
            });
            this.finish_start(&id, launched, &done);
        })
    }

    /// Decides, under the lock, whether a start that got its permit goes
    /// ahead; counts it as in progress when it does.
    fn begin_launch(&self, id: &str) -> Launch {
        let mut st = self.lock();
        let shutting_down = st.shutting_down;
        match st.workloads.get_mut(id) {
            Some(w) if w.stop_requested => Launch::Withdrawn,
            Some(w) if !shutting_down => {
                w.reached_runtime = true;
                self.inner.launching.send_modify(|n| *n += 1);
                Launch::Go
            }
            _ => Launch::Abandon,
        }
    }

    /// What the runtime is asked to run for `allocation`.
    fn launch_request(&self, allocation: Allocation, source: Source) -> LaunchRequest {
        let id = &allocation.allocation_id;
        let allocation_dir = self.allocation_dir(id);
        let log_path = self.log_path(id);
        let spec = allocation.workload.clone().unwrap_or_default();
        let mut env: Vec<(String, String)> = spec.env.into_iter().collect();
        env.sort();
        if let Some(gang) = &allocation.gang {
            env = crate::gang::with_rendezvous_env(env, gang);
        }
        LaunchRequest {
            local: source == Source::Local,
            argv: spec.argv,
            env,
            working_dir: (!spec.working_dir.is_empty()).then(|| PathBuf::from(spec.working_dir)),
            run_as: self.inner.run_as.get().copied(),
            gpu_uuids: allocation.gpu_uuids.clone(),
            gpu_env: self.inner.settings.gpu_sharing.env(&allocation),
            allocation_dir,
            log_path,
            log_max_bytes: self.inner.settings.log_max_bytes,
            allocation,
        }
    }

    /// Records how a start went and publishes the status: running (and
    /// watched from now on), failed, or stopped before it started. A stop
    /// that came during the start is carried out now.
    fn finish_start(
        &self,
        id: &str,
        launched: Result<Launched, LaunchError>,
        done: &watch::Sender<bool>,
    ) {
        let mut st = self.lock();
        let Some(w) = st.workloads.get_mut(id) else {
            // Starting workloads are never forgotten; were one, it must not
            // run on unwatched.
            if let Ok(launched) = launched {
                launched.workload.kill();
            }
            return;
        };
        match launched {
            Ok(launched) => {
                w.pid = launched.pid;
                w.running = Some(launched.workload.clone());
                w.state = WorkloadState::Running;
                w.message.clear();
                w.started_at = Some(launched.started_at);
                info!(allocation_id = %id, pid = w.pid, runtime = self.inner.runtime.name(), gpus = ?w.allocation.gpu_uuids, "workload started");
                self.watch_until_ended(id, launched.workload, done.clone());
                if w.stop_requested {
                    info!(allocation_id = %id, "stopping a workload asked to stop while it started");
                    self.signal_stop(w);
                }
            }
            Err(LaunchError::Withdrawn) => {
                info!(allocation_id = %id, "stopped before it started");
                w.end(WorkloadState::Stopped, "stopped before it started".into());
                let _ = done.send(true);
            }
            Err(LaunchError::Failed(reason)) => {
                warn!(allocation_id = %id, %reason, "workload could not start");
                w.end(WorkloadState::Failed, reason);
                let _ = done.send(true);
            }
        }
        let status = w.status();
        self.emit(&mut st, status);
    }

    /// Waits, on a task of its own, for a running workload to end, then
    /// records how and marks it done.
    pub(super) fn watch_until_ended(
        &self,
        id: &str,
        workload: Arc<dyn RunningWorkload>,
        done: watch::Sender<bool>,
    ) {
        let this = self.clone();
        let id = id.to_string();
        let learned = self.clone();
        let learned_id = id.clone();
        // A workload re-adopted mid-start gets its pid late.
        let on_started = Box::new(move |pid: u32, started_at: SystemTime| {
            let mut st = learned.lock();
            if let Some(w) = st.workloads.get_mut(&learned_id)
                && w.pid == 0
            {
                w.pid = pid;
                w.started_at = Some(started_at);
            }
        });
        tokio::spawn(async move {
            let ended = workload.wait(on_started).await;
            this.on_exit(&id, ended);
            let _ = done.send(true);
        });
    }

    /// Ends a workload as its runtime says it ended.
    fn on_exit(&self, id: &str, ended: Ended) {
        let mut st = self.lock();
        let Some(w) = st.workloads.get_mut(id) else {
            return;
        };
        if w.terminal() {
            return;
        }
        match ended {
            Ended::Exited(exit) => w.apply_exit(&exit),
            Ended::Lost(message) => w.end(WorkloadState::Lost, message),
        }
        info!(allocation_id = %id, state = ?w.state, exit_code = ?w.exit_code, signal = ?w.signal, message = %w.message, "workload ended");
        let status = w.status();
        self.emit(&mut st, status);
    }
}
