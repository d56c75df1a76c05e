//! Workload starts run concurrently and off the supervisor's lock, and a
//! stop that comes while a start is in flight is carried out.
//!
//! The shim here is a script in front of the real one: it reads the launch
//! spec, says so (`gates/<id>.handed`), and waits until the test opens its
//! gate (`gates/<id>`) before it becomes the real shim. So a test decides
//! exactly when each start may finish; no step depends on timing.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{allocation, backend, eventually};
use gpufleet_agent::supervisor::{ShimLaunch, Supervisor, SupervisorError};
use gpufleet_proto::v1::{DesiredState, WorkloadState, WorkloadStatus};

fn state(s: &WorkloadStatus) -> WorkloadState {
    WorkloadState::try_from(s.state).unwrap()
}

/// The gated shim script, written once per test process before any test
/// starts a process (a file still open for writing while another thread
/// forks could not be executed: ETXTBSY).
fn gated_shim() -> &'static Path {
    static SCRIPT: OnceLock<PathBuf> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("gated-shim-{}.sh", std::process::id()));
        // $2 is the records file, <data dir>/workloads/<id>.records.
        let script = format!(
            r#"#!/bin/sh
PATH=/usr/bin:/bin
name="${{2##*/}}"
gate="${{2%/*}}/../gates/${{name%.records}}"
IFS= read -r spec || exit 0
: > "$gate.handed"
while [ ! -e "$gate" ]; do sleep 0.01; done
exec {shim} "$@" <<EOF
$spec
EOF
"#,
            shim = common::SHIM
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    })
}

/// A supervisor whose starts each wait for their gate.
struct Gated {
    sup: Supervisor,
    gates: PathBuf,
    data: PathBuf,
}

impl Gated {
    fn new(dir: &Path, max_concurrent_starts: usize) -> Self {
        let script = gated_shim();
        let gates = dir.join("gates");
        std::fs::create_dir_all(&gates).unwrap();
        let mut settings = common::settings(dir);
        settings.shim_program = script.to_path_buf();
        // The gate script runs in front of each shim, so each is executed.
        settings.shim_launch = ShimLaunch::Exec;
        settings.max_concurrent_starts = max_concurrent_starts;
        Self {
            sup: Supervisor::new(backend("n1", "2xH100-SXM-80GB"), settings),
            gates,
            data: dir.to_path_buf(),
        }
    }

    /// Lets the start of `id` finish.
    fn open(&self, id: &str) {
        std::fs::write(self.gates.join(id), "").unwrap();
    }

    /// Waits until the agent has handed `id`'s launch spec to its shim:
    /// from here on the workload will run (the start is no longer
    /// withdrawn by a stop).
    async fn handed(&self, id: &str) {
        let marker = self.gates.join(format!("{id}.handed"));
        eventually(
            &format!("the launch spec of {id} to reach its shim"),
            || marker.exists().then_some(()),
        )
        .await;
    }

    fn was_handed(&self, id: &str) -> bool {
        self.gates.join(format!("{id}.handed")).exists()
    }

    fn state(&self, id: &str) -> WorkloadState {
        state(&self.sup.status(id).unwrap())
    }
}

fn desired(generation: u64, ids: &[(&str, &[&str])]) -> DesiredState {
    DesiredState {
        generation,
        allocations: ids
            .iter()
            .map(|(id, argv)| allocation(id, argv, &[]))
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_slow_start_does_not_hold_up_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let g = Gated::new(dir.path(), 16);
    let mut events = g.sup.subscribe();

    g.sup.reconcile(&desired(
        1,
        &[("job-slow.0", &["true"]), ("job-quick.0", &["true"])],
    ));
    // Both starts are under way at once: each shim got its spec while the
    // other start is still waiting for its shim's answer.
    g.handed("job-slow.0").await;
    g.handed("job-quick.0").await;
    assert_eq!(g.state("job-slow.0"), WorkloadState::Starting);
    assert_eq!(g.state("job-quick.0"), WorkloadState::Starting);

    // The second start finishes, and its workload runs to its end, while
    // the first is still waiting.
    g.open("job-quick.0");
    let quick = g.sup.wait("job-quick.0").await.unwrap();
    assert_eq!(state(&quick), WorkloadState::Succeeded, "{quick:?}");
    assert_eq!(g.state("job-slow.0"), WorkloadState::Starting);

    g.open("job-slow.0");
    let slow = g.sup.wait("job-slow.0").await.unwrap();
    assert_eq!(state(&slow), WorkloadState::Succeeded, "{slow:?}");

    // Starting is not published; Running then Succeeded for each.
    let mut seen = Vec::new();
    while let Ok(s) = events.try_recv() {
        seen.push((s.allocation_id.clone(), state(&s)));
    }
    assert_eq!(
        seen,
        [
            ("job-quick.0".to_string(), WorkloadState::Running),
            ("job-quick.0".to_string(), WorkloadState::Succeeded),
            ("job-slow.0".to_string(), WorkloadState::Running),
            ("job-slow.0".to_string(), WorkloadState::Succeeded),
        ]
    );
}

#[tokio::test]
async fn a_workload_dropped_while_it_starts_is_stopped_once_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let g = Gated::new(dir.path(), 16);
    g.sup
        .reconcile(&desired(1, &[("job-late.0", &["sleep", "600"])]));
    g.handed("job-late.0").await;

    // The controller no longer wants it (say, the job was cancelled)
    // while its shim has the spec but has not answered.
    g.sup.reconcile(&desired(2, &[]));
    assert_eq!(g.state("job-late.0"), WorkloadState::Starting);

    g.open("job-late.0");
    let done = g.sup.wait("job-late.0").await.unwrap();
    assert_eq!(state(&done), WorkloadState::Stopped, "{done:?}");
    assert!(done.pid > 0, "it did start: {done:?}");
    assert_eq!(done.signal, Some(nix::libc::SIGTERM), "{done:?}");

    // Finished and no longer desired: forgotten at the next reconcile.
    g.sup.reconcile(&desired(3, &[]));
    assert!(g.sup.status("job-late.0").is_none());
}

