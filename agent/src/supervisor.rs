//! The workload manager: starts allocations as processes, reaps them, stops
//! them, and reports every state change. Shared by the controller uplink
//! (through `reconcile`) and the local `Agent` API (through `run_local`).
//!
//! Processes run without a shell, in their own process group (so a stop
//! reaches every process the workload started), with a cleared environment,
//! and write stdout and stderr to one capped `output.log` per allocation.
//!
//! Starts run concurrently, each on a task of its own and never under the
//! state lock: a workload is `Starting` until its shim reports it running
//! (or it fails), and a stop that comes meanwhile is carried out once the
//! start settles.
//!
//! Each workload runs under a shim (see [`crate::shim`]), a thread of the
//! agent's shim host process ([`crate::shim`]) in a session of its
//! own, so it outlives the agent. What a restarted agent needs
//! is recorded in `data_dir/workloads/<id>.records`
//! ([`crate::workload_store`]) before a workload is reported running;
//! [`Supervisor::recover`] re-adopts the workloads still running and
//! reports how the others ended.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use gpufleet_proto::v1::{Allocation, DesiredState, LogChunk, WorkloadState, WorkloadStatus};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{Notify, Semaphore, broadcast, watch};
use tracing::{debug, info, warn};

use crate::backend::GpuBackend;
use crate::shim::protocol::{LaunchSpec, Reply};
use crate::shim::{HostError, ShimHost};
use crate::workload_store::{self as store, AgentRecord, ExitRecord, Records};

/// Largest log chunk one read returns.
pub const MAX_LOG_CHUNK: u32 = 1024 * 1024;
/// PATH given to every workload (the agent's own PATH is not inherited).
pub const WORKLOAD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const EVENT_CAPACITY: usize = 1024;
/// Default cap on one allocation's `output.log`.
pub const DEFAULT_LOG_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Default of [`SupervisorSettings::max_concurrent_starts`]: more than a
/// host has GPUs, so one desired state starts a full node at once.
pub const DEFAULT_MAX_CONCURRENT_STARTS: usize = 16;
/// Longest wait for a shim to report that its workload started.
const SHIM_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a re-adopted workload (not the agent's child) is checked.
const ADOPTED_POLL: Duration = Duration::from_millis(200);

/// How the supervisor runs workloads.
#[derive(Debug, Clone)]
pub struct SupervisorSettings {
    /// `data_dir/allocations/<id>/` is each workload's home and log;
    /// `data_dir/workloads/<id>.records` the agent's records of it.
    pub data_dir: PathBuf,
    /// Time between SIGTERM and SIGKILL when a stop names none.
    pub default_grace: Duration,
    /// Cap on each allocation's `output.log`.
    pub log_max_bytes: u64,
    /// A gpufleet agent executable (one that calls
    /// [`crate::shim::dispatch`] first thing in `main`) that runs the
    /// workloads' shims; see [`ShimLaunch`].
    pub shim_program: PathBuf,
    /// How each workload's shim is started.
    pub shim_launch: ShimLaunch,
    /// Most workload starts (shim handshakes) in progress at once, at
    /// least 1; more wait their turn. Each one holds a blocking thread for
    /// its handshake.
    pub max_concurrent_starts: usize,
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
        }
    }
}

/// How the supervisor starts a workload's shim.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ShimLaunch {
    /// A thread of one long-lived shim host, `<shim_program> __shim-host`
    /// (see [`crate::shim`]): no process, `exec` or dynamic loading
    /// per workload.
    #[default]
    Host,
    /// `<shim_program> __shim <records file>` executed for every workload.
    /// Slower, but `shim_program` may then be a wrapper (a script that ends
    /// in `exec gpufleet-agent "$@"`) that runs before every shim; tests
    /// use one to hold starts at a moment of their choosing.
    Exec,
}

/// What [`Supervisor::recover`] found in the workloads' records.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Still running: watched again, stoppable as before.
    pub adopted: Vec<String>,
    /// Ended while the agent was away; their real outcome is reported.
    pub finished: Vec<String>,
    /// Their shim is gone without recording an outcome: reported `Lost`.
    pub lost: Vec<String>,
    /// Records that could not be read (each named with the reason).
    pub unreadable: Vec<String>,
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

