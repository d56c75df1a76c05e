//! The workload manager: decides which allocations run on this node,
//! drives a [`WorkloadRuntime`] to run them, and reports every state
//! change. Shared by the controller uplink (through `reconcile`) and the
//! local `Agent` API (through `run_local`). It never knows which runtime
//! runs a workload; the default is [`ProcessRuntime`] (processes under
//! shims that outlive the agent).
//!
//! Starts run concurrently, each on a task of its own and never under the
//! state lock: a workload is `Starting` until its runtime reports it
//! running (or it fails), and a stop that comes meanwhile is carried out
//! once the start settles. [`Supervisor::recover`] re-adopts, after an
//! agent restart, the workloads the runtime still runs and reports how the
//! others ended.
//!
//! The files, one job each: `admission` (what may run: the local API's
//! requests and the controller's desired state, reconciled), `start`
//! (launching an admitted workload and watching it end), `workload` (one
//! workload's state machine and status), `stop` (stop requests and grace
//! periods), `recovery` (adoption after a restart), `logs` (log reads);
//! this file holds the shared state and the queries.

mod admission;
mod interrupt;
pub use self::interrupt::{INTERRUPT_FILE, Interruption};
mod enforce;
mod mig_layout;

pub use mig_layout::LayoutOutcome;
mod logs;
mod recovery;
mod start;
mod stop;
#[cfg(test)]
mod tests;
mod workload;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use gpufleet_proto::v1::{WorkloadState, WorkloadStatus};
use tokio::sync::{Semaphore, broadcast, watch};

use crate::backend::GpuBackend;
use crate::runtime::WorkloadRuntime;
use crate::runtime::process::ProcessRuntime;
use crate::sharing::GpuSharing;
use crate::workload_store as store;
use workload::Workload;

pub use crate::runtime::process::{ShimLaunch, WORKLOAD_PATH};
pub use admission::validate_allocation_id;
pub use logs::MAX_LOG_CHUNK;
pub use recovery::Recovery;

const EVENT_CAPACITY: usize = 1024;
/// Default cap on one allocation's `output.log`.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default of [`SupervisorSettings::max_concurrent_starts`]: more than a
/// host has GPUs, so one desired state starts a full node at once.
pub const DEFAULT_MAX_CONCURRENT_STARTS: usize = 16;

/// How the supervisor runs workloads.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    /// `data_dir/allocations/<id>/` is each workload's home and log;
    /// `data_dir/workloads/<id>.records` the process runtime's records.
    pub data_dir: PathBuf,
    /// Time between SIGTERM and SIGKILL when a stop names none.
    pub default_grace: Duration,
    /// Cap on each allocation's `output.log`.
    pub log_max_bytes: u64,
    /// For the process runtime ([`Supervisor::new`]): a gpufleet agent
    /// executable (one that calls `gpufleet_agent::shim::dispatch` first thing in
    /// `main`) that runs the workloads' shims; see [`ShimLaunch`].
    pub shim_program: PathBuf,
    /// For the process runtime: how each workload's shim is started.
    pub shim_launch: ShimLaunch,
    /// Most workload starts (launches) in progress at once, at least 1;
    /// more wait their turn. Each one holds a blocking thread for its
    /// launch.
    pub max_concurrent_starts: usize,
    /// How shared GPU allocations are enforced (MPS or time-slicing).
    pub gpu_sharing: GpuSharing,
}

impl SupervisorSettings {
    /// Defaults: 10 s grace, [`DEFAULT_LOG_MAX_BYTES`], and this very
    /// executable as the shim (`/proc/self/exe`, which stays valid even when
    /// the file on disk is replaced by an upgrade).
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            default_grace: Duration::from_secs(10),
            log_max_bytes: DEFAULT_LOG_MAX_BYTES,
            shim_program: PathBuf::from("/proc/self/exe"),
            shim_launch: ShimLaunch::Host,
            max_concurrent_starts: DEFAULT_MAX_CONCURRENT_STARTS,
            gpu_sharing: GpuSharing::TimeSlicing,
        }
    }
}

/// Who asked for a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Part of the controller's desired state; `reconcile` owns it.
    Controller,
    /// Started through the local `Agent` API; `reconcile` never touches it.
    Local,
}

