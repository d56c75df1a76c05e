//! One shim, from the launch spec to its workload's end (see the
//! [`crate::shim`] module for the steps).

use std::io::{BufRead, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use super::protocol::{LaunchSpec, Reply, ShimIdentity, reply};
use crate::workload_store::{self, AgentRecord, ExitRecord, Records, StartedRecord};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// How long the shim keeps copying output after the workload's process
/// group was killed, for output still in the pipe (or held open by a
/// process that escaped the group).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// One shim, from the launch spec on `input` to the workload's end:
/// answers on `answer` (and closes it when it returns, which is how the
/// agent learns the workload ended) and reports its own troubles on
/// `diagnostics`. `identity` is the process it runs in. Returns its exit
/// status.
pub(crate) fn run(
    records: &Path,
    mut input: impl BufRead,
    answer: &mut dyn Write,
    diagnostics: &mut dyn Write,
    identity: ShimIdentity,
) -> u8 {
    let mut line = String::new();
    match input.read_line(&mut line) {
        // The agent went away before it let the workload start (a line
        // cut short is the same).
        Ok(0) => return 0,
        Ok(_) if !line.ends_with('\n') => return 0,
        Ok(_) => {}
        Err(e) => {
            let _ = writeln!(
                diagnostics,
                "gpufleet shim: cannot read the launch spec: {e}"
            );
            return 1;
        }
    }
    drop(input);
    let spec = match serde_json::from_str::<LaunchSpec>(&line) {
        Ok(spec) => spec,
        Err(e) => {
            // Nothing is recorded yet: the agent reports the failure.
            let message = format!("invalid launch spec from the agent: {e}");
            reply(answer, &Reply::Failed { message });
            return 1;
        }
    };
    let record = AgentRecord {
        local: spec.local,
        shim_pid: identity.pid,
        shim_start_ticks: identity.start_ticks,
        stop_requested: false,
    };
    if let Err(e) = workload_store::create_records_encoded(records, &spec.allocation, &record) {
        // No records, so nothing for a restarted agent to find; nothing runs.
        let message = crate::store::name_full_disk(format!(
            "cannot record the workload in {}: {e}",
            records.display()
        ));
        reply(answer, &Reply::Failed { message });
        return 1;
    }
    let workload = match start(records, &spec) {
        Ok(workload) => workload,
        Err(message) => {
            let record = ExitRecord {
                exit_code: None,
                signal: None,
                start_error: Some(message.clone()),
                finished_at_ms: workload_store::unix_ms(SystemTime::now()),
            };
            if let Err(e) = workload_store::append_exit(records, &record) {
                let _ = writeln!(
                    diagnostics,
                    "gpufleet shim: cannot record the start failure: {e}"
                );
            }
            reply(answer, &Reply::Failed { message });
            return 1;
        }
    };
    let delivered = reply(
        answer,
        &Reply::Started {
            pid: workload.pid,
            shim_pid: identity.pid,
            shim_start_ticks: identity.start_ticks,
        },
    );
    if !delivered
        && matches!(
            Records::File(records.to_path_buf()).read_exit(),
            Ok(Some(_))
        )
    {
        // The agent gave up waiting for this start (a shim stalled past its
        // timeout) and recorded it as failed: it must not run on. (An agent
        // that died records nothing; its workload runs on, to be re-adopted.)
        let Started { mut child, pid, .. } = workload;
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let _ = child.wait();
        return 1;
    }
    supervise(records, &spec, workload, diagnostics)
}

struct Started {
    child: std::process::Child,
    pid: u32,
    output: std::io::PipeReader,
    log: std::fs::File,
}

/// Opens the log, starts the workload and records its pid. The error is a
/// message for the workload's status, also written to its log.
fn start(records: &Path, spec: &LaunchSpec) -> Result<Started, String> {
    let log_path = &spec.log_path;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| format!("cannot open the log file {}: {e}", log_path.display()))?;
    let fail = |log: &mut std::fs::File, message: String| {
        let _ = writeln!(log, "gpufleet-agent: {message}");
        message
    };
    let Some(program) = spec.argv.first() else {
        return Err(fail(&mut log, "workload.argv is empty".into()));
    };
    // One pipe for both streams, like 2>&1, so their order is kept.
    let (output, writer) = std::io::pipe()
        .map_err(|e| fail(&mut log, format!("cannot create the output pipe: {e}")))?;
    let stderr = writer
        .try_clone()
        .map_err(|e| fail(&mut log, format!("cannot share the output pipe: {e}")))?;
    let mut cmd = match found_in_path(program, spec) {
        Some(path) => {
            let mut cmd = std::process::Command::new(path);
            cmd.arg0(program);
            cmd
        }
        None => std::process::Command::new(program),
    };
    cmd.args(&spec.argv[1..])
        .process_group(0)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.working_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::from(stderr));
    if let Some((uid, gid)) = spec.run_as {
        // std drops supplementary groups when it switches users.
        cmd.uid(uid).gid(gid);
    }
    let child = cmd
        .spawn()
        .map_err(|e| fail(&mut log, format!("cannot start {program:?}: {e}")))?;
    // The pipe's write ends now live only in the workload: end of file on
    // `output` means every process holding them is gone.
    drop(cmd);
    let pid = child.id();
    let record = StartedRecord {
        pid,
        started_at_ms: workload_store::unix_ms(SystemTime::now()),
    };
    if let Err(e) = workload_store::append_started(records, &record) {
        // Without the record a restarted agent could not stop it.
        let mut child = child;
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let _ = child.wait();
        return Err(fail(
            &mut log,
            format!("cannot record the workload's pid: {e}"),
        ));
    }
    Ok(Started {
        child,
        pid,
        output,
        log,
    })
}

