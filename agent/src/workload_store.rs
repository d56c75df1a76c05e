//! What survives an agent restart: one records file per workload,
//! `data_dir/workloads/<id>.records`, in a directory only the agent's user
//! may enter. It is kept apart from the allocation directory
//! `data_dir/allocations/<id>/` (the workload's home and `output.log`)
//! because that one may belong to the workload's user, who must not be able
//! to forge it.
//!
//! The file is a log of JSON lines ([`Line`]), each appended with one
//! `write` (`O_APPEND`, so the agent and the shim never overwrite each
//! other's lines). The shim creates the file once it holds the whole
//! launch spec, so a file exists exactly for the workloads a shim may have
//! started, whenever the agent died:
//!
//! | line | written by | when |
//! |---|---|---|
//! | `agent` | shim, creating the file | before it starts the workload, from the agent's launch spec: the allocation (protobuf, hex), who asked, the shim's pid and start time |
//! | `started` | shim | the workload's pid, right after it started |
//! | `stop_requested` | agent | before it signals a stop |
//! | `exit` | shim (the agent, when the shim failed) | how the workload ended (or why it never started), after its output is drained |
//!
//! A line counts once its newline is there: a last line without one is a
//! write in progress or a writer that died mid-write, and is ignored. A
//! complete `agent` line is the agent's record that it is responsible for
//! the allocation: a restarted agent re-adopts or reports exactly the
//! workloads whose file has one. Nothing is synced: a host crash ends every
//! workload anyway, and a record it damaged is reported as unreadable (the
//! controller then counts the task lost).
//!
//! One file, created once and deleted once, because on some file systems
//! (ext4 without a journal) every created file or directory costs a scan
//! past recently freed inodes: agents before this layout used a records
//! directory of four files, each written through a temporary file. That
//! layout ([`Records::Legacy`]) is still read, so that an upgraded agent
//! re-adopts the workloads an older one started (whose shims keep writing
//! it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gpufleet_proto::v1::Allocation;
use prost::Message;
use serde::{Deserialize, Serialize};

/// Name suffix of a records file: `<allocation id>.records`.
pub(crate) const RECORDS_SUFFIX: &str = ".records";
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

/// The agent's first line: the allocation and the shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentLine {
    /// The allocation's protobuf encoding, in hex.
    allocation: String,
    local: bool,
    shim_pid: u32,
    shim_start_ticks: u64,
}

/// One line of a records file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Agent(AgentLine),
    Started(StartedRecord),
    StopRequested,
    Exit(ExitRecord),
}

/// Everything recorded about a workload the agent is responsible for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Recorded {
    pub(crate) allocation: Allocation,
    pub(crate) agent: AgentRecord,
    pub(crate) started: Option<StartedRecord>,
    pub(crate) exit: Option<ExitRecord>,
}

/// Where one workload's records are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Records {
    /// `data_dir/workloads/<id>.records`: the current layout.
    File(PathBuf),
    /// `data_dir/workloads/<id>/`, written by agents (and their shims)
    /// before the records file: `allocation.pb` (protobuf), `state.json`
    /// ([`AgentRecord`]), `started.json`, `exit.json`, each replaced whole
    /// through a temporary file and a rename. Read for re-adoption; the
    /// agent writes into it only the stop request of a workload it
    /// re-adopted from it.
    Legacy(PathBuf),
}

impl Records {
    /// Everything recorded; `Ok(None)` when there is no complete agent
    /// record (a launch the agent died in before it let the shim start the
    /// workload, or records already forgotten).
    pub(crate) fn read(&self) -> Result<Option<Recorded>, String> {
        match self {
            Records::File(path) => Ok(read_file(path)?.into_recorded()),
            Records::Legacy(dir) => legacy::read(dir),
        }
    }

    /// How the workload ended, once recorded.
    pub(crate) fn read_exit(&self) -> Result<Option<ExitRecord>, String> {
        match self {
            Records::File(path) => Ok(read_file(path)?.exit),
            Records::Legacy(dir) => legacy::read_json(dir, legacy::EXIT_FILE),
        }
    }

