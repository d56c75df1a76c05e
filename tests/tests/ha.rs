//! High availability with real processes (docs/ha.md): a 3-member etcd
//! (tests/etcd/setup.sh), three `gpufleet-controller` binaries sharing it
//! (one leader, two standbys) and two `gpufleet-agent` binaries given all
//! three controllers. Each test breaks something and then checks that
//! every acknowledged job exists once, ran once and finished once, with
//! exactly one usage record of exact length per run.
//!
//! - the leader is SIGKILLed during a burst of submissions;
//! - an etcd member is SIGKILLed: the fleet goes on;
//! - the leader is paused (SIGSTOP): a standby takes over; on SIGCONT the
//!   old leader finds its leadership gone and exits (code 3), and started
//!   again as its supervisor would, it rejoins as a standby.
//!
//! The binaries are the ones next to this test executable (target/debug),
//! built by `cargo test --workspace` or `cargo build -p gpufleet-controller
//! -p gpufleet-agent`. Without etcd the tests print how to enable it and
//! pass, unless `CI` is set.

use gpufleet_controller::ha::probe;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use gpufleet_controller::store::etcd::test_cluster::EtcdCluster;
use gpufleet_proto::v1::fleet_client::FleetClient;
use gpufleet_proto::v1::jobs_client::JobsClient;
use gpufleet_proto::v1::usage_client::UsageClient;
use gpufleet_proto::v1::{
    GetJobRequest, Job, JobSpec, JobState, ListNodesRequest, ListUsageRecordsRequest, NodeState,
    SubmitJobRequest, UsageRecord, WorkloadSpec,
};
use gpufleet_tests::{Authed, BearerToken, eventually};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::service::interceptor::InterceptedService;

/// The tests start ~8 processes each: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CONTROLLERS: usize = 3;
/// (node id, simulated GPUs).
const NODES: [(&str, &str); 2] = [("ha-a", "8xH100-SXM-80GB"), ("ha-b", "8xA100-SXM-80GB")];
/// Exit code of a controller that lost its leadership (controller/src/ha).
const EXIT_LOST_LEADERSHIP: i32 = 3;

