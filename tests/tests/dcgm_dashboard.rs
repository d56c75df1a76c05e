//! NVIDIA's dcgm-exporter Grafana dashboard (id 12239) works against the
//! agent unchanged: every metric its queries name is in a real agent's
//! scrape (nvml backend on the fake NVML: one whole H100 and one in MIG
//! mode), with every label its selectors filter on, and the MIG labels
//! (`GPU_I_ID`, `GPU_I_PROFILE`) its per-instance panels group by. The
//! queries are vendored in `tests/dcgm-exporter-dashboard-queries.txt`;
//! `tests/promtool.sh` evaluates the same queries with Prometheus's engine
//! over a scrape.

use std::collections::{BTreeSet, HashMap};

use gpufleet_tests::{
    Cluster, NodeSpec, eventually, fake_nvml_in, http_get, write_fake_nvml_config,
};
use serde_json::json;

const QUERIES: &str = include_str!("../dcgm-exporter-dashboard-queries.txt");
const GIB: u64 = 1 << 30;

/// One H100 with whole-GPU GPM, one H100 split into two MIG instances.
fn machine() -> String {
    let values = |mig: u32| {
        json!({
            "gpu_util": 90, "mem_util": 40, "memory_total": 80 * GIB, "memory_used": 30 * GIB,
            "temperature": 64, "power_usage_mw": 550_000, "power_limit_mw": 700_000,
            "sm_clock": 1980, "mem_clock": 2619, "mig_mode": mig, "sm_count": 132,
            "cc_major": 9, "cc_minor": 0
        })
    };
    let gpm = json!({ "graphics_util": 93.0, "sm_util": 88.0, "any_tensor_util": 61.0,
                      "dram_bw_util": 40.0, "fp16_util": 30.0 });
    json!({
        "driver_version": "550.54.15",
        "gpus": [
            { "uuid": "GPU-d0000000-0000-0000-0000-000000000000", "name": "NVIDIA H100 80GB HBM3",
              "pci_bus_id": "00000000:18:00.0", "values": values(0), "gpm": gpm },
            { "uuid": "GPU-d1111111-0000-0000-0000-000000000000", "name": "NVIDIA H100 80GB HBM3",
              "pci_bus_id": "00000000:2A:00.0", "values": values(1), "gpm": {},
              "mig_instances": [
                { "uuid": "MIG-d1111111-0000-0000-0000-000000000001", "profile": "3g.40gb",
                  "gpu_instance_id": 2, "memory_total": 40 * GIB, "memory_used": 9 * GIB,
                  "sm_count": 60, "gpm": gpm },
                { "uuid": "MIG-d1111111-0000-0000-0000-000000000002", "profile": "1g.10gb",
                  "gpu_instance_id": 9, "memory_total": 10 * GIB, "memory_used": GIB,
                  "sm_count": 16, "gpm": { "sm_util": 10.0, "any_tensor_util": 2.0,
                                           "graphics_util": 12.0 } }
              ] }
        ]
    })
    .to_string()
}

/// A scraped series: its metric name and labels.
struct Series {
    name: String,
    labels: HashMap<String, String>,
}

/// Parses the sample lines of a text exposition (label values here never
/// contain `",` or `}`; the metrics tests check escaping).
fn parse(scrape: &str) -> Vec<Series> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, rest) = l.split_once('{')?;
            let (labels, _) = rest.rsplit_once('}')?;
            let labels = labels
                .split("\",")
                .filter_map(|kv| {
                    let (k, v) = kv.split_once("=\"")?;
                    Some((k.to_string(), v.trim_end_matches('"').to_string()))
                })
                .collect();
            Some(Series {
                name: name.to_string(),
                labels,
            })
        })
        .collect()
}

/// The `DCGM_FI_…` metric names in a query.
fn metric_names(query: &str) -> BTreeSet<String> {
    query
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("DCGM_FI_"))
        .map(String::from)
        .collect()
}

