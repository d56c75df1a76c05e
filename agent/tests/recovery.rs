//! A restarted agent re-adopts the workloads its previous run started:
//! real shims and processes, one supervisor per simulated agent run. The
//! first run's runtime is dropped without a shutdown, which is what a
//! SIGKILL leaves behind: shims and workloads running, no goodbye.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{allocation, backend, eventually, supervisor};
use gpufleet_proto::v1::{WorkloadState, WorkloadStatus};

fn state(s: &WorkloadStatus) -> WorkloadState {
    WorkloadState::try_from(s.state).unwrap()
}

/// Waits in its own working directory until a file named `go` appears,
/// then exits with `code`.
fn gated(id: &str, code: i32) -> gpufleet_proto::v1::Allocation {
    let script =
        format!("echo waiting; while [ ! -f go ]; do sleep 0.05; done; echo went; exit {code}");
    allocation(id, &["sh", "-c", &script], &[])
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn alloc_dir(data: &Path, id: &str) -> std::path::PathBuf {
    data.join("allocations").join(id)
}

/// Field 4 of /proc/<pid>/stat: the parent pid.
fn parent_of(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    after.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s[s.rfind(')').unwrap() + 1..].trim_start().starts_with('Z'))
}

#[test]
fn workloads_survive_their_supervisor_and_are_re_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();

    // First run: four workloads, then the runtime vanishes.
    let first = runtime();
    let pids = first.block_on(async {
        let sup = supervisor(data, backend("n1", "1xT4"));
        let mut pids = Vec::new();
        for (id, code) in [("runs-on", 0), ("fails-later", 5), ("stoppable", 0)] {
            let status = sup.run_local(gated(id, code)).await.unwrap();
            assert_eq!(state(&status), WorkloadState::Running);
            pids.push(status.pid);
        }
        let status = sup
            .run_local(allocation("ends-while-down", &["sh", "-c", "exit 3"], &[]))
            .await
            .unwrap();
        pids.push(status.pid);
        // Under a shim host of its own (a second supervisor on the same
        // data directory starts one), so that killing that host below
        // takes no other workload's shim with it.
        let lone = supervisor(data, backend("n1", "1xT4"));
        let status = lone
            .run_local(allocation("shim-killed", &["sleep", "30"], &[]))
            .await
            .unwrap();
        pids.push(status.pid);
        assert_ne!(parent_of(pids[0]), parent_of(status.pid));
        pids
    });
    drop(first);

    // While no agent runs: one workload ends, one shim dies.
    let ends = data.join("workloads/ends-while-down.records");
    let second = runtime();
    second.block_on(eventually("ends-while-down to record its exit", || {
        std::fs::read_to_string(&ends)
            .is_ok_and(|text| text.contains("\n{\"exit\""))
            .then_some(())
    }));
    let orphan = pids[4];
    let shim = parent_of(orphan);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    second.block_on(eventually("the killed shim to be gone", || {
        (!alive(shim)).then_some(())
    }));
    assert!(
        alive(orphan),
        "the workload outlives its shim until recovery"
    );

    second.block_on(async {
        let sup = supervisor(data, backend("n1", "1xT4"));
        let found = sup.recover();
        assert_eq!(
            found.adopted,
            ["fails-later", "runs-on", "stoppable"],
            "{found:?}"
        );
        assert_eq!(found.finished, ["ends-while-down"], "{found:?}");
        assert_eq!(found.lost, ["shim-killed"], "{found:?}");
        assert!(found.unreadable.is_empty(), "{found:?}");

        // Adopted: running, same pid as before.
        let running = sup.status("runs-on").unwrap();
        assert_eq!(state(&running), WorkloadState::Running);
        assert_eq!(running.pid, pids[0]);
        assert!(running.started_at.is_some());

        // Ended while down: its real exit code.
        let ended = sup.status("ends-while-down").unwrap();
        assert_eq!(state(&ended), WorkloadState::Failed, "{ended:?}");
        assert_eq!(ended.exit_code, Some(3));

        // Shim died: lost, and what it left behind is killed.
        let lost = sup.status("shim-killed").unwrap();
        assert_eq!(state(&lost), WorkloadState::Lost, "{lost:?}");
        assert!(lost.message.contains("shim"), "{}", lost.message);
        eventually("the orphaned workload to be killed", || {
            (!alive(orphan)).then_some(())
        })
        .await;

        // Adopted workloads finish normally, with their real exit codes.
        for id in ["runs-on", "fails-later"] {
            std::fs::write(alloc_dir(data, id).join("go"), b"").unwrap();
        }
        let done = sup.wait("runs-on").await.unwrap();
        assert_eq!(state(&done), WorkloadState::Succeeded, "{done:?}");
        assert_eq!(done.exit_code, Some(0));
        let done = sup.wait("fails-later").await.unwrap();
        assert_eq!(state(&done), WorkloadState::Failed, "{done:?}");
        assert_eq!(done.exit_code, Some(5));
        let log = std::fs::read_to_string(alloc_dir(data, "runs-on").join("output.log")).unwrap();
        assert_eq!(log, "waiting\nwent\n");
        let chunk = sup.read_log("runs-on", 0, 0).await.unwrap();
        assert!(chunk.eof);

        // Stop still reaches an adopted workload's process group.
        let stopped = sup
            .stop("stoppable", Some(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(state(&stopped), WorkloadState::Stopped, "{stopped:?}");
        assert_eq!(stopped.signal, Some(15));
        assert!(!alive(pids[2]));
    });
    drop(second);

    // A third run: local results were kept for one restart only; nothing runs.
    let third = runtime();
    third.block_on(async {
        let sup = supervisor(data, backend("n1", "1xT4"));
        // An aborted launch (a records file without a whole agent line:
        // its shim died creating it) is cleaned up, not reported.
        let aborted = data.join("workloads/aborted.records");
        std::fs::write(&aborted, b"{\"agent\":{\"allocation\":\"0a").unwrap();
        let found = sup.recover();
        assert!(!aborted.exists());
        assert!(found.adopted.is_empty(), "{found:?}");
        // Recovering twice changes nothing.
        assert_eq!(sup.recover(), Default::default());
        // The workloads that ended under the second run were still
        // running at its recovery, so their records remain until now.
        assert_eq!(
            found.finished,
            ["fails-later", "runs-on", "stoppable"],
            "{found:?}"
        );
        let stopped = sup.status("stoppable").unwrap();
        assert_eq!(
            state(&stopped),
            WorkloadState::Stopped,
            "the stop request was recorded"
        );
    });
}

#[test]
fn a_clean_shutdown_still_stops_every_workload() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let pid = rt.block_on(async {
        let sup = supervisor(dir.path(), backend("n1", "1xT4"));
        let status = sup
            .run_local(allocation("w", &["sleep", "30"], &[]))
            .await
            .unwrap();
        sup.shutdown().await;
        let st = sup.status("w").unwrap();
        assert_eq!(state(&st), WorkloadState::Stopped);
        status.pid
    });
    assert!(!alive(pid));
    let sup = rt.block_on(async {
        let sup = supervisor(dir.path(), backend("n1", "1xT4"));
        let found = sup.recover();
        assert!(found.adopted.is_empty(), "{found:?}");
        sup
    });
    assert_eq!(state(&sup.status("w").unwrap()), WorkloadState::Stopped);
}

