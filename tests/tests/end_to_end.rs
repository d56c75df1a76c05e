//! End to end through real gRPC: a controller and two simulated agents on
//! 127.0.0.1:0, jobs through the whole path.

use std::collections::BTreeSet;
use std::time::Duration;

use gpufleet_proto::v1::agent_control_client::AgentControlClient;
use gpufleet_proto::v1::{
    AgentHello, AgentMessage, CancelJobRequest, CapacityDimension, GetCapacityRequest,
    GetJobRequest, GpuGeneration, GpuInfo, JobConstraints, JobSpec, JobState, ListJobsRequest,
    Locality, NodeIdentity, NodeState, WatchJobRequest, WorkloadSpec, WorkloadState, agent_message,
};
use gpufleet_tests::{Cluster, NodeSpec, job_log, two_nodes};
use tokio_stream::StreamExt;
use tonic::Code;

fn is_terminal(job: &gpufleet_proto::v1::Job) -> bool {
    matches!(
        job.state(),
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gpu_job_sees_exactly_its_two_gpus() -> anyhow::Result<()> {
    let cluster = Cluster::start(&two_nodes()).await?;
    let job = cluster
        .submit(2, &["sh", "-c", "echo $CUDA_VISIBLE_DEVICES"])
        .await?;
    let job = cluster.wait_job(&job.id, "to end", is_terminal).await?;
    assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
    assert_eq!(job.exit_code, Some(0));
    let task = &job.tasks[0];
    assert_eq!(task.gpu_uuids.len(), 2);
    // Cheapest fitting node: the $1.79 A100 node.
    assert_eq!(task.node_id, "node-b");
    let node_gpus: BTreeSet<String> = cluster.agents[1].gpu_uuids().into_iter().collect();
    assert!(task.gpu_uuids.iter().all(|u| node_gpus.contains(u)));

    let log = job_log(&cluster, &job.id, 0).await?;
    let seen: Vec<&str> = log.trim().split(',').collect();
    assert_eq!(
        seen,
        task.gpu_uuids
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        "log was {log:?}"
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_command_exit_code_reaches_the_job() -> anyhow::Result<()> {
    let cluster = Cluster::start(&two_nodes()).await?;
    let job = cluster
        .submit(1, &["sh", "-c", "echo about to fail >&2; exit 7"])
        .await?;
    let job = cluster.wait_job(&job.id, "to end", is_terminal).await?;
    assert_eq!(job.state(), JobState::Failed);
    assert_eq!(job.exit_code, Some(7));
    assert_eq!(job.tasks[0].state(), WorkloadState::Failed);
    assert!(job.message.contains("code 7"), "{}", job.message);
    assert!(job.finished_at.is_some());
    // stderr is captured too.
    assert_eq!(job_log(&cluster, &job.id, 0).await?.trim(), "about to fail");

    // A program that does not exist fails the job with a message naming it.
    let job = cluster.submit(1, &["/no/such/program"]).await?;
    let job = cluster.wait_job(&job.id, "to end", is_terminal).await?;
    assert_eq!(job.state(), JobState::Failed);
    assert!(
        job.tasks[0].message.contains("/no/such/program"),
        "{:?}",
        job.tasks[0]
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_job_and_frees_its_gpus() -> anyhow::Result<()> {
    let cluster = Cluster::start(&two_nodes()).await?;
    let job = cluster.submit(4, &["sleep", "300"]).await?;
    let job = cluster
        .wait_job(&job.id, "to run", |j| j.state() == JobState::Running)
        .await?;
    let node = job.tasks[0].node_id.clone();
    let agent = cluster
        .agents
        .iter()
        .find(|a| a.node_id() == node)
        .expect("agent of the node");
    let pid = agent
        .supervisor()
        .statuses()
        .into_iter()
        .find(|s| s.allocation_id == job.tasks[0].allocation_id)
        .map(|s| s.pid)
        .expect("workload known to its agent");
    assert!(pid > 0);

    let mut jobs = cluster.jobs().await?;
    let cancelled = jobs
        .cancel_job(CancelJobRequest {
            job_id: job.id.clone(),
            reason: "test".into(),
        })
        .await?
        .into_inner();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    let job = cluster
        .wait_job(&job.id, "task stopped", |j| {
            j.tasks[0].state() == WorkloadState::Stopped
        })
        .await?;
    assert_eq!(job.state(), JobState::Cancelled);
    assert_eq!(
        job.tasks[0].signal,
        Some(15),
        "SIGTERM ends sleep: {:?}",
        job.tasks[0]
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} still exists"
    );

    // The GPUs are free again: a 4-GPU job fits on the same cheap node.
    let again = cluster.submit(4, &["true"]).await?;
    let again = cluster.wait_job(&again.id, "to end", is_terminal).await?;
    assert_eq!(again.state(), JobState::Succeeded);
    assert_eq!(again.tasks[0].node_id, node);
    // Cancelling a finished job changes nothing.
    let same = jobs
        .cancel_job(CancelJobRequest {
            job_id: again.id.clone(),
            reason: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(same.state(), JobState::Succeeded);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsatisfiable_job_stays_pending_with_its_reason() -> anyhow::Result<()> {
    let cluster = Cluster::start(&two_nodes()).await?;
    let job = cluster
        .submit_spec(JobSpec {
            gpus_per_task: 2,
            constraints: Some(JobConstraints {
                generations: vec![GpuGeneration::Hopper as i32],
                max_price_per_gpu_hour_micro_usd: Some(3_000_000),
                ..Default::default()
            }),
            workload: Some(WorkloadSpec {
                argv: vec!["true".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    let job = cluster
        .wait_job(&job.id, "a scheduler verdict", |j| {
            j.pending_reason
                .as_ref()
                .is_some_and(|r| r.code != "WAITING_FOR_SCHEDULER")
        })
        .await?;
    assert_eq!(job.state(), JobState::Pending);
    let reason = job.pending_reason.clone().unwrap_or_default();
    assert_eq!(reason.code, "NO_FEASIBLE_NODES");
    let by: Vec<(&str, u32)> = reason
        .exclusions
        .iter()
        .map(|e| (e.constraint.as_str(), e.gpus_excluded))
        .collect();
    assert_eq!(by, vec![("max_price", 4), ("gpu_model", 4)], "{reason:?}");
    assert!(
        reason.message.contains("us-east-1 at $3.93/h"),
        "{}",
        reason.message
    );

    // Too big for any node, but valid: pending, and says so.
    let big = cluster.submit(8, &["true"]).await?;
    let big = cluster
        .wait_job(&big.id, "a scheduler verdict", |j| {
            j.pending_reason
                .as_ref()
                .is_some_and(|r| r.code != "WAITING_FOR_SCHEDULER")
        })
        .await?;
    let reason = big.pending_reason.unwrap_or_default();
    assert_eq!(
        reason.exclusions[0].constraint, "gpus_per_task",
        "{reason:?}"
    );

    // It stays pending across further passes.
    let mut jobs = cluster.jobs().await?;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let still = jobs
        .get_job(GetJobRequest {
            job_id: job.id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(still.state(), JobState::Pending);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_keeps_nodes_jobs_and_results() -> anyhow::Result<()> {
    restart_keeps_nodes_jobs_and_results(Cluster::start(&two_nodes()).await?).await
}

/// The same, with the controller's state in a 3-member etcd: the
/// restarted controller campaigns, leads and reloads everything from etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_on_etcd_keeps_nodes_jobs_and_results() -> anyhow::Result<()> {
    let Some(cluster) = Cluster::start_on_etcd(&two_nodes()).await? else {
        return Ok(());
    };
    restart_keeps_nodes_jobs_and_results(cluster).await
}

async fn restart_keeps_nodes_jobs_and_results(mut cluster: Cluster) -> anyhow::Result<()> {
    let done = cluster.submit(1, &["sh", "-c", "exit 5"]).await?;
    let done = cluster.wait_job(&done.id, "to end", is_terminal).await?;
    let ok = cluster.submit(2, &["true"]).await?;
    let ok = cluster.wait_job(&ok.id, "to end", is_terminal).await?;
    let running = cluster.submit(1, &["sleep", "300"]).await?;
    let running = cluster
        .wait_job(&running.id, "to run", |j| j.state() == JobState::Running)
        .await?;
    let pending = cluster.submit(16, &["true"]).await?;

    cluster.restart_controller().await?;
    cluster.wait_ready(2).await?;

    let mut jobs = cluster.jobs().await?;
    let after = jobs
        .get_job(GetJobRequest {
            job_id: done.id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(after.state(), JobState::Failed);
    assert_eq!(after.exit_code, Some(5));
    assert_eq!(after.finished_at, done.finished_at);
    let after = jobs
        .get_job(GetJobRequest {
            job_id: ok.id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(after.state(), JobState::Succeeded);
    assert_eq!(after.tasks, ok.tasks);
    let after = jobs
        .get_job(GetJobRequest {
            job_id: pending.id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(after.state(), JobState::Pending);
    // The running job is still running (its agent kept it) and can be cancelled.
    let after = jobs
        .get_job(GetJobRequest {
            job_id: running.id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(after.state(), JobState::Running);
    jobs.cancel_job(CancelJobRequest {
        job_id: running.id.clone(),
        reason: String::new(),
    })
    .await?;
    cluster
        .wait_job(&running.id, "task stopped", |j| {
            j.tasks[0].state() == WorkloadState::Stopped
        })
        .await?;

    let listed = jobs
        .list_jobs(ListJobsRequest::default())
        .await?
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 4);
    let mut fleet = cluster.fleet().await?;
    let nodes = fleet
        .list_nodes(gpufleet_proto::v1::ListNodesRequest::default())
        .await?
        .into_inner()
        .nodes;
    let ids: Vec<String> = nodes
        .iter()
        .filter_map(|n| n.identity.as_ref().map(|i| i.node_id.clone()))
        .collect();
    assert_eq!(ids, vec!["node-a", "node-b"]);
    assert!(nodes.iter().all(|n| n.state() == NodeState::Ready));
    // Logs of a job finished before the restart are still readable.
    assert_eq!(job_log(&cluster, &ok.id, 0).await?, "");
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_every_state_until_the_end() -> anyhow::Result<()> {
    let cluster = Cluster::start(&two_nodes()).await?;
    let job = cluster.submit(1, &["sh", "-c", "sleep 0.3"]).await?;
    let mut jobs = cluster.jobs().await?;
    let mut stream = jobs
        .watch_job(WatchJobRequest {
            job_id: job.id.clone(),
        })
        .await?
        .into_inner();
    let mut states = Vec::new();
    while let Some(update) = stream.next().await {
        let update = update?;
        if states.last() != Some(&update.state()) {
            states.push(update.state());
        }
    }
    assert_eq!(states.last(), Some(&JobState::Succeeded), "{states:?}");
    assert!(states.contains(&JobState::Running), "{states:?}");
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gang_job_runs_all_tasks_across_nodes() -> anyhow::Result<()> {
    let cluster = Cluster::start(&two_nodes()).await?;
    let gang = |locality: Locality| JobSpec {
        tasks: 2,
        gpus_per_task: 4,
        constraints: Some(JobConstraints {
            locality: locality as i32,
            ..Default::default()
        }),
        workload: Some(WorkloadSpec {
            argv: vec!["sh".into(), "-c".into(), "echo $GPUFLEET_TASK_INDEX".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    // By default a gang stays in one region: the two 4-GPU nodes are in
    // different regions, so it cannot run, and says why.
    let regional = cluster.submit_spec(gang(Locality::Unspecified)).await?;
    let regional = cluster
        .wait_job(&regional.id, "a verdict", |j| {
            j.pending_reason
                .as_ref()
                .is_some_and(|r| r.code != "WAITING_FOR_SCHEDULER")
        })
        .await?;
    let reason = regional.pending_reason.clone().unwrap_or_default();
    assert_eq!(reason.code, "NO_FEASIBLE_NODES", "{reason:?}");
    assert!(
        reason.message.contains("in one region"),
        "{}",
        reason.message
    );
    let mut jobs = cluster.jobs().await?;
    jobs.cancel_job(CancelJobRequest {
        job_id: regional.id.clone(),
        reason: String::new(),
    })
    .await?;

    let job = cluster.submit_spec(gang(Locality::Any)).await?;
    let job = cluster.wait_job(&job.id, "to end", is_terminal).await?;
    assert_eq!(job.state(), JobState::Succeeded);
    let nodes: BTreeSet<&str> = job.tasks.iter().map(|t| t.node_id.as_str()).collect();
    assert_eq!(nodes.len(), 2, "8 GPUs over two 4-GPU nodes");
    assert_eq!(job_log(&cluster, &job.id, 1).await?.trim(), "1");
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_naming_the_field() -> anyhow::Result<()> {
    let cluster = Cluster::start(&two_nodes()).await?;
    let mut jobs = cluster.jobs().await?;
    let spec = |gpus: u32, argv: &[&str], constraints: JobConstraints| JobSpec {
        gpus_per_task: gpus,
        constraints: Some(constraints),
        workload: Some(WorkloadSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let cases = [
        (spec(0, &["true"], Default::default()), "spec.gpus_per_task"),
        (
            spec(17, &["true"], Default::default()),
            "spec.gpus_per_task",
        ),
        (spec(1, &[], Default::default()), "spec.workload.argv"),
        (
            spec(
                1,
                &["true"],
                JobConstraints {
                    generations: vec![42],
                    ..Default::default()
                },
            ),
            "spec.constraints.generations[0]",
        ),
        (
            spec(
                1,
                &["true"],
                JobConstraints {
                    models: vec!["H900".into()],
                    ..Default::default()
                },
            ),
            "spec.constraints.models[0]",
        ),
        (
            spec(
                1,
                &["true"],
                JobConstraints {
                    regions: vec!["us east".into()],
                    ..Default::default()
                },
            ),
            "spec.constraints.regions[0]",
        ),
    ];
    for (spec, field) in cases {
        let err = jobs
            .submit_job(gpufleet_proto::v1::SubmitJobRequest { spec: Some(spec) })
            .await
            .expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let err = jobs
        .get_job(GetJobRequest {
            job_id: "../../etc/passwd".into(),
        })
        .await
        .expect_err("bad id");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = jobs
        .get_job(GetJobRequest {
            job_id: "job-000000000000".into(),
        })
        .await
        .expect_err("unknown id");
    assert_eq!(err.code(), Code::NotFound);
    let err = jobs
        .list_jobs(ListJobsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(err.code(), Code::InvalidArgument);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_cannot_take_a_node_id() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(&two_nodes()).await?;
    let channel = tonic::transport::Channel::from_shared(cluster.endpoint())?
        .connect()
        .await?;
    let mut client = AgentControlClient::new(channel);
    let impostor = |join_token: &str| AgentMessage {
        seq: 1,
        body: Some(agent_message::Body::Hello(AgentHello {
            identity: Some(NodeIdentity {
                node_id: "node-a".into(),
                provider: "aws".into(),
                region: "us-east-1".into(),
                hostname: "impostor".into(),
                ..Default::default()
            }),
            gpus: vec![GpuInfo {
                uuid: "GPU-impostor".into(),
                ..Default::default()
            }],
            join_token: join_token.to_string(),
            ..Default::default()
        })),
    };
    // Without the join token: refused at the door.
    let err = client
        .connect(tokio_stream::iter(vec![impostor("wrong")]))
        .await
        .expect_err("a wrong join token must be refused");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("join token"), "{}", err.message());

    // With the join token, while node-a's agent is connected: the id is taken.
    let err = client
        .connect(tokio_stream::iter(vec![impostor(
            gpufleet_tests::JOIN_TOKEN,
        )]))
        .await
        .expect_err("a live node id must not be taken");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(
        err.message().contains("node-a") && err.message().contains("--node-id"),
        "{}",
        err.message()
    );

    // node-a's agent goes away: the id stays bound to it (its node secret),
    // so the impostor is still refused.
    let agent = cluster.agents.remove(0);
    agent.shutdown().await?;
    let mut fleet = cluster.fleet().await?;
    gpufleet_tests::eventually("node-a to be disconnected", || {
        let mut fleet = fleet.clone();
        async move {
            let node = fleet
                .get_node(gpufleet_proto::v1::GetNodeRequest {
                    node_id: "node-a".into(),
                })
                .await?
                .into_inner();
            Ok((!node.connected).then_some(()))
        }
    })
    .await?;
    let err = client
        .connect(tokio_stream::iter(vec![impostor(
            gpufleet_tests::JOIN_TOKEN,
        )]))
        .await
        .expect_err("another agent must not take a bound node id");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("node-a") && err.message().contains("reset-identity"),
        "{}",
        err.message()
    );

    // An admin resets the identity (a reinstalled host): the next agent to
    // register as node-a binds it.
    let reset = fleet
        .reset_node_identity(gpufleet_proto::v1::ResetNodeIdentityRequest {
            node_id: "node-a".into(),
        })
        .await?
        .into_inner();
    assert!(reset.was_bound);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(impostor(gpufleet_tests::JOIN_TOKEN)).await?;
    let mut downlink = client
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let ack = downlink.message().await?;
    assert!(
        matches!(
            ack.and_then(|m| m.body),
            Some(gpufleet_proto::v1::controller_message::Body::HelloAck(a)) if !a.node_secret.is_empty()
        ),
        "the new agent is issued a node secret"
    );
    drop(tx);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_groups_by_provider_and_generation() -> anyhow::Result<()> {
    let nodes = vec![
        NodeSpec::new("h1", "aws", "us-east-1", "8xH100-SXM-80GB", 3.93),
        NodeSpec::new("h2", "aws", "us-east-1", "8xH100-SXM-80GB", 4.00),
        NodeSpec::new("a1", "azure", "westeurope", "4xA100-SXM-80GB", 3.40),
    ];
    let cluster = Cluster::start(&nodes).await?;
    let job = cluster.submit(3, &["sleep", "300"]).await?;
    cluster
        .wait_job(&job.id, "to run", |j| j.state() == JobState::Running)
        .await?;
    let mut fleet = cluster.fleet().await?;
    let capacity = fleet
        .get_capacity(GetCapacityRequest {
            group_by: vec![
                CapacityDimension::Provider as i32,
                CapacityDimension::Generation as i32,
            ],
        })
        .await?
        .into_inner();
    // (provider, generation, nodes, total, allocated, free, min price, max price)
    type Row = (String, i32, u32, u32, u32, u32, u64, u64);
    let rows: Vec<Row> = capacity
        .groups
        .iter()
        .map(|g| {
            (
                g.provider.clone(),
                g.generation,
                g.nodes,
                g.total_gpus,
                g.allocated_gpus,
                g.free_gpus,
                g.min_price_per_gpu_hour_micro_usd,
                g.max_price_per_gpu_hour_micro_usd,
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                "aws".into(),
                GpuGeneration::Hopper as i32,
                2,
                16,
                0,
                16,
                3_930_000,
                4_000_000
            ),
            (
                "azure".into(),
                GpuGeneration::Ampere as i32,
                1,
                4,
                3,
                1,
                3_400_000,
                3_400_000
            ),
        ]
    );
    let total = capacity.total.unwrap_or_default();
    assert_eq!(
        (
            total.nodes,
            total.total_gpus,
            total.healthy_gpus,
            total.allocated_gpus,
            total.free_gpus
        ),
        (3, 20, 20, 3, 17)
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_node_ends_its_jobs_and_its_capacity_leaves() -> anyhow::Result<()> {
    let leases = (Duration::from_millis(600), Duration::from_millis(1500));
    let mut cluster = Cluster::start_with_leases(&two_nodes(), leases).await?;
    let job = cluster.submit(4, &["sleep", "300"]).await?;
    let job = cluster
        .wait_job(&job.id, "to run", |j| j.state() == JobState::Running)
        .await?;
    let node_id = job.tasks[0].node_id.clone();
    let index = cluster
        .agents
        .iter()
        .position(|a| a.node_id() == node_id)
        .expect("agent");
    let agent = cluster.agents.remove(index);
    agent.shutdown().await?;

    let job = cluster.wait_job(&job.id, "to be lost", is_terminal).await?;
    assert_eq!(job.state(), JobState::Lost, "{job:?}");
    assert_eq!(job.tasks[0].state(), WorkloadState::Lost);
    assert!(job.message.contains(&node_id), "{}", job.message);
    let mut fleet = cluster.fleet().await?;
    let node = fleet
        .get_node(gpufleet_proto::v1::GetNodeRequest {
            node_id: node_id.clone(),
        })
        .await?
        .into_inner();
    assert_eq!(node.state(), NodeState::Lost);
    let capacity = fleet
        .get_capacity(GetCapacityRequest::default())
        .await?
        .into_inner();
    assert_eq!(
        capacity.total.unwrap_or_default().total_gpus,
        4,
        "only the surviving node counts"
    );

    // New work goes to the surviving node only.
    let next = cluster.submit(4, &["true"]).await?;
    let next = cluster.wait_job(&next.id, "to end", is_terminal).await?;
    assert_eq!(next.state(), JobState::Succeeded);
    assert_ne!(next.tasks[0].node_id, node_id);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_on_controller_and_agent() -> anyhow::Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let cluster = Cluster::start(&two_nodes()).await?;
    let agent = format!("http://{}", cluster.agents[0].local_addr());
    for (endpoint, service) in [
        (cluster.endpoint(), "gpufleet.v1.Jobs"),
        (agent, "gpufleet.v1.Agent"),
    ] {
        let channel = tonic::transport::Channel::from_shared(endpoint.clone())?
            .connect()
            .await?;
        let mut health = HealthClient::new(channel.clone());
        let status = health
            .check(HealthCheckRequest {
                service: service.to_string(),
            })
            .await?
            .into_inner();
        assert_eq!(status.status, 1, "{service} SERVING on {endpoint}");

        let mut reflection = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = reflection
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await?
            .into_inner();
        let response = responses.next().await.expect("one answer")?;
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("unexpected reflection answer: {response:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.contains(&service.to_string()),
            "{endpoint}: {names:?}"
        );
    }
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_through_live_and_finished_jobs_once_each() -> anyhow::Result<()> {
    let cluster = Cluster::start(&two_nodes()).await?;
    let spec = |tenant: &str, argv: &[&str]| JobSpec {
        tenant: tenant.into(),
        gpus_per_task: 1,
        workload: Some(WorkloadSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    // Finished and running jobs of two tenants, interleaved in time.
    let mut submitted = Vec::new();
    for (i, tenant) in ["team-a", "team-b", "team-a", "team-a", "team-b", "team-a"]
        .into_iter()
        .enumerate()
    {
        let argv: &[&str] = if i % 2 == 0 {
            &["true"]
        } else {
            &["sleep", "300"]
        };
        let job = cluster.submit_spec(spec(tenant, argv)).await?;
        let wait = if i % 2 == 0 { "to end" } else { "to run" };
        cluster
            .wait_job(&job.id, wait, |j| {
                if i % 2 == 0 {
                    is_terminal(j)
                } else {
                    j.state() == JobState::Running
                }
            })
            .await?;
        submitted.push((job.id, tenant));
    }
    let mut jobs = cluster.jobs().await?;
    for (states, tenant) in [
        (vec![], ""),
        (vec![JobState::Running, JobState::Succeeded], ""),
        (vec![], "team-a"),
        (vec![JobState::Running, JobState::Succeeded], "team-b"),
    ] {
        let mut paged = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = jobs
                .list_jobs(ListJobsRequest {
                    states: states.iter().map(|s| *s as i32).collect(),
                    tenant: tenant.into(),
                    page_size: 1,
                    page_token,
                })
                .await?
                .into_inner();
            assert!(page.jobs.len() <= 1);
            paged.extend(page.jobs.into_iter().map(|j| j.id));
            page_token = page.next_page_token;
            if page_token.is_empty() {
                break;
            }
        }
        let expected: Vec<String> = submitted
            .iter()
            .rev()
            .filter(|(_, t)| tenant.is_empty() || t == &tenant)
            .map(|(id, _)| id.clone())
            .collect();
        assert_eq!(paged, expected, "states {states:?} tenant {tenant:?}");
    }
    cluster.shutdown().await
}
