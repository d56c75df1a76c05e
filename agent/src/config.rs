//! Agent configuration: one TOML file, every key also an environment
//! variable (`GPUFLEET_*`) and a command-line flag.
//!
//! Precedence: flag > environment > file > default. The loader takes the
//! environment as a map so tests never touch the process environment.
//!
//! Defaults:
//! - `controller`: `http://127.0.0.1:7070`
//! - `join_token`: empty
//! - `node.id`: the contents of `/etc/machine-id`, else the hostname
//! - `node.provider`: `onprem`; `node.region`: `local`; `zone`, `instance_type`: empty
//! - `node.price_per_gpu_hour_usd`: 0; `node.spot`: false; `node.labels`: none
//! - `gpu_backend`: `nvml`; `simulated_gpus`: none (required with `simulated`)
//! - `data_dir`: `/var/lib/gpufleet-agent`
//! - `sample_interval`: 5s; `listen`: `127.0.0.1:7071`; `stop_grace_period`: 10s
//! - `outbox_max_bytes`: 64 MiB (events held for the controller while it is
//!   unreachable; over it the oldest telemetry is dropped)
//! - `log_max_bytes`: 64 MiB per allocation
//! - `log_retention`: 7d (a finished allocation's directory and log are
//!   deleted this long after its last write; `off` keeps them)
//! - `max_concurrent_starts`: 16 workload starts in progress at once
//! - `metrics_listen`: `127.0.0.1:9400` (dcgm-exporter's port; `off` disables)
//! - `nvml_library_path`: `libnvidia-ml.so.1` from the loader path
//! - `read_kmsg`: true (XIDs from /dev/kmsg where readable, nvml backend only)
//! - `[health]`: `clean_period` 10m, `expected_gpu_count` none,
//!   `critical_xids` [48, 63, 64, 74, 79, 92, 94, 95, 119, 120],
//!   `application_xids` [13, 31, 43, 45, 68], `slowdown_degraded_after` 60s,
//!   `sbe_storm_per_minute` 100 (see `health.rs` for what each means)

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::health::HealthPolicy;
use gpufleet_core::catalog;
use gpufleet_core::parse_size;

pub const DEFAULT_CONTROLLER: &str = "http://127.0.0.1:7070";
pub const DEFAULT_PROVIDER: &str = "onprem";
pub const DEFAULT_REGION: &str = "local";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/gpufleet-agent";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7071";
pub const DEFAULT_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_STOP_GRACE_PERIOD: Duration = Duration::from_secs(10);
/// How long a finished allocation's directory (its `output.log`) is kept.
pub const DEFAULT_LOG_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest `log_retention`: a log deleted sooner than this after its job
/// ended is a typo, not a policy.
pub const MIN_LOG_RETENTION: Duration = Duration::from_secs(60);
/// dcgm-exporter's port, so existing scrape configs find the agent.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9400";
/// Events held for an unreachable controller: at a 5s interval, 8 GPUs'
/// samples are about 3 KB, so 64 MiB is days of telemetry.
pub const DEFAULT_OUTBOX_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Largest `max_concurrent_starts`: each start in progress holds a thread
/// of its own, and no host starts this many workloads at once.
pub const MAX_CONCURRENT_STARTS_LIMIT: usize = 1024;
/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "GPUFLEET_CONFIG";

/// Everything the agent needs to run.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// Controller URL, e.g. `http://127.0.0.1:7070`.
    pub controller: String,
    /// Sent in `AgentHello.join_token` (may be empty).
    pub join_token: String,
    pub node: NodeConfig,
    pub gpu_backend: GpuBackendKind,
    /// Declarations such as `8xH100-SXM-80GB`, for the simulated backend.
    pub simulated_gpus: Vec<String>,
    /// Per-allocation directories and logs live under here.
    pub data_dir: PathBuf,
    pub sample_interval: Duration,
    /// Local `Agent` API address.
    pub listen: SocketAddr,
    /// Default time between SIGTERM and SIGKILL when stopping a workload.
    pub stop_grace_period: Duration,
    /// Metrics endpoint, NVML location, XID sources and health policy.
    pub monitoring: MonitoringConfig,
    /// TLS towards the controller (an `https://` controller URL).
    pub tls: TlsClientConfig,
    /// Run workloads as this (unprivileged) user and its primary group; the
    /// agent must run as root to switch. `None`: as the agent's own user.
    pub workload_user: Option<String>,
    /// Bearer token the local `Agent` API requires. Mandatory when `listen`
    /// is not a loopback address; `None` on loopback: no token.
    pub api_token: Option<String>,
    /// Bound of the outbox (events not yet acknowledged by the controller),
    /// in bytes. Over it the oldest telemetry is dropped; status never is.
    pub outbox_max_bytes: u64,
    /// Cap on each allocation's `output.log`; output beyond it is dropped
    /// after one marker line.
    pub log_max_bytes: u64,
    /// A finished allocation's directory (its `output.log`) is deleted
    /// this long after it was last written. `None`: kept forever.
    pub log_retention: Option<Duration>,
    /// Most workload starts (shim handshakes) in progress at once; more wait
    /// their turn. 1 to [`MAX_CONCURRENT_STARTS_LIMIT`].
    pub max_concurrent_starts: usize,
    /// Executable that runs the workloads' shims (started once as
    /// `<it> __shim-host`, which runs them). `None`: this executable,
    /// which must then call
    /// [`crate::shim::dispatch`] first thing in `main`. Not a file key:
    /// only embedders whose `main` is not theirs (test harnesses) set it.
    pub shim_program: Option<PathBuf>,
    /// On a clean shutdown (SIGTERM), leave running workloads running for
    /// the next agent start to re-adopt (an agent upgrade or restart does
    /// not kill jobs); `false`: stop them with their grace period.
    pub keep_workloads_on_exit: bool,
}