/// Why a request to the supervisor was refused.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("workload {0:?} not found")]
    NotFound(String),
    #[error(
        "no log for allocation {0:?} on this node: it never ran here, or it ended longer than the agent's log_retention ago (default 7d) and its directory was deleted"
    )]
    NoLog(String),
    #[error("workload {0:?} already exists")]
    AlreadyExists(String),
    #[error("GPU {uuid} is in use by workload {holder:?}")]
    GpuBusy { uuid: String, holder: String },
    #[error("cannot read the log of workload {id:?}: {source}")]
    Log { id: String, source: std::io::Error },
    #[error("the agent is shutting down")]
    ShuttingDown,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> SupervisorError {
    SupervisorError::InvalidArgument {
        field,
        reason: reason.into(),
    }
}

#[derive(Default)]
struct State {
    workloads: HashMap<String, Workload>,
    applied_generation: u64,
    /// The busy set the backend was last told.
    busy: HashSet<String>,
    shutting_down: bool,
    /// MIG layouts the controller wants (`mig_layout.rs`).
    mig_layouts: Vec<gpufleet_proto::v1::MigLayout>,
    /// Layouts the backend refused, by GPU, so the same wish is not tried
    /// every sample: (profiles, why).
    mig_refused: HashMap<String, (Vec<String>, String)>,
}

struct Inner {
    /// (uid, gid) workloads run as; `None`: the agent's own.
    run_as: std::sync::OnceLock<(u32, u32)>,
    settings: SupervisorSettings,
    backend: Arc<dyn GpuBackend>,
    runtime: Arc<dyn WorkloadRuntime>,
    state: Mutex<State>,
    events: broadcast::Sender<WorkloadStatus>,
    /// One per launch in progress ([`SupervisorSettings::max_concurrent_starts`]).
    start_permits: Arc<Semaphore>,
    /// Launches past their permit and not yet settled. Raised only under
    /// the state lock, after checking `shutting_down`, so that once that is
    /// set the count can only fall.
    launching: watch::Sender<usize>,
    /// Told when the GPU inventory changed (a MIG layout was applied), so
    /// the uplink says hello again with the new instances.
    inventory_changed: Arc<tokio::sync::Notify>,
}

