//! Prices that move and capacity that leaves, on virtual time: a price
//! source's change in the middle of an allocation is billed second by
//! second; elasticity over time gets a number once prices have moved; a
//! spot interruption requeues the work at once, is recorded, and feeds
//! the interruption rate the scheduler prices spot by.

mod common;

use std::sync::Arc;
use std::time::Duration;

use gpufleet_controller::Controller;
use gpufleet_controller::config::ControllerConfig;
use gpufleet_controller::pricing::source::PriceSource;
use gpufleet_controller::store::MemoryStore;
use gpufleet_controller::telemetry::MemoryRollupStore;
use gpufleet_controller::usage::RecordFilter;
use gpufleet_core::ManualClock;
use gpufleet_proto::v1::{
    GpuGeneration, InterruptionNotice, JobConstraints, JobSpec, JobState, RetryPolicy, SpotPolicy,
    WorkloadSpec, WorkloadState, WorkloadStatus,
};
use prost_types::Timestamp;

const START_UNIX: u64 = 1_800_000_000;
const H100: &str = "H100-SXM-80GB";

fn controller(dir: &std::path::Path) -> anyhow::Result<(Controller, Arc<ManualClock>)> {
    let clock = Arc::new(ManualClock::at_unix_secs(START_UNIX));
    let mut config = ControllerConfig::for_data_dir(dir);
    config.join_token = common::JOIN_TOKEN.into();
    config.price_sources = vec![
        PriceSource::parse(&format!("file:{}", dir.join("prices.csv").display()))
            .map_err(anyhow::Error::msg)?,
    ];
    let controller = Controller::open_with_clock(
        config,
        Box::new(MemoryStore::new()),
        Arc::new(MemoryRollupStore::default()),
        Vec::new(),
        clock.clone(),
    )?;
    Ok((controller, clock))
}

/// The price source publishes `rows` (`provider,region,model,capacity,usd`);
/// the controller reads it now, as its refresher would.
fn publish(controller: &Controller, rows: &[&str]) -> anyhow::Result<usize> {
    let text = format!(
        "provider,region,model,capacity,price_per_gpu_hour_usd\n{}\n",
        rows.join("\n")
    );
    Ok(controller.apply_price_refresh(0, Ok(text))?)
}

