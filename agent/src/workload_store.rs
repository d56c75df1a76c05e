//! What survives an agent restart: files in one records directory per
//! workload, `data_dir/workloads/<id>/` (owner-only). They are kept apart
//! from the allocation directory `data_dir/allocations/<id>/` (the
//! workload's home and `output.log`) because that one may belong to the
//! workload's user, who must not be able to forge them. Every file is
//! written whole to a temporary name and renamed into place, so a reader
//! sees the old or the new version, never half of one.
//!
//! | file | written by | when |
//! |---|---|---|
//! | `allocation.pb` | agent | before the shim may start the workload (the allocation, protobuf) |
//! | `state.json` | agent | then: who asked, the shim's pid and start time; again when a stop is requested |
//! | `started.json` | shim | the workload's pid, right after it started |
//! | `exit.json` | shim | how the workload ended (or why it never started), after its output is drained |
//!
//! `state.json` is the agent's record that it is responsible for the
//! allocation: a restarted agent re-adopts or reports exactly the
//! allocations that have one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gpufleet_proto::v1::Allocation;
use prost::Message;
use serde::{Deserialize, Serialize};

pub(crate) const ALLOCATION_FILE: &str = "allocation.pb";
pub(crate) const STATE_FILE: &str = "state.json";
pub(crate) const STARTED_FILE: &str = "started.json";
pub(crate) const EXIT_FILE: &str = "exit.json";
/// In the allocation directory, written by the shim.
pub(crate) const LOG_FILE: &str = "output.log";

/// The agent's record of one allocation it started through a shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentRecord {
    /// `true`: started through the local `Agent` API.
    pub(crate) local: bool,
    /// The shim process and its start time (clock ticks since boot,
    /// `/proc/<pid>/stat` field 22), which tells it apart from a later
    /// process that reuses the pid.
    pub(crate) shim_pid: u32,
    pub(crate) shim_start_ticks: u64,
    /// A stop was requested: a signal death is then `Stopped`, not `Failed`.
    #[serde(default)]
    pub(crate) stop_requested: bool,
}

/// Written by the shim once the workload runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StartedRecord {
    /// Also the workload's process group id.
    pub(crate) pid: u32,
    pub(crate) started_at_ms: u64,
}

/// Written by the shim when the workload has ended or could not start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ExitRecord {
    pub(crate) exit_code: Option<i32>,
    pub(crate) signal: Option<i32>,
    /// Set instead of a code or signal when the workload never started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) start_error: Option<String>,
    pub(crate) finished_at_ms: u64,
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// Writes `bytes` to `dir/name` through a temporary file and a rename,
/// which is atomic against the agent or the shim dying at any point. No
/// fsync: a host crash ends every workload anyway, and a record it damaged
/// is reported as unreadable (the controller then counts the task lost).
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    drop(file);
    std::fs::rename(&tmp, dir.join(name))
}

fn write_json<T: Serialize>(dir: &Path, name: &str, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    write_atomic(dir, name, &bytes)
}