/// Label names a query filters on (`label=~"…"`) and groups by (`by (…)`),
/// and the label of a `label_values(METRIC, LABEL)` variable query.
fn label_names(query: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut filtered = BTreeSet::new();
    for part in query.split('{').skip(1) {
        let selector = part.split('}').next().unwrap_or("");
        for matcher in selector.split(',') {
            if let Some((label, _)) = matcher.split_once("=~") {
                filtered.insert(label.trim().to_string());
            }
        }
    }
    let mut grouped = BTreeSet::new();
    for part in query.split("by (").skip(1) {
        for label in part.split(')').next().unwrap_or("").split(',') {
            grouped.insert(label.trim().to_string());
        }
    }
    if let Some(args) = query.strip_prefix("label_values(") {
        let label = args.trim_end_matches(')').rsplit(',').next().unwrap_or("");
        filtered.insert(label.trim().to_string());
    }
    (filtered, grouped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_finds_its_metrics_and_labels_in_an_agent_scrape()
-> anyhow::Result<()> {
    let mut cluster = Cluster::start(&[]).await?;
    let nvml_dir = cluster.dir.path().join("nvml");
    let lib = fake_nvml_in(&nvml_dir)?;
    write_fake_nvml_config(&nvml_dir, &machine())?;
    let node = NodeSpec::new("dashboard-node", "aws", "us-east-1", "", 3.93);
    let mut config = cluster.agent_config(&node);
    config.gpu_backend = gpufleet_agent::GpuBackendKind::Nvml;
    config.simulated_gpus.clear();
    config.monitoring.nvml_library_path = Some(lib);
    config.monitoring.metrics_listen = Some("127.0.0.1:0".parse()?);
    cluster.add_agent_with(config).await?;
    let addr = cluster.agents[0]
        .metrics_addr()
        .ok_or_else(|| anyhow::anyhow!("the agent serves no /metrics"))?;

    // GPM needs two samples; wait for per-instance tensor activity.
    let scrape = eventually("profiling series on /metrics", || async move {
        let scrape = http_get(addr, "/metrics").await?;
        let ready = scrape.lines().any(|l| {
            l.starts_with("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{") && l.contains("GPU_I_ID=\"9\"")
        });
        Ok(ready.then_some(scrape))
    })
    .await?;
    let series = parse(&scrape);

    let queries: Vec<(&str, &str)> = QUERIES
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split_once(" | "))
        .collect();
    assert_eq!(queries.len(), 10, "the vendored list changed: {queries:?}");
    for (panel, query) in &queries {
        let names = metric_names(query);
        assert!(!names.is_empty(), "{panel}: no metric in {query}");
        let (filtered, grouped) = label_names(query);
        for name in &names {
            let of_metric: Vec<&Series> = series.iter().filter(|s| &s.name == name).collect();
            assert!(
                !of_metric.is_empty(),
                "{panel}: {name} is not in the scrape"
            );
            // Every series carries the labels the dashboard selects on.
            for s in &of_metric {
                for label in &filtered {
                    assert!(
                        s.labels.get(label).is_some_and(|v| !v.is_empty()),
                        "{panel}: a {name} series lacks {label}: {:?}",
                        s.labels
                    );
                }
            }
            // The labels it groups by exist; `uuid` (lower case) is on no
            // dcgm-exporter series either, and grouping by it is harmless.
            for label in grouped.iter().filter(|l| *l != "uuid") {
                assert!(
                    of_metric.iter().any(|s| s.labels.contains_key(label)),
                    "{panel}: no {name} series has {label}"
                );
            }
        }
    }

    // The per-instance panels see each MIG instance with its profile.
    let tensor: Vec<(String, String)> = series
        .iter()
        .filter(|s| s.name == "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE")
        .map(|s| {
            let get = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
            (
                get("gpu"),
                format!("{}/{}", get("GPU_I_ID"), get("GPU_I_PROFILE")),
            )
        })
        .collect();
    assert!(tensor.contains(&("0".into(), "/".into())), "{tensor:?}");
    assert!(
        tensor.contains(&("1".into(), "2/3g.40gb".into())),
        "{tensor:?}"
    );
    assert!(
        tensor.contains(&("1".into(), "9/1g.10gb".into())),
        "{tensor:?}"
    );
    let value = scrape
        .lines()
        .find(|l| l.starts_with("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE{gpu=\"0\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(
        value,
        Some(0.61),
        "a ratio 0–1, as dcgm-exporter exports it"
    );
    cluster.shutdown().await
}
