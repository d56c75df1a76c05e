//! Every agent config key, declared once: one field whose doc comment is
//! its `--help` text, read by serde from the TOML file and by clap from
//! flags and (through [`gpufleet_core::layered`]) the environment. The
//! argument id is the key's TOML path. docs/configuration.md documents
//! each key once; a test keeps it in step with this file.
//!
//! Values stay close to what the user wrote (text for durations and
//! addresses); [`super::AgentConfig::load`] checks them and names the key
//! in its errors.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, Parser, ValueEnum};
use gpufleet_core::layered::{boolean, trimmed};
use serde::Deserialize;

/// GPU host agent of gpufleet: reports GPU telemetry to the controller and
/// runs the workloads it is given.
///
/// Every option is also an environment variable, and every option but
/// --config and --log-format is a key of the TOML file given with --config.
/// Precedence: flag > environment > file > default.
#[derive(Debug, Parser)]
#[command(name = "gpufleet-agent", version, about)]
pub struct AgentCli {
    /// TOML config file.
    #[arg(long, env = "GPUFLEET_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, env = "GPUFLEET_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(flatten)]
    pub settings: AgentSettings,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The keys of the agent's config file; `None`: not given at this layer.
#[derive(Debug, Clone, Default, Deserialize, Args)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Controller URL, or several comma-separated (controllers sharing
    /// etcd: the agent finds the leader) [default: http://127.0.0.1:7070].
    #[arg(long, env = "GPUFLEET_CONTROLLER", value_name = "URL")]
    pub controller: Option<String>,
    /// Token proving this agent may join the controller [default: none].
    #[arg(
        long,
        env = "GPUFLEET_JOIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub join_token: Option<String>,
    /// GPU backend: nvml or simulated [default: nvml].
    #[arg(long, env = "GPUFLEET_GPU_BACKEND", value_name = "nvml|simulated")]
    pub gpu_backend: Option<String>,
    /// Simulated GPUs, e.g. 8xH100-SXM-80GB or 2xL4,1xT4.
    #[arg(long, env = "GPUFLEET_SIMULATED_GPUS", value_name = "LIST")]
    pub simulated_gpus: Option<List<String>>,
    /// Directory for allocation files and logs [default: /var/lib/gpufleet-agent].
    #[arg(long, env = "GPUFLEET_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// GPU sampling and telemetry interval [default: 5s].
    #[arg(long, env = "GPUFLEET_SAMPLE_INTERVAL", value_name = "DURATION")]
    pub sample_interval: Option<String>,
    /// Address of the local Agent API [default: 127.0.0.1:7071].
    #[arg(long, env = "GPUFLEET_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Time between SIGTERM and SIGKILL when stopping a workload [default: 10s].
    #[arg(long, env = "GPUFLEET_STOP_GRACE_PERIOD", value_name = "DURATION")]
    pub stop_grace_period: Option<String>,
    /// Bound of the outbox of events not yet acknowledged by the controller,
    /// e.g. 64MiB; over it the oldest telemetry is dropped [default: 64MiB].
    #[arg(long, env = "GPUFLEET_OUTBOX_MAX_BYTES", value_name = "SIZE")]
    pub outbox_max_bytes: Option<Size>,
    /// Prometheus /metrics address, or "off" [default: 127.0.0.1:9400].
    #[arg(long, env = "GPUFLEET_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// NVML library to load [default: libnvidia-ml.so.1 from the loader path].
    #[arg(long, env = "GPUFLEET_NVML_LIBRARY_PATH", value_name = "PATH")]
    pub nvml_library_path: Option<PathBuf>,
    /// Also read XIDs from /dev/kmsg where readable [default: true].
    #[arg(long, env = "GPUFLEET_READ_KMSG", value_name = "BOOL", value_parser = boolean)]
    pub read_kmsg: Option<bool>,
    /// How shared GPU allocations are enforced: mps (CUDA MPS limits), time-slicing (memory watched), or auto (mps when the MPS daemon's pipe exists) [default: auto].
    #[arg(
        long,
        env = "GPUFLEET_GPU_SHARING",
        value_name = "auto|mps|time-slicing"
    )]
    pub gpu_sharing: Option<String>,
    /// Pipe directory of the node's CUDA MPS control daemon [default: /tmp/nvidia-mps].
    #[arg(long, env = "GPUFLEET_MPS_PIPE_DIRECTORY", value_name = "DIR")]
    pub mps_pipe_directory: Option<PathBuf>,
    /// CA (PEM) that signed the controller's certificate; use with an https:// controller.
    #[arg(long, env = "GPUFLEET_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// This agent's client certificate (PEM), for mutual TLS.
    #[arg(long, env = "GPUFLEET_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// This agent's client key (PEM), for mutual TLS.
    #[arg(long, env = "GPUFLEET_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Run workloads as this unprivileged user (and its primary group); needs the agent to run as root.
    #[arg(long, env = "GPUFLEET_WORKLOAD_USER", value_name = "USER")]
    pub workload_user: Option<String>,
    /// Bearer token the local Agent API requires; mandatory when --listen is not loopback.
    #[arg(
        long,
        env = "GPUFLEET_API_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub api_token: Option<String>,
    /// Cap on each allocation's output log, e.g. 64MiB; output beyond it is dropped [default: 64MiB].
    #[arg(long, env = "GPUFLEET_LOG_MAX_BYTES", value_name = "SIZE")]
    pub log_max_bytes: Option<Size>,
    /// How long a finished allocation's directory and log are kept after their last write, e.g. 7d or 12h; "off" keeps them [default: 7d].
    #[arg(long, env = "GPUFLEET_LOG_RETENTION", value_name = "DURATION")]
    pub log_retention: Option<String>,
    /// Most workload starts in progress at once (1-1024); more wait their turn [default: 16].
    #[arg(long, env = "GPUFLEET_MAX_CONCURRENT_STARTS", value_name = "N", value_parser = trimmed::<u64>)]
    pub max_concurrent_starts: Option<u64>,
    /// On SIGTERM, leave running workloads running for the next start to
    /// re-adopt (true), or stop them with their grace period (false) [default: true].
    #[arg(long, env = "GPUFLEET_KEEP_WORKLOADS_ON_EXIT", value_name = "BOOL", value_parser = boolean)]
    pub keep_workloads_on_exit: Option<bool>,
    /// Run container-image workloads with podman (the oci runtime); the agent then advertises oci [default: false].
    #[arg(long, env = "GPUFLEET_OCI_ENABLED", value_name = "BOOL", value_parser = boolean)]
    pub oci_enabled: Option<bool>,
    /// The podman executable of the oci runtime [default: podman from PATH].
    #[arg(long, env = "GPUFLEET_OCI_PODMAN", value_name = "PATH")]
    pub oci_podman: Option<PathBuf>,
    /// Host directories container jobs may mount from (and below), e.g. /data,/scratch [default: none].
    #[arg(long, env = "GPUFLEET_OCI_ALLOWED_MOUNTS", value_name = "LIST")]
    pub oci_allowed_mounts: Option<List<PathBuf>>,
    /// Directories of CDI specs; a GPU a spec names is given to containers as nvidia.com/gpu=<UUID> [default: /etc/cdi,/var/run/cdi].
    #[arg(long, env = "GPUFLEET_OCI_CDI_SPEC_DIRS", value_name = "LIST")]
    pub oci_cdi_spec_dirs: Option<List<PathBuf>>,
    /// Pull policy of image jobs that name none: always, missing or never [default: missing].
    #[arg(long, env = "GPUFLEET_OCI_PULL", value_name = "POLICY")]
    pub oci_pull: Option<String>,
    /// Longest one image pull may take [default: 30m].
    #[arg(long, env = "GPUFLEET_OCI_PULL_TIMEOUT", value_name = "DURATION")]
    pub oci_pull_timeout: Option<String>,
    /// The `[node]` table: who this node is and what it costs.
    #[command(flatten)]
    #[serde(default)]
    pub node: NodeSettings,
    /// The `[health]` table: when a GPU is unhealthy or degraded.
    #[command(flatten)]
    #[serde(default)]
    pub health: HealthSettings,
    /// The `[spot]` table: the cloud's interruption notices.
    #[command(flatten)]
    #[serde(default)]
    pub spot: SpotSettings,
}

