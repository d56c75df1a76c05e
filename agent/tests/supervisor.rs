//! Workload manager: real processes, no GPUs needed.

mod common;

use std::time::Duration;

use common::{allocation, backend, eventually, supervisor};
use gpufleet_agent::GpuBackend;
use gpufleet_agent::supervisor::SupervisorError;
use gpufleet_proto::v1::{DesiredState, WorkloadState};

fn state(s: &gpufleet_proto::v1::WorkloadStatus) -> WorkloadState {
    WorkloadState::try_from(s.state).unwrap()
}

#[tokio::test]
async fn workload_sees_exactly_its_gpus_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend("n1", "4xL4");
    let gpus: Vec<String> = b.gpus().iter().map(|g| g.uuid.clone()).collect();
    let sup = supervisor(dir.path(), b);
    let mine = vec![gpus[1].clone(), gpus[3].clone()];
    let mut alloc = allocation(
        "job-1.0",
        &[
            "sh",
            "-c",
            "echo $CUDA_VISIBLE_DEVICES; echo $NVIDIA_VISIBLE_DEVICES; echo $GPUFLEET_ALLOCATION_ID $FOO $HOME; echo err >&2",
        ],
        &mine,
    );
    alloc
        .workload
        .as_mut()
        .unwrap()
        .env
        .insert("FOO".into(), "bar".into());
    let started = sup.run_local(alloc).await.unwrap();
    // A loaded machine may see this short workload end before its status
    // is read back.
    assert!(
        matches!(
            state(&started),
            WorkloadState::Running | WorkloadState::Succeeded
        ),
        "{started:?}"
    );
    assert!(started.pid > 0);
    let done = sup.wait("job-1.0").await.unwrap();
    assert_eq!(state(&done), WorkloadState::Succeeded, "{done:?}");
    assert_eq!(done.exit_code, Some(0));
    assert!(done.finished_at.is_some() && done.started_at.is_some());

    let log = std::fs::read_to_string(dir.path().join("allocations/job-1.0/output.log")).unwrap();
    let home = dir.path().join("allocations/job-1.0");
    let want = format!(
        "{0}\n{0}\njob-1.0 bar {1}\nerr\n",
        mine.join(","),
        home.display()
    );
    assert_eq!(log, want);

    let chunk = sup.read_log("job-1.0", 0, 0).await.unwrap();
    assert_eq!(chunk.data, want.as_bytes());
    assert!(chunk.eof);
    let chunk = sup.read_log("job-1.0", 3, 4).await.unwrap();
    assert_eq!(chunk.data.len(), 4);
    assert!(!chunk.eof);
}

#[tokio::test]
async fn a_program_found_in_path_keeps_the_name_it_was_given_as_argv0() {
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path(), backend("n1", "1xT4"));
    // The shell prints its own argv: argv[0] first.
    sup.run_local(allocation(
        "argv0",
        &["sh", "-c", "tr '\\0' ' ' < /proc/$$/cmdline"],
        &[],
    ))
    .await
    .unwrap();
    let done = sup.wait("argv0").await.unwrap();
    assert_eq!(state(&done), WorkloadState::Succeeded, "{done:?}");
    let log = std::fs::read_to_string(dir.path().join("allocations/argv0/output.log")).unwrap();
    assert!(log.starts_with("sh -c "), "{log:?}");
}

#[tokio::test]
async fn non_zero_exit_is_failed_with_its_code() {
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path(), backend("n1", "1xT4"));
    sup.run_local(allocation("exit3", &["sh", "-c", "exit 3"], &[]))
        .await
        .unwrap();
    let done = sup.wait("exit3").await.unwrap();
    assert_eq!(state(&done), WorkloadState::Failed);
    assert_eq!(done.exit_code, Some(3));
    assert_eq!(done.signal, None);
    assert!(done.message.contains("code 3"), "{}", done.message);
}

