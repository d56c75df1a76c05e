//! `gpufleet-bench dispatch`: trivial jobs (`true`, one GPU each) through a
//! real controller and one real agent with simulated GPUs, both started
//! in-process on 127.0.0.1:0; clients submit over the gRPC Jobs API and
//! follow each job with WatchJob until it ends. Against the machine's own
//! limit measured in the same run: spawning the same process, as many at a
//! time, with no scheduler at all.
//!
//! With `--image REF` each job is a container of that image run by the
//! agent's oci runtime (podman), and the baseline is bare `podman run --rm`
//! of the same image with the same flags, as many at a time (goal: at
//! least 0.8 of its rate).
//!
//! Latencies come from the job's own timestamps (all set by the
//! controller's clock, except the task's process start, which the agent on
//! the same host reports) and, for comparison, from what the clients see.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow, bail};
use clap::Args;
use gpufleet_agent::{AgentConfig, NodeConfig};
use gpufleet_controller::ControllerConfig;
use gpufleet_controller::config::{EtcdConfig, StoreConfig};
use gpufleet_controller::store::TrafficSnapshot;
use gpufleet_controller::store::etcd::EtcdOptions;
use gpufleet_controller::store::etcd::test_cluster::EtcdCluster;
use gpufleet_proto::v1::{
    ContainerSpec, Job, JobSpec, JobState, PullPolicy, SubmitJobRequest, WatchJobRequest,
    WorkloadSpec,
};
use prost_types::Timestamp;
use tokio::net::TcpListener;

use crate::{clients, report};

/// The trivial workload, found on the agent's workload PATH.
const TRIVIAL: &str = "true";
/// Targets from the issue.
const TARGET_JOBS_PER_S: f64 = 1000.0;
const TARGET_P50_MS: f64 = 10.0;
const TARGET_P99_MS: f64 = 50.0;
/// Longest wait for a job's next update before the run is called failed.
const JOB_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Args)]
pub struct DispatchArgs {
    /// Jobs measured, end to end.
    #[arg(long, default_value_t = 2000)]
    jobs: usize,
    /// Concurrent clients, each on its own connection and each keeping one
    /// job in flight (submit, watch until it ends, submit the next). The
    /// default matches the GPUs, so jobs never wait for a free GPU; the
    /// baseline spawns this many at a time.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Simulated GPUs of the one agent.
    #[arg(long, default_value_t = 8)]
    gpus: usize,
    /// Jobs run first and not measured (connections, allocator, page cache).
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// Run each job (`true`) in a container of this local image, e.g.
    /// localhost/gpufleet-test:1 (tests/podman/setup.sh builds it), through
    /// the agent's oci runtime; the baseline is then bare `podman run --rm`
    /// of it. Use fewer jobs: each costs a container.
    #[arg(long, value_name = "REF")]
    image: Option<String>,
    /// Also run the same jobs with the controller's state in a local
    /// 3-member etcd (tests/etcd/setup.sh starts it under $TMPDIR), and
    /// compare with sled in the same run.
    #[arg(long)]
    etcd: bool,
}

/// Goal of image dispatch against bare `podman run --rm` (issue 22).
const TARGET_IMAGE_RATIO: f64 = 0.8;

/// What one client saw of one job, and the job as it ended.
struct Sample {
    submit_rpc: Duration,
    /// Submit call → the first WatchJob update in Running (or already ended).
    client_running: Duration,
    client_done: Duration,
    job: Job,
}

