//! What the agent and a shim say to each other: the launch spec the agent
//! sends (one JSON line), the shim's one answer, and how a shim's process
//! is named in its records.

use std::io::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::workload_store;

/// The process a shim runs in, as its records name it: pid and start time
/// (clock ticks since boot), which tell it apart from a later process that
/// reuses the pid. Shims on the host's threads share the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ShimIdentity {
    pub(crate) pid: u32,
    pub(crate) start_ticks: u64,
}

impl ShimIdentity {
    pub(crate) fn of_this_process() -> Option<Self> {
        let pid = std::process::id();
        let stat = workload_store::proc_stat(pid)?;
        Some(Self {
            pid,
            start_ticks: stat.start_ticks,
        })
    }
}

/// What the agent tells the shim to run: the workload's command line and
/// its complete environment (the shim adds nothing), and what the shim
/// records for a restarted agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LaunchSpec {
    /// The allocation, as the records' `agent` line holds it.
    pub(crate) allocation: String,
    /// Started through the local `Agent` API.
    pub(crate) local: bool,
    pub(crate) argv: Vec<String>,
    /// The workload's `output.log`, appended to.
    pub(crate) log_path: PathBuf,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) working_dir: PathBuf,
    /// (uid, gid) to run as; `None`: the shim's own.
    pub(crate) run_as: Option<(u32, u32)>,
    pub(crate) log_max_bytes: u64,
}

/// The shim's one answer to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reply {
    Started {
        pid: u32,
        shim_pid: u32,
        shim_start_ticks: u64,
    },
    Failed {
        message: String,
    },
}

/// Answers the agent; false when the answer could not be delivered (the
/// agent is gone, or stopped waiting).
pub(crate) fn reply(answer: &mut dyn Write, reply: &Reply) -> bool {
    let Ok(mut text) = serde_json::to_string(reply) else {
        return false;
    };
    text.push('\n');
    answer.write_all(text.as_bytes()).is_ok() && answer.flush().is_ok()
}
