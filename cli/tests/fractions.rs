//! Shares of one GPU through the `gpufleet` binary, a real controller and
//! an agent: two `--gpu-share 500` jobs run on the same GPU at once, a
//! third share that does not fit waits with its reason, and the ledger
//! bills each half as half a GPU. First on a simulated agent, then on the
//! agent's real `nvml` backend over the fake NVML library beside a
//! `--mig 1g.10gb` job.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use gpufleet_tests::{Cluster, NodeSpec, fake_nvml_in, write_fake_nvml_config};

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

const SHARED_GPU: &str = "GPU-5a000000-0000-0000-0000-000000000000";
const MIG_GPU: &str = "GPU-5b000000-0000-0000-0000-000000000000";
const MIG: &str = "MIG-5b000000-0000-0000-0000-000000000001";

/// The fake NVML's machine: one H100 for shares, one H100 in MIG mode with
/// one `1g.10gb` instance (16 of its 132 SMs).
fn mig_and_shared_machine() -> String {
    const GIB: u64 = 1 << 30;
    let values = |mig: u32| {
        serde_json::json!({ "gpu_util": 10, "mem_util": 5, "memory_total": 80 * GIB,
                            "memory_used": GIB, "mig_mode": mig, "sm_count": 132 })
    };
    serde_json::json!({
        "driver_version": "550.54.15",
        "gpus": [
            { "uuid": SHARED_GPU, "name": "NVIDIA H100 80GB HBM3", "values": values(0) },
            { "uuid": MIG_GPU, "name": "NVIDIA H100 80GB HBM3", "values": values(1),
              "mig_instances": [ { "uuid": MIG, "profile": "1g.10gb", "gpu_instance_id": 9,
                                   "memory_total": 10 * GIB, "sm_count": 16 } ] }
        ]
    })
    .to_string()
}

/// Issue 24's end-to-end case through the real binaries on the fake NVML:
/// a `1g.10gb` MIG job and two `--gpu-share 500` jobs run at once, each
/// seeing only its device (`CUDA_VISIBLE_DEVICES` is the `MIG-…` UUID, or
/// the shared GPU's); a third share that does not fit waits with the
/// reason; the ledger bills each half 0.5 of a GPU and the MIG instance
/// its share of the SMs, never a whole GPU each.
///
/// One physical GPU cannot be both: NVIDIA's MIG mode is per GPU, and a GPU
/// in MIG mode is allocated only through its instances (shares never land
/// on it). So the node has two GPUs: the MIG instance is on one, the two
/// halves share the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mig_job_and_two_halves_run_at_once_through_the_nvml_backend() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(&[]).await?;
    let nvml_dir = cluster.dir.path().join("nvml");
    let lib = fake_nvml_in(&nvml_dir)?;
    write_fake_nvml_config(&nvml_dir, &mig_and_shared_machine())?;
    let node = NodeSpec::new("mig-node", "aws", "us-east-1", "", 4.0);
    let mut config = cluster.agent_config(&node);
    config.gpu_backend = gpufleet_agent::GpuBackendKind::Nvml;
    config.simulated_gpus.clear();
    config.monitoring.nvml_library_path = Some(lib);
    config.sample_interval = Duration::from_millis(100);
    cluster.add_agent_with(config).await?;
    cluster.wait_ready(1).await?;
    let target: Target = (cluster.endpoint(), cluster.admin_token.clone());

    let gate = cluster.dir.path().join("go");
    let gate = gate.to_string_lossy().to_string();
    let script =
        format!("echo visible=$CUDA_VISIBLE_DEVICES; while [ ! -e {gate} ]; do sleep 0.05; done");
    let mig = submit(&target, &["--mig", "1g.10gb", "--", "sh", "-c", &script]).await?;
    let half = ["--gpu-share", "500", "--", "sh", "-c", script.as_str()];
    let a = submit(&target, &half).await?;
    let b = submit(&target, &half).await?;
    let running = |j: &serde_json::Value| j["state"] == "JOB_STATE_RUNNING";
    let jm = until(&target, &mig, "ran", running).await?;
    let ja = until(&target, &a, "ran", running).await?;
    let jb = until(&target, &b, "ran", running).await?;
    assert_eq!(jm["tasks"][0]["gpuUuids"], serde_json::json!([MIG]));
    assert_eq!(jm["tasks"][0]["migProfile"], "1g.10gb");
    for j in [&ja, &jb] {
        assert_eq!(j["tasks"][0]["gpuUuids"], serde_json::json!([SHARED_GPU]));
        assert_eq!(j["tasks"][0]["gpuShareMilli"], 500);
    }
    // Each sees only its device: all three still run, so at once.
    for (id, device) in [(&mig, MIG), (&a, SHARED_GPU), (&b, SHARED_GPU)] {
        let want = format!("visible={device}\n");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = gpufleet(&target, &["jobs", "logs", id.as_str()]).await;
            let log = text(&out.stdout);
            if log == want {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{id} logged {log:?}, not {want:?}: {}",
                text(&out.stderr)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // A third half does not fit beside two (and never on the MIG GPU).
    let c = submit(&target, &["--gpu-share", "500", "--", "true"]).await?;
    let waiting = until(&target, &c, "got a reason", |j| {
        j["pendingReason"]["code"] == "INSUFFICIENT_FREE_GPUS"
    })
    .await?;
    let message = waiting["pendingReason"]["message"].as_str().unwrap_or("");
    assert!(message.starts_with("needs 500/1000 of a GPU"), "{message}");

    std::fs::write(Path::new(&gate), b"")?;
    let ended = |j: &serde_json::Value| j["state"] == "JOB_STATE_SUCCEEDED";
    for id in [&mig, &a, &b, &c] {
        until(&target, id, "succeeded", ended).await?;
    }

    let out = gpufleet(&target, &["-o", "json", "usage", "records"]).await;
    anyhow::ensure!(out.status.success(), "records: {}", text(&out.stderr));
    let records: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let records = records["records"].as_array().cloned().unwrap_or_default();
    let record = |id: &str| {
        records
            .iter()
            .find(|r| r["jobId"] == id)
            .cloned()
            .unwrap_or_default()
    };
    let billed = |r: &serde_json::Value| -> anyhow::Result<(u64, u64)> {
        let started = humantime::parse_rfc3339(r["startedAt"].as_str().unwrap_or(""))?;
        let ended = humantime::parse_rfc3339(r["endedAt"].as_str().unwrap_or(""))?;
        let ms = ended.duration_since(started)?.as_millis() as u64;
        Ok((ms, number(&r["gpuMilliseconds"])))
    };
    for id in [&a, &b] {
        let r = record(id);
        assert_eq!(r["gpuShareMilli"], 500, "{r}");
        let (ms, billed_ms) = billed(&r)?;
        assert_eq!(billed_ms, ms * 500 / 1000, "half a GPU for {ms} ms: {r}");
    }
    // 16 of 132 SMs: 121 thousandths of a GPU.
    let r = record(&mig);
    assert_eq!(r["gpuShareMilli"], 121, "{r}");
    let (ms, billed_ms) = billed(&r)?;
    assert_eq!(billed_ms, ms * 121 / 1000, "{r}");
    Ok(())
}
