//! Shares of one GPU through the `gpufleet` binary, a real controller and a
//! simulated agent: two `--gpu-share 500` jobs run on the same GPU at once,
//! a third share that does not fit waits with its reason, and the ledger
//! bills each half as half a GPU.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use gpufleet_tests::{Cluster, NodeSpec};

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

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn submit(target: &Target, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["jobs", "submit"];
    all.extend_from_slice(args);
    let out = gpufleet(target, &all).await;
    anyhow::ensure!(out.status.success(), "submit: {}", text(&out.stderr));
    Ok(text(&out.stdout).trim().to_string())
}

async fn job(target: &Target, id: &str) -> anyhow::Result<serde_json::Value> {
    let out = gpufleet(target, &["-o", "json", "jobs", "get", id]).await;
    anyhow::ensure!(out.status.success(), "get: {}", text(&out.stderr));
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Polls `jobs get` until `done` holds, for at most 60 s.
async fn until(
    target: &Target,
    id: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = job(target, id).await?;
        if done(&j) {
            return Ok(j);
        }
        anyhow::ensure!(Instant::now() < deadline, "{id} never {what}: {j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A uint64 in protobuf's JSON (a string) or a small number.
fn number(v: &serde_json::Value) -> u64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_u64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_halves_share_one_gpu_and_are_billed_as_halves() -> anyhow::Result<()> {
    let nodes = [NodeSpec::new(
        "node-a",
        "aws",
        "us-east-1",
        "1xH100-SXM-80GB",
        2.0,
    )];
    let cluster = Cluster::start(&nodes).await?;
    let target: Target = (cluster.endpoint(), cluster.admin_token.clone());
    // The halves hold their GPU until the test lets them go.
    let gate = cluster.dir.path().join("go");
    let gate = gate.to_string_lossy().to_string();
    let script = format!("echo $CUDA_VISIBLE_DEVICES; while [ ! -e {gate} ]; do sleep 0.05; done");
    let half = ["--gpu-share", "500", "--", "sh", "-c", script.as_str()];
    let a = submit(&target, &half).await?;
    let b = submit(&target, &half).await?;
    let running = |j: &serde_json::Value| j["state"] == "JOB_STATE_RUNNING";
    let ja = until(&target, &a, "ran", running).await?;
    let jb = until(&target, &b, "ran", running).await?;
    assert_eq!(
        ja["tasks"][0]["gpuUuids"], jb["tasks"][0]["gpuUuids"],
        "one GPU, two halves"
    );
    assert_eq!(ja["tasks"][0]["gpuShareMilli"], 500);

    let c = submit(
        &target,
        &["--gpu-share", "470", "--gpu-memory", "12GiB", "--", "true"],
    )
    .await?;
    let waiting = until(&target, &c, "got a reason", |j| {
        j["pendingReason"]["code"] == "INSUFFICIENT_FREE_GPUS"
    })
    .await?;
    let message = waiting["pendingReason"]["message"].as_str().unwrap_or("");
    assert!(
        message.starts_with("needs 470/1000 of a GPU with 12 GiB free"),
        "{message}"
    );
    let capacity = gpufleet(&target, &["capacity"]).await;
    assert!(
        text(&capacity.stdout).contains("SHARED"),
        "{}",
        text(&capacity.stdout)
    );

    std::fs::write(Path::new(&gate), b"")?;
    let ended = |j: &serde_json::Value| j["state"] == "JOB_STATE_SUCCEEDED";
    until(&target, &a, "succeeded", ended).await?;
    until(&target, &b, "succeeded", ended).await?;
    let jc = until(&target, &c, "succeeded", ended).await?;
    assert_eq!(jc["tasks"][0]["gpuShareMilli"], 470);

    let out = gpufleet(&target, &["-o", "json", "usage", "records"]).await;
    anyhow::ensure!(out.status.success(), "records: {}", text(&out.stderr));
    let records: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let records = records["records"].as_array().cloned().unwrap_or_default();
    let halves: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["jobId"] == a.as_str() || r["jobId"] == b.as_str())
        .collect();
    assert_eq!(halves.len(), 2, "{records:?}");
    for r in halves {
        assert_eq!(r["gpuShareMilli"], 500);
        let started = humantime::parse_rfc3339(r["startedAt"].as_str().unwrap_or(""))?;
        let ended = humantime::parse_rfc3339(r["endedAt"].as_str().unwrap_or(""))?;
        let ms = ended.duration_since(started)?.as_millis() as u64;
        assert_eq!(
            number(&r["gpuMilliseconds"]),
            ms * 500 / 1000,
            "half a GPU for {ms} ms: {r}"
        );
    }
    Ok(())
}
