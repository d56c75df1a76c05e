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
    // The terminal chart: per panel a row of 60 columns per policy, scaled
    // to the busiest column. Under cost, 5 of 14 GPUs are held until t=10
    // (▄ on a scale whose top, █, is 13 of 14), then 13.
    let panel = |title: &str| -> Vec<String> {
        stdout
            .lines()
            .skip_while(|l| !l.starts_with(title))
            .skip(1)
            .take(7)
            .map(str::to_string)
            .collect()
    };
    let allocation = panel("GPUs allocated over time");
    let stranded = panel("GPUs stranded over time");
    for rows in [&allocation, &stranded] {
        assert_eq!(rows.len(), 7, "{stdout}");
        for row in rows.iter() {
            let blocks = row.chars().filter(|c| ('▁'..='█').contains(c)).count();
            assert_eq!(blocks, 60, "{row}");
        }
    }
    let cost = allocation[0].trim_start();
    assert!(cost.starts_with("cost"), "{cost}");
    let line: String = cost.chars().filter(|c| ('▁'..='█').contains(c)).collect();
    assert!(line.starts_with('▄') && line.contains('█'), "{line}");
}

#[test]
fn simulate_json_is_the_same_for_the_same_seed() {
    let run = || {
        json_of(&[
            "simulate",
            "--synthetic-nodes",
            "10",
            "--synthetic-jobs",
            "200",
            "--seed",
            "7",
            "--policy",
            "cost,baseline-first-fit",
        ])
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
    // Synthetic sizes are bounded (no fleet, or one too large to hold).
    for (flag, value) in [
        ("--synthetic-nodes", "0"),
        ("--synthetic-nodes", "1000001"),
        ("--synthetic-jobs", "10000001"),
    ] {
        let mut args = vec!["simulate", flag, value];
        if flag == "--synthetic-jobs" {
            args.extend(["--synthetic-nodes", "10"]);
        }
        let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
            .args(&args)
            .output()
            .expect("gpufleet runs");
        assert!(!out.status.success(), "{flag} {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(flag) && stderr.contains("is not in"),
            "{stderr}"
        );
    }
}

/// `gpufleet -o json ARGS…`, which must succeed: its parsed answer, with
/// each policy's wall time blanked (it differs between runs; nothing else
/// may).
fn json_of(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
        .args(["-o", "json"])
        .args(args)
        .output()
        .expect("gpufleet runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    if let Some(policies) = v["policies"].as_array_mut() {
        for p in policies {
            p["wall_s"] = serde_json::Value::Null;
        }
    }
    v
}

/// `gpufleet -o json simulate` on the small sample trace with `extra`
/// flags, two policies: the parsed JSON.
fn simulate_json(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "simulate",
        "--nodes",
        NODES,
        "--pods",
        PODS,
        "--policy",
        "cost,baseline-first-fit",
    ];
    args.extend_from_slice(extra);
    json_of(&args)
}

fn per_policy(v: &serde_json::Value, field: &str) -> Vec<serde_json::Value> {
    v["policies"]
        .as_array()
        .expect("policies")
        .iter()
        .map(|p| p[field].clone())
        .collect()
}

#[test]
fn what_if_remove_and_add_change_the_fleet_and_the_outcome() {
    let base = simulate_json(&[]);
    assert_eq!(base["workload"]["gpus"], 14);
    assert_eq!(per_policy(&base, "never_placed"), [0, 0]);
    assert_eq!(base["edits"], serde_json::json!([]));

    // The only 8-GPU node gone: both 8-GPU pods can never run.
    let removed = simulate_json(&["--remove", "model=A100"]);
    assert_eq!(removed["workload"]["gpus"], 6);
    assert_eq!(per_policy(&removed, "never_placed"), [2, 2]);
    assert_eq!(
        removed["edits"][0],
        "--remove model=A100: removed 1 node(s), 8 GPUs"
    );

    // ... and an added one at $1 brings them back, cheaper.
    let added = simulate_json(&[
        "--remove",
        "model=A100",
        "--add",
        "8xA100-SXM-40GB@nebius/eu-north1:$1",
    ]);
    assert_eq!(added["workload"]["gpus"], 14);
    assert_eq!(per_policy(&added, "never_placed"), [0, 0]);
    assert!(
        added["edits"][1]
            .as_str()
            .unwrap()
            .contains("added 8 × A100-SXM-40GB (Ampere) on 1 node(s) at nebius/eu-north1, $1.00"),
        "{}",
        added["edits"]
    );
    let cost = |v: &serde_json::Value| per_policy(v, "cost_usd")[1].as_f64().unwrap();
    assert!(
        cost(&added) < cost(&base),
        "{} vs {}",
        cost(&added),
        cost(&base)
    );
}