    /// The workload's pid, once recorded.
    pub(crate) fn read_started(&self) -> Result<Option<StartedRecord>, String> {
        match self {
            Records::File(path) => Ok(read_file(path)?.started),
            Records::Legacy(dir) => legacy::read_json(dir, legacy::STARTED_FILE),
        }
    }

    /// Records that a stop was requested for the workload `record` names.
    pub(crate) fn record_stop(&self, record: &AgentRecord) -> std::io::Result<()> {
        match self {
            Records::File(path) => append(path, &Line::StopRequested),
            Records::Legacy(dir) => legacy::write_json(
                dir,
                legacy::STATE_FILE,
                &AgentRecord {
                    stop_requested: true,
                    ..record.clone()
                },
            ),
        }
    }

    /// Drops the records, so a restarted agent no longer reports the
    /// workload (its log, in the allocation directory, stays readable).
    /// Records already gone are fine.
    pub(crate) fn forget(&self) -> std::io::Result<()> {
        let removed = match self {
            Records::File(path) => std::fs::remove_file(path),
            Records::Legacy(dir) => std::fs::remove_dir_all(dir),
        };
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The file or directory, for messages.
    pub(crate) fn path(&self) -> &Path {
        match self {
            Records::File(path) | Records::Legacy(path) => path,
        }
    }
}

/// `data_dir/workloads`: every workload's records below it.
pub(crate) fn records_root(data_dir: &Path) -> PathBuf {
    data_dir.join("workloads")
}

/// The records file of allocation `id` under `root`.
pub(crate) fn records_file(root: &Path, id: &str) -> PathBuf {
    root.join(format!("{id}{RECORDS_SUFFIX}"))
}

/// Creates the records root (and its parents) if it is missing, readable
/// by the agent's user only: allocations hold jobs' environments.
pub(crate) fn create_records_root(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
}

/// Creates the records file `path` (owner-only; replacing any leftover)
/// with the agent's line, in one write.
#[cfg(test)]
pub(crate) fn create_records(
    path: &Path,
    allocation: &Allocation,
    record: &AgentRecord,
) -> std::io::Result<()> {
    create_records_encoded(path, &encode_allocation(allocation), record)
}

/// An allocation as the `agent` line holds it (protobuf, in hex).
pub(crate) fn encode_allocation(allocation: &Allocation) -> String {
    hex_encode(&allocation.encode_to_vec())
}

/// [`create_records`] with the allocation already encoded by
/// [`encode_allocation`]: what the shim writes, from its launch spec.
pub(crate) fn create_records_encoded(
    path: &Path,
    allocation: &str,
    record: &AgentRecord,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let line = Line::Agent(AgentLine {
        allocation: allocation.to_string(),
        local: record.local,
        shim_pid: record.shim_pid,
        shim_start_ticks: record.shim_start_ticks,
    });
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(&encode_line(&line)?)?;
    Ok(())
}

/// Appends the workload's pid (the shim, right after the start).
pub(crate) fn append_started(path: &Path, record: &StartedRecord) -> std::io::Result<()> {
    append(path, &Line::Started(record.clone()))
}

/// Appends how the workload ended.
pub(crate) fn append_exit(path: &Path, record: &ExitRecord) -> std::io::Result<()> {
    append(path, &Line::Exit(record.clone()))
}

fn encode_line(line: &Line) -> std::io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(line).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Appends one line with one `write` to an existing records file (never
/// creates one: a file that is gone was forgotten).
fn append(path: &Path, line: &Line) -> std::io::Result<()> {
    let bytes = encode_line(line)?;
    let mut file = std::fs::OpenOptions::new().append(true).open(path)?;
    // One write for the whole line, so that it lands whole even next to
    // the other writer's lines.
    let written = file.write(&bytes)?;
    if written != bytes.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!(
                "wrote {written} of {} bytes of a record to {}",
                bytes.len(),
                path.display()
            ),
        ));
    }
    Ok(())
}

/// The lines of a records file, folded: the last of each kind wins.
#[derive(Debug, Default)]
struct Folded {
    agent: Option<(Allocation, AgentRecord)>,
    stop_requested: bool,
    started: Option<StartedRecord>,
    exit: Option<ExitRecord>,
}