#[test]
fn records_live_outside_the_workloads_home_and_only_the_agent_reads_them() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    rt.block_on(async {
        let sup = supervisor(dir.path(), backend("n1", "1xT4"));
        sup.run_local(allocation("w", &["true"], &[]))
            .await
            .unwrap();
        sup.wait("w").await.unwrap();
    });
    // One records file per workload, in an owner-only directory; the
    // allocation directory holds only the log.
    let root = dir.path().join("workloads");
    let names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["w.records"]);
    let records = std::fs::read_to_string(root.join("w.records")).unwrap();
    let kinds: Vec<_> = records
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            value.as_object().unwrap().keys().next().unwrap().clone()
        })
        .collect();
    assert_eq!(kinds, ["agent", "started", "exit"]);
    let home: Vec<_> = std::fs::read_dir(alloc_dir(dir.path(), "w"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(home, ["output.log"]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join("w.records")), 0o600);
}

/// Field 22 of /proc/<pid>/stat: the process's start time in clock ticks.
fn start_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    after.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// Writes `dir/name` the way agents and shims before the records file did:
/// whole, through a temporary file and a rename.
const WRITE_OLD: &str =
    r#"old_write() { printf '%s' "$2" > "$d/.$1.tmp" && mv "$d/.$1.tmp" "$d/$1"; }"#;

/// Stands in for the shim (and workload) of an older agent, which records
/// into `<data>/workloads/<id>/`: it runs in its own process group until
/// `go` appears in its records directory and then records exit code 4, or
/// until SIGTERM, which it records as signal 15, as the old shim would.
fn old_shim(records: &Path) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let script = format!(
        r#"d="$1"; {WRITE_OLD}
trap 'old_write exit.json "{{\"exit_code\":null,\"signal\":15,\"finished_at_ms\":$(date +%s)000}}"; exit 0' TERM
while [ ! -e "$d/go" ]; do sleep 0.05; done
old_write exit.json "{{\"exit_code\":4,\"signal\":null,\"finished_at_ms\":$(date +%s)000}}""#
    );
    std::process::Command::new("sh")
        .args(["-c", &script, "old-shim"])
        .arg(records)
        .process_group(0)
        .spawn()
        .unwrap()
}

