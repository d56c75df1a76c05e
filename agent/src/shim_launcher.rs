//! Starts workload shims by forking a small, long-lived launcher process
//! instead of executing the agent's binary once per workload.
//!
//! Executing a shim costs the kernel's `exec` and the dynamic loader's
//! relocation of a large binary: on a 2-core machine it took a third of
//! all CPU time when dispatching trivial jobs, more than the workloads
//! themselves. The launcher pays that once. It is the agent's own
//! executable started as `<exe> __shim-launcher` with one end of a Unix
//! socket as its stdin; for every workload the agent sends it the records
//! file's path and three descriptors (the shim's stdin, stdout and
//! stderr), and the launcher forks a child that becomes the shim (see
//! [`crate::shim`]) and answers the child's pid. The launcher is
//! single-threaded, so forking it is safe and cheap.
//!
//! The shims it forks are the launcher's children, not the agent's: the
//! launcher ignores `SIGCHLD` so the kernel reaps them, and the agent
//! learns that a shim ended from end of file on the shim's stdout (only
//! the shim holds its write end). The launcher exits at end of input,
//! when the agent goes away; its shims and workloads run on, as before.

#![allow(unsafe_code)]

use std::ffi::OsStr;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recv,
    recvmsg, send, sendmsg, socketpair,
};
use nix::unistd::{ForkResult, fork};

/// First argument that makes an agent executable act as the launcher.
pub const LAUNCHER_ARG: &str = "__shim-launcher";

/// Longest records path a request carries (Linux's `PATH_MAX`).
const MAX_REQUEST: usize = 4096;
/// Descriptors per request: the shim's stdin, stdout and stderr.
const FDS_PER_REQUEST: usize = 3;

/// The launcher process: serves requests on stdin until end of input.
pub(crate) fn serve() -> ExitCode {
    // `ps -o comm` and `top` name it (15 bytes at most).
    let _ = nix::sys::prctl::set_name(c"gpufleet-launch");
    // SAFETY: the process is single-threaded (this runs first thing in
    // `main`, before anything could start a thread), and the disposition
    // set is SIG_IGN, not a handler.
    let ignored = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
    if let Err(e) = unsafe { sigaction(Signal::SIGCHLD, &ignored) } {
        // Without it exited shims would stay zombies until the launcher
        // exits; refuse rather than leak.
        eprintln!("gpufleet shim launcher: cannot ignore SIGCHLD: {e}");
        return ExitCode::FAILURE;
    }
    // SAFETY: fd 0 is the socket the agent gave as stdin; nothing else in
    // this process owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(0) };
    loop {
        let request = match receive(socket.as_raw_fd()) {
            Ok(Some(request)) => request,
            // The agent went away.
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gpufleet shim launcher: cannot read a request: {e}");
                return ExitCode::FAILURE;
            }
        };
        let answer = match request {
            Ok(request) => launch(request),
            Err(message) => format!("err {message}"),
        };
        if let Err(e) = send(
            socket.as_raw_fd(),
            answer.as_bytes(),
            MsgFlags::MSG_NOSIGNAL,
        ) {
            eprintln!("gpufleet shim launcher: cannot answer the agent: {e}");
            return ExitCode::FAILURE;
        }
    }
}

struct Request {
    records: PathBuf,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// One request: `None` at end of input; an inner error for a malformed
/// request (answered, not fatal).
fn receive(socket: RawFd) -> nix::Result<Option<Result<Request, String>>> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_REQUEST]);
    let (len, fds, truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(
            socket,
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                let mut truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
                match msg.cmsgs() {
                    Ok(cmsgs) => {
                        for cmsg in cmsgs {
                            if let ControlMessageOwned::ScmRights(received) = cmsg {
                                // SAFETY: SCM_RIGHTS hands this process new
                                // descriptors that nothing else owns.
                                fds.extend(
                                    received
                                        .into_iter()
                                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                                );
                            }
                        }
                    }
                    Err(_) => truncated = true,
                }
                break (msg.bytes, fds, truncated);
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    };
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    if truncated {
        return Ok(Some(Err("the request was cut short".into())));
    }
    let Ok([stdin, stdout, stderr]) = <[OwnedFd; FDS_PER_REQUEST]>::try_from(fds) else {
        return Ok(Some(Err(format!(
            "a request must carry {FDS_PER_REQUEST} descriptors"
        ))));
    };
    let records = PathBuf::from(OsStr::from_bytes(&buf[..len]));
    Ok(Some(Ok(Request {
        records,
        stdin,
        stdout,
        stderr,
    })))
}

/// Forks the shim; answers `ok <pid>` or `err <message>`.
fn launch(request: Request) -> String {
    // SAFETY: the launcher is single-threaded, so the child inherits no
    // lock held by another thread and may run ordinary Rust code.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => std::process::exit(become_shim(request)),
        // The request's descriptors close here: from now on only the shim
        // holds them, so the agent sees end of file when the shim ends.
        Ok(ForkResult::Parent { child }) => format!("ok {child}"),
        Err(e) => format!("err cannot fork a workload shim: {e}"),
    }
}