impl Folded {
    fn into_recorded(self) -> Option<Recorded> {
        let (allocation, mut agent) = self.agent?;
        agent.stop_requested |= self.stop_requested;
        Some(Recorded {
            allocation,
            agent,
            started: self.started,
            exit: self.exit,
        })
    }
}

/// Reads a records file; a missing file reads as empty.
fn read_file(path: &Path) -> Result<Folded, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Folded::default()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let mut folded = Folded::default();
    // The part after the last newline is a line still being written (or
    // never finished): not there yet.
    let complete = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(end) => &bytes[..end],
        None => return Ok(folded),
    };
    for (n, text) in complete.split(|&b| b == b'\n').enumerate() {
        let invalid = |e: String| format!("{} line {} is not valid: {e}", path.display(), n + 1);
        match serde_json::from_slice::<Line>(text).map_err(|e| invalid(e.to_string()))? {
            Line::Agent(line) => {
                let bytes = hex_decode(&line.allocation)
                    .ok_or_else(|| invalid("the allocation is not hex".into()))?;
                let allocation = Allocation::decode(bytes.as_slice())
                    .map_err(|e| invalid(format!("the allocation: {e}")))?;
                let record = AgentRecord {
                    local: line.local,
                    shim_pid: line.shim_pid,
                    shim_start_ticks: line.shim_start_ticks,
                    stop_requested: false,
                };
                folded.agent = Some((allocation, record));
            }
            Line::Started(started) => folded.started = Some(started),
            Line::StopRequested => folded.stop_requested = true,
            Line::Exit(exit) => folded.exit = Some(exit),
        }
    }
    Ok(folded)
}

fn hex_encode(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(text, "{b:02x}");
    }
    text
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Every workload's records under `root`, sorted by path: records files
/// and legacy records directories, each with the allocation id its name
/// gives. None when `root` is missing; other entries are skipped.
pub(crate) fn list_records(root: &Path) -> std::io::Result<Vec<(String, Records)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let kind = entry.file_type()?;
        if kind.is_dir() {
            found.push((name, Records::Legacy(entry.path())));
        } else if kind.is_file()
            && let Some(id) = name.strip_suffix(RECORDS_SUFFIX)
            && !id.is_empty()
        {
            found.push((id.to_string(), Records::File(entry.path())));
        }
    }
    found.sort_by(|a, b| a.1.path().cmp(b.1.path()));
    Ok(found)
}

/// The records directory layout of agents before the records file.
mod legacy {
    use super::*;

    pub(super) const ALLOCATION_FILE: &str = "allocation.pb";
    pub(super) const STATE_FILE: &str = "state.json";
    pub(super) const STARTED_FILE: &str = "started.json";
    pub(super) const EXIT_FILE: &str = "exit.json";

    pub(super) fn read(dir: &Path) -> Result<Option<Recorded>, String> {
        let Some(agent) = read_json::<AgentRecord>(dir, STATE_FILE)? else {
            return Ok(None);
        };
        let path = dir.join(ALLOCATION_FILE);
        let bytes =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let allocation = Allocation::decode(bytes.as_slice())
            .map_err(|e| format!("{} is not valid: {e}", path.display()))?;
        Ok(Some(Recorded {
            allocation,
            agent,
            started: read_json(dir, STARTED_FILE)?,
            exit: read_json(dir, EXIT_FILE)?,
        }))
    }

    /// Reads `dir/name` as JSON; `Ok(None)` when the file does not exist.
    pub(super) fn read_json<T: for<'de> Deserialize<'de>>(
        dir: &Path,
        name: &str,
    ) -> Result<Option<T>, String> {
        let path = dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{} is not valid: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Replaces `dir/name` whole, through a temporary file and a rename,
    /// as the old agent did: its readers expect nothing else.
    pub(super) fn write_json<T: Serialize>(
        dir: &Path,
        name: &str,
        value: &T,
    ) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        drop(file);
        std::fs::rename(&tmp, dir.join(name))
    }
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

