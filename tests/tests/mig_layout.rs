//! An operator's MIG layout (`Fleet.SetMigLayout`, `gpufleet nodes
//! mig-layout`) through a real controller and agent (simulated GPUs): kept
//! with the node across a controller restart, carried in the desired state,
//! applied by the agent only once no workload uses the GPU, and reported
//! back through the agent's hello; a layout that cannot fit is refused by
//! the agent and the GPU keeps what it has.

use gpufleet_proto::v1::{
    Allocation, GetNodeRequest, GpuInfo, Node, SetMigLayoutRequest, WorkloadSpec, WorkloadState,
};
use gpufleet_tests::{Cluster, NodeSpec, eventually};

fn profiles(list: &str) -> Vec<String> {
    list.split(',').map(String::from).collect()
}

fn gpu(node: &Node, index: usize) -> GpuInfo {
    node.gpus[index].info.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mig_layout_waits_for_an_idle_gpu_then_the_hello_reports_its_instances()
-> anyhow::Result<()> {
    let node = NodeSpec::new("mig-node", "aws", "us-east-1", "2xH100-SXM-80GB", 3.93);
    let mut cluster = Cluster::start(std::slice::from_ref(&node)).await?;
    cluster.wait_ready(1).await?;
    let mut fleet = cluster.fleet().await?;
    let get = || GetNodeRequest {
        node_id: "mig-node".into(),
    };
    let before = fleet.get_node(get()).await?.into_inner();
    let uuid0 = gpu(&before, 0).uuid;
    assert!(!gpu(&before, 0).mig_enabled);

    // A workload holds GPU 0.
    let supervisor = cluster.agents[0].supervisor().clone();
    let busy = supervisor
        .run_local(Allocation {
            allocation_id: "holder".into(),
            gpu_uuids: vec![uuid0.clone()],
            workload: Some(WorkloadSpec {
                argv: ["sleep", "600"].map(String::from).to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    assert_eq!(busy.state(), WorkloadState::Running, "{busy:?}");

    let layout = profiles("3g.40gb,2g.20gb,1g.10gb,1g.10gb");
    let node_view = fleet
        .set_mig_layout(SetMigLayoutRequest {
            node_id: "mig-node".into(),
            gpu_uuid: uuid0.clone(),
            profiles: layout.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(node_view.mig_layouts.len(), 1);
    assert_eq!(node_view.mig_layouts[0].profiles, layout);

    // Bad input is refused by the controller with the field named.
    let refused = fleet
        .set_mig_layout(SetMigLayoutRequest {
            node_id: "mig-node".into(),
            gpu_uuid: uuid0.clone(),
            profiles: profiles("1g.10gb,lots"),
        })
        .await
        .unwrap_err();
    assert!(refused.message().contains("profiles"), "{refused:?}");

    // While the GPU is busy the agent leaves it alone: the wish reached it
    // and several samples passed.
    eventually("the wish at the agent", || {
        let wanted = supervisor.wanted_mig_layouts();
        async move { Ok((wanted.len() == 1).then_some(())) }
    })
    .await?;
    let mut rounds = cluster.agents[0].telemetry().subscribe();
    for _ in 0..5 {
        tokio::time::timeout(gpufleet_tests::DEADLINE, rounds.changed()).await??;
    }
    assert!(
        !supervisor.gpus()[0].mig_enabled,
        "applied under a running workload"
    );

    // The controller keeps the wish across its restart.
    cluster.restart_controller().await?;
    cluster.wait_ready(1).await?;
    let mut fleet = cluster.fleet().await?;
    let kept = fleet.get_node(get()).await?.into_inner();
    assert_eq!(kept.mig_layouts.len(), 1, "{kept:?}");

    // Once the GPU is idle the layout is applied and the hello reports it.
    supervisor.stop("holder", None).await?;
    let applied = eventually("the new MIG instances in the node", || {
        let (mut fleet, request) = (fleet.clone(), get());
        async move {
            let node = fleet.get_node(request).await?.into_inner();
            let g = gpu(&node, 0);
            Ok((g.mig_enabled && g.mig_instances.len() == 4).then_some(node))
        }
    })
    .await?;
    let mut got: Vec<String> = gpu(&applied, 0)
        .mig_instances
        .iter()
        .map(|m| m.profile.clone())
        .collect();
    got.sort();
    assert_eq!(got, profiles("1g.10gb,1g.10gb,2g.20gb,3g.40gb"));
    assert!(
        gpu(&applied, 0)
            .mig_instances
            .iter()
            .all(|m| m.uuid.starts_with("MIG-"))
    );
    assert!(!gpu(&applied, 1).mig_enabled, "the other GPU is untouched");

    // A layout that does not fit the GPU is refused by the agent; the GPU
    // keeps its instances.
    fleet
        .set_mig_layout(SetMigLayoutRequest {
            node_id: "mig-node".into(),
            gpu_uuid: gpu(&applied, 1).uuid,
            profiles: profiles("4g.40gb,4g.40gb"),
        })
        .await?;
    eventually("the second wish at the agent", || {
        let wanted = supervisor.wanted_mig_layouts();
        async move { Ok((wanted.len() == 2).then_some(())) }
    })
    .await?;
    let mut rounds = cluster.agents[0].telemetry().subscribe();
    for _ in 0..5 {
        tokio::time::timeout(gpufleet_tests::DEADLINE, rounds.changed()).await??;
    }
    assert!(!supervisor.gpus()[1].mig_enabled);
    assert_eq!(supervisor.gpus()[0].mig_instances.len(), 4);
    // The refusal reaches the operator through the hello.
    let refused = eventually("the refusal on the node", || {
        let (mut fleet, request) = (fleet.clone(), get());
        async move {
            let node = fleet.get_node(request).await?.into_inner();
            Ok(node.mig_layouts.into_iter().find(|l| !l.error.is_empty()))
        }
    })
    .await?;
    assert!(refused.error.contains("compute slices"), "{refused:?}");
    assert_eq!(refused.profiles, profiles("4g.40gb,4g.40gb"));
    cluster.shutdown().await
}