pub fn run(args: DispatchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.jobs > 0 && args.concurrency > 0 && args.gpus > 0,
        "--jobs, --concurrency and --gpus must be > 0"
    );
    let baseline = Baseline::new(args.image.as_deref());
    let (spawn_rate, spawn_cpu) = spawn_baseline(&baseline, args.jobs, args.concurrency)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (samples, elapsed, busy, sled_traffic) =
        runtime.block_on(through_gpufleet(&args, StoreConfig::Sled))?;
    let job_cpu = busy / samples.len().max(1) as u32;
    let on_etcd = if args.etcd {
        let cluster = EtcdCluster::start(3).map_err(|e| anyhow!("{e}"))?;
        let store = etcd_store(cluster.endpoints());
        let (samples, elapsed, busy, traffic) = runtime.block_on(through_gpufleet(&args, store))?;
        drop(cluster);
        Some(StoreRun::of(&samples, elapsed, busy, traffic)?)
    } else {
        None
    };
    drop(runtime);

    if let Some(failed) = samples
        .iter()
        .find(|s| s.job.state() != JobState::Succeeded)
    {
        bail!(
            "job {} ended {:?}: {} (the figures would be meaningless)",
            failed.job.id,
            failed.job.state(),
            failed.job.message
        );
    }
    let jobs_per_s = samples.len() as f64 / elapsed.as_secs_f64();
    let ratio = jobs_per_s / spawn_rate;

    let span = |from: fn(&Job) -> Option<Timestamp>, to: fn(&Job) -> Option<Timestamp>| {
        Latency::of(
            samples
                .iter()
                .filter_map(|s| between(from(&s.job), to(&s.job))),
        )
    };
    let created = |j: &Job| j.created_at;
    let scheduled = |j: &Job| j.scheduled_at;
    let process_started = |j: &Job| j.tasks.first().and_then(|t| t.started_at);
    let running = |j: &Job| j.started_at;
    let finished = |j: &Job| j.finished_at;
    let to_running = span(created, running);
    let stages = [
        ("submit → running (job timestamps)", to_running.clone()),
        ("  submit → scheduled", span(created, scheduled)),
        (
            "  scheduled → process started (agent)",
            span(scheduled, process_started),
        ),
        (
            "  process started → running",
            span(process_started, running),
        ),
        ("running → succeeded", span(running, finished)),
        (
            "submit RPC (client)",
            Latency::of(samples.iter().map(|s| s.submit_rpc)),
        ),
        (
            "submit → running (client, WatchJob)",
            Latency::of(samples.iter().map(|s| s.client_running)),
        ),
        (
            "submit → succeeded (client)",
            Latency::of(samples.iter().map(|s| s.client_done)),
        ),
    ];
    // A job whose Running status the controller never saw (the process
    // ended first) has no started_at; say how many, they are not in p50/p99.
    let without_running = samples.len() - to_running.count;

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let what = match &args.image {
        Some(image) => format!("`{TRIVIAL}` in a container of {image}"),
        None => format!("`{TRIVIAL}`"),
    };
    println!(
        "dispatch: {} jobs ({what}, 1 GPU each) after {} warm-up, {} clients, 1 agent with {} simulated GPUs, {cores} CPU cores",
        samples.len(),
        args.warmup,
        args.concurrency,
        args.gpus
    );
    println!();
    report::table(
        &["path", "jobs/s"],
        &[
            vec![
                "gpufleet: submit → succeeded, end to end".into(),
                format!("{jobs_per_s:.1}"),
            ],
            vec![
                format!("bare {}, {} at a time", baseline.label(), args.concurrency),
                format!("{spawn_rate:.1}"),
            ],
            vec!["ratio gpufleet / bare".into(), format!("{ratio:.3}")],
        ],
    );
    println!();
    // What bounds throughput on a small machine: every process's CPU,
    // the kernel's included (from /proc/stat, 10 ms ticks).
    report::table(
        &["machine CPU time", "ms"],
        &[
            vec!["per gpufleet job".into(), format!("{:.2}", ms(job_cpu))],
            vec![
                format!("per bare {}", baseline.label()),
                format!("{:.2}", ms(spawn_cpu)),
            ],
        ],
    );
    println!();
    let rows: Vec<Vec<String>> = stages
        .iter()
        .map(|(name, l)| {
            vec![
                name.to_string(),
                format!("{:.2}", l.p50),
                format!("{:.2}", l.p99),
                format!("{:.2}", l.max),
            ]
        })
        .collect();
    report::table(&["latency", "p50 (ms)", "p99 (ms)", "max (ms)"], &rows);
    if without_running > 0 {
        println!(
            "({without_running} jobs ended before the controller saw them Running; not in the submit → running rows)"
        );
    }
    println!();
    let verdict = |ok: bool| if ok { "ok" } else { "missed" };
    if args.image.is_some() {
        report::table(
            &["goal", "measured", "target", ""],
            &[vec![
                "jobs/s / bare podman run --rm".into(),
                format!("{ratio:.3}"),
                format!(">= {TARGET_IMAGE_RATIO}"),
                verdict(ratio >= TARGET_IMAGE_RATIO).into(),
            ]],
        );
    } else {
        report::table(
            &["goal", "measured", "target", ""],
            &[
                vec![
                    "jobs/s end to end".into(),
                    format!("{jobs_per_s:.0}"),
                    format!(">= {TARGET_JOBS_PER_S:.0}"),
                    verdict(jobs_per_s >= TARGET_JOBS_PER_S).into(),
                ],
                vec![
                    "submit → running p50".into(),
                    format!("{:.2} ms", to_running.p50),
                    format!("<= {TARGET_P50_MS} ms"),
                    verdict(to_running.p50 <= TARGET_P50_MS).into(),
                ],
                vec![
                    "submit → running p99".into(),
                    format!("{:.2} ms", to_running.p99),
                    format!("<= {TARGET_P99_MS} ms"),
                    verdict(to_running.p99 <= TARGET_P99_MS).into(),
                ],
            ],
        );
    }
    if let Some(etcd) = &on_etcd {
        println!();
        let sled_cpu = ms(job_cpu);
        report::table(
            &[
                "store (same run)",
                "jobs/s",
                "submit → running p50 / p99 (ms)",
                "machine CPU per job (ms)",
            ],
            &[
                vec![
                    "sled (embedded)".into(),
                    format!("{jobs_per_s:.0}"),
                    format!("{:.2} / {:.2}", to_running.p50, to_running.p99),
                    format!("{sled_cpu:.2}"),
                ],
                vec![
                    "etcd (3 members, fenced transactions)".into(),
                    format!("{:.0}", etcd.jobs_per_s),
                    format!("{:.2} / {:.2}", etcd.to_running.p50, etcd.to_running.p99),
                    format!("{:.2}", ms(etcd.cpu_per_job)),
                ],
                vec![
                    "ratio etcd / sled".into(),
                    format!("{:.3}", etcd.jobs_per_s / jobs_per_s),
                    String::new(),
                    String::new(),
                ],
            ],
        );
        println!();
        let per_job = |t: &TrafficSnapshot, jobs: usize| {
            let jobs = jobs.max(1) as f64;
            vec![
                format!("{:.2}", t.commits as f64 / jobs),
                format!("{:.2}", t.writes as f64 / jobs),
                format!("{:.0}", t.written_bytes as f64 / jobs),
                format!("{:.2}", t.reads as f64 / jobs),
            ]
        };
        let mut sled_row = vec!["sled".to_string()];
        sled_row.extend(per_job(&sled_traffic, samples.len()));
        let mut etcd_row = vec!["etcd".to_string()];
        etcd_row.extend(per_job(&etcd.traffic, samples.len()));
        report::table(
            &[
                "store traffic per job",
                "commits (etcd txns)",
                "key writes",
                "bytes written",
                "reads",
            ],
            &[sled_row, etcd_row],
        );
        println!(
            "etcd goal: >= {ETCD_TARGET_JOBS_PER_S:.0} jobs/s: {}",
            if etcd.jobs_per_s >= ETCD_TARGET_JOBS_PER_S {
                "ok"
            } else {
                "missed"
            }
        );
    }
    let etcd_summary = on_etcd.as_ref().map(|etcd| {
        serde_json::json!({
            "jobs_per_s": etcd.jobs_per_s.round(),
            "ratio_to_sled": (etcd.jobs_per_s / jobs_per_s * 1000.0).round() / 1000.0,
            "submit_to_running_p50_ms": etcd.to_running.p50,
            "submit_to_running_p99_ms": etcd.to_running.p99,
            "cpu_ms_per_job": (ms(etcd.cpu_per_job) * 100.0).round() / 100.0,
            "store_per_job": traffic_json(&etcd.traffic, samples.len()),
        })
    });
    let latencies: serde_json::Map<String, serde_json::Value> = stages
        .iter()
        .map(|(name, l)| {
            (
                name.trim().to_string(),
                serde_json::json!({"p50_ms": l.p50, "p99_ms": l.p99, "max_ms": l.max}),
            )
        })
        .collect();
    let summary = serde_json::json!({
        "bench": if args.image.is_some() { "dispatch_image" } else { "dispatch" },
        "image": args.image,
        "jobs": samples.len(),
        "warmup_jobs": args.warmup,
        "concurrency": args.concurrency,
        "gpus": args.gpus,
        "cores": cores,
        "jobs_per_s": (jobs_per_s * 10.0).round() / 10.0,
        "baseline_spawns_per_s": (spawn_rate * 10.0).round() / 10.0,
        "ratio": (ratio * 1000.0).round() / 1000.0,
        "cpu_ms_per_job": (ms(job_cpu) * 100.0).round() / 100.0,
        "cpu_ms_per_baseline_spawn": (ms(spawn_cpu) * 100.0).round() / 100.0,
        "submit_to_running_p50_ms": to_running.p50,
        "submit_to_running_p99_ms": to_running.p99,
        "jobs_without_running": without_running,
        "latencies": latencies,
        "store_per_job": traffic_json(&sled_traffic, samples.len()),
        "etcd": etcd_summary,
    });
    println!("{summary}");
    Ok(())
}

