//! `gpufleet-bench load`: one controller (the real binary, as a child
//! process, so that its memory is its own) under a fleet's steady load:
//! N simulated agents, each on its own connection, stream a telemetry batch
//! every second and run the allocations they are given (Running at once,
//! Succeeded after `--job-runtime`), while clients submit jobs at a steady
//! rate over the Jobs API. Reports errors, submit latency and the
//! controller's RSS over time, with a verdict on whether it stays flat
//! after warm-up. Loopback only; bounded in agents, rate and time.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use gpufleet_proto::v1::{JobSpec, JobState, ListJobsRequest, SubmitJobRequest, WorkloadSpec};
use tokio::sync::{Semaphore, watch};
use tokio::time::MissedTickBehavior;

use crate::sim_agent::{self};
use crate::{clients, report};

mod agent;
mod controller;
mod verdict;

use agent::SimAgent;
pub(crate) use controller::ControllerProcess;
use verdict::print_report;

/// Most submissions in flight at once; past it the submitter waits, and the
/// achieved rate shows the shortfall.
const MAX_IN_FLIGHT_SUBMITS: usize = 1000;
/// Connections shared by the submitting clients.
const SUBMIT_CONNECTIONS: usize = 4;
/// A submission unanswered this long counts as an error (and ends the wait).
const SUBMIT_DEADLINE: Duration = Duration::from_secs(30);
/// RSS growth from a third of the run to its end still called flat.
const FLAT_GROWTH: f64 = 0.05;
/// RSS is compared by its floor, the lowest sample in a window this long:
/// freed memory stays resident until the controller's next trim (every
/// 10 s), and bursts of work (a minute's telemetry written at once, before
/// it was paced) raise RSS for a while. One sample compared with another
/// tells whether either landed on such a peak; two floors tell what stayed.
const FLOOR_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Simulated agents, one gRPC connection each.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// GPUs per agent.
    #[arg(long, default_value_t = 8)]
    gpus: usize,
    /// Length of the loaded run (after all agents are connected).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Job submissions per second (1 GPU each).
    #[arg(long, default_value_t = 100.0)]
    submit_rate: f64,
    /// How long a simulated job runs before its agent reports it Succeeded.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    job_runtime: Duration,
    /// Interval between telemetry batches of each agent.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    telemetry_interval: Duration,
    /// How often the controller's RSS is sampled.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    rss_every: Duration,
    /// gpufleet-controller binary [default: next to this one].
    #[arg(long)]
    controller: Option<PathBuf>,
    /// Passed to the controller: how long finished jobs are kept, e.g. 30s
    /// [default: the controller's, 7d].
    #[arg(long)]
    finished_job_retention: Option<String>,
    /// After the run on sled, the same run with the controller's state in
    /// a local 3-member etcd (tests/etcd/setup.sh), and both side by side.
    #[arg(long)]
    etcd: bool,
}

/// Errors seen anywhere in the run, with the first few messages.
#[derive(Default)]
struct Errors {
    count: AtomicU64,
    first: Mutex<Vec<String>>,
}

impl Errors {
    fn record(&self, what: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first.lock()
            && first.len() < 5
        {
            first.push(what);
        }
    }
}

/// Counters the simulated agents keep.
#[derive(Default)]
struct AgentCounters {
    batches: AtomicU64,
    started: AtomicU64,
    succeeded: AtomicU64,
}

/// One RSS sample: seconds into the run, bytes, jobs submitted by then.
struct RssPoint {
    at: Duration,
    rss: u64,
    /// The controller's live heap (`gpufleet_controller_heap_bytes`), when
    /// its /metrics answered.
    heap: Option<u64>,
    submitted: u64,
}