    fn allocation(id: &str) -> Allocation {
        Allocation {
            gang: None,
            allocation_id: id.into(),
            job_id: "job-1".into(),
            task_index: 0,
            gpu_uuids: vec!["GPU-a".into()],
            workload: Some(WorkloadSpec {
                argv: vec!["sleep".into(), "1".into()],
                env: [("TOKEN".to_string(), "a \"quoted\"\nvalue".to_string())].into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn agent_record() -> AgentRecord {
        AgentRecord {
            local: true,
            shim_pid: 42,
            shim_start_ticks: 123_456,
            stop_requested: false,
        }
    }

    fn exit_record(code: i32) -> ExitRecord {
        ExitRecord {
            exit_code: Some(code),
            signal: None,
            start_error: None,
            finished_at_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn a_records_file_collects_the_agents_and_the_shims_lines() {
        let dir = tempfile::tempdir().unwrap();
        let root = records_root(dir.path());
        create_records_root(&root).unwrap();
        let path = records_file(&root, "job-1.0");
        let records = Records::File(path.clone());
        assert_eq!(records.read().unwrap(), None);
        assert_eq!(records.read_exit().unwrap(), None);

        create_records(&path, &allocation("job-1.0"), &agent_record()).unwrap();
        let read = records.read().unwrap().unwrap();
        assert_eq!(read.allocation, allocation("job-1.0"));
        assert_eq!(read.agent, agent_record());
        assert_eq!((read.started, read.exit), (None, None));

        let started = StartedRecord {
            pid: 7,
            started_at_ms: 5,
        };
        append_started(&path, &started).unwrap();
        records.record_stop(&agent_record()).unwrap();
        append_exit(&path, &exit_record(3)).unwrap();
        let read = records.read().unwrap().unwrap();
        assert!(read.agent.stop_requested);
        assert_eq!(read.started, Some(started.clone()));
        assert_eq!(read.exit, Some(exit_record(3)));
        assert_eq!(records.read_started().unwrap(), Some(started));
        assert_eq!(records.read_exit().unwrap(), Some(exit_record(3)));

        // One file, owner-only, next to nothing else.
        use std::os::unix::fs::PermissionsExt;
        let names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["job-1.0.records"]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            list_records(&root).unwrap(),
            [("job-1.0".to_string(), records.clone())]
        );

        records.forget().unwrap();
        assert!(!path.exists());
        assert_eq!(records.read().unwrap(), None);
        records.forget().unwrap();
        // Appending never recreates a forgotten file.
        assert!(append_exit(&path, &exit_record(0)).is_err());
        assert!(!path.exists());
    }

    #[test]
    fn an_unfinished_last_line_is_not_there_yet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.records");
        create_records(&path, &allocation("w"), &agent_record()).unwrap();
        let whole = std::fs::read(&path).unwrap();
        // The agent died in its first write: an aborted launch.
        std::fs::write(&path, &whole[..whole.len() / 2]).unwrap();
        assert_eq!(Records::File(path.clone()).read().unwrap(), None);
        // The shim died in its exit write: no exit recorded.
        std::fs::write(&path, &whole).unwrap();
        let mut torn = serde_json::to_vec(&Line::Exit(exit_record(1))).unwrap();
        torn.truncate(torn.len() - 3);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(&torn)
            .unwrap();
        let read = Records::File(path).read().unwrap().unwrap();
        assert_eq!(read.exit, None);
    }

    #[test]
    fn damaged_records_are_errors_that_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.records");
        create_records(&path, &allocation("w"), &agent_record()).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"exit\": {\"exit_co\n")
            .unwrap();
        let err = Records::File(path.clone()).read().unwrap_err();
        assert!(err.contains("w.records line 2"), "{err}");
        std::fs::write(&path, b"{\"agent\":{\"allocation\":\"zz\",\"local\":false,\"shim_pid\":1,\"shim_start_ticks\":2}}\n").unwrap();
        let err = Records::File(path).read().unwrap_err();
        assert!(err.contains("line 1") && err.contains("hex"), "{err}");

        let legacy = dir.path().join("old");
        std::fs::create_dir(&legacy).unwrap();
        std::fs::write(legacy.join(legacy::STATE_FILE), b"{\"local\": tr").unwrap();
        let err = Records::Legacy(legacy.clone()).read().unwrap_err();
        assert!(err.contains(legacy::STATE_FILE), "{err}");
        std::fs::write(
            legacy.join(legacy::STATE_FILE),
            b"{\"local\":true,\"shim_pid\":1,\"shim_start_ticks\":2}",
        )
        .unwrap();
        std::fs::write(legacy.join(legacy::ALLOCATION_FILE), b"\xff\xff\xff").unwrap();
        let err = Records::Legacy(legacy).read().unwrap_err();
        assert!(err.contains(legacy::ALLOCATION_FILE), "{err}");
    }

    /// The files an agent (and its shim) wrote before the records file,
    /// byte for byte as they wrote them.
    fn write_legacy(dir: &Path, started: bool, exit: bool) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            dir.join("allocation.pb"),
            allocation("old-1.0").encode_to_vec(),
        )
        .unwrap();
        std::fs::write(
            dir.join("state.json"),
            br#"{"local":false,"shim_pid":4242,"shim_start_ticks":987654,"stop_requested":false}"#,
        )
        .unwrap();
        if started {
            std::fs::write(
                dir.join("started.json"),
                br#"{"pid":4243,"started_at_ms":1700000000000}"#,
            )
            .unwrap();
        }
        if exit {
            std::fs::write(
                dir.join("exit.json"),
                br#"{"exit_code":null,"signal":9,"finished_at_ms":1700000000500}"#,
            )
            .unwrap();
        }
    }