#[test]
fn what_if_price_and_load() {
    let free = simulate_json(&["--price", "*=$0"]);
    assert_eq!(per_policy(&free, "cost_usd"), [0.0, 0.0]);
    assert!(
        free["edits"][0]
            .as_str()
            .unwrap()
            .contains("3 node(s) repriced")
    );

    let half = simulate_json(&["--price", "V100=-50%"]);
    let base = simulate_json(&[]);
    let cost = |v: &serde_json::Value| per_policy(v, "cost_usd")[1].as_f64().unwrap();
    assert!(cost(&half) < cost(&base));

    // All pods arriving at once (×100) queue longer than as recorded.
    let fast = simulate_json(&["--load", "100"]);
    let p99 = |v: &serde_json::Value| v["policies"][0]["wait"]["p99_s"].as_u64().unwrap();
    assert_eq!(p99(&base), 55);
    assert_eq!(p99(&fast), 70);
    assert!(
        fast["edits"][0]
            .as_str()
            .unwrap()
            .starts_with("--load 100: arrivals 100.00× as fast")
    );
}

#[test]
fn what_if_table_lists_the_edits_and_bad_edits_name_the_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
        .args([
            "simulate", "--nodes", NODES, "--pods", PODS, "--policy", "pack",
        ])
        .args([
            "--add",
            "2x8xH100-SXM-80GB@nebius/eu-north1:2.90",
            "--load",
            "1.5",
        ])
        .output()
        .expect("gpufleet runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("what-if --add 2x8xH100-SXM-80GB@nebius/eu-north1:2.90: added 16 × H100-SXM-80GB (Hopper) on 2 node(s)"), "{stdout}");
    assert!(stdout.contains("what-if --load 1.5"), "{stdout}");
    assert!(stdout.contains("6 jobs on 5 nodes / 30 GPUs"), "{stdout}");

    for (flag, value, needle) in [
        (
            "--add",
            "1000000000xH100-SXM-80GB@a/b:$1",
            "--add `1000000000xH100-SXM-80GB@a/b:$1`: GPU count 1000000000 is out of range 1..=1000000",
        ),
        (
            "--add",
            "20xH100@a/b:$1",
            "model `H100` could be H100-PCIE-80GB or H100-SXM-80GB; name one",
        ),
        (
            "--remove",
            "model=H100",
            "--remove `model=H100`: no node matches",
        ),
        (
            "--remove",
            "colour=red",
            "--remove `colour=red`: unknown key `colour`; expected NODE_ID or KEY=VALUE",
        ),
        (
            "--price",
            "T4",
            "--price `T4`: no `=PRICE`; expected MODEL[@PROVIDER[/REGION]]=$PRICE",
        ),
        (
            "--load",
            "-2",
            "--load `-2`: -2 is out of range; expected a factor from 0.01 to 100",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
            .args(["simulate", "--nodes", NODES, "--pods", PODS])
            .arg(format!("{flag}={value}"))
            .output()
            .expect("gpufleet runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} was accepted");
        assert!(stderr.contains(needle), "{flag} {value}: {stderr}");
    }
}

/// A fleet of one 4×H100 node as `gpufleet -o json nodes list` prints it.
const FLEET_JSON: &str = r#"{
  "nodes": [{
    "identity": {"nodeId": "h1", "provider": "aws", "region": "us-east-1", "pricePerGpuHourMicroUsd": "3930000"},
    "state": "NODE_STATE_READY",
    "gpus": [
      {"info": {"index": 0, "uuid": "GPU-0", "model": "H100-SXM-80GB", "generation": "GPU_GENERATION_HOPPER"}},
      {"info": {"index": 1, "uuid": "GPU-1", "model": "H100-SXM-80GB", "generation": "GPU_GENERATION_HOPPER"}},
      {"info": {"index": 2, "uuid": "GPU-2", "model": "H100-SXM-80GB", "generation": "GPU_GENERATION_HOPPER"}},
      {"info": {"index": 3, "uuid": "GPU-3", "model": "H100-SXM-80GB", "generation": "GPU_GENERATION_HOPPER"}}
    ]
  }]
}"#;