#[tokio::test]
async fn stop_escalates_to_sigkill_for_a_workload_ignoring_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path(), backend("n1", "1xT4"));
    // The marker proves the trap is installed before we signal.
    sup.run_local(allocation(
        "stubborn",
        &[
            "sh",
            "-c",
            "trap '' TERM; echo ready; sleep 30; echo survived",
        ],
        &[],
    ))
    .await
    .unwrap();
    let log = dir.path().join("allocations/stubborn/output.log");
    eventually("the workload to install its trap", || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|s| s.contains("ready"))
    })
    .await;
    let started = std::time::Instant::now();
    let done = sup
        .stop("stubborn", Some(Duration::from_millis(300)))
        .await
        .unwrap();
    assert_eq!(state(&done), WorkloadState::Stopped, "{done:?}");
    assert_eq!(done.signal, Some(9), "{done:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(!std::fs::read_to_string(&log).unwrap().contains("survived"));
}

#[tokio::test]
async fn stop_with_sigterm_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path(), backend("n1", "1xT4"));
    sup.run_local(allocation("polite", &["sleep", "30"], &[]))
        .await
        .unwrap();
    let done = sup.stop("polite", None).await.unwrap();
    assert_eq!(state(&done), WorkloadState::Stopped);
    assert_eq!(done.signal, Some(15));
    assert!(matches!(
        sup.stop("nope", None).await,
        Err(SupervisorError::NotFound(_))
    ));
}

#[tokio::test]
async fn missing_command_fails_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path(), backend("n1", "1xT4"));
    let status = sup
        .run_local(allocation("missing", &["/no/such/program", "x"], &[]))
        .await
        .unwrap();
    assert_eq!(state(&status), WorkloadState::Failed);
    assert!(
        status.message.contains("/no/such/program"),
        "{}",
        status.message
    );
    assert!(
        status.message.contains("No such file"),
        "{}",
        status.message
    );
    let log = std::fs::read_to_string(dir.path().join("allocations/missing/output.log")).unwrap();
    assert!(log.contains("/no/such/program"), "{log}");
    let chunk = sup.read_log("missing", 0, 0).await.unwrap();
    assert!(chunk.eof);
}

#[tokio::test]
async fn local_requests_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend("n1", "2xL4");
    let gpus: Vec<String> = b.gpus().iter().map(|g| g.uuid.clone()).collect();
    let sup = supervisor(dir.path(), b);
    let err = sup.run_local(allocation("a", &[], &[])).await.unwrap_err();
    assert!(
        matches!(
            err,
            SupervisorError::InvalidArgument {
                field: "workload.argv",
                ..
            }
        ),
        "{err}"
    );
    let err = sup
        .run_local(allocation("../etc", &["true"], &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SupervisorError::InvalidArgument {
                field: "allocation_id",
                ..
            }
        ),
        "{err}"
    );
    let err = sup
        .run_local(allocation("b", &["true"], &["GPU-nope".to_string()]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SupervisorError::InvalidArgument {
                field: "gpu_uuids",
                ..
            }
        ),
        "{err}"
    );

    let first = sup
        .run_local(allocation("", &["sleep", "30"], &[gpus[0].clone()]))
        .await
        .unwrap();
    assert!(
        first.allocation_id.starts_with("local-"),
        "{}",
        first.allocation_id
    );
    let err = sup
        .run_local(allocation("c", &["true"], &[gpus[0].clone()]))
        .await
        .unwrap_err();
    assert!(matches!(err, SupervisorError::GpuBusy { .. }), "{err}");
    let err = sup
        .run_local(allocation(&first.allocation_id, &["true"], &[]))
        .await
        .unwrap_err();
    assert!(matches!(err, SupervisorError::AlreadyExists(_)), "{err}");
    sup.shutdown().await;
    let st = sup.status(&first.allocation_id).unwrap();
    assert_eq!(state(&st), WorkloadState::Stopped);
    assert!(matches!(
        sup.run_local(allocation("d", &["true"], &[])).await,
        Err(SupervisorError::ShuttingDown)
    ));
}

