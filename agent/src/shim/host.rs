//! The shim host: one long-lived process per agent that runs the shims
//! (see [`crate::shim`]) of the workloads it starts, each on a thread of
//! its own, instead of one shim process per workload.
//!
//! A process per workload cost the machine a fork, the page faults of the
//! forked child and its teardown on every start: on a 2-core machine
//! dispatching trivial jobs the shims and the process that forked them took
//! a fifth of all CPU time, more than the agent. A thread costs a small
//! stack. The host is the agent's own executable started as
//! `<exe> __shim-host` with one end of a Unix socket as its stdin. For
//! every workload the agent sends it the records file's path and three
//! descriptors: the read end of a pipe that will carry the launch spec,
//! the write end of the pipe for the shim's answer, and the workload's log
//! (for the shim's own diagnostics). The host hands them to an idle shim
//! thread (a thread whose workload ended waits a minute for the next), or
//! starts a new one, and reads the next request; it never answers on the
//! socket. The
//! agent learns that a workload ended from end of file on the answer pipe
//! (only its shim thread holds the write end).
//!
//! The host leads a session of its own, apart from the agent's, and the
//! workloads are its children, each in its own process group. It outlives
//! the agent: at end of input (the agent went away or replaced it) it takes
//! no more requests, serves the shims it has until their workloads end, and
//! exits. A restarted agent starts a new host for new workloads and
//! re-adopts the old host's through their records. The price of sharing
//! one process: if the host dies, every workload it started loses its
//! shim, and the agent reports them lost and kills what is left of them
//! (their records name the host as their shim, and the host's session is
//! theirs). A shim thread that panics takes down only its own workload.

#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::io::{BufReader, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};

use super::protocol::{Reply, ShimIdentity, reply};

/// First argument that makes an agent executable act as the shim host.
pub const HOST_ARG: &str = "__shim-host";

/// Longest records path a request carries (Linux's `PATH_MAX`).
const MAX_REQUEST: usize = 4096;
/// Descriptors per request: the launch spec's pipe, the answer pipe and the
/// workload's log.
const FDS_PER_REQUEST: usize = 3;
/// A shim thread's stack: its output buffer (16 KiB), JSON and a few
/// frames. Only the pages it touches are resident.
const SHIM_STACK: usize = 256 * 1024;
/// How long a shim thread whose workload ended waits for the next one
/// before it exits. Reusing threads spares each start a thread's creation,
/// the page faults of a fresh stack and its unmapping.
const IDLE_SHIM_THREAD: Duration = Duration::from_secs(60);

/// The host process: serves requests on stdin until end of input, then
/// waits for its shims.
pub(crate) fn serve() -> ExitCode {
    // `ps -o comm` and `top` name it (15 bytes at most).
    let _ = nix::sys::prctl::set_name(c"gpufleet-shims");
    // The agent starts it in the agent's own process group, so it leads
    // none and this succeeds; a failure only costs the isolation.
    if let Err(e) = nix::unistd::setsid() {
        eprintln!("gpufleet shim host: setsid failed: {e}");
    }
    // SAFETY: the process is single-threaded (this runs first thing in
    // `main`), and the disposition set is SIG_DFL, not a handler. The
    // shims wait for their workloads, which an ignored SIGCHLD would reap
    // behind their backs.
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    if let Err(e) = unsafe { sigaction(Signal::SIGCHLD, &default) } {
        eprintln!("gpufleet shim host: cannot restore SIGCHLD: {e}");
        return ExitCode::FAILURE;
    }
    let Some(identity) = ShimIdentity::of_this_process() else {
        eprintln!("gpufleet shim host: cannot read /proc/self/stat");
        return ExitCode::FAILURE;
    };
    // SAFETY: fd 0 is the socket the agent gave as stdin; nothing else in
    // this process owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(0) };
    let pool = Arc::new(ShimPool::default());
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    loop {
        let request = match receive(socket.as_raw_fd()) {
            Ok(Some(request)) => request,
            // The agent went away, or gave this host up.
            Ok(None) => break,
            Err(e) => {
                eprintln!("gpufleet shim host: cannot read a request: {e}; taking no more");
                break;
            }
        };
        threads.retain(|thread| !thread.is_finished());
        match request {
            Ok(request) => {
                if let Some(request) = pool.hand_to_idle_thread(request)
                    && let Some(thread) = start_shim_thread(request, &pool, identity)
                {
                    threads.push(thread);
                }
            }
            Err(message) => eprintln!("gpufleet shim host: {message}"),
        }
    }
    drop(socket);
    pool.close();
    for thread in threads {
        // A panicked shim already dropped its answer pipe: the agent
        // reports its workload lost.
        let _ = thread.join();
    }
    ExitCode::SUCCESS
}