/// Three finished allocations as `gpufleet usage export` writes them: a
/// 4-GPU job from 0 s to 100 s, then two 2-GPU jobs submitted at 10 s and
/// 20 s that waited for it.
const HISTORY_JSONL: &str = concat!(
    r#"{"allocationId":"a1","jobId":"job-000000000000000a","tenant":"ml","gpuCount":4,"startedAt":"2026-11-01T00:00:00Z","endedAt":"2026-11-01T00:01:40Z","jobSubmittedAt":"2026-11-01T00:00:00Z","jobTasks":1,"jobGpusPerTask":4}"#,
    "\n",
    r#"{"allocationId":"a2","jobId":"job-000000000000000b","tenant":"ml","gpuCount":2,"startedAt":"2026-11-01T00:01:40Z","endedAt":"2026-11-01T00:02:30Z","jobSubmittedAt":"2026-11-01T00:00:10Z","jobTasks":1,"jobGpusPerTask":2}"#,
    "\n",
    r#"{"allocationId":"a3","jobId":"job-000000000000000c","tenant":"ml","gpuCount":2,"startedAt":"2026-11-01T00:01:40Z","endedAt":"2026-11-01T00:01:50Z","jobSubmittedAt":"2026-11-01T00:00:20Z","jobTasks":1,"jobGpusPerTask":2,"jobConstraints":{"models":["H100-SXM-80GB"]}}"#,
    "\n",
);

