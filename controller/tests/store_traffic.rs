//! What a job asks of the store on its way from submit to its usage record:
//! writes only. On etcd every read is a quorum round trip, and these reads
//! would sit under the controller's state lock, so a read added to this
//! path shows here before it shows in `gpufleet-bench dispatch --etcd`.

use std::time::{Duration, SystemTime};

use gpufleet_proto::v1::{JobSpec, JobState, WorkloadSpec, WorkloadState, WorkloadStatus};
use prost_types::Timestamp;

mod common;
use common::open;

#[test]
fn a_job_from_submit_to_its_usage_record_reads_nothing_from_the_store() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let controller = open(dir.path())?;
    let _agent = controller.connect_agent(common::hello(
        "node-a",
        common::gpus("node-a", "H100-SXM-80GB", 2, 80 << 30),
        Vec::new(),
    ))?;
    controller.wait_settled()?;
    let before = controller.store_traffic();
    let mut ids = Vec::new();
    for _ in 0..20 {
        let job = controller.submit_job(JobSpec {
            gpus_per_task: 1,
            workload: Some(WorkloadSpec {
                argv: vec!["true".into()],
                ..Default::default()
            }),
            ..Default::default()
        })?;
        controller.schedule_pass()?;
        let placed = controller.get_job(&job.id)?;
        let task = &placed.tasks[0];
        let end = SystemTime::now();
        for state in [WorkloadState::Running, WorkloadState::Succeeded] {
            controller.record_workload_status(
                "node-a",
                WorkloadStatus {
                    allocation_id: task.allocation_id.clone(),
                    job_id: job.id.clone(),
                    state: state as i32,
                    exit_code: Some(0),
                    gpu_uuids: task.gpu_uuids.clone(),
                    started_at: Some(Timestamp::from(end - Duration::from_millis(10))),
                    finished_at: (state == WorkloadState::Succeeded).then(|| Timestamp::from(end)),
                    ..Default::default()
                },
            )?;
        }
        ids.push(job.id);
    }
    controller.wait_settled()?;
    let traffic = controller.store_traffic().since(&before);
    assert_eq!(traffic.reads, 0, "{traffic:?}");
    assert!(
        traffic.commits > 0 && traffic.writes >= 20 * 3,
        "{traffic:?}"
    );
    // Each job succeeded, with its record written (a job, a usage record and
    // its end-index entry at least).
    for id in &ids {
        assert_eq!(controller.get_job(id)?.state(), JobState::Succeeded);
    }
    Ok(())
}