/// The etcd goal of issue 23: 50× Slurm's 9 jobs/s on this machine.
const ETCD_TARGET_JOBS_PER_S: f64 = 500.0;

/// What the controller asked of its store per measured job.
fn traffic_json(traffic: &TrafficSnapshot, jobs: usize) -> serde_json::Value {
    let per = |n: u64| (n as f64 / jobs.max(1) as f64 * 100.0).round() / 100.0;
    serde_json::json!({
        "commits": per(traffic.commits),
        "key_writes": per(traffic.writes),
        "bytes_written": per(traffic.written_bytes),
        "reads": per(traffic.reads),
    })
}

/// One store's figures, for the side-by-side table.
struct StoreRun {
    jobs_per_s: f64,
    to_running: Latency,
    cpu_per_job: Duration,
    /// What the controller asked of the store during the measured jobs.
    traffic: TrafficSnapshot,
}

impl StoreRun {
    fn of(
        samples: &[Sample],
        elapsed: Duration,
        busy: Duration,
        traffic: TrafficSnapshot,
    ) -> anyhow::Result<Self> {
        if let Some(failed) = samples
            .iter()
            .find(|s| s.job.state() != JobState::Succeeded)
        {
            bail!(
                "job {} ended {:?} on etcd: {}",
                failed.job.id,
                failed.job.state(),
                failed.job.message
            );
        }
        Ok(Self {
            jobs_per_s: samples.len() as f64 / elapsed.as_secs_f64(),
            to_running: Latency::of(
                samples
                    .iter()
                    .filter_map(|s| between(s.job.created_at, s.job.started_at)),
            ),
            cpu_per_job: busy / samples.len().max(1) as u32,
            traffic,
        })
    }
}