/// The records directory an older agent kept for `id`: `allocation.pb`,
/// `state.json` (the shim `shim`, `shim_start_ticks`) and `started.json`
/// (the workload: the shim itself here), byte for byte as it wrote them.
fn old_records(data: &Path, id: &str, shim: u32, shim_start_ticks: u64) -> std::path::PathBuf {
    use prost::Message;
    let dir = data.join("workloads").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(alloc_dir(data, id)).unwrap();
    let allocation = allocation(id, &["old-workload"], &[]);
    std::fs::write(dir.join("allocation.pb"), allocation.encode_to_vec()).unwrap();
    std::fs::write(
        dir.join("state.json"),
        format!(
            r#"{{"local":false,"shim_pid":{shim},"shim_start_ticks":{shim_start_ticks},"stop_requested":false}}"#
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("started.json"),
        format!(r#"{{"pid":{shim},"started_at_ms":1700000000000}}"#),
    )
    .unwrap();
    dir
}

/// An agent upgraded while workloads it started run: their records are in
/// the old layout, and their old shims keep writing it.
#[test]
fn workloads_an_older_agent_recorded_are_re_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let mut runs_on = None;
    let mut stoppable = None;
    for (id, slot) in [
        ("old-runs-on", &mut runs_on),
        ("old-stoppable", &mut stoppable),
    ] {
        let records = data.join("workloads").join(id);
        std::fs::create_dir_all(&records).unwrap();
        let shim = old_shim(&records);
        old_records(data, id, shim.id(), start_ticks(shim.id()));
        *slot = Some(shim);
    }
    let (mut runs_on, mut stoppable) = (runs_on.unwrap(), stoppable.unwrap());
    // Ended while no agent ran: its exit code is recorded and its shim is
    // gone (this process, with another start time, stands for it).
    let me = std::process::id();
    let ended = old_records(data, "old-ended", me, start_ticks(me) + 1);
    std::fs::write(
        ended.join("exit.json"),
        r#"{"exit_code":3,"signal":null,"finished_at_ms":1700000000500}"#,
    )
    .unwrap();

    let rt = runtime();
    rt.block_on(async {
        let sup = supervisor(data, backend("n1", "1xT4"));
        let found = sup.recover();
        assert_eq!(found.adopted, ["old-runs-on", "old-stoppable"], "{found:?}");
        assert_eq!(found.finished, ["old-ended"], "{found:?}");
        assert!(
            found.lost.is_empty() && found.unreadable.is_empty(),
            "{found:?}"
        );

        let running = sup.status("old-runs-on").unwrap();
        assert_eq!(state(&running), WorkloadState::Running);
        assert_eq!(running.pid, runs_on.id());
        let ended = sup.status("old-ended").unwrap();
        assert_eq!(state(&ended), WorkloadState::Failed, "{ended:?}");
        assert_eq!(ended.exit_code, Some(3));

        // The old shim records the exit; the real code is reported.
        std::fs::write(data.join("workloads/old-runs-on/go"), b"").unwrap();
        let done = sup.wait("old-runs-on").await.unwrap();
        assert_eq!(state(&done), WorkloadState::Failed, "{done:?}");
        assert_eq!(done.exit_code, Some(4));

        // A stop reaches the old workload's process group and is recorded
        // the old way, so that any agent reads the signal death as Stopped.
        let stopped = sup
            .stop("old-stoppable", Some(Duration::from_secs(5)))
            .await
            .unwrap();
        assert_eq!(state(&stopped), WorkloadState::Stopped, "{stopped:?}");
        assert_eq!(stopped.signal, Some(15));
        let state_json: serde_json::Value = serde_json::from_slice(
            &std::fs::read(data.join("workloads/old-stoppable/state.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(state_json["stop_requested"], true, "{state_json}");

        // Finished controller workloads the desired state no longer lists
        // are forgotten: their old records directories go.
        sup.reconcile(&gpufleet_proto::v1::DesiredState {
            generation: 1,
            allocations: Vec::new(),
            ..Default::default()
        });
        for id in ["old-runs-on", "old-stoppable", "old-ended"] {
            assert!(sup.status(id).is_none(), "{id}");
            assert!(!data.join("workloads").join(id).exists(), "{id}");
        }
    });
    runs_on.wait().unwrap();
    stoppable.wait().unwrap();
}
