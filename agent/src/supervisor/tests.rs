//! The supervisor's logic on the in-memory runtime: nothing is executed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gpufleet_proto::v1::{Allocation, DesiredState, WorkloadSpec, WorkloadState};

use super::{Supervisor, SupervisorSettings};
use crate::backend::simulated::SimulatedBackend;
use crate::runtime::memory::MemoryRuntime;
use crate::runtime::{Exit, Found, FoundState};

fn supervisor() -> (Supervisor, Arc<MemoryRuntime>, Vec<String>) {
    let backend = Arc::new(SimulatedBackend::new("n1", &["2xT4".to_string()]).unwrap());
    let gpus = crate::GpuBackend::gpus(backend.as_ref())
        .into_iter()
        .map(|g| g.uuid)
        .collect();
    let runtime = Arc::new(MemoryRuntime::new());
    let mut settings = SupervisorSettings::new("/nonexistent/gpufleet-test".into());
    settings.default_grace = Duration::from_secs(7);
    let sup = Supervisor::with_runtime(backend, settings, runtime.clone());
    (sup, runtime, gpus)
}

fn allocation(id: &str, gpus: &[String]) -> Allocation {
    Allocation {
        gang: None,
        allocation_id: id.to_string(),
        job_id: "job-1".to_string(),
        task_index: 0,
        gpu_uuids: gpus.to_vec(),
        workload: Some(WorkloadSpec {
            argv: vec!["train".to_string()],
            env: HashMap::from([
                ("B".to_string(), "2".to_string()),
                ("A".to_string(), "1".to_string()),
            ]),
            working_dir: String::new(),
            stop_grace_period_seconds: 0,
            container: None,
        }),
        ..Default::default()
    }
}

fn desired(generation: u64, allocations: Vec<Allocation>) -> DesiredState {
    DesiredState {
        generation,
        allocations,
        ..Default::default()
    }
}

async fn state_of(sup: &Supervisor, id: &str, want: WorkloadState) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if sup.status(id).is_some_and(|s| s.state == want as i32) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} never became {want:?}: {:?}",
            sup.status(id)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn reconcile_starts_stops_and_forgets_through_the_runtime() {
    let (sup, runtime, gpus) = supervisor();
    sup.reconcile(&desired(
        1,
        vec![allocation("a", &gpus[..1]), allocation("b", &gpus[1..])],
    ));
    state_of(&sup, "a", WorkloadState::Running).await;
    state_of(&sup, "b", WorkloadState::Running).await;
    let mut launched = runtime.launched();
    launched.sort();
    assert_eq!(launched, ["a", "b"]);

    // What the runtime is asked: the job's env sorted, the GPUs, the
    // allocation's own directory and log.
    let request = runtime
        .launch_requests()
        .into_iter()
        .find(|r| r.allocation_id() == "a")
        .unwrap();
    assert_eq!(
        request.env,
        [("A".into(), "1".into()), ("B".into(), "2".into())]
    );
    assert_eq!(request.gpu_uuids, gpus[..1]);
    assert_eq!(request.working_dir, None);
    assert!(!request.local);
    assert!(request.log_path.starts_with(&request.allocation_dir));

    // Dropping "a" stops it with the default grace; "b" is left alone.
    sup.reconcile(&desired(2, vec![allocation("b", &gpus[1..])]));
    state_of(&sup, "a", WorkloadState::Stopped).await;
    assert_eq!(
        runtime.stopped(),
        [("a".to_string(), Duration::from_secs(7))]
    );
    assert_eq!(
        sup.status("b").unwrap().state,
        WorkloadState::Running as i32
    );

    // An older generation changes nothing.
    sup.reconcile(&desired(1, vec![]));
    assert_eq!(sup.applied_generation(), 2);
    assert_eq!(
        sup.status("b").unwrap().state,
        WorkloadState::Running as i32
    );

    // A finished allocation is never started again.
    assert!(runtime.finish("b", 0));
    state_of(&sup, "b", WorkloadState::Succeeded).await;
    sup.reconcile(&desired(3, vec![allocation("b", &gpus[1..])]));
    assert_eq!(runtime.launched().len(), 2);

    // Finished and no longer wanted: forgotten, in the runtime too.
    sup.reconcile(&desired(4, vec![]));
    assert!(sup.statuses().is_empty());
    let mut forgotten = runtime.forgotten();
    forgotten.sort();
    assert_eq!(forgotten, ["a", "b"]);
}

#[tokio::test]
async fn a_rejected_allocation_never_reaches_the_runtime() {
    let (sup, runtime, _) = supervisor();
    sup.reconcile(&desired(
        1,
        vec![allocation("bad", &["GPU-not-here".to_string()])],
    ));
    let status = sup.status("bad").unwrap();
    assert_eq!(status.state, WorkloadState::Failed as i32);
    assert!(
        status.message.contains("not a GPU of this node"),
        "{status:?}"
    );
    sup.reconcile(&desired(2, vec![]));
    assert!(runtime.launched().is_empty());
    assert!(runtime.forgotten().is_empty(), "nothing to forget");
}