#[test]
fn history_replays_on_the_fleet_and_what_if_applies_to_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fleet = dir.path().join("fleet.json");
    let history = dir.path().join("history.jsonl");
    std::fs::write(&fleet, FLEET_JSON).expect("write");
    std::fs::write(&history, HISTORY_JSONL).expect("write");
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
            .args(["-o", "json", "simulate", "--policy", "cost", "--history"])
            .arg(&history)
            .arg("--fleet")
            .arg(&fleet)
            .args(extra)
            .output()
            .expect("gpufleet runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let replay = run(&[]);
    assert_eq!(replay["workload"]["gpus"], 4);
    assert_eq!(
        replay["notes"][0],
        "history: 3 records of 3 jobs, replayed as 3 tasks"
    );
    let p = &replay["policies"][0];
    assert_eq!(p["placed"], 3);
    // As it happened: both 2-GPU jobs start at 100 s (waits 90 s and 80 s).
    assert_eq!(
        (p["wait"]["p50_s"].as_u64(), p["wait"]["p99_s"].as_u64()),
        (Some(80), Some(90))
    );
    // $3.93 × (4 × 100 s + 2 × 50 s + 2 × 10 s) / 3600, each run rounded
    // down to the micro-USD.
    let cost = p["cost_usd"].as_f64().unwrap();
    assert!((cost - 3.93 * 520.0 / 3600.0).abs() < 5e-6, "{cost}");

    // With four more H100s nobody waits.
    let more = run(&["--add", "4xH100-SXM-80GB@aws/us-east-1:3.93"]);
    assert_eq!(more["policies"][0]["wait"]["p99_s"], 0);

    // --history needs --fleet, and a bad line is named.
    let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
        .args(["simulate", "--history"])
        .arg(&history)
        .output()
        .expect("gpufleet runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--fleet"));
    std::fs::write(&history, "{\"jobId\": 5}\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
        .args(["simulate", "--history"])
        .arg(&history)
        .arg("--fleet")
        .arg(&fleet)
        .output()
        .expect("gpufleet runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("line 1 is not a usage record"), "{stderr}");
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
        json_of(&[
            "simulate",
            "--nodes",
            NODES,
            "--pods",
            PODS,
            "--inflation",
            "--seed",
            seed,
            "--policy",
            "pack,baseline-fgd",
        ])
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

/// The market signals a live controller would have recorded, on the small
/// trace's hand-computed schedule (scheduler/tests/sim.rs): p3 (2 GPUs, any
/// model) waits from 20 s to 40 s, eligible on every generation; p5 (8
/// GPUs) waits from 25 s to 80 s, eligible only on n2 (Ampere). So over the
/// 100 s replayed Ampere's mean pending demand is (2 × 20 + 8 × 55) / 100 =
/// 4.8 GPUs and Volta's 2 × 20 / 100 = 0.4; the peak is 25–30 s, when 10
/// GPUs are wanted on Ampere and none is free (tightness 10 / max(0, 1)).
/// The baselines record none.
#[test]
fn simulate_reports_the_market_signals_the_controller_would_record() {
    let v = simulate_json(&["--market-interval", "1s"]);
    let cost = &v["policies"][0]["market"];
    let ampere = cost
        .as_array()
        .expect("market rows")
        .iter()
        .find(|m| m["generation"] == "Ampere")
        .unwrap_or_else(|| panic!("no Ampere row in {cost}"));
    assert_eq!(ampere["supply_gpus"], 8);
    let demand = ampere["mean_pending_demand_gpus"].as_f64().expect("number");
    assert!((demand - 4.8).abs() < 1e-9, "{demand}");
    assert_eq!(ampere["peak_tightness"], 10.0);
    let volta = cost
        .as_array()
        .expect("market rows")
        .iter()
        .find(|m| m["generation"] == "Volta")
        .unwrap_or_else(|| panic!("no Volta row in {cost}"));
    let volta_demand = volta["mean_pending_demand_gpus"].as_f64().expect("number");
    assert!((volta_demand - 0.4).abs() < 1e-9, "{volta_demand}");
    // Tightest first.
    assert_eq!(cost[0]["generation"], "Ampere", "{cost}");
    assert_eq!(v["policies"][1]["market"], serde_json::json!([]));

    let bad = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
        .args(["simulate", "--nodes", NODES, "--pods", PODS])
        .args(["--market-interval", "0s"])
        .output()
        .expect("gpufleet runs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--market-interval"));
}

/// Quotas from the command line and from a controller configuration file
/// hold the scheduler back (a quota of 0 GPUs: nothing of the tenant
/// runs); the baselines ignore quotas. A flag overrides the file.
#[test]
fn quotas_from_flags_and_a_controller_config_hold_a_tenant_back() {
    let placed = |v: &serde_json::Value| per_policy(v, "placed");
    // Every pod of the sample is tenant `openb`'s.
    let v = simulate_json(&["--quota", "openb=0"]);
    assert_eq!(placed(&v), [0, 6]);
    let v = simulate_json(&["--quota", "openb=unlimited,Turing=0,Volta=0,Ampere=0"]);
    assert_eq!(placed(&v), [0, 6]);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("controller.toml");
    std::fs::write(&config, "[tenants.openb]\nweight = 2.0\nmax_gpus = 0\n").expect("write");
    let config = config.to_str().expect("utf-8 path");
    let v = simulate_json(&["--controller-config", config]);
    assert_eq!(placed(&v), [0, 6]);
    let v = simulate_json(&["--controller-config", config, "--quota", "openb=unlimited"]);
    assert_eq!(placed(&v), [6, 6]);

    for (args, needle) in [
        (
            vec!["--quota", "openb"],
            "--quota `openb`: use --quota TENANT=N",
        ),
        (
            vec!["--quota", "openb=4,Kepler=1"],
            "`Kepler` is not a GPU generation",
        ),
        (
            vec!["--weight", "openb=0"],
            "--weight `openb=0`: 0 is out of range",
        ),
        (
            vec!["--controller-config", "/nonexistent/c.toml"],
            "--controller-config /nonexistent/c.toml",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
            .args(["simulate", "--nodes", NODES, "--pods", PODS])
            .args(&args)
            .output()
            .expect("gpufleet runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.contains(needle), "{needle} missing in: {stderr}");
    }
}

/// The synthetic workload's optional gangs, preemptible jobs and max
/// runtimes: counted in the workload, acted on by the engine (jobs stopped
/// at their max runtime, preemptions by gpufleet's policies only),
/// deterministic for a seed; the percentages are bounded.
#[test]
fn synthetic_gangs_preemption_and_max_runtimes() {
    let run = || {
        json_of(&[
            "simulate",
            "--synthetic-nodes",
            "10",
            "--synthetic-jobs",
            "300",
            "--synthetic-gangs",
            "10",
            "--synthetic-preemptible",
            "30",
            "--synthetic-max-runtime",
            "20",
            "--policy",
            "cost,baseline-first-fit",
        ])
    };
    let v = run();
    let w = &v["workload"];
    for field in ["gangs", "preemptible_jobs", "max_runtime_jobs"] {
        assert!(w[field].as_u64().unwrap_or(0) > 0, "{field}: {w}");
    }
    let preemptions = per_policy(&v, "preemptions");
    assert!(preemptions[0].as_u64().unwrap_or(0) > 0, "{preemptions:?}");
    assert_eq!(preemptions[1], 0, "baselines do not preempt");
    for stops in per_policy(&v, "max_runtime_stops") {
        assert!(stops.as_u64().unwrap_or(0) > 0, "{stops}");
    }
    assert_eq!(v, run());
    // Without the options, none of it.
    let plain = json_of(&[
        "simulate",
        "--synthetic-nodes",
        "10",
        "--synthetic-jobs",
        "300",
        "--policy",
        "cost",
    ]);
    assert_eq!(plain["workload"]["gangs"], 0);
    assert_eq!(plain["policies"][0]["preemptions"], 0);
    for args in [
        vec!["--synthetic-nodes", "3", "--synthetic-gangs", "101"],
        vec![
            "--nodes",
            NODES,
            "--pods",
            PODS,
            "--synthetic-preemptible",
            "5",
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_gpufleet"))
            .arg("simulate")
            .args(&args)
            .output()
            .expect("gpufleet runs");
        assert!(!out.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--synthetic-"));
    }
}

/// `--prices` replays a recorded price history (`gpufleet -o json market
/// prices`): on the small trace, T4 costs $0.10 from the first change
/// (virtual 0) and $10 from 30 s. Under cost the T4 runs are p0 (half a
/// GPU, 0–100 s) and p4 (1 GPU, 40–50 s: it waits behind p3's reservation
/// of n0, see scheduler/tests/sim.rs), billed ⌊500 × (30 × 0.1 + 70 × 10) /
/// 3600⌋ and ⌊1000 × 10 × 10 / 3600⌋ micro-USD (× 10⁶) instead of at the
/// trace's $0.35; nothing else moves (no decision changes here).
#[test]
fn prices_replay_a_recorded_price_history() {
    let dir = tempfile::tempdir().expect("temp dir");
    let prices = dir.path().join("prices.json");
    std::fs::write(
        &prices,
        r#"{"current": [{"key": {"model": "T4"}, "pricePerGpuHourMicroUsd": "10000000",
                         "source": "file:p.csv", "since": "2026-11-01T00:00:30Z"}],
            "history": [
              {"at": "2026-11-01T00:00:00Z", "key": {"model": "T4"},
               "newPricePerGpuHourMicroUsd": "100000", "source": "file:p.csv"},
              {"at": "2026-11-01T00:00:30Z", "key": {"model": "T4"},
               "oldPricePerGpuHourMicroUsd": "100000",
               "newPricePerGpuHourMicroUsd": "10000000", "source": "file:p.csv"}]}"#,
    )
    .expect("write");
    let cost = |v: &serde_json::Value| {
        (v["policies"][0]["cost_usd"].as_f64().expect("cost") * 1e6).round() as i64
    };
    let plain = simulate_json(&[]);
    let moving = simulate_json(&["--prices", prices.to_str().expect("utf-8")]);
    let at = |price: i64, milli: i64, secs: i64| milli * secs * price / 3600 / 1000;
    let before = at(350_000, 500, 100) + at(350_000, 1000, 10);
    let after = 500 * (30 * 100_000 + 70 * 10_000_000) / 3600 / 1000 + at(10_000_000, 1000, 10);
    assert_eq!(cost(&moving) - cost(&plain), after - before);
    let note = moving["notes"][0].as_str().unwrap_or("");
    assert!(
        note.starts_with(
            "prices: 1 price changes on 1 of 3 nodes replayed from 2026-11-01T00:00:00Z"
        ),
        "{note}"
    );
    std::fs::write(&prices, "{}").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpufleet"))
        .args(["simulate", "--nodes", NODES, "--pods", PODS, "--prices"])
        .arg(&prices)
        .output()
        .expect("gpufleet runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no prices"), "{stderr}");
    // A fixed --price beside the recorded history is refused, not ignored.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gpufleet"))
        .args([
            "simulate", "--nodes", NODES, "--pods", PODS, "--price", "T4=$1", "--prices",
        ])
        .arg(&prices)
        .output()
        .expect("gpufleet runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--price and --prices together"), "{stderr}");
}