/// PEM files for dialling an `https://` controller. Without `ca`, the
/// controller's certificate must chain to a public root (webpki roots).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TlsClientConfig {
    /// CA that signed the controller's certificate.
    pub ca: Option<PathBuf>,
    /// This agent's client certificate and key, for mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Telemetry and health settings. `Default` is what embedders (tests,
/// `gpufleet dev`) want: no `/metrics` listener and no kernel log reader, so
/// several agents fit in one process; [`AgentConfig::load`] defaults
/// `metrics_listen` to [`DEFAULT_METRICS_LISTEN`] and `read_kmsg` to true.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MonitoringConfig {
    /// Prometheus `/metrics` address; `None` = no endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// NVML library to load instead of `libnvidia-ml.so.1`.
    pub nvml_library_path: Option<PathBuf>,
    /// Read XIDs from `/dev/kmsg` too (nvml backend only).
    pub read_kmsg: bool,
    pub health: HealthPolicy,
}

/// Who this node is and what it costs.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// `None`: `/etc/machine-id`, else the hostname (see [`default_node_id`]).
    pub id: Option<String>,
    pub provider: String,
    pub region: String,
    pub zone: String,
    pub instance_type: String,
    pub price_per_gpu_hour_usd: f64,
    pub spot: bool,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuBackendKind {
    Nvml,
    Simulated,
}

impl FromStr for GpuBackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "nvml" => Ok(Self::Nvml),
            "simulated" | "sim" => Ok(Self::Simulated),
            other => Err(format!(
                "unknown GPU backend {other:?}; expected nvml or simulated"
            )),
        }
    }
}

/// Why the configuration could not be loaded. One line each.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The config file. Keys mirror [`AgentConfig`]; unknown keys are errors.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    controller: Option<String>,
    join_token: Option<String>,
    gpu_backend: Option<String>,
    simulated_gpus: Option<Vec<String>>,
    data_dir: Option<PathBuf>,
    sample_interval: Option<String>,
    listen: Option<String>,
    stop_grace_period: Option<String>,
    metrics_listen: Option<String>,
    nvml_library_path: Option<PathBuf>,
    read_kmsg: Option<bool>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    workload_user: Option<String>,
    api_token: Option<String>,
    outbox_max_bytes: Option<FileBytes>,
    log_max_bytes: Option<FileBytes>,
    log_retention: Option<String>,
    max_concurrent_starts: Option<u64>,
    keep_workloads_on_exit: Option<bool>,
    #[serde(default)]
    node: FileNode,
    #[serde(default)]
    health: FileHealth,
}

/// A byte size in the file: `67108864` or `"64MiB"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileBytes {
    Number(u64),
    Text(String),
}