/// A bare program name looked up in the workload's own `PATH`, as `execvp`
/// would, so that std starts it with `posix_spawn` (a vfork) instead of
/// forking the shim: std forks whenever the child's environment sets
/// `PATH` and the program is not a path. `None` leaves the search to std
/// (and to its error message): a path, a name found nowhere, a `PATH` with
/// relative entries, or a workload that switches users (std forks then in
/// any case, and the check here would be for the wrong user).
fn found_in_path(program: &str, spec: &LaunchSpec) -> Option<PathBuf> {
    use nix::unistd::{AccessFlags, access};
    if program.is_empty() || program.contains('/') || spec.run_as.is_some() {
        return None;
    }
    // The last PATH wins, as with `Command::envs`.
    let (_, path) = spec.env.iter().rev().find(|(key, _)| key == "PATH")?;
    for dir in path.split(':') {
        if !dir.starts_with('/') {
            return None;
        }
        let candidate = Path::new(dir).join(program);
        if candidate.is_file() && access(&candidate, AccessFlags::X_OK).is_ok() {
            return Some(candidate);
        }
    }
    None
}

/// Copies output until the workload ends, then records how it ended.
///
/// One thread: it waits in `poll` for output or the workload's end (a
/// pidfd), so a shim costs no extra thread, stack or malloc arena. On
/// kernels without `pidfd_open` (before 5.3) it looks every 100 ms.
fn supervise(
    records: &Path,
    spec: &LaunchSpec,
    workload: Started,
    diagnostics: &mut dyn Write,
) -> u8 {
    let exit_watch = pidfd(workload.pid);
    supervise_with(records, spec, workload, exit_watch, diagnostics)
}

