//! A fleet replays its own history: jobs run on a real controller with a
//! simulated agent, `gpufleet usage export` writes their ledger records
//! with the jobs' requests, `gpufleet -o json nodes list` the fleet, and
//! `gpufleet simulate --history … --fleet …` replays them, what-if edits
//! included.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use gpufleet_tests::{Cluster, NodeSpec};

/// (controller address, token)
type Target = (String, String);

async fn gpufleet(target: &Target, args: Vec<String>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gpufleet"));
    command
        .env("GPUFLEET_CONTROLLER", &target.0)
        .env("GPUFLEET_TOKEN", &target.1)
        .args(args);
    tokio::task::spawn_blocking(move || command.output().expect("gpufleet runs"))
        .await
        .expect("join")
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn submit(target: &Target, extra: &[&str]) -> anyhow::Result<String> {
    let mut all = args(&["jobs", "submit"]);
    all.extend(args(extra));
    let out = gpufleet(target, all).await;
    anyhow::ensure!(out.status.success(), "submit: {}", text(&out.stderr));
    Ok(text(&out.stdout).trim().to_string())
}

/// Polls `jobs get` until the job's state is `state`, for at most 60 s.
async fn until_state(target: &Target, id: &str, state: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = gpufleet(target, args(&["-o", "json", "jobs", "get", id])).await;
        anyhow::ensure!(out.status.success(), "get: {}", text(&out.stderr));
        let job: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        if job["state"] == state {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{id} never {state}: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_export_replays_through_simulate_history() -> anyhow::Result<()> {
    let nodes = [NodeSpec::new(
        "node-a",
        "aws",
        "us-east-1",
        "2xH100-SXM-80GB",
        2.0,
    )];
    let cluster = Cluster::start(&nodes).await?;
    let target: Target = (cluster.endpoint(), cluster.admin_token.clone());
    // A holds both GPUs for 5 s; B (pinned to the model) and C (half a
    // GPU) are submitted while it runs, so they wait for it.
    let a = submit(&target, &["--gpus", "2", "--", "sleep", "5"]).await?;
    until_state(&target, &a, "JOB_STATE_RUNNING").await?;
    let b = submit(
        &target,
        &[
            "--gpus",
            "1",
            "--model",
            "H100-SXM-80GB",
            "--priority",
            "3",
            "--",
            "true",
        ],
    )
    .await?;
    let c = submit(&target, &["--gpu-share", "500", "--", "true"]).await?;
    for id in [&a, &b, &c] {
        until_state(&target, id, "JOB_STATE_SUCCEEDED").await?;
    }

    let dir = tempfile::tempdir()?;
    let history = dir.path().join("history.jsonl");
    let fleet = dir.path().join("fleet.json");
    let out = gpufleet(
        &target,
        vec![
            "usage".into(),
            "export".into(),
            "--since".into(),
            "1h".into(),
            "--out".into(),
            history.to_string_lossy().into_owned(),
        ],
    )
    .await;
    anyhow::ensure!(out.status.success(), "export: {}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("3 records written"),
        "{}",
        text(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&history)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 3);
    let record_b = lines
        .iter()
        .find(|r| r["jobId"] == b.as_str())
        .expect("B's record");
    assert_eq!(record_b["jobConstraints"]["models"][0], "H100-SXM-80GB");
    assert_eq!(record_b["jobGpusPerTask"], 1);
    assert_eq!(record_b["jobPriority"], 3);
    assert_eq!(record_b["jobTasks"], 1);
    let submitted = humantime::parse_rfc3339(record_b["jobSubmittedAt"].as_str().unwrap_or(""))?;
    let started = humantime::parse_rfc3339(record_b["startedAt"].as_str().unwrap_or(""))?;
    assert!(submitted < started, "B waited for A: {record_b}");

    let out = gpufleet(&target, args(&["-o", "json", "nodes", "list"])).await;
    anyhow::ensure!(out.status.success(), "nodes: {}", text(&out.stderr));
    std::fs::write(&fleet, &out.stdout)?;
    cluster.shutdown().await?;

    let simulate = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
            .args([
                "-o",
                "json",
                "simulate",
                "--policy",
                "cost,pack",
                "--history",
            ])
            .arg(&history)
            .arg("--fleet")
            .arg(&fleet)
            .args(extra)
            .output()
            .expect("gpufleet runs");
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let replay = simulate(&[]);
    assert_eq!(replay["workload"]["gpus"], 2);
    assert_eq!(
        replay["notes"][0],
        "history: 3 records of 3 jobs, replayed as 3 tasks"
    );
    for p in replay["policies"].as_array().expect("policies") {
        assert_eq!(p["placed"], 3, "{p}");
        // B and C waited for A's 5 s, as they did live.
        assert!(p["wait"]["p99_s"].as_u64() >= Some(1), "{p}");
    }
    // Two more GPUs: nobody would have waited.
    let more = simulate(&["--add", "2xH100-SXM-80GB@aws/us-east-1:2"]);
    for p in more["policies"].as_array().expect("policies") {
        assert_eq!(p["wait"]["p99_s"], 0, "{p}");
    }
    Ok(())
}
