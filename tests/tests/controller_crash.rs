//! Controller crash recovery with real processes: one `gpufleet-controller`
//! and three `gpufleet-agent` binaries (simulated GPUs on three providers).
//! While 200 jobs of mixed lengths, sizes and outcomes run, the controller
//! is SIGKILLed at three seeded-random moments and restarted on the same
//! address and data dir each time. Afterwards:
//!
//! - every job ended exactly once, in the state its workload asked for
//!   (exit 0: Succeeded; exit N: Failed with N, after its retries);
//! - no allocation ran twice (each workload appends its allocation id to a
//!   shared marker file), and a job ran once per attempt its record counts;
//! - the usage ledger holds exactly one record per allocation that ran, equal
//!   to the millisecond to what the job records say, and the report's
//!   totals equal the records' sums.
//!
//! The binaries are the ones next to this test executable (target/debug);
//! `cargo test --workspace` builds them, and so does
//! `cargo build -p gpufleet-controller -p gpufleet-agent` — rebuild them
//! after changing controller or agent code, or this test runs the old ones.
//!
//! The run prints its seed; replay it with `GPUFLEET_CRASH_SEED=<seed>`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use gpufleet_proto::v1::fleet_client::FleetClient;
use gpufleet_proto::v1::jobs_client::JobsClient;
use gpufleet_proto::v1::usage_client::UsageClient;
use gpufleet_proto::v1::{
    Job, JobSpec, JobState, ListJobsRequest, ListNodesRequest, ListUsageRecordsRequest, NodeState,
    RetryPolicy, SubmitJobRequest, UsageRecord, UsageReportRequest, WorkloadSpec, WorkloadState,
};
use gpufleet_tests::eventually;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const JOBS: usize = 200;
const KILLS: usize = 3;
const SEED_ENV: &str = "GPUFLEET_CRASH_SEED";
/// Only guards against a hang; nothing here asserts on speed.
const RUN_DEADLINE: Duration = Duration::from_secs(300);

/// (node id, provider, region, simulated GPUs, USD per GPU-hour).
const NODES: [(&str, &str, &str, &str, &str); 3] = [
    ("crash-a", "aws", "us-east-1", "8xH100-SXM-80GB", "3.93"),
    ("crash-b", "gcp", "europe-west4", "8xA100-SXM-80GB", "2.48"),
    ("crash-c", "lambda", "us-west-1", "6xA100-SXM-40GB", "1.29"),
];

/// Each workload records its start and end, then exits with the code its
/// job planned; a retry (allocation id `<job>.<task>.<attempt>`) exits
/// with `RETRY_EXIT` instead.
const WORKLOAD: &str = r#"echo "start $GPUFLEET_ALLOCATION_ID" >> "$MARKER"
sleep "$SLEEP"
echo "end $GPUFLEET_ALLOCATION_ID" >> "$MARKER"
case "$GPUFLEET_ALLOCATION_ID" in *.*.*) exit "$RETRY_EXIT";; esac
exit "$FIRST_EXIT""#;

/// What a job's workload does, and so how the job must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Succeeds,
    /// Exits with `code`; no retries.
    Fails {
        code: i32,
    },
    /// Exits with `code` on both attempts of a one-retry policy.
    FailsAfterRetry {
        code: i32,
    },
    /// Exits with `code`, then succeeds on its one retry.
    SucceedsOnRetry {
        code: i32,
    },
}

#[derive(Debug, Clone)]
struct PlannedJob {
    name: String,
    tasks: u32,
    gpus_per_task: u32,
    sleep_ms: u32,
    outcome: Outcome,
}

