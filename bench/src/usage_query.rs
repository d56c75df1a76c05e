//! Usage queries over one year of hourly rollups, and what recording market
//! signals costs next to a scheduling pass.
//!
//! Data: 100 regions × 6 generations × 50 tenants = 30,000 combinations;
//! every hour of one year, 2 % of them (600) record one hour of GPU use, so
//! the store holds 5.3 million hourly contributions (kept at minute, hour and
//! day granularity, like the controller does). Queries: the controller's own
//! report path (`Rollups::query`), each timed as the median of 5 runs.

use std::time::Instant;

use gpufleet_controller::usage::rollup::{Contribution, DAY, HOUR, Rollups};
use gpufleet_controller::usage::{Dims, UsageDimension};
use gpufleet_scheduler::{Fleet, SchedulerConfig, TenantState, market, schedule};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::report;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Days of hourly data.
    #[arg(long, default_value_t = 365)]
    days: u64,
    /// Share of (region, generation, tenant) combinations active each hour.
    #[arg(long, default_value_t = 0.02)]
    density: f64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

const GENERATIONS: [i32; 6] = [2, 3, 4, 5, 6, 7];

fn median_ms(mut f: impl FnMut() -> usize) -> (f64, usize) {
    let mut times = Vec::new();
    let mut rows = 0;
    for _ in 0..5 {
        let started = Instant::now();
        rows = f();
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    (times[2], rows)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let now = 1_800_000_000u64 / HOUR * HOUR;
    let start = now - args.days * DAY;
    let combos: Vec<Dims> = (0..100)
        .flat_map(|r| {
            GENERATIONS.iter().flat_map(move |&g| {
                (0..50).map(move |t| Dims {
                    provider: format!("p{}", r % 7),
                    region: format!("region-{r:03}"),
                    generation: g,
                    model: format!("model-{g}"),
                    tenant: format!("tenant-{t:02}"),
                    workload_class: ["training", "inference", "batch"][(t % 3) as usize]
                        .to_string(),
                    job_name: String::new(),
                })
            })
        })
        .collect();
    let per_hour = (combos.len() as f64 * args.density) as usize;
    let mut rollups = Rollups::new([2 * DAY, 90 * DAY, 3650 * DAY]);
    let rss_before = report::rss_bytes();
    let load_started = Instant::now();
    let mut contributions = 0usize;
    for hour in 0..args.days * 24 {
        let from = start + hour * HOUR;
        for _ in 0..per_hour {
            let dims = &combos[rng.random_range(0..combos.len())];
            rollups.add(
                &Contribution {
                    dims: dims.clone(),
                    start_ms: from * 1000,
                    end_ms: (from + HOUR) * 1000,
                    gpus: rng.random_range(1..=8),
                    prices: vec![(from * 1000, rng.random_range(500_000..6_000_000))],
                    mean_util: Some(rng.random_range(20.0..100.0)),
                    energy_joules: None,
                    ..Default::default()
                },
                now,
            );
            contributions += 1;
        }
    }
    let load_secs = load_started.elapsed().as_secs_f64();
    let rss = report::rss_bytes().saturating_sub(rss_before);

    let year = now - args.days * DAY;
    let queries: Vec<(&str, Vec<UsageDimension>, u64, Option<u64>)> = vec![
        (
            "by generation, whole range",
            vec![UsageDimension::Generation],
            year,
            None,
        ),
        (
            "by tenant, whole range",
            vec![UsageDimension::Tenant],
            year,
            None,
        ),
        (
            "by region × generation, whole range",
            vec![UsageDimension::Region, UsageDimension::Generation],
            year,
            None,
        ),
        (
            "by generation, 30 days, daily series",
            vec![UsageDimension::Generation],
            now - 30 * DAY,
            Some(DAY),
        ),
        (
            "by workload class, 7 days",
            vec![UsageDimension::WorkloadClass],
            now - 7 * DAY,
            None,
        ),
        (
            "by tenant, last 24 h (minute rollups)",
            vec![UsageDimension::Tenant],
            now - DAY,
            None,
        ),
    ];
    let mut rows = Vec::new();
    let mut worst = 0.0f64;
    for (name, group_by, since, series) in &queries {
        let (ms, n) = median_ms(|| {
            rollups
                .query(group_by, *since, now, *series, None, now)
                .0
                .len()
        });
        let granularity = match rollups.granularity_for(*since, now) {
            60 => "minute",
            3600 => "hour",
            _ => "day",
        };
        worst = worst.max(ms);
        rows.push(vec![
            name.to_string(),
            granularity.to_string(),
            n.to_string(),
            format!("{ms:.2}"),
        ]);
    }

    // Market signals against a scheduling pass, on the scheduler benchmark's inputs.
    let (pass_ms, signal_ms) = signal_overhead(args.seed);

    println!(
        "usage-query: {} days × {per_hour} active combinations per hour of {} = {contributions} hourly contributions, loaded in {load_secs:.1} s, {:.0} MiB",
        args.days,
        combos.len(),
        rss as f64 / (1 << 20) as f64
    );
    report::table(&["query", "rollup", "rows", "median (ms)"], &rows);
    println!();
    report::table(
        &["figure", "value", "goal"],
        &[
            vec![
                "slowest query".into(),
                format!("{worst:.2} ms"),
                "<= 50 ms".into(),
            ],
            vec![
                "scheduling pass (10k nodes, 100k jobs)".into(),
                format!("{pass_ms:.1} ms"),
                "-".into(),
            ],
            vec![
                "recording market signals (once a minute)".into(),
                format!("{signal_ms:.1} ms"),
                "-".into(),
            ],
            vec![
                "signals ÷ one pass".into(),
                format!("{:.1} %", signal_ms / pass_ms * 100.0),
                "-".into(),
            ],
            vec![
                "signals ÷ a minute of passes (1/s)".into(),
                format!("{:.2} %", signal_ms / (pass_ms * 60.0) * 100.0),
                "<= 5 %".into(),
            ],
        ],
    );
    let summary = serde_json::json!({
        "bench": "usage-query",
        "days": args.days,
        "combinations": combos.len(),
        "contributions": contributions,
        "load_seconds": load_secs,
        "rss_mib": rss as f64 / (1 << 20) as f64,
        "slowest_query_ms": worst,
        "queries_ms": rows.iter().map(|r| (r[0].clone(), r[3].parse::<f64>().unwrap_or(0.0))).collect::<std::collections::BTreeMap<_, _>>(),
        "pass_ms": pass_ms,
        "signals_ms": signal_ms,
        "signals_over_pass": signal_ms / pass_ms,
        "signals_over_minute_of_passes": signal_ms / (pass_ms * 60.0),
    });
    println!("{summary}");
    Ok(())
}

fn signal_overhead(seed: u64) -> (f64, f64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let nodes = crate::scheduler::fleet_inputs(10_000, &mut rng);
    let jobs = crate::scheduler::job_inputs(100_000, &mut rng);
    let mut pass = Vec::new();
    let mut signals = Vec::new();
    for _ in 0..3 {
        let mut fleet = Fleet::build(&nodes, &[]);
        let started = Instant::now();
        let result = schedule(
            &mut fleet,
            &jobs,
            &SchedulerConfig::default(),
            &TenantState::default(),
            1_000_000,
        );
        pass.push(started.elapsed().as_secs_f64() * 1000.0);
        let still: Vec<_> = jobs
            .iter()
            .zip(&result.outcomes)
            .filter(|(_, o)| !matches!(o, gpufleet_scheduler::Outcome::Placed(_)))
            .map(|(j, _)| j.clone())
            .collect();
        let started = Instant::now();
        let snapshot = market::snapshot(&fleet, &still);
        let recorded = gpufleet_controller::usage::market::signals_for_minute(
            1_000_000,
            &snapshot,
            &Default::default(),
        );
        signals.push(started.elapsed().as_secs_f64() * 1000.0);
        std::hint::black_box(recorded);
    }
    pass.sort_by(f64::total_cmp);
    signals.sort_by(f64::total_cmp);
    (pass[1], signals[1])
}
