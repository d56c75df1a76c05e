//! The process runtime: each workload is its argv executed without a
//! shell, in its own process group (so a stop reaches every process it
//! started), with a cleared environment, under a shim (see
//! [`crate::shim`]): a thread of the agent's shim host process in a
//! session of its own, so the workload outlives the agent. What a
//! restarted agent needs is in `data_dir/workloads/<id>.records`
//! ([`crate::workload_store`]), written by the shim before the workload
//! starts; [`ProcessRuntime::adopt`] reads them back.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{
    Adoption, BoxFuture, Ended, Exit, Found, FoundState, LaunchControl, LaunchError, LaunchRequest,
    Launched, OnStarted, RunningWorkload, WorkloadRuntime,
};
use crate::shim::protocol::{LaunchSpec, Reply};
use crate::shim::{HostError, ShimHost};
use crate::store as store_checks;
use crate::workload_store::{self as store, AgentRecord, ExitRecord, Records};

/// PATH given to every workload (the agent's own PATH is not inherited).
pub const WORKLOAD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Longest wait for a shim to report that its workload started.
const SHIM_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a re-adopted workload (not the agent's child) is checked.
const ADOPTED_POLL: Duration = Duration::from_millis(200);

/// How the process runtime starts a workload's shim.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ShimLaunch {
    /// A thread of one long-lived shim host, `<shim_program> __shim-host`
    /// (see [`crate::shim`]): no process, `exec` or dynamic loading per
    /// workload.
    #[default]
    Host,
    /// `<shim_program> __shim <records file>` executed for every workload.
    /// Slower, but `shim_program` may then be a wrapper (a script that ends
    /// in `exec gpufleet-agent "$@"`) that runs before every shim; tests
    /// use one to hold starts at a moment of their choosing.
    Exec,
}

/// Runs workloads as processes under shims.
#[derive(Debug)]
pub struct ProcessRuntime {
    /// `data_dir/workloads` holds the records.
    data_dir: PathBuf,
    /// A gpufleet agent executable (one that calls
    /// [`crate::shim::dispatch`] first thing in `main`).
    shim_program: PathBuf,
    shim_launch: ShimLaunch,
    /// The shim host ([`ShimLaunch::Host`]), started on first use and
    /// again if it dies; held while one request is sent.
    host: Mutex<Option<ShimHost>>,
}

impl ProcessRuntime {
    pub fn new(data_dir: PathBuf, shim_program: PathBuf, shim_launch: ShimLaunch) -> Self {
        Self {
            data_dir,
            shim_program,
            shim_launch,
            host: Mutex::new(None),
        }
    }

    /// The records file of allocation `id`. Apart from the allocation
    /// directory because that one belongs to the workload's user
    /// (`workload_user`), who must not forge them.
    fn records_file(&self, id: &str) -> PathBuf {
        store::records_file(&store::records_root(&self.data_dir), id)
    }

