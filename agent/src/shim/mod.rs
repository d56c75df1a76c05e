//! The workload shim: what stands between the agent and one workload, so
//! that workloads outlive the agent (like containerd-shim). It runs either
//! on a thread of the agent's shim host (`host`, the
//! agent's own executable started once as `<exe> __shim-host`, which
//! runs the shims of all the workloads it starts), or, with
//! `ShimLaunch::Exec` (the process runtime's setting), as its own process executed as
//! `<exe> __shim <records file>` per workload. Either way every binary that
//! embeds the agent calls [`dispatch`] first thing in `main`. A shim:
//!
//! 1. runs in a session of its own, apart from the agent's (the host calls
//!    `setsid` once; an executed shim does for itself), so signals meant
//!    for the agent (a terminal's Ctrl-C, a crash) do not reach it;
//! 2. reads one line, the [`protocol::LaunchSpec`], from the agent; end of input
//!    without a whole line means the agent went away: nothing starts;
//! 3. creates the workload's records file (see `workload_store`) with the
//!    allocation and its own pid and start time, so that no workload ever
//!    runs that a restarted agent does not know about;
//! 4. starts the workload in its own process group, records its pid (a
//!    `started` line) and answers one [`protocol::Reply`] line;
//! 5. copies the workload's stdout and stderr into its log up to
//!    `log_max_bytes`, then writes one marker line and keeps draining the
//!    pipe, so the workload never blocks on a full pipe;
//! 6. when the workload ends, kills what it left in its process group,
//!    records how it ended (an `exit` line) and closes its answer pipe:
//!    end of file there tells the agent the workload has ended.
//!
//! The shim is synchronous (one thread, no async runtime) to stay small.
//!
//! The folder: [`protocol`] holds what the agent and a shim say to each
//! other, `run` is one shim (from its launch spec to its workload's end),
//! `host` the shim host; this file only decides, from the command line,
//! which of them a process is.

mod host;
pub(crate) mod protocol;
mod run;

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

pub use host::HOST_ARG;
pub(crate) use host::{HostError, ShimHost};
use protocol::ShimIdentity;

/// First argument that makes an agent executable act as a shim.
pub const SHIM_ARG: &str = "__shim";

/// Runs the shim when this process was started as one, and returns its
/// exit code; `None` otherwise. Call it first thing in `main`:
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     if let Some(code) = gpufleet_agent::shim::dispatch() {
///         return code;
///     }
///     // ... the program itself
/// #   std::process::ExitCode::SUCCESS
/// }
/// ```
pub fn dispatch() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    let first = args.next();
    if first.as_deref() == Some(std::ffi::OsStr::new(HOST_ARG)) {
        return Some(host::serve());
    }
    if first.as_deref() != Some(std::ffi::OsStr::new(SHIM_ARG)) {
        return None;
    }
    let Some(records) = args.next() else {
        eprintln!("gpufleet shim: usage: {SHIM_ARG} <records file>");
        return Some(ExitCode::from(2));
    };
    if let Err(e) = nix::unistd::setsid() {
        // Fails only if the shim already leads a process group, which the
        // agent never makes it; it then still works, just without the
        // isolation from the agent's signals.
        eprintln!("gpufleet shim: setsid failed: {e}");
    }
    // What `ps -o comm` and `top` show (an executed shim would otherwise
    // be `exe` or the agent's name).
    let _ = nix::sys::prctl::set_name(c"gpufleet-shim");
    let Some(identity) = ShimIdentity::of_this_process() else {
        eprintln!("gpufleet shim: cannot read /proc/self/stat");
        return Some(ExitCode::from(1));
    };
    Some(ExitCode::from(run::run(
        Path::new(&records),
        std::io::stdin().lock(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
        identity,
    )))
}

/// `<shim program> __shim <records file>` with `argv[0]` naming what it
/// is, and an empty environment: the shim needs none, and the agent's may
/// hold its join token.
pub(crate) fn command(program: &Path, records: &Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg0(OsString::from("gpufleet-shim"))
        .arg(SHIM_ARG)
        .arg(records)
        .env_clear();
    cmd
}
