//! An agent SIGKILLed while its workloads run: the real `gpufleet-controller`
//! and `gpufleet-agent` binaries as separate processes, simulated GPUs.
//! The restarted agent re-adopts the workloads, which finish normally and
//! run once; a workload that ended while the agent was down is reported
//! with its real exit code, one whose shim was killed as lost; the
//! controller sees every transition (no task ever Lost by mistake).
//!
//! Needs the binaries built: `cargo test --workspace` builds them (the
//! agent and controller packages have tests of their own); with `-p`, run
//! `cargo build -p gpufleet-agent -p gpufleet-controller` first.

use std::collections::HashMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, bail, ensure};
use gpufleet_proto::v1::fleet_client::FleetClient;
use gpufleet_proto::v1::jobs_client::JobsClient;
use gpufleet_proto::v1::{
    GetJobRequest, Job, JobSpec, JobState, ListNodesRequest, SubmitJobRequest, WatchJobRequest,
    WorkloadSpec, WorkloadState,
};
use gpufleet_tests::{Authed, JOIN_TOKEN, eventually, workspace_binary};
use tokio::process::{Child, Command};
use tokio_stream::StreamExt;

/// Seconds after which a gated workload gives up on its gate, so a failed
/// test leaves nothing running for long.
const GATE_TIMEOUT_TICKS: u32 = 2400; // × 0.05 s = 120 s

/// Each controller's bootstrap admin token, by endpoint, read once it
/// serves.
static ADMIN_TOKENS: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

fn admin_token(endpoint: &str) -> anyhow::Result<String> {
    ADMIN_TOKENS
        .lock()
        .map_err(|_| anyhow::anyhow!("token table poisoned"))?
        .iter()
        .find(|(e, _)| e == endpoint)
        .map(|(_, t)| t.clone())
        .with_context(|| format!("no controller started at {endpoint}"))
}

async fn jobs_client(endpoint: &str) -> anyhow::Result<JobsClient<Authed>> {
    gpufleet_tests::jobs_client(endpoint, &admin_token(endpoint)?).await
}

async fn fleet_client(endpoint: &str) -> anyhow::Result<FleetClient<Authed>> {
    gpufleet_tests::fleet_client(endpoint, &admin_token(endpoint)?).await
}

/// The controller binary on 127.0.0.1:0; its address and its /metrics
/// address are read from its "controller serving" log line. Its log is
/// copied to a file.
async fn start_controller(dir: &Path) -> anyhow::Result<(Child, String, SocketAddr)> {
    let mut child = Command::new(workspace_binary("gpufleet-controller")?)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("controller"))
        .args(["--log-format", "json", "--join-token", JOIN_TOKEN])
        // It logs to stderr.
        .stdout(Stdio::from(std::fs::File::create(
            dir.join("controller.stdout"),
        )?))
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start gpufleet-controller")?;
    let stderr = child.stderr.take().context("no stdout")?.into_owned_fd()?;
    let log = dir.join("controller.log");
    let log_path = log.clone();
    // Reads the address, then keeps draining so the controller never blocks
    // on a full pipe.
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut addr_tx = Some(addr_tx);
        let mut out = std::fs::File::create(log).ok();
        for line in std::io::BufReader::new(std::fs::File::from(stderr))
            .lines()
            .map_while(Result::ok)
        {
            if let Some(out) = out.as_mut() {
                use std::io::Write;
                let _ = writeln!(out, "{line}");
            }
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let fields = &entry["fields"];
            if fields["message"] == "controller serving"
                && let (Some(tx), Some(addr), Some(metrics)) = (
                    addr_tx.take(),
                    fields["local_addr"].as_str(),
                    fields["metrics"].as_str(),
                )
            {
                let _ = tx.send((addr.to_string(), metrics.to_string()));
            }
        }
    });
    let (addr, metrics) = match tokio::time::timeout(gpufleet_tests::DEADLINE, addr_rx).await {
        Ok(Ok(addrs)) => addrs,
        outcome => {
            let stderr = std::fs::read_to_string(&log_path).unwrap_or_default();
            let stdout = std::fs::read_to_string(dir.join("controller.stdout")).unwrap_or_default();
            let why = if outcome.is_err() {
                "did not log its address in time"
            } else {
                "exited before serving"
            };
            bail!("the controller {why}; stdout:\n{stdout}\nstderr:\n{stderr}");
        }
    };
    let endpoint = format!("http://{addr}");
    let token = gpufleet_tests::admin_token_in(&dir.join("controller"))?;
    ADMIN_TOKENS
        .lock()
        .map_err(|_| anyhow::anyhow!("token table poisoned"))?
        .push((endpoint.clone(), token));
    let metrics: SocketAddr = metrics
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .parse()
        .with_context(|| format!("unexpected metrics address {metrics:?}"))?;
    Ok((child, endpoint, metrics))
}