impl FileBytes {
    fn into_text(self) -> String {
        match self {
            FileBytes::Number(n) => n.to_string(),
            FileBytes::Text(s) => s,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHealth {
    clean_period: Option<String>,
    expected_gpu_count: Option<u32>,
    critical_xids: Option<Vec<u32>>,
    application_xids: Option<Vec<u32>>,
    slowdown_degraded_after: Option<String>,
    sbe_storm_per_minute: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNode {
    id: Option<String>,
    provider: Option<String>,
    region: Option<String>,
    zone: Option<String>,
    instance_type: Option<String>,
    price_per_gpu_hour_usd: Option<f64>,
    spot: Option<bool>,
    labels: Option<BTreeMap<String, String>>,
}

/// Values given on the command line, as text, so that flags and environment
/// variables go through the same parsing and errors. `None` = not given.
#[derive(Debug, Clone, Default)]
pub struct ConfigOverrides {
    pub config: Option<PathBuf>,
    pub controller: Option<String>,
    pub join_token: Option<String>,
    pub node_id: Option<String>,
    pub provider: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub instance_type: Option<String>,
    pub price_per_gpu_hour: Option<String>,
    pub spot: Option<String>,
    pub labels: Option<String>,
    pub gpu_backend: Option<String>,
    pub simulated_gpus: Option<String>,
    pub data_dir: Option<String>,
    pub sample_interval: Option<String>,
    pub listen: Option<String>,
    pub stop_grace_period: Option<String>,
    pub metrics_listen: Option<String>,
    pub nvml_library_path: Option<String>,
    pub read_kmsg: Option<String>,
    pub health_clean_period: Option<String>,
    pub expected_gpu_count: Option<String>,
    pub critical_xids: Option<String>,
    pub application_xids: Option<String>,
    pub slowdown_degraded_after: Option<String>,
    pub sbe_storm_per_minute: Option<String>,
    pub tls_ca: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub workload_user: Option<String>,
    pub api_token: Option<String>,
    pub outbox_max_bytes: Option<String>,
    pub log_max_bytes: Option<String>,
    pub log_retention: Option<String>,
    pub max_concurrent_starts: Option<String>,
    pub keep_workloads_on_exit: Option<String>,
}

/// (field, environment variable) for every key, in one table.
macro_rules! for_each_key {
    ($m:ident) => {
        $m!(controller, "GPUFLEET_CONTROLLER");
        $m!(join_token, "GPUFLEET_JOIN_TOKEN");
        $m!(node_id, "GPUFLEET_NODE_ID");
        $m!(provider, "GPUFLEET_PROVIDER");
        $m!(region, "GPUFLEET_REGION");
        $m!(zone, "GPUFLEET_ZONE");
        $m!(instance_type, "GPUFLEET_INSTANCE_TYPE");
        $m!(price_per_gpu_hour, "GPUFLEET_PRICE_PER_GPU_HOUR");
        $m!(spot, "GPUFLEET_SPOT");
        $m!(labels, "GPUFLEET_LABELS");
        $m!(gpu_backend, "GPUFLEET_GPU_BACKEND");
        $m!(simulated_gpus, "GPUFLEET_SIMULATED_GPUS");
        $m!(data_dir, "GPUFLEET_DATA_DIR");
        $m!(sample_interval, "GPUFLEET_SAMPLE_INTERVAL");
        $m!(listen, "GPUFLEET_LISTEN");
        $m!(stop_grace_period, "GPUFLEET_STOP_GRACE_PERIOD");
        $m!(metrics_listen, "GPUFLEET_METRICS_LISTEN");
        $m!(nvml_library_path, "GPUFLEET_NVML_LIBRARY_PATH");
        $m!(read_kmsg, "GPUFLEET_READ_KMSG");
        $m!(health_clean_period, "GPUFLEET_HEALTH_CLEAN_PERIOD");
        $m!(expected_gpu_count, "GPUFLEET_EXPECTED_GPU_COUNT");
        $m!(critical_xids, "GPUFLEET_CRITICAL_XIDS");
        $m!(application_xids, "GPUFLEET_APPLICATION_XIDS");
        $m!(slowdown_degraded_after, "GPUFLEET_SLOWDOWN_DEGRADED_AFTER");
        $m!(sbe_storm_per_minute, "GPUFLEET_SBE_STORM_PER_MINUTE");
        $m!(tls_ca, "GPUFLEET_TLS_CA");
        $m!(tls_cert, "GPUFLEET_TLS_CERT");
        $m!(tls_key, "GPUFLEET_TLS_KEY");
        $m!(workload_user, "GPUFLEET_WORKLOAD_USER");
        $m!(api_token, "GPUFLEET_API_TOKEN");
        $m!(outbox_max_bytes, "GPUFLEET_OUTBOX_MAX_BYTES");
        $m!(log_max_bytes, "GPUFLEET_LOG_MAX_BYTES");
        $m!(log_retention, "GPUFLEET_LOG_RETENTION");
        $m!(max_concurrent_starts, "GPUFLEET_MAX_CONCURRENT_STARTS");
        $m!(keep_workloads_on_exit, "GPUFLEET_KEEP_WORKLOADS_ON_EXIT");
    };
}

impl ConfigOverrides {
    /// Reads the `GPUFLEET_*` variables out of an environment map.
    pub fn from_env(env: &HashMap<String, String>) -> Self {
        let mut o = Self {
            config: env
                .get(CONFIG_ENV)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            ..Self::default()
        };
        macro_rules! take {
            ($field:ident, $var:literal) => {
                o.$field = env.get($var).cloned();
            };
        }
        for_each_key!(take);
        o
    }

    /// `self` where set, else `lower`.
    fn or(self, lower: Self) -> Self {
        let mut o = self;
        o.config = o.config.or(lower.config);
        macro_rules! merge {
            ($field:ident, $var:literal) => {
                o.$field = o.$field.or(lower.$field);
            };
        }
        for_each_key!(merge);
        o
    }
}

fn parse_duration(key: &'static str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s.trim())
        .map_err(|e| invalid(key, format!("{s:?} is not a duration like \"5s\" ({e})")))
}

/// A duration, or `off` (never).
fn parse_retention(key: &'static str, s: &str) -> Result<Option<Duration>, ConfigError> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    humantime::parse_duration(s.trim()).map(Some).map_err(|e| {
        invalid(
            key,
            format!("{s:?} is not a duration like \"7d\" or \"12h\", or \"off\" ({e})"),
        )
    })
}

fn parse_bytes(key: &'static str, s: &str) -> Result<u64, ConfigError> {
    parse_size(s).map_err(|message| invalid(key, message))
}

fn parse_u64(key: &'static str, s: &str) -> Result<u64, ConfigError> {
    s.trim()
        .parse()
        .map_err(|_| invalid(key, format!("{s:?} is not a whole number")))
}

/// `79, 48` → {48, 79}.
fn parse_xids(key: &'static str, s: &str) -> Result<BTreeSet<u32>, ConfigError> {
    split_list(s)
        .iter()
        .map(|x| {
            x.parse()
                .map_err(|_| invalid(key, format!("{x:?} is not an XID number (list: 48,79)")))
        })
        .collect()
}

fn health_policy(o: &ConfigOverrides, file: FileHealth) -> Result<HealthPolicy, ConfigError> {
    let d = HealthPolicy::default();
    Ok(HealthPolicy {
        clean_period: match o.health_clean_period.clone().or(file.clean_period) {
            Some(s) => parse_duration("health.clean_period", &s)?,
            None => d.clean_period,
        },
        expected_gpu_count: match &o.expected_gpu_count {
            Some(s) if s.trim().is_empty() => None,
            Some(s) => Some(
                u32::try_from(parse_u64("health.expected_gpu_count", s)?)
                    .map_err(|_| invalid("health.expected_gpu_count", "is too large"))?,
            ),
            None => file.expected_gpu_count,
        },
        critical_xids: match &o.critical_xids {
            Some(s) => parse_xids("health.critical_xids", s)?,
            None => file
                .critical_xids
                .map_or(d.critical_xids, |v| v.into_iter().collect()),
        },
        application_xids: match &o.application_xids {
            Some(s) => parse_xids("health.application_xids", s)?,
            None => file
                .application_xids
                .map_or(d.application_xids, |v| v.into_iter().collect()),
        },
        slowdown_degraded_after: match o
            .slowdown_degraded_after
            .clone()
            .or(file.slowdown_degraded_after)
        {
            Some(s) => parse_duration("health.slowdown_degraded_after", &s)?,
            None => d.slowdown_degraded_after,
        },
        sbe_storm_per_minute: match &o.sbe_storm_per_minute {
            Some(s) => parse_u64("health.sbe_storm_per_minute", s)?,
            None => file.sbe_storm_per_minute.unwrap_or(d.sbe_storm_per_minute),
        },
    })
}

fn parse_bool(key: &'static str, s: &str) -> Result<bool, ConfigError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(invalid(key, format!("{s:?} is not true or false"))),
    }
}

/// Parses `k=v,k=v` labels.
fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut labels = BTreeMap::new();
    for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| invalid("labels", format!("{pair:?} is not key=value")))?;
        let k = k.trim();
        if k.is_empty() {
            return Err(invalid("labels", format!("{pair:?} has an empty key")));
        }
        labels.insert(k.to_string(), v.trim().to_string());
    }
    Ok(labels)
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect()
}