/// Reads `dir/name` as JSON; `Ok(None)` when the file does not exist.
fn read_json<T: for<'de> Deserialize<'de>>(dir: &Path, name: &str) -> Result<Option<T>, String> {
    let path = dir.join(name);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{} is not valid: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

pub(crate) fn write_allocation(dir: &Path, allocation: &Allocation) -> std::io::Result<()> {
    write_atomic(dir, ALLOCATION_FILE, &allocation.encode_to_vec())
}

pub(crate) fn read_allocation(dir: &Path) -> Result<Allocation, String> {
    let path = dir.join(ALLOCATION_FILE);
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Allocation::decode(bytes.as_slice())
        .map_err(|e| format!("{} is not valid: {e}", path.display()))
}

pub(crate) fn write_agent_record(dir: &Path, record: &AgentRecord) -> std::io::Result<()> {
    write_json(dir, STATE_FILE, record)
}

pub(crate) fn read_agent_record(dir: &Path) -> Result<Option<AgentRecord>, String> {
    read_json(dir, STATE_FILE)
}

/// Drops a workload's records, so a restarted agent no longer reports it
/// (its log, in the allocation directory, stays readable).
pub(crate) fn forget(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

pub(crate) fn write_started(dir: &Path, record: &StartedRecord) -> std::io::Result<()> {
    write_json(dir, STARTED_FILE, record)
}

pub(crate) fn read_started(dir: &Path) -> Result<Option<StartedRecord>, String> {
    read_json(dir, STARTED_FILE)
}

pub(crate) fn write_exit(dir: &Path, record: &ExitRecord) -> std::io::Result<()> {
    write_json(dir, EXIT_FILE, record)
}

pub(crate) fn read_exit(dir: &Path) -> Result<Option<ExitRecord>, String> {
    read_json(dir, EXIT_FILE)
}

/// `data_dir/workloads`: one records directory per workload below it.
pub(crate) fn records_root(data_dir: &Path) -> PathBuf {
    data_dir.join("workloads")
}

/// Creates a records directory (and its parents) readable by the agent's
/// user only: the allocation holds the job's environment.
pub(crate) fn create_records_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Every directory directly under `root`, sorted; none when `root` is missing.
pub(crate) fn subdirectories(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// One letter: R, S, D, Z (zombie), ...
    pub(crate) state: char,
    pub(crate) pgid: i32,
    pub(crate) session: i32,
    /// Field 22: clock ticks after boot at which the process started.
    pub(crate) start_ticks: u64,
}

/// Parses one `/proc/<pid>/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
pub(crate) fn parse_proc_stat(line: &str) -> Option<ProcStat> {
    let after = &line[line.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is field 3 (state); field N is fields[N - 3].
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        pgid: fields.get(2)?.parse().ok()?,
        session: fields.get(3)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

/// `None` when no such process exists (or /proc cannot say).
pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_proc_stat(&text)
}

/// Whether `pid` is still the process that started at `start_ticks` and has
/// not exited (a zombie has exited).
pub(crate) fn is_same_live_process(pid: u32, start_ticks: u64) -> bool {
    proc_stat(pid).is_some_and(|s| s.start_ticks == start_ticks && s.state != 'Z')
}

/// Processes still in process group `pgid` of session `session`: what is
/// left of a workload whose shim died. Both ids stay reserved while any
/// member lives, so a match cannot be an unrelated process.
pub(crate) fn group_members(pgid: i32, session: i32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            proc_stat(pid).is_some_and(|s| s.pgid == pgid && s.session == session && s.state != 'Z')
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::WorkloadSpec;

    #[test]
    fn records_round_trip_and_missing_files_read_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let d = &dir.path().join("job-1.0");
        create_records_dir(d).unwrap();
        assert_eq!(read_agent_record(d).unwrap(), None);
        assert_eq!(read_exit(d).unwrap(), None);
        assert_eq!(read_started(d).unwrap(), None);

        let record = AgentRecord {
            local: true,
            shim_pid: 42,
            shim_start_ticks: 123_456,
            stop_requested: false,
        };
        write_agent_record(d, &record).unwrap();
        assert_eq!(read_agent_record(d).unwrap(), Some(record.clone()));
        let stopped = AgentRecord {
            stop_requested: true,
            ..record
        };
        write_agent_record(d, &stopped).unwrap();
        assert_eq!(read_agent_record(d).unwrap(), Some(stopped));
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [STATE_FILE]);

        let exit = ExitRecord {
            exit_code: Some(3),
            signal: None,
            start_error: None,
            finished_at_ms: 1_700_000_000_000,
        };
        write_exit(d, &exit).unwrap();
        assert_eq!(read_exit(d).unwrap(), Some(exit));
        write_started(
            d,
            &StartedRecord {
                pid: 7,
                started_at_ms: 5,
            },
        )
        .unwrap();
        assert_eq!(read_started(d).unwrap().map(|s| s.pid), Some(7));

        let allocation = Allocation {
            allocation_id: "job-1.0".into(),
            job_id: "job-1".into(),
            task_index: 0,
            gpu_uuids: vec!["GPU-a".into()],
            workload: Some(WorkloadSpec {
                argv: vec!["sleep".into(), "1".into()],
                ..Default::default()
            }),
        };
        write_allocation(d, &allocation).unwrap();
        assert_eq!(read_allocation(d).unwrap(), allocation);

        forget(d).unwrap();
        assert!(!d.exists());
        assert_eq!(read_agent_record(d).unwrap(), None);
        forget(d).unwrap();
    }

    #[test]
    fn damaged_files_are_errors_that_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{\"local\": tr").unwrap();
        let err = read_agent_record(dir.path()).unwrap_err();
        assert!(err.contains(STATE_FILE), "{err}");
        std::fs::write(dir.path().join(ALLOCATION_FILE), b"\xff\xff\xff").unwrap();
        let err = read_allocation(dir.path()).unwrap_err();
        assert!(err.contains(ALLOCATION_FILE), "{err}");
    }

    #[test]
    fn proc_stat_fields_are_counted_after_the_command_name() {
        let line = "4242 (evil) name) S 1 4242 4240 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100 18446744073709551615";
        let stat = parse_proc_stat(line).unwrap();
        assert_eq!(stat.state, 'S');
        assert_eq!(stat.pgid, 4242);
        assert_eq!(stat.session, 4240);
        assert_eq!(stat.start_ticks, 987_654);
        assert_eq!(parse_proc_stat("12 (x) S 1"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_changed_start_time_is_not() {
        let me = std::process::id();
        let stat = proc_stat(me).unwrap();
        assert!(is_same_live_process(me, stat.start_ticks));
        assert!(!is_same_live_process(me, stat.start_ticks + 1));
    }
}
