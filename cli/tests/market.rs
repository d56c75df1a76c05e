//! Prices that move and a spot node that is reclaimed, end to end: a real
//! controller reading a price file, two agents (one spot, watching a mock
//! AWS metadata service on loopback), the `gpufleet` binary submitting and
//! querying. The controller's node-loss lease is an hour, so only the
//! interruption notice can move the job.

use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gpufleet_agent::config::InterruptionConfig;
use gpufleet_agent::interruption::cloud::Cloud;
use gpufleet_agent::interruption::http::Endpoint;
use gpufleet_agent::interruption::mock::MockMetadata;
use gpufleet_controller::ControllerConfig;
use gpufleet_controller::pricing::source::PriceSource;
use gpufleet_proto::v1::usage_client::UsageClient;
use gpufleet_proto::v1::{
    GetJobRequest, JobState, ListUsageRecordsRequest, MarketPricesRequest, WorkloadState,
};
use gpufleet_tests::{Cluster, NodeSpec, eventually};

fn gpufleet(cluster: &Cluster, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpufleet"))
        .env("GPUFLEET_CONTROLLER", cluster.endpoint())
        .env("GPUFLEET_TOKEN", &cluster.admin_token)
        .args(args)
        .output()
        .expect("gpufleet runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The price file sits next to the controller's data dir.
fn prices_path(controller_data_dir: &std::path::Path) -> std::path::PathBuf {
    controller_data_dir
        .parent()
        .unwrap_or(controller_data_dir)
        .join("prices.csv")
}

fn configure(config: &mut ControllerConfig) {
    let path = prices_path(&config.data_dir);
    config.price_sources =
        vec![PriceSource::parse(&format!("file:{}", path.display())).expect("a file source")];
    config.price_refresh_interval = Duration::from_millis(200);
}

fn publish(cluster: &Cluster, spot_usd: &str) -> anyhow::Result<()> {
    let path = prices_path(&cluster.data_dir().join("controller"));
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!(
            "provider,region,model,capacity,price_per_gpu_hour_usd\naws,us-east-1,H100-SXM-80GB,spot,{spot_usd}\n"
        ),
    )?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

async fn wait_price(cluster: &Cluster, micro_usd: u64) -> anyhow::Result<u64> {
    let channel = cluster.channel().await?;
    eventually(&format!("the spot price at {micro_usd}"), || {
        let mut usage = UsageClient::new(channel.clone());
        async move {
            let prices = usage
                .market_prices(MarketPricesRequest::default())
                .await?
                .into_inner();
            Ok(prices
                .history
                .iter()
                .rev()
                .find(|c| c.new_price_per_gpu_hour_micro_usd == Some(micro_usd))
                .and_then(|c| c.at)
                .map(|t| t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000))
        }
    })
    .await
}

fn ms(ts: Option<prost_types::Timestamp>) -> u64 {
    ts.map_or(0, |t| t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaimed_spot_node_requeues_its_job_at_once_and_bills_each_second_once()
-> anyhow::Result<()> {
    let mut cluster = Cluster::start_configured(
        &[],
        (Duration::from_secs(15), Duration::from_secs(3600)),
        configure,
    )
    .await?;
    let metadata = MockMetadata::start().await?;
    let mut spot = cluster.agent_config(&NodeSpec::new(
        "spot-node",
        "aws",
        "us-east-1",
        "1xH100-SXM-80GB",
        0.90,
    ));
    spot.node.spot = true;
    spot.interruptions = Some(InterruptionConfig {
        cloud: Cloud::Aws,
        endpoint: Endpoint::parse(&metadata.addr().to_string()).map_err(anyhow::Error::msg)?,
        poll_interval: Duration::from_millis(100),
        stop_margin: Duration::from_secs(5),
    });
    cluster.add_agent_with(spot).await?;
    cluster
        .add_agent(&NodeSpec::new(
            "od-node",
            "aws",
            "us-east-1",
            "1xH100-SXM-80GB",
            3.00,
        ))
        .await?;
    cluster.wait_ready(2).await?;
    publish(&cluster, "1.20")?;
    wait_price(&cluster, 1_200_000).await?;

    let seen = cluster.data_dir().join("seen-interruption");
    // What a checkpointing job does: on SIGTERM, read the deadline.
    let script = format!(
        "trap 'cp \"$GPUFLEET_INTERRUPT_FILE\" {}; exit 0' TERM; while true; do sleep 0.1; done",
        seen.display()
    );
    let submitted = gpufleet(
        &cluster,
        &[
            "jobs",
            "submit",
            "--gpus",
            "1",
            "--spot",
            "allowed",
            "--retries-on-node-loss",
            "1",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    assert!(submitted.status.success(), "{}", text(&submitted.stderr));
    let id = text(&submitted.stdout).trim().to_string();
    let jobs = cluster.jobs().await?;
    let on_node = |node: &'static str| {
        let jobs = jobs.clone();
        let id = id.clone();
        move || {
            let mut jobs = jobs.clone();
            let id = id.clone();
            async move {
                let job = jobs
                    .get_job(GetJobRequest { job_id: id })
                    .await?
                    .into_inner();
                Ok((job.state() == JobState::Running
                    && job.tasks.first().is_some_and(|t| t.node_id == node))
                .then_some(job))
            }
        }
    };
    let first = eventually("the job running on the spot node", on_node("spot-node")).await?;
    assert_eq!(first.tasks[0].price_per_gpu_hour_micro_usd, 1_200_000);

    publish(&cluster, "1.50")?;
    let changed_ms = wait_price(&cluster, 1_500_000).await?;

    // The cloud gives two minutes' notice.
    let deadline_secs = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 120;
    let noticed = Instant::now();
    metadata.announce("terminate", UNIX_EPOCH + Duration::from_secs(deadline_secs));
    let second = eventually("the job running on the on-demand node", on_node("od-node")).await?;
    let moved_in = noticed.elapsed();
    eprintln!("notice → running on another node: {moved_in:?}");
    assert_eq!(second.attempt, first.attempt + 1);

    // The deadline reached the workload, in the file its env names.
    let told = eventually("the workload's copy of the interruption file", || {
        let seen = seen.clone();
        async move {
            Ok(std::fs::read_to_string(&seen)
                .ok()
                .filter(|t| t.ends_with('\n')))
        }
    })
    .await?;
    assert!(
        told.contains(&format!(
            "GPUFLEET_INTERRUPT_DEADLINE_UNIX={deadline_secs}\n"
        )),
        "{told}"
    );
    assert!(
        told.contains("GPUFLEET_INTERRUPT_SOURCE=aws\nGPUFLEET_INTERRUPT_ACTION=terminate\n"),
        "{told}"
    );

    let cancelled = gpufleet(&cluster, &["jobs", "cancel", &id]);
    assert!(cancelled.status.success(), "{}", text(&cancelled.stderr));
    let channel = cluster.channel().await?;
    let records = eventually("both allocations in the ledger", || {
        let mut usage = UsageClient::new(channel.clone());
        let id = id.clone();
        async move {
            let records = usage
                .list_usage_records(ListUsageRecordsRequest {
                    job_id: id,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .records;
            Ok((records.len() >= 2).then_some(records))
        }
    })
    .await?;
    // Each allocation billed once.
    assert_eq!(records.len(), 2, "{records:#?}");
    let interrupted = records
        .iter()
        .find(|r| r.allocation_id == first.tasks[0].allocation_id)
        .expect("the spot allocation's record");
    assert_eq!(interrupted.ended_as(), WorkloadState::Interrupted);
    assert!(
        records
            .iter()
            .any(|r| r.allocation_id == second.tasks[0].allocation_id)
    );
    // By hand: $1.20/h until the change, $1.50/h after, one GPU.
    let (start, end) = (ms(interrupted.started_at), ms(interrupted.ended_at));
    assert!(
        start < changed_ms && changed_ms < end,
        "{start} {changed_ms} {end}"
    );
    let exact = 1_200_000u128 * u128::from(changed_ms - start)
        + 1_500_000u128 * u128::from(end - changed_ms);
    let by_hand = ((exact + 1_800_000) / 3_600_000) as u64;
    assert_eq!(interrupted.cost_micro_usd, by_hand);
    assert_eq!(ms(interrupted.price_changes[0].at), changed_ms);

    let shown = gpufleet(&cluster, &["market", "interruptions"]);
    assert!(shown.status.success(), "{}", text(&shown.stderr));
    let out = text(&shown.stdout);
    assert!(
        out.contains("spot-node") && out.contains("terminate"),
        "{out}"
    );
    assert!(out.contains(&first.tasks[0].allocation_id), "{out}");
    let prices = gpufleet(&cluster, &["market", "prices", "--since", "1h"]);
    let out = text(&prices.stdout);
    assert!(prices.status.success(), "{}", text(&prices.stderr));
    assert!(
        out.contains("aws/us-east-1/H100-SXM-80GB spot") && out.contains("$1.50"),
        "{out}"
    );
    let node = gpufleet(&cluster, &["nodes", "get", "spot-node"]);
    assert!(
        text(&node.stdout).contains("spot interruption"),
        "{}",
        text(&node.stdout)
    );
    drop(jobs);
    cluster.shutdown().await
}