/// Handle to the workload manager; cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("data_dir", &self.inner.settings.data_dir)
            .field("runtime", &self.inner.runtime.name())
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// A supervisor that runs workloads as processes under shims
    /// ([`ProcessRuntime`], configured by `settings`).
    pub fn new(backend: Arc<dyn GpuBackend>, settings: SupervisorSettings) -> Self {
        let runtime = Arc::new(ProcessRuntime::new(
            settings.data_dir.clone(),
            settings.shim_program.clone(),
            settings.shim_launch,
        ));
        Self::with_runtime(backend, settings, runtime)
    }

    /// A supervisor that runs workloads through `runtime`.
    pub fn with_runtime(
        backend: Arc<dyn GpuBackend>,
        settings: SupervisorSettings,
        runtime: Arc<dyn WorkloadRuntime>,
    ) -> Self {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let start_permits = Arc::new(Semaphore::new(settings.max_concurrent_starts.max(1)));
        Self {
            inner: Arc::new(Inner {
                run_as: std::sync::OnceLock::new(),
                settings,
                backend,
                runtime,
                state: Mutex::new(State::default()),
                events,
                start_permits,
                launching: watch::channel(0).0,
                inventory_changed: Arc::new(tokio::sync::Notify::new()),
            }),
        }
    }

    /// Workloads started from now on run as `uid`/`gid` (the agent must be
    /// root). Set once, at start.
    pub fn run_as(&self, uid: u32, gid: u32) {
        let _ = self.inner.run_as.set((uid, gid));
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves State consistent before it can panic, so a
        // poisoned lock still holds usable data.
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every status change, as it happens. A lagging receiver should re-read
    /// [`Supervisor::statuses`], which always holds the latest of each.
    pub fn subscribe(&self) -> broadcast::Receiver<WorkloadStatus> {
        self.inner.events.subscribe()
    }

    /// The status of every known workload, ordered by allocation id.
    pub fn statuses(&self) -> Vec<WorkloadStatus> {
        let st = self.lock();
        let mut all: Vec<_> = st.workloads.values().map(Workload::status).collect();
        all.sort_by(|a, b| a.allocation_id.cmp(&b.allocation_id));
        all
    }

    pub fn status(&self, allocation_id: &str) -> Option<WorkloadStatus> {
        self.lock()
            .workloads
            .get(allocation_id)
            .map(Workload::status)
    }

    /// Generation of the last desired state applied (0 = none).
    pub fn applied_generation(&self) -> u64 {
        self.lock().applied_generation
    }

    /// The agent's data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.inner.settings.data_dir
    }

    /// Directory of one allocation's files.
    pub fn allocation_dir(&self, allocation_id: &str) -> PathBuf {
        self.inner
            .settings
            .data_dir
            .join("allocations")
            .join(allocation_id)
    }

    /// Path of one allocation's combined stdout/stderr log.
    pub fn log_path(&self, allocation_id: &str) -> PathBuf {
        self.allocation_dir(allocation_id).join(store::LOG_FILE)
    }

    /// Moves allocation `id`'s directory to `to` if its workload is not
    /// running or starting here and `expired` still says so; returns
    /// whether it moved. Checked and moved under the lock, so a start of
    /// the same id cannot slip in between (a start registers its workload
    /// under the lock before it creates the directory).
    pub(crate) fn retire_allocation_dir(
        &self,
        id: &str,
        to: &std::path::Path,
        expired: impl FnOnce() -> bool,
    ) -> std::io::Result<bool> {
        let st = self.lock();
        if st.workloads.get(id).is_some_and(|w| !w.terminal()) || !expired() {
            return Ok(false);
        }
        std::fs::rename(self.allocation_dir(id), to)?;
        Ok(true)
    }

    /// Publishes a status and tells the backend when the busy GPUs changed.
    fn emit(&self, st: &mut State, status: WorkloadStatus) {
        // No receivers is fine: the uplink may be between sessions.
        let _ = self.inner.events.send(status);
        self.refresh_busy(st);
    }

    /// Tells the backend when the GPUs of unfinished workloads changed.
    fn refresh_busy(&self, st: &mut State) {
        let busy: HashSet<String> = st
            .workloads
            .values()
            .filter(|w| !w.terminal())
            .flat_map(|w| w.allocation.gpu_uuids.iter().cloned())
            .collect();
        if busy != st.busy {
            self.inner.backend.set_busy(&busy);
            st.busy = busy;
        }
    }

    /// Drops what the runtime keeps of a workload that has ended and whose
    /// status was delivered, so a restarted agent does not report it again.
    fn forget_in_runtime(&self, w: &Workload) {
        if !w.reached_runtime {
            return;
        }
        let id = &w.allocation.allocation_id;
        if let Err(e) = self.inner.runtime.forget(id) {
            tracing::warn!(allocation_id = %id, error = %e, "cannot drop the record of a finished workload");
        }
    }

    /// Waits until a workload has ended and returns its final status.
    pub async fn wait(&self, allocation_id: &str) -> Result<WorkloadStatus, SupervisorError> {
        let done = self
            .lock()
            .workloads
            .get(allocation_id)
            .map(|w| w.done.clone())
            .ok_or_else(|| SupervisorError::NotFound(allocation_id.to_string()))?;
        self.wait_done(allocation_id, done).await
    }

    async fn wait_done(
        &self,
        allocation_id: &str,
        mut done: watch::Receiver<bool>,
    ) -> Result<WorkloadStatus, SupervisorError> {
        // An error means the reaper is gone (runtime shutting down): return
        // whatever is known.
        let _ = done.wait_for(|d| *d).await;
        self.status(allocation_id)
            .ok_or_else(|| SupervisorError::NotFound(allocation_id.to_string()))
    }

    /// Whether a workload is known and has ended.
    pub fn is_terminal(&self, allocation_id: &str) -> Option<bool> {
        self.lock()
            .workloads
            .get(allocation_id)
            .map(Workload::terminal)
    }

    /// Refuses new work and leaves running workloads alone: the runtime
    /// keeps them going and the next agent start re-adopts them. Starts
    /// already handed to the runtime are waited for, so that their
    /// statuses are published; starts still waiting for their turn are
    /// dropped (the controller's desired state asks the next agent run for
    /// them again). Returns how many are left running.
    pub async fn detach(&self) -> usize {
        self.lock().shutting_down = true;
        // No launch begins once `shutting_down` is set, so this ends.
        let _ = self
            .inner
            .launching
            .subscribe()
            .wait_for(|launching| *launching == 0)
            .await;
        self.inner.runtime.detach();
        self.lock()
            .workloads
            .values()
            .filter(|w| !w.terminal() && w.state != WorkloadState::Starting)
            .count()
    }

    /// Refuses new work, stops every running workload and waits for them.
    pub async fn shutdown(&self) {
        let pending: Vec<(String, watch::Receiver<bool>)> = {
            let mut st = self.lock();
            st.shutting_down = true;
            let ids: Vec<String> = st
                .workloads
                .iter()
                .filter(|(_, w)| !w.terminal())
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| {
                    let w = st.workloads.get_mut(&id)?;
                    Some((id, self.request_stop(w, None)))
                })
                .collect()
        };
        for (id, done) in pending {
            let _ = self.wait_done(&id, done).await;
        }
    }
}
