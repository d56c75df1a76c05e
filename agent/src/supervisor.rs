//! The workload manager: starts allocations as processes, reaps them, stops
//! them, and reports every state change. Shared by the controller uplink
//! (through `reconcile`) and the local `Agent` API (through `run_local`).
//!
//! Processes run without a shell, in their own process group (so a stop
//! reaches every process the workload started), with a cleared environment,
//! and write stdout and stderr to one `output.log` per allocation.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use gpufleet_proto::v1::{Allocation, DesiredState, LogChunk, WorkloadState, WorkloadStatus};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{broadcast, watch};
use tracing::{debug, info, warn};

use crate::backend::GpuBackend;

/// Largest log chunk one read returns.
pub const MAX_LOG_CHUNK: u32 = 1024 * 1024;
/// PATH given to every workload (the agent's own PATH is not inherited).
pub const WORKLOAD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const EVENT_CAPACITY: usize = 1024;

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

/// Checks that an allocation id is safe as one path component:
/// `[A-Za-z0-9._-]{1,128}` and not `.` or `..`.
pub fn validate_allocation_id(id: &str) -> Result<(), SupervisorError> {
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if id.is_empty() || id.len() > 128 || !ok_chars || id == "." || id == ".." {
        return Err(invalid(
            "allocation_id",
            format!("{id:?} must be 1-128 characters of A-Z a-z 0-9 . _ - and not . or .."),
        ));
    }
    Ok(())
}

fn is_terminal(state: WorkloadState) -> bool {
    matches!(
        state,
        WorkloadState::Succeeded
            | WorkloadState::Failed
            | WorkloadState::Stopped
            | WorkloadState::Lost
    )
}

struct Workload {
    allocation: Allocation,
    source: Source,
    state: WorkloadState,
    pid: u32,
    exit_code: Option<i32>,
    signal: Option<i32>,
    message: String,
    started_at: Option<SystemTime>,
    finished_at: Option<SystemTime>,
    stop_requested: bool,
    /// Becomes true once the workload is terminal.
    done: watch::Receiver<bool>,
}

impl Workload {
    fn status(&self) -> WorkloadStatus {
        WorkloadStatus {
            allocation_id: self.allocation.allocation_id.clone(),
            job_id: self.allocation.job_id.clone(),
            task_index: self.allocation.task_index,
            state: self.state as i32,
            exit_code: self.exit_code,
            signal: self.signal,
            message: self.message.clone(),
            pid: self.pid,
            gpu_uuids: self.allocation.gpu_uuids.clone(),
            started_at: self.started_at.map(prost_types::Timestamp::from),
            finished_at: self.finished_at.map(prost_types::Timestamp::from),
        }
    }

    fn terminal(&self) -> bool {
        is_terminal(self.state)
    }
}

#[derive(Default)]
struct State {
    workloads: HashMap<String, Workload>,
    applied_generation: u64,
    /// The busy set the backend was last told.
    busy: HashSet<String>,
    shutting_down: bool,
}

struct Inner {
    /// (uid, gid) workloads run as; `None`: the agent's own.
    run_as: std::sync::OnceLock<(u32, u32)>,
    data_dir: PathBuf,
    node_gpus: Vec<String>,
    default_grace: Duration,
    backend: Arc<dyn GpuBackend>,
    state: Mutex<State>,
    events: broadcast::Sender<WorkloadStatus>,
}

