//! `gpufleet-bench failover`: how long the fleet stops when its leader
//! dies. A local 3-member etcd (tests/etcd/setup.sh), three
//! `gpufleet-controller` processes sharing it (the binaries next to this
//! one), and 100 real agents in this process (simulated GPUs, given all
//! three controllers). Each round SIGKILLs the leader and at that instant
//! submits a job through a client that keeps looking for the leader; the
//! failover time is from the kill to that job running on an agent. The
//! killed controller is started again (as systemd would) before the next
//! round. Every job must succeed on its first run: none lost, none run
//! twice.
//!
//! The reference in the same run is the leader lease itself: no standby
//! may lead before the dead leader's lease lapses, so it is the floor.

use gpufleet_controller::ha::probe;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use clap::Args;
use gpufleet_agent::{AgentConfig, NodeConfig};
use gpufleet_controller::store::etcd::test_cluster::EtcdCluster;
use gpufleet_proto::v1::jobs_client::JobsClient;
use gpufleet_proto::v1::{
    GetJobRequest, JobSpec, JobState, ListNodesRequest, NodeState, SubmitJobRequest, WorkloadSpec,
};
use tokio::net::TcpListener;

use crate::report;

/// The goal: leader death → new jobs running.
const TARGET_FAILOVER: Duration = Duration::from_secs(5);
/// Longest wait for anything in one round before the run is called failed.
const ROUND_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Debug, Args)]
pub struct FailoverArgs {
    /// Agents (one simulated GPU each), in this process.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Leader kills.
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// The controllers' leader_lease.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    lease: Duration,
}

struct Controller {
    child: Option<tokio::process::Child>,
    addr: std::net::SocketAddr,
    log: PathBuf,
}

struct Fleet {
    dir: tempfile::TempDir,
    etcd: EtcdCluster,
    binary: PathBuf,
    lease: Duration,
    controllers: Vec<Controller>,
    starts: usize,
}