/// Requests waiting for an idle shim thread, and how many idle threads are
/// not yet promised one.
#[derive(Default)]
struct ShimPool {
    state: Mutex<PoolState>,
    wake: Condvar,
}

#[derive(Default)]
struct PoolState {
    queued: VecDeque<Request>,
    /// Idle threads minus queued requests: never negative, so every queued
    /// request has a thread that will take it.
    unpromised_idle: usize,
    /// End of input: idle threads exit.
    closing: bool,
}

impl ShimPool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `request` for an idle thread; gives it back when none is idle.
    fn hand_to_idle_thread(&self, request: Request) -> Option<Request> {
        let mut state = self.lock();
        if state.unpromised_idle == 0 {
            return Some(request);
        }
        state.unpromised_idle -= 1;
        state.queued.push_back(request);
        drop(state);
        self.wake.notify_one();
        None
    }

    /// Counts the calling thread as idle; it then waits in
    /// [`Self::next_request`].
    fn become_idle(&self) {
        self.lock().unpromised_idle += 1;
    }

    /// Waits, idle (see [`Self::become_idle`]), for the next request;
    /// `None` when the thread should exit (idle for [`IDLE_SHIM_THREAD`],
    /// or the host is closing).
    fn next_request(&self) -> Option<Request> {
        let mut state = self.lock();
        loop {
            if let Some(request) = state.queued.pop_front() {
                return Some(request);
            }
            // Leave only when no queued request counts on this thread.
            if state.closing && state.unpromised_idle > 0 {
                state.unpromised_idle -= 1;
                return None;
            }
            let (next, waited) = self
                .wake
                .wait_timeout(state, IDLE_SHIM_THREAD)
                .unwrap_or_else(|e| e.into_inner());
            state = next;
            if waited.timed_out() && state.queued.is_empty() && state.unpromised_idle > 0 {
                state.unpromised_idle -= 1;
                return None;
            }
        }
    }

    fn close(&self) {
        self.lock().closing = true;
        self.wake.notify_all();
    }
}

struct Request {
    records: PathBuf,
    spec: OwnedFd,
    answer: OwnedFd,
    log: OwnedFd,
}

/// Starts a shim thread with its first request; it serves more while it
/// is idle. A failure is answered on the request's answer pipe (nothing
/// was recorded, nothing runs).
fn start_shim_thread(
    request: Request,
    pool: &Arc<ShimPool>,
    identity: ShimIdentity,
) -> Option<JoinHandle<()>> {
    let answer_on_failure = request.answer.try_clone();
    let pool = pool.clone();
    let spawned = std::thread::Builder::new()
        .name("gpufleet-shim".into())
        .stack_size(SHIM_STACK)
        .spawn(move || {
            let mut next = Some(request);
            while let Some(request) = next {
                let answer = run_shim(request, identity);
                // Idle before the agent learns that the workload ended, so
                // the start that its end lets in finds this thread.
                pool.become_idle();
                drop(answer);
                next = pool.next_request();
            }
        });
    match spawned {
        Ok(thread) => Some(thread),
        Err(e) => {
            if let Ok(answer) = answer_on_failure {
                let message = format!("the shim host cannot start a shim thread: {e}");
                reply(&mut std::fs::File::from(answer), &Reply::Failed { message });
            }
            None
        }
    }
}

