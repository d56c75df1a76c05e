//! The seam between the supervisor and what actually runs a workload.
//!
//! The supervisor decides *what* runs (admission, reconcile, the state
//! machine, stop grace periods, statuses); a [`WorkloadRuntime`] decides
//! *how*: it launches a workload from a runtime-neutral [`LaunchRequest`],
//! hands back a [`RunningWorkload`] to stop, kill and wait on, finds the
//! workloads an earlier agent run left behind ([`WorkloadRuntime::adopt`]),
//! forgets a workload once its status has been delivered, and reads logs.
//! The supervisor never knows which runtime it drives.
//!
//! Behind it: [`process::ProcessRuntime`] (exec argv without a shell, own
//! process group, under a shim so work outlives an agent restart),
//! [`oci::OciRuntime`] (podman containers: image pulls in `launch`,
//! reported through [`LaunchControl::pulling`], GPUs by CDI name, the
//! attached client under the process runtime's shim, the container removed
//! in `forget` and reaped after a restart), [`oci::Runtimes`] (which of
//! the two runs a workload, by whether its spec names an image) and
//! [`memory::MemoryRuntime`], an in-memory double for tests.

pub mod memory;
pub mod oci;
pub mod process;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gpufleet_proto::v1::Allocation;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;

/// A future a runtime returns through the trait object.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Everything a runtime needs to start one workload, already validated and
/// resolved by the supervisor.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchRequest {
    /// The allocation as it was asked for; a runtime keeps it with the
    /// workload so that [`WorkloadRuntime::adopt`] can give it back.
    pub allocation: Allocation,
    /// Started through the local `Agent` API (kept for adoption too).
    pub local: bool,
    /// Program and arguments, run as is (never through a shell).
    pub argv: Vec<String>,
    /// The job's own environment, sorted by name. A runtime adds what its
    /// kind of workload needs (PATH, HOME, visible GPUs) and
    /// [`LaunchRequest::identity_env`], after these so a job cannot
    /// override them.
    pub env: Vec<(String, String)>,
    /// `None`: the allocation directory.
    pub working_dir: Option<PathBuf>,
    /// (uid, gid) to run as; `None`: the agent's own user.
    pub run_as: Option<(u32, u32)>,
    /// The GPUs the workload may see, by UUID (a `MIG-…` UUID for a MIG
    /// instance).
    pub gpu_uuids: Vec<String>,
    /// The limits of a shared GPU allocation (`crate::sharing`: CUDA MPS
    /// variables, the share and memory limit); empty for whole GPUs. A
    /// runtime sets them after the job's env, so a job cannot lift them.
    pub gpu_env: Vec<(String, String)>,
    /// The workload's home and default working directory.
    pub allocation_dir: PathBuf,
    /// Where its combined stdout and stderr go (appended), capped at
    /// `log_max_bytes`.
    pub log_path: PathBuf,
    pub log_max_bytes: u64,
}

impl LaunchRequest {
    pub fn allocation_id(&self) -> &str {
        &self.allocation.allocation_id
    }

    /// `GPUFLEET_JOB_ID`, `GPUFLEET_TASK_INDEX`, `GPUFLEET_ALLOCATION_ID`
    /// and `GPUFLEET_INTERRUPT_FILE` (where a spot interruption's deadline
    /// is written; absent until then): what every runtime tells a workload
    /// about itself.
    pub fn identity_env(&self) -> [(String, String); 4] {
        [
            (
                "GPUFLEET_INTERRUPT_FILE".into(),
                self.allocation_dir
                    .join(crate::supervisor::INTERRUPT_FILE)
                    .to_string_lossy()
                    .into_owned(),
            ),
            ("GPUFLEET_JOB_ID".into(), self.allocation.job_id.clone()),
            (
                "GPUFLEET_TASK_INDEX".into(),
                self.allocation.task_index.to_string(),
            ),
            (
                "GPUFLEET_ALLOCATION_ID".into(),
                self.allocation.allocation_id.clone(),
            ),
        ]
    }
}

/// What a launch can ask of the supervisor while it runs.
pub trait LaunchControl: Send + Sync {
    /// Whether a stop came for the workload. Checked at the last moment
    /// before the workload may start: a launch that sees it gives up with
    /// [`LaunchError::Withdrawn`] and nothing runs.
    fn withdrawn(&self) -> bool;
    /// A step of a slow launch: shown as the message of the workload's
    /// `Starting` status.
    fn progress(&self, message: &str);
    /// An image pull's progress: the workload's status turns `Pulling`
    /// with this message (until the next [`LaunchControl::progress`]).
    fn pulling(&self, message: &str) {
        self.progress(message);
    }
}

/// Why a launch ended without a running workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchError {
    /// It could not start; the message is for the workload's status.
    Failed(String),
    /// A stop came before the workload was let start: it never ran.
    Withdrawn,
}

impl From<String> for LaunchError {
    fn from(message: String) -> Self {
        LaunchError::Failed(message)
    }
}

/// A workload that runs.
#[derive(Debug)]
pub struct Launched {
    pub workload: Arc<dyn RunningWorkload>,
    /// Its main process (with the process runtime also its process
    /// group), for its status and per-GPU process accounting.
    pub pid: u32,
    /// When the runtime saw it start.
    pub started_at: SystemTime,
}