#[tokio::test]
async fn a_failed_launch_and_launch_progress_are_reported() {
    let (sup, runtime, _) = supervisor();
    runtime.report_progress(&["pulling image: 40%"]);
    runtime.fail_launch("x", "image not found");
    let mut events = sup.subscribe();
    let status = sup.run_local(allocation("x", &[])).await.unwrap();
    assert_eq!(status.state, WorkloadState::Failed as i32);
    assert_eq!(status.message, "image not found");
    let progress = events.recv().await.unwrap();
    assert_eq!(progress.state, WorkloadState::Starting as i32);
    assert_eq!(progress.message, "pulling image: 40%");
}

#[tokio::test]
async fn recovery_takes_what_the_runtime_found() {
    let (sup, runtime, gpus) = supervisor();
    let finished_at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
    runtime.leave_behind(vec![
        Found {
            allocation: allocation("done", &gpus[..1]),
            local: false,
            stop_requested: true,
            pid: 42,
            started_at: None,
            state: FoundState::Ended(Exit {
                exit_code: None,
                signal: Some(15),
                start_error: None,
                finished_at,
            }),
        },
        Found {
            allocation: allocation("gone", &gpus[1..]),
            local: true,
            stop_requested: false,
            pid: 43,
            started_at: None,
            state: FoundState::Lost("its shim died".into()),
        },
    ]);
    let recovery = sup.recover();
    assert_eq!(recovery.finished, ["done"]);
    assert_eq!(recovery.lost, ["gone"]);
    let done = sup.status("done").unwrap();
    assert_eq!(done.state, WorkloadState::Stopped as i32, "{done:?}");
    assert_eq!(done.pid, 42);
    assert_eq!(
        sup.status("gone").unwrap().state,
        WorkloadState::Lost as i32
    );
    // A local result is reported once, then dropped from the runtime.
    assert_eq!(runtime.forgotten(), ["gone"]);
}

#[tokio::test]
async fn an_interruption_tells_each_workload_and_stops_it_before_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(SimulatedBackend::new("n1", &["2xT4".to_string()]).unwrap());
    let gpus: Vec<String> = crate::GpuBackend::gpus(backend.as_ref())
        .into_iter()
        .map(|g| g.uuid)
        .collect();
    let runtime = Arc::new(MemoryRuntime::new());
    let sup = Supervisor::with_runtime(
        backend,
        SupervisorSettings::new(dir.path().to_path_buf()),
        runtime.clone(),
    );
    sup.reconcile(&desired(
        1,
        vec![allocation("a", &gpus[..1]), allocation("b", &gpus[1..])],
    ));
    state_of(&sup, "a", WorkloadState::Running).await;
    state_of(&sup, "b", WorkloadState::Running).await;
    // Every workload is told where the notice will be written.
    let request = runtime.launch_requests().remove(0);
    let file = request
        .identity_env()
        .into_iter()
        .find(|(k, _)| k == "GPUFLEET_INTERRUPT_FILE")
        .map(|(_, v)| std::path::PathBuf::from(v))
        .unwrap();
    assert_eq!(file, request.allocation_dir.join(super::INTERRUPT_FILE));

    let deadline = SystemTime::now() + Duration::from_secs(120);
    let told = sup.interrupt(
        &super::Interruption {
            source: "aws".into(),
            action: "terminate".into(),
            deadline,
        },
        Duration::from_secs(5),
    );
    assert_eq!(told, 2);
    state_of(&sup, "a", WorkloadState::Interrupted).await;
    state_of(&sup, "b", WorkloadState::Interrupted).await;
    let status = sup.status("a").unwrap();
    assert!(
        status
            .message
            .starts_with("spot interruption: aws terminate at "),
        "{}",
        status.message
    );
    // SIGKILL 5 s before the 120 s deadline: a grace of 114-115 s.
    for (_, grace) in runtime.stopped() {
        assert!(
            grace > Duration::from_secs(113) && grace <= Duration::from_secs(115),
            "{grace:?}"
        );
    }
    let text = std::fs::read_to_string(&file).unwrap();
    let unix = deadline
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        text.contains(&format!("GPUFLEET_INTERRUPT_DEADLINE_UNIX={unix}\n")),
        "{text}"
    );
    assert!(
        text.contains("GPUFLEET_INTERRUPT_ACTION=terminate\n"),
        "{text}"
    );
    // Ended workloads are not told again.
    assert_eq!(
        sup.interrupt(
            &super::Interruption {
                source: "aws".into(),
                action: "terminate".into(),
                deadline,
            },
            Duration::from_secs(5),
        ),
        0
    );
}