/// [`supervise`] with `exit_watch`, a pidfd of the workload or `None`.
fn supervise_with(
    records: &Path,
    spec: &LaunchSpec,
    workload: Started,
    mut exit_watch: Option<std::os::fd::OwnedFd>,
    diagnostics: &mut dyn Write,
) -> u8 {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    const EXIT_POLL: Duration = Duration::from_millis(100);

    let Started {
        mut child,
        pid,
        output,
        log,
    } = workload;
    let mut log = match CappedLog::new(log, spec.log_max_bytes) {
        Ok(log) => Some(log),
        Err(e) => {
            let _ = writeln!(
                diagnostics,
                "gpufleet shim: cannot use the log: {e}; the workload's output is discarded"
            );
            None
        }
    };
    let mut output = Some(output);
    // Whether output was dropped because the disk was full (the next write
    // that succeeds says so in the log first).
    let mut lost_to_full_disk = false;
    let mut buf = [0u8; 16 * 1024];
    let mut status = None;
    let mut drain_until: Option<Instant> = None;
    loop {
        if status.is_some() && output.is_none() {
            break;
        }
        let timeout = match drain_until {
            // The leader ended: keep copying what is left for a while (a
            // process that escaped the group may hold the pipe forever).
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
            }
            None if exit_watch.is_none() => {
                PollTimeout::try_from(EXIT_POLL).unwrap_or(PollTimeout::MAX)
            }
            None => PollTimeout::NONE,
        };
        let (output_ready, ended) = {
            let mut fds = Vec::with_capacity(2);
            if let Some(output) = &output {
                fds.push(PollFd::new(output.as_fd(), PollFlags::POLLIN));
            }
            if status.is_none()
                && let Some(watch) = &exit_watch
            {
                fds.push(PollFd::new(watch.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    // Cannot happen with two valid descriptors; if it does,
                    // wait for the workload alone and give up its output.
                    let _ = writeln!(
                        diagnostics,
                        "gpufleet shim: cannot poll the workload: {e}; its output is no longer copied"
                    );
                    drop(fds);
                    status = Some(child.wait());
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    break;
                }
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            let output_ready = output.is_some() && fds.first().is_some_and(ready);
            (
                output_ready,
                fds.iter().skip(usize::from(output.is_some())).any(ready),
            )
        };
        if output_ready && let Some(pipe) = &mut output {
            match pipe.read(&mut buf) {
                Ok(0) => output = None,
                Ok(n) => {
                    let written = log.as_mut().map(|sink| {
                        if lost_to_full_disk {
                            sink.write_all(LOST_TO_FULL_DISK.as_bytes())?;
                        }
                        sink.write_all(&buf[..n])
                    });
                    match written {
                        None | Some(Ok(())) => lost_to_full_disk = false,
                        // A full disk loses output only while it is full.
                        Some(Err(e)) if crate::store::is_disk_full(&e.to_string()) => {
                            if !lost_to_full_disk {
                                let _ = writeln!(
                                    diagnostics,
                                    "gpufleet shim: the agent's disk is full; the workload's output is lost until it has room: {e}"
                                );
                            }
                            lost_to_full_disk = true;
                        }
                        Some(Err(e)) => {
                            // Keep draining, so the workload never blocks on
                            // a full pipe; the rest of its output is lost.
                            let _ = writeln!(
                                diagnostics,
                                "gpufleet shim: cannot write the workload's output: {e}"
                            );
                            log = None;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = writeln!(
                        diagnostics,
                        "gpufleet shim: cannot read the workload's output: {e}"
                    );
                    output = None;
                }
            }
        }
        if status.is_none() && (ended || exit_watch.is_none() || output.is_none()) {
            let waited = if output.is_none() && exit_watch.is_none() {
                // Nothing else to watch: block.
                child.wait().map(Some)
            } else {
                child.try_wait()
            };
            let ended_now = match waited {
                Ok(Some(done)) => Some(Ok(done)),
                Ok(None) => {
                    if ended {
                        // The pidfd woke us for nothing: never trust it
                        // again (no busy loop), look every EXIT_POLL.
                        exit_watch = None;
                    }
                    None
                }
                Err(e) => Some(Err(e)),
            };
            if let Some(done) = ended_now {
                status = Some(done);
                // The workload ends with its leader: kill whatever it left
                // in its process group. The group id stays reserved while
                // members live, so this cannot hit an unrelated group.
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
            }
        }
    }
    if let Some(mut sink) = log
        && let Err(e) = sink.flush()
    {
        let _ = writeln!(
            diagnostics,
            "gpufleet shim: cannot write the workload's output: {e}"
        );
    }
    let record = match status {
        Some(Ok(status)) => ExitRecord {
            exit_code: status.code(),
            signal: status.signal(),
            start_error: None,
            finished_at_ms: workload_store::unix_ms(SystemTime::now()),
        },
        Some(Err(e)) => ExitRecord {
            exit_code: None,
            signal: None,
            start_error: Some(format!("cannot wait for the workload: {e}")),
            finished_at_ms: workload_store::unix_ms(SystemTime::now()),
        },
        None => ExitRecord {
            exit_code: None,
            signal: None,
            start_error: Some("the shim stopped watching the workload before it ended".into()),
            finished_at_ms: workload_store::unix_ms(SystemTime::now()),
        },
    };
    match workload_store::append_exit(records, &record) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(
                diagnostics,
                "gpufleet shim: cannot record the exit status: {e}"
            );
            1
        }
    }
}

/// A descriptor that becomes readable when process `pid` (our child) ends;
/// `None` where the kernel has no `pidfd_open` (before Linux 5.3).
#[allow(unsafe_code)]
fn pidfd(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new
    // descriptor or -1; nothing is borrowed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: a descriptor the kernel just opened for us alone.
    Some(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Written to the workload's log before its output resumes after a full
/// disk.
const LOST_TO_FULL_DISK: &str =
    "\ngpufleet-agent: some output was lost while the agent's disk was full\n";

/// A log that accepts at most `max` bytes in total (counting what the file
/// already held), then one marker line, then silently discards the rest.
/// Discarded bytes are still "written", so the copier keeps draining.
pub(crate) struct CappedLog<W> {
    inner: W,
    written: u64,
    max: u64,
    last_byte: Option<u8>,
    truncated: bool,
}

impl CappedLog<std::fs::File> {
    fn new(file: std::fs::File, max: u64) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        let mut log = CappedLog::with_existing(file, max, len);
        // The marker's newline only matters when the file ends mid-line.
        log.last_byte = (len > 0).then_some(b'\n');
        Ok(log)
    }
}

impl<W: Write> CappedLog<W> {
    pub(crate) fn with_existing(inner: W, max: u64, already: u64) -> Self {
        Self {
            inner,
            written: already,
            max,
            last_byte: None,
            truncated: false,
        }
    }

    #[cfg(test)]
    fn into_inner(self) -> W {
        self.inner
    }

    fn truncate(&mut self) -> std::io::Result<()> {
        self.truncated = true;
        let newline = if matches!(self.last_byte, Some(b'\n') | None) {
            ""
        } else {
            "\n"
        };
        let marker = format!(
            "{newline}gpufleet-agent: output truncated: the log reached log_max_bytes ({} bytes); the rest is discarded\n",
            self.max
        );
        self.inner.write_all(marker.as_bytes())
    }
}

impl<W: Write> Write for CappedLog<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.truncated {
            return Ok(buf.len());
        }
        let room = self.max.saturating_sub(self.written);
        let keep = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if keep > 0 {
            self.inner.write_all(&buf[..keep])?;
            self.written += keep as u64;
            self.last_byte = Some(buf[keep - 1]);
        }
        if keep < buf.len() {
            self.truncate()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capped(max: u64, writes: &[&[u8]]) -> String {
        let mut log = CappedLog::with_existing(Vec::new(), max, 0);
        for w in writes {
            assert_eq!(log.write(w).unwrap(), w.len(), "every byte is accepted");
        }
        String::from_utf8(log.into_inner()).unwrap()
    }

    /// A spec that runs `script` under `sh -c`, its log in `dir`.
    fn sh_spec(dir: &Path, script: &str) -> LaunchSpec {
        LaunchSpec {
            allocation: String::new(),
            local: false,
            argv: vec!["sh".into(), "-c".into(), script.into()],
            log_path: dir.join("output.log"),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            working_dir: dir.into(),
            run_as: None,
            log_max_bytes: 1 << 20,
        }
    }

    /// Starts `script` under `sh -c` and supervises it to the end, with a
    /// pidfd or (`watch` false) looking every 100 ms; returns the exit
    /// record and the log.
    fn supervised(script: &str, watch: bool) -> (ExitRecord, String) {
        let dir = tempfile::tempdir().unwrap();
        let records = dir.path().join("w.records");
        std::fs::write(&records, "").unwrap();
        let spec = sh_spec(dir.path(), script);
        let started = start(&records, &spec).unwrap();
        let watch = if watch { pidfd(started.pid) } else { None };
        let mut diagnostics = Vec::new();
        assert_eq!(
            supervise_with(&records, &spec, started, watch, &mut diagnostics),
            0,
            "{}",
            String::from_utf8_lossy(&diagnostics)
        );
        let exit = workload_store::Records::File(records)
            .read_exit()
            .unwrap()
            .expect("an exit record");
        let log = std::fs::read_to_string(&spec.log_path).unwrap();
        (exit, log)
    }

    #[test]
    fn the_shim_records_the_workload_before_starting_it_and_nothing_for_a_cut_spec() {
        let dir = tempfile::tempdir().unwrap();
        let records = dir.path().join("w.records");
        let allocation = gpufleet_proto::v1::Allocation {
            allocation_id: "w".into(),
            ..Default::default()
        };
        let spec = LaunchSpec {
            allocation: workload_store::encode_allocation(&allocation),
            local: true,
            ..sh_spec(dir.path(), "echo hi; exit 6")
        };
        let identity = ShimIdentity {
            pid: 4242,
            start_ticks: 17,
        };
        let line = serde_json::to_string(&spec).unwrap();
        let (mut answer, mut diagnostics) = (Vec::new(), Vec::new());

        // The agent died mid-line: nothing is recorded, nothing runs.
        let code = run(
            &records,
            line.as_bytes(),
            &mut answer,
            &mut diagnostics,
            identity,
        );
        assert_eq!(code, 0);
        assert!(!records.exists());
        assert!(answer.is_empty() && diagnostics.is_empty());

        let whole = format!("{line}\n");
        let code = run(
            &records,
            whole.as_bytes(),
            &mut answer,
            &mut diagnostics,
            identity,
        );
        assert_eq!(code, 0, "{}", String::from_utf8_lossy(&diagnostics));
        let reply: Reply = serde_json::from_slice(answer.strip_suffix(b"\n").unwrap()).unwrap();
        let Reply::Started {
            pid,
            shim_pid: 4242,
            shim_start_ticks: 17,
        } = reply
        else {
            panic!("{reply:?}");
        };
        let recorded = workload_store::Records::File(records)
            .read()
            .unwrap()
            .unwrap();
        assert_eq!(recorded.allocation, allocation);
        assert_eq!(
            recorded.agent,
            AgentRecord {
                local: true,
                shim_pid: 4242,
                shim_start_ticks: 17,
                stop_requested: false,
            }
        );
        assert_eq!(recorded.started.map(|s| s.pid), Some(pid));
        assert_eq!(recorded.exit.and_then(|e| e.exit_code), Some(6));
        assert_eq!(std::fs::read_to_string(&spec.log_path).unwrap(), "hi\n");
    }

    /// An agent that stopped waiting for the start: before the shim's
    /// answer arrives it records the start as failed and closes the pipe.
    struct GaveUp(PathBuf);

    impl Write for GaveUp {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            let record = ExitRecord {
                exit_code: None,
                signal: None,
                start_error: Some("the workload shim did not answer within 10s".into()),
                finished_at_ms: 1,
            };
            workload_store::append_exit(&self.0, &record).unwrap();
            Err(std::io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_start_the_agent_gave_up_on_does_not_run_on_but_one_it_died_in_does() {
        for gave_up in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let records = dir.path().join("w.records");
            let spec = sh_spec(dir.path(), "sleep 30");
            let line = format!("{}\n", serde_json::to_string(&spec).unwrap());
            let identity = ShimIdentity {
                pid: 1,
                start_ticks: 1,
            };
            let mut diagnostics = Vec::new();
            if gave_up {
                let mut answer = GaveUp(records.clone());
                let code = run(
                    &records,
                    line.as_bytes(),
                    &mut answer,
                    &mut diagnostics,
                    identity,
                );
                assert_eq!(code, 1);
                let started = Records::File(records.clone())
                    .read_started()
                    .unwrap()
                    .unwrap();
                assert!(!alive(&started.pid.to_string()), "it ran on");
            } else {
                // The agent died: the answer goes nowhere, nothing recorded
                // an exit, the workload runs on (here until it is killed).
                let (reader, mut writer) = std::io::pipe().unwrap();
                drop(reader);
                let records_again = records.clone();
                let killer = std::thread::spawn(move || {
                    let started = loop {
                        if let Ok(Some(started)) =
                            Records::File(records_again.clone()).read_started()
                        {
                            break started;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    };
                    std::thread::sleep(Duration::from_millis(200));
                    let ran_on = alive(&started.pid.to_string());
                    let _ = killpg(Pid::from_raw(started.pid as i32), Signal::SIGKILL);
                    ran_on
                });
                run(
                    &records,
                    line.as_bytes(),
                    &mut writer,
                    &mut diagnostics,
                    identity,
                );
                assert!(
                    killer.join().unwrap(),
                    "the workload of a dead agent ran on"
                );
                let exit = Records::File(records).read_exit().unwrap().unwrap();
                assert_eq!(exit.signal, Some(9));
            }
        }
    }

    fn alive(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
            .is_ok_and(|s| !s[s.rfind(')').unwrap() + 1..].trim_start().starts_with('Z'))
    }

    #[test]
    fn output_and_exit_code_are_recorded_with_and_without_a_pidfd() {
        for watch in [true, false] {
            let (exit, log) = supervised("echo out; echo err >&2; exit 4", watch);
            assert_eq!(exit.exit_code, Some(4), "watch={watch}");
            assert_eq!(log, "out\nerr\n", "watch={watch}");
        }
    }

    #[test]
    fn what_a_workload_leaves_in_its_group_is_killed_when_it_ends() {
        for watch in [true, false] {
            // The background sleep holds the output pipe open.
            let (exit, log) = supervised("sleep 300 & echo $!; exit 3", watch);
            assert_eq!(exit.exit_code, Some(3), "watch={watch}");
            let (left, _) = log.split_once('\n').unwrap();
            assert!(!alive(left), "watch={watch}: {left} outlived its workload");
        }
    }

    #[test]
    fn an_escaped_process_holding_the_output_does_not_keep_the_workload_running() {
        // setsid takes the sleep out of the group: it survives the kill
        // and keeps the pipe open; the shim stops copying after
        // DRAIN_AFTER_EXIT and records the exit.
        let (exit, log) = supervised("setsid sleep 300 & echo $!; exit 0", true);
        assert_eq!(exit.exit_code, Some(0));
        let escaped = log.lines().next().unwrap().to_string();
        let _ = nix::sys::signal::kill(Pid::from_raw(escaped.parse().unwrap()), Signal::SIGKILL);
    }

    #[test]
    fn output_under_the_cap_is_kept_whole() {
        assert_eq!(capped(10, &[b"abc\n", b"defgh\n"]), "abc\ndefgh\n");
    }

    #[test]
    fn output_over_the_cap_ends_with_one_marker_line() {
        let text = capped(6, &[b"abc\n", b"defgh\n", b"more\n", b"and more\n"]);
        let (kept, marker) = text.split_at(6);
        assert_eq!(kept, "abc\nde");
        assert_eq!(
            marker,
            "\ngpufleet-agent: output truncated: the log reached log_max_bytes (6 bytes); the rest is discarded\n"
        );
    }

    #[test]
    fn a_cap_reached_at_a_line_end_adds_no_blank_line() {
        let text = capped(4, &[b"abc\n", b"d"]);
        assert!(
            text.starts_with("abc\ngpufleet-agent: output truncated"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn bytes_already_in_the_file_count_against_the_cap() {
        let mut log = CappedLog::with_existing(Vec::new(), 10, 8);
        log.write_all(b"12345").unwrap();
        let text = String::from_utf8(log.into_inner()).unwrap();
        assert!(text.starts_with("12\n"), "{text}");
        assert_eq!(text.matches("truncated").count(), 1);
    }

    fn spec_with_path(path: &str) -> LaunchSpec {
        LaunchSpec {
            allocation: String::new(),
            local: false,
            argv: vec!["sh".into()],
            log_path: "/tmp/output.log".into(),
            env: vec![
                ("PATH".into(), "/nowhere".into()),
                ("PATH".into(), path.into()),
            ],
            working_dir: "/tmp".into(),
            run_as: None,
            log_max_bytes: 64,
        }
    }

    #[test]
    fn bare_names_are_found_in_the_workloads_own_path() {
        let dir = tempfile::tempdir().unwrap();
        let (plain, tool) = (dir.path().join("plain"), dir.path().join("tool"));
        std::fs::write(&plain, "not executable").unwrap();
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("/no/such/dir:{}", dir.path().display());
        let spec = spec_with_path(&path);
        assert_eq!(found_in_path("tool", &spec), Some(tool));
        // Not executable, or absent: left to std's own search.
        assert_eq!(found_in_path("plain", &spec), None);
        assert_eq!(found_in_path("missing", &spec), None);
        // A path is never searched; nor is a PATH with relative entries.
        assert_eq!(found_in_path("./tool", &spec), None);
        let relative = spec_with_path(&format!("bin:{}", dir.path().display()));
        assert_eq!(found_in_path("tool", &relative), None);
        // Switching users: std forks anyway, and access() would check the
        // shim's user, not the workload's.
        let other_user = LaunchSpec {
            run_as: Some((1000, 1000)),
            ..spec_with_path(&path)
        };
        assert_eq!(found_in_path("tool", &other_user), None);
    }

    #[test]
    fn replies_and_specs_are_one_json_line() {
        let started = Reply::Started {
            pid: 12,
            shim_pid: 3,
            shim_start_ticks: 99,
        };
        let text = serde_json::to_string(&started).unwrap();
        assert_eq!(
            text,
            r#"{"started":{"pid":12,"shim_pid":3,"shim_start_ticks":99}}"#
        );
        let spec = LaunchSpec {
            allocation: "0a01".into(),
            local: true,
            argv: vec!["echo".into(), "a\nb".into()],
            log_path: "/tmp/output.log".into(),
            env: vec![("K".into(), "v".into())],
            working_dir: "/tmp".into(),
            run_as: Some((1000, 1000)),
            log_max_bytes: 64,
        };
        let line = serde_json::to_string(&spec).unwrap();
        assert!(!line.contains('\n'));
        assert_eq!(serde_json::from_str::<LaunchSpec>(&line).unwrap(), spec);
    }
}