/// Handle to the workload manager; cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("data_dir", &self.inner.data_dir)
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// `data_dir/allocations/<id>/` holds each workload's files.
    /// Workloads started from now on run as `uid`/`gid` (the agent must be
    /// root). Set once, at start.
    pub fn run_as(&self, uid: u32, gid: u32) {
        let _ = self.inner.run_as.set((uid, gid));
    }

    pub fn new(backend: Arc<dyn GpuBackend>, data_dir: PathBuf, default_grace: Duration) -> Self {
        let node_gpus = backend.gpus().into_iter().map(|g| g.uuid).collect();
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Self {
            inner: Arc::new(Inner {
                run_as: std::sync::OnceLock::new(),
                data_dir,
                node_gpus,
                default_grace,
                backend,
                state: Mutex::new(State::default()),
                events,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update below leaves State consistent before it can panic, so
        // a poisoned lock still holds usable data.
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

    /// Directory of one allocation's files.
    pub fn allocation_dir(&self, allocation_id: &str) -> PathBuf {
        self.inner.data_dir.join("allocations").join(allocation_id)
    }

    /// Path of one allocation's combined stdout/stderr log.
    pub fn log_path(&self, allocation_id: &str) -> PathBuf {
        self.allocation_dir(allocation_id).join("output.log")
    }

    /// Starts a workload for the local API. Unlike the controller path, bad
    /// requests are refused rather than recorded as failed workloads. An
    /// empty allocation id gets `local-<uuid>`.
    pub fn run_local(&self, mut allocation: Allocation) -> Result<WorkloadStatus, SupervisorError> {
        if allocation.allocation_id.is_empty() {
            allocation.allocation_id = format!("local-{}", uuid::Uuid::new_v4());
        }
        validate_allocation_id(&allocation.allocation_id)?;
        let argv = allocation
            .workload
            .as_ref()
            .map(|w| w.argv.as_slice())
            .unwrap_or_default();
        if argv.first().is_none_or(|a| a.is_empty()) {
            return Err(invalid("workload.argv", "must name a program to run"));
        }
        let mut seen = HashSet::new();
        for uuid in &allocation.gpu_uuids {
            if !seen.insert(uuid) {
                return Err(invalid("gpu_uuids", format!("{uuid} is listed twice")));
            }
            self.check_known_gpu(uuid)?;
        }
        let mut st = self.lock();
        if st.shutting_down {
            return Err(SupervisorError::ShuttingDown);
        }
        if st.workloads.contains_key(&allocation.allocation_id) {
            return Err(SupervisorError::AlreadyExists(allocation.allocation_id));
        }
        for (id, w) in &st.workloads {
            if w.terminal() {
                continue;
            }
            if let Some(uuid) = allocation
                .gpu_uuids
                .iter()
                .find(|u| w.allocation.gpu_uuids.contains(u))
            {
                return Err(SupervisorError::GpuBusy {
                    uuid: uuid.clone(),
                    holder: id.clone(),
                });
            }
        }
        let id = allocation.allocation_id.clone();
        self.start_locked(&mut st, allocation, Source::Local, None);
        let status = st.workloads.get(&id).map(Workload::status);
        status.ok_or(SupervisorError::NotFound(id))
    }

    fn check_known_gpu(&self, uuid: &str) -> Result<(), SupervisorError> {
        if self.inner.node_gpus.iter().any(|g| g == uuid) {
            Ok(())
        } else {
            Err(invalid(
                "gpu_uuids",
                format!(
                    "{uuid} is not a GPU of this node (its GPUs: {})",
                    if self.inner.node_gpus.is_empty() {
                        "none".to_string()
                    } else {
                        self.inner.node_gpus.join(", ")
                    }
                ),
            ))
        }
    }

    /// Applies the controller's desired state: starts what is missing, stops
    /// controller workloads no longer listed, and forgets finished ones no
    /// longer listed. Finished allocations are never restarted. Older
    /// generations are ignored; re-applying the same one is harmless.
    pub fn reconcile(&self, desired: &DesiredState) {
        let mut st = self.lock();
        if st.shutting_down {
            return;
        }
        if desired.generation < st.applied_generation {
            debug!(
                generation = desired.generation,
                applied = st.applied_generation,
                "ignoring an older desired state"
            );
            return;
        }
        st.applied_generation = desired.generation;
        let wanted: HashSet<&str> = desired
            .allocations
            .iter()
            .map(|a| a.allocation_id.as_str())
            .collect();
        for allocation in &desired.allocations {
            match st.workloads.get(&allocation.allocation_id) {
                None => {
                    let validation = self.validate_controller_allocation(allocation);
                    self.start_locked(
                        &mut st,
                        allocation.clone(),
                        Source::Controller,
                        validation.err(),
                    );
                }
                Some(w) if w.source == Source::Local => warn!(
                    allocation_id = %allocation.allocation_id,
                    "the controller wants an allocation id already used by a local workload; ignoring it"
                ),
                Some(_) => {}
            }
        }
        // A finished workload's final status was emitted when it finished,
        // i.e. before this desired state arrived, so forgetting it loses
        // nothing the uplink has not already queued or sent in a hello.
        let mut forget = Vec::new();
        let mut stops = Vec::new();
        for (id, w) in &st.workloads {
            if w.source != Source::Controller || wanted.contains(id.as_str()) {
                continue;
            }
            if w.terminal() {
                forget.push(id.clone());
            } else {
                stops.push(id.clone());
            }
        }
        for id in forget {
            st.workloads.remove(&id);
        }
        for id in stops {
            if let Some(w) = st.workloads.get_mut(&id) {
                info!(allocation_id = %id, "stopping a workload the controller no longer wants");
                self.request_stop(w, None);
            }
        }
    }

    /// Controller allocations are authoritative, but one we cannot run is
    /// recorded as FAILED with the reason, so the controller learns why.
    fn validate_controller_allocation(&self, allocation: &Allocation) -> Result<(), String> {
        validate_allocation_id(&allocation.allocation_id).map_err(|e| e.to_string())?;
        let argv = allocation
            .workload
            .as_ref()
            .map(|w| w.argv.as_slice())
            .unwrap_or_default();
        if argv.first().is_none_or(|a| a.is_empty()) {
            return Err("invalid workload.argv: must name a program to run".into());
        }
        for uuid in &allocation.gpu_uuids {
            self.check_known_gpu(uuid).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Records the workload and, unless `rejected`, spawns it. Always ends
    /// with the workload in the map and its status emitted.
    fn start_locked(
        &self,
        st: &mut State,
        allocation: Allocation,
        source: Source,
        rejected: Option<String>,
    ) {
        let id = allocation.allocation_id.clone();
        let (done_tx, done_rx) = watch::channel(false);
        let mut w = Workload {
            allocation,
            source,
            state: WorkloadState::Starting,
            pid: 0,
            exit_code: None,
            signal: None,
            message: String::new(),
            started_at: None,
            finished_at: None,
            stop_requested: false,
            done: done_rx,
        };
        let spawned = match rejected {
            Some(reason) => Err(reason),
            None => self.spawn(&w.allocation),
        };
        match spawned {
            Ok(child) => {
                w.pid = child.id().unwrap_or(0);
                w.state = WorkloadState::Running;
                w.started_at = Some(SystemTime::now());
                info!(allocation_id = %id, pid = w.pid, gpus = ?w.allocation.gpu_uuids, "workload started");
                let this = self.clone();
                let reap_id = id.clone();
                tokio::spawn(async move {
                    let mut child = child;
                    let result = child.wait().await;
                    this.on_exit(&reap_id, result);
                    let _ = done_tx.send(true);
                });
            }
            Err(reason) => {
                warn!(allocation_id = %id, %reason, "workload could not start");
                w.state = WorkloadState::Failed;
                w.message = reason;
                w.finished_at = Some(SystemTime::now());
                let _ = done_tx.send(true);
            }
        }
        let status = w.status();
        st.workloads.insert(id, w);
        self.emit(st, status);
    }

    /// Spawns the process; the error is a message for the workload status
    /// (also written to its log when the log could be opened).
    fn spawn(&self, allocation: &Allocation) -> Result<tokio::process::Child, String> {
        let id = &allocation.allocation_id;
        let dir = self.allocation_dir(id);
        std::fs::create_dir_all(&dir).map_err(|e| {
            format!(
                "cannot create the allocation directory {}: {e}",
                dir.display()
            )
        })?;
        if let Some(&(uid, gid)) = self.inner.run_as.get() {
            // The workload's HOME and default working directory.
            nix::unistd::chown(
                &dir,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .map_err(|e| {
                format!(
                    "cannot hand the allocation directory {} to uid {uid}: {e}",
                    dir.display()
                )
            })?;
        }
        let log_path = dir.join("output.log");
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open the log file {}: {e}", log_path.display()))?;
        let fail = |log: &mut std::fs::File, message: String| {
            let _ = writeln!(log, "gpufleet-agent: {message}");
            message
        };
        let default_spec = Default::default();
        let spec = allocation.workload.as_ref().unwrap_or(&default_spec);
        let Some(program) = spec.argv.first() else {
            return Err(fail(&mut log, "workload.argv is empty".into()));
        };
        let working_dir = if spec.working_dir.is_empty() {
            dir.clone()
        } else {
            PathBuf::from(&spec.working_dir)
        };
        if !working_dir.is_dir() {
            return Err(fail(
                &mut log,
                format!("working directory {} does not exist", working_dir.display()),
            ));
        }
        let stderr = log
            .try_clone()
            .map_err(|e| fail(&mut log, format!("cannot share the log file: {e}")))?;
        let gpus = allocation.gpu_uuids.join(",");
        let search_path = spec.env.get("PATH").map_or(WORKLOAD_PATH, String::as_str);
        let mut cmd = tokio::process::Command::new(resolve_program(program, search_path));
        cmd.arg0(program)
            .args(&spec.argv[1..])
            .process_group(0)
            .env_clear()
            .env("PATH", WORKLOAD_PATH)
            .env("HOME", &dir)
            .envs(&spec.env)
            // Set after the job's env so a job cannot escape its GPUs.
            .env("CUDA_VISIBLE_DEVICES", &gpus)
            .env("NVIDIA_VISIBLE_DEVICES", &gpus)
            .env("GPUFLEET_JOB_ID", &allocation.job_id)
            .env("GPUFLEET_TASK_INDEX", allocation.task_index.to_string())
            .env("GPUFLEET_ALLOCATION_ID", id)
            .current_dir(&working_dir)
            .stdin(Stdio::null())
            // One file for both, like 2>&1; no pipes, so a workload never
            // blocks on the agent draining its output.
            .stdout(Stdio::from(stderr))
            .stderr(Stdio::from(
                log.try_clone()
                    .map_err(|e| format!("cannot share the log file: {e}"))?,
            ))
            // Safety net if the agent's runtime goes away without a shutdown.
            .kill_on_drop(true);
        if let Some(&(uid, gid)) = self.inner.run_as.get() {
            // std drops supplementary groups when it switches users.
            cmd.uid(uid).gid(gid);
        }
        cmd.spawn()
            .map_err(|e| fail(&mut log, format!("cannot start {program:?}: {e}")))
    }

    fn on_exit(&self, id: &str, result: std::io::Result<std::process::ExitStatus>) {
        let mut st = self.lock();
        let Some(w) = st.workloads.get_mut(id) else {
            return;
        };
        w.finished_at = Some(SystemTime::now());
        match result {
            Ok(status) => {
                w.exit_code = status.code();
                w.signal = status.signal();
                (w.state, w.message) = match (w.stop_requested, status.code(), status.signal()) {
                    (true, _, Some(sig)) => (
                        WorkloadState::Stopped,
                        format!("stopped (signal {})", signal_name(sig)),
                    ),
                    (true, _, _) => (WorkloadState::Stopped, "stopped".to_string()),
                    (false, Some(0), _) => (WorkloadState::Succeeded, String::new()),
                    (false, Some(code), _) => {
                        (WorkloadState::Failed, format!("exited with code {code}"))
                    }
                    (false, None, Some(sig)) => (
                        WorkloadState::Failed,
                        format!("killed by signal {}", signal_name(sig)),
                    ),
                    (false, None, None) => (
                        WorkloadState::Failed,
                        "ended for an unknown reason".to_string(),
                    ),
                };
            }
            Err(e) => {
                w.state = WorkloadState::Failed;
                w.message = format!("cannot wait for the process: {e}");
            }
        }
        info!(allocation_id = %id, state = ?w.state, exit_code = ?w.exit_code, signal = ?w.signal, "workload ended");
        let pid = w.pid;
        let status = w.status();
        self.emit(&mut st, status);
        drop(st);
        // The workload ends with its leader: kill anything it left behind in
        // its process group. The group id stays reserved while members live,
        // so this cannot hit an unrelated process group.
        if pid > 0 {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }

    /// Publishes a status and tells the backend when the busy GPUs changed.
    fn emit(&self, st: &mut State, status: WorkloadStatus) {
        // No receivers is fine: the uplink may be between sessions.
        let _ = self.inner.events.send(status);
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

    /// Sends SIGTERM to the workload's process group and SIGKILL after the
    /// grace period. Returns a receiver that turns true once it has ended.
    fn request_stop(&self, w: &mut Workload, grace: Option<Duration>) -> watch::Receiver<bool> {
        if !w.terminal() && !w.stop_requested && w.pid > 0 {
            w.stop_requested = true;
            let grace = grace
                .filter(|g| !g.is_zero())
                .or_else(|| {
                    w.allocation
                        .workload
                        .as_ref()
                        .map(|s| Duration::from_secs(u64::from(s.stop_grace_period_seconds)))
                        .filter(|g| !g.is_zero())
                })
                .unwrap_or(self.inner.default_grace);
            let pgid = Pid::from_raw(w.pid as i32);
            debug!(allocation_id = %w.allocation.allocation_id, ?grace, "sending SIGTERM");
            let _ = killpg(pgid, Signal::SIGTERM);
            let mut done = w.done.clone();
            let id = w.allocation.allocation_id.clone();
            tokio::spawn(async move {
                let exited = tokio::time::timeout(grace, done.wait_for(|d| *d)).await;
                if exited.is_err() {
                    info!(allocation_id = %id, "grace period over; sending SIGKILL");
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
            });
        }
        w.done.clone()
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

    /// Reads up to `max_bytes` (0 or more than 1 MiB means 1 MiB) of a
    /// workload's log from `offset`. `eof` is set when the workload has
    /// ended and the chunk reaches the end of the file. Logs of workloads
    /// already forgotten stay readable while their file exists.
    pub async fn read_log(
        &self,
        allocation_id: &str,
        offset: u64,
        max_bytes: u32,
    ) -> Result<LogChunk, SupervisorError> {
        validate_allocation_id(allocation_id)?;
        // Terminal is read before the file, so a terminal workload's file
        // is already complete when we measure it.
        let known = {
            let st = self.lock();
            st.workloads
                .get(allocation_id)
                .map(|w| (w.terminal(), w.allocation.task_index))
        };
        let (terminal, task_index) = known.unwrap_or((true, 0));
        let max = if max_bytes == 0 {
            MAX_LOG_CHUNK
        } else {
            max_bytes.min(MAX_LOG_CHUNK)
        };
        let path = self.log_path(allocation_id);
        let mut chunk = LogChunk {
            allocation_id: allocation_id.to_string(),
            offset,
            data: Vec::new(),
            eof: false,
            task_index,
        };
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if known.is_none() {
                    return Err(SupervisorError::NotFound(allocation_id.to_string()));
                }
                // Known but never got a log (rejected before spawning).
                chunk.eof = terminal;
                return Ok(chunk);
            }
            Err(source) => {
                return Err(SupervisorError::Log {
                    id: allocation_id.to_string(),
                    source,
                });
            }
        };
        let log_err = |source| SupervisorError::Log {
            id: allocation_id.to_string(),
            source,
        };
        let len = file.metadata().await.map_err(log_err)?.len();
        if offset < len {
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(log_err)?;
            let want = (len - offset).min(u64::from(max));
            file.take(want)
                .read_to_end(&mut chunk.data)
                .await
                .map_err(log_err)?;
        }
        chunk.eof = terminal && offset + chunk.data.len() as u64 >= len;
        Ok(chunk)
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

/// A bare program name looked up in the workload's PATH here rather than
/// by exec: std can then start it with posix_spawn (vfork) instead of
/// fork, which copies the agent's page tables and makes every page it
/// writes until the exec a copy-on-write fault. A name not found, or a
/// PATH entry relative to the workload's directory (empty or not starting
/// with `/`) reached first, leaves the name to exec, as before.
fn resolve_program(program: &str, search_path: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return PathBuf::from(program);
    }
    for dir in search_path.split(':') {
        if !dir.starts_with('/') {
            break;
        }
        let candidate = Path::new(dir).join(program);
        if std::fs::metadata(&candidate)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        {
            return candidate;
        }
    }
    PathBuf::from(program)
}

fn signal_name(sig: i32) -> String {
    match Signal::try_from(sig) {
        Ok(s) => format!("{sig} ({})", s.as_str()),
        Err(_) => sig.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, name: &str, mode: u32) -> std::io::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, "#!/bin/sh\n")?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        Ok(path)
    }

    #[test]
    fn bare_names_resolve_to_the_first_executable_in_the_search_path() -> std::io::Result<()> {
        let first = tempfile::tempdir()?;
        let second = tempfile::tempdir()?;
        let tool = file(first.path(), "tool", 0o755)?;
        file(second.path(), "tool", 0o755)?;
        file(first.path(), "notes", 0o644)?;
        let search = format!(
            "/nonexistent:{}:{}",
            first.path().display(),
            second.path().display()
        );
        assert_eq!(resolve_program("tool", &search), tool);
        // Not executable, or nowhere: left for exec to report.
        assert_eq!(resolve_program("notes", &search), PathBuf::from("notes"));
        assert_eq!(
            resolve_program("missing", &search),
            PathBuf::from("missing")
        );
        // A path is never searched.
        assert_eq!(resolve_program("./tool", &search), PathBuf::from("./tool"));
        // A relative entry first (empty = the workload's directory): exec decides.
        let relative_first = format!("/nonexistent::{}", first.path().display());
        assert_eq!(
            resolve_program("tool", &relative_first),
            PathBuf::from("tool")
        );
        let relative_dir = format!("bin:{}", first.path().display());
        assert_eq!(
            resolve_program("tool", &relative_dir),
            PathBuf::from("tool")
        );
        Ok(())
    }
}
