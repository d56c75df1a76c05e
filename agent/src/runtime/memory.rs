//! An in-memory [`WorkloadRuntime`] for tests: nothing is executed.
//! Launches succeed at once (or fail, when told to) and their workloads
//! run until the test ends them ([`MemoryRuntime::finish`]) or the
//! supervisor stops or kills them; every call is recorded for assertions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::{
    Adoption, BoxFuture, Ended, Exit, Found, LaunchControl, LaunchError, LaunchRequest, Launched,
    OnStarted, RunningWorkload, WorkloadRuntime,
};

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;

#[derive(Debug, Default)]
struct Calls {
    launched: Vec<LaunchRequest>,
    stopped: Vec<(String, Duration)>,
    forgotten: Vec<String>,
    running: HashMap<String, Arc<MemoryWorkload>>,
    /// Allocation id → the message its launch fails with.
    failing: HashMap<String, String>,
    /// Told to the supervisor as progress during every launch.
    progress: Vec<String>,
    /// Handed out by the next `adopt`.
    leftovers: Vec<Found>,
    next_pid: u32,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct MemoryRuntime {
    calls: Arc<Mutex<Calls>>,
}

impl MemoryRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    fn calls(&self) -> MutexGuard<'_, Calls> {
        lock(&self.calls)
    }

    /// The allocation ids launched so far, in order.
    pub fn launched(&self) -> Vec<String> {
        let calls = self.calls();
        calls
            .launched
            .iter()
            .map(|r| r.allocation_id().to_string())
            .collect()
    }

    /// The launch requests so far, in order.
    pub fn launch_requests(&self) -> Vec<LaunchRequest> {
        self.calls().launched.clone()
    }

    /// The allocation ids asked to stop, with their grace periods.
    pub fn stopped(&self) -> Vec<(String, Duration)> {
        self.calls().stopped.clone()
    }

    /// The allocation ids forgotten so far, in order.
    pub fn forgotten(&self) -> Vec<String> {
        self.calls().forgotten.clone()
    }

    /// Makes the launch of `allocation_id` fail with `message`.
    pub fn fail_launch(&self, allocation_id: &str, message: &str) {
        self.calls()
            .failing
            .insert(allocation_id.to_string(), message.to_string());
    }

    /// Reports these steps as progress during every launch.
    pub fn report_progress(&self, steps: &[&str]) {
        self.calls().progress = steps.iter().map(|s| s.to_string()).collect();
    }

    /// What the next [`WorkloadRuntime::adopt`] finds.
    pub fn leave_behind(&self, found: Vec<Found>) {
        self.calls().leftovers = found;
    }

    /// Ends a running workload with `exit_code`; false if none runs.
    pub fn finish(&self, allocation_id: &str, exit_code: i32) -> bool {
        let Some(workload) = self.calls().running.remove(allocation_id) else {
            return false;
        };
        workload.end(Some(exit_code), None);
        true
    }
}

impl WorkloadRuntime for MemoryRuntime {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn launch(
        &self,
        request: &LaunchRequest,
        control: &dyn LaunchControl,
    ) -> Result<Launched, LaunchError> {
        let (progress, failure) = {
            let mut calls = self.calls();
            calls.launched.push(request.clone());
            (
                calls.progress.clone(),
                calls.failing.get(request.allocation_id()).cloned(),
            )
        };
        for step in &progress {
            control.progress(step);
        }
        if control.withdrawn() {
            return Err(LaunchError::Withdrawn);
        }
        if let Some(message) = failure {
            return Err(LaunchError::Failed(message));
        }
        let mut calls = self.calls();
        calls.next_pid += 1;
        let pid = 10_000 + calls.next_pid;
        let workload = Arc::new(MemoryWorkload {
            id: request.allocation_id().to_string(),
            calls: Arc::downgrade(&self.calls),
            ended: watch::channel(None).0,
        });
        calls
            .running
            .insert(request.allocation_id().to_string(), workload.clone());
        Ok(Launched {
            workload,
            pid,
            started_at: SystemTime::now(),
        })
    }

    fn adopt(&self, known: &dyn Fn(&str) -> bool) -> Adoption {
        let leftovers = std::mem::take(&mut self.calls().leftovers);
        Adoption {
            found: leftovers
                .into_iter()
                .filter(|f| !known(&f.allocation.allocation_id))
                .collect(),
            unreadable: Vec::new(),
        }
    }

    fn forget(&self, allocation_id: &str) -> std::io::Result<()> {
        self.calls().forgotten.push(allocation_id.to_string());
        Ok(())
    }
}

fn lock(calls: &Mutex<Calls>) -> MutexGuard<'_, Calls> {
    calls.lock().unwrap_or_else(|e| e.into_inner())
}

/// A workload of the [`MemoryRuntime`]: runs until ended.
#[derive(Debug)]
pub struct MemoryWorkload {
    id: String,
    calls: std::sync::Weak<Mutex<Calls>>,
    ended: watch::Sender<Option<Ended>>,
}

impl MemoryWorkload {
    fn end(&self, exit_code: Option<i32>, signal: Option<i32>) {
        if let Some(calls) = self.calls.upgrade() {
            lock(&calls).running.remove(&self.id);
        }
        self.ended.send_if_modified(|ended| {
            if ended.is_some() {
                return false;
            }
            *ended = Some(Ended::Exited(Exit {
                exit_code,
                signal,
                start_error: None,
                finished_at: SystemTime::now(),
            }));
            true
        });
    }
}

impl RunningWorkload for MemoryWorkload {
    /// Ends it at once, as if SIGTERM killed it.
    fn stop(&self, grace: Duration, _ended: watch::Receiver<bool>) {
        if let Some(calls) = self.calls.upgrade() {
            lock(&calls).stopped.push((self.id.clone(), grace));
        }
        self.end(None, Some(SIGTERM));
    }

    fn kill(&self) {
        self.end(None, Some(SIGKILL));
    }

    fn wait(self: Arc<Self>, _on_started: OnStarted) -> BoxFuture<Ended> {
        let mut ended = self.ended.subscribe();
        Box::pin(async move {
            // Keeps the sender alive until it has ended.
            let _this = self;
            match ended.wait_for(Option::is_some).await {
                Ok(ended) => ended
                    .clone()
                    .unwrap_or_else(|| Ended::Lost("never ended".into())),
                Err(_) => Ended::Lost("the memory runtime went away".into()),
            }
        })
    }
}