/// One workload's shim, from its request to its end. Returns the answer
/// pipe, whose end of file tells the agent the workload ended.
fn run_shim(request: Request, identity: ShimIdentity) -> std::fs::File {
    let Request {
        records,
        spec,
        answer,
        log,
    } = request;
    let mut answer = std::fs::File::from(answer);
    let mut diagnostics = std::fs::File::from(log);
    super::run::run(
        &records,
        BufReader::new(std::fs::File::from(spec)),
        &mut answer,
        &mut diagnostics,
        identity,
    );
    answer
}

/// One request: `None` at end of input; an inner error for a malformed
/// request (its descriptors are closed, which the agent sees as a shim
/// that ended without answering).
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
        return Ok(Some(Err("a request was cut short; dropped".into())));
    }
    let Ok([spec, answer, log]) = <[OwnedFd; FDS_PER_REQUEST]>::try_from(fds) else {
        return Ok(Some(Err(format!(
            "a request must carry {FDS_PER_REQUEST} descriptors; dropped"
        ))));
    };
    let records = PathBuf::from(OsStr::from_bytes(&buf[..len]));
    Ok(Some(Ok(Request {
        records,
        spec,
        answer,
        log,
    })))
}

/// The agent's end of a shim host process.
#[derive(Debug)]
pub(crate) struct ShimHost {
    socket: OwnedFd,
    /// Never killed: its shims outlive it being replaced. Closing the
    /// socket (dropping this) lets it exit once its workloads have ended;
    /// tokio reaps it meanwhile.
    _process: tokio::process::Child,
}

/// Why a request did not reach the host.
#[derive(Debug)]
pub(crate) enum HostError {
    /// The host is gone: start a new one and send it again.
    Gone(String),
    /// The request cannot be sent to any host.
    Invalid(String),
}

impl ShimHost {
    /// Starts `<program> __shim-host`. Needs a tokio runtime context.
    pub(crate) fn start(program: &Path) -> Result<Self, String> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| format!("cannot create the shim host's socket: {e}"))?;
        let process = tokio::process::Command::new(program)
            .arg0("gpufleet-shim-host")
            .arg(HOST_ARG)
            // The agent's environment may hold its join token; workloads get
            // theirs from the launch spec.
            .env_clear()
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // It calls setsid first thing (a terminal's Ctrl-C meant for the
            // agent does not reach it); in the agent's own process group
            // until then, so that it does not lead one and setsid works.
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start the workload shim host {}: {e}",
                    program.display()
                )
            })?;
        Ok(Self {
            socket: ours,
            _process: process,
        })
    }

    /// Hands the host a shim's descriptors: the read end of its launch
    /// spec's pipe, the write end of its answer pipe and the workload's
    /// log. The caller closes its copies afterwards, then writes the spec
    /// and reads the answer.
    pub(crate) fn launch(
        &self,
        records: &Path,
        descriptors: [BorrowedFd<'_>; FDS_PER_REQUEST],
    ) -> Result<(), HostError> {
        let path = records.as_os_str().as_bytes();
        if path.len() > MAX_REQUEST {
            return Err(HostError::Invalid(format!(
                "the records path {} is longer than {MAX_REQUEST} bytes",
                records.display()
            )));
        }
        let raw = descriptors.map(|fd| fd.as_raw_fd());
        let rights = [ControlMessage::ScmRights(&raw)];
        loop {
            match sendmsg::<()>(
                self.socket.as_raw_fd(),
                &[IoSlice::new(path)],
                &rights,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(HostError::Gone(format!(
                        "cannot reach the workload shim host: {e}"
                    )));
                }
            }
        }
    }
}
