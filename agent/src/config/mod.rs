//! Agent configuration: the runtime [`AgentConfig`] and how it is loaded.
//! The keys are declared once, in [`settings`] (file, environment and
//! flags); [`load`] layers them (file ← environment ← flags, the
//! environment an injected map) and checks the result into an
//! [`AgentConfig`] with errors that name the key. Defaults are in each
//! key's help text and in docs/configuration.md.

mod settings;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::CommandFactory;
use gpufleet_core::layered::{Layers, invalid, read_file};

use crate::health::HealthPolicy;
use crate::sharing::{DEFAULT_MPS_PIPE_DIRECTORY, SharingMode};
use gpufleet_core::parse_size;

pub use gpufleet_core::layered::ConfigError;
pub use settings::{
    AgentCli, AgentSettings, HealthSettings, Labels, List, LogFormat, NodeSettings, Size,
};

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
    /// Spot interruption notices to watch for; `None`: none.
    pub interruptions: Option<InterruptionConfig>,
    /// How shared GPU allocations are enforced (`crate::sharing`).
    pub gpu_sharing: SharingConfig,
    /// The oci runtime (container images through podman); `None`: off.
    pub oci: Option<crate::runtime::oci::OciSettings>,
}

/// The `gpu_sharing` and `mps_pipe_directory` keys. `Default` (what
/// embedders get) is time-slicing, so tests never depend on whether the
/// machine runs an MPS daemon; [`AgentConfig::load`] defaults to `auto`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SharingConfig {
    pub mode: SharingMode,
    pub mps_pipe_directory: PathBuf,
}

/// Where the agent reads its cloud's spot interruption notices.
#[derive(Debug, Clone, PartialEq)]
pub struct InterruptionConfig {
    pub cloud: crate::interruption::cloud::Cloud,
    pub endpoint: crate::interruption::http::Endpoint,
    pub poll_interval: Duration,
    pub stop_margin: Duration,
}

pub const DEFAULT_INTERRUPTION_POLL_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_INTERRUPTION_STOP_MARGIN: Duration = Duration::from_secs(5);

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
    /// `None`: [`default_advertise_address`].
    pub address: Option<String>,
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

/// A loaded configuration and the binary's own flags.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: AgentConfig,
    pub log_format: LogFormat,
}

/// Loads the agent's configuration from its command line `argv` (program
/// name first) and environment `env`: the file named by `--config` or
/// `GPUFLEET_CONFIG` (optional), then the `GPUFLEET_*` variables, then the
/// flags; then checks the result.
pub fn load<I, T>(argv: I, env: &HashMap<String, String>) -> Result<Loaded, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cmd = AgentCli::command();
    let layers = Layers::parse(&cmd, env, argv)?;
    let path = layers.config_file();
    let settings = match &path {
        Some(path) => read_file(path)?,
        None => AgentSettings::default(),
    };
    let mut cli = AgentCli {
        config: path,
        log_format: None,
        settings,
    };
    layers.apply(&cmd, &mut cli)?;
    Ok(Loaded {
        config: AgentConfig::from_settings(cli.settings)?,
        log_format: cli.log_format.unwrap_or_default(),
    })
}

/// The oci runtime's settings, when `oci_enabled`; its other keys are
/// checked either way.
fn oci_settings(
    enabled: Option<bool>,
    podman: Option<PathBuf>,
    allowed_mounts: Option<settings::List<PathBuf>>,
    cdi_spec_dirs: Option<settings::List<PathBuf>>,
    pull: Option<String>,
    pull_timeout: Option<String>,
) -> Result<Option<crate::runtime::oci::OciSettings>, ConfigError> {
    use gpufleet_proto::v1::PullPolicy;
    let mut oci = crate::runtime::oci::OciSettings::new(
        podman
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("podman")),
    );
    if let Some(list) = allowed_mounts {
        for path in &list.0 {
            if !path.is_absolute() {
                return Err(invalid(
                    "oci_allowed_mounts",
                    format!("{} is not an absolute path", path.display()),
                ));
            }
            if path == std::path::Path::new("/") {
                return Err(invalid(
                    "oci_allowed_mounts",
                    "\"/\" would let jobs mount the whole host; name the data directories instead",
                ));
            }
        }
        oci.allowed_mounts = list.0;
    }
    if let Some(list) = cdi_spec_dirs {
        oci.cdi_spec_dirs = list.0;
    }
    if let Some(policy) = pull {
        oci.default_pull = match policy.trim() {
            "always" => PullPolicy::Always,
            "missing" => PullPolicy::Missing,
            "never" => PullPolicy::Never,
            other => {
                return Err(invalid(
                    "oci_pull",
                    format!("{other:?} is not always, missing or never"),
                ));
            }
        };
    }
    if let Some(timeout) = pull_timeout {
        oci.pull_timeout = parse_duration("oci_pull_timeout", &timeout)?;
    }
    Ok(enabled.unwrap_or(false).then_some(oci))
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

