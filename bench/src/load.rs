//! `gpufleet-bench load`: one controller (the real binary, as a child
//! process, so that its memory is its own) under a fleet's steady load:
//! N simulated agents, each on its own connection, stream a telemetry batch
//! every second and run the allocations they are given (Running at once,
//! Succeeded after `--job-runtime`), while clients submit jobs at a steady
//! rate over the Jobs API. Reports errors, submit latency and the
//! controller's RSS over time, with a verdict on whether it stays flat
//! after warm-up. Loopback only; bounded in agents, rate and time.

use std::collections::{HashSet, VecDeque};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::Args;
use gpufleet_proto::v1::{
    AgentMessage, Allocation, JobSpec, JobState, ListJobsRequest, SubmitJobRequest, TelemetryBatch,
    WorkloadSpec, WorkloadState, WorkloadStatus, agent_message, controller_message,
};
use prost_types::Timestamp;
use tokio::sync::{Semaphore, watch};
use tokio::time::MissedTickBehavior;

use crate::sim_agent::{self, Connection};
use crate::{clients, report};

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

/// The controller process; killed when dropped, so no error path leaves it
/// behind. `abuse` starts its controller the same way.
pub(crate) struct ControllerProcess {
    child: Child,
    pub(crate) endpoint: String,
    metrics_port: u16,
    log: PathBuf,
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ControllerProcess {
    pub(crate) fn start(
        binary: &std::path::Path,
        dir: &std::path::Path,
        finished_job_retention: Option<&str>,
    ) -> anyhow::Result<Self> {
        // The binary binds its ports itself: take free ones and release them.
        let free_port = || -> anyhow::Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .context("cannot find a free loopback port")?
                .port())
        };
        let port = free_port()?;
        let metrics_port = free_port()?;
        let log = dir.join("controller.log");
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(binary);
        if let Some(retention) = finished_job_retention {
            command.args(["--finished-job-retention", retention]);
        }
        let child = command
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(dir.join("controller"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--join-token")
            .arg(crate::sim_agent::BENCH_JOIN_TOKEN)
            // Auth stays on; one admin token drives every client here, so
            // the per-token rate limit is off.
            .arg("--rate-limit-per-token")
            .arg("0")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file.try_clone()?))
            .stderr(Stdio::from(log_file))
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (build it: cargo build --release -p gpufleet-controller, or pass --controller)",
                    binary.display()
                )
            })?;
        Ok(Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            metrics_port,
            log,
        })
    }

    /// VmRSS of the controller, bytes.
    pub(crate) fn rss_bytes(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.child.id());
        let status =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .with_context(|| format!("no VmRSS in {path}"))
    }

    /// Waits until the gRPC API answers, failing early if the process died.
    pub(crate) async fn wait_serving(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the controller exited ({status}) before serving; see {}",
                    self.log.display()
                );
            }
            if let Ok(mut fleet) = clients::fleet_client(&self.endpoint).await
                && fleet
                    .list_nodes(gpufleet_proto::v1::ListNodesRequest::default())
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the controller did not serve within {within:?}; see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
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
    let dir = tempfile::tempdir()?;
    let mut controller =
        ControllerProcess::start(&binary, dir.path(), args.finished_job_retention.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = runtime.block_on(async {
        clients::use_admin_token(&dir.path().join("controller")).await?;
        drive(&args, &mut controller).await
    })?;
    drop(runtime);
    let log_errors = std::fs::read_to_string(&controller.log)
        .map(|log| log.lines().filter(|l| l.contains("ERROR")).count())
        .unwrap_or(0);
    drop(controller);
    print_report(&args, &outcome, log_errors);
    if outcome.errors > 0 || log_errors > 0 {
        bail!(
            "{} client/agent errors, {log_errors} ERROR lines in the controller log",
            outcome.errors
        );
    }
    Ok(())
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
    /// Submit latency p50 and p99 (µs) over the interval ending at each RSS point.
    window_latency: Vec<Option<(u64, u64)>>,
}