/// `[spot]`.
#[derive(Debug, Clone, Default, Deserialize, Args)]
#[serde(deny_unknown_fields)]
pub struct SpotSettings {
    /// Cloud whose spot interruption notices to watch: none, aws, gcp or azure [default: none].
    #[arg(
        id = "spot.interruption_source",
        long = "interruption-source",
        env = "GPUFLEET_INTERRUPTION_SOURCE",
        value_name = "CLOUD"
    )]
    pub interruption_source: Option<String>,
    /// The metadata service's host:port [default: the cloud's documented one].
    #[arg(
        id = "spot.metadata_endpoint",
        long = "metadata-endpoint",
        env = "GPUFLEET_METADATA_ENDPOINT",
        value_name = "HOST:PORT"
    )]
    pub metadata_endpoint: Option<String>,
    /// Pause between looks at the metadata service [default: 5s].
    #[arg(
        id = "spot.poll_interval",
        long = "interruption-poll-interval",
        env = "GPUFLEET_INTERRUPTION_POLL_INTERVAL",
        value_name = "DURATION"
    )]
    pub poll_interval: Option<String>,
    /// Workloads are killed this long before the cloud's deadline [default: 5s].
    #[arg(
        id = "spot.stop_margin",
        long = "interruption-stop-margin",
        env = "GPUFLEET_INTERRUPTION_STOP_MARGIN",
        value_name = "DURATION"
    )]
    pub stop_margin: Option<String>,
}

