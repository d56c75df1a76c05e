//! The Kubernetes manifests' configuration, run for real: the agent
//! DaemonSet's init container script (deploy/kubernetes/base/node-config.sh)
//! against a fake API server answer, and the ConfigMaps' TOML files loaded
//! by the real agent and controller config loaders.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use gpufleet_agent::{AgentConfig, GpuBackendKind};
use gpufleet_controller::config::ControllerConfig;

fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/base")
}

/// Runs node-config.sh with `curl` replaced by a script that prints
/// `node_json`, as the API server would for GET /api/v1/nodes/NAME.
fn node_config(node_json: &str, defaults: &[(&str, &str)]) -> (Output, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    let sa = dir.path().join("sa");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), "token").unwrap();
    std::fs::write(sa.join("ca.crt"), "").unwrap();
    std::fs::write(dir.path().join("node.json"), node_json).unwrap();
    let curl = bin.join("curl");
    std::fs::write(
        &curl,
        format!(
            "#!/bin/sh\ncat '{}'\n",
            dir.path().join("node.json").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&curl, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out_path = dir.path().join("run/agent.toml");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new("sh")
        .arg(base().join("node-config.sh"))
        .env("PATH", path)
        .env("NODE_NAME", "gpu-node-7")
        .env("SA_DIR", &sa)
        .env("TEMPLATE", base().join("agent.toml"))
        .env("OUT", &out_path)
        .envs(defaults.iter().copied())
        .output()
        .expect("sh runs node-config.sh");
    (output, out_path, dir)
}

fn load_agent(path: &Path) -> AgentConfig {
    AgentConfig::load(
        [
            OsStr::new("gpufleet-agent"),
            OsStr::new("--config"),
            path.as_os_str(),
        ],
        &HashMap::new(),
    )
    .unwrap_or_else(|e| panic!("the agent rejects {}: {e}", path.display()))
}

#[test]
fn node_labels_and_provider_id_become_the_agents_node_table() {
    // Shaped like a real API answer: nested objects, commas inside the body.
    let json = r#"{
      "kind": "Node", "apiVersion": "v1",
      "metadata": {
        "name": "gpu-node-7",
        "labels": {
          "beta.kubernetes.io/arch": "amd64",
          "node.kubernetes.io/instance-type": "a3-highgpu-8g",
          "nvidia.com/gpu.present": "true",
          "topology.kubernetes.io/region": "us-central1",
          "topology.kubernetes.io/zone": "us-central1-a",
          "gpufleet.io/price-per-gpu-hour": "3.67"
        }
      },
      "spec": {"providerID": "gce://my-project/us-central1-a/gpu-node-7", "taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]}
    }"#;
    let (out, path, _dir) = node_config(json, &[("DEFAULT_PROVIDER", "onprem")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = load_agent(&path);
    assert_eq!(c.node.id.as_deref(), Some("gpu-node-7"));
    assert_eq!(c.node.provider, "gcp");
    assert_eq!(c.node.region, "us-central1");
    assert_eq!(c.node.zone, "us-central1-a");
    assert_eq!(c.node.instance_type, "a3-highgpu-8g");
    assert_eq!(c.price_micro_usd(), 3_670_000);
    // The rest comes from the shared template.
    assert_eq!(c.controller, "http://gpufleet-controller.gpufleet.svc:7070");
    assert_eq!(c.gpu_backend, GpuBackendKind::Nvml);
}

#[test]
fn nodes_without_cloud_labels_get_the_configured_defaults() {
    let json = r#"{"kind":"Node","metadata":{"name":"gpu-node-7","labels":{"kubernetes.io/hostname":"gpu-node-7"}},"spec":{}}"#;
    let (out, path, _dir) = node_config(
        json,
        &[
            ("DEFAULT_PROVIDER", "onprem"),
            ("DEFAULT_REGION", "dc1"),
            ("DEFAULT_PRICE", "2"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = load_agent(&path);
    assert_eq!(c.node.provider, "onprem");
    assert_eq!(c.node.region, "dc1");
    assert_eq!(c.node.zone, "");
    assert_eq!(c.price_micro_usd(), 2_000_000);
}

#[test]
fn a_bad_price_label_stops_the_pod_with_a_reason() {
    let json = r#"{"metadata":{"labels":{"gpufleet.io/price-per-gpu-hour":"cheap"}},"spec":{"providerID":"aws:///us-east-1a/i-1"}}"#;
    let (out, path, _dir) = node_config(json, &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("price 'cheap'") && stderr.contains("gpu-node-7"),
        "{stderr}"
    );
    assert!(!path.exists(), "no config is written on error");
}

#[test]
fn the_controller_configmap_loads() {
    let path = base().join("controller.toml");
    let c = ControllerConfig::load(
        [
            OsStr::new("gpufleet-controller"),
            OsStr::new("--config"),
            path.as_os_str(),
        ],
        &HashMap::new(),
    )
    .unwrap_or_else(|e| panic!("the controller rejects its ConfigMap: {e}"));
    // Reachable from agents on other nodes, and on the PVC mount.
    assert!(c.listen.ip().is_unspecified());
    assert_eq!(c.listen.port(), 7070);
    assert!(c.data_dir.starts_with("/var/lib/gpufleet"));
}