/// Whether RSS stayed flat from a third of the run (the warm-up) to its
/// end, judged by floors (see [`FLOOR_WINDOW`]).
#[derive(Debug, Clone, PartialEq)]
struct Flatness {
    /// Where the comparison starts: the first sample at or after a third.
    from: Duration,
    window: Duration,
    floor_start: u64,
    floor_end: u64,
    floor_growth: f64,
    floor_share: f64,
    floor_per_job: f64,
    /// The single samples at `from` and at the end, compared.
    sample_growth: f64,
    sample_share: f64,
    /// The highest sample from `from` on.
    peak: u64,
}

impl Flatness {
    fn of(points: &[RssPoint], duration: Duration) -> Self {
        Self::of_value(points, duration, |p| p.rss)
    }

    /// The same test over another figure of the samples (the live heap).
    fn of_value(points: &[RssPoint], duration: Duration, value: fn(&RssPoint) -> u64) -> Self {
        let third = duration / 3;
        let window = FLOOR_WINDOW.min(third);
        let start = points
            .iter()
            .position(|p| p.at >= third)
            .unwrap_or(0)
            .min(points.len().saturating_sub(1));
        let after = points.get(start..).unwrap_or_default();
        let (Some(first), Some(last)) = (after.first(), after.last()) else {
            return Self {
                from: Duration::ZERO,
                window,
                floor_start: 0,
                floor_end: 0,
                floor_growth: 0.0,
                floor_share: 0.0,
                floor_per_job: 0.0,
                sample_growth: 0.0,
                sample_share: 0.0,
                peak: 0,
            };
        };
        // The lowest sample of a window, and the jobs submitted by then.
        let floor = |in_window: &dyn Fn(&RssPoint) -> bool, or: &RssPoint| {
            let lowest = after
                .iter()
                .filter(|p| in_window(p))
                .min_by_key(|p| value(p))
                .unwrap_or(or);
            (value(lowest), lowest.submitted)
        };
        let (floor_start, jobs_start) = floor(&|p| p.at <= first.at + window, first);
        // The end window never reaches back into the start window; a run
        // too short for both compares its last sample.
        let (floor_end, jobs_end) = floor(
            &|p| p.at + window >= last.at && p.at > first.at + window,
            last,
        );
        let floor_growth = floor_end as f64 - floor_start as f64;
        let sample_growth = value(last) as f64 - value(first) as f64;
        Self {
            from: first.at,
            window,
            floor_start,
            floor_end,
            floor_growth,
            floor_share: floor_growth / floor_start.max(1) as f64,
            floor_per_job: floor_growth / jobs_end.saturating_sub(jobs_start).max(1) as f64,
            sample_growth,
            sample_share: sample_growth / value(first).max(1) as f64,
            peak: after.iter().map(value).max().unwrap_or(0),
        }
    }
}

