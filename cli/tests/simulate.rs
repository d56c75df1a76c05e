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

/// Inflation mode on the small sample: every policy on the same seeded
/// draw, a row per demand step up to `--inflation-max`, the comparison
/// matrix, the chart; and the same JSON for the same seed.
#[test]
fn simulate_inflation_reports_each_step_and_is_deterministic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let chart = dir.path().join("inflation.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
        .args([
            "simulate",
            "--nodes",
            NODES,
            "--pods",
            PODS,
            "--inflation",
            "--inflation-max",
            "120",
            "--svg",
        ])
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
        "50 %",
        "100 %",
        "120 %",
        "baseline-fgd",
        "mean over 90–100 % arrived demand",
        "failed tasks",
    ] {
        assert!(stdout.contains(needle), "{needle} missing in:\n{stdout}");
    }
    assert!(!stdout.contains("125 %"), "no step past --inflation-max");
    let svg = std::fs::read_to_string(&chart).expect("the chart was written");
    assert!(svg.contains("unallocated GPUs") && svg.contains("<polyline"));

    let run = |seed: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
            .args(["-o", "json", "simulate", "--nodes", NODES, "--pods", PODS])
            .args([
                "--inflation",
                "--seed",
                seed,
                "--policy",
                "pack,baseline-fgd",
            ])
            .output()
            .expect("gpufleet runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        for p in v["policies"].as_array_mut().expect("policies") {
            p["wall_s"] = serde_json::Value::Null;
        }
        v
    };
    let a = run("3");
    assert_eq!(a["mode"], "inflation");
    let points = a["policies"][0]["points"].as_array().expect("points");
    assert_eq!(points.len(), 17, "50 %, 55 %, … 130 %");
    let unallocated: Vec<f64> = points
        .iter()
        .map(|p| p["unallocated_gpus"].as_f64().expect("number"))
        .collect();
    assert!(
        unallocated.windows(2).all(|w| w[1] <= w[0]),
        "{unallocated:?}"
    );
    assert_eq!(a, run("3"));
    assert_ne!(a, run("4"), "another seed draws other tasks");
}

#[test]
fn simulate_inflation_flags_need_inflation() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
        .args([
            "simulate",
            "--nodes",
            NODES,
            "--pods",
            PODS,
            "--inflation-max",
            "120",
        ])
        .output()
        .expect("gpufleet runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--inflation"));
}