struct Workload {
    allocation: Allocation,
    source: Source,
    state: WorkloadState,
    /// The workload's pid, also its process group id; 0 until known.
    pid: u32,
    /// The shim's pid and start time (`None`: never got one).
    shim: Option<(u32, u64)>,
    exit_code: Option<i32>,
    signal: Option<i32>,
    message: String,
    started_at: Option<SystemTime>,
    finished_at: Option<SystemTime>,
    stop_requested: bool,
    /// The grace period the stop asked for (`None`: the workload's own).
    stop_grace: Option<Duration>,
    /// Wakes the workload's start task when a stop comes while it waits
    /// for its turn to start.
    stop_while_queued: Arc<Notify>,
    /// Becomes true once the workload is terminal.
    done: watch::Receiver<bool>,
    /// Where its records are (or will be, until it starts).
    records: Records,
}

impl Workload {
    /// A workload about to start.
    fn starting(
        allocation: Allocation,
        source: Source,
        done: watch::Receiver<bool>,
        records: Records,
    ) -> Self {
        Self {
            allocation,
            source,
            state: WorkloadState::Starting,
            pid: 0,
            shim: None,
            exit_code: None,
            signal: None,
            message: String::new(),
            started_at: None,
            finished_at: None,
            stop_requested: false,
            stop_grace: None,
            stop_while_queued: Arc::new(Notify::new()),
            done,
            records,
        }
    }

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
        gpufleet_core::is_terminal_workload(self.state)
    }

    /// Takes the outcome from the shim's exit record.
    fn apply_exit(&mut self, exit: &ExitRecord) {
        self.exit_code = exit.exit_code;
        self.signal = exit.signal;
        // The record has millisecond precision and the shim's clock reading;
        // `started_at` was taken after the shim answered. A workload that
        // exits at once could seem to end before it started: it never does.
        let finished = store::from_unix_ms(exit.finished_at_ms);
        self.finished_at = Some(self.started_at.map_or(finished, |s| finished.max(s)));
        (self.state, self.message) = outcome(self.stop_requested, exit);
    }
}

/// The state and message for a workload that ended as `exit` says.
fn outcome(stop_requested: bool, exit: &ExitRecord) -> (WorkloadState, String) {
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

/// Why a start ended without a running workload.
enum StartError {
    /// It could not start; the message is for the workload's status.
    Failed(String),
    /// A stop came before the shim was let start the workload: it never ran.
    Withdrawn,
}

impl From<String> for StartError {
    fn from(message: String) -> Self {
        StartError::Failed(message)
    }
}

/// What a start task needs of the workload [`Supervisor::admit`] recorded.
struct Admitted {
    /// Marks the workload ended.
    done: watch::Sender<bool>,
    stop_while_queued: Arc<Notify>,
}

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

/// A shim that is up and has started its workload.
struct Launched {
    /// End of file here means the workload ended and its shim recorded
    /// how: the shim alone holds the write end of its answer pipe.
    shim_answer: OwnedFd,
    /// The shim itself with [`ShimLaunch::Exec`], to be reaped.
    child: Option<tokio::process::Child>,
    pid: u32,
    shim: (u32, u64),
    /// When the shim's answer came (not when the start task got back to
    /// recording it).
    started_at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovered {
    Adopted,
    Finished,
    Lost,
}

/// Says what `program` must be, naming the real file behind
/// `/proc/self/exe`.
fn not_a_shim_hint(program: &std::path::Path) -> String {
    let shown = std::fs::read_link(program)
        .ok()
        .filter(|_| program.starts_with("/proc"))
        .unwrap_or_else(|| program.to_path_buf());
    format!(
        "the shim program {} must be a gpufleet agent executable (one that calls shim::dispatch first thing in main)",
        shown.display()
    )
}

/// Waits until every writer of `fd`, a pipe's read end, has closed it.
async fn wait_for_end_of_file(fd: OwnedFd) -> std::io::Result<()> {
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?;
    let mut sink = [0u8; 256];
    loop {
        match pipe.read(&mut sink).await {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Reads the shim's one-line answer, giving up after `timeout`.
fn read_reply(mut from: &std::io::PipeReader, timeout: Duration) -> Result<Reply, String> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while !buf.contains(&b'\n') {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the workload shim did not answer within {timeout:?}"
            ));
        }
        let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(format!("cannot wait for the workload shim: {e}")),
        }
        match from.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("cannot read the workload shim's answer: {e}")),
        }
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    if line.is_empty() {
        return Err("the workload shim exited without answering".to_string());
    }
    serde_json::from_slice(line).map_err(|e| {
        format!(
            "the workload shim answered {:?}, not a start report: {e}",
            String::from_utf8_lossy(line)
        )
    })
}