/// The controller's live heap from its /metrics; None when it does not
/// answer within a few seconds or does not count its heap (an older build).
async fn scrape_heap(port: u16) -> Option<u64> {
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
        body.lines()
            .find_map(|line| line.strip_prefix("gpufleet_controller_heap_bytes "))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .map(|bytes| bytes as u64)
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
    let rss_points = {
        let submitted = submitted.clone();
        let every = args.rss_every;
        let duration = args.duration;
        let pid_rss = |c: &ControllerProcess| c.rss_bytes();
        let metrics_port = controller.metrics_port;
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

/// One simulated agent on its own stream: telemetry on a timer, and the
/// allocations of each desired state "run" for `job_runtime`.
struct SimAgent {
    node: usize,
    gpus: usize,
    job_runtime: Duration,
    telemetry_interval: Duration,
    counters: Arc<AgentCounters>,
    errors: Arc<Errors>,
}

impl SimAgent {
    async fn run(self, connection: Connection, mut stop: watch::Receiver<bool>) {
        let Connection {
            uplink,
            mut downlink,
        } = connection;
        let uuids: Vec<String> = (0..self.gpus)
            .map(|g| sim_agent::gpu_uuid(self.node, g))
            .collect();
        // Spread the fleet's batches over the interval, as real agents'
        // start times spread them.
        let offset = self
            .telemetry_interval
            .mul_f64((self.node % 1000) as f64 / 1000.0);
        let mut telemetry = tokio::time::interval_at(
            tokio::time::Instant::now() + offset,
            self.telemetry_interval,
        );
        telemetry.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The hello was seq 1.
        let mut seq = 1u64;
        let mut known: HashSet<String> = HashSet::new();
        // Constant runtime: finishing order is starting order.
        let mut running: VecDeque<(tokio::time::Instant, Allocation)> = VecDeque::new();
        let mut k = 0u64;
        loop {
            let next_finish = running.front().map(|(at, _)| *at);
            let message = tokio::select! {
                _ = stop.changed() => return,
                _ = telemetry.tick() => {
                    k += 1;
                    self.counters.batches.fetch_add(1, Ordering::Relaxed);
                    agent_message::Body::Telemetry(TelemetryBatch {
                        samples: sim_agent::batch(&uuids, SystemTime::now(), k),
                    })
                }
                _ = sleep_until_some(next_finish) => {
                    let Some((_, allocation)) = running.pop_front() else { continue };
                    self.counters.succeeded.fetch_add(1, Ordering::Relaxed);
                    let mut status = status_of(&allocation, WorkloadState::Succeeded);
                    status.exit_code = Some(0);
                    status.finished_at = Some(Timestamp::from(SystemTime::now()));
                    agent_message::Body::WorkloadStatus(status)
                }
                answer = downlink.message() => match answer {
                    Ok(Some(message)) => {
                        let Some(controller_message::Body::DesiredState(desired)) = message.body else {
                            continue;
                        };
                        // Level-triggered: forget what is no longer wanted,
                        // start what is new.
                        let wanted: HashSet<&str> =
                            desired.allocations.iter().map(|a| a.allocation_id.as_str()).collect();
                        known.retain(|id| wanted.contains(id.as_str()));
                        running.retain(|(_, a)| wanted.contains(a.allocation_id.as_str()));
                        let mut statuses = Vec::new();
                        for allocation in desired.allocations {
                            if known.insert(allocation.allocation_id.clone()) {
                                self.counters.started.fetch_add(1, Ordering::Relaxed);
                                let mut status = status_of(&allocation, WorkloadState::Running);
                                status.started_at = Some(Timestamp::from(SystemTime::now()));
                                statuses.push(status);
                                running.push_back((tokio::time::Instant::now() + self.job_runtime, allocation));
                            }
                        }
                        for status in statuses {
                            seq += 1;
                            let message = AgentMessage { seq, body: Some(agent_message::Body::WorkloadStatus(status)) };
                            if uplink.send(message).await.is_err() {
                                self.errors.record(format!("agent {}: the stream closed", self.node));
                                return;
                            }
                        }
                        continue;
                    }
                    Ok(None) => {
                        if !*stop.borrow() {
                            self.errors.record(format!("agent {}: the controller ended the stream", self.node));
                        }
                        return;
                    }
                    Err(status) => {
                        if !*stop.borrow() {
                            self.errors.record(format!("agent {}: stream error: {status}", self.node));
                        }
                        return;
                    }
                },
            };
            seq += 1;
            if uplink
                .send(AgentMessage {
                    seq,
                    body: Some(message),
                })
                .await
                .is_err()
            {
                self.errors
                    .record(format!("agent {}: the stream closed", self.node));
                return;
            }
        }
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn status_of(allocation: &Allocation, state: WorkloadState) -> WorkloadStatus {
    WorkloadStatus {
        allocation_id: allocation.allocation_id.clone(),
        job_id: allocation.job_id.clone(),
        task_index: allocation.task_index,
        state: state as i32,
        gpu_uuids: allocation.gpu_uuids.clone(),
        ..Default::default()
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn print_report(args: &LoadArgs, o: &Outcome, log_errors: usize) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "load: {} agents x {} GPUs, telemetry every {}, {} jobs/s offered for {} (jobs run {}), {cores} CPU cores",
        args.agents,
        args.gpus,
        humantime::format_duration(args.telemetry_interval),
        args.submit_rate,
        humantime::format_duration(args.duration),
        humantime::format_duration(args.job_runtime),
    );
    println!(
        "agents connected and Ready in {:.1} s; controller = gpufleet-controller child process",
        o.connect_time.as_secs_f64()
    );
    println!();
    let rows: Vec<Vec<String>> = o
        .rss
        .iter()
        .zip(&o.window_latency)
        .map(|(p, latency)| {
            vec![
                format!("{:.0}", p.at.as_secs_f64()),
                format!("{:.1}", mib(p.rss)),
                p.heap.map_or("-".into(), |h| format!("{:.1}", mib(h))),
                p.submitted.to_string(),
                latency.map_or("-".into(), |(p50, p99)| {
                    format!("{:.1} / {:.1}", p50 as f64 / 1000.0, p99 as f64 / 1000.0)
                }),
            ]
        })
        .collect();
    report::table(
        &[
            "t (s)",
            "controller RSS (MiB)",
            "live heap (MiB)",
            "jobs submitted",
            "submit p50 / p99 in interval (ms)",
        ],
        &rows,
    );
    println!();

    let verdict = Flatness::of(&o.rss, args.duration);
    let flat = verdict.floor_share <= FLAT_GROWTH;
    // The heap by the same test, when every sample has it: what the
    // controller holds, against what the allocator keeps.
    let heap = o
        .rss
        .iter()
        .all(|p| p.heap.is_some())
        .then(|| Flatness::of_value(&o.rss, args.duration, |p| p.heap.unwrap_or(0)));
    let p = |q: f64| report::percentile(&o.submit_latency, q) as f64 / 1000.0;
    let (p50, p99, max) = (
        p(50.0),
        p(99.0),
        o.submit_latency.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    let errors = o.errors + log_errors as u64 + o.failed + o.unfinished;
    report::table(
        &["figure", "value", "goal"],
        &[
            vec![
                "errors (clients, agents, controller log, failed or unfinished jobs)".into(),
                errors.to_string(),
                "0".into(),
            ],
            vec![
                "jobs submitted (achieved rate)".into(),
                format!("{} ({:.1}/s)", o.submitted, o.achieved_rate),
                format!("{}/s", args.submit_rate),
            ],
            vec![
                "jobs started / succeeded on the agents".into(),
                format!("{} / {}", o.started, o.succeeded),
                "= submitted".into(),
            ],
            vec![
                "telemetry batches sent".into(),
                o.batches.to_string(),
                "-".into(),
            ],
            vec![
                "submit latency p50 / p99 / max".into(),
                format!("{p50:.2} / {p99:.2} / {max:.2} ms"),
                "-".into(),
            ],
            vec![
                format!(
                    "RSS floor growth: lowest in {:.0}s from t={:.0}s, to lowest in the last {:.0}s",
                    verdict.window.as_secs_f64(),
                    verdict.from.as_secs_f64(),
                    verdict.window.as_secs_f64(),
                ),
                format!(
                    "{:.1} -> {:.1} MiB: {:+.1} MiB ({:+.1} %), {:.0} B per job submitted meanwhile",
                    mib(verdict.floor_start),
                    mib(verdict.floor_end),
                    verdict.floor_growth / (1 << 20) as f64,
                    verdict.floor_share * 100.0,
                    verdict.floor_per_job
                ),
                format!("<= {:.0} % (flat)", FLAT_GROWTH * 100.0),
            ],
            vec![
                format!(
                    "RSS sample at t={:.0}s to the last sample",
                    verdict.from.as_secs_f64()
                ),
                format!(
                    "{:+.1} MiB ({:+.1} %)",
                    verdict.sample_growth / (1 << 20) as f64,
                    verdict.sample_share * 100.0,
                ),
                "-".into(),
            ],
            vec![
                "RSS peak after warm-up".into(),
                format!("{:.1} MiB", mib(verdict.peak)),
                "-".into(),
            ],
            vec![
                "live heap floor growth, the same windows".into(),
                heap.as_ref()
                    .map_or("- (no gpufleet_controller_heap_bytes)".into(), |h| {
                        format!(
                            "{:.1} -> {:.1} MiB: {:+.1} MiB ({:+.1} %), {:.0} B per job",
                            mib(h.floor_start),
                            mib(h.floor_end),
                            h.floor_growth / (1 << 20) as f64,
                            h.floor_share * 100.0,
                            h.floor_per_job
                        )
                    }),
                "-".into(),
            ],
        ],
    );
    println!(
        "verdict: controller RSS {} after warm-up",
        if flat { "flat" } else { "NOT flat" }
    );
    for e in &o.first_errors {
        println!("error: {e}");
    }
    let summary = serde_json::json!({
        "bench": "load",
        "agents": args.agents,
        "gpus_per_agent": args.gpus,
        "duration_s": args.duration.as_secs_f64(),
        "submit_rate": args.submit_rate,
        "achieved_rate": (o.achieved_rate * 10.0).round() / 10.0,
        "cores": cores,
        "errors": errors,
        "jobs_submitted": o.submitted,
        "jobs_succeeded_on_agents": o.succeeded,
        "telemetry_batches": o.batches,
        "submit_p50_ms": p50,
        "submit_p99_ms": p99,
        "submit_max_ms": max,
        "rss_mib": o.rss.iter().map(|p| [p.at.as_secs_f64().round(), (mib(p.rss) * 10.0).round() / 10.0]).collect::<Vec<_>>(),
        "rss_floor_growth_after_third": (verdict.floor_share * 1000.0).round() / 1000.0,
        "rss_floor_bytes_per_job": verdict.floor_per_job.round(),
        "rss_sample_growth_after_third": (verdict.sample_share * 1000.0).round() / 1000.0,
        "rss_peak_after_third_mib": (mib(verdict.peak) * 10.0).round() / 10.0,
        "rss_flat": flat,
        "heap_mib": o.rss.iter().filter_map(|p| p.heap.map(|h| [p.at.as_secs_f64().round(), (mib(h) * 10.0).round() / 10.0])).collect::<Vec<_>>(),
        "heap_floor_growth_after_third": heap.as_ref().map(|h| (h.floor_share * 1000.0).round() / 1000.0),
        "heap_floor_bytes_per_job": heap.as_ref().map(|h| h.floor_per_job.round()),
    });
    println!("{summary}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples every 10 s of a 300 s run: `base` MiB plus `slope` MiB per
    /// 10 s, plus `peak` MiB on every sixth sample (the minute's writes).
    fn run(base: f64, slope: f64, peak: f64, peak_at_end: bool) -> Vec<RssPoint> {
        (0..=30u64)
            .map(|i| {
                let minute_peak = i % 6 == 2 || (peak_at_end && i == 30);
                let value = base + slope * i as f64 + if minute_peak { peak } else { 0.0 };
                RssPoint {
                    at: Duration::from_secs(10 * i),
                    rss: (value * (1 << 20) as f64) as u64,
                    heap: None,
                    submitted: 1000 * i,
                }
            })
            .collect()
    }

    #[test]
    fn a_peak_on_the_last_sample_does_not_decide_the_verdict() {
        let points = run(90.0, 0.0, 5.0, true);
        let v = Flatness::of(&points, Duration::from_secs(300));
        assert_eq!(v.from, Duration::from_secs(100));
        assert!(v.sample_share > FLAT_GROWTH, "{v:?}");
        assert_eq!(v.floor_start, v.floor_end, "{v:?}");
        assert!(v.floor_share.abs() < 1e-9);
        assert!(mib(v.peak) > 94.9, "{v:?}");
    }

    #[test]
    fn steady_growth_under_the_peaks_is_not_flat() {
        // 0.5 MiB per 10 s: +10 MiB over the last 200 s on about 95 MiB.
        let points = run(90.0, 0.5, 5.0, false);
        let v = Flatness::of(&points, Duration::from_secs(300));
        assert!(v.floor_share > FLAT_GROWTH, "{v:?}");
        assert!(v.floor_per_job > 0.0);
    }

    #[test]
    fn a_run_too_short_for_two_windows_compares_its_last_sample() {
        let points: Vec<RssPoint> = (0..=3u64)
            .map(|i| RssPoint {
                at: Duration::from_secs(10 * i),
                rss: (100 + 10 * i) << 20,
                heap: Some(50 << 20),
                submitted: 100 * i,
            })
            .collect();
        let v = Flatness::of(&points, Duration::from_secs(30));
        assert_eq!(v.floor_end, 130 << 20, "{v:?}");
        assert!(v.floor_share > FLAT_GROWTH);
        assert!(Flatness::of(&[], Duration::from_secs(30)).floor_share == 0.0);
        // The same test over the heap, which stayed level.
        let heap = Flatness::of_value(&points, Duration::from_secs(30), |p| p.heap.unwrap_or(0));
        assert_eq!(heap.floor_growth, 0.0, "{heap:?}");
    }
}