fn parse_bytes(key: &'static str, size: Option<Size>, default: u64) -> Result<u64, ConfigError> {
    match size {
        Some(Size(s)) => parse_size(&s).map_err(|message| invalid(key, message)),
        None => Ok(default),
    }
}

fn health_policy(h: HealthSettings) -> Result<HealthPolicy, ConfigError> {
    let d = HealthPolicy::default();
    Ok(HealthPolicy {
        clean_period: match h.clean_period {
            Some(s) => parse_duration("health.clean_period", &s)?,
            None => d.clean_period,
        },
        // 0 (or empty): not checked; no host has fewer than 0 GPUs.
        expected_gpu_count: h.expected_gpu_count.filter(|&n| n > 0),
        critical_xids: h
            .critical_xids
            .map_or(d.critical_xids, |l| l.0.into_iter().collect()),
        application_xids: h
            .application_xids
            .map_or(d.application_xids, |l| l.0.into_iter().collect()),
        slowdown_degraded_after: match h.slowdown_degraded_after {
            Some(s) => parse_duration("health.slowdown_degraded_after", &s)?,
            None => d.slowdown_degraded_after,
        },
        sbe_storm_per_minute: h.sbe_storm_per_minute.unwrap_or(d.sbe_storm_per_minute),
    })
}

