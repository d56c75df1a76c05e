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
        let status = sup
            .run_local(allocation("shim-killed", &["sleep", "30"], &[]))
            .await
            .unwrap();
        pids.push(status.pid);
        pids
    });
    drop(first);

    // While no agent runs: one workload ends, one shim dies.
    let ends = data.join("workloads/ends-while-down");
    let second = runtime();
    second.block_on(eventually("ends-while-down to record its exit", || {
        ends.join("exit.json").exists().then_some(())
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
        // An aborted launch (records but no state.json: the agent died
        // before letting its shim start) is cleaned up, not reported.
        let aborted = data.join("workloads/aborted");
        std::fs::create_dir_all(&aborted).unwrap();
        std::fs::write(aborted.join("allocation.pb"), b"").unwrap();
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
    let records = dir.path().join("workloads/w");
    for name in ["allocation.pb", "state.json", "started.json", "exit.json"] {
        assert!(records.join(name).is_file(), "{name}");
        assert!(!alloc_dir(dir.path(), "w").join(name).exists(), "{name}");
    }
    let mode = std::fs::metadata(&records).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}