/// Kills what is left of a workload whose shim died: its process group,
/// but only members still in the shim's session (both ids stay reserved
/// while a member lives, so nothing unrelated matches).
fn kill_leftovers(pgid: u32, shim_pid: u32) {
    if pgid == 0 || shim_pid == 0 {
        return;
    }
    let (Ok(pgid), Ok(session)) = (i32::try_from(pgid), i32::try_from(shim_pid)) else {
        return;
    };
    let members = store::group_members(pgid, session);
    if !members.is_empty() {
        warn!(
            pgid,
            count = members.len(),
            "killing what is left of a workload whose shim died"
        );
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
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
    settings: SupervisorSettings,
    node_gpus: Vec<String>,
    backend: Arc<dyn GpuBackend>,
    state: Mutex<State>,
    events: broadcast::Sender<WorkloadStatus>,
    /// One per shim handshake in progress ([`SupervisorSettings::max_concurrent_starts`]).
    start_permits: Arc<Semaphore>,
    /// The shim host ([`ShimLaunch::Host`]), started on first use and
    /// again if it dies; held while one request is sent.
    host: Mutex<Option<ShimHost>>,
    /// Launches past their permit and not yet settled. Raised only under
    /// the state lock, after checking `shutting_down`, so that once that is
    /// set the count can only fall.
    launching: watch::Sender<usize>,
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
            .finish_non_exhaustive()
    }
}

impl Supervisor {
    /// Workloads started from now on run as `uid`/`gid` (the agent must be
    /// root). Set once, at start.
    pub fn run_as(&self, uid: u32, gid: u32) {
        let _ = self.inner.run_as.set((uid, gid));
    }

