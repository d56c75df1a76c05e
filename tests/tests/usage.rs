//! The usage ledger through real controllers and agents: one record per
//! allocation, exact GPU-time and cost grouped every way, also across a
//! controller restart in the middle.

use std::collections::HashSet;

use gpufleet_proto::v1::usage_client::UsageClient;
use gpufleet_proto::v1::{
    JobSpec, JobState, ListUsageRecordsRequest, UsageDimension, UsageRecord, UsageReportRequest,
    WorkloadSpec, WorkloadState,
};
use gpufleet_tests::{Cluster, two_nodes};

fn spec(tenant: &str, class: &str, name: &str, gpus: u32, script: &str) -> JobSpec {
    JobSpec {
        tenant: tenant.into(),
        workload_class: class.into(),
        name: name.into(),
        gpus_per_task: gpus,
        workload: Some(WorkloadSpec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn ms(ts: &Option<prost_types::Timestamp>) -> u64 {
    ts.map_or(0, |t| t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000)
}

async fn usage(cluster: &Cluster) -> anyhow::Result<UsageClient<gpufleet_tests::Authed>> {
    Ok(UsageClient::new(cluster.channel().await?))
}

fn terminal(job: &gpufleet_proto::v1::Job) -> bool {
    matches!(
        job.state(),
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_is_exact_and_written_once_across_a_controller_restart() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(&two_nodes()).await?;
    let quick = cluster
        .submit_spec(spec("a", "training", "warmup", 2, "sleep 1"))
        .await?;
    let failing = cluster
        .submit_spec(spec("b", "batch", "etl", 1, "sleep 1; exit 1"))
        .await?;
    let long = cluster
        .submit_spec(spec("b", "inference", "serve", 4, "sleep 3"))
        .await?;
    cluster.wait_job(&quick.id, "to end", terminal).await?;
    cluster
        .wait_job(&long.id, "to run", |j| j.state() == JobState::Running)
        .await?;

    // Restart while `long` runs: its record must still be written, once.
    cluster.restart_controller().await?;
    cluster.wait_ready(2).await?;
    let mut jobs = Vec::new();
    for id in [&quick.id, &failing.id, &long.id] {
        jobs.push(cluster.wait_job(id, "to end", terminal).await?);
    }
    assert_eq!(jobs[1].state(), JobState::Failed);

    let mut client = usage(&cluster).await?;
    let records = client
        .list_usage_records(ListUsageRecordsRequest {
            include_running: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .records;
    assert_eq!(records.len(), 3, "{records:#?}");
    let ids: HashSet<&str> = records.iter().map(|r| r.allocation_id.as_str()).collect();
    assert_eq!(ids.len(), 3, "one record per allocation");

    for job in &jobs {
        let task = &job.tasks[0];
        let record: &UsageRecord = records
            .iter()
            .find(|r| r.allocation_id == task.allocation_id)
            .expect("record");
        assert!(!record.running);
        let duration = ms(&task.finished_at) - ms(&task.started_at);
        assert_eq!(
            record.gpu_milliseconds,
            duration * task.gpu_uuids.len() as u64,
            "GPU-time is exact"
        );
        assert_eq!(ms(&record.started_at), ms(&task.started_at));
        let exact = task.price_per_gpu_hour_micro_usd as u128 * record.gpu_milliseconds as u128;
        assert_eq!(
            record.cost_micro_usd as u128,
            (exact + 1_800_000) / 3_600_000,
            "cost is exact to the micro-dollar"
        );
        assert_eq!(record.tenant, job.spec.as_ref().unwrap().tenant);
        assert_eq!(record.provider, task.provider);
        assert_eq!(record.model, task.model);
        assert!(
            duration >= 900,
            "jobs ran for their known durations: {duration} ms"
        );
    }
    assert_eq!(
        records
            .iter()
            .find(|r| r.job_id == failing.id)
            .map(|r| r.ended_as()),
        Some(WorkloadState::Failed)
    );

    // Every grouping sums to the same exact totals.
    let total_ms: u64 = records.iter().map(|r| r.gpu_milliseconds).sum();
    let total_exact: u128 = records
        .iter()
        .map(|r| r.price_per_gpu_hour_micro_usd as u128 * r.gpu_milliseconds as u128)
        .sum();
    let dims = [
        UsageDimension::Provider,
        UsageDimension::Region,
        UsageDimension::Generation,
        UsageDimension::Model,
        UsageDimension::Tenant,
        UsageDimension::WorkloadClass,
        UsageDimension::JobName,
    ];
    for dim in dims {
        let report = client
            .get_usage_report(UsageReportRequest {
                group_by: vec![dim as i32],
                ..Default::default()
            })
            .await?
            .into_inner();
        let total = report.total.clone().unwrap_or_default();
        assert_eq!(total.gpu_milliseconds, total_ms, "{dim:?}");
        assert_eq!(
            total.cost_micro_usd as u128,
            (total_exact + 1_800_000) / 3_600_000,
            "{dim:?}"
        );
        let rows_ms: u64 = report.rows.iter().map(|r| r.gpu_milliseconds).sum();
        assert_eq!(rows_ms, total_ms, "{dim:?}");
        if dim == UsageDimension::Tenant {
            let b = report
                .rows
                .iter()
                .find(|r| r.tenant == "b")
                .expect("tenant b");
            let b_ms: u64 = records
                .iter()
                .filter(|r| r.tenant == "b")
                .map(|r| r.gpu_milliseconds)
                .sum();
            assert_eq!(b.gpu_milliseconds, b_ms);
            assert_eq!(b.allocations, 2);
        }
    }
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn market_signals_rank_tight_regions_and_draw_the_demand_curve() -> anyhow::Result<()> {
    use gpufleet_proto::v1::{
        GpuGeneration, JobConstraints, MarketElasticityRequest, MarketTightnessRequest,
    };
    // node-a: 4 Hopper GPUs in us-east-1 at $3.93; node-b: 4 Ampere in us-west-1 at $1.79.
    let cluster = Cluster::start(&two_nodes()).await?;
    // Fill us-east-1, then queue Hopper demand there: 4 GPUs with no bid,
    // 2 GPUs bidding $3.00 (below the ask), and an impossible 64-GPU gang.
    let busy = cluster
        .submit_spec(JobSpec {
            constraints: Some(JobConstraints {
                regions: vec!["us-east-1".into()],
                ..Default::default()
            }),
            ..spec("a", "training", "fill", 4, "sleep 30")
        })
        .await?;
    cluster
        .wait_job(&busy.id, "to run", |j| j.state() == JobState::Running)
        .await?;
    let hopper = |gpus: u32, bid: Option<u64>| JobSpec {
        constraints: Some(JobConstraints {
            generations: vec![GpuGeneration::Hopper as i32],
            max_price_per_gpu_hour_micro_usd: bid,
            ..Default::default()
        }),
        ..spec("b", "training", "wait", gpus, "true")
    };
    cluster.submit_spec(hopper(4, None)).await?;
    cluster.submit_spec(hopper(2, Some(3_000_000))).await?;
    cluster
        .submit_spec(JobSpec {
            tasks: 16,
            ..hopper(4, None)
        })
        .await?;

    let controller = cluster
        .controller
        .as_ref()
        .expect("controller")
        .controller()
        .clone();
    let minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        / 60
        + 1;
    controller.record_market_at(minute)?;
    // The handle would keep the controller (and its store) alive past shutdown.
    drop(controller);

    let mut client = usage(&cluster).await?;
    let tight = client
        .market_tightness(MarketTightnessRequest::default())
        .await?
        .into_inner();
    let east = tight
        .regions
        .iter()
        .find(|r| r.region == "us-east-1")
        .expect("us-east-1 is recorded");
    assert_eq!((east.supply_gpus, east.free_gpus), (4, 0));
    assert_eq!(
        east.pending_demand_gpus, 4,
        "the $3.00 bid cannot run at $3.93"
    );
    assert_eq!(east.tightness_now, 4.0);
    assert_eq!(tight.regions[0].region, "us-east-1", "tightest first");
    assert_eq!(
        tight.unmet_demand_gpus,
        64 + 2,
        "the gang fits nowhere; the low bid fits nowhere at its price"
    );

    let curve = client
        .market_elasticity(MarketElasticityRequest {
            region: "us-east-1".into(),
            generation: GpuGeneration::Hopper as i32,
            since: None,
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(curve.ask_median_micro_usd, 3_930_000);
    let at = |p: u64| {
        curve
            .demand_curve
            .iter()
            .find(|d| d.price_micro_usd == p)
            .map(|d| d.gpus)
    };
    assert_eq!(at(3_000_000), Some(6), "both bids at $3.00");
    assert_eq!(
        at(3_500_000),
        Some(4),
        "only the job without a bid above $3.00"
    );
    assert!(curve.method.contains("arc elasticity"));
    cluster.shutdown().await
}