pub fn run(args: LoadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.agents > 0 && args.gpus > 0,
        "--agents and --gpus must be > 0"
    );
    anyhow::ensure!(
        args.submit_rate > 0.0 && args.submit_rate <= 10_000.0,
        "--submit-rate must be in (0, 10000] jobs per second"
    );
    anyhow::ensure!(
        !args.duration.is_zero() && args.duration <= Duration::from_secs(3600),
        "--duration must be between 1s and 1h"
    );
    anyhow::ensure!(
        !args.telemetry_interval.is_zero() && !args.rss_every.is_zero(),
        "--telemetry-interval and --rss-every must be > 0"
    );
    let binary = match &args.controller {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .with_file_name("gpufleet-controller"),
    };
    let retention_args: Vec<String> = match &args.finished_job_retention {
        Some(retention) => vec!["--finished-job-retention".into(), retention.clone()],
        None => Vec::new(),
    };
    let (sled, sled_log_errors) = run_one(&args, &binary, &retention_args)?;
    print_report(&args, &sled, sled_log_errors);
    let mut failures = vec![(sled.errors, sled_log_errors)];
    if args.etcd {
        let cluster = gpufleet_controller::store::etcd::test_cluster::EtcdCluster::start(3)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut etcd_args = retention_args.clone();
        etcd_args.extend([
            "--store".to_string(),
            "etcd".to_string(),
            "--etcd-endpoints".to_string(),
            cluster.endpoints().join(","),
        ]);
        println!();
        println!("--- the same load with the controller's state in a 3-member etcd");
        let (etcd, etcd_log_errors) = run_one(&args, &binary, &etcd_args)?;
        drop(cluster);
        print_report(&args, &etcd, etcd_log_errors);
        compare(&sled, &etcd);
        failures.push((etcd.errors, etcd_log_errors));
    }
    for (errors, log_errors) in failures {
        if errors > 0 || log_errors > 0 {
            bail!("{errors} client/agent errors, {log_errors} ERROR lines in the controller log");
        }
    }
    Ok(())
}