#[tokio::test]
async fn reconcile_starts_missing_and_stops_undesired() {
    let dir = tempfile::tempdir().unwrap();
    let b = backend("n1", "2xH100-SXM-80GB");
    let gpus: Vec<String> = b.gpus().iter().map(|g| g.uuid.clone()).collect();
    let sup = supervisor(dir.path(), b.clone());
    let mut events = sup.subscribe();

    let local = sup
        .run_local(allocation("mine", &["sleep", "30"], &[]))
        .await
        .unwrap();
    let a = allocation("job-a.0", &["sleep", "30"], &[gpus[0].clone()]);
    let quick = allocation("job-q.0", &["true"], &[]);
    let bad = allocation("job-bad.0", &["true"], &["GPU-unknown".to_string()]);
    sup.reconcile(&DesiredState {
        generation: 2,
        allocations: vec![a.clone(), quick.clone(), bad.clone()],
        ..Default::default()
    });
    assert_eq!(sup.applied_generation(), 2);
    // Starts run apart from reconcile: job-a is running once its shim answers.
    eventually("job-a.0 to run", || {
        sup.status("job-a.0")
            .filter(|s| state(s) == WorkloadState::Running)
    })
    .await;
    let bad_status = sup.status("job-bad.0").unwrap();
    assert_eq!(state(&bad_status), WorkloadState::Failed);
    assert!(
        bad_status.message.contains("GPU-unknown"),
        "{}",
        bad_status.message
    );
    // The busy GPU shows up in the simulated telemetry.
    eventually("the busy GPU to heat up", || {
        let s = b.sample();
        (s[0].gpu_utilization_percent.unwrap_or(0) > 50).then_some(())
    })
    .await;

    let q = sup.wait("job-q.0").await.unwrap();
    assert_eq!(state(&q), WorkloadState::Succeeded);
    // Re-sending the same state never restarts the finished allocation.
    sup.reconcile(&DesiredState {
        generation: 2,
        allocations: vec![a.clone(), quick.clone()],
        ..Default::default()
    });
    assert_eq!(
        state(&sup.status("job-q.0").unwrap()),
        WorkloadState::Succeeded
    );
    // An older generation is ignored.
    sup.reconcile(&DesiredState {
        generation: 1,
        allocations: vec![],
        ..Default::default()
    });
    assert_eq!(
        state(&sup.status("job-a.0").unwrap()),
        WorkloadState::Running
    );

    // Generation 3 no longer wants job-a: it is stopped; finished ones are forgotten.
    sup.reconcile(&DesiredState {
        generation: 3,
        allocations: vec![],
        ..Default::default()
    });
    assert!(sup.status("job-q.0").is_none());
    assert!(sup.status("job-bad.0").is_none());
    let stopped = sup.wait("job-a.0").await.unwrap();
    assert_eq!(state(&stopped), WorkloadState::Stopped);
    // The local workload is untouched.
    assert_eq!(
        state(&sup.status(&local.allocation_id).unwrap()),
        WorkloadState::Running
    );
    // Next reconcile forgets the stopped one.
    sup.reconcile(&DesiredState {
        generation: 4,
        allocations: vec![],
        ..Default::default()
    });
    assert!(sup.status("job-a.0").is_none());

    // Every change was published.
    let mut seen = Vec::new();
    while let Ok(s) = events.try_recv() {
        seen.push((s.allocation_id.clone(), state(&s)));
    }
    assert!(
        seen.contains(&("job-a.0".into(), WorkloadState::Running)),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("job-a.0".into(), WorkloadState::Stopped)),
        "{seen:?}"
    );
    assert!(
        seen.contains(&("job-q.0".into(), WorkloadState::Succeeded)),
        "{seen:?}"
    );
    sup.shutdown().await;
}

#[tokio::test]
async fn output_beyond_the_log_cap_is_dropped_without_blocking_the_workload() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = common::settings(dir.path());
    settings.log_max_bytes = 1000;
    let sup = gpufleet_agent::Supervisor::new(backend("n1", "1xT4"), settings);
    // 1 MB, far more than a pipe holds: the workload would hang if the
    // shim stopped reading at the cap.
    sup.run_local(allocation(
        "chatty",
        &[
            "sh",
            "-c",
            "head -c 1000000 /dev/zero | tr '\\0' x; echo; echo done",
        ],
        &[],
    ))
    .await
    .unwrap();
    let done = sup.wait("chatty").await.unwrap();
    assert_eq!(state(&done), WorkloadState::Succeeded, "{done:?}");
    let log = std::fs::read_to_string(dir.path().join("allocations/chatty/output.log")).unwrap();
    let (kept, marker) = log.split_at(1000);
    assert!(kept.bytes().all(|b| b == b'x'), "{kept}");
    assert_eq!(
        marker,
        "\ngpufleet-agent: output truncated: the log reached log_max_bytes (1000 bytes); the rest is discarded\n"
    );
    let chunk = sup.read_log("chatty", 0, 0).await.unwrap();
    assert_eq!(chunk.data.len(), log.len());
    assert!(chunk.eof);
}