/// The `[spot]` table checked: None when no cloud is named.
fn interruption_config(
    s: &settings::SpotSettings,
) -> Result<Option<InterruptionConfig>, ConfigError> {
    use crate::interruption::{cloud::Cloud, http::Endpoint};
    let cloud = Cloud::parse(s.interruption_source.as_deref().unwrap_or(""))
        .map_err(|e| invalid("spot.interruption_source", e))?;
    let Some(cloud) = cloud else {
        if s.metadata_endpoint.is_some() {
            return Err(invalid(
                "spot.metadata_endpoint",
                "is set but spot.interruption_source is not; name the cloud (aws, gcp or azure)",
            ));
        }
        return Ok(None);
    };
    let endpoint = Endpoint::parse(
        s.metadata_endpoint
            .as_deref()
            .unwrap_or(cloud.default_endpoint()),
    )
    .map_err(|e| invalid("spot.metadata_endpoint", e))?;
    let poll_interval = match &s.poll_interval {
        Some(d) => parse_duration("spot.poll_interval", d)?,
        None => DEFAULT_INTERRUPTION_POLL_INTERVAL,
    };
    if poll_interval < Duration::from_millis(100) {
        return Err(invalid("spot.poll_interval", "must be at least 100ms"));
    }
    let stop_margin = match &s.stop_margin {
        Some(d) => parse_duration("spot.stop_margin", d)?,
        None => DEFAULT_INTERRUPTION_STOP_MARGIN,
    };
    Ok(Some(InterruptionConfig {
        cloud,
        endpoint,
        poll_interval,
        stop_margin,
    }))
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
            interruptions: None,
            gpu_sharing: SharingConfig {
                mode: SharingMode::TimeSlicing,
                mps_pipe_directory: DEFAULT_MPS_PIPE_DIRECTORY.into(),
            },
            oci: None,
        }
    }

    /// Loads the configuration (see [`load`]) without the binary's own
    /// flags: what tests and embedders that read a config file want.
    pub fn load<I, T>(argv: I, env: &HashMap<String, String>) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        load(argv, env).map(|loaded| loaded.config)
    }

    /// Checks the layered settings and fills in the defaults.
    pub fn from_settings(s: AgentSettings) -> Result<Self, ConfigError> {
        let n = s.node;
        let node = NodeConfig {
            id: n.id.filter(|s| !s.trim().is_empty()),
            provider: n.provider.unwrap_or_else(|| DEFAULT_PROVIDER.into()),
            region: n.region.unwrap_or_else(|| DEFAULT_REGION.into()),
            zone: n.zone.unwrap_or_default(),
            instance_type: n.instance_type.unwrap_or_default(),
            price_per_gpu_hour_usd: n.price_per_gpu_hour_usd.unwrap_or(0.0),
            spot: n.spot.unwrap_or(false),
            labels: n.labels.map(|l| l.0).unwrap_or_default(),
            address: n
                .address
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty()),
        };
        if let Some(address) = &node.address {
            check_advertise_address(address)?;
        }
        let metrics_listen = {
            let s = s
                .metrics_listen
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
        };
        let config = AgentConfig {
            controller: s.controller.unwrap_or_else(|| DEFAULT_CONTROLLER.into()),
            join_token: s.join_token.unwrap_or_default(),
            node,
            gpu_backend: match s.gpu_backend {
                Some(b) => b.parse().map_err(|e: String| invalid("gpu_backend", e))?,
                None => GpuBackendKind::Nvml,
            },
            simulated_gpus: s.simulated_gpus.map(|l| l.0).unwrap_or_default(),
            data_dir: s.data_dir.unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
            sample_interval: match s.sample_interval {
                Some(d) => parse_duration("sample_interval", &d)?,
                None => DEFAULT_SAMPLE_INTERVAL,
            },
            listen: {
                let l = s.listen.unwrap_or_else(|| DEFAULT_LISTEN.into());
                l.trim().parse().map_err(|_| {
                    invalid(
                        "listen",
                        format!("{l:?} is not an address like 127.0.0.1:7071"),
                    )
                })?
            },
            stop_grace_period: match s.stop_grace_period {
                Some(d) => parse_duration("stop_grace_period", &d)?,
                None => DEFAULT_STOP_GRACE_PERIOD,
            },
            monitoring: MonitoringConfig {
                metrics_listen,
                nvml_library_path: s.nvml_library_path.filter(|p| !p.as_os_str().is_empty()),
                read_kmsg: s.read_kmsg.unwrap_or(true),
                health: health_policy(s.health)?,
            },
            tls: TlsClientConfig {
                ca: s.tls_ca,
                cert: s.tls_cert,
                key: s.tls_key,
            },
            workload_user: s.workload_user.filter(|u| !u.trim().is_empty()),
            api_token: s
                .api_token
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty()),
            outbox_max_bytes: parse_bytes(
                "outbox_max_bytes",
                s.outbox_max_bytes,
                DEFAULT_OUTBOX_MAX_BYTES,
            )?,
            log_max_bytes: parse_bytes(
                "log_max_bytes",
                s.log_max_bytes,
                crate::supervisor::DEFAULT_LOG_MAX_BYTES,
            )?,
            log_retention: match s.log_retention {
                Some(r) => parse_retention("log_retention", &r)?,
                None => Some(DEFAULT_LOG_RETENTION),
            },
            // Anything past the limit is refused by `validate`.
            max_concurrent_starts: s
                .max_concurrent_starts
                .map_or(crate::supervisor::DEFAULT_MAX_CONCURRENT_STARTS, |n| {
                    usize::try_from(n).unwrap_or(usize::MAX)
                }),
            shim_program: None,
            keep_workloads_on_exit: s.keep_workloads_on_exit.unwrap_or(true),
            interruptions: interruption_config(&s.spot)?,
            gpu_sharing: SharingConfig {
                mode: match s.gpu_sharing {
                    Some(m) => m
                        .trim()
                        .parse()
                        .map_err(|e: String| invalid("gpu_sharing", e))?,
                    None => SharingMode::Auto,
                },
                mps_pipe_directory: s
                    .mps_pipe_directory
                    .unwrap_or_else(|| DEFAULT_MPS_PIPE_DIRECTORY.into()),
            },
            oci: oci_settings(
                s.oci_enabled,
                s.oci_podman,
                s.oci_allowed_mounts,
                s.oci_cdi_spec_dirs,
                s.oci_pull,
                s.oci_pull_timeout,
            )?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let urls = gpufleet_core::leader::controller_list(&self.controller);
        if urls.is_empty() || urls.len() > gpufleet_core::leader::MAX_CONTROLLERS {
            return Err(invalid(
                "controller",
                format!(
                    "give 1 to {} controller URLs, comma-separated",
                    gpufleet_core::leader::MAX_CONTROLLERS
                ),
            ));
        }
        for url in &urls {
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || tonic::transport::Endpoint::from_shared(url.to_string()).is_err()
            {
                return Err(invalid(
                    "controller",
                    format!("{url:?} is not a URL like http://controller:7070"),
                ));
            }
        }
        let price = self.node.price_per_gpu_hour_usd;
        if !price.is_finite() || price < 0.0 {
            return Err(invalid(
                "price_per_gpu_hour_usd",
                format!("{price} must be a finite number >= 0"),
            ));
        }
        if self.node.provider.trim().is_empty() {
            return Err(invalid("node.provider", "must not be empty"));
        }
        if self.node.region.trim().is_empty() {
            return Err(invalid("node.region", "must not be empty"));
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
                crate::backend::simulated::parse_declaration(decl)
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

/// An advertised address goes into peers' environment as one item of a
/// comma-separated list: a host name or an IP literal, nothing else.
fn check_advertise_address(address: &str) -> Result<(), ConfigError> {
    let ok = address.len() <= 253
        && address
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "node.address",
            format!(
                "{address:?} is not a host name or IP address (letters, digits, . - : _; at most 253)"
            ),
        ))
    }
}