impl AgentConfig {
    /// What embedders start from (tests, `gpufleet dev`, benchmarks): an
    /// agent with simulated GPUs (`simulated_gpus`, e.g. `8xH100-SXM-80GB`),
    /// its API on `127.0.0.1:0`, no `/metrics`, the default sampling, grace
    /// period and bounds, and workloads stopped with the agent (embedders
    /// leave nothing running). Change fields with struct update syntax.
    pub fn simulated(
        controller: impl Into<String>,
        join_token: impl Into<String>,
        node: NodeConfig,
        simulated_gpus: Vec<String>,
        data_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            controller: controller.into(),
            join_token: join_token.into(),
            node,
            gpu_backend: GpuBackendKind::Simulated,
            simulated_gpus,
            data_dir: data_dir.into(),
            sample_interval: DEFAULT_SAMPLE_INTERVAL,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            stop_grace_period: DEFAULT_STOP_GRACE_PERIOD,
            monitoring: MonitoringConfig::default(),
            tls: TlsClientConfig::default(),
            workload_user: None,
            api_token: None,
            outbox_max_bytes: DEFAULT_OUTBOX_MAX_BYTES,
            log_max_bytes: crate::supervisor::DEFAULT_LOG_MAX_BYTES,
            log_retention: Some(DEFAULT_LOG_RETENTION),
            max_concurrent_starts: crate::supervisor::DEFAULT_MAX_CONCURRENT_STARTS,
            shim_program: None,
            keep_workloads_on_exit: false,
        }
    }

    /// Loads the configuration: the file named by `overrides.config` or
    /// `GPUFLEET_CONFIG` (optional), then `GPUFLEET_*` variables from `env`,
    /// then `overrides` (the command line), then validates the result.
    pub fn load(
        env: &HashMap<String, String>,
        overrides: ConfigOverrides,
    ) -> Result<Self, ConfigError> {
        let o = overrides.or(ConfigOverrides::from_env(env));
        let file = match &o.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let health = health_policy(&o, file.health)?;
        let node = NodeConfig {
            id: o.node_id.or(file.node.id).filter(|s| !s.trim().is_empty()),
            provider: o
                .provider
                .or(file.node.provider)
                .unwrap_or_else(|| DEFAULT_PROVIDER.into()),
            region: o
                .region
                .or(file.node.region)
                .unwrap_or_else(|| DEFAULT_REGION.into()),
            zone: o.zone.or(file.node.zone).unwrap_or_default(),
            instance_type: o
                .instance_type
                .or(file.node.instance_type)
                .unwrap_or_default(),
            price_per_gpu_hour_usd: match o.price_per_gpu_hour {
                Some(s) => s.trim().parse().map_err(|_| {
                    invalid("price_per_gpu_hour_usd", format!("{s:?} is not a number"))
                })?,
                None => file.node.price_per_gpu_hour_usd.unwrap_or(0.0),
            },
            spot: match o.spot {
                Some(s) => parse_bool("spot", &s)?,
                None => file.node.spot.unwrap_or(false),
            },
            labels: match o.labels {
                Some(s) => parse_labels(&s)?,
                None => file.node.labels.unwrap_or_default(),
            },
        };
        let config = AgentConfig {
            controller: o
                .controller
                .or(file.controller)
                .unwrap_or_else(|| DEFAULT_CONTROLLER.into()),
            join_token: o.join_token.or(file.join_token).unwrap_or_default(),
            node,
            gpu_backend: match o.gpu_backend.or(file.gpu_backend) {
                Some(s) => s.parse().map_err(|e| invalid("gpu_backend", e))?,
                None => GpuBackendKind::Nvml,
            },
            simulated_gpus: match o.simulated_gpus {
                Some(s) => split_list(&s),
                None => file.simulated_gpus.unwrap_or_default(),
            },
            data_dir: o
                .data_dir
                .map(PathBuf::from)
                .or(file.data_dir)
                .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            sample_interval: match o.sample_interval.or(file.sample_interval) {
                Some(s) => parse_duration("sample_interval", &s)?,
                None => DEFAULT_SAMPLE_INTERVAL,
            },
            listen: {
                let s = o
                    .listen
                    .or(file.listen)
                    .unwrap_or_else(|| DEFAULT_LISTEN.into());
                s.trim().parse().map_err(|_| {
                    invalid(
                        "listen",
                        format!("{s:?} is not an address like 127.0.0.1:7071"),
                    )
                })?
            },
            stop_grace_period: match o.stop_grace_period.or(file.stop_grace_period) {
                Some(s) => parse_duration("stop_grace_period", &s)?,
                None => DEFAULT_STOP_GRACE_PERIOD,
            },
            monitoring: MonitoringConfig {
                metrics_listen: {
                    let s = o
                        .metrics_listen
                        .or(file.metrics_listen)
                        .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.into());
                    match s.trim() {
                        "" | "off" | "none" => None,
                        t => Some(t.parse().map_err(|_| {
                            invalid(
                                "metrics_listen",
                                format!("{s:?} is not an address like 127.0.0.1:9400 (or off)"),
                            )
                        })?),
                    }
                },
                nvml_library_path: o
                    .nvml_library_path
                    .map(PathBuf::from)
                    .or(file.nvml_library_path)
                    .filter(|p| !p.as_os_str().is_empty()),
                read_kmsg: match o.read_kmsg {
                    Some(s) => parse_bool("read_kmsg", &s)?,
                    None => file.read_kmsg.unwrap_or(true),
                },
                health,
            },
            tls: TlsClientConfig {
                ca: o.tls_ca.map(PathBuf::from).or(file.tls_ca),
                cert: o.tls_cert.map(PathBuf::from).or(file.tls_cert),
                key: o.tls_key.map(PathBuf::from).or(file.tls_key),
            },
            workload_user: o
                .workload_user
                .or(file.workload_user)
                .filter(|u| !u.trim().is_empty()),
            api_token: o
                .api_token
                .or(file.api_token)
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
            outbox_max_bytes: match o
                .outbox_max_bytes
                .or(file.outbox_max_bytes.map(FileBytes::into_text))
            {
                Some(s) => parse_bytes("outbox_max_bytes", &s)?,
                None => DEFAULT_OUTBOX_MAX_BYTES,
            },
            log_max_bytes: match o
                .log_max_bytes
                .or(file.log_max_bytes.map(FileBytes::into_text))
            {
                Some(s) => parse_bytes("log_max_bytes", &s)?,
                None => crate::supervisor::DEFAULT_LOG_MAX_BYTES,
            },
            log_retention: match o.log_retention.or(file.log_retention) {
                Some(s) => parse_retention("log_retention", &s)?,
                None => Some(DEFAULT_LOG_RETENTION),
            },
            max_concurrent_starts: {
                let n = match o.max_concurrent_starts {
                    Some(s) => parse_u64("max_concurrent_starts", &s)?,
                    None => file
                        .max_concurrent_starts
                        .unwrap_or(crate::supervisor::DEFAULT_MAX_CONCURRENT_STARTS as u64),
                };
                // Anything past the limit is refused by `validate`.
                usize::try_from(n).unwrap_or(usize::MAX)
            },
            shim_program: None,
            keep_workloads_on_exit: match o.keep_workloads_on_exit {
                Some(s) => parse_bool("keep_workloads_on_exit", &s)?,
                None => file.keep_workloads_on_exit.unwrap_or(true),
            },
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = self.controller.trim();
        if !(url.starts_with("http://") || url.starts_with("https://"))
            || tonic::transport::Endpoint::from_shared(url.to_string()).is_err()
        {
            return Err(invalid(
                "controller",
                format!("{url:?} is not a URL like http://controller:7070"),
            ));
        }
        let price = self.node.price_per_gpu_hour_usd;
        if !price.is_finite() || price < 0.0 {
            return Err(invalid(
                "price_per_gpu_hour_usd",
                format!("{price} must be a finite number >= 0"),
            ));
        }
        if self.node.provider.trim().is_empty() {
            return Err(invalid("provider", "must not be empty"));
        }
        if self.node.region.trim().is_empty() {
            return Err(invalid("region", "must not be empty"));
        }
        if !self.listen.ip().is_loopback() && self.api_token.is_none() {
            return Err(invalid(
                "listen",
                format!(
                    "{} is not a loopback address, so the Agent API would be open to the network: set api_token (GPUFLEET_API_TOKEN), or listen on 127.0.0.1",
                    self.listen
                ),
            ));
        }
        if let Some(token) = &self.api_token
            && (token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(invalid(
                "api_token",
                "must be at least 16 printable characters without spaces (e.g. `openssl rand -hex 32`)",
            ));
        }
        if self.sample_interval.is_zero() {
            return Err(invalid("sample_interval", "must be greater than zero"));
        }
        if self.gpu_backend == GpuBackendKind::Simulated {
            if self.simulated_gpus.is_empty() {
                return Err(invalid(
                    "simulated_gpus",
                    "the simulated backend needs at least one declaration, e.g. 8xH100-SXM-80GB",
                ));
            }
            for decl in &self.simulated_gpus {
                catalog::parse_gpu_declaration(decl)
                    .map_err(|e| invalid("simulated_gpus", e.to_string()))?;
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        if self.log_max_bytes == 0 {
            return Err(invalid(
                "log_max_bytes",
                "must be greater than zero (e.g. 64MiB)",
            ));
        }
        if let Some(retention) = self.log_retention
            && retention < MIN_LOG_RETENTION
        {
            return Err(invalid(
                "log_retention",
                format!(
                    "{} is too short: logs would be deleted before anyone reads them; use at least 1m (the default is 7d), or \"off\" to keep them",
                    humantime::format_duration(retention)
                ),
            ));
        }
        if !(1..=MAX_CONCURRENT_STARTS_LIMIT).contains(&self.max_concurrent_starts) {
            return Err(invalid(
                "max_concurrent_starts",
                format!(
                    "{} must be from 1 to {MAX_CONCURRENT_STARTS_LIMIT} (the default is {}: a full node's workloads start at once)",
                    self.max_concurrent_starts,
                    crate::supervisor::DEFAULT_MAX_CONCURRENT_STARTS
                ),
            ));
        }
        let health = &self.monitoring.health;
        if health.clean_period.is_zero() {
            return Err(invalid("health.clean_period", "must be greater than zero"));
        }
        if let Some(xid) = health
            .critical_xids
            .intersection(&health.application_xids)
            .next()
        {
            return Err(invalid(
                "health.critical_xids",
                format!("XID {xid} is also in application_xids; list it in one of them"),
            ));
        }
        if self.outbox_max_bytes == 0 {
            return Err(invalid(
                "outbox_max_bytes",
                "must be greater than zero, e.g. 64MiB",
            ));
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(invalid(
                "tls_cert",
                "tls_cert and tls_key go together: give both (mutual TLS) or neither",
            ));
        }
        Ok(())
    }

    /// Price in integer micro-USD, as the protos carry it.
    pub fn price_micro_usd(&self) -> u64 {
        (self.node.price_per_gpu_hour_usd * 1_000_000.0).round() as u64
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        // toml's message spans several lines (it quotes the source); keep the
        // first line, which names the key, plus the position.
        message: one_line_toml_error(&e),
    })
}