/// In the forked child: takes the request's descriptors as stdin, stdout
/// and stderr (which also closes the launcher's socket, fd 0) and runs
/// the shim. Returns the exit status.
fn become_shim(request: Request) -> i32 {
    // Its own session, as an executed shim has: signals meant for the
    // agent's or the launcher's group do not reach it. The launcher leads
    // its process group; the forked child does not, so this succeeds.
    if let Err(e) = nix::unistd::setsid() {
        eprintln!("gpufleet shim: setsid failed: {e}");
    }
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: single-threaded (just forked); restoring the default. The
    // shim waits for its workload, and workloads must not inherit an
    // ignored SIGCHLD.
    if let Err(e) = unsafe { sigaction(Signal::SIGCHLD, &default) } {
        eprintln!("gpufleet shim: cannot restore SIGCHLD: {e}");
        return 1;
    }
    let moved = nix::unistd::dup2_stdin(&request.stdin)
        .and_then(|()| nix::unistd::dup2_stdout(&request.stdout))
        .and_then(|()| nix::unistd::dup2_stderr(&request.stderr));
    if let Err(e) = moved {
        eprintln!("gpufleet shim: cannot take the descriptors the agent sent: {e}");
        return 1;
    }
    drop(request.stdin);
    drop(request.stdout);
    drop(request.stderr);
    i32::from(crate::shim::run(&request.records))
}

/// The agent's end of a launcher process.
#[derive(Debug)]
pub(crate) struct Launcher {
    socket: OwnedFd,
    /// Killed when dropped (and then reaped by tokio in the background).
    _process: tokio::process::Child,
}

/// Why a launch failed.
#[derive(Debug)]
pub(crate) enum LaunchError {
    /// The request never reached the launcher (it is gone): start a new
    /// one and send it again.
    Unsent(String),
    /// The launcher took the request but gave no usable answer: it may
    /// have forked a shim. Start a new launcher for later requests, but do
    /// not send this one again; once the caller closes its end of the
    /// shim's stdin, a shim forked anyway exits without starting anything.
    Broken(String),
    /// The launcher could not fork; it still serves.
    Failed(String),
}

impl Launcher {
    /// Starts `<program> __shim-launcher`. Needs a tokio runtime context.
    pub(crate) fn start(program: &Path) -> Result<Self, String> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("cannot create the shim launcher's socket: {e}"))?;
        let process = tokio::process::Command::new(program)
            .arg0("gpufleet-shim-launcher")
            .arg(LAUNCHER_ARG)
            // The agent's environment may hold its join token; shims and
            // workloads get theirs from the launch spec.
            .env_clear()
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // A terminal's Ctrl-C meant for the agent does not reach it; it
            // exits when the agent goes away (end of input).
            .process_group(0)
            // A launcher given up on (it stopped answering) must not linger;
            // killing it leaves its shims running.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start the workload shim launcher {}: {e}",
                    program.display()
                )
            })?;
        Ok(Self {
            socket: ours,
            _process: process,
        })
    }

    /// Asks for a shim with these descriptors as its stdin, stdout and
    /// stderr, and returns its pid. The caller closes its copies of the
    /// descriptors afterwards.
    pub(crate) fn launch(
        &self,
        records: &Path,
        stdio: [BorrowedFd<'_>; FDS_PER_REQUEST],
        timeout: Duration,
    ) -> Result<u32, LaunchError> {
        let path = records.as_os_str().as_bytes();
        if path.len() > MAX_REQUEST {
            return Err(LaunchError::Failed(format!(
                "the records path {} is longer than {MAX_REQUEST} bytes",
                records.display()
            )));
        }
        let raw = stdio.map(|fd| fd.as_raw_fd());
        let rights = [ControlMessage::ScmRights(&raw)];
        loop {
            match sendmsg::<()>(
                self.socket.as_raw_fd(),
                &[IoSlice::new(path)],
                &rights,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(LaunchError::Unsent(format!(
                        "cannot reach the workload shim launcher: {e}"
                    )));
                }
            }
        }
        let answer = self.answer(timeout)?;
        if let Some(pid) = answer.strip_prefix("ok ") {
            return pid.parse().map_err(|_| {
                LaunchError::Broken(format!(
                    "the workload shim launcher answered {answer:?}, not a pid"
                ))
            });
        }
        match answer.strip_prefix("err ") {
            Some(message) => Err(LaunchError::Failed(message.to_string())),
            None => Err(LaunchError::Broken(format!(
                "the workload shim launcher answered {answer:?}"
            ))),
        }
    }

    fn answer(&self, timeout: Duration) -> Result<String, LaunchError> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let gone = LaunchError::Broken;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(gone(format!(
                    "the workload shim launcher did not answer within {timeout:?}"
                )));
            }
            let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
            match poll(
                &mut fds,
                PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => break,
                Err(e) => return Err(gone(format!("cannot wait for the shim launcher: {e}"))),
            }
        }
        let mut buf = [0u8; 1024];
        let len = loop {
            match recv(self.socket.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(len) => break len,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(gone(format!("cannot read the shim launcher's answer: {e}"))),
            }
        };
        if len == 0 {
            return Err(gone("the workload shim launcher exited".into()));
        }
        Ok(String::from_utf8_lossy(&buf[..len]).into_owned())
    }
}
