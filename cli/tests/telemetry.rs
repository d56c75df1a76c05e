//! `gpufleet top` and `gpufleet telemetry` against a real controller and agents.

use std::process::{Command, Output};

use gpufleet_proto::v1::GetLatestRequest;
use gpufleet_tests::{Cluster, eventually, two_nodes};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_and_history_through_the_binary() -> anyhow::Result<()> {
    let cluster = Cluster::start(&two_nodes()).await?;
    let endpoint: Target = (cluster.endpoint(), cluster.admin_token.clone());
    let telemetry = cluster.telemetry().await?;
    let uuid = eventually("every GPU to report", || {
        let mut telemetry = telemetry.clone();
        async move {
            let r = telemetry
                .get_latest(GetLatestRequest::default())
                .await?
                .into_inner();
            let all = r.gpus.len() == 8 && r.gpus.iter().all(|g| g.sample.is_some());
            Ok(all.then(|| r.gpus[0].info.clone().unwrap_or_default().uuid))
        }
    })
    .await?;

    let top = gpufleet(&endpoint, &["top", "--once", "--sort", "util"]).await;
    assert!(top.status.success(), "{}", text(&top.stderr));
    let out = text(&top.stdout);
    assert!(!out.contains('\x1b'), "--once must not clear the screen");
    assert!(out.contains("2 nodes, 8 GPUs"), "{out}");
    for node in ["node-a", "node-b"] {
        let rows = out.lines().filter(|l| l.starts_with(node)).count();
        assert_eq!(rows, 4, "{node} in\n{out}");
    }
    assert!(
        out.contains("aws/us-east-1") && out.contains("H100-SXM-80GB"),
        "{out}"
    );

    let json = gpufleet(
        &endpoint,
        &["-o", "json", "top", "--once", "--node", "node-b"],
    )
    .await;
    let value: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(value["gpus"].as_array().map(Vec::len), Some(4));

    let chart = gpufleet(
        &endpoint,
        &[
            "telemetry",
            "history",
            "--gpu",
            &uuid,
            "--metric",
            "util",
            "--since",
            "10m",
            "--step",
            "1m",
        ],
    )
    .await;
    assert!(chart.status.success(), "{}", text(&chart.stderr));
    let out = text(&chart.stdout);
    assert!(out.contains("gpu_utilization_percent on GPU-"), "{out}");
    assert!(out.contains("100% ┤") && out.contains("0% ┤"), "{out}");

    let json = gpufleet(
        &endpoint,
        &[
            "-o",
            "json",
            "telemetry",
            "history",
            "--gpu",
            &uuid,
            "--since",
            "10m",
        ],
    )
    .await;
    assert!(json.status.success(), "{}", text(&json.stderr));
    let value: serde_json::Value = serde_json::from_slice(&json.stdout)?;
    assert!(
        value["series"][0]["points"]
            .as_array()
            .is_some_and(|p| !p.is_empty()),
        "{value}"
    );

    let bad = gpufleet(
        &endpoint,
        &["telemetry", "history", "--gpu", &uuid, "--step", "30s"],
    )
    .await;
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("whole number of minutes"),
        "{}",
        text(&bad.stderr)
    );
    let huge = gpufleet(
        &endpoint,
        &[
            "telemetry",
            "history",
            "--gpu",
            &uuid,
            "--since",
            "30d",
            "--step",
            "1m",
        ],
    )
    .await;
    assert!(!huge.status.success());
    assert!(
        text(&huge.stderr).contains("10000"),
        "{}",
        text(&huge.stderr)
    );

    let aggregates = gpufleet(&endpoint, &["telemetry", "aggregates", "--by", "provider"]).await;
    assert!(aggregates.status.success(), "{}", text(&aggregates.stderr));
    let out = text(&aggregates.stdout);
    assert!(
        out.lines()
            .any(|l| l.starts_with("aws") && l.contains(" 4 ")),
        "{out}"
    );
    cluster.shutdown().await
}