/// `store = "etcd"` on `endpoints`.
pub fn etcd_store(endpoints: &[String]) -> StoreConfig {
    StoreConfig::Etcd(Box::new(EtcdConfig {
        options: EtcdOptions::new(endpoints.to_vec(), "/bench/"),
        password_file: None,
        leader_lease: gpufleet_controller::config::DEFAULT_LEADER_LEASE,
        advertise_url: None,
    }))
}

/// What the baseline runs: `true`, or bare `podman run --rm` of the image
/// with the flags the oci runtime gives every container (`--init`, host
/// network, no pull, output passed through), so that only gpufleet's own
/// work differs.
struct Baseline {
    argv: Vec<String>,
}

impl Baseline {
    fn new(image: Option<&str>) -> Self {
        let argv = match image {
            None => vec![TRIVIAL.to_string()],
            Some(image) => [
                "podman",
                "run",
                "--rm",
                "--init",
                "--network",
                "host",
                "--pull",
                "never",
                "--log-driver",
                "passthrough",
                image,
                TRIVIAL,
            ]
            .map(String::from)
            .to_vec(),
        };
        Self { argv }
    }

    fn label(&self) -> String {
        if self.argv.len() == 1 {
            format!("spawn of `{}`", self.argv[0])
        } else {
            "`podman run --rm` of the same image and flags".to_string()
        }
    }
}