/// One loaded run against a controller started with `extra_args`.
fn run_one(
    args: &LoadArgs,
    binary: &std::path::Path,
    extra_args: &[String],
) -> anyhow::Result<(Outcome, usize)> {
    let dir = tempfile::tempdir()?;
    let mut controller = ControllerProcess::start(binary, dir.path(), extra_args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = runtime.block_on(async {
        clients::use_admin_token(&dir.path().join("controller")).await?;
        drive(args, &mut controller).await
    })?;
    drop(runtime);
    let log_errors = std::fs::read_to_string(&controller.log)
        .map(|log| log.lines().filter(|l| l.contains("ERROR")).count())
        .unwrap_or(0);
    drop(controller);
    Ok((outcome, log_errors))
}

/// sled and etcd side by side, from the same invocation.
fn compare(sled: &Outcome, etcd: &Outcome) {
    let p = |o: &Outcome, q: f64| report::percentile(&o.submit_latency, q) as f64 / 1000.0;
    let rss = |o: &Outcome| o.rss.last().map_or(0, |p| p.rss) as f64 / (1 << 20) as f64;
    let store = |o: &Outcome| {
        o.store_per_s
            .map_or("-".to_string(), |[commits, writes, bytes, reads]| {
                format!(
                    "{commits:.1} / {writes:.0} / {:.1} / {reads:.1}",
                    bytes / 1024.0
                )
            })
    };
    let store_json = |o: &Outcome| {
        o.store_per_s.map(|[commits, writes, bytes, reads]| {
            serde_json::json!({"commits": commits, "key_writes": writes, "bytes_written": bytes, "reads": reads})
        })
    };
    println!();
    report::table(
        &[
            "store (same run)",
            "submits/s",
            "submit p50 / p99 (ms)",
            "errors",
            "final RSS (MiB)",
            "store commits / key writes / KiB written / reads per s",
        ],
        &[
            vec![
                "sled".into(),
                format!("{:.1}", sled.achieved_rate),
                format!("{:.2} / {:.2}", p(sled, 50.0), p(sled, 99.0)),
                sled.errors.to_string(),
                format!("{:.0}", rss(sled)),
                store(sled),
            ],
            vec![
                "etcd (3 members)".into(),
                format!("{:.1}", etcd.achieved_rate),
                format!("{:.2} / {:.2}", p(etcd, 50.0), p(etcd, 99.0)),
                etcd.errors.to_string(),
                format!("{:.0}", rss(etcd)),
                store(etcd),
            ],
        ],
    );
    let summary = serde_json::json!({
        "bench": "load-stores",
        "sled": {"submits_per_s": sled.achieved_rate, "submit_p50_ms": p(sled, 50.0), "submit_p99_ms": p(sled, 99.0), "errors": sled.errors, "store_per_s": store_json(sled)},
        "etcd": {"submits_per_s": etcd.achieved_rate, "submit_p50_ms": p(etcd, 50.0), "submit_p99_ms": p(etcd, 99.0), "errors": etcd.errors, "store_per_s": store_json(etcd)},
    });
    println!("{summary}");
}

struct Outcome {
    connect_time: Duration,
    submitted: u64,
    achieved_rate: f64,
    submit_latency: Vec<u64>,
    errors: u64,
    first_errors: Vec<String>,
    batches: u64,
    started: u64,
    succeeded: u64,
    /// Jobs by final state, from the controller, after draining.
    unfinished: u64,
    failed: u64,
    rss: Vec<RssPoint>,
    /// What the controller asked of its store per second of the run:
    /// commits, key writes, bytes written, reads (None: not scraped).
    store_per_s: Option<[f64; 4]>,
    /// Submit latency p50 and p99 (µs) over the interval ending at each RSS point.
    window_latency: Vec<Option<(u64, u64)>>,
}

/// The controller's live heap from its /metrics; None when it does not
/// answer within a few seconds or does not count its heap (an older build).
async fn scrape_heap(port: u16) -> Option<u64> {
    scrape(port, &["gpufleet_controller_heap_bytes"])
        .await
        .and_then(|values| values.first().copied().flatten())
}

/// What the controller asked of its store so far, from its /metrics:
/// commits, key writes, bytes written, reads.
async fn scrape_store(port: u16) -> Option<[u64; 4]> {
    let values = scrape(
        port,
        &[
            "gpufleet_controller_store_commits_total",
            "gpufleet_controller_store_written_keys_total",
            "gpufleet_controller_store_written_bytes_total",
            "gpufleet_controller_store_reads_total",
        ],
    )
    .await?;
    Some([values[0]?, values[1]?, values[2]?, values[3]?])
}

/// The values of unlabelled samples `names` from the controller's
/// /metrics, in that order; None when it does not answer within a few
/// seconds.
async fn scrape(port: u16, names: &[&str]) -> Option<Vec<Option<u64>>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let scrape = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
        let value = |name: &str| {
            body.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|value| value.trim().parse::<f64>().ok())
                .map(|value| value as u64)
        };
        Some(names.iter().map(|name| value(name)).collect())
    };
    tokio::time::timeout(Duration::from_secs(5), scrape)
        .await
        .ok()
        .flatten()
}