/// `[node]`.
#[derive(Debug, Clone, Default, Deserialize, Args)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// Node id [default: /etc/machine-id, else the hostname].
    #[arg(
        id = "node.id",
        long = "node-id",
        env = "GPUFLEET_NODE_ID",
        value_name = "ID"
    )]
    pub id: Option<String>,
    /// Cloud or owner, e.g. aws, azure, lambda [default: onprem].
    #[arg(
        id = "node.provider",
        long = "provider",
        env = "GPUFLEET_PROVIDER",
        value_name = "PROVIDER"
    )]
    pub provider: Option<String>,
    /// Provider region, e.g. us-east-1 [default: local].
    #[arg(
        id = "node.region",
        long = "region",
        env = "GPUFLEET_REGION",
        value_name = "REGION"
    )]
    pub region: Option<String>,
    /// Availability zone [default: none].
    #[arg(
        id = "node.zone",
        long = "zone",
        env = "GPUFLEET_ZONE",
        value_name = "ZONE"
    )]
    pub zone: Option<String>,
    /// Instance type, e.g. p5.48xlarge [default: none].
    #[arg(
        id = "node.instance_type",
        long = "instance-type",
        env = "GPUFLEET_INSTANCE_TYPE",
        value_name = "INSTANCE_TYPE"
    )]
    pub instance_type: Option<String>,
    /// Price of one GPU for one hour, in USD [default: 0].
    #[arg(
        id = "node.price_per_gpu_hour_usd",
        long = "price-per-gpu-hour",
        env = "GPUFLEET_PRICE_PER_GPU_HOUR",
        value_name = "USD",
        value_parser = trimmed::<f64>
    )]
    pub price_per_gpu_hour_usd: Option<f64>,
    /// Spot / preemptible capacity [default: false].
    #[arg(
        id = "node.spot",
        long = "spot",
        env = "GPUFLEET_SPOT",
        value_name = "BOOL",
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = boolean
    )]
    pub spot: Option<bool>,
    /// Node labels, k=v,k=v [default: none].
    #[arg(
        id = "node.labels",
        long = "labels",
        env = "GPUFLEET_LABELS",
        value_name = "K=V,..."
    )]
    pub labels: Option<Labels>,
    /// Address other nodes reach this one at: a gang's MASTER_ADDR and
    /// GPUFLEET_PEERS [default: the private IPv4 address of the default
    /// route's interface, else 127.0.0.1].
    #[arg(
        id = "node.address",
        long = "advertise-address",
        env = "GPUFLEET_ADVERTISE_ADDRESS",
        value_name = "ADDRESS"
    )]
    pub address: Option<String>,
}