/// A running binary; killed if dropped.
struct Daemon {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(program: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
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
        Ok(Self { child, log })
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let pid = self.child.id().context("already exited")?;
        kill(Pid::from_raw(i32::try_from(pid)?), signal)?;
        Ok(())
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

struct Ha {
    dir: tempfile::TempDir,
    etcd: EtcdCluster,
    prefix: String,
    controller_bin: PathBuf,
    agent_bin: PathBuf,
    addrs: Vec<std::net::SocketAddr>,
    controllers: Vec<Option<Daemon>>,
    starts: usize,
    agents: Vec<Daemon>,
    token: String,
}

impl Ha {
    /// None where etcd cannot run (outside CI).
    async fn start() -> anyhow::Result<Option<Self>> {
        let Some(etcd) = gpufleet_tests::etcd::own(3)? else {
            return Ok(None);
        };
        let mut ha = Self {
            dir: tempfile::tempdir()?,
            etcd,
            prefix: gpufleet_tests::etcd::fresh_prefix("ha"),
            controller_bin: gpufleet_tests::workspace_binary("gpufleet-controller")?,
            agent_bin: gpufleet_tests::workspace_binary("gpufleet-agent")?,
            addrs: Vec::new(),
            controllers: Vec::new(),
            starts: 0,
            agents: Vec::new(),
            token: String::new(),
        };
        for index in 0..CONTROLLERS {
            let daemon = ha.spawn_controller("127.0.0.1:0")?;
            let addr = eventually("a controller to bind its listener", || {
                let log = daemon.log.clone();
                async move { Ok(probe::logged_address(&log)) }
            })
            .await
            .with_context(|| tail(&daemon.log))?;
            ha.addrs.push(addr);
            ha.controllers.push(Some(daemon));
            let _ = index;
        }
        ha.wait_leader().await?;
        let token_file = ha.dir.path().join("admin.token");
        ha.token = eventually("the bootstrap admin token", || {
            let path = token_file.clone();
            async move {
                Ok(std::fs::read_to_string(&path)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty()))
            }
        })
        .await?;
        ha.start_agents()?;
        ha.wait_nodes_ready().await?;
        Ok(Some(ha))
    }

    fn spawn_controller(&mut self, listen: &str) -> anyhow::Result<Daemon> {
        let n = self.starts;
        self.starts += 1;
        let data_dir = self.dir.path().join(format!("controller-{n}"));
        let args: Vec<String> = [
            "--listen",
            listen,
            "--log-format",
            "json",
            "--data-dir",
            &data_dir.display().to_string(),
            "--admin-token-file",
            &self.dir.path().join("admin.token").display().to_string(),
            "--metrics-listen",
            "127.0.0.1:0",
            "--join-token",
            gpufleet_tests::JOIN_TOKEN,
            "--store",
            "etcd",
            "--etcd-endpoints",
            &self.etcd.endpoints().join(","),
            "--etcd-prefix",
            &self.prefix,
            "--leader-lease",
            "2s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Daemon::spawn(
            &self.controller_bin,
            &args,
            self.dir.path().join(format!("controller-{n}.log")),
        )
    }

    /// Starts controller `index` again on its address (what systemd's
    /// `Restart=always` does after it exited).
    fn restart_controller(&mut self, index: usize) -> anyhow::Result<()> {
        let daemon = self.spawn_controller(&self.addrs[index].to_string())?;
        self.controllers[index] = Some(daemon);
        Ok(())
    }

    fn controller_list(&self) -> String {
        self.addrs
            .iter()
            .map(|a| format!("http://{a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn start_agents(&mut self) -> anyhow::Result<()> {
        for (id, gpus) in NODES {
            let args: Vec<String> = [
                "--controller",
                &self.controller_list(),
                "--join-token",
                gpufleet_tests::JOIN_TOKEN,
                "--node-id",
                id,
                "--provider",
                "aws",
                "--region",
                "us-east-1",
                "--price-per-gpu-hour",
                "2.0",
                "--gpu-backend",
                "simulated",
                "--simulated-gpus",
                gpus,
                "--data-dir",
                &self.dir.path().join(id).display().to_string(),
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
            let log = self.dir.path().join(format!("agent-{id}.log"));
            self.agents
                .push(Daemon::spawn(&self.agent_bin, &args, log)?);
        }
        Ok(())
    }

    /// The index of the controller that serves (the leader).
    async fn leader(&self) -> Option<usize> {
        for (index, addr) in self.addrs.iter().enumerate() {
            if self.controllers[index].is_some()
                && probe::is_serving(*addr, Duration::from_millis(500)).await
            {
                return Some(index);
            }
        }
        None
    }

    async fn wait_leader(&self) -> anyhow::Result<usize> {
        eventually("a leader among the controllers", || async {
            Ok(self.leader().await)
        })
        .await
        .with_context(|| self.logs())
    }

    /// A connection to the leader, found through the CLI's client library.
    async fn api(&self) -> anyhow::Result<Api> {
        let channel = gpufleet_cli::client::leader_channel(&self.controller_list()).await?;
        let channel = InterceptedService::new(channel, BearerToken::with(&self.token)?);
        Ok(Api {
            jobs: JobsClient::new(channel.clone()),
            usage: UsageClient::new(channel.clone()),
            fleet: FleetClient::new(channel),
        })
    }

    async fn wait_nodes_ready(&self) -> anyhow::Result<()> {
        eventually("both agents connected to the leader and Ready", || async {
            let Ok(mut api) = self.api().await else {
                return Ok(None);
            };
            let Ok(nodes) = api.fleet.list_nodes(ListNodesRequest::default()).await else {
                return Ok(None);
            };
            let ready = nodes
                .into_inner()
                .nodes
                .iter()
                .filter(|n| n.connected && n.state() == NodeState::Ready)
                .count();
            Ok((ready == NODES.len()).then_some(()))
        })
        .await
        .with_context(|| self.logs())
    }

    fn marker(&self) -> PathBuf {
        self.dir.path().join("marker")
    }

    /// A one-GPU job whose workload writes its start and end to the marker.
    fn spec(&self, name: &str) -> JobSpec {
        let script = format!(
            "echo \"start $GPUFLEET_ALLOCATION_ID\" >> {m}; sleep 1; echo \"end $GPUFLEET_ALLOCATION_ID\" >> {m}",
            m = self.marker().display()
        );
        JobSpec {
            name: name.to_string(),
            gpus_per_task: 1,
            workload: Some(WorkloadSpec {
                argv: vec!["sh".into(), "-c".into(), script],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Submits until acknowledged; returns None if the leader did not
    /// answer (the job may or may not exist: not acknowledged).
    async fn try_submit(&self, name: &str) -> Option<Job> {
        let mut api = self.api().await.ok()?;
        api.jobs
            .submit_job(SubmitJobRequest {
                spec: Some(self.spec(name)),
            })
            .await
            .ok()?
            .into_inner()
            .job
    }

    async fn wait_succeeded(&self, ids: &[String]) -> anyhow::Result<Vec<Job>> {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let mut done = Vec::new();
            if let Ok(mut api) = self.api().await {
                for id in ids {
                    let Ok(job) = api.jobs.get_job(GetJobRequest { job_id: id.clone() }).await
                    else {
                        break;
                    };
                    let job = job.into_inner();
                    if matches!(
                        job.state(),
                        JobState::Failed | JobState::Cancelled | JobState::Lost
                    ) {
                        bail!("job {id} ended {:?}: {job:?}", job.state());
                    }
                    if job.state() == JobState::Succeeded {
                        done.push(job);
                    }
                }
            }
            if done.len() == ids.len() {
                return Ok(done);
            }
            ensure!(
                Instant::now() < deadline,
                "{} of {} jobs succeeded within 90s\n{}",
                done.len(),
                ids.len(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every acknowledged job ran once, finished once, and has exactly one
    /// usage record as long as its run.
    async fn verify_once(&self, jobs: &[Job]) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(self.marker()).unwrap_or_default();
        let mut starts: BTreeMap<&str, usize> = BTreeMap::new();
        let mut ends: BTreeMap<&str, usize> = BTreeMap::new();
        for line in text.lines() {
            match line.split_once(' ') {
                Some(("start", id)) => *starts.entry(id).or_default() += 1,
                Some(("end", id)) => *ends.entry(id).or_default() += 1,
                _ => bail!("unexpected marker line {line:?}"),
            }
        }
        let records = self.usage_records().await?;
        let mut by_allocation: BTreeMap<&str, Vec<&UsageRecord>> = BTreeMap::new();
        for record in &records {
            by_allocation
                .entry(record.allocation_id.as_str())
                .or_default()
                .push(record);
        }
        let mut seen = BTreeSet::new();
        for job in jobs {
            ensure!(seen.insert(job.id.clone()), "job {} listed twice", job.id);
            ensure!(job.tasks.len() == 1, "job {}: {:?}", job.id, job.tasks);
            let task = &job.tasks[0];
            let id = task.allocation_id.as_str();
            // A retry's allocation id is `<job>.<task>.<attempt>`.
            ensure!(
                id == format!("{}.0", job.id),
                "job {} ran as {id}: its first run was lost",
                job.id
            );
            ensure!(
                starts.get(id) == Some(&1) && ends.get(id) == Some(&1),
                "allocation {id} started {:?} and ended {:?} times",
                starts.get(id),
                ends.get(id)
            );
            let records = by_allocation.get(id).cloned().unwrap_or_default();
            ensure!(
                records.len() == 1,
                "allocation {id} has {} usage records",
                records.len()
            );
            let record = records[0];
            let ms = |ts: &Option<prost_types::Timestamp>| {
                ts.map(|t| t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000)
            };
            ensure!(
                ms(&record.started_at) == ms(&task.started_at)
                    && ms(&record.ended_at) == ms(&task.finished_at),
                "allocation {id}: usage {:?}..{:?} but the task ran {:?}..{:?}",
                record.started_at,
                record.ended_at,
                task.started_at,
                task.finished_at
            );
            let (Some(start), Some(end)) = (ms(&record.started_at), ms(&record.ended_at)) else {
                bail!("allocation {id}: usage without a start or end");
            };
            ensure!(
                record.gpu_milliseconds == end - start,
                "allocation {id}: {} GPU-ms for a {} ms run on one GPU",
                record.gpu_milliseconds,
                end - start
            );
        }
        Ok(())
    }

    async fn usage_records(&self) -> anyhow::Result<Vec<UsageRecord>> {
        let mut api = self.api().await?;
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = api
                .usage
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

    /// Submits `count` jobs one after the other, calling `during` once
    /// after the `at`-th was acknowledged; returns the acknowledged ones.
    async fn burst(
        &mut self,
        count: usize,
        at: usize,
        during: impl AsyncFnOnce(&mut Self) -> anyhow::Result<()>,
    ) -> anyhow::Result<Vec<String>> {
        let mut acknowledged = Vec::new();
        let mut during = Some(during);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut n = 0;
        while acknowledged.len() < count {
            ensure!(
                Instant::now() < deadline,
                "only {} of {count} submissions acknowledged within 120s\n{}",
                acknowledged.len(),
                self.logs()
            );
            n += 1;
            match self.try_submit(&format!("burst-{n}")).await {
                Some(job) => acknowledged.push(job.id),
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
            if acknowledged.len() == at
                && let Some(during) = during.take()
            {
                during(self).await?;
            }
        }
        Ok(acknowledged)
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for daemon in self.controllers.iter().flatten().chain(&self.agents) {
            out.push_str(&format!(
                "--- {}\n{}\n",
                daemon.log.display(),
                tail(&daemon.log)
            ));
        }
        out
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        for daemon in self.agents.iter().chain(self.controllers.iter().flatten()) {
            let _ = daemon.signal(Signal::SIGTERM);
        }
        for daemon in self
            .agents
            .iter_mut()
            .chain(self.controllers.iter_mut().flatten())
        {
            let _ = tokio::time::timeout(Duration::from_secs(20), daemon.child.wait()).await;
        }
        Ok(())
    }
}

struct Api {
    jobs: JobsClient<Authed>,
    usage: UsageClient<Authed>,
    fleet: FleetClient<Authed>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_sigkilled_during_a_burst_loses_and_repeats_nothing() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut ha) = Ha::start().await? else {
        return Ok(());
    };
    let first = ha.wait_leader().await?;
    let acknowledged = ha
        .burst(30, 10, async |ha: &mut Ha| {
            let leader = ha.controllers[first].as_mut().context("no leader")?;
            leader.signal(Signal::SIGKILL)?;
            leader.child.wait().await?;
            ha.controllers[first] = None;
            Ok(())
        })
        .await?;
    let second = ha.wait_leader().await?;
    ensure!(second != first, "the killed controller still leads");
    // Its supervisor starts it again: it stands by.
    ha.restart_controller(first)?;
    let jobs = ha.wait_succeeded(&acknowledged).await?;
    ha.verify_once(&jobs).await.with_context(|| ha.logs())?;
    ensure!(
        ha.wait_leader().await? == second,
        "the restarted controller took the leadership back"
    );
    ha.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_member_sigkilled_does_not_stop_the_fleet() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut ha) = Ha::start().await? else {
        return Ok(());
    };
    // The first member is the one every controller dials first.
    let acknowledged = ha
        .burst(10, 3, async |ha: &mut Ha| {
            ha.etcd.kill_member(0);
            Ok(())
        })
        .await?;
    let jobs = ha.wait_succeeded(&acknowledged).await?;
    ha.verify_once(&jobs).await.with_context(|| ha.logs())?;
    ha.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_replaced_and_rejoins_as_a_standby() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut ha) = Ha::start().await? else {
        return Ok(());
    };
    let first = ha.wait_leader().await?;
    let before = ha.burst(5, 5, async |_: &mut Ha| Ok(())).await?;
    let paused = ha.controllers[first].as_ref().context("no leader")?;
    paused.signal(Signal::SIGSTOP)?;
    let second = eventually("a standby to take over", || async {
        for (index, addr) in ha.addrs.iter().enumerate() {
            if index != first && probe::is_serving(*addr, Duration::from_millis(500)).await {
                return Ok(Some(index));
            }
        }
        Ok(None)
    })
    .await
    .with_context(|| ha.logs())?;
    let during = ha.burst(5, 5, async |_: &mut Ha| Ok(())).await?;
    let paused = ha.controllers[first].as_mut().context("no paused leader")?;
    paused.signal(Signal::SIGCONT)?;
    let status = tokio::time::timeout(Duration::from_secs(30), paused.child.wait())
        .await
        .context("the old leader did not exit after SIGCONT")??;
    ensure!(
        status.code() == Some(EXIT_LOST_LEADERSHIP),
        "the old leader exited with {status}, not the lost-leadership code\n{}",
        ha.logs()
    );
    ha.restart_controller(first)?;
    let rejoined = ha.addrs[first];
    // It stands by: not serving, naming the leader.
    eventually("the old leader to answer as a standby", || async {
        let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{rejoined}"))
        else {
            return Ok(None);
        };
        let Ok(channel) = endpoint.connect().await else {
            return Ok(None);
        };
        let answer = FleetClient::new(channel)
            .list_nodes(ListNodesRequest::default())
            .await;
        Ok(match answer {
            Err(status) if status.metadata().get("gpufleet-leader").is_some() => Some(()),
            _ => None,
        })
    })
    .await
    .with_context(|| ha.logs())?;
    ensure!(
        ha.wait_leader().await? == second,
        "the leadership moved again"
    );
    let after = ha.burst(5, 5, async |_: &mut Ha| Ok(())).await?;
    let all: Vec<String> = before.into_iter().chain(during).chain(after).collect();
    let jobs = ha.wait_succeeded(&all).await?;
    ha.verify_once(&jobs).await.with_context(|| ha.logs())?;
    ha.stop().await
}