/// Called once by [`RunningWorkload::wait`] when a re-adopted workload's
/// pid becomes known after adoption (a workload adopted mid-start).
pub type OnStarted = Box<dyn FnOnce(u32, SystemTime) + Send>;

/// One workload a runtime launched or re-adopted.
pub trait RunningWorkload: Send + Sync + std::fmt::Debug {
    /// Stops it: a polite signal now, a kill after `grace` unless `ended`
    /// turns true first. The request is recorded first, so that a
    /// restarted agent still reports the end as stopped.
    fn stop(&self, grace: Duration, ended: watch::Receiver<bool>);
    /// Kills it at once (a workload the supervisor no longer tracks).
    fn kill(&self);
    /// Resolves once it has ended, with how. Called once.
    fn wait(self: Arc<Self>, on_started: OnStarted) -> BoxFuture<Ended>;
}

/// How a workload ended, as its runtime recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Set instead of a code or signal when it never started.
    pub start_error: Option<String>,
    pub finished_at: SystemTime,
}

/// The end of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The runtime knows how it ended.
    Exited(Exit),
    /// It is gone and how it ended is unknown; the message says why.
    Lost(String),
}

/// A workload an earlier agent run left behind.
#[derive(Debug)]
pub struct Found {
    pub allocation: Allocation,
    pub local: bool,
    /// A stop was requested before the restart (a signal death is then
    /// stopped, not failed).
    pub stop_requested: bool,
    /// 0 when not (yet) known.
    pub pid: u32,
    pub started_at: Option<SystemTime>,
    pub state: FoundState,
}

/// Where a found workload stands.
#[derive(Debug)]
pub enum FoundState {
    /// Still running: watched again, stoppable as before.
    Running(Arc<dyn RunningWorkload>),
    /// Ended while the agent was away.
    Ended(Exit),
    /// Gone without a recorded outcome; what was left of it was killed.
    Lost(String),
}

/// What [`WorkloadRuntime::adopt`] found.
#[derive(Debug, Default)]
pub struct Adoption {
    pub found: Vec<Found>,
    /// What could not be read, each named with the reason.
    pub unreadable: Vec<String>,
}

/// Up to `max` bytes of a log from `offset`, and the log's length when
/// they were read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LogRead {
    pub data: Vec<u8>,
    pub len: u64,
}

/// Runs workloads. Methods that block (`launch`, `adopt`, `forget`) are
/// called on a blocking thread or at start, never under the supervisor's
/// lock, except `forget` (a file removal or a container removal request).
pub trait WorkloadRuntime: Send + Sync + std::fmt::Debug {
    /// Short name, e.g. `process`.
    fn name(&self) -> &'static str;

    /// The kinds of workload it runs, as the agent advertises them
    /// (`process`, `oci`).
    fn runtimes(&self) -> Vec<String> {
        vec![self.name().to_string()]
    }

    /// Starts a workload and returns once it runs (or could not start).
    /// Blocks; runs on a blocking thread within a Tokio runtime.
    fn launch(
        &self,
        request: &LaunchRequest,
        control: &dyn LaunchControl,
    ) -> Result<Launched, LaunchError>;

    /// Finds the workloads an earlier agent run launched, except those
    /// `known` already names. Called once, at start.
    fn adopt(&self, known: &dyn Fn(&str) -> bool) -> Adoption;

    /// Drops what the runtime keeps of an ended workload, so a restarted
    /// agent no longer reports it; its log stays. Gone already is fine.
    fn forget(&self, allocation_id: &str) -> std::io::Result<()>;

    /// The agent leaves: let go of what serves the running workloads
    /// without stopping them (the next agent run adopts them).
    fn detach(&self) {}

    /// Reads up to `max` bytes of a workload's log from `offset`; `None`
    /// when there is no log. The default reads the file the launch
    /// request named, which every runtime writes.
    fn read_log(
        &self,
        log_path: &Path,
        offset: u64,
        max: u32,
    ) -> BoxFuture<std::io::Result<Option<LogRead>>> {
        Box::pin(read_log_file(log_path.to_path_buf(), offset, max))
    }
}

/// Reads up to `max` bytes of the file at `path` from `offset`.
pub async fn read_log_file(
    path: PathBuf,
    offset: u64,
    max: u32,
) -> std::io::Result<Option<LogRead>> {
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata().await?.len();
    let mut data = Vec::new();
    if offset < len {
        file.seek(std::io::SeekFrom::Start(offset)).await?;
        let want = (len - offset).min(u64::from(max));
        file.take(want).read_to_end(&mut data).await?;
    }
    Ok(Some(LogRead { data, len }))
}

/// Creates the allocation directory and hands it to the workload's user:
/// its home and default working directory, whatever the runtime.
pub(crate) fn prepare_allocation_dir(request: &LaunchRequest) -> Result<(), String> {
    let dir = &request.allocation_dir;
    std::fs::create_dir_all(dir).map_err(|e| {
        crate::store::name_full_disk(format!(
            "cannot create the allocation directory {}: {e}",
            dir.display()
        ))
    })?;
    if let Some((uid, gid)) = request.run_as {
        nix::unistd::chown(
            dir,
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
    Ok(())
}