    pub fn new(backend: Arc<dyn GpuBackend>, settings: SupervisorSettings) -> Self {
        let node_gpus = backend.gpus().into_iter().map(|g| g.uuid).collect();
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let start_permits = Arc::new(Semaphore::new(settings.max_concurrent_starts.max(1)));
        Self {
            inner: Arc::new(Inner {
                run_as: std::sync::OnceLock::new(),
                settings,
                node_gpus,
                backend,
                state: Mutex::new(State::default()),
                events,
                start_permits,
                host: Mutex::new(None),
                launching: watch::channel(0).0,
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

    /// The file of the agent's and the shim's records of a workload this
    /// agent starts. Apart from the allocation directory because that one
    /// belongs to the workload's user (`workload_user`), who must not
    /// forge them.
    fn records_file(&self, allocation_id: &str) -> PathBuf {
        store::records_file(
            &store::records_root(&self.inner.settings.data_dir),
            allocation_id,
        )
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

    /// Path of one allocation's combined stdout/stderr log.
    pub fn log_path(&self, allocation_id: &str) -> PathBuf {
        self.allocation_dir(allocation_id).join(store::LOG_FILE)
    }

    /// Starts a workload for the local API and returns its status once the
    /// start has settled (running or failed). Unlike the controller path,
    /// bad requests are refused rather than recorded as failed workloads.
    /// An empty allocation id gets `local-<uuid>`.
    pub async fn run_local(
        &self,
        mut allocation: Allocation,
    ) -> Result<WorkloadStatus, SupervisorError> {
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
        let done = {
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
            self.admit(&mut st, allocation.clone(), Source::Local)
        };
        let id = allocation.allocation_id.clone();
        // Awaited, not run here: the start completes even if this caller
        // goes away (a client that hung up mid-call).
        let _ = self.spawn_start(allocation, Source::Local, done).await;
        self.status(&id).ok_or(SupervisorError::NotFound(id))
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
    ///
    /// Returns at once: new workloads are recorded as starting and started
    /// concurrently (at most [`SupervisorSettings::max_concurrent_starts`]
    /// at a time), each reported running (or failed) when its shim answers.
    /// Must be called within a Tokio runtime.
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
        let mut starts = Vec::new();
        for allocation in &desired.allocations {
            match st.workloads.get(&allocation.allocation_id) {
                None => match self.validate_controller_allocation(allocation) {
                    Ok(()) => {
                        let done = self.admit(&mut st, allocation.clone(), Source::Controller);
                        starts.push((allocation.clone(), done));
                    }
                    Err(reason) => self.reject(&mut st, allocation.clone(), reason),
                },
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
            let Some(w) = st.workloads.remove(&id) else {
                continue;
            };
            // A restarted agent must not report it again.
            if let Err(e) = w.records.forget() {
                warn!(allocation_id = %id, error = %e, "cannot drop the record of a finished workload");
            }
        }
        for id in stops {
            if let Some(w) = st.workloads.get_mut(&id) {
                info!(allocation_id = %id, "stopping a workload the controller no longer wants");
                self.request_stop(w, None);
            }
        }
        drop(st);
        for (allocation, done) in starts {
            self.spawn_start(allocation, Source::Controller, done);
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

    /// Records a workload as starting; [`Supervisor::spawn_start`] starts
    /// it.
    fn admit(&self, st: &mut State, allocation: Allocation, source: Source) -> Admitted {
        let (done_tx, done_rx) = watch::channel(false);
        let id = allocation.allocation_id.clone();
        let records = Records::File(self.records_file(&id));
        let w = Workload::starting(allocation, source, done_rx, records);
        let stop_while_queued = w.stop_while_queued.clone();
        st.workloads.insert(id, w);
        self.refresh_busy(st);
        Admitted {
            done: done_tx,
            stop_while_queued,
        }
    }

    /// Records a controller allocation that cannot run as failed, with why.
    fn reject(&self, st: &mut State, allocation: Allocation, reason: String) {
        let (done_tx, done_rx) = watch::channel(false);
        let id = allocation.allocation_id.clone();
        // Never started, so never recorded: forgetting it removes nothing.
        let records = Records::File(self.records_file(&id));
        let mut w = Workload::starting(allocation, Source::Controller, done_rx, records);
        warn!(allocation_id = %id, %reason, "workload could not start");
        w.state = WorkloadState::Failed;
        w.message = reason;
        w.finished_at = Some(SystemTime::now());
        let _ = done_tx.send(true);
        let status = w.status();
        st.workloads.insert(id, w);
        self.emit(st, status);
    }

    /// Starts an admitted workload on a task of its own: waits for a start
    /// permit, runs the shim handshake on a blocking thread, then records
    /// how the start went. Starts run concurrently and never under the
    /// state lock, so one slow shim holds up neither the others nor the
    /// uplink. The task is not cancelled when the returned handle is
    /// dropped.
    fn spawn_start(
        &self,
        allocation: Allocation,
        source: Source,
        admitted: Admitted,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        let Admitted {
            done,
            stop_while_queued,
        } = admitted;
        tokio::spawn(async move {
            let id = allocation.allocation_id.clone();
            let permits = this.inner.start_permits.clone();
            let permit = tokio::select! {
                // Never closed, so only `Ok`.
                permit = permits.acquire_owned() => permit.ok(),
                () = stop_while_queued.notified() => None,
            };
            let Some(permit) = permit else {
                this.finish_start(&id, Err(StartError::Withdrawn), &done);
                return;
            };
            match this.begin_launch(&id) {
                Launch::Go => {}
                Launch::Withdrawn => {
                    this.finish_start(&id, Err(StartError::Withdrawn), &done);
                    return;
                }
                Launch::Abandon => return,
            }
            let _in_progress = LaunchInProgress(&this.inner.launching);
            let launcher = this.clone();
            let launched = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                launcher.spawn(&allocation, source)
            })
            .await
            .unwrap_or_else(|e| {
                Err(StartError::Failed(format!(
                    "starting the workload failed unexpectedly: {e}"
                )))
            });
            this.finish_start(&id, launched, &done);
        })
    }

    /// Decides, under the lock, whether a start that got its permit goes
    /// ahead; counts it as in progress when it does.
    fn begin_launch(&self, id: &str) -> Launch {
        let st = self.lock();
        match st.workloads.get(id) {
            Some(w) if w.stop_requested => Launch::Withdrawn,
            Some(_) if !st.shutting_down => {
                self.inner.launching.send_modify(|n| *n += 1);
                Launch::Go
            }
            _ => Launch::Abandon,
        }
    }

    /// Records how a start went and publishes the status: running (and
    /// reaped from now on), failed, or stopped before it started. A stop
    /// that came during the start is carried out now.
    fn finish_start(
        &self,
        id: &str,
        launched: Result<Launched, StartError>,
        done: &watch::Sender<bool>,
    ) {
        let mut st = self.lock();
        let Some(w) = st.workloads.get_mut(id) else {
            // Starting workloads are never forgotten; were one, its process
            // must not run on unwatched.
            if let Ok(launched) = launched
                && let Ok(pgid) = i32::try_from(launched.pid)
                && pgid > 0
            {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
            return;
        };
        match launched {
            Ok(launched) => {
                w.pid = launched.pid;
                w.shim = Some(launched.shim);
                w.state = WorkloadState::Running;
                w.started_at = Some(launched.started_at);
                info!(allocation_id = %id, pid = w.pid, shim_pid = launched.shim.0, gpus = ?w.allocation.gpu_uuids, "workload started");
                let this = self.clone();
                let reap_id = id.to_string();
                let done = done.clone();
                let shim = launched.shim;
                let records = w.records.clone();
                tokio::spawn(async move {
                    if let Err(e) = wait_for_end_of_file(launched.shim_answer).await {
                        warn!(allocation_id = %reap_id, error = %e, "cannot watch the workload's shim through its pipe; polling its records instead");
                        // The host outlives the workload: its exit record
                        // is what ends the wait.
                        while !matches!(records.read_exit(), Ok(Some(_)))
                            && store::is_same_live_process(shim.0, shim.1)
                        {
                            tokio::time::sleep(ADOPTED_POLL).await;
                        }
                    }
                    if let Some(mut shim) = launched.child {
                        // The shim's own exit status says nothing about
                        // the workload; its exit record does.
                        let _ = shim.wait().await;
                    }
                    this.on_exit(&reap_id);
                    let _ = done.send(true);
                });
                if w.stop_requested {
                    info!(allocation_id = %id, "stopping a workload asked to stop while it started");
                    self.signal_stop(w);
                }
            }
            Err(StartError::Withdrawn) => {
                info!(allocation_id = %id, "stopped before it started");
                w.state = WorkloadState::Stopped;
                w.message = "stopped before it started".to_string();
                w.finished_at = Some(SystemTime::now());
                let _ = done.send(true);
            }
            Err(StartError::Failed(reason)) => {
                warn!(allocation_id = %id, %reason, "workload could not start");
                w.state = WorkloadState::Failed;
                w.message = reason;
                w.finished_at = Some(SystemTime::now());
                let _ = done.send(true);
            }
        }
        let status = w.status();
        self.emit(&mut st, status);
    }

    /// Starts a shim whose launch spec comes through `spec` (a pipe's read
    /// end), whose answer goes to `answer` (a pipe's write end) and whose
    /// own diagnostics to `log`: a thread of the shim host, or with
    /// [`ShimLaunch::Exec`] a process of its own (returned, to be reaped).
    /// An error that may come from a wrong `shim_program` says what it
    /// must be.
    fn start_shim(
        &self,
        records: &std::path::Path,
        [spec, answer, log]: [OwnedFd; 3],
    ) -> Result<Option<tokio::process::Child>, String> {
        let program = &self.inner.settings.shim_program;
        if self.inner.settings.shim_launch == ShimLaunch::Exec {
            let child = crate::shim::command(program, records)
                .stdin(Stdio::from(spec))
                .stdout(Stdio::from(answer))
                .stderr(Stdio::from(log))
                // The whole point: the shim and its workload outlive the agent.
                .kill_on_drop(false)
                .spawn()
                .map_err(|e| {
                    format!(
                        "cannot start the workload shim {}: {e}; {}",
                        program.display(),
                        not_a_shim_hint(program)
                    )
                })?;
            return Ok(Some(child));
        }
        let descriptors = [spec.as_fd(), answer.as_fd(), log.as_fd()];
        let mut host = self.inner.host.lock().unwrap_or_else(|e| e.into_inner());
        let mut retried = false;
        loop {
            let current = match host.take() {
                Some(current) => current,
                None => ShimHost::start(program)
                    .map_err(|why| format!("{why}; {}", not_a_shim_hint(program)))?,
            };
            match current.launch(records, descriptors) {
                Ok(()) => {
                    *host = Some(current);
                    return Ok(None);
                }
                Err(HostError::Invalid(why)) => {
                    *host = Some(current);
                    return Err(why);
                }
                // It died since the last start; a new one gets the request.
                Err(HostError::Gone(why)) if !retried => {
                    debug!(reason = %why, "starting a new shim host");
                    retried = true;
                }
                Err(HostError::Gone(why)) => {
                    return Err(format!("{why}; {}", not_a_shim_hint(program)));
                }
            }
        }
    }

    /// Starts the workload through a shim and waits for its answer. The
    /// shim records the allocation (creating the records file) before it
    /// starts anything, so a restarted agent knows every workload that may
    /// run. The error is a message for the workload status (also written
    /// to its log when the log could be opened). Blocks (file writes, the
    /// shim's answer, at most [`SHIM_START_TIMEOUT`]): runs on a blocking
    /// thread, never under the state lock. A stop requested before the
    /// spec is sent withdraws the start.
    fn spawn(&self, allocation: &Allocation, source: Source) -> Result<Launched, StartError> {
        let id = &allocation.allocation_id;
        let dir = self.allocation_dir(id);
        std::fs::create_dir_all(&dir).map_err(|e| {
            format!(
                "cannot create the allocation directory {}: {e}",
                dir.display()
            )
        })?;
        let run_as = self.inner.run_as.get().copied();
        if let Some((uid, gid)) = run_as {
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
        let records = self.records_file(id);
        let log_path = dir.join(store::LOG_FILE);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open the log file {}: {e}", log_path.display()))?;
        let fail = |log: &mut std::fs::File, message: String| {
            let _ = writeln!(log, "gpufleet-agent: {message}");
            StartError::Failed(message)
        };
        let default_spec = Default::default();
        let spec = allocation.workload.as_ref().unwrap_or(&default_spec);
        if spec.argv.is_empty() {
            return Err(fail(&mut log, "workload.argv is empty".into()));
        }
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
        let gpus = allocation.gpu_uuids.join(",");
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), WORKLOAD_PATH.into()),
            ("HOME".into(), dir.to_string_lossy().into_owned()),
        ];
        let mut job_env: Vec<_> = spec.env.iter().collect();
        job_env.sort();
        env.extend(job_env.into_iter().map(|(k, v)| (k.clone(), v.clone())));
        // After the job's env, so a job cannot escape its GPUs.
        env.extend([
            ("CUDA_VISIBLE_DEVICES".into(), gpus.clone()),
            ("NVIDIA_VISIBLE_DEVICES".into(), gpus),
            ("GPUFLEET_JOB_ID".into(), allocation.job_id.clone()),
            (
                "GPUFLEET_TASK_INDEX".into(),
                allocation.task_index.to_string(),
            ),
            ("GPUFLEET_ALLOCATION_ID".into(), id.clone()),
        ]);
        let records_root = store::records_root(&self.inner.settings.data_dir);
        if let Err(e) = store::create_records_root(&records_root) {
            return Err(fail(
                &mut log,
                format!(
                    "cannot create the records directory {}: {e}",
                    records_root.display()
                ),
            ));
        }
        let launch = LaunchSpec {
            allocation: store::encode_allocation(allocation),
            local: source == Source::Local,
            argv: spec.argv.clone(),
            log_path,
            env,
            working_dir,
            run_as,
            log_max_bytes: self.inner.settings.log_max_bytes,
        };
        let mut line = serde_json::to_string(&launch)
            .map_err(|e| fail(&mut log, format!("cannot encode the launch spec: {e}")))?;
        line.push('\n');

        let shim_log = log
            .try_clone()
            .map_err(|e| fail(&mut log, format!("cannot share the log file: {e}")))?;
        let pipes = std::io::pipe().and_then(|spec| Ok((spec, std::io::pipe()?)));
        let ((spec_reader, spec_writer), (answer, answer_writer)) =
            pipes.map_err(|e| fail(&mut log, format!("cannot create the shim's pipes: {e}")))?;
        let program = &self.inner.settings.shim_program;
        let mut child = self
            .start_shim(
                &records,
                [
                    OwnedFd::from(spec_reader),
                    OwnedFd::from(answer_writer),
                    OwnedFd::from(shim_log),
                ],
            )
            .map_err(|why| fail(&mut log, why))?;
        if self.stop_requested(id) {
            // Nothing ran or was recorded: at end of input the shim ends
            // without starting the workload.
            drop((spec_writer, answer));
            return Err(StartError::Withdrawn);
        }
        // From here on the shim may record and start the workload.
        let mut spec_writer = spec_writer;
        let handshake = spec_writer
            .write_all(line.as_bytes())
            .map_err(|e| format!("cannot talk to the workload shim: {e}"))
            .and_then(|()| {
                drop(spec_writer);
                read_reply(&answer, SHIM_START_TIMEOUT)
            });
        match handshake {
            Ok(Reply::Started {
                pid,
                shim_pid,
                shim_start_ticks,
            }) => Ok(Launched {
                shim_answer: OwnedFd::from(answer),
                child,
                pid,
                shim: (shim_pid, shim_start_ticks),
                started_at: SystemTime::now(),
            }),
            // The shim logged it, and recorded it in an exit line if it had
            // created the records.
            Ok(Reply::Failed { message }) => Err(StartError::Failed(message)),
            Err(why) => {
                let why = format!("{why}; {}", not_a_shim_hint(program));
                // A shim process of its own is killed; a host's thread is
                // not (the host runs other workloads' shims): should it
                // start the workload after all, it finds the exit record
                // below when its answer cannot be delivered, and kills it.
                if let Some(child) = &mut child {
                    let _ = child.start_kill();
                }
                let _ = writeln!(log, "gpufleet-agent: {why}");
                // It may have recorded and started the workload before it
                // stalled; a records file that is not there stays so.
                let recorded = Records::File(records.clone());
                if let Ok(Some(started)) = recorded.read_started() {
                    let _ = killpg(Pid::from_raw(started.pid as i32), Signal::SIGKILL);
                }
                let record = ExitRecord {
                    exit_code: None,
                    signal: None,
                    start_error: Some(why.clone()),
                    finished_at_ms: store::unix_ms(SystemTime::now()),
                };
                let _ = store::append_exit(&records, &record);
                Err(StartError::Failed(why))
            }
        }
    }

    /// Ends a workload from its exit record; without one (its shim died),
    /// reports it lost and kills what is left of it.
    fn on_exit(&self, id: &str) {
        // Read off the lock: the records are the shim's and the agent's.
        let Some(records) = self.lock().workloads.get(id).map(|w| w.records.clone()) else {
            return;
        };
        let exit = records.read_exit();
        let mut st = self.lock();
        let Some(w) = st.workloads.get_mut(id) else {
            return;
        };
        if w.terminal() {
            return;
        }
        match exit {
            Ok(Some(record)) => w.apply_exit(&record),
            Ok(None) => {
                let shim_pid = w.shim.map_or(0, |(pid, _)| pid);
                w.state = WorkloadState::Lost;
                w.message = format!(
                    "the workload's shim (pid {shim_pid}) ended without recording how the workload ended"
                );
                w.finished_at = Some(SystemTime::now());
                kill_leftovers(w.pid, shim_pid);
            }
            Err(e) => {
                w.state = WorkloadState::Lost;
                w.message = e;
                w.finished_at = Some(SystemTime::now());
            }
        }
        info!(allocation_id = %id, state = ?w.state, exit_code = ?w.exit_code, signal = ?w.signal, message = %w.message, "workload ended");
        let status = w.status();
        self.emit(&mut st, status);
    }

    /// Re-adopts the workloads recorded under `data_dir/workloads` (records
    /// files, and the records directories of agents before them): those
    /// still running are watched again (and can be stopped as before), those
    /// that ended while the agent was away get their real outcome, and those
    /// whose shim died without recording one are reported lost. Call once,
    /// at start, before anything else uses the supervisor.
    pub fn recover(&self) -> Recovery {
        let mut found = Recovery::default();
        let root = store::records_root(&self.inner.settings.data_dir);
        let entries = match store::list_records(&root) {
            Ok(entries) => entries,
            Err(e) => {
                found.unreadable.push(format!("{}: {e}", root.display()));
                return found;
            }
        };
        let mut st = self.lock();
        for (name, records) in entries {
            match self.recover_one(&mut st, &name, records.clone()) {
                Ok(None) => {}
                Ok(Some((id, Recovered::Adopted))) => found.adopted.push(id),
                Ok(Some((id, Recovered::Finished))) => found.finished.push(id),
                Ok(Some((id, Recovered::Lost))) => found.lost.push(id),
                Err(e) => {
                    let path = records.path();
                    warn!(records = %path.display(), error = %e, "cannot recover a workload");
                    found.unreadable.push(format!("{}: {e}", path.display()));
                }
            }
        }
        found
    }

    /// Recovers the workload whose records' name says `name`.
    fn recover_one(
        &self,
        st: &mut State,
        name: &str,
        records: Records,
    ) -> Result<Option<(String, Recovered)>, String> {
        let Some(recorded) = records.read()? else {
            // No whole agent line: a shim that died creating the file, or
            // (agents before shims wrote it) a launch the agent died in
            // before it let the shim start the workload. Nothing ran.
            if let Err(e) = records.forget() {
                warn!(records = %records.path().display(), error = %e, "cannot remove the records of an aborted launch");
            }
            return Ok(None);
        };
        let store::Recorded {
            allocation,
            agent: record,
            started,
            exit: _,
        } = recorded;
        let id = allocation.allocation_id.clone();
        if id != name {
            return Err(format!("they record allocation {id:?}, not {name:?}"));
        }
        if st.workloads.contains_key(&id) {
            // Already known: recovered before, or started since.
            return Ok(None);
        }
        let source = if record.local {
            Source::Local
        } else {
            Source::Controller
        };
        let (done_tx, done_rx) = watch::channel(false);
        let mut w = Workload {
            allocation,
            source,
            state: WorkloadState::Running,
            pid: started.as_ref().map_or(0, |s| s.pid),
            shim: Some((record.shim_pid, record.shim_start_ticks)),
            exit_code: None,
            signal: None,
            message: String::new(),
            started_at: started
                .as_ref()
                .map(|s| store::from_unix_ms(s.started_at_ms)),
            finished_at: None,
            stop_requested: record.stop_requested,
            stop_grace: None,
            stop_while_queued: Arc::new(Notify::new()),
            done: done_rx,
            records: records.clone(),
        };
        // The exit record is read after the liveness check: a shim that
        // wrote it and exited in between is finished, not lost.
        let alive = store::is_same_live_process(record.shim_pid, record.shim_start_ticks);
        let outcome = match (records.read_exit()?, alive) {
            (Some(exit), _) => {
                w.apply_exit(&exit);
                Recovered::Finished
            }
            (None, true) => Recovered::Adopted,
            (None, false) => {
                w.state = WorkloadState::Lost;
                w.message = format!(
                    "the workload's shim (pid {}) ended while the agent was down, without recording how the workload ended",
                    record.shim_pid
                );
                w.finished_at = Some(SystemTime::now());
                kill_leftovers(w.pid, record.shim_pid);
                Recovered::Lost
            }
        };
        if outcome == Recovered::Adopted {
            info!(allocation_id = %id, pid = w.pid, shim_pid = record.shim_pid, "re-adopted a running workload");
            let this = self.clone();
            let watch_id = id.clone();
            let shim = (record.shim_pid, record.shim_start_ticks);
            tokio::spawn(async move {
                this.watch_adopted(&watch_id, &records, shim).await;
                let _ = done_tx.send(true);
            });
        } else {
            info!(allocation_id = %id, state = ?w.state, message = %w.message, "recovered a workload that ended while the agent was down");
            let _ = done_tx.send(true);
            if source == Source::Local {
                // Local results are kept until the next restart, not forever.
                let _ = records.forget();
            }
        }
        let status = w.status();
        st.workloads.insert(id.clone(), w);
        self.emit(st, status);
        Ok(Some((id, outcome)))
    }

    /// Waits for a re-adopted workload's shim, which is not our child, by
    /// polling its exit record and whether it still lives.
    async fn watch_adopted(&self, id: &str, records: &Records, (shim_pid, shim_start): (u32, u64)) {
        loop {
            if matches!(records.read_exit(), Ok(Some(_)))
                || !store::is_same_live_process(shim_pid, shim_start)
            {
                break;
            }
            // A shim adopted between "go" and starting its workload reports
            // the pid late.
            let unknown_pid = self.lock().workloads.get(id).is_some_and(|w| w.pid == 0);
            if unknown_pid && let Ok(Some(started)) = records.read_started() {
                let mut st = self.lock();
                if let Some(w) = st.workloads.get_mut(id) {
                    w.pid = started.pid;
                    w.started_at = Some(store::from_unix_ms(started.started_at_ms));
                }
            }
            tokio::time::sleep(ADOPTED_POLL).await;
        }
        self.on_exit(id);
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

    /// Sends SIGTERM to the workload's process group and SIGKILL after the
    /// grace period. Returns a receiver that turns true once it has ended.
    /// A workload still starting is stopped once its start settles: not
    /// started at all if its shim was not yet let start it, else signalled.
    fn request_stop(&self, w: &mut Workload, grace: Option<Duration>) -> watch::Receiver<bool> {
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
    fn stop_requested(&self, allocation_id: &str) -> bool {
        self.lock()
            .workloads
            .get(allocation_id)
            .is_none_or(|w| w.stop_requested)
    }

    /// Carries out a requested stop: SIGTERM to the workload's process
    /// group now, SIGKILL after the grace period.
    fn signal_stop(&self, w: &Workload) {
        // Recorded first, so that a restarted agent still reports the
        // signal death as Stopped.
        if let Some((shim_pid, shim_start_ticks)) = w.shim {
            let record = AgentRecord {
                local: w.source == Source::Local,
                shim_pid,
                shim_start_ticks,
                stop_requested: true,
            };
            if let Err(e) = w.records.record_stop(&record) {
                warn!(allocation_id = %w.allocation.allocation_id, error = %e, "cannot record the stop request");
            }
        }
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
                    return Err(SupervisorError::NoLog(allocation_id.to_string()));
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

    /// Refuses new work and leaves running workloads alone: their shims
    /// keep them going (own session) and the next agent start re-adopts
    /// them from their records. Starts already handed to their shim are
    /// waited for, so that their statuses are published; starts still
    /// waiting for their turn are dropped (the controller's desired state
    /// asks the next agent run for them again). Returns how many are left
    /// running.
    pub async fn detach(&self) -> usize {
        self.lock().shutting_down = true;
        // No launch begins once `shutting_down` is set, so this ends.
        let _ = self
            .inner
            .launching
            .subscribe()
            .wait_for(|launching| *launching == 0)
            .await;
        // Let the shim host go: it serves the workloads it has until they
        // end, then exits (a restarted agent starts its own).
        drop(
            self.inner
                .host
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
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

fn signal_name(sig: i32) -> String {
    match Signal::try_from(sig) {
        Ok(s) => format!("{sig} ({})", s.as_str()),
        Err(_) => sig.to_string(),
    }
}
