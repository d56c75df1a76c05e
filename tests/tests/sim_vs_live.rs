//! The simulator and the live controller make the same decisions for the
//! same inputs: seeded workloads are submitted to a real controller with
//! simulated agents on loopback, one job at a time (each waits for its
//! scheduling pass), and replayed through `gpufleet_scheduler::sim` with one
//! arrival per virtual second (so one pass per job, as live); every job
//! must land on the same node and the same GPUs, or stay pending in both.
//! Jobs sleep for an hour, so none ends while the comparison runs: virtual
//! and real time never have to agree on a departure. Each workload ends
//! with a gang (two 1-GPU tasks, placed together or not at all); its first
//! task is compared.

use std::collections::HashMap;

use gpufleet_controller::placement::generation_from_proto;
use gpufleet_proto::v1::{
    Job, JobConstraints, JobSpec, JobState, ListNodesRequest, Node, PlacementPolicy, WorkloadSpec,
};
use gpufleet_scheduler::Policy;
use gpufleet_scheduler::reason::WAITING_FOR_SCHEDULER;
use gpufleet_scheduler::sim::{self, SimConfig, SimJob, SimNode, SimPolicy, Workload};
use gpufleet_tests::{Cluster, NodeSpec};

const SEEDS: [u64; 3] = [25, 7, 2026];
const JOBS: usize = 14;

fn fleet() -> Vec<NodeSpec> {
    vec![
        NodeSpec::new("n-a", "aws", "us-east-1", "4xH100-SXM-80GB", 3.93),
        NodeSpec::new("n-b", "lambda", "us-west-1", "4xA100-SXM-80GB", 1.79),
        NodeSpec::new("n-c", "nebius", "eu-north1", "8xH100-SXM-80GB", 2.90),
        NodeSpec::new("n-d", "gcp", "us-central1", "2xA10G", 1.00),
    ]
}

/// What one job asks for.
#[derive(Debug, Clone)]
struct Request {
    gpus: u32,
    share_milli: u32,
    models: Vec<String>,
    tasks: u32,
}

/// The seeded workload: mostly 1-2 GPUs, some 4, a few shares of a GPU,
/// a quarter pinned to one model. More than the fleet holds, so some stay
/// pending and fragmentation decides. Then a gang of two 1-GPU tasks.
fn workload(seed: u64) -> Vec<Request> {
    let mut rng = sim::workload::Rng::new(seed);
    let mut requests: Vec<Request> = (0..JOBS)
        .map(|_| {
            let (gpus, share_milli) = match rng.below(10) {
                0..=3 => (1, 0),
                4..=6 => (2, 0),
                7 => (4, 0),
                _ => (1, [250, 500][rng.below(2) as usize]),
            };
            let models = match rng.below(8) {
                0 => vec!["A100-SXM-80GB".to_string()],
                1 => vec!["H100-SXM-80GB".to_string()],
                _ => Vec::new(),
            };
            Request {
                gpus,
                share_milli,
                models,
                tasks: 1,
            }
        })
        .collect();
    requests.push(Request {
        gpus: 1,
        share_milli: 0,
        models: Vec::new(),
        tasks: 2,
    });
    requests
}

fn wire_policy(policy: Policy) -> PlacementPolicy {
    match policy {
        Policy::Cost => PlacementPolicy::Cost,
        Policy::Pack => PlacementPolicy::Pack,
        Policy::Spread => PlacementPolicy::Spread,
        other => panic!("no wire policy for {other:?}"),
    }
}

/// Per job: Some((node id, GPU positions in index order)) or None (pending).
type Placements = Vec<Option<(String, Vec<u32>)>>;