#[tokio::test]
async fn a_queued_start_that_is_stopped_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    // One start at a time: the second waits for the first's shim.
    let g = Gated::new(dir.path(), 1);
    g.sup.reconcile(&desired(
        1,
        &[("job-first.0", &["true"]), ("job-second.0", &["true"])],
    ));
    // Whichever got the only permit holds it until its gate opens.
    let (first, second) = eventually("one start to reach its shim", || {
        if g.was_handed("job-first.0") {
            Some(("job-first.0", "job-second.0"))
        } else if g.was_handed("job-second.0") {
            Some(("job-second.0", "job-first.0"))
        } else {
            None
        }
    })
    .await;
    assert!(!g.was_handed(second), "only one start may be in progress");
    assert_eq!(g.state(second), WorkloadState::Starting);

    // Dropped while queued: ends without a process, a shim or any records.
    g.sup.reconcile(&desired(2, &[(first, &["true"])]));
    let dropped = g.sup.wait(second).await.unwrap();
    assert_eq!(state(&dropped), WorkloadState::Stopped, "{dropped:?}");
    assert_eq!(dropped.message, "stopped before it started");
    assert_eq!(dropped.pid, 0);
    assert!(dropped.finished_at.is_some() && dropped.started_at.is_none());
    assert!(
        !g.data
            .join("workloads")
            .join(format!("{second}.records"))
            .exists()
    );
    assert!(!g.was_handed(second));

    g.open(first);
    let done = g.sup.wait(first).await.unwrap();
    assert_eq!(state(&done), WorkloadState::Succeeded, "{done:?}");
}

#[tokio::test]
async fn a_local_stop_during_the_start_is_carried_out() {
    let dir = tempfile::tempdir().unwrap();
    let g = Gated::new(dir.path(), 16);
    let sup = g.sup.clone();
    let run = tokio::spawn(async move {
        sup.run_local(allocation("mine", &["sleep", "600"], &[]))
            .await
    });
    g.handed("mine").await;
    // Its first poll requests the stop; it then waits for the end.
    let stop = g.sup.stop("mine", None);
    let mut stop = std::pin::pin!(stop);
    assert!(poll_once(stop.as_mut()).is_none());
    assert_eq!(g.state("mine"), WorkloadState::Starting);

    g.open("mine");
    let started = run.await.unwrap().unwrap();
    let stopped = stop.await.unwrap();
    assert_eq!(state(&stopped), WorkloadState::Stopped, "{stopped:?}");
    assert_eq!(started.pid, stopped.pid);
}

#[tokio::test]
async fn detach_waits_for_starts_already_handed_to_their_shim() {
    let dir = tempfile::tempdir().unwrap();
    let g = Gated::new(dir.path(), 16);
    g.sup
        .reconcile(&desired(1, &[("job-keep.0", &["sleep", "600"])]));
    g.handed("job-keep.0").await;

    // Detach returns only once the start is published, so that its status
    // reaches the outbox before the agent goes.
    let detach = g.sup.detach();
    let mut detach = std::pin::pin!(detach);
    assert!(
        poll_once(detach.as_mut()).is_none(),
        "detach returned while a start was in flight"
    );
    g.sup.reconcile(&desired(2, &[("job-new.0", &["true"])]));
    assert!(g.sup.status("job-new.0").is_none(), "detached: no new work");

    g.open("job-keep.0");
    assert_eq!(detach.await, 1);
    assert_eq!(g.state("job-keep.0"), WorkloadState::Running);

    let stopped = g.sup.stop("job-keep.0", None).await.unwrap();
    assert_eq!(state(&stopped), WorkloadState::Stopped, "{stopped:?}");
}

#[tokio::test]
async fn shutdown_stops_starts_in_flight_and_queued() {
    let dir = tempfile::tempdir().unwrap();
    let g = Gated::new(dir.path(), 1);
    let busy = g.sup.clone();
    let running = tokio::spawn(async move {
        busy.run_local(allocation("held", &["sleep", "600"], &[]))
            .await
    });
    g.handed("held").await;
    g.sup
        .reconcile(&desired(1, &[("job-queued.0", &["sleep", "600"])]));
    assert_eq!(g.state("job-queued.0"), WorkloadState::Starting);

    // Its first poll asks every workload to stop; it then waits for them.
    let shutdown = g.sup.shutdown();
    let mut shutdown = std::pin::pin!(shutdown);
    assert!(poll_once(shutdown.as_mut()).is_none());
    assert!(matches!(
        g.sup.run_local(allocation("late", &["true"], &[])).await,
        Err(SupervisorError::ShuttingDown)
    ));
    g.open("held");
    shutdown.await;
    let held = running.await.unwrap().unwrap();
    assert!(held.pid > 0);
    assert_eq!(g.state("held"), WorkloadState::Stopped);
    let queued = g.sup.status("job-queued.0").unwrap();
    assert_eq!(state(&queued), WorkloadState::Stopped, "{queued:?}");
    assert_eq!(queued.message, "stopped before it started");
    assert!(!g.was_handed("job-queued.0"));
}

/// Polls a future once, so that it does what it does before its first
/// wait; its output if it is already done. Awaiting it later goes on.
fn poll_once<F: std::future::Future>(future: std::pin::Pin<&mut F>) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}