    #[test]
    fn the_old_records_directory_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = records_root(dir.path());
        let old = root.join("old-1.0");
        write_legacy(&old, true, false);
        let new = records_file(&root, "new-1.0");
        create_records(&new, &allocation("new-1.0"), &agent_record()).unwrap();
        // Neither a records file nor a directory: skipped.
        std::fs::write(root.join("stray"), b"").unwrap();
        let found = list_records(&root).unwrap();
        assert_eq!(
            found,
            [
                ("new-1.0".to_string(), Records::File(new)),
                ("old-1.0".to_string(), Records::Legacy(old.clone())),
            ]
        );
        let records = &found[1].1;
        let read = records.read().unwrap().unwrap();
        assert_eq!(read.allocation, allocation("old-1.0"));
        assert_eq!(
            read.agent,
            AgentRecord {
                local: false,
                shim_pid: 4242,
                shim_start_ticks: 987_654,
                stop_requested: false,
            }
        );
        assert_eq!(
            read.started,
            Some(StartedRecord {
                pid: 4243,
                started_at_ms: 1_700_000_000_000
            })
        );
        assert_eq!(read.exit, None);
        assert_eq!(records.read_started().unwrap().map(|s| s.pid), Some(4243));

        // A stop is recorded the old way, for an old reader too.
        records.record_stop(&read.agent).unwrap();
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(old.join("state.json")).unwrap()).unwrap();
        assert_eq!(state["stop_requested"], true);
        assert_eq!(state["shim_pid"], 4242);
        assert!(records.read().unwrap().unwrap().agent.stop_requested);

        // The old shim records the exit.
        write_legacy(&old, true, true);
        let exit = records.read_exit().unwrap().unwrap();
        assert_eq!((exit.exit_code, exit.signal), (None, Some(9)));
        assert_eq!(exit.start_error, None);

        // No state.json: a launch the old agent died in.
        let aborted = root.join("aborted");
        std::fs::create_dir_all(&aborted).unwrap();
        std::fs::write(aborted.join("allocation.pb"), b"").unwrap();
        assert_eq!(Records::Legacy(aborted.clone()).read().unwrap(), None);

        records.forget().unwrap();
        assert!(!old.exists());
        Records::Legacy(aborted.clone()).forget().unwrap();
        assert!(!aborted.exists());
    }

    #[test]
    fn hex_round_trips_and_rejects_what_is_not_hex() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(hex_decode(&hex_encode(&bytes)), Some(bytes));
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("zz"), None);
        assert_eq!(hex_decode("+1"), None);
        assert_eq!(hex_decode(""), Some(Vec::new()));
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