pub fn run(args: FailoverArgs) -> anyhow::Result<()> {
    ensure!(
        args.agents > 0 && args.kills > 0,
        "--agents and --kills must be > 0"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(failover(args))
}

async fn failover(args: FailoverArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let binary = exe
        .parent()
        .map(|dir| dir.join("gpufleet-controller"))
        .filter(|path| path.is_file())
        .with_context(|| {
            format!(
                "no gpufleet-controller next to {}; build it with the same profile (cargo build --release -p gpufleet-controller)",
                exe.display()
            )
        })?;
    let etcd = EtcdCluster::start(3).map_err(|e| anyhow!("{e}"))?;
    let mut fleet = Fleet {
        dir: tempfile::tempdir()?,
        etcd,
        binary,
        lease: args.lease,
        controllers: Vec::new(),
        starts: 0,
    };
    for _ in 0..3 {
        let (child, log) = fleet.spawn("127.0.0.1:0")?;
        let addr = wait_for(ROUND_DEADLINE, "a controller to bind", || {
            let log = log.clone();
            async move { Ok(probe::logged_address(&log)) }
        })
        .await?;
        fleet.controllers.push(Controller {
            child: Some(child),
            addr,
            log,
        });
    }
    fleet.leader().await?;
    // The first leader wrote the bootstrap admin token (every controller
    // is given the same --admin-token-file); the bench's clients carry it.
    crate::clients::use_admin_token(fleet.dir.path()).await?;

    let mut agents = Vec::new();
    for n in 0..args.agents {
        let config = fleet.agent_config(n);
        agents.push(
            gpufleet_agent::start(config, Some(TcpListener::bind("127.0.0.1:0").await?)).await?,
        );
    }
    fleet.wait_ready(args.agents).await?;

    let mut rounds = Vec::new();
    for round in 0..args.kills {
        let leader = fleet.leader().await?;
        let killed_at = Instant::now();
        if let Some(child) = fleet.controllers[leader].child.as_mut() {
            child.start_kill()?;
            child.wait().await?;
        }
        fleet.controllers[leader].child = None;
        // Submitted at the instant of the kill: retried until a leader
        // takes it (a refusal or no answer is not an acknowledgement).
        let (job_id, new_leader) = loop {
            ensure!(
                killed_at.elapsed() < ROUND_DEADLINE,
                "no leader took the job within {ROUND_DEADLINE:?}"
            );
            if let Some(found) = fleet.try_submit(round).await {
                break found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let elected = killed_at.elapsed();
        let running = loop {
            ensure!(
                killed_at.elapsed() < ROUND_DEADLINE,
                "job {job_id} did not run within {ROUND_DEADLINE:?}"
            );
            if let Some(state) = fleet.state(new_leader, &job_id).await
                && matches!(state, JobState::Running | JobState::Succeeded)
            {
                break killed_at.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        println!(
            "round {}: leader {} killed; job accepted after {:.2} s, running after {:.2} s",
            round + 1,
            fleet.controllers[leader].addr,
            elected.as_secs_f64(),
            running.as_secs_f64()
        );
        rounds.push((job_id, new_leader, elected, running));
        fleet.restart(leader)?;
        fleet.wait_ready(args.agents).await?;
    }

    // Every round's job ran once and succeeded.
    let leader = fleet.leader().await?;
    for (job_id, _, _, _) in &rounds {
        let job = wait_for(ROUND_DEADLINE, "the failover jobs to end", || async {
            let mut jobs = fleet.jobs(leader).await?;
            let job = jobs
                .get_job(GetJobRequest {
                    job_id: job_id.clone(),
                })
                .await?
                .into_inner();
            Ok(matches!(
                job.state(),
                JobState::Succeeded | JobState::Failed | JobState::Lost | JobState::Cancelled
            )
            .then_some(job))
        })
        .await?;
        ensure!(
            job.state() == JobState::Succeeded,
            "job {job_id} ended {:?}",
            job.state()
        );
        let allocation = job
            .tasks
            .first()
            .map(|t| t.allocation_id.as_str())
            .unwrap_or_default();
        ensure!(
            allocation == format!("{job_id}.0"),
            "job {job_id} needed a second run ({allocation})"
        );
    }
    for agent in agents {
        agent.shutdown().await?;
    }
    for controller in &mut fleet.controllers {
        if let Some(child) = controller.child.as_mut() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    let mut running: Vec<Duration> = rounds.iter().map(|r| r.3).collect();
    running.sort();
    let mut elected: Vec<Duration> = rounds.iter().map(|r| r.2).collect();
    elected.sort();
    let median = |v: &[Duration]| v[v.len() / 2];
    let worst = |v: &[Duration]| v[v.len() - 1];
    println!();
    println!(
        "failover: {} leader SIGKILLs, 3 controllers on a 3-member etcd, {} agents (1 simulated GPU each), leader lease {}",
        rounds.len(),
        args.agents,
        humantime::format_duration(args.lease)
    );
    println!();
    let secs = |d: Duration| format!("{:.2}", d.as_secs_f64());
    report::table(
        &["from the leader's SIGKILL to", "median (s)", "max (s)"],
        &[
            vec![
                "a new leader took a job".into(),
                secs(median(&elected)),
                secs(worst(&elected)),
            ],
            vec![
                "that job running on an agent".into(),
                secs(median(&running)),
                secs(worst(&running)),
            ],
            vec![
                "leader lease (the floor, same run)".into(),
                secs(args.lease),
                secs(args.lease),
            ],
            vec![
                "ratio failover / lease".into(),
                format!(
                    "{:.2}",
                    median(&running).as_secs_f64() / args.lease.as_secs_f64()
                ),
                format!(
                    "{:.2}",
                    worst(&running).as_secs_f64() / args.lease.as_secs_f64()
                ),
            ],
        ],
    );
    println!(
        "goal: failover <= {} s, 0 jobs lost or run twice: {} (max {:.2} s, {} jobs each ran once)",
        TARGET_FAILOVER.as_secs(),
        if worst(&running) <= TARGET_FAILOVER {
            "ok"
        } else {
            "missed"
        },
        worst(&running).as_secs_f64(),
        rounds.len()
    );
    let summary = serde_json::json!({
        "bench": "failover",
        "kills": rounds.len(),
        "agents": args.agents,
        "lease_s": args.lease.as_secs_f64(),
        "elected_median_s": median(&elected).as_secs_f64(),
        "running_median_s": median(&running).as_secs_f64(),
        "running_max_s": worst(&running).as_secs_f64(),
        "jobs_lost": 0,
        "jobs_run_twice": 0,
    });
    println!("{summary}");
    Ok(())
}

impl Fleet {
    fn spawn(&mut self, listen: &str) -> anyhow::Result<(tokio::process::Child, PathBuf)> {
        let n = self.starts;
        self.starts += 1;
        let log = self.dir.path().join(format!("controller-{n}.log"));
        let file = std::fs::File::create(&log)?;
        let lease = humantime::format_duration(self.lease).to_string();
        let data_dir = self.dir.path().join(format!("controller-{n}"));
        let admin = self.dir.path().join("admin.token");
        let endpoints = self.etcd.endpoints().join(",");
        let args: [&str; 20] = [
            "--listen",
            listen,
            "--log-format",
            "json",
            "--data-dir",
            data_dir.to_str().context("data dir is not UTF-8")?,
            "--admin-token-file",
            admin.to_str().context("admin token path is not UTF-8")?,
            "--metrics-listen",
            "127.0.0.1:0",
            "--join-token",
            crate::sim_agent::BENCH_JOIN_TOKEN,
            "--store",
            "etcd",
            "--etcd-endpoints",
            &endpoints,
            "--leader-lease",
            &lease,
            "--rate-limit-per-token",
            "0",
        ];
        let child = tokio::process::Command::new(&self.binary)
            .args(args)
            .env("GPUFLEET_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        Ok((child, log))
    }

    fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        let (child, log) = self.spawn(&self.controllers[index].addr.to_string())?;
        self.controllers[index].child = Some(child);
        self.controllers[index].log = log;
        Ok(())
    }

    fn controller_list(&self) -> String {
        self.controllers
            .iter()
            .map(|c| format!("http://{}", c.addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn agent_config(&self, n: usize) -> AgentConfig {
        let node = NodeConfig {
            address: None,
            id: Some(format!("failover-{n:03}")),
            provider: "local".into(),
            region: "loopback".into(),
            zone: String::new(),
            instance_type: "bench".into(),
            price_per_gpu_hour_usd: 2.0,
            spot: false,
            labels: Default::default(),
        };
        AgentConfig {
            sample_interval: Duration::from_secs(5),
            stop_grace_period: Duration::from_secs(1),
            ..AgentConfig::simulated(
                self.controller_list(),
                crate::sim_agent::BENCH_JOIN_TOKEN,
                node,
                vec!["1xH100-SXM-80GB".into()],
                self.dir.path().join("agents").join(n.to_string()),
            )
        }
    }

    /// The index of the serving controller.
    async fn leader(&self) -> anyhow::Result<usize> {
        wait_for(ROUND_DEADLINE, "a leader", || async {
            for (index, controller) in self.controllers.iter().enumerate() {
                if controller.child.is_some()
                    && probe::is_serving(controller.addr, Duration::from_millis(300)).await
                {
                    return Ok(Some(index));
                }
            }
            Ok(None)
        })
        .await
        .with_context(|| self.logs())
    }

    async fn jobs(&self, index: usize) -> anyhow::Result<JobsClient<crate::clients::Authed>> {
        crate::clients::jobs_client(&format!("http://{}", self.controllers[index].addr)).await
    }

    /// Submits on whichever controller serves; None when none took it.
    async fn try_submit(&self, round: usize) -> Option<(String, usize)> {
        for (index, controller) in self.controllers.iter().enumerate() {
            if controller.child.is_none()
                || !probe::is_serving(controller.addr, Duration::from_millis(300)).await
            {
                continue;
            }
            let mut jobs = self.jobs(index).await.ok()?;
            let spec = JobSpec {
                name: format!("failover-{round}"),
                gpus_per_task: 1,
                workload: Some(WorkloadSpec {
                    argv: vec!["sleep".into(), "1".into()],
                    ..Default::default()
                }),
                ..Default::default()
            };
            if let Ok(answer) = jobs.submit_job(SubmitJobRequest { spec: Some(spec) }).await
                && let Some(job) = answer.into_inner().job
            {
                return Some((job.id, index));
            }
        }
        None
    }

    async fn state(&self, index: usize, job_id: &str) -> Option<JobState> {
        let mut jobs = self.jobs(index).await.ok()?;
        let job = jobs
            .get_job(GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await
            .ok()?
            .into_inner();
        Some(job.state())
    }

    async fn wait_ready(&self, count: usize) -> anyhow::Result<()> {
        wait_for(
            ROUND_DEADLINE,
            "every agent connected and Ready",
            || async {
                let Ok(leader) = self.leader().await else {
                    return Ok(None);
                };
                let Ok(mut fleet) = crate::clients::fleet_client(&format!(
                    "http://{}",
                    self.controllers[leader].addr
                ))
                .await
                else {
                    return Ok(None);
                };
                let Ok(nodes) = fleet.list_nodes(ListNodesRequest::default()).await else {
                    return Ok(None);
                };
                let ready = nodes
                    .into_inner()
                    .nodes
                    .iter()
                    .filter(|n| n.connected && n.state() == NodeState::Ready)
                    .count();
                Ok((ready >= count).then_some(()))
            },
        )
        .await
        .with_context(|| self.logs())
    }

    fn logs(&self) -> String {
        self.controllers
            .iter()
            .map(|c| format!("--- {}\n{}", c.log.display(), tail(&c.log)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

/// Polls `check` until it yields, or fails after `deadline`.
async fn wait_for<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > until {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
