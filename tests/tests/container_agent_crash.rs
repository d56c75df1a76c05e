//! An image job through the real binaries: `gpufleet-controller`,
//! `gpufleet-agent` with its oci runtime on real podman, and the
//! `gpufleet` CLI (`jobs submit --image … -- CMD`). The agent is
//! SIGKILLed while the container runs; the restarted agent re-adopts it
//! and the job still ends exactly once, its container removed.
//!
//! Needs podman (tests/podman/setup.sh, see `podman_ready`) and the
//! binaries: `cargo test --workspace` builds them; with `-p`, run
//! `cargo build -p gpufleet-agent -p gpufleet-controller -p gpufleet-cli`
//! first.

use std::io::BufRead;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, bail};
use gpufleet_proto::v1::{
    GetJobRequest, Job, JobState, ListNodesRequest, WatchJobRequest, WorkloadState,
};
use gpufleet_tests::podman::{ContainerGuard, TEST_IMAGE, containers_of, podman_ready};
use gpufleet_tests::{JOIN_TOKEN, eventually, workspace_binary};
use tokio::process::{Child, Command};
use tokio_stream::StreamExt;

/// The controller binary on 127.0.0.1:0; its address is read from its
/// "controller serving" log line (JSON logs on stderr, copied to a file).
async fn start_controller(dir: &Path) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(workspace_binary("gpufleet-controller")?)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("controller"))
        .args(["--log-format", "json", "--join-token", JOIN_TOKEN])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start gpufleet-controller")?;
    let stderr = child.stderr.take().context("no stderr")?.into_owned_fd()?;
    let log = dir.join("controller.log");
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    // Reads the address, then keeps draining so the controller never
    // blocks on a full pipe.
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
            if entry["fields"]["message"] == "controller serving"
                && let (Some(tx), Some(addr)) =
                    (addr_tx.take(), entry["fields"]["local_addr"].as_str())
            {
                let _ = tx.send(addr.to_string());
            }
        }
    });
    let addr = tokio::time::timeout(gpufleet_tests::DEADLINE, addr_rx)
        .await
        .context("the controller did not log its address in time")?
        .context("the controller exited before serving")?;
    Ok((child, format!("http://{addr}")))
}