/// The agent binary: 4 simulated L4s, local API on 127.0.0.1:0, no
/// /metrics. Output goes to a file per run.
fn start_agent(dir: &Path, endpoint: &str, run: u32) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(format!("agent-{run}.log")))?;
    Command::new(workspace_binary("gpufleet-agent")?)
        .args(["--controller", endpoint, "--node-id", "crash-node"])
        .args(["--join-token", JOIN_TOKEN])
        .args(["--gpu-backend", "simulated", "--simulated-gpus", "4xL4"])
        .arg("--data-dir")
        .arg(dir.join("agent"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args(["--read-kmsg", "false", "--sample-interval", "200ms"])
        .args(["--stop-grace-period", "2s"])
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("cannot start gpufleet-agent")
}

async fn wait_connected(endpoint: &str) -> anyhow::Result<()> {
    eventually("the agent to be connected", || async {
        let Ok(mut fleet) = fleet_client(endpoint).await else {
            return Ok(None);
        };
        let nodes = fleet
            .list_nodes(ListNodesRequest::default())
            .await?
            .into_inner()
            .nodes;
        Ok(nodes
            .iter()
            .any(|n| {
                n.connected
                    && n.identity
                        .as_ref()
                        .is_some_and(|i| i.node_id == "crash-node")
            })
            .then_some(()))
    })
    .await
}

/// A workload that records each run (its pid and its parent's, the shim)
/// in `<dir>/<name>.runs`, waits for `<dir>/<name>.go`, then exits `code`.
fn gated_job(dir: &Path, name: &str, code: i32) -> JobSpec {
    let base = dir.join(name);
    let base = base.display();
    let script = format!(
        "echo $$ $PPID >> {base}.runs; i=0; \
         while [ ! -f {base}.go ] && [ $i -lt {GATE_TIMEOUT_TICKS} ]; do sleep 0.05; i=$((i+1)); done; \
         echo released; exit {code}"
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

/// (workload pid, shim pid) of each run so far.
fn runs(dir: &Path, name: &str) -> Vec<(u32, u32)> {
    std::fs::read_to_string(dir.join(format!("{name}.runs")))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (pid, ppid) = l.split_once(' ')?;
            Some((pid.parse().ok()?, ppid.parse().ok()?))
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .is_some_and(|i| !s[i + 1..].trim_start().starts_with('Z'))
    })
}

fn release(dir: &Path, name: &str) -> anyhow::Result<()> {
    std::fs::write(dir.join(format!("{name}.go")), b"")?;
    Ok(())
}

/// Every task state the controller published for a job, in order.
fn watch_states(endpoint: String, job_id: String) -> tokio::task::JoinHandle<Vec<WorkloadState>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let Ok(mut jobs) = jobs_client(&endpoint).await else {
            return seen;
        };
        let Ok(stream) = jobs.watch_job(WatchJobRequest { job_id }).await else {
            return seen;
        };
        let mut stream = stream.into_inner();
        while let Some(Ok(job)) = stream.next().await {
            if let Some(task) = job.tasks.first()
                && seen.last() != Some(&task.state())
            {
                seen.push(task.state());
            }
            if matches!(
                job.state(),
                JobState::Succeeded | JobState::Failed | JobState::Lost
            ) {
                break;
            }
        }
        seen
    })
}

