//! The `gpufleet` binary against a real controller and agents.

use std::process::{Command, Output};

use gpufleet_tests::{Cluster, two_nodes};

/// (controller address, token)
type Target = (String, String);

async fn gpufleet(target: &Target, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gpufleet"));
    command
        .env("GPUFLEET_CONTROLLER", &target.0)
        .env("GPUFLEET_TOKEN", &target.1)
        .args(args);
    tokio::task::spawn_blocking(move || command.output().expect("gpufleet runs"))
        .await
        .expect("join")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_watch_logs_through_the_binary() -> anyhow::Result<()> {
    let cluster = Cluster::start(&two_nodes()).await?;
    let endpoint: Target = (cluster.endpoint(), cluster.admin_token.clone());

    let submitted = gpufleet(
        &endpoint,
        &[
            "jobs",
            "submit",
            "--gpus",
            "2",
            "--",
            "sh",
            "-c",
            "echo $CUDA_VISIBLE_DEVICES",
        ],
    )
    .await;
    assert!(submitted.status.success(), "{}", stderr(&submitted));
    let id = stdout(&submitted).trim().to_string();
    assert!(id.starts_with("job-") && id.len() == 20, "{id:?}");

    let watched = gpufleet(&endpoint, &["jobs", "watch", &id]).await;
    assert!(
        watched.status.success(),
        "watch exits 0 for a succeeded job: {}",
        stderr(&watched)
    );
    assert!(
        stdout(&watched).contains("Succeeded"),
        "{}",
        stdout(&watched)
    );

    let logs = gpufleet(&endpoint, &["jobs", "logs", &id]).await;
    assert!(logs.status.success(), "{}", stderr(&logs));
    let uuids: Vec<String> = stdout(&logs)
        .trim()
        .split(',')
        .map(str::to_string)
        .collect();
    assert_eq!(uuids.len(), 2, "{}", stdout(&logs));
    assert!(uuids.iter().all(|u| u.starts_with("GPU-")));

    let json = gpufleet(&endpoint, &["-o", "json", "jobs", "get", &id]).await;
    let job: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(job["state"], "JOB_STATE_SUCCEEDED");
    assert_eq!(
        job["tasks"][0]["gpuUuids"].as_array().map(Vec::len),
        Some(2)
    );
    let from_log: Vec<&str> = uuids.iter().map(String::as_str).collect();
    let from_job: Vec<&str> = job["tasks"][0]["gpuUuids"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(from_log, from_job);

    let list = gpufleet(&endpoint, &["jobs", "list"]).await;
    assert!(stdout(&list).contains(&id));
    let nodes = gpufleet(&endpoint, &["nodes"]).await;
    assert!(
        stdout(&nodes).contains("node-a") && stdout(&nodes).contains("node-b"),
        "{}",
        stdout(&nodes)
    );
    let capacity = gpufleet(&endpoint, &["capacity", "--by", "generation"]).await;
    assert!(
        stdout(&capacity).contains("Hopper") && stdout(&capacity).contains("Ampere"),
        "{}",
        stdout(&capacity)
    );
    let node = gpufleet(&endpoint, &["nodes", "get", "node-a"]).await;
    assert!(stdout(&node).contains("H100-SXM-80GB"), "{}", stdout(&node));

    // Maintenance and explanations.
    let cordon = gpufleet(
        &endpoint,
        &["nodes", "cordon", "node-b", "--reason", "upgrade"],
    )
    .await;
    assert!(
        cordon.status.success() && stdout(&cordon).contains("node-b cordoned"),
        "{}",
        stderr(&cordon)
    );
    let nodes = gpufleet(&endpoint, &["nodes"]).await;
    assert!(
        stdout(&nodes).contains("Ready,Cordoned"),
        "{}",
        stdout(&nodes)
    );
    let pending = gpufleet(
        &endpoint,
        &[
            "jobs",
            "submit",
            "--gpus",
            "4",
            "--model",
            "A100-SXM-80GB",
            "--",
            "true",
        ],
    )
    .await;
    let pending_id = stdout(&pending).trim().to_string();
    let explain = gpufleet(&endpoint, &["jobs", "explain", &pending_id]).await;
    assert!(explain.status.success(), "{}", stderr(&explain));
    let text = stdout(&explain);
    assert!(
        text.contains("node_not_ready") && text.contains("node-b"),
        "{text}"
    );
    let uncordon = gpufleet(&endpoint, &["nodes", "uncordon", "node-b"]).await;
    assert!(uncordon.status.success());
    let watched = gpufleet(&endpoint, &["jobs", "watch", &pending_id]).await;
    assert!(
        watched.status.success(),
        "runs once the node is back: {}",
        stdout(&watched)
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_exit_non_zero_with_one_clear_line() -> anyhow::Result<()> {
    let cluster = Cluster::start(&two_nodes()).await?;
    let endpoint: Target = (cluster.endpoint(), cluster.admin_token.clone());

    let failed = gpufleet(
        &endpoint,
        &[
            "jobs", "submit", "--wait", "--gpus", "1", "--", "sh", "-c", "exit 4",
        ],
    )
    .await;
    assert_eq!(
        failed.status.code(),
        Some(1),
        "--wait exits with the job's outcome"
    );

    let zero = gpufleet(&endpoint, &["jobs", "submit", "--gpus", "0", "--", "true"]).await;
    assert_eq!(zero.status.code(), Some(1));
    assert!(
        stderr(&zero).contains("spec.gpus_per_task"),
        "{}",
        stderr(&zero)
    );
    assert!(!stderr(&zero).contains("panicked"));

    let generation = gpufleet(
        &endpoint,
        &[
            "jobs",
            "submit",
            "--gpus",
            "1",
            "--generation",
            "fermi",
            "--",
            "true",
        ],
    )
    .await;
    assert!(
        stderr(&generation).contains("accepted: pascal, volta"),
        "{}",
        stderr(&generation)
    );

    let price = gpufleet(
        &endpoint,
        &[
            "jobs",
            "submit",
            "--gpus",
            "1",
            "--max-price",
            "-1",
            "--",
            "true",
        ],
    )
    .await;
    assert!(
        stderr(&price).contains("zero or more"),
        "{}",
        stderr(&price)
    );

    let missing = gpufleet(&endpoint, &["jobs", "get", "job-ffffffffffff"]).await;
    assert!(
        stderr(&missing).contains("does not exist"),
        "{}",
        stderr(&missing)
    );

    let unreachable = gpufleet(&("http://127.0.0.1:1".into(), String::new()), &["nodes"]).await;
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(
        stderr(&unreachable).contains("cannot reach the controller"),
        "{}",
        stderr(&unreachable)
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_a_fleet_and_a_demo_job() -> anyhow::Result<()> {
    let output = gpufleet(
        &("http://unused".into(), String::new()),
        &["dev", "--listen", "127.0.0.1:0", "--exit-after-demo"],
    )
    .await;
    let out = stdout(&output);
    assert!(output.status.success(), "{out}\n{}", stderr(&output));
    assert!(out.contains("7 nodes"), "{out}");
    assert!(out.contains("Succeeded"), "{out}");
    let log_line = out
        .lines()
        .find(|l| l.starts_with("demo: log: hello from"))
        .unwrap_or_default();
    assert_eq!(log_line.matches("GPU-").count(), 2, "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_market_commands() -> anyhow::Result<()> {
    let cluster = Cluster::start(&two_nodes()).await?;
    let endpoint: Target = (cluster.endpoint(), cluster.admin_token.clone());
    let done = gpufleet(
        &endpoint,
        &[
            "jobs", "submit", "--wait", "--gpus", "2", "--class", "training", "--tenant",
            "research", "--", "sleep", "0.2",
        ],
    )
    .await;
    assert!(done.status.success(), "{}", stderr(&done));

    let top = gpufleet(&endpoint, &["usage", "top", "--by", "workload-class"]).await;
    assert!(top.status.success(), "{}", stderr(&top));
    assert!(stdout(&top).contains("training"), "{}", stdout(&top));
    let csv = gpufleet(
        &endpoint,
        &[
            "-o",
            "csv",
            "usage",
            "report",
            "--group-by",
            "tenant,provider",
        ],
    )
    .await;
    let text = stdout(&csv);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("tenant,provider,gpu_hours,cost_usd,share,allocations,mean_sm_util_percent")
    );
    assert!(
        lines
            .next()
            .is_some_and(|l| l.starts_with("research,lambda,")),
        "{text}"
    );
    let records = gpufleet(&endpoint, &["usage", "records"]).await;
    assert!(
        stdout(&records).contains("Succeeded"),
        "{}",
        stdout(&records)
    );
    let by_gen = gpufleet(&endpoint, &["usage", "by-generation", "--since", "1d"]).await;
    assert!(stdout(&by_gen).contains("Ampere"), "{}", stdout(&by_gen));
    let tight = gpufleet(&endpoint, &["market", "tight"]).await;
    assert!(
        tight.status.success() && stdout(&tight).contains("unmet demand"),
        "{}",
        stderr(&tight)
    );
    let bad = gpufleet(
        &endpoint,
        &[
            "market",
            "elasticity",
            "--region",
            "r",
            "--generation",
            "fermi",
        ],
    )
    .await;
    assert!(
        stderr(&bad).contains("accepted: pascal"),
        "{}",
        stderr(&bad)
    );
    let csv_elsewhere = gpufleet(&endpoint, &["-o", "csv", "nodes"]).await;
    assert!(
        stderr(&csv_elsewhere).contains("-o csv is available for"),
        "{}",
        stderr(&csv_elsewhere)
    );
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_through_the_binary() -> anyhow::Result<()> {
    let cluster = Cluster::start(&two_nodes()).await?;
    let admin: Target = (cluster.endpoint(), cluster.admin_token.clone());

    // No token: refused, with the way out in the message.
    let anonymous = gpufleet(&(cluster.endpoint(), String::new()), &["nodes"]).await;
    assert_eq!(anonymous.status.code(), Some(1));
    assert!(
        stderr(&anonymous).contains("Unauthenticated") && stderr(&anonymous).contains("--token"),
        "{}",
        stderr(&anonymous)
    );

    let created = gpufleet(
        &admin,
        &[
            "tokens",
            "create",
            "--name",
            "ci-team-a",
            "--role",
            "submitter",
            "--tenant",
            "team-a",
        ],
    )
    .await;
    assert!(created.status.success(), "{}", stderr(&created));
    let token = stdout(&created).trim().to_string();
    assert!(token.starts_with("gft_"), "{token:?}");
    let submitter: Target = (cluster.endpoint(), token);

    let whoami = gpufleet(&submitter, &["tokens", "whoami"]).await;
    assert!(
        stdout(&whoami).contains("ci-team-a") && stdout(&whoami).contains("Submitter"),
        "{}",
        stdout(&whoami)
    );
    // A submitter cannot manage tokens or cordon nodes.
    let list = gpufleet(&submitter, &["tokens", "list"]).await;
    assert!(
        stderr(&list).contains("PermissionDenied"),
        "{}",
        stderr(&list)
    );
    let cordon = gpufleet(&submitter, &["nodes", "cordon", "node-a"]).await;
    assert!(
        stderr(&cordon).contains("PermissionDenied"),
        "{}",
        stderr(&cordon)
    );
    // Its jobs are accounted to its tenant.
    let submitted = gpufleet(&submitter, &["jobs", "submit", "--gpus", "1", "--", "true"]).await;
    assert!(submitted.status.success(), "{}", stderr(&submitted));
    let id = stdout(&submitted).trim().to_string();
    let job = gpufleet(&admin, &["-o", "json", "jobs", "get", &id]).await;
    assert!(stdout(&job).contains("team-a"), "{}", stdout(&job));

    let listed = gpufleet(&admin, &["-o", "json", "tokens", "list"]).await;
    let listed: serde_json::Value = serde_json::from_str(&stdout(&listed))?;
    let id = listed["tokens"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "ci-team-a"))
        .and_then(|t| t["id"].as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("ci-team-a not listed: {listed}"))?;
    let revoked = gpufleet(&admin, &["tokens", "revoke", &id]).await;
    assert!(revoked.status.success(), "{}", stderr(&revoked));
    let after = gpufleet(&submitter, &["nodes"]).await;
    assert!(stderr(&after).contains("revoked"), "{}", stderr(&after));
    cluster.shutdown().await
}
