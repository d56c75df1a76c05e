//! Workloads run as the configured unprivileged user when the agent is root.

use std::os::unix::fs::PermissionsExt;

use gpufleet_proto::v1::JobState;
use gpufleet_tests::{Cluster, NodeSpec, job_log};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_run_as_the_configured_user() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(&[]).await?;
    // The unprivileged user must be able to reach its allocation directory.
    std::fs::set_permissions(cluster.dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let node = NodeSpec::new("user-node", "aws", "us-east-1", "2xL4", 1.0);
    let mut config = cluster.agent_config(&node);
    config.workload_user = Some("nobody".into());
    let started = cluster.add_agent_with(config).await;
    if !nix_is_root() {
        // Without root the agent cannot switch users, and says so at start.
        let err = started.expect_err("a non-root agent refuses workload_user");
        assert!(
            err.to_string().contains("needs the agent to run as root"),
            "{err}"
        );
        return cluster.shutdown().await;
    }
    started?;
    cluster.wait_ready(1).await?;
    let job = cluster
        .submit(
            1,
            &[
                "sh",
                "-c",
                "id -u; echo written > \"$HOME/probe\" && cat \"$HOME/probe\"",
            ],
        )
        .await?;
    let job = cluster
        .wait_job(&job.id, "to end", |j| {
            !matches!(
                j.state(),
                JobState::Pending | JobState::Scheduled | JobState::Running
            )
        })
        .await?;
    assert_eq!(job.state(), JobState::Succeeded, "{job:?}");
    let log = job_log(&cluster, &job.id, 0).await?;
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines,
        vec!["65534", "written"],
        "runs as nobody and can write its HOME"
    );
    cluster.shutdown().await
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}