#[tokio::test]
async fn a_shim_program_that_is_not_a_shim_fails_the_workload_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = common::settings(dir.path());
    settings.shim_program = "/bin/true".into();
    let sup = gpufleet_agent::Supervisor::new(backend("n1", "1xT4"), settings);
    let status = sup
        .run_local(allocation("noshim", &["sleep", "30"], &[]))
        .await
        .unwrap();
    assert_eq!(state(&status), WorkloadState::Failed, "{status:?}");
    assert!(
        status.message.contains("shim::dispatch") && status.message.contains("/bin/true"),
        "{}",
        status.message
    );
}

/// Field `n` (1-based, as in proc(5)) of /proc/<pid>/stat; `None` once the
/// process is gone.
fn stat_field(pid: u32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(n - 3).map(str::to_string)
}

fn parent_of(pid: u32) -> u32 {
    stat_field(pid, 4).unwrap().parse().unwrap()
}

#[tokio::test]
async fn workloads_share_one_shim_host_and_its_death_loses_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path(), backend("n1", "2xL4"));
    let first = sup
        .run_local(allocation("first", &["sleep", "30"], &[]))
        .await
        .unwrap();
    let second = sup
        .run_local(allocation("second", &["sleep", "30"], &[]))
        .await
        .unwrap();
    let host = parent_of(first.pid);
    let comm = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm(host), "gpufleet-shims\n");
    assert_eq!(parent_of(second.pid), host, "one host runs every shim");
    assert_eq!(
        parent_of(host),
        std::process::id(),
        "the host is the agent's child"
    );
    // The host leads its own session, apart from ours; each workload is
    // in that session, in a process group of its own.
    assert_eq!(stat_field(host, 6).unwrap(), host.to_string());
    for pid in [first.pid, second.pid] {
        assert_eq!(stat_field(pid, 6).unwrap(), host.to_string());
        assert_eq!(stat_field(pid, 5).unwrap(), pid.to_string());
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(host as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Its workloads lost their shims: reported lost, and killed rather
    // than left running unwatched.
    for (id, pid) in [("first", first.pid), ("second", second.pid)] {
        let lost = sup.wait(id).await.unwrap();
        assert_eq!(state(&lost), WorkloadState::Lost, "{lost:?}");
        assert!(lost.message.contains("shim"), "{}", lost.message);
        eventually("a workload of the dead host to be killed", || {
            stat_field(pid, 3)
                .is_none_or(|state| state == "Z")
                .then_some(())
        })
        .await;
    }

    // The next start gets a new host.
    let third = sup
        .run_local(allocation("third", &["sleep", "30"], &[]))
        .await
        .unwrap();
    assert_eq!(state(&third), WorkloadState::Running, "{third:?}");
    let new_host = parent_of(third.pid);
    assert_ne!(new_host, host);
    assert_eq!(parent_of(new_host), std::process::id());
    let stopped = sup.stop("third", None).await.unwrap();
    assert_eq!(state(&stopped), WorkloadState::Stopped, "{stopped:?}");
}

#[tokio::test]
async fn the_shim_host_reuses_the_thread_of_a_workload_that_ended() {
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path(), backend("n1", "1xT4"));
    for i in 0..3 {
        let id = format!("short-{i}");
        sup.run_local(allocation(&id, &["sh", "-c", "exit 0"], &[]))
            .await
            .unwrap();
        let done = sup.wait(&id).await.unwrap();
        assert_eq!(state(&done), WorkloadState::Succeeded, "{done:?}");
    }
    let records = std::fs::read_to_string(dir.path().join("workloads/short-0.records")).unwrap();
    let host: u32 = records
        .split("\"shim_pid\":")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    let threads = || {
        let mut ids: Vec<String> = std::fs::read_dir(format!("/proc/{host}/task"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        ids.sort();
        ids
    };
    let idle = threads();
    assert_eq!(
        idle.len(),
        2,
        "the host's main thread and one idle shim thread"
    );
    let long = sup
        .run_local(allocation("long", &["sleep", "30"], &[]))
        .await
        .unwrap();
    assert_eq!(parent_of(long.pid), host);
    assert_eq!(threads(), idle, "the idle shim thread runs the next shim");
    sup.stop("long", None).await.unwrap();
}

/// A named pipe in `dir`: a workload that reads it waits until the test
/// writes a line to it.
fn gate(dir: &std::path::Path) -> std::path::PathBuf {
    let fifo = dir.join("go");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    fifo
}

#[tokio::test]
async fn the_shim_host_outlives_the_agent_until_its_workloads_end() {
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path(), backend("n1", "1xT4"));
    let fifo = gate(dir.path());
    let script = format!("read line < {}; echo done; exit 7", fifo.display());
    let started = sup
        .run_local(allocation("held", &["sh", "-c", &script], &[]))
        .await
        .unwrap();
    assert_eq!(state(&started), WorkloadState::Running, "{started:?}");
    let host = parent_of(started.pid);
    // The agent lets the host go (as at its shutdown): the host takes no
    // more requests but keeps serving its workload.
    assert_eq!(sup.detach().await, 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        stat_field(host, 3).is_some_and(|s| s != "Z"),
        "the host ended early"
    );
    std::fs::write(&fifo, "go\n").unwrap();
    eventually("the host to exit once its workload ended", || {
        stat_field(host, 3)
            .is_none_or(|state| state == "Z")
            .then_some(())
    })
    .await;
    let records = std::fs::read_to_string(dir.path().join("workloads/held.records")).unwrap();
    assert!(records.contains(r#""exit_code":7"#), "{records}");
    let log = std::fs::read_to_string(dir.path().join("allocations/held/output.log")).unwrap();
    assert_eq!(log, "done\n");
}

#[tokio::test]
async fn a_workload_inherits_no_ignored_sigchld_and_is_left_no_zombie() {
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path(), backend("n1", "1xT4"));
    // `read` holds the workload until the test has looked at it. The
    // shim host ignores SIGPIPE (Rust's runtime does); a workload must not
    // inherit that, nor an ignored SIGCHLD (a shell's `wait` then fails).
    let fifo = gate(dir.path());
    let script = format!(
        "grep -E '^Sig(Ign|Blk)' /proc/self/status; sleep 0.1 & wait $!; echo waited $?; read line < {}",
        fifo.display()
    );
    let started = sup
        .run_local(allocation("signals", &["sh", "-c", &script], &[]))
        .await
        .unwrap();
    assert_eq!(state(&started), WorkloadState::Running, "{started:?}");
    let pid = started.pid;
    std::fs::write(&fifo, "go\n").unwrap();
    let done = sup.wait("signals").await.unwrap();
    assert_eq!(state(&done), WorkloadState::Succeeded, "{done:?}");
    let log = std::fs::read_to_string(dir.path().join("allocations/signals/output.log")).unwrap();
    let mask = |name: &str| {
        let line = log.lines().find(|l| l.starts_with(name)).unwrap();
        u64::from_str_radix(line[name.len()..].trim(), 16).unwrap()
    };
    // Bit n-1 stands for signal n. (Whatever runs the tests may ignore
    // others, such as glibc's real-time signals; those are inherited as
    // they would be by any program.)
    let (sigpipe, sigchld) = (1u64 << 12, 1u64 << 16);
    assert_eq!(mask("SigIgn:") & (sigpipe | sigchld), 0, "{log}");
    assert_eq!(mask("SigBlk:"), 0, "{log}");
    assert!(log.contains("waited 0"), "{log}");
    eventually("the workload to be reaped, not left a zombie", || {
        stat_field(pid, 3).is_none().then_some(())
    })
    .await;
}