async fn get_job(endpoint: &str, id: &str) -> anyhow::Result<Job> {
    Ok(jobs_client(endpoint)
        .await?
        .get_job(GetJobRequest {
            job_id: id.to_string(),
        })
        .await?
        .into_inner())
}

async fn wait_job_end(endpoint: &str, id: &str) -> anyhow::Result<Job> {
    eventually(&format!("job {id} to end"), || async {
        let job = get_job(endpoint, id).await?;
        Ok(matches!(
            job.state(),
            JobState::Succeeded | JobState::Failed | JobState::Lost
        )
        .then_some(job))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_agent_re_adopts_its_workloads_and_loses_no_status() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let (mut controller, endpoint, _) = start_controller(dir).await?;
    let mut agent = start_agent(dir, &endpoint, 1)?;
    wait_connected(&endpoint).await?;

    // ok: re-adopted, exits 0. failing: re-adopted, exits 3. ended: exits
    // 4 while the agent is down. orphaned: re-adopted, then the dead
    // agent's shim host, which still serves it, is killed.
    let names = [("ok", 0), ("failing", 3), ("ended", 4), ("orphaned", 0)];
    let mut jobs = jobs_client(&endpoint).await?;
    let mut ids = HashMap::new();
    let mut watches = HashMap::new();
    for (name, code) in names {
        let job = jobs
            .submit_job(SubmitJobRequest {
                spec: Some(gated_job(dir, name, code)),
            })
            .await?
            .into_inner()
            .job
            .context("no job in the answer")?;
        watches.insert(name, watch_states(endpoint.clone(), job.id.clone()));
        ids.insert(name, job.id);
    }
    for (name, _) in names {
        eventually(&format!("{name} to run"), || async {
            let job = get_job(&endpoint, &ids[name]).await?;
            let running = job
                .tasks
                .first()
                .is_some_and(|t| t.state() == WorkloadState::Running);
            Ok((running && runs(dir, name).len() == 1).then_some(()))
        })
        .await?;
    }

    // The crash.
    agent.start_kill()?;
    let status = agent.wait().await?;
    if status.code().is_some() {
        bail!("the agent should have died of SIGKILL, not {status}");
    }
    for (name, _) in names {
        let (pid, _) = runs(dir, name)[0];
        assert!(alive(pid), "{name} outlives the agent");
    }
    // While the agent is down, one workload ends.
    release(dir, "ended")?;
    let (ended_pid, _) = runs(dir, "ended")[0];
    eventually("the ended workload to exit", || async {
        Ok((!alive(ended_pid)).then_some(()))
    })
    .await?;

    let mut agent = start_agent(dir, &endpoint, 2)?;
    wait_connected(&endpoint).await?;
    release(dir, "ok")?;
    release(dir, "failing")?;

    let ok = wait_job_end(&endpoint, &ids["ok"]).await?;
    assert_eq!(ok.state(), JobState::Succeeded, "{ok:?}");
    assert_eq!(ok.tasks[0].exit_code, Some(0));
    let failing = wait_job_end(&endpoint, &ids["failing"]).await?;
    assert_eq!(failing.state(), JobState::Failed, "{failing:?}");
    assert_eq!(failing.tasks[0].exit_code, Some(3));
    assert_eq!(failing.exit_code, Some(3));
    let ended = wait_job_end(&endpoint, &ids["ended"]).await?;
    assert_eq!(ended.state(), JobState::Failed, "{ended:?}");
    assert_eq!(ended.tasks[0].exit_code, Some(4), "the real exit code");
    // The dead agent's shim host still serves `orphaned` (the restarted
    // agent started a host of its own); it dies now.
    let (orphan_pid, old_host) = runs(dir, "orphaned")[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(old_host)?),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let orphaned = wait_job_end(&endpoint, &ids["orphaned"]).await?;
    assert_eq!(orphaned.state(), JobState::Lost, "{orphaned:?}");
    assert!(
        orphaned.tasks[0].message.contains("shim"),
        "{}",
        orphaned.tasks[0].message
    );
    eventually("the orphaned workload to be killed", || async {
        Ok((!alive(orphan_pid)).then_some(()))
    })
    .await?;

    for (name, _) in names {
        let job = get_job(&endpoint, &ids[name]).await?;
        assert_eq!(runs(dir, name).len(), 1, "{name} ran exactly once");
        assert_eq!(job.attempt, 0, "{name} was never requeued: {job:?}");
        assert!(job.history.is_empty(), "{name}: {:?}", job.history);
        let states = watches
            .remove(name)
            .context("no watch")?
            .await
            .context("watch task")?;
        let want_end = match name {
            "ok" => WorkloadState::Succeeded,
            "orphaned" => WorkloadState::Lost,
            _ => WorkloadState::Failed,
        };
        // Running, then straight to the real outcome: nothing in between
        // (in particular no Lost while the agent was away).
        assert_eq!(states.last(), Some(&want_end), "{name}: {states:?}");
        let from_running: Vec<_> = states
            .iter()
            .skip_while(|s| **s != WorkloadState::Running)
            .collect();
        assert_eq!(
            from_running,
            [&WorkloadState::Running, &want_end],
            "{name}: {states:?}"
        );
    }

    // A clean stop still stops what runs; nothing is left.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agent.id().context("agent pid")?)?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = agent.wait().await?;
    assert!(status.success(), "clean agent stop: {status}");
    controller.start_kill()?;
    controller.wait().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanly_stopped_agent_leaves_workloads_running_and_re_adopts_them() -> anyhow::Result<()>
{
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let (mut controller, endpoint, metrics) = start_controller(dir).await?;
    let mut agent = start_agent(dir, &endpoint, 1)?;
    wait_connected(&endpoint).await?;
    // The binary counts its live heap and exports it next to its RSS.
    let scrape = gpufleet_tests::http_get(metrics, "/metrics").await?;
    let heap: f64 = scrape
        .lines()
        .find_map(|line| line.strip_prefix("gpufleet_controller_heap_bytes "))
        .with_context(|| format!("no gpufleet_controller_heap_bytes in:\n{scrape}"))?
        .trim()
        .parse()?;
    ensure!(
        heap > 1_048_576.0,
        "a serving controller's heap is {heap} bytes"
    );
    let job = jobs_client(&endpoint)
        .await?
        .submit_job(SubmitJobRequest {
            spec: Some(gated_job(dir, "upgrade", 0)),
        })
        .await?
        .into_inner()
        .job
        .context("no job in the answer")?;
    eventually("the job to run", || async {
        let job = get_job(&endpoint, &job.id).await?;
        let running = job
            .tasks
            .first()
            .is_some_and(|t| t.state() == WorkloadState::Running);
        Ok((running && runs(dir, "upgrade").len() == 1).then_some(()))
    })
    .await?;

    // An agent upgrade or `systemctl restart`: SIGTERM, a clean exit.
    let pid = agent.id().context("the agent has no pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = agent.wait().await?;
    assert_eq!(status.code(), Some(0), "a clean exit: {status}");
    let (workload, _) = runs(dir, "upgrade")[0];
    assert!(alive(workload), "the workload outlives a clean agent stop");

    let mut agent = start_agent(dir, &endpoint, 2)?;
    wait_connected(&endpoint).await?;
    release(dir, "upgrade")?;
    let done = wait_job_end(&endpoint, &job.id).await?;
    assert_eq!(done.state(), JobState::Succeeded, "{done:?}");
    assert_eq!(done.tasks[0].exit_code, Some(0));
    assert_eq!(runs(dir, "upgrade").len(), 1, "ran exactly once");
    assert_eq!(done.attempt, 0);

    agent.start_kill()?;
    agent.wait().await?;
    controller.start_kill()?;
    controller.wait().await?;
    Ok(())
}