impl PlannedJob {
    fn random(index: usize, rng: &mut StdRng) -> Self {
        let tasks = if rng.random_bool(0.1) { 2 } else { 1 };
        let gpus_per_task = match (tasks, rng.random_range(0..100)) {
            (_, 0..60) => 1,
            (_, 60..85) => 2,
            (1, _) => 4,
            _ => 2,
        };
        let code = rng.random_range(1..=120);
        let outcome = match rng.random_range(0..100) {
            0..70 => Outcome::Succeeds,
            70..85 => Outcome::Fails { code },
            85..92 => Outcome::FailsAfterRetry { code },
            _ => Outcome::SucceedsOnRetry { code },
        };
        Self {
            name: format!("crash-{index:03}"),
            tasks,
            gpus_per_task,
            // 0 to 3 s in tenths.
            sleep_ms: rng.random_range(0..=30) * 100,
            outcome,
        }
    }

    fn spec(&self, marker: &Path) -> JobSpec {
        let (first_exit, retry_exit, retries) = match self.outcome {
            Outcome::Succeeds => (0, 0, 0),
            Outcome::Fails { code } => (code, code, 0),
            Outcome::FailsAfterRetry { code } => (code, code, 1),
            Outcome::SucceedsOnRetry { code } => (code, 0, 1),
        };
        let env = [
            ("MARKER", marker.display().to_string()),
            (
                "SLEEP",
                format!("{}.{}", self.sleep_ms / 1000, self.sleep_ms % 1000 / 100),
            ),
            ("FIRST_EXIT", first_exit.to_string()),
            ("RETRY_EXIT", retry_exit.to_string()),
        ];
        JobSpec {
            name: self.name.clone(),
            tasks: self.tasks,
            gpus_per_task: self.gpus_per_task,
            workload: Some(WorkloadSpec {
                argv: vec!["/bin/sh".into(), "-c".into(), WORKLOAD.into()],
                env: env.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                ..Default::default()
            }),
            retry: Some(RetryPolicy {
                max_retries_on_failure: retries,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// (final state, job exit code, attempt).
    fn expected(&self) -> (JobState, i32, u32) {
        match self.outcome {
            Outcome::Succeeds => (JobState::Succeeded, 0, 0),
            Outcome::Fails { code } => (JobState::Failed, code, 0),
            Outcome::FailsAfterRetry { code } => (JobState::Failed, code, 1),
            Outcome::SucceedsOnRetry { .. } => (JobState::Succeeded, 0, 1),
        }
    }
}

/// A controller SIGKILL: once `share` of the jobs still running after
/// submission have ended, after a further delay.
#[derive(Debug, Clone, Copy)]
struct KillMoment {
    share: f64,
    delay: Duration,
}

impl KillMoment {
    /// How many jobs must have ended, given how many had when submission
    /// finished; always leaves jobs running.
    fn threshold(&self, ended_at_submit: usize) -> usize {
        let open = (JOBS - 10).saturating_sub(ended_at_submit);
        ended_at_submit + (self.share * open as f64) as usize
    }
}

fn plan_kills(rng: &mut StdRng) -> Vec<KillMoment> {
    // One kill in each third of what remains after submission.
    (0..KILLS)
        .map(|k| KillMoment {
            share: (k as f64 + rng.random_range(0.0..1.0)) / KILLS as f64,
            delay: Duration::from_millis(rng.random_range(0..500)),
        })
        .collect()
}

fn seed() -> anyhow::Result<u64> {
    match std::env::var(SEED_ENV) {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("{SEED_ENV}={text:?} is not a u64 seed")),
        Err(_) => Ok(rand::random()),
    }
}

/// Every gRPC client of this test, over one channel. The one place that
/// would add credentials to requests.
#[derive(Clone)]
struct Api {
    jobs: JobsClient<gpufleet_tests::Authed>,
    usage: UsageClient<gpufleet_tests::Authed>,
    fleet: FleetClient<gpufleet_tests::Authed>,
}

/// Lazy: the channel redials by itself after each controller restart.
/// Every call carries the controller's bootstrap admin token.
fn connect(endpoint: &str, token: &str) -> anyhow::Result<Api> {
    let channel = Channel::from_shared(endpoint.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    let channel = tonic::service::interceptor::InterceptedService::new(
        channel,
        gpufleet_tests::BearerToken::with(token)?,
    );
    Ok(Api {
        jobs: JobsClient::new(channel.clone()),
        usage: UsageClient::new(channel.clone()),
        fleet: FleetClient::new(channel),
    })
}

/// The built binaries, next to this test executable.
struct Binaries {
    controller: PathBuf,
    agent: PathBuf,
}

impl Binaries {
    fn find() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the test executable")?;
        // target/debug/deps/<test> → target/debug
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .context("the test executable is not inside a cargo target directory")?;
        let find = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                bail!(
                    "{} is missing; build it first with `cargo build -p gpufleet-controller -p gpufleet-agent` \
                     (`cargo test --workspace` builds it too)",
                    path.display()
                )
            }
        };
        Ok(Self {
            controller: find("gpufleet-controller")?,
            agent: find("gpufleet-agent")?,
        })
    }
}

/// The gRPC address a controller logged once it bound its listener
/// (`--log-format json`: the "controller serving" line), if it has yet.
fn logged_address(log: &Path) -> Option<std::net::SocketAddr> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|line| {
        let entry: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = &entry["fields"];
        if fields["message"] != "controller serving" {
            return None;
        }
        fields["local_addr"].as_str()?.parse().ok()
    })
}