/// The live controller's placements, one job at a time.
async fn live(policy: Policy, requests: &[Request]) -> anyhow::Result<(Vec<Node>, Placements)> {
    let cluster = Cluster::start(&fleet()).await?;
    let mut jobs: Vec<Job> = Vec::new();
    for r in requests {
        let job = cluster
            .submit_spec(JobSpec {
                tasks: r.tasks,
                gpus_per_task: r.gpus,
                gpu_share_milli: r.share_milli,
                constraints: Some(JobConstraints {
                    models: r.models.clone(),
                    ..Default::default()
                }),
                placement_policy: wire_policy(policy) as i32,
                workload: Some(WorkloadSpec {
                    argv: vec!["sleep".into(), "3600".into()],
                    stop_grace_period_seconds: 1,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?;
        // Placed, or pending with the verdict of a pass (not just queued):
        // the next job is submitted only after this one was decided.
        let job = cluster
            .wait_job(&job.id, "a scheduling decision", |j| {
                j.state() != JobState::Pending
                    || j.pending_reason
                        .as_ref()
                        .is_some_and(|r| r.code != WAITING_FOR_SCHEDULER)
            })
            .await?;
        jobs.push(job);
    }
    let mut fleet = cluster.fleet().await?;
    let nodes = fleet
        .list_nodes(ListNodesRequest::default())
        .await?
        .into_inner()
        .nodes;
    // GPU uuid → (node, position in index order).
    let mut position: HashMap<String, u32> = HashMap::new();
    for node in &nodes {
        let mut infos: Vec<_> = node.gpus.iter().filter_map(|g| g.info.as_ref()).collect();
        infos.sort_by_key(|i| i.index);
        for (p, info) in infos.iter().enumerate() {
            position.insert(info.uuid.clone(), p as u32);
        }
    }
    let placements = jobs
        .iter()
        .map(|job| {
            let task = job.tasks.first().filter(|t| !t.node_id.is_empty())?;
            let mut gpus: Vec<u32> = task
                .gpu_uuids
                .iter()
                .map(|u| position.get(u).copied().unwrap_or(u32::MAX))
                .collect();
            gpus.sort_unstable();
            Some((task.node_id.clone(), gpus))
        })
        .collect();
    cluster.shutdown().await?;
    Ok((nodes, placements))
}

/// The simulator's placements for the same nodes and requests.
fn simulated(policy: Policy, nodes: &[Node], requests: &[Request]) -> Placements {
    let nodes: Vec<SimNode> = nodes
        .iter()
        .map(|n| {
            let identity = n.identity.clone().unwrap_or_default();
            let first = n
                .gpus
                .first()
                .and_then(|g| g.info.clone())
                .unwrap_or_default();
            SimNode {
                id: identity.node_id,
                model: first.model.clone(),
                generation: generation_from_proto(first.generation()),
                gpus: n.gpus.len() as u32,
                price_per_gpu_hour_micro_usd: identity.price_per_gpu_hour_micro_usd,
                provider: identity.provider,
                region: identity.region,
            }
        })
        .collect();
    let jobs = requests
        .iter()
        .enumerate()
        .map(|(i, r)| SimJob {
            id: format!("job-{i}"),
            tenant: "default".into(),
            priority: 0,
            // One arrival per virtual second: one pass per job, as live.
            arrival: i as u64,
            duration: 3600,
            gpus: r.gpus,
            gpu_milli: r.share_milli,
            models: r.models.clone(),
            tasks: r.tasks,
            ..Default::default()
        })
        .collect();
    let workload = Workload {
        nodes,
        jobs,
        notes: Default::default(),
    };
    let report = sim::simulate(
        &workload,
        SimPolicy::Scheduler(policy),
        &SimConfig::default(),
    );
    report
        .placements
        .iter()
        .zip(&report.starts)
        .map(|(p, start)| {
            // The simulation runs on to the departures an hour later and
            // places what waited then; live, nothing has ended yet.
            start.filter(|&s| s < 3600)?;
            let (node, mask) = (*p)?;
            let gpus = (0..32).filter(|b| mask & (1 << b) != 0).collect();
            Some((workload.nodes[node as usize].id.clone(), gpus))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_places_a_seeded_workload_exactly_as_the_live_controller()
-> anyhow::Result<()> {
    let (mut placed, mut pending, mut gangs) = (0, 0, 0);
    for seed in SEEDS {
        let requests = workload(seed);
        for policy in [Policy::Cost, Policy::Pack, Policy::Spread] {
            let (nodes, live) = live(policy, &requests).await?;
            let simulated = simulated(policy, &nodes, &requests);
            for (i, (l, s)) in live.iter().zip(&simulated).enumerate() {
                assert_eq!(
                    l, s,
                    "seed {seed}, {policy:?}: job {i} ({:?}) placed live on {l:?}, simulated on {s:?}\nlive: {live:?}\nsim:  {simulated:?}",
                    requests[i]
                );
            }
            placed += live.iter().filter(|p| p.is_some()).count();
            gangs += usize::from(live.last().is_some_and(|p| p.is_some()));
            pending += live.iter().filter(|p| p.is_none()).count();
        }
    }
    // The comparison means something only if work was placed and the
    // fleet ran full (some jobs had to wait, so fragmentation decided).
    assert!(placed >= 5 * SEEDS.len() * 3, "{placed} placed");
    assert!(pending > 0, "nothing pending in any run");
    assert!(gangs > 0, "no gang was placed in any run");
    Ok(())
}