/// `[health]`.
#[derive(Debug, Clone, Default, Deserialize, Args)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    /// Fault-free time before an unhealthy GPU returns to service [default: 10m].
    #[arg(
        id = "health.clean_period",
        long = "health-clean-period",
        env = "GPUFLEET_HEALTH_CLEAN_PERIOD",
        value_name = "DURATION"
    )]
    pub clean_period: Option<String>,
    /// GPUs this host must have; fewer marks its GPUs unhealthy [default: not checked].
    #[arg(
        id = "health.expected_gpu_count",
        long = "expected-gpu-count",
        env = "GPUFLEET_EXPECTED_GPU_COUNT",
        value_name = "N",
        value_parser = gpu_count
    )]
    pub expected_gpu_count: Option<u32>,
    /// XIDs that mark a GPU unhealthy [default: 48,63,64,74,79,92,94,95,119,120].
    #[arg(
        id = "health.critical_xids",
        long = "critical-xids",
        env = "GPUFLEET_CRITICAL_XIDS",
        value_name = "LIST"
    )]
    pub critical_xids: Option<List<u32>>,
    /// XIDs blamed on the job, not the GPU [default: 13,31,43,45,68].
    #[arg(
        id = "health.application_xids",
        long = "application-xids",
        env = "GPUFLEET_APPLICATION_XIDS",
        value_name = "LIST"
    )]
    pub application_xids: Option<List<u32>>,
    /// HW/thermal slowdown lasting this long marks a GPU degraded [default: 60s].
    #[arg(
        id = "health.slowdown_degraded_after",
        long = "slowdown-degraded-after",
        env = "GPUFLEET_SLOWDOWN_DEGRADED_AFTER",
        value_name = "DURATION"
    )]
    pub slowdown_degraded_after: Option<String>,
    /// Correctable ECC errors per minute that mark a GPU degraded [default: 100].
    #[arg(
        id = "health.sbe_storm_per_minute",
        long = "sbe-storm-per-minute",
        env = "GPUFLEET_SBE_STORM_PER_MINUTE",
        value_name = "N",
        value_parser = trimmed::<u64>
    )]
    pub sbe_storm_per_minute: Option<u64>,
}

/// A GPU count; empty means "not checked" (0: no host has fewer).
fn gpu_count(s: &str) -> Result<u32, String> {
    if s.trim().is_empty() {
        return Ok(0);
    }
    trimmed(s)
}

/// A list: a TOML array, or `a,b` as a flag or variable (items trimmed,
/// empty ones skipped).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct List<T>(pub Vec<T>);

impl<T: FromStr> FromStr for List<T>
where
    T::Err: std::fmt::Display,
{
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| item.parse().map_err(|e| format!("{item:?} in {s:?}: {e}")))
            .collect::<Result<_, _>>()
            .map(List)
    }
}

/// Node labels: a TOML table, or `k=v,k=v` as a flag or variable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Labels(pub BTreeMap<String, String>);

impl FromStr for Labels {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut labels = BTreeMap::new();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not key=value"))?;
            let k = k.trim();
            if k.is_empty() {
                return Err(format!("{pair:?} has an empty key"));
            }
            labels.insert(k.to_string(), v.trim().to_string());
        }
        Ok(Labels(labels))
    }
}

/// A byte size as written: `67108864` (a TOML number) or `"64MiB"`;
/// [`gpufleet_core::parse_size`] reads it when the config is checked.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "SizeText")]
pub struct Size(pub String);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeText {
    Number(u64),
    Text(String),
}

impl From<SizeText> for Size {
    fn from(t: SizeText) -> Self {
        match t {
            SizeText::Number(n) => Size(n.to_string()),
            SizeText::Text(s) => Size(s),
        }
    }
}

impl FromStr for Size {
    type Err = Infallible;
    fn from_str(s: &str) -> Result<Self, Infallible> {
        Ok(Size(s.to_string()))
    }
}