fn one_line_toml_error(e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => format!("{msg} (at byte {})", span.start),
        None => msg,
    }
}

/// The node id used when none is configured: `/etc/machine-id` (trimmed),
/// else the hostname, else `localhost`.
pub fn default_node_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| {
            hostname::get()
                .ok()
                .map(|h| h.to_string_lossy().into_owned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    #[test]
    fn defaults_apply_without_any_source() {
        let c = AgentConfig::load(&HashMap::new(), ConfigOverrides::default()).unwrap();
        assert_eq!(c.controller, DEFAULT_CONTROLLER);
        assert_eq!(c.node.provider, "onprem");
        assert_eq!(c.node.region, "local");
        assert_eq!(c.node.id, None);
        assert_eq!(c.gpu_backend, GpuBackendKind::Nvml);
        assert_eq!(c.sample_interval, Duration::from_secs(5));
        assert_eq!(c.stop_grace_period, Duration::from_secs(10));
        assert_eq!(c.listen, "127.0.0.1:7071".parse().unwrap());
        assert_eq!(c.outbox_max_bytes, 64 * 1024 * 1024);
    }

    #[test]
    fn outbox_bound_takes_a_number_or_a_size_from_every_source() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "outbox_max_bytes = 1048576\n").unwrap();
        let from_file = |env: &[(&str, &str)]| {
            let mut pairs = vec![("GPUFLEET_CONFIG", file.to_str().unwrap())];
            pairs.extend_from_slice(env);
            AgentConfig::load(&self::env(&pairs), ConfigOverrides::default()).unwrap()
        };
        assert_eq!(from_file(&[]).outbox_max_bytes, 1 << 20);
        assert_eq!(
            from_file(&[("GPUFLEET_OUTBOX_MAX_BYTES", "2 MiB")]).outbox_max_bytes,
            2 << 20
        );
        std::fs::write(&file, "outbox_max_bytes = \"512KiB\"\n").unwrap();
        assert_eq!(from_file(&[]).outbox_max_bytes, 512 << 10);
        let flags = ConfigOverrides {
            outbox_max_bytes: Some("1GB".into()),
            ..Default::default()
        };
        let c = AgentConfig::load(&env(&[("GPUFLEET_OUTBOX_MAX_BYTES", "5MiB")]), flags).unwrap();
        assert_eq!(c.outbox_max_bytes, 1_000_000_000);
        std::fs::write(&file, "outbox_max_byte = 5\n").unwrap();
        let err = AgentConfig::load(
            &env(&[("GPUFLEET_CONFIG", file.to_str().unwrap())]),
            ConfigOverrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("outbox_max_byte"), "{err}");
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let path = fixture("full.toml");
        let e = env(&[
            ("GPUFLEET_CONFIG", path.to_str().unwrap()),
            ("GPUFLEET_REGION", "eu-west-1"),
            ("GPUFLEET_ZONE", "eu-west-1b"),
            ("GPUFLEET_LABELS", "team=ml, tier=gold"),
            ("GPUFLEET_SAMPLE_INTERVAL", "2s"),
        ]);
        let flags = ConfigOverrides {
            zone: Some("eu-west-1c".into()),
            spot: Some("false".into()),
            ..Default::default()
        };
        let c = AgentConfig::load(&e, flags).unwrap();
        // File only.
        assert_eq!(c.node.provider, "aws");
        assert_eq!(c.node.id.as_deref(), Some("gpu-node-1"));
        assert_eq!(c.simulated_gpus, ["8xH100-SXM-80GB"]);
        assert_eq!(c.gpu_backend, GpuBackendKind::Simulated);
        assert!((c.node.price_per_gpu_hour_usd - 3.93).abs() < 1e-9);
        assert_eq!(c.price_micro_usd(), 3_930_000);
        assert_eq!(c.stop_grace_period, Duration::from_secs(30));
        assert_eq!(c.log_max_bytes, 16 << 20);
        assert_eq!(c.log_retention, Some(Duration::from_secs(3 * 24 * 3600)));
        assert_eq!(c.max_concurrent_starts, 4);
        // Env over file.
        assert_eq!(c.node.region, "eu-west-1");
        assert_eq!(c.sample_interval, Duration::from_secs(2));
        assert_eq!(
            c.node.labels,
            BTreeMap::from([("team".into(), "ml".into()), ("tier".into(), "gold".into())])
        );
        // Flag over env and file (the file says spot = true).
        assert_eq!(c.node.zone, "eu-west-1c");
        assert!(!c.node.spot);
    }

    #[test]
    fn unknown_key_is_named() {
        let flags = ConfigOverrides {
            config: Some(fixture("unknown_key.toml")),
            ..Default::default()
        };
        let err = AgentConfig::load(&HashMap::new(), flags)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sample_intervall"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn bad_values_are_rejected() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "GPUFLEET_PRICE_PER_GPU_HOUR",
                "-1",
                "price_per_gpu_hour_usd",
            ),
            (
                "GPUFLEET_PRICE_PER_GPU_HOUR",
                "NaN",
                "price_per_gpu_hour_usd",
            ),
            (
                "GPUFLEET_PRICE_PER_GPU_HOUR",
                "cheap",
                "price_per_gpu_hour_usd",
            ),
            ("GPUFLEET_SAMPLE_INTERVAL", "0s", "sample_interval"),
            ("GPUFLEET_SAMPLE_INTERVAL", "soon", "sample_interval"),
            ("GPUFLEET_PROVIDER", " ", "provider"),
            ("GPUFLEET_REGION", "", "region"),
            ("GPUFLEET_GPU_BACKEND", "cuda", "gpu_backend"),
            ("GPUFLEET_LISTEN", "localhost", "listen"),
            ("GPUFLEET_CONTROLLER", "controller:7070", "controller"),
            ("GPUFLEET_LABELS", "novalue", "labels"),
            ("GPUFLEET_SPOT", "maybe", "spot"),
            ("GPUFLEET_OUTBOX_MAX_BYTES", "0", "outbox_max_bytes"),
            ("GPUFLEET_OUTBOX_MAX_BYTES", "lots", "outbox_max_bytes"),
            ("GPUFLEET_OUTBOX_MAX_BYTES", "64PiB", "outbox_max_bytes"),
            (
                "GPUFLEET_OUTBOX_MAX_BYTES",
                "99999999999GiB",
                "outbox_max_bytes",
            ),
            ("GPUFLEET_LOG_MAX_BYTES", "lots", "log_max_bytes"),
            ("GPUFLEET_LOG_MAX_BYTES", "64TiB", "log_max_bytes"),
            ("GPUFLEET_LOG_MAX_BYTES", "0", "log_max_bytes"),
            (
                "GPUFLEET_MAX_CONCURRENT_STARTS",
                "0",
                "max_concurrent_starts",
            ),
            (
                "GPUFLEET_MAX_CONCURRENT_STARTS",
                "-1",
                "max_concurrent_starts",
            ),
            (
                "GPUFLEET_MAX_CONCURRENT_STARTS",
                "many",
                "max_concurrent_starts",
            ),
            (
                "GPUFLEET_MAX_CONCURRENT_STARTS",
                "99999999999999999999",
                "max_concurrent_starts",
            ),
            (
                "GPUFLEET_MAX_CONCURRENT_STARTS",
                "1025",
                "max_concurrent_starts",
            ),
        ];
        for (var, value, key) in cases {
            let err = AgentConfig::load(&env(&[(var, value)]), ConfigOverrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{var}={value}: {err}");
        }
        let err = AgentConfig::load(
            &env(&[
                ("GPUFLEET_GPU_BACKEND", "simulated"),
                ("GPUFLEET_SIMULATED_GPUS", "2xH101"),
            ]),
            ConfigOverrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("H100-SXM-80GB"), "{err}");
    }

    #[test]
    fn monitoring_keys_parse_and_are_checked() {
        let c = AgentConfig::load(
            &env(&[
                ("GPUFLEET_METRICS_LISTEN", "off"),
                ("GPUFLEET_CRITICAL_XIDS", "79, 48"),
                ("GPUFLEET_EXPECTED_GPU_COUNT", "8"),
                ("GPUFLEET_HEALTH_CLEAN_PERIOD", "2m"),
                ("GPUFLEET_NVML_LIBRARY_PATH", "/opt/libnvidia-ml.so.1"),
            ]),
            ConfigOverrides::default(),
        )
        .unwrap();
        let m = &c.monitoring;
        assert_eq!(m.metrics_listen, None);
        assert_eq!(m.health.critical_xids, BTreeSet::from([48, 79]));
        assert_eq!(m.health.expected_gpu_count, Some(8));
        assert_eq!(m.health.clean_period, Duration::from_secs(120));
        assert_eq!(
            m.nvml_library_path.as_deref(),
            Some(Path::new("/opt/libnvidia-ml.so.1"))
        );
        let d = AgentConfig::load(&HashMap::new(), ConfigOverrides::default()).unwrap();
        assert_eq!(
            d.monitoring.metrics_listen,
            Some("127.0.0.1:9400".parse().unwrap())
        );
        assert!(d.monitoring.read_kmsg);
        for (var, value, key) in [
            ("GPUFLEET_METRICS_LISTEN", "9400", "metrics_listen"),
            ("GPUFLEET_CRITICAL_XIDS", "79,x", "health.critical_xids"),
            ("GPUFLEET_CRITICAL_XIDS", "13", "health.critical_xids"),
            ("GPUFLEET_HEALTH_CLEAN_PERIOD", "0s", "health.clean_period"),
            (
                "GPUFLEET_EXPECTED_GPU_COUNT",
                "-1",
                "health.expected_gpu_count",
            ),
        ] {
            let err = AgentConfig::load(&env(&[(var, value)]), ConfigOverrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{var}={value}: {err}");
        }
    }

    #[test]
    fn max_concurrent_starts_comes_from_the_file_env_or_flag() {
        let load = |vars: &[(&str, &str)], flag: Option<&str>| {
            AgentConfig::load(
                &env(vars),
                ConfigOverrides {
                    max_concurrent_starts: flag.map(String::from),
                    ..Default::default()
                },
            )
            .unwrap()
            .max_concurrent_starts
        };
        assert_eq!(load(&[], None), 16);
        assert_eq!(load(&[("GPUFLEET_MAX_CONCURRENT_STARTS", " 2 ")], None), 2);
        assert_eq!(
            load(&[("GPUFLEET_MAX_CONCURRENT_STARTS", "2")], Some("1024")),
            1024
        );
        let err = AgentConfig::load(
            &env(&[]),
            ConfigOverrides {
                max_concurrent_starts: Some("0".into()),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("max_concurrent_starts") && err.contains("from 1 to 1024"),
            "{err}"
        );
    }

    #[test]
    fn log_max_bytes_takes_sizes_with_units() {
        let load = |value: &str| {
            AgentConfig::load(
                &env(&[("GPUFLEET_LOG_MAX_BYTES", value)]),
                ConfigOverrides::default(),
            )
            .unwrap()
            .log_max_bytes
        };
        assert_eq!(load("1000"), 1000);
        assert_eq!(load("64MiB"), 64 << 20);
        assert_eq!(load(" 2 G "), 2 << 30);
        assert_eq!(load("512k"), 512 << 10);
        let d = AgentConfig::load(&HashMap::new(), ConfigOverrides::default()).unwrap();
        assert_eq!(d.log_max_bytes, 64 << 20);
        assert_eq!(d.shim_program, None);
        assert!(
            d.keep_workloads_on_exit,
            "agent restarts keep jobs by default"
        );
        let stop = AgentConfig::load(
            &env(&[("GPUFLEET_KEEP_WORKLOADS_ON_EXIT", "false")]),
            ConfigOverrides::default(),
        )
        .unwrap();
        assert!(!stop.keep_workloads_on_exit);
    }

    #[test]
    fn log_retention_takes_a_duration_or_off_from_every_source() {
        let load = |env_value: Option<&str>, flag: Option<&str>| {
            let vars: Vec<(&str, &str)> = env_value
                .map(|v| ("GPUFLEET_LOG_RETENTION", v))
                .into_iter()
                .collect();
            AgentConfig::load(
                &env(&vars),
                ConfigOverrides {
                    log_retention: flag.map(str::to_string),
                    ..Default::default()
                },
            )
            .map(|c| c.log_retention)
        };
        assert_eq!(load(None, None).unwrap(), Some(DEFAULT_LOG_RETENTION));
        assert_eq!(
            load(Some("12h"), None).unwrap(),
            Some(Duration::from_secs(12 * 3600))
        );
        assert_eq!(load(Some("12h"), Some(" OFF ")).unwrap(), None);
        assert_eq!(load(None, Some("1m")).unwrap(), Some(MIN_LOG_RETENTION));
        for bad in ["30s", "0s", "soon", ""] {
            let err = load(Some(bad), None).unwrap_err().to_string();
            assert!(err.contains("log_retention"), "{bad:?}: {err}");
        }
        let err = load(Some("30s"), None).unwrap_err().to_string();
        assert!(err.contains("at least 1m") && err.contains("off"), "{err}");
        let err = load(Some("soon"), None).unwrap_err().to_string();
        assert!(err.contains("\"7d\""), "{err}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let flags = ConfigOverrides {
            config: Some(fixture("does-not-exist.toml")),
            ..Default::default()
        };
        let err = AgentConfig::load(&HashMap::new(), flags).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }

    #[test]
    fn example_config_is_valid() {
        let flags = ConfigOverrides {
            config: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml")),
            ..Default::default()
        };
        AgentConfig::load(&HashMap::new(), flags).unwrap();
    }
}