/// The agent binary with its oci runtime, 2 simulated L4s, mounts allowed
/// under `dir/gate`. Output goes to a file per run.
fn start_agent(dir: &Path, endpoint: &str, run: u32) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join(format!("agent-{run}.log")))?;
    Command::new(workspace_binary("gpufleet-agent")?)
        .args(["--controller", endpoint, "--node-id", "oci-crash-node"])
        .args(["--join-token", JOIN_TOKEN])
        .args(["--gpu-backend", "simulated", "--simulated-gpus", "2xL4"])
        .arg("--data-dir")
        .arg(dir.join("agent"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args(["--read-kmsg", "false", "--sample-interval", "200ms"])
        .args(["--stop-grace-period", "2s", "--oci-enabled", "true"])
        .arg("--oci-allowed-mounts")
        .arg(dir.join("gate"))
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("cannot start gpufleet-agent")
}

/// `gpufleet <args>` against the controller; its stdout.
async fn cli(endpoint: &str, token: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(workspace_binary("gpufleet")?)
        .args(["--controller", endpoint, "--token", token])
        .args(args)
        .output()
        .await
        .context("cannot run gpufleet")?;
    if !output.status.success() {
        bail!(
            "gpufleet {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

async fn get_job(endpoint: &str, token: &str, id: &str) -> anyhow::Result<Job> {
    Ok(gpufleet_tests::jobs_client(endpoint, token)
        .await?
        .get_job(GetJobRequest {
            job_id: id.to_string(),
        })
        .await?
        .into_inner())
}

async fn wait_oci_node(endpoint: &str, token: &str) -> anyhow::Result<()> {
    eventually("the agent to be connected with its oci runtime", || async {
        let Ok(mut fleet) = gpufleet_tests::fleet_client(endpoint, token).await else {
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
                        .is_some_and(|i| i.runtimes.iter().any(|r| r == "oci"))
            })
            .then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_agent_re_adopts_its_container_and_the_job_ends_once() -> anyhow::Result<()> {
    if !podman_ready("a_sigkilled_agent_re_adopts_its_container_and_the_job_ends_once")? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let gate = dir.join("gate");
    std::fs::create_dir(&gate)?;
    std::fs::create_dir(dir.join("agent"))?;
    let _guard = ContainerGuard::new(&dir.join("agent"));
    let (_controller, endpoint) = start_controller(dir).await?;
    let token = gpufleet_tests::admin_token_in(&dir.join("controller"))?;
    let mut agent = start_agent(dir, &endpoint, 1)?;
    wait_oci_node(&endpoint, &token).await?;

    // Records each run, waits for the gate, then exits 0.
    let script = "echo run >> /gate/runs; echo started; \
                  while [ ! -f /gate/go ]; do sleep 0.05; done; echo released";
    let mount = format!("{}:/gate", gate.display());
    let submitted = cli(
        &endpoint,
        &token,
        &[
            "jobs", "submit", "--gpus", "1", "--image", TEST_IMAGE, "--pull", "never", "--mount",
            &mount, "--", "sh", "-c", script,
        ],
    )
    .await?;
    let id = submitted
        .split_whitespace()
        .find(|w| w.starts_with("job-"))
        .with_context(|| format!("no job id in {submitted:?}"))?
        .to_string();
    // Every task state the controller publishes, in order.
    let watch = {
        let (endpoint, token, id) = (endpoint.clone(), token.clone(), id.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let Ok(mut jobs) = gpufleet_tests::jobs_client(&endpoint, &token).await else {
                return seen;
            };
            let Ok(stream) = jobs.watch_job(WatchJobRequest { job_id: id }).await else {
                return seen;
            };
            let mut stream = stream.into_inner();
            while let Some(Ok(job)) = stream.next().await {
                if let Some(task) = job.tasks.first()
                    && seen.last() != Some(&task.state())
                {
                    seen.push(task.state());
                }
                if gpufleet_core::is_terminal_job(job.state()) {
                    break;
                }
            }
            seen
        })
    };
    eventually("the container to run", || async {
        let job = get_job(&endpoint, &token, &id).await?;
        let runs = std::fs::read_to_string(gate.join("runs")).unwrap_or_default();
        Ok((job.state() == JobState::Running && runs.lines().count() == 1).then_some(job))
    })
    .await?;
    let allocation = format!("{id}.0");

    // The crash: the container outlives the agent.
    agent.start_kill()?;
    let status = agent.wait().await?;
    if status.code().is_some() {
        bail!("the agent should have died of SIGKILL, not {status}");
    }
    assert_eq!(
        containers_of(&allocation)?.len(),
        1,
        "the container outlives the agent"
    );

    let _agent = start_agent(dir, &endpoint, 2)?;
    wait_oci_node(&endpoint, &token).await?;
    std::fs::write(gate.join("go"), b"")?;
    let job = eventually("the job to end", || async {
        let job = get_job(&endpoint, &token, &id).await?;
        Ok(gpufleet_core::is_terminal_job(job.state()).then_some(job))
    })
    .await?;
    let states = watch.await?;
    let log = cli(&endpoint, &token, &["jobs", "logs", &id]).await?;
    let agent_log = std::fs::read_to_string(dir.join("agent-2.log")).unwrap_or_default();
    assert_eq!(
        job.state(),
        JobState::Succeeded,
        "{job:?}\n{log}\nagent:\n{agent_log}"
    );
    // Ran once, ended once, never lost on the way.
    let runs = std::fs::read_to_string(gate.join("runs"))?;
    assert_eq!(runs.lines().count(), 1, "{runs}");
    assert!(!states.contains(&WorkloadState::Lost), "{states:?}");
    assert_eq!(
        states
            .iter()
            .filter(|s| **s == WorkloadState::Succeeded)
            .count(),
        1,
        "{states:?}"
    );
    assert!(log.contains("started") && log.contains("released"), "{log}");
    eventually("the container to be removed", || async {
        Ok(containers_of(&allocation)?.is_empty().then_some(()))
    })
    .await?;
    Ok(())
}