/// A running binary; killed if dropped (a failing test leaves nothing behind).
struct Daemon {
    name: String,
    child: tokio::process::Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &str, program: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let child = tokio::process::Command::new(program)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self
            .child
            .id()
            .with_context(|| format!("{} already exited", self.name))?;
        let pid = i32::try_from(pid).context("pid out of range")?;
        kill(Pid::from_raw(pid), signal).with_context(|| format!("cannot signal {}", self.name))
    }

    async fn sigkill(mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGKILL)?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM, then waits for a clean exit.
    async fn stop(mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGTERM)?;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .with_context(|| format!("{} did not exit within 30s of SIGTERM", self.name))??;
        ensure!(status.success(), "{} exited with {status}", self.name);
        Ok(())
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

/// The whole fleet of processes and where they keep their files.
struct Fleet {
    bins: Binaries,
    dir: PathBuf,
    /// Where the first controller bound `127.0.0.1:0`; every restart binds
    /// it again, since the agents were told this address.
    addr: Option<std::net::SocketAddr>,
    controller: Option<Daemon>,
    starts: usize,
    agents: Vec<Daemon>,
}

impl Fleet {
    fn endpoint(&self) -> anyhow::Result<String> {
        let addr = self.addr.context("no controller has started yet")?;
        Ok(format!("http://{addr}"))
    }