async fn drive(args: &LoadArgs, controller: &mut ControllerProcess) -> anyhow::Result<Outcome> {
    controller.wait_serving(Duration::from_secs(30)).await?;
    let endpoint = controller.endpoint.clone();
    let errors = Arc::new(Errors::default());
    let counters = Arc::new(AgentCounters::default());
    let (stop_tx, stop) = watch::channel(false);

    let connecting = Instant::now();
    // A thousand simultaneous connects overflow the listen backlog; a real
    // fleet's agents do not all dial in the same millisecond either.
    let dialing = Arc::new(Semaphore::new(64));
    let mut agents = Vec::with_capacity(args.agents);
    for node in 0..args.agents {
        let agent = SimAgent {
            node,
            gpus: args.gpus,
            job_runtime: args.job_runtime,
            telemetry_interval: args.telemetry_interval,
            counters: counters.clone(),
            errors: errors.clone(),
        };
        let (endpoint, stop, dialing) = (endpoint.clone(), stop.clone(), dialing.clone());
        agents.push(tokio::spawn(async move {
            let permit = dialing.acquire_owned().await;
            let connection =
                sim_agent::connect(endpoint, Some(sim_agent::hello_message(node, agent.gpus)))
                    .await;
            drop(permit);
            match connection {
                Ok(connection) => agent.run(connection, stop).await,
                Err(e) => agent
                    .errors
                    .record(format!("agent {node} cannot connect: {e:#}")),
            }
        }));
    }
    clients::wait_nodes_ready(&endpoint, args.agents, Duration::from_secs(120)).await?;
    let connect_time = connecting.elapsed();

    // The run: submissions at a steady rate, RSS sampled on its own clock.
    let started = Instant::now();
    let submitted = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<(Duration, u64)>::new()));
    let (store_before, store_after);
    let rss_points = {
        let submitted = submitted.clone();
        let every = args.rss_every;
        let duration = args.duration;
        let pid_rss = |c: &ControllerProcess| c.rss_bytes();
        let metrics_port = controller.metrics_port;
        store_before = scrape_store(metrics_port).await;
        let mut points = vec![RssPoint {
            at: Duration::ZERO,
            rss: pid_rss(controller)?,
            heap: scrape_heap(metrics_port).await,
            submitted: 0,
        }];
        let submitter = submit_steadily(
            &endpoint,
            args.submit_rate,
            duration,
            submitted.clone(),
            latencies.clone(),
            errors.clone(),
        );
        tokio::pin!(submitter);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                done = &mut submitter => { done?; break; }
                _ = tick.tick() => {
                    let at = started.elapsed();
                    let rss = pid_rss(controller)?;
                    let submitted = submitted.load(Ordering::Relaxed);
                    let heap = scrape_heap(metrics_port).await;
                    points.push(RssPoint { at, rss, heap, submitted });
                }
            }
        }
        let at = started.elapsed();
        let rss = pid_rss(controller)?;
        let heap = scrape_heap(metrics_port).await;
        store_after = scrape_store(metrics_port).await;
        points.push(RssPoint {
            at,
            rss,
            heap,
            submitted: submitted.load(Ordering::Relaxed),
        });
        points
    };
    let run_time = started.elapsed();
    let submitted = submitted.load(Ordering::Relaxed);

    // Drain: every submitted job should end; agents keep streaming meanwhile.
    let mut jobs = clients::jobs_client(&endpoint).await?;
    let drain_deadline = Instant::now() + args.job_runtime + Duration::from_secs(60);
    let unfinished = loop {
        let open = count_jobs(
            &mut jobs,
            &[JobState::Pending, JobState::Scheduled, JobState::Running],
        )
        .await?;
        if open == 0 || Instant::now() > drain_deadline {
            break open;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let failed = count_jobs(
        &mut jobs,
        &[
            JobState::Failed,
            JobState::Lost,
            JobState::Cancelled,
            JobState::Requeuing,
        ],
    )
    .await?;
    stop_tx.send_replace(true);
    for agent in agents {
        agent.await.context("a simulated agent panicked")?;
    }
    let timed = latencies
        .lock()
        .map_err(|_| anyhow::anyhow!("latency list poisoned"))?
        .clone();
    let mut submit_latency: Vec<u64> = timed.iter().map(|(_, us)| *us).collect();
    submit_latency.sort_unstable();
    // Submit latency per RSS interval, to see whether it drifts.
    let mut window_p99 = Vec::with_capacity(rss_points.len());
    let mut from = Duration::ZERO;
    for point in &rss_points {
        let mut window: Vec<u64> = timed
            .iter()
            .filter(|(at, _)| *at >= from && *at < point.at)
            .map(|(_, us)| *us)
            .collect();
        window.sort_unstable();
        window_p99.push((!window.is_empty()).then(|| {
            (
                report::percentile(&window, 50.0),
                report::percentile(&window, 99.0),
            )
        }));
        from = point.at;
    }
    let first_errors = errors.first.lock().map(|f| f.clone()).unwrap_or_default();
    Ok(Outcome {
        connect_time,
        submitted,
        achieved_rate: submitted as f64 / run_time.as_secs_f64(),
        submit_latency,
        errors: errors.count.load(Ordering::Relaxed),
        first_errors,
        batches: counters.batches.load(Ordering::Relaxed),
        started: counters.started.load(Ordering::Relaxed),
        succeeded: counters.succeeded.load(Ordering::Relaxed),
        unfinished,
        failed,
        rss: rss_points,
        store_per_s: store_before.zip(store_after).map(|(before, after)| {
            std::array::from_fn(|i| {
                after[i].saturating_sub(before[i]) as f64 / run_time.as_secs_f64()
            })
        }),
        window_latency: window_p99,
    })
}

/// Submits 1-GPU jobs at `rate` per second for `duration` (open loop: a
/// slow answer does not delay the next submission), recording each
/// call's latency in microseconds.
async fn submit_steadily(
    endpoint: &str,
    rate: f64,
    duration: Duration,
    submitted: Arc<AtomicU64>,
    latencies: Arc<Mutex<Vec<(Duration, u64)>>>,
    errors: Arc<Errors>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut clients = Vec::with_capacity(SUBMIT_CONNECTIONS);
    for _ in 0..SUBMIT_CONNECTIONS {
        clients.push(clients::jobs_client(endpoint).await?);
    }
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_SUBMITS));
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut tick = tokio::time::interval(period);
    // Catch up after a stall, so the offered rate is the configured one.
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let end = Instant::now() + duration;
    let mut calls = Vec::new();
    let mut n = 0usize;
    while Instant::now() < end {
        tick.tick().await;
        let permit = in_flight.clone().acquire_owned().await?;
        let mut client = clients[n % clients.len()].clone();
        n += 1;
        let (submitted, latencies, errors) = (submitted.clone(), latencies.clone(), errors.clone());
        calls.push(tokio::spawn(async move {
            let _permit = permit;
            let sent = Instant::now();
            let answer = tokio::time::timeout(
                SUBMIT_DEADLINE,
                client.submit_job(SubmitJobRequest {
                    spec: Some(load_job()),
                }),
            )
            .await;
            let took = sent.elapsed().as_micros() as u64;
            match answer {
                Err(_) => errors.record(format!("SubmitJob: no answer within {SUBMIT_DEADLINE:?}")),
                Ok(Err(status)) => errors.record(format!("SubmitJob: {status}")),
                Ok(Ok(_)) => {
                    submitted.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut l) = latencies.lock() {
                        l.push((sent - started, took));
                    }
                }
            }
        }));
        calls.retain(|c| !c.is_finished());
    }
    for call in calls {
        call.await.context("a submission task panicked")?;
    }
    Ok(())
}

fn load_job() -> JobSpec {
    JobSpec {
        gpus_per_task: 1,
        workload: Some(WorkloadSpec {
            argv: vec!["true".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Jobs in any of `states`, counted page by page.
async fn count_jobs(
    jobs: &mut gpufleet_proto::v1::jobs_client::JobsClient<clients::Authed>,
    states: &[JobState],
) -> anyhow::Result<u64> {
    let mut count = 0u64;
    let mut page_token = String::new();
    loop {
        let page = jobs
            .list_jobs(ListJobsRequest {
                states: states.iter().map(|s| *s as i32).collect(),
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .context("ListJobs failed")?
            .into_inner();
        count += page.jobs.len() as u64;
        if page.next_page_token.is_empty() {
            return Ok(count);
        }
        page_token = page.next_page_token;
    }
}