/// The address peers reach this node at when none is configured: a private
/// address of this host (see [`choose_advertise_address`]), from the
/// source address the kernel picks for the default route (a UDP socket
/// "connected" to a TEST-NET address; no packet is sent) and the addresses
/// of the interfaces that are up. `Err` carries the address to use anyway
/// and why it is not a private one, for the log.
pub fn default_advertise_address() -> Result<String, (String, String)> {
    let route_source = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|socket| {
            socket.connect("192.0.2.1:9")?;
            socket.local_addr()
        })
        .map(|addr| addr.ip())
        .ok();
    choose_advertise_address(route_source, &interface_addresses())
}

/// Addresses of this host's interfaces that are up, as (interface, address);
/// empty when they cannot be listed.
fn interface_addresses() -> Vec<(String, std::net::IpAddr)> {
    use nix::net::if_::InterfaceFlags;
    let Ok(list) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    list.filter(|i| i.flags.contains(InterfaceFlags::IFF_UP))
        .filter_map(|i| {
            let address = i.address.as_ref()?;
            let ip = match (address.as_sockaddr_in(), address.as_sockaddr_in6()) {
                (Some(v4), _) => std::net::IpAddr::V4(v4.ip()),
                (_, Some(v6)) => std::net::IpAddr::V6(v6.ip()),
                _ => return None,
            };
            Some((i.interface_name, ip))
        })
        .collect()
}

/// A private address: IPv4 in RFC 1918 (10/8, 172.16/12, 192.168/16), or
/// an IPv6 unique local address (fc00::/7, RFC 4193).
pub fn is_private_address(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_private(),
        std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// Picks the advertised address from the default route's source address
/// and the host's interface addresses (given, so tests need no network):
/// 1. the default route's source address, when it is private;
/// 2. else the first private address of an interface, IPv4 before IPv6
///    (interfaces in the order given, i.e. the kernel's);
/// 3. else (`Err`, to be logged) the default route's source address when
///    it is neither loopback nor unspecified: peers may reach a public
///    address, but the fleet's traffic then leaves the private network;
/// 4. else (`Err`) `127.0.0.1`: peers on other hosts cannot reach it.
pub fn choose_advertise_address(
    route_source: Option<std::net::IpAddr>,
    interfaces: &[(String, std::net::IpAddr)],
) -> Result<String, (String, String)> {
    if let Some(ip) = route_source.filter(|ip| is_private_address(*ip)) {
        return Ok(ip.to_string());
    }
    let private = |v4: bool| {
        interfaces
            .iter()
            .find(|(_, ip)| ip.is_ipv4() == v4 && is_private_address(*ip))
    };
    if let Some((_, ip)) = private(true).or_else(|| private(false)) {
        return Ok(ip.to_string());
    }
    match route_source {
        Some(ip) if !ip.is_loopback() && !ip.is_unspecified() => Err((
            ip.to_string(),
            format!(
                "no private address (RFC 1918 or IPv6 ULA) on any interface; the default route's source address {ip} is not private"
            ),
        )),
        Some(ip) => Err((
            "127.0.0.1".to_string(),
            format!(
                "no private address on any interface, and the default route's source address is {ip}"
            ),
        )),
        None => Err((
            "127.0.0.1".to_string(),
            "no private address on any interface, and no default route".to_string(),
        )),
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