    /// Starts a shim whose launch spec comes through `spec` (a pipe's read
    /// end), whose answer goes to `answer` (a pipe's write end) and whose
    /// own diagnostics to `log`: a thread of the shim host, or with
    /// [`ShimLaunch::Exec`] a process of its own (returned, to be reaped).
    /// An error that may come from a wrong `shim_program` says what it
    /// must be.
    fn start_shim(
        &self,
        records: &Path,
        [spec, answer, log]: [OwnedFd; 3],
    ) -> Result<Option<tokio::process::Child>, String> {
        let program = &self.shim_program;
        if self.shim_launch == ShimLaunch::Exec {
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
        let mut host = self.host.lock().unwrap_or_else(|e| e.into_inner());
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

    /// Reads back the workload whose records' name says `name`.
    fn adopt_one(
        &self,
        name: &str,
        records: &Records,
        known: &dyn Fn(&str) -> bool,
    ) -> Result<Option<Found>, String> {
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
        if known(&id) {
            // Already known: recovered before, or started since.
            return Ok(None);
        }
        let pid = started.as_ref().map_or(0, |s| s.pid);
        // The exit record is read after the liveness check: a shim that
        // wrote it and exited in between is finished, not lost.
        let alive = store::is_same_live_process(record.shim_pid, record.shim_start_ticks);
        let state = match (records.read_exit()?, alive) {
            (Some(exit), _) => FoundState::Ended(exit_of(&exit)),
            (None, true) => FoundState::Running(Arc::new(ProcessWorkload {
                id: id.clone(),
                local: record.local,
                shim: (record.shim_pid, record.shim_start_ticks),
                pid: AtomicU32::new(pid),
                records: records.clone(),
                answer: Mutex::new(None),
                child: Mutex::new(None),
            })),
            (None, false) => {
                kill_leftovers(pid, record.shim_pid);
                FoundState::Lost(format!(
                    "the workload's shim (pid {}) ended while the agent was down, without recording how the workload ended",
                    record.shim_pid
                ))
            }
        };
        Ok(Some(Found {
            allocation,
            local: record.local,
            stop_requested: record.stop_requested,
            pid,
            started_at: started
                .as_ref()
                .map(|s| store::from_unix_ms(s.started_at_ms)),
            state,
        }))
    }
}

impl WorkloadRuntime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    /// Starts the workload through a shim and waits for its answer. The
    /// shim records the allocation (creating the records file) before it
    /// starts anything, so a restarted agent knows every workload that may
    /// run. The error is a message for the workload status (also written
    /// to its log when the log could be opened). Blocks (file writes, the
    /// shim's answer, at most [`SHIM_START_TIMEOUT`]). A stop requested
    /// before the spec is sent withdraws the start.
    fn launch(
        &self,
        request: &LaunchRequest,
        control: &dyn LaunchControl,
    ) -> Result<Launched, LaunchError> {
        super::prepare_allocation_dir(request)?;
        let id = request.allocation_id();
        let dir = &request.allocation_dir;
        let records = self.records_file(id);
        let log_path = request.log_path.clone();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| {
                store_checks::name_full_disk(format!(
                    "cannot open the log file {}: {e}",
                    log_path.display()
                ))
            })?;
        let fail = |log: &mut std::fs::File, message: String| {
            let _ = writeln!(log, "gpufleet-agent: {message}");
            LaunchError::Failed(message)
        };
        if request.argv.is_empty() {
            return Err(fail(&mut log, "workload.argv is empty".into()));
        }
        let working_dir = request.working_dir.clone().unwrap_or_else(|| dir.clone());
        if !working_dir.is_dir() {
            return Err(fail(
                &mut log,
                format!("working directory {} does not exist", working_dir.display()),
            ));
        }
        let gpus = request.gpu_uuids.join(",");
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), WORKLOAD_PATH.into()),
            ("HOME".into(), dir.to_string_lossy().into_owned()),
        ];
        env.extend(request.env.iter().cloned());
        // After the job's env, so a job cannot escape its GPUs.
        env.extend([
            ("CUDA_VISIBLE_DEVICES".into(), gpus.clone()),
            ("NVIDIA_VISIBLE_DEVICES".into(), gpus),
        ]);
        env.extend(request.gpu_env.iter().cloned());
        env.extend(request.identity_env());
        let records_root = store::records_root(&self.data_dir);
        if let Err(e) = store::create_records_root(&records_root) {
            return Err(fail(
                &mut log,
                store_checks::name_full_disk(format!(
                    "cannot create the records directory {}: {e}",
                    records_root.display()
                )),
            ));
        }
        let launch = LaunchSpec {
            allocation: store::encode_allocation(&request.allocation),
            local: request.local,
            argv: request.argv.clone(),
            log_path,
            env,
            working_dir,
            run_as: request.run_as,
            log_max_bytes: request.log_max_bytes,
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
        let program = &self.shim_program;
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
        if control.withdrawn() {
            // Nothing ran or was recorded: at end of input the shim ends
            // without starting the workload.
            drop((spec_writer, answer));
            return Err(LaunchError::Withdrawn);
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
                workload: Arc::new(ProcessWorkload {
                    id: id.to_string(),
                    local: request.local,
                    shim: (shim_pid, shim_start_ticks),
                    pid: AtomicU32::new(pid),
                    records: Records::File(records),
                    answer: Mutex::new(Some(OwnedFd::from(answer))),
                    child: Mutex::new(child),
                }),
                pid,
                started_at: SystemTime::now(),
            }),
            // The shim logged it, and recorded it in an exit line if it had
            // created the records.
            Ok(Reply::Failed { message }) => Err(LaunchError::Failed(message)),
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
                Err(LaunchError::Failed(why))
            }
        }
    }

    /// Re-adopts the workloads recorded under `data_dir/workloads` (records
    /// files, and the records directories of agents before them): those
    /// still running, those that ended while the agent was away, and those
    /// whose shim died without recording how (what is left of them is
    /// killed).
    fn adopt(&self, known: &dyn Fn(&str) -> bool) -> Adoption {
        let mut adoption = Adoption::default();
        let root = store::records_root(&self.data_dir);
        let entries = match store::list_records(&root) {
            Ok(entries) => entries,
            Err(e) => {
                adoption.unreadable.push(format!("{}: {e}", root.display()));
                return adoption;
            }
        };
        for (name, records) in entries {
            match self.adopt_one(&name, &records, known) {
                Ok(None) => {}
                Ok(Some(found)) => adoption.found.push(found),
                Err(e) => {
                    let path = records.path();
                    warn!(records = %path.display(), error = %e, "cannot recover a workload");
                    adoption.unreadable.push(format!("{}: {e}", path.display()));
                }
            }
        }
        adoption
    }

    /// Removes the workload's records file (or the records directory an
    /// older agent wrote).
    fn forget(&self, allocation_id: &str) -> std::io::Result<()> {
        // Never a path outside the records root.
        if allocation_id.is_empty()
            || allocation_id.contains('/')
            || allocation_id == "."
            || allocation_id == ".."
        {
            return Ok(());
        }
        Records::File(self.records_file(allocation_id)).forget()?;
        let legacy = store::records_root(&self.data_dir).join(allocation_id);
        if legacy.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            Records::Legacy(legacy).forget()?;
        }
        Ok(())
    }

    /// Lets the shim host go: it serves the workloads it has until they
    /// end, then exits (a restarted agent starts its own).
    fn detach(&self) {
        drop(self.host.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

/// One workload under its shim.
#[derive(Debug)]
struct ProcessWorkload {
    id: String,
    local: bool,
    /// The shim's pid and start time.
    shim: (u32, u64),
    /// The workload's pid, also its process group id; 0 until known.
    pid: AtomicU32,
    records: Records,
    /// End of file here means the workload ended and its shim recorded
    /// how: the shim alone holds the write end of its answer pipe. `None`
    /// for a re-adopted workload, whose shim is not ours: polled instead.
    answer: Mutex<Option<OwnedFd>>,
    /// The shim itself with [`ShimLaunch::Exec`], to be reaped.
    child: Mutex<Option<tokio::process::Child>>,
}

impl RunningWorkload for ProcessWorkload {
    /// SIGTERM to the workload's process group now, SIGKILL after the
    /// grace period.
    fn stop(&self, grace: Duration, mut ended: watch::Receiver<bool>) {
        // Recorded first, so that a restarted agent still reports the
        // signal death as Stopped.
        let record = AgentRecord {
            local: self.local,
            shim_pid: self.shim.0,
            shim_start_ticks: self.shim.1,
            stop_requested: true,
        };
        if let Err(e) = self.records.record_stop(&record) {
            warn!(allocation_id = %self.id, error = %e, "cannot record the stop request");
        }
        let pgid = Pid::from_raw(self.pid.load(Ordering::Relaxed) as i32);
        debug!(allocation_id = %self.id, ?grace, "sending SIGTERM");
        let _ = killpg(pgid, Signal::SIGTERM);
        let id = self.id.clone();
        tokio::spawn(async move {
            let exited = tokio::time::timeout(grace, ended.wait_for(|d| *d)).await;
            if exited.is_err() {
                info!(allocation_id = %id, "grace period over; sending SIGKILL");
                let _ = killpg(pgid, Signal::SIGKILL);
            }
        });
    }

    fn kill(&self) {
        if let Ok(pgid) = i32::try_from(self.pid.load(Ordering::Relaxed))
            && pgid > 0
        {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }

    fn wait(self: Arc<Self>, on_started: OnStarted) -> BoxFuture<Ended> {
        Box::pin(async move {
            let answer = self.answer.lock().unwrap_or_else(|e| e.into_inner()).take();
            let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
            match answer {
                Some(answer) => {
                    if let Err(e) = wait_for_end_of_file(answer).await {
                        warn!(allocation_id = %self.id, error = %e, "cannot watch the workload's shim through its pipe; polling its records instead");
                        // The host outlives the workload: its exit record
                        // is what ends the wait.
                        while !self.ended_or_gone() {
                            tokio::time::sleep(ADOPTED_POLL).await;
                        }
                    }
                }
                None => self.watch_adopted(on_started).await,
            }
            if let Some(mut shim) = child {
                // The shim's own exit status says nothing about the
                // workload; its exit record does.
                let _ = shim.wait().await;
            }
            self.ending()
        })
    }
}

impl ProcessWorkload {
    /// Whether the exit record is there or the shim is gone.
    fn ended_or_gone(&self) -> bool {
        matches!(self.records.read_exit(), Ok(Some(_)))
            || !store::is_same_live_process(self.shim.0, self.shim.1)
    }

    /// Waits for a re-adopted workload's shim, which is not our child, by
    /// polling its exit record and whether it still lives.
    async fn watch_adopted(&self, on_started: OnStarted) {
        let mut on_started = Some(on_started);
        while !self.ended_or_gone() {
            // A shim adopted between "go" and starting its workload reports
            // the pid late.
            if self.pid.load(Ordering::Relaxed) == 0
                && let Ok(Some(started)) = self.records.read_started()
            {
                self.pid.store(started.pid, Ordering::Relaxed);
                if let Some(tell) = on_started.take() {
                    tell(started.pid, store::from_unix_ms(started.started_at_ms));
                }
            }
            tokio::time::sleep(ADOPTED_POLL).await;
        }
    }

    /// How it ended, from its exit record; without one (its shim died), it
    /// is lost and what is left of it is killed.
    fn ending(&self) -> Ended {
        match self.records.read_exit() {
            Ok(Some(record)) => Ended::Exited(exit_of(&record)),
            Ok(None) => {
                let shim_pid = self.shim.0;
                kill_leftovers(self.pid.load(Ordering::Relaxed), shim_pid);
                Ended::Lost(format!(
                    "the workload's shim (pid {shim_pid}) ended without recording how the workload ended"
                ))
            }
            Err(e) => Ended::Lost(e),
        }
    }
}

fn exit_of(record: &ExitRecord) -> Exit {
    Exit {
        exit_code: record.exit_code,
        signal: record.signal,
        start_error: record.start_error.clone(),
        finished_at: store::from_unix_ms(record.finished_at_ms),
    }
}

/// Says what `program` must be, naming the real file behind
/// `/proc/self/exe`.
fn not_a_shim_hint(program: &Path) -> String {
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