fn spec(gpus: u32, constraints: JobConstraints, retry: Option<RetryPolicy>) -> JobSpec {
    JobSpec {
        tasks: 1,
        gpus_per_task: gpus,
        constraints: Some(constraints),
        retry,
        workload: Some(WorkloadSpec {
            argv: vec!["train".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn at(clock: &ManualClock) -> Timestamp {
    Timestamp::from(gpufleet_core::Clock::now(clock))
}

fn status(
    node: &str,
    job: &gpufleet_proto::v1::Job,
    state: WorkloadState,
    when: Timestamp,
) -> (String, WorkloadStatus) {
    let task = &job.tasks[0];
    let mut status = WorkloadStatus {
        allocation_id: task.allocation_id.clone(),
        job_id: job.id.clone(),
        state: state as i32,
        gpu_uuids: task.gpu_uuids.clone(),
        ..Default::default()
    };
    if state == WorkloadState::Running {
        status.started_at = Some(when);
    } else {
        status.finished_at = Some(when);
        status.exit_code = Some(0);
    }
    (node.to_string(), status)
}

#[test]
fn a_price_change_mid_job_is_billed_second_by_second() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (controller, clock) = controller(dir.path())?;
    assert_eq!(
        publish(&controller, &["aws,us-east-1,H100-SXM-80GB,on-demand,3.00"])?,
        1
    );
    // The node's own config says $2; the source's $3 wins.
    let _session = controller.connect_agent(common::hello(
        "n1",
        common::gpus("n1", H100, 2, 80 << 30),
        Vec::new(),
    ))?;
    let job = controller.submit_job(spec(2, JobConstraints::default(), None))?;
    assert_eq!(controller.schedule_pass()?, 1);
    let job = controller.get_job(&job.id)?;
    assert_eq!(job.tasks[0].price_per_gpu_hour_micro_usd, 3_000_000);

    clock.advance(Duration::from_secs(5));
    let (node, s) = status("n1", &job, WorkloadState::Running, at(&clock));
    controller.record_workload_status(&node, s)?;
    clock.advance(Duration::from_secs(1000));
    assert_eq!(
        publish(&controller, &["aws,us-east-1,H100-SXM-80GB,on-demand,4.50"])?,
        1
    );
    clock.advance(Duration::from_millis(1_234_567));
    let (node, s) = status("n1", &job, WorkloadState::Succeeded, at(&clock));
    controller.record_workload_status(&node, s)?;
    controller.wait_settled()?;

    let (records, _) = controller.list_usage(
        &RecordFilter {
            job_id: job.id.clone(),
            until_ms: u64::MAX,
            ..Default::default()
        },
        10,
        0,
    )?;
    assert_eq!(records.len(), 1, "one allocation, one record");
    let record = &records[0];
    // By hand: 2 GPUs × (1000 s × $3.00/h + 1234.567 s × $4.50/h)
    //        = 2 × ($0.833333… + $1.543208750) = $4.753084 (to the micro-dollar).
    assert_eq!(record.cost_micro_usd, 4_753_084);
    assert_eq!(record.price_per_gpu_hour_micro_usd, 3_000_000);
    assert_eq!(record.price_changes.len(), 1);
    assert_eq!(
        record.price_changes[0].price_per_gpu_hour_micro_usd,
        4_500_000
    );
    assert_eq!(
        record.price_changes[0].at.map(|t| t.seconds as u64),
        Some(START_UNIX + 1005)
    );
    // The rollups (what reports sum) agree with the record exactly.
    let report = controller.usage_report(
        &gpufleet_controller::usage::ReportQuery {
            group_by: Vec::new(),
            since_secs: START_UNIX,
            until_secs: START_UNIX + 3 * 3600,
            series_secs: None,
            limit: 0,
            tenant: None,
            by_used: false,
        },
        false,
    );
    assert_eq!(report.total.map(|t| t.cost_micro_usd), Some(4_753_084));

    // The history: the price appeared, then moved.
    let prices = controller.market_prices(&Default::default());
    assert_eq!(prices.current.len(), 1);
    assert_eq!(prices.current[0].price_per_gpu_hour_micro_usd, 4_500_000);
    let moves: Vec<(Option<u64>, Option<u64>)> = prices
        .history
        .iter()
        .map(|c| {
            (
                c.old_price_per_gpu_hour_micro_usd,
                c.new_price_per_gpu_hour_micro_usd,
            )
        })
        .collect();
    assert_eq!(
        moves,
        [(None, Some(3_000_000)), (Some(3_000_000), Some(4_500_000))]
    );
    Ok(())
}

#[test]
fn a_price_source_that_fails_keeps_its_prices_and_says_why() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (controller, _clock) = controller(dir.path())?;
    publish(&controller, &["aws,us-east-1,H100-SXM-80GB,on-demand,3.00"])?;
    assert_eq!(
        controller.apply_price_refresh(0, Err("connection refused".into()))?,
        0
    );
    assert_eq!(
        controller.apply_price_refresh(0, Ok("provider,region\naws,x\n".into()))?,
        0,
        "a malformed document changes nothing"
    );
    let prices = controller.market_prices(&Default::default());
    assert_eq!(prices.current[0].price_per_gpu_hour_micro_usd, 3_000_000);
    assert!(
        prices.sources[0].contains("refresh failed (line 1: the header has no \"model\" column"),
        "{:?}",
        prices.sources
    );
    Ok(())
}

#[test]
fn elasticity_over_time_is_a_number_once_prices_have_moved() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (controller, clock) = controller(dir.path())?;
    let gpus = common::gpus("n1", H100, 32, 80 << 30);
    let mut gpus = gpus;
    for g in &mut gpus {
        g.generation = GpuGeneration::Hopper as i32;
    }
    let _session = controller.connect_agent(common::hello("n1", gpus, Vec::new()))?;
    // Four hours; each dearer, each with fewer starts: demand falls as price rises.
    for (hour, (usd, starts)) in [("2.00", 8), ("2.50", 6), ("3.00", 4), ("4.00", 2)]
        .into_iter()
        .enumerate()
    {
        publish(
            &controller,
            &[&format!("aws,us-east-1,H100-SXM-80GB,on-demand,{usd}")],
        )?;
        let mut placed = Vec::new();
        for _ in 0..starts {
            placed.push(controller.submit_job(spec(1, JobConstraints::default(), None))?);
        }
        assert_eq!(controller.schedule_pass()?, starts);
        let minute = START_UNIX / 60 + hour as u64 * 60 + 1;
        clock.advance(Duration::from_secs(60));
        controller.record_market_at(minute)?;
        for j in placed {
            controller.cancel_job(&j.id, "next hour")?;
        }
        clock.advance(Duration::from_secs(3540));
        controller.accept_seq("n1", 0);
        controller.check_leases()?;
    }
    let e =
        controller.market_elasticity("us-east-1", GpuGeneration::Hopper as i32, START_UNIX, 3600);
    let slope = e.elasticity_over_time.expect("a numeric estimate");
    assert!(slope < -1.0, "demand fell faster than price rose: {slope}");
    assert_eq!(e.over_time_points, 4);
    assert_eq!(e.observations, 4);
    assert!(
        e.elasticity_over_time_std_error.is_some() && e.elasticity_over_time_r_squared.is_some()
    );
    Ok(())
}

#[test]
fn a_spot_interruption_requeues_at_once_and_feeds_the_rate() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (controller, clock) = controller(dir.path())?;
    let mut spot = common::hello("spot", common::gpus("spot", H100, 1, 80 << 30), Vec::new());
    if let Some(identity) = spot.identity.as_mut() {
        identity.spot = true;
        identity.price_per_gpu_hour_micro_usd = 1_000_000;
    }
    let _spot = controller.connect_agent(spot)?;
    let _od = controller.connect_agent(common::hello(
        "od",
        common::gpus("od", H100, 1, 80 << 30),
        Vec::new(),
    ))?;
    // An hour of spot capacity observed before the interruption.
    for minute in 0..60 {
        controller.record_market_at(START_UNIX / 60 + minute)?;
    }
    let spot_ok = JobConstraints {
        spot: SpotPolicy::Allowed as i32,
        ..Default::default()
    };
    let retry = RetryPolicy {
        max_retries_on_node_loss: 1,
        ..Default::default()
    };
    let job = controller.submit_job(spec(1, spot_ok.clone(), Some(retry)))?;
    assert_eq!(controller.schedule_pass()?, 1);
    let placed = controller.get_job(&job.id)?;
    assert_eq!(placed.tasks[0].node_id, "spot", "the cheaper, spot node");
    let (node, s) = status("spot", &placed, WorkloadState::Running, at(&clock));
    controller.record_workload_status(&node, s)?;
    clock.advance(Duration::from_secs(600));

    controller.record_interruption(
        "spot",
        InterruptionNotice {
            source: "aws".into(),
            action: "terminate".into(),
            deadline: Some(Timestamp::from(
                gpufleet_core::Clock::now(clock.as_ref()) + Duration::from_secs(120),
            )),
            ..Default::default()
        },
    )?;
    let node = controller.get_node("spot")?;
    assert!(
        node.cordoned
            && node
                .cordon_reason
                .starts_with("spot interruption: aws terminate")
    );
    let requeued = controller.get_job(&job.id)?;
    assert_eq!(requeued.state(), JobState::Pending, "{}", requeued.message);
    assert_eq!(requeued.node_loss_retries, 1);
    // Placed again on the next pass, not when a lease runs out.
    assert_eq!(controller.schedule_pass()?, 1);
    assert_eq!(controller.get_job(&job.id)?.tasks[0].node_id, "od");
    controller.wait_settled()?;

    // Billed once, up to the notice, as interrupted.
    let (records, _) = controller.list_usage(
        &RecordFilter {
            job_id: job.id.clone(),
            until_ms: u64::MAX,
            ..Default::default()
        },
        10,
        0,
    )?;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].ended_as(), WorkloadState::Interrupted);
    assert_eq!(records[0].gpu_milliseconds, 600_000);
    // A late status for the interrupted allocation changes nothing.
    let (node, s) = status("spot", &placed, WorkloadState::Stopped, at(&clock));
    controller.record_workload_status(&node, s)?;
    controller.wait_settled()?;
    assert_eq!(
        controller
            .list_usage(
                &RecordFilter {
                    job_id: job.id.clone(),
                    until_ms: u64::MAX,
                    ..Default::default()
                },
                10,
                0
            )?
            .0
            .len(),
        1
    );

    let market = controller.market_interruptions(START_UNIX, 10);
    assert_eq!(market.interruptions.len(), 1);
    assert_eq!(
        market.interruptions[0].allocation_ids,
        [placed.tasks[0].allocation_id.clone()]
    );
    let rate = &market.rates[0];
    assert_eq!((rate.provider.as_str(), rate.interruptions), ("aws", 1));
    assert!((rate.spot_node_hours - 1.0).abs() < 1e-9, "{rate:?}");
    assert_eq!(rate.interruptions_per_node_hour, Some(1.0));

    // A job that allows at most 0.5 interruptions per node-hour and
    // requires spot has nowhere to go, and explain says why.
    controller.uncordon_node("spot")?;
    let picky = controller.submit_job(spec(
        1,
        JobConstraints {
            spot: SpotPolicy::Required as i32,
            max_interruptions_per_hour: Some(0.5),
            ..Default::default()
        },
        None,
    ))?;
    assert_eq!(controller.schedule_pass()?, 0);
    let explained = controller.explain_job(&picky.id)?;
    let text = format!("{explained:?}");
    assert!(text.contains("interruption_rate"), "{text}");
    assert!(text.contains("on_demand"), "{text}");
    Ok(())
}