/// Runs the baseline `total` times, `parallel` at a time, waiting for
/// each: what the machine allows with no scheduler at all. Runs per
/// second. Also returns the machine's CPU time per run.
fn spawn_baseline(
    baseline: &Baseline,
    total: usize,
    parallel: usize,
) -> anyhow::Result<(f64, Duration)> {
    let remaining = AtomicUsize::new(total);
    let busy = report::machine_busy()?;
    let started = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..parallel)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    while take_one(&remaining) {
                        let status = Command::new(&baseline.argv[0])
                            .args(&baseline.argv[1..])
                            .stdin(Stdio::null())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status()
                            .with_context(|| format!("cannot run {}", baseline.label()))?;
                        anyhow::ensure!(
                            status.success(),
                            "{} ended with {status}",
                            baseline.label()
                        );
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow!("a spawning thread panicked"))??;
        }
        anyhow::Ok(())
    })?;
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let cpu = report::machine_busy()?.saturating_sub(busy) / total as u32;
    Ok((rate, cpu))
}

/// Takes one unit of work from a shared counter; false when none is left.
fn take_one(remaining: &AtomicUsize) -> bool {
    remaining
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// Starts the controller and the agent, runs the warm-up, then the
/// measured jobs; returns what the clients saw and the measured time.
/// The samples, the measured jobs' wall time and the machine's CPU time
/// over it.
async fn through_gpufleet(
    args: &DispatchArgs,
    store: StoreConfig,
) -> anyhow::Result<(Vec<Sample>, Duration, Duration, TrafficSnapshot)> {
    let dir = tempfile::tempdir()?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let mut config = ControllerConfig::for_data_dir(dir.path().join("controller"));
    config.listen = listener.local_addr()?;
    config.join_token = crate::sim_agent::BENCH_JOIN_TOKEN.to_string();
    // Auth is on (every call carries the admin token); the per-token rate
    // limit is off, since one token drives every client here.
    config.rate_limit = None;
    config.store = store;
    let controller = gpufleet_controller::start(config, Some(listener)).await?;
    let endpoint = controller.endpoint();
    clients::use_admin_token(&dir.path().join("controller")).await?;
    let mut config = agent_config(&endpoint, dir.path(), args.gpus);
    if args.image.is_some() {
        config.oci = Some(gpufleet_agent::runtime::oci::OciSettings::new(
            "podman".into(),
        ));
    }
    let agent =
        gpufleet_agent::start(config, Some(TcpListener::bind("127.0.0.1:0").await?)).await?;
    clients::wait_nodes_ready(&endpoint, 1, Duration::from_secs(30)).await?;

    let outcome = async {
        let image = args.image.as_deref();
        run_jobs(&endpoint, args.warmup, args.concurrency, image).await?;
        let busy = report::machine_busy()?;
        let traffic = controller.controller().store_traffic();
        let started = Instant::now();
        let samples = run_jobs(&endpoint, args.jobs, args.concurrency, image).await?;
        let elapsed = started.elapsed();
        anyhow::Ok((
            samples,
            elapsed,
            report::machine_busy()?.saturating_sub(busy),
            controller.controller().store_traffic().since(&traffic),
        ))
    }
    .await;
    agent.shutdown().await?;
    controller.shutdown().await?;
    outcome
}

fn agent_config(endpoint: &str, dir: &std::path::Path, gpus: usize) -> AgentConfig {
    let node = NodeConfig {
        address: None,
        id: Some("dispatch-bench".into()),
        provider: "local".into(),
        region: "loopback".into(),
        zone: String::new(),
        instance_type: "bench".into(),
        price_per_gpu_hour_usd: 2.0,
        spot: false,
        labels: Default::default(),
    };
    // No shim_program: this executable dispatches `__shim` first thing in main.
    AgentConfig {
        sample_interval: Duration::from_secs(1),
        stop_grace_period: Duration::from_secs(2),
        ..AgentConfig::simulated(
            endpoint,
            crate::sim_agent::BENCH_JOIN_TOKEN,
            node,
            vec![format!("{gpus}xH100-SXM-80GB")],
            dir.join("agent"),
        )
    }
}

/// Runs `total` jobs through `concurrency` clients, each with one job in flight.
async fn run_jobs(
    endpoint: &str,
    total: usize,
    concurrency: usize,
    image: Option<&str>,
) -> anyhow::Result<Vec<Sample>> {
    let remaining = Arc::new(AtomicUsize::new(total));
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let endpoint = endpoint.to_string();
        let remaining = remaining.clone();
        let image = image.map(String::from);
        clients.push(tokio::spawn(async move {
            client(endpoint, remaining, image).await
        }));
    }
    let mut samples = Vec::with_capacity(total);
    for client in clients {
        samples.extend(client.await.context("a client task panicked")??);
    }
    Ok(samples)
}