    /// Starts a controller on the fleet's address (the first time on a port
    /// the kernel picks, read back from its log) and data dir, and waits
    /// until it serves.
    async fn start_controller(&mut self) -> anyhow::Result<()> {
        let listen = self
            .addr
            .map_or_else(|| "127.0.0.1:0".to_string(), |addr| addr.to_string());
        let args: Vec<String> = [
            "--listen",
            &listen,
            "--log-format",
            "json",
            "--data-dir",
            &self.dir.join("controller").display().to_string(),
            "--metrics-listen",
            "127.0.0.1:0",
            "--join-token",
            gpufleet_tests::JOIN_TOKEN,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = self
            .dir
            .join(format!("controller-{}.log", self.starts))
            .to_path_buf();
        self.starts += 1;
        let mut daemon = Daemon::spawn("controller", &self.bins.controller, &args, log)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = daemon.exited() {
                bail!(
                    "the controller exited with {status} while starting; its log:\n{}",
                    tail(&daemon.log)
                );
            }
            if self.addr.is_none() {
                self.addr = logged_address(&daemon.log);
            }
            if let Some(addr) = self.addr
                && serving(&format!("http://{addr}")).await
            {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the controller did not serve within 60s"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.controller = Some(daemon);
        Ok(())
    }

    fn start_agents(&mut self) -> anyhow::Result<()> {
        for (id, provider, region, gpus, price) in NODES {
            let data_dir = self.dir.join("agents").join(id);
            let args: Vec<String> = [
                "--controller",
                &self.endpoint()?,
                "--join-token",
                gpufleet_tests::JOIN_TOKEN,
                "--node-id",
                id,
                "--provider",
                provider,
                "--region",
                region,
                "--price-per-gpu-hour",
                price,
                "--gpu-backend",
                "simulated",
                "--simulated-gpus",
                gpus,
                "--data-dir",
                &data_dir.display().to_string(),
                "--sample-interval",
                "500ms",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "off",
                "--read-kmsg",
                "false",
                "--stop-grace-period",
                "1s",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let log = self.dir.join(format!("agent-{id}.log"));
            self.agents
                .push(Daemon::spawn(id, &self.bins.agent, &args, log)?);
        }
        Ok(())
    }

    async fn kill_controller(&mut self) -> anyhow::Result<()> {
        let daemon = self.controller.take().context("no controller is running")?;
        daemon.sigkill().await
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        for agent in self.agents.drain(..) {
            agent.stop().await?;
        }
        if let Some(controller) = self.controller.take() {
            controller.stop().await?;
        }
        Ok(())
    }

    /// The end of every log, for a failure's message.
    fn logs(&self) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "log") && !is_marker(p))
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        logs.iter()
            .map(|p| format!("==== {} ====\n{}", p.display(), tail(p)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn is_marker(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "markers.log")
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

async fn serving(endpoint: &str) -> bool {
    let Ok(channel) = Channel::from_shared(endpoint.to_string()) else {
        return false;
    };
    let Ok(channel) = channel.connect().await else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
}

async fn wait_agents_connected(api: &Api) -> anyhow::Result<()> {
    eventually("all three agents connected and Ready", || {
        let mut fleet = api.fleet.clone();
        async move {
            let Ok(nodes) = fleet.list_nodes(ListNodesRequest::default()).await else {
                return Ok(None);
            };
            let ready = nodes
                .into_inner()
                .nodes
                .iter()
                .filter(|n| n.connected && n.state() == NodeState::Ready)
                .count();
            Ok((ready == NODES.len()).then_some(()))
        }
    })
    .await
}

/// Every job, or None while the controller does not answer.
async fn all_jobs(api: &Api) -> Option<Vec<Job>> {
    let mut jobs = api.jobs.clone();
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = jobs
            .list_jobs(ListJobsRequest {
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner();
        out.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return Some(out);
        }
        page_token = page.next_page_token;
    }
}

fn terminal(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost
    )
}

fn task_terminal(state: WorkloadState) -> bool {
    matches!(
        state,
        WorkloadState::Succeeded
            | WorkloadState::Failed
            | WorkloadState::Stopped
            | WorkloadState::Lost
    )
}

/// How each job was first seen ending; it must never change afterwards
/// (a job that ends twice, or comes back to life after a restart).
#[derive(Default)]
struct EndingsSeen {
    first: HashMap<String, Job>,
}

impl EndingsSeen {
    fn observe(&mut self, jobs: &[Job]) -> anyhow::Result<usize> {
        for job in jobs {
            match self.first.get(&job.id) {
                Some(seen) => ensure!(
                    job.state() == seen.state()
                        && job.exit_code == seen.exit_code
                        && job.finished_at == seen.finished_at
                        && job.attempt == seen.attempt,
                    "job {} ended twice: first seen {:?} (exit {:?}, attempt {}, finished {:?}), now {:?} (exit {:?}, attempt {}, finished {:?})",
                    job.id,
                    seen.state(),
                    seen.exit_code,
                    seen.attempt,
                    seen.finished_at,
                    job.state(),
                    job.exit_code,
                    job.attempt,
                    job.finished_at
                ),
                None if terminal(job.state()) => {
                    self.first.insert(job.id.clone(), job.clone());
                }
                None => {}
            }
        }
        Ok(self.first.len())
    }
}

/// Polls the jobs (tolerating a controller that is down) until `done`.
async fn watch_until(
    api: &Api,
    seen: &mut EndingsSeen,
    what: &str,
    deadline: Instant,
    mut done: impl FnMut(&[Job], usize) -> bool,
) -> anyhow::Result<Vec<Job>> {
    loop {
        if let Some(jobs) = all_jobs(api).await {
            let ended = seen.observe(&jobs)?;
            if done(&jobs, ended) {
                return Ok(jobs);
            }
        }
        ensure!(
            Instant::now() < deadline,
            "gave up waiting for {what} ({} jobs ended so far)",
            seen.first.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ms(ts: &Option<prost_types::Timestamp>) -> Option<u64> {
    ts.map(|t| t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000)
}

/// Allocation id → how many times its workload started, and whether it
/// ran to its end.
fn read_markers(path: &Path) -> anyhow::Result<(BTreeMap<String, usize>, BTreeSet<String>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut starts: BTreeMap<String, usize> = BTreeMap::new();
    let mut ends = BTreeSet::new();
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("start", id)) => *starts.entry(id.to_string()).or_default() += 1,
            Some(("end", id)) => {
                ends.insert(id.to_string());
            }
            _ => bail!("unexpected marker line {line:?}"),
        }
    }
    Ok((starts, ends))
}

async fn all_usage_records(api: &Api) -> anyhow::Result<Vec<UsageRecord>> {
    let mut usage = api.usage.clone();
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = usage
            .list_usage_records(ListUsageRecordsRequest {
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await?
            .into_inner();
        out.extend(page.records);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

fn allocation_id(job_id: &str, task: u32, attempt: u32) -> String {
    if attempt == 0 {
        format!("{job_id}.{task}")
    } else {
        format!("{job_id}.{task}.{attempt}")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_sigkilled_three_times_loses_and_repeats_nothing() -> anyhow::Result<()> {
    let seed = seed()?;
    println!("seed {seed}; replay with {SEED_ENV}={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let plan: Vec<PlannedJob> = (0..JOBS).map(|i| PlannedJob::random(i, &mut rng)).collect();
    let kills = plan_kills(&mut rng);
    println!("kill moments: {kills:?}");

    let dir = tempfile::tempdir()?;
    let mut fleet = Fleet {
        bins: Binaries::find()?,
        dir: dir.path().to_path_buf(),
        addr: None,
        controller: None,
        starts: 0,
        agents: Vec::new(),
    };
    let result = run(&mut fleet, &plan, &kills).await;
    if let Err(e) = result {
        // Keep the files for a look; the message says where.
        let logs = fleet.logs();
        let kept = dir.keep();
        return Err(e.context(format!(
            "seed {seed} (replay with {SEED_ENV}={seed}); files kept in {}\n{logs}",
            kept.display()
        )));
    }
    fleet.stop().await
}

async fn run(fleet: &mut Fleet, plan: &[PlannedJob], kills: &[KillMoment]) -> anyhow::Result<()> {
    let marker = fleet.dir.join("markers.log");
    std::fs::write(&marker, "")?;
    fleet.start_controller().await?;
    fleet.start_agents()?;
    let api = connect(
        &fleet.endpoint()?,
        &gpufleet_tests::admin_token_in(&fleet.dir.join("controller"))?,
    )?;
    wait_agents_connected(&api).await?;

    let mut planned: HashMap<String, &PlannedJob> = HashMap::new();
    for job in plan {
        let submitted = api
            .jobs
            .clone()
            .submit_job(SubmitJobRequest {
                spec: Some(job.spec(&marker)),
            })
            .await
            .with_context(|| format!("cannot submit {}", job.name))?
            .into_inner()
            .job
            .context("SubmitJob answered without the job")?;
        planned.insert(submitted.id, job);
    }

    let deadline = Instant::now() + RUN_DEADLINE;
    let mut seen = EndingsSeen::default();
    let submitted = watch_until(&api, &mut seen, "the job list", deadline, |_, _| true).await?;
    let ended_at_submit = submitted.iter().filter(|j| terminal(j.state())).count();
    for (i, moment) in kills.iter().enumerate() {
        let threshold = moment.threshold(ended_at_submit);
        watch_until(
            &api,
            &mut seen,
            &format!("{threshold} ended jobs before kill {}", i + 1),
            deadline,
            |_, ended| ended >= threshold,
        )
        .await?;
        // The random moment itself, not a wait for something to happen.
        tokio::time::sleep(moment.delay).await;
        fleet.kill_controller().await?;
        println!(
            "kill {}: controller SIGKILLed with {} jobs seen ended",
            i + 1,
            seen.first.len()
        );
        fleet.start_controller().await?;
        // Requirement: agents reconnect to the restarted controller.
        wait_agents_connected(&api).await?;
    }
    let jobs = watch_until(
        &api,
        &mut seen,
        "every job to end and release its GPUs",
        deadline,
        |jobs, ended| {
            ended == JOBS
                && jobs
                    .iter()
                    .all(|j| j.tasks.iter().all(|t| task_terminal(t.state())))
        },
    )
    .await?;
    ensure!(
        jobs.len() == JOBS,
        "the controller lists {} jobs; {JOBS} were submitted",
        jobs.len()
    );

    verify_outcomes(&jobs, &planned)?;
    let (starts, ends) = read_markers(&marker)?;
    let ran = verify_ran_once(&jobs, &planned, &starts, &ends)?;
    verify_usage(&api, &jobs, &ran).await?;
    verify_fleet_released(&api).await
}

/// Agents re-synced: every node is connected and holds nothing.
async fn verify_fleet_released(api: &Api) -> anyhow::Result<()> {
    let nodes = api
        .fleet
        .clone()
        .list_nodes(ListNodesRequest::default())
        .await?
        .into_inner()
        .nodes;
    ensure!(
        nodes.len() == NODES.len(),
        "{} nodes registered",
        nodes.len()
    );
    for node in &nodes {
        ensure!(
            node.connected && node.state() == NodeState::Ready && node.allocated_gpus == 0,
            "node {:?} is {:?} (connected {}) with {} GPUs still allocated after every job ended",
            node.identity.as_ref().map(|i| i.node_id.as_str()),
            node.state(),
            node.connected,
            node.allocated_gpus
        );
    }
    Ok(())
}

/// Every job ended in the state, exit code and attempt its plan implies.
fn verify_outcomes(jobs: &[Job], planned: &HashMap<String, &PlannedJob>) -> anyhow::Result<()> {
    let mut wrong = Vec::new();
    for job in jobs {
        let plan = planned
            .get(&job.id)
            .with_context(|| format!("job {} was never submitted", job.id))?;
        let (state, exit_code, attempt) = plan.expected();
        if job.state() != state
            || job.exit_code != Some(exit_code)
            || job.attempt != attempt
            || job.failure_retries != attempt
            || job.node_loss_retries != 0
            || job.tasks.len() != plan.tasks as usize
        {
            wrong.push(format!(
                "{} ({}, {:?}): want {state:?} exit {exit_code} attempt {attempt}; got {:?} exit {:?} attempt {} ({} failure retries, {} node-loss retries, {} tasks): {}; history {:?}",
                job.id,
                plan.name,
                plan.outcome,
                job.state(),
                job.exit_code,
                job.attempt,
                job.failure_retries,
                job.node_loss_retries,
                job.tasks.len(),
                job.message,
                job.history
            ));
        }
    }
    let mut task_ends: BTreeMap<String, usize> = BTreeMap::new();
    for task in jobs.iter().flat_map(|j| &j.tasks) {
        *task_ends.entry(format!("{:?}", task.state())).or_default() += 1;
    }
    println!("final attempts' tasks ended as {task_ends:?}");
    ensure!(
        wrong.is_empty(),
        "{} jobs ended wrongly:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    Ok(())
}

/// No allocation started twice; every started allocation belongs to an
/// attempt its job counts; every task that exited on its own ran. Returns
/// the allocations that ran.
fn verify_ran_once(
    jobs: &[Job],
    planned: &HashMap<String, &PlannedJob>,
    starts: &BTreeMap<String, usize>,
    ends: &BTreeSet<String>,
) -> anyhow::Result<BTreeSet<String>> {
    let twice: Vec<String> = starts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| format!("{id} ({n} times)"))
        .collect();
    ensure!(
        twice.is_empty(),
        "allocations ran more than once: {twice:?}"
    );
    let mut allowed = BTreeSet::new();
    for job in jobs {
        let plan = planned
            .get(&job.id)
            .with_context(|| format!("job {} was never submitted", job.id))?;
        for attempt in 0..=job.attempt {
            for task in 0..plan.tasks {
                allowed.insert(allocation_id(&job.id, task, attempt));
            }
        }
        for task in &job.tasks {
            if matches!(
                task.state(),
                WorkloadState::Succeeded | WorkloadState::Failed
            ) {
                ensure!(
                    starts.contains_key(&task.allocation_id),
                    "{} ended {:?} but its workload never started",
                    task.allocation_id,
                    task.state()
                );
            }
            if task.state() == WorkloadState::Succeeded {
                ensure!(
                    ends.contains(&task.allocation_id),
                    "{} is Succeeded but its workload never reached its end",
                    task.allocation_id
                );
            }
        }
    }
    let strays: Vec<&String> = starts.keys().filter(|id| !allowed.contains(*id)).collect();
    ensure!(
        strays.is_empty(),
        "workloads ran that no job attempt accounts for: {strays:?}"
    );
    Ok(starts.keys().cloned().collect())
}

/// One usage record per allocation that ran, none other; the current
/// attempt's records equal the job records to the millisecond; the report's
/// totals equal the records' sums.
async fn verify_usage(api: &Api, jobs: &[Job], ran: &BTreeSet<String>) -> anyhow::Result<()> {
    let records = all_usage_records(api).await?;
    let mut by_allocation: BTreeMap<&str, &UsageRecord> = BTreeMap::new();
    for record in &records {
        ensure!(
            by_allocation
                .insert(&record.allocation_id, record)
                .is_none(),
            "two usage records for {}",
            record.allocation_id
        );
        ensure!(
            !record.running,
            "{} is listed as running",
            record.allocation_id
        );
        let (start, end) = (ms(&record.started_at), ms(&record.ended_at));
        let (Some(start), Some(end)) = (start, end) else {
            bail!("{} lacks its start or end", record.allocation_id);
        };
        ensure!(
            end >= start,
            "{} ends before it starts: {record:?}",
            record.allocation_id
        );
        ensure!(
            record.gpu_milliseconds == (end - start) * u64::from(record.gpu_count),
            "{}: {} GPU-ms is not ({end} - {start}) ms × {} GPUs",
            record.allocation_id,
            record.gpu_milliseconds,
            record.gpu_count
        );
    }
    let recorded: BTreeSet<String> = by_allocation.keys().map(|s| s.to_string()).collect();
    let missing: Vec<&String> = ran.difference(&recorded).collect();
    // A process the agent started and then stopped at once (a gang whose
    // partner failed as this rank launched) can die before its first line
    // writes the marker: its record is real, and it ended Stopped.
    let extra: Vec<&String> = recorded
        .difference(ran)
        .filter(|id| {
            by_allocation
                .get(id.as_str())
                .is_none_or(|r| r.ended_as != WorkloadState::Stopped as i32)
        })
        .collect();
    ensure!(
        missing.is_empty() && extra.is_empty(),
        "usage records do not match the allocations that ran: missing {missing:?}, without a run {extra:?}"
    );

    let mut from_jobs: u64 = 0;
    let mut current = BTreeSet::new();
    for job in jobs {
        for task in &job.tasks {
            let Some(record) = by_allocation.get(task.allocation_id.as_str()) else {
                ensure!(
                    task.started_at.is_none(),
                    "{} started but has no usage record",
                    task.allocation_id
                );
                continue;
            };
            current.insert(task.allocation_id.clone());
            let (Some(start), Some(end)) = (ms(&task.started_at), ms(&task.finished_at)) else {
                bail!(
                    "{} has a usage record but its task lacks a start or end: {task:?}",
                    task.allocation_id
                );
            };
            let gpus = task.gpu_uuids.len() as u32;
            let Some(ran) = end.checked_sub(start) else {
                bail!("{} ends before it starts: {task:?}", task.allocation_id);
            };
            let want = ran * u64::from(gpus);
            ensure!(
                ms(&record.started_at) == Some(start)
                    && ms(&record.ended_at) == Some(end)
                    && record.gpu_count == gpus
                    && record.gpu_milliseconds == want
                    && record.job_id == job.id
                    && record.task_index == task.index
                    && record.ended_as == task.state
                    && record.price_per_gpu_hour_micro_usd == task.price_per_gpu_hour_micro_usd
                    && record.provider == task.provider
                    && record.region == task.region,
                "usage record {record:?} disagrees with its task {task:?} ({want} GPU-ms)"
            );
            from_jobs += want;
        }
    }
    // Earlier attempts' tasks are no longer in the job records; their
    // records must be attempts the job counts, and ended.
    let mut earlier: u64 = 0;
    for record in records
        .iter()
        .filter(|r| !current.contains(&r.allocation_id))
    {
        let job = jobs
            .iter()
            .find(|j| j.id == record.job_id)
            .with_context(|| format!("{} has no job", record.allocation_id))?;
        ensure!(
            (0..job.attempt)
                .any(|a| allocation_id(&job.id, record.task_index, a) == record.allocation_id),
            "{} is neither the current nor an earlier attempt of {}",
            record.allocation_id,
            job.id
        );
        ensure!(
            matches!(
                WorkloadState::try_from(record.ended_as),
                Ok(WorkloadState::Failed | WorkloadState::Stopped)
            ),
            "{} of a retried attempt ended as {:?}",
            record.allocation_id,
            record.ended_as
        );
        earlier += record.gpu_milliseconds;
    }
    let listed: u64 = records.iter().map(|r| r.gpu_milliseconds).sum();
    ensure!(
        listed == from_jobs + earlier,
        "records sum to {listed} GPU-ms; job records say {from_jobs} plus {earlier} of earlier attempts"
    );

    let report = api
        .usage
        .clone()
        .get_usage_report(UsageReportRequest::default())
        .await?
        .into_inner();
    let total = report.total.context("usage report without a total")?;
    ensure!(
        total.gpu_milliseconds == listed && total.allocations == records.len() as u64,
        "the usage report totals {} GPU-ms over {} allocations; the records {listed} over {}",
        total.gpu_milliseconds,
        total.allocations,
        records.len()
    );
    // Money is summed exactly (price × GPU-ms) and rounded once, half up
    // to the micro-dollar (docs/usage.md).
    let cost_exact: u128 = records
        .iter()
        .map(|r| u128::from(r.price_per_gpu_hour_micro_usd) * u128::from(r.gpu_milliseconds))
        .sum();
    let cost = (cost_exact + 1_800_000) / 3_600_000;
    ensure!(
        u128::from(total.cost_micro_usd) == cost,
        "the usage report totals {} micro-USD; the records' exact sum rounds to {cost}",
        total.cost_micro_usd
    );
    println!(
        "{} jobs, {} usage records, {listed} GPU-ms, {cost} micro-USD",
        jobs.len(),
        records.len()
    );
    Ok(())
}
