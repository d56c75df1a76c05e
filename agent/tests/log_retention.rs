//! `log_retention`: the directories and logs of finished allocations go
//! once they are older than the retention; running workloads keep theirs.

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime};

use common::{allocation, backend, supervisor};
use gpufleet_agent::log_retention::prune;
use gpufleet_agent::supervisor::SupervisorError;
use gpufleet_proto::v1::WorkloadState;

const RETENTION: Duration = Duration::from_secs(3600);

/// Makes `dir` and its log look last written `age` ago.
fn age(dir: &Path, age: Duration) {
    let then = SystemTime::now() - age;
    let log = dir.join("output.log");
    if log.exists() {
        std::fs::File::options()
            .append(true)
            .open(&log)
            .unwrap()
            .set_modified(then)
            .unwrap();
    }
    std::fs::File::open(dir)
        .unwrap()
        .set_modified(then)
        .unwrap();
}

#[tokio::test]
async fn expired_finished_allocations_go_and_running_or_recent_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path(), backend("n1", "1xT4"));
    let allocations = dir.path().join("allocations");

    for id in ["old-done", "new-done"] {
        sup.run_local(allocation(id, &["sh", "-c", "echo hi"], &[]))
            .await
            .unwrap();
        let done = sup.wait(id).await.unwrap();
        assert_eq!(done.state, WorkloadState::Succeeded as i32, "{done:?}");
    }
    sup.run_local(allocation("old-running", &["sleep", "30"], &[]))
        .await
        .unwrap();
    // An old directory the agent no longer knows (from before a restart).
    std::fs::create_dir(allocations.join("old-unknown")).unwrap();
    std::fs::write(allocations.join("old-unknown/output.log"), "bye\n").unwrap();
    std::fs::write(allocations.join("old-unknown/scratch.bin"), [0u8; 4096]).unwrap();
    // A workload's link to something outside is removed, not followed.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("keep.txt"), "mine").unwrap();
    std::os::unix::fs::symlink(outside.path(), allocations.join("old-unknown/link")).unwrap();
    // Not the agent's: a file, and a name that is no allocation id.
    std::fs::write(allocations.join("notes.txt"), "x").unwrap();
    std::fs::create_dir(allocations.join("not an id")).unwrap();
    // What an interrupted pass left behind.
    std::fs::create_dir_all(dir.path().join("pruning/cut-short/sub")).unwrap();

    for id in ["old-done", "old-running", "old-unknown", "not an id"] {
        age(&allocations.join(id), 2 * RETENTION);
    }
    age(&allocations.join("new-done"), RETENTION / 2);

    let pruned = prune(&sup, RETENTION, SystemTime::now());
    let mut removed = pruned.removed.clone();
    removed.sort();
    assert_eq!(removed, ["old-done", "old-unknown"], "{pruned:?}");
    assert!(pruned.failed.is_empty(), "{pruned:?}");
    assert!(!allocations.join("old-done").exists());
    assert!(!allocations.join("old-unknown").exists());
    assert!(allocations.join("new-done/output.log").exists());
    assert!(allocations.join("old-running/output.log").exists());
    assert!(allocations.join("notes.txt").exists());
    assert!(allocations.join("not an id").exists());
    assert!(outside.path().join("keep.txt").exists());
    let pruning: Vec<_> = std::fs::read_dir(dir.path().join("pruning"))
        .unwrap()
        .collect();
    assert!(pruning.is_empty(), "{pruning:?}");

    // The agent still knows the finished workload: its log reads as empty
    // and ended. One it never knew says why there is no log.
    let chunk = sup.read_log("old-done", 0, 0).await.unwrap();
    assert!(chunk.eof && chunk.data.is_empty(), "{chunk:?}");
    let err = sup.read_log("old-unknown", 0, 0).await.unwrap_err();
    assert!(matches!(err, SupervisorError::NoLog(_)), "{err}");
    assert!(err.to_string().contains("log_retention"), "{err}");

    // Once the long job ends, its directory is old enough to go.
    sup.stop("old-running", None).await.unwrap();
    age(&allocations.join("old-running"), 2 * RETENTION);
    let pruned = prune(&sup, RETENTION, SystemTime::now());
    assert_eq!(pruned.removed, ["old-running"], "{pruned:?}");
}

#[tokio::test]
async fn a_data_dir_without_allocations_prunes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sup = supervisor(dir.path(), backend("n1", "1xT4"));
    let pruned = prune(&sup, RETENTION, SystemTime::now());
    assert!(pruned.removed.is_empty() && pruned.failed.is_empty());
}
