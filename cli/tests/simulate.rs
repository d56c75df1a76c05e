//! `gpufleet simulate` on the scheduler's small sample trace: the table
//! compares every policy, `-o json` parses, and the SVG chart is written.

use std::process::Command;

const NODES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../scheduler/tests/data/small_nodes.csv"
);
const PODS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../scheduler/tests/data/small_pods.csv"
);

#[test]
fn simulate_prints_a_table_and_writes_the_chart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let chart = dir.path().join("chart.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
        .args(["simulate", "--nodes", NODES, "--pods", PODS, "--svg"])
        .arg(&chart)
        .output()
        .expect("gpufleet runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "cost",
        "pack",
        "spread",
        "baseline-best-fit",
        "wait p50/p95/p99",
        "1 fractional tasks replayed as shares of a GPU",
        "1 pods without a GPU skipped",
    ] {
        assert!(stdout.contains(needle), "{needle} missing in:\n{stdout}");
    }
    let svg = std::fs::read_to_string(&chart).expect("the chart was written");
    assert!(
        svg.starts_with("<svg") && svg.contains("<polyline"),
        "{svg}"
    );
}

#[test]
fn simulate_json_is_the_same_for_the_same_seed() {
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
            .args(["-o", "json", "simulate", "--synthetic-nodes", "10"])
            .args([
                "--synthetic-jobs",
                "200",
                "--seed",
                "7",
                "--policy",
                "cost,baseline-first-fit",
            ])
            .output()
            .expect("gpufleet runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        // Wall times differ between runs; everything else must not.
        for p in v["policies"].as_array_mut().expect("policies") {
            p["wall_s"] = serde_json::Value::Null;
        }
        v
    };
    let a = run();
    assert_eq!(a["policies"][0]["policy"], "cost");
    assert_eq!(a["policies"][1]["baseline"], true);
    assert_eq!(a, run());
}

#[test]
fn simulate_rejects_an_unknown_policy() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
        .args([
            "simulate", "--nodes", NODES, "--pods", PODS, "--policy", "fgd",
        ])
        .output()
        .expect("gpufleet runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--policy `fgd` is unknown"));
}