async fn client(
    endpoint: String,
    remaining: Arc<AtomicUsize>,
    image: Option<String>,
) -> anyhow::Result<Vec<Sample>> {
    let mut jobs = clients::jobs_client(&endpoint).await?;
    let mut samples = Vec::new();
    while take_one(&remaining) {
        let submitted = Instant::now();
        let job = jobs
            .submit_job(SubmitJobRequest {
                spec: Some(trivial_job(image.as_deref())),
            })
            .await
            .context("SubmitJob failed")?
            .into_inner()
            .job
            .context("SubmitJob answered without a job")?;
        let submit_rpc = submitted.elapsed();
        let mut updates = jobs
            .watch_job(WatchJobRequest {
                job_id: job.id.clone(),
            })
            .await
            .with_context(|| format!("WatchJob {} failed", job.id))?
            .into_inner();
        let mut client_running = None;
        let job = loop {
            // A job that never ends is a bug to report, not a reason to hang.
            let update = tokio::time::timeout(JOB_DEADLINE, updates.message())
                .await
                .map_err(|_| {
                    anyhow!(
                        "job {} did not end within {JOB_DEADLINE:?} of its last update",
                        job.id
                    )
                })??;
            let Some(update) = update else {
                bail!("WatchJob {} ended before the job did", job.id);
            };
            let state = update.state();
            let ended = matches!(
                state,
                JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost
            );
            if client_running.is_none() && (state == JobState::Running || ended) {
                client_running = Some(submitted.elapsed());
            }
            if ended {
                break update;
            }
        };
        samples.push(Sample {
            submit_rpc,
            client_running: client_running.unwrap_or_default(),
            client_done: submitted.elapsed(),
            job,
        });
    }
    Ok(samples)
}

fn trivial_job(image: Option<&str>) -> JobSpec {
    JobSpec {
        gpus_per_task: 1,
        workload: Some(WorkloadSpec {
            argv: vec![TRIVIAL.to_string()],
            container: image.map(|image| ContainerSpec {
                image: image.to_string(),
                pull: PullPolicy::Never as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `to - from`, when both are set and in order.
fn between(from: Option<Timestamp>, to: Option<Timestamp>) -> Option<Duration> {
    let from = SystemTime::try_from(from?).ok()?;
    let to = SystemTime::try_from(to?).ok()?;
    to.duration_since(from).ok()
}

/// Percentiles of a set of durations, in milliseconds.
#[derive(Clone)]
struct Latency {
    count: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Latency {
    fn of(durations: impl Iterator<Item = Duration>) -> Self {
        let mut micros: Vec<u64> = durations.map(|d| d.as_micros() as u64).collect();
        micros.sort_unstable();
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: micros.len(),
            p50: ms(report::percentile(&micros, 50.0)),
            p99: ms(report::percentile(&micros, 99.0)),
            max: ms(micros.last().copied().unwrap_or(0)),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
