//! Shared and MIG allocations on a real agent (nvml backend on the fake
//! NVML, process runtime): a MIG workload sees only its `MIG-…` UUID; two
//! half-GPU workloads run side by side with their share in their
//! environment (a third does not fit, nor a whole-GPU one); the one whose
//! process grows past its GPU memory limit (as NVML reports it) is stopped
//! by the agent and fails with the reason, while the other keeps running.

use std::time::Duration;

use gpufleet_proto::v1::{Allocation, WorkloadSpec, WorkloadState, WorkloadStatus};
use gpufleet_tests::{Cluster, NodeSpec, eventually, fake_nvml_in, write_fake_nvml_config};
use serde_json::{Value, json};

const GPU: &str = "GPU-5a000000-0000-0000-0000-000000000000";
const MIG_GPU: &str = "GPU-5b000000-0000-0000-0000-000000000000";
const MIG: &str = "MIG-5b000000-0000-0000-0000-000000000001";
const GIB: u64 = 1 << 30;

/// One whole H100 running `processes`, one H100 with a 1g.10gb instance.
fn machine(processes: Value) -> String {
    let values = |mig: u32| {
        json!({ "gpu_util": 10, "mem_util": 5, "memory_total": 80 * GIB, "memory_used": GIB,
                "mig_mode": mig, "sm_count": 132 })
    };
    json!({
        "driver_version": "550.54.15",
        "gpus": [
            { "uuid": GPU, "name": "NVIDIA H100 80GB HBM3", "values": values(0),
              "processes": processes },
            { "uuid": MIG_GPU, "name": "NVIDIA H100 80GB HBM3", "values": values(1),
              "mig_instances": [ { "uuid": MIG, "profile": "1g.10gb", "gpu_instance_id": 9,
                                   "memory_total": 10 * GIB, "sm_count": 16 } ] }
        ]
    })
    .to_string()
}

fn allocation(id: &str, gpu: &str, share: u32, limit: u64) -> Allocation {
    Allocation {
        allocation_id: id.into(),
        job_id: format!("job-{id}"),
        gpu_uuids: vec![gpu.into()],
        gpu_share_milli: share,
        gpu_memory_limit_bytes: limit,
        workload: Some(WorkloadSpec {
            argv: [
                "sh",
                "-c",
                "echo visible=$CUDA_VISIBLE_DEVICES share=$GPUFLEET_GPU_SHARE_MILLI limit=$GPUFLEET_GPU_MEMORY_LIMIT_BYTES; exec sleep 600",
            ]
            .map(String::from)
            .to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mig_and_shared_workloads_see_their_device_and_a_memory_overrun_fails_with_the_reason()
-> anyhow::Result<()> {
    let mut cluster = Cluster::start(&[]).await?;
    let nvml_dir = cluster.dir.path().join("nvml");
    let lib = fake_nvml_in(&nvml_dir)?;
    write_fake_nvml_config(&nvml_dir, &machine(json!([])))?;
    let node = NodeSpec::new("share-node", "aws", "us-east-1", "", 3.93);
    let mut config = cluster.agent_config(&node);
    config.gpu_backend = gpufleet_agent::GpuBackendKind::Nvml;
    config.simulated_gpus.clear();
    config.monitoring.nvml_library_path = Some(lib);
    config.sample_interval = Duration::from_millis(100);
    cluster.add_agent_with(config).await?;
    let supervisor = cluster.agents[0].supervisor().clone();

    let mut statuses: Vec<WorkloadStatus> = Vec::new();
    for a in [
        allocation("mig", MIG, 0, 0),
        allocation("half-a", GPU, 500, 4 * GIB),
        allocation("half-b", GPU, 500, 4 * GIB),
    ] {
        statuses.push(supervisor.run_local(a).await?);
    }
    assert!(
        statuses.iter().all(|s| s.state() == WorkloadState::Running),
        "{statuses:?}"
    );
    // A GPU in MIG mode is allocated only through its instances.
    let refused = supervisor
        .run_local(allocation("parent", MIG_GPU, 0, 0))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("is in MIG mode") && refused.contains(MIG),
        "{refused}"
    );
    // A third half does not fit beside two, nor does a whole-GPU workload.
    for extra in [
        allocation("half-c", GPU, 500, 0),
        allocation("whole", GPU, 0, 0),
    ] {
        let refused = supervisor.run_local(extra).await.unwrap_err().to_string();
        assert!(refused.contains("is in use"), "{refused}");
    }
    let log = |id: &str| std::fs::read_to_string(supervisor.log_path(id)).unwrap_or_default();
    for (id, want) in [
        ("mig", format!("visible={MIG} share= limit=")),
        (
            "half-a",
            format!("visible={GPU} share=500 limit={}", 4 * GIB),
        ),
        (
            "half-b",
            format!("visible={GPU} share=500 limit={}", 4 * GIB),
        ),
    ] {
        eventually(&format!("{id}'s first line"), || {
            let (got, want) = (log(id), want.clone());
            async move { Ok(got.contains(&want).then_some(())) }
        })
        .await?;
    }

    // NVML now shows half-a's process over its 4 GiB, half-b's within.
    let pid = |id: &str| {
        statuses
            .iter()
            .find(|s| s.allocation_id == id)
            .map_or(0, |s| s.pid)
    };
    write_fake_nvml_config(
        &nvml_dir,
        &machine(json!([
            { "pid": pid("half-a"), "used_memory": 6 * GIB },
            { "pid": pid("half-b"), "used_memory": 3 * GIB }
        ])),
    )?;
    let failed = eventually("half-a stopped over its memory limit", || {
        let status = supervisor.status("half-a");
        async move { Ok(status.filter(|s| s.state() == WorkloadState::Failed)) }
    })
    .await?;
    assert!(
        failed.message.contains("6.0 GiB") && failed.message.contains("limit of 4.0 GiB"),
        "{failed:?}"
    );
    // Three more sampling rounds that saw half-b's 3 GiB: the others keep
    // running.
    let mut rounds = cluster.agents[0].telemetry().subscribe();
    let mut seen = 0;
    while seen < 3 {
        tokio::time::timeout(gpufleet_tests::DEADLINE, rounds.changed()).await??;
        let samples = rounds.borrow_and_update().clone();
        let b_seen = samples
            .iter()
            .flat_map(|s| &s.processes)
            .any(|p| p.allocation_id == "half-b" && p.used_memory_bytes == Some(3 * GIB));
        seen += usize::from(b_seen);
    }
    for id in ["half-b", "mig"] {
        let s = supervisor.status(id);
        assert_eq!(s.map(|s| s.state()), Some(WorkloadState::Running), "{id}");
    }
    cluster.shutdown().await
}
