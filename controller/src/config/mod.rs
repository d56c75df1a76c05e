//! Controller configuration: the runtime [`ControllerConfig`] and how it
//! is loaded. The keys are declared once, in [`settings`] (file,
//! environment and flags); [`load`] layers them (file ← environment ←
//! flags, the environment an injected map) and checks the result into a
//! [`ControllerConfig`] with errors that name the key.

mod settings;
mod store;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::CommandFactory;
use gpufleet_core::layered::{Layers, read_file};

use crate::placement;
use gpufleet_scheduler::{Policy, SchedulerConfig, TenantPolicy};

pub use gpufleet_core::layered::ConfigError;
pub use settings::{ControllerCli, ControllerSettings, TenantConfig};
pub use store::{DEFAULT_ETCD_PREFIX, DEFAULT_LEADER_LEASE, EtcdConfig, StoreConfig};

/// PEM files for TLS on the controller's gRPC listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsServerConfig {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// When set, agents must present a client certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub join_token: String,
    /// Where the bootstrap admin token is written at the first start.
    pub admin_token_file: PathBuf,
    /// Per client token; `None`: unlimited.
    pub rate_limit: Option<crate::auth::RateLimit>,
    /// Caps on client streams open at once, and the stall timeout.
    pub streams: crate::stream_quota::StreamLimits,
    pub node_not_ready_after: Duration,
    pub node_lost_after: Duration,
    pub scheduler: SchedulerConfig,
    /// The node label whose value is the node's network block (empty: no
    /// block preference for gangs).
    pub topology_block_label: String,
    pub fair_share_half_life: Duration,
    pub queues: Vec<String>,
    pub usage_retention: crate::usage::Retention,
    pub market_retention: Duration,
    /// Finished jobs older than this are garbage-collected.
    pub finished_job_retention: Duration,
    /// The embedded store's page cache, bytes.
    pub store_cache_bytes: u64,
    pub telemetry_retention: Duration,
    pub metrics_listen: SocketAddr,
    /// TLS on the gRPC listener (and mutual TLS for agents).
    pub tls: TlsServerConfig,
    /// Where prices come from besides each node's config, in priority order.
    pub price_sources: Vec<crate::pricing::source::PriceSource>,
    pub price_refresh_interval: Duration,
    /// sled (embedded) or etcd (shared, with leader election).
    pub store: StoreConfig,
}

/// Most price sources (each is read every refresh).
pub const MAX_PRICE_SOURCES: usize = 16;
pub const DEFAULT_PRICE_REFRESH_INTERVAL: Duration = Duration::from_secs(300);

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
/// The label Kubernetes-style fleets use for a network block.
pub const DEFAULT_TOPOLOGY_BLOCK_LABEL: &str = "topology.block";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/gpufleet/controller";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9401";
pub const DEFAULT_RATE_LIMIT_PER_TOKEN: u32 = 1000;
/// A week: several fair-share half-lives, so forgetting a job's usage there
/// changes nothing that matters.
pub const DEFAULT_FINISHED_JOB_RETENTION: Duration = Duration::from_secs(7 * 86_400);
/// See [`crate::store::DEFAULT_CACHE_BYTES`].
pub const DEFAULT_STORE_CACHE_BYTES: u64 = crate::store::DEFAULT_CACHE_BYTES;
pub const DEFAULT_TELEMETRY_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// A loaded configuration and the binary's own flags.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: ControllerConfig,
    /// `text` or `json`.
    pub log_format: String,
    /// `--print-config`: print the effective configuration and exit.
    pub print_config: bool,
    /// `--migrate-from-sled DIR`: copy that sled store into etcd and exit.
    pub migrate_from_sled: Option<PathBuf>,
}

/// Loads the controller's configuration from its command line `argv`
/// (program name first) and environment `env`: the file named by
/// `--config` or `GPUFLEET_CONFIG` (optional), then the `GPUFLEET_*`
/// variables, then the flags; then checks the result.
pub fn load<I, T>(argv: I, env: &HashMap<String, String>) -> Result<Loaded, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cmd = ControllerCli::command();
    let layers = Layers::parse(&cmd, env, argv)?;
    let path = layers.config_file();
    let settings = match &path {
        Some(path) => read_file(path)?,
        None => ControllerSettings::default(),
    };
    let mut cli = ControllerCli {
        config: path,
        print_config: false,
        migrate_from_sled: None,
        log_format: None,
        settings,
    };
    layers.apply(&cmd, &mut cli)?;
    Ok(Loaded {
        config: ControllerConfig::from_settings(cli.settings)?,
        log_format: cli.log_format.unwrap_or_else(|| "text".to_string()),
        print_config: cli.print_config,
        migrate_from_sled: cli.migrate_from_sled,
    })
}

impl ControllerConfig {
    /// Defaults suitable for a test or `gpufleet dev`: store in `data_dir`.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir: PathBuf = data_dir.into();
        Self {
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7070))),
            admin_token_file: data_dir.join("admin.token"),
            data_dir,
            join_token: String::new(),
            rate_limit: Some(crate::auth::RateLimit {
                per_second: f64::from(DEFAULT_RATE_LIMIT_PER_TOKEN),
                burst: f64::from(2 * DEFAULT_RATE_LIMIT_PER_TOKEN),
            }),
            streams: crate::stream_quota::StreamLimits::default(),
            node_not_ready_after: Duration::from_secs(15),
            node_lost_after: Duration::from_secs(60),
            scheduler: SchedulerConfig::default(),
            topology_block_label: DEFAULT_TOPOLOGY_BLOCK_LABEL.to_string(),
            fair_share_half_life: Duration::from_secs(24 * 3600),
            queues: vec!["default".to_string()],
            usage_retention: crate::usage::Retention::default(),
            market_retention: Duration::from_secs(30 * 86_400),
            finished_job_retention: DEFAULT_FINISHED_JOB_RETENTION,
            store_cache_bytes: DEFAULT_STORE_CACHE_BYTES,
            telemetry_retention: DEFAULT_TELEMETRY_RETENTION,
            // Any free port: several test or dev controllers share a host.
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: TlsServerConfig::default(),
            price_sources: Vec::new(),
            price_refresh_interval: DEFAULT_PRICE_REFRESH_INTERVAL,
            store: StoreConfig::Sled,
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
    pub fn from_settings(file: ControllerSettings) -> Result<Self, ConfigError> {
        let store = store::store_config(&file)?;
        let listen_text = file.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = listen_text.parse().map_err(|_| ConfigError::Invalid {
            key: "listen".into(),
            message: format!("{listen_text:?} is not an address like 0.0.0.0:7070"),
        })?;
        let duration = |key: &str,
                        value: Option<String>,
                        default: u64|
         -> Result<Duration, ConfigError> {
            match value {
                None => Ok(Duration::from_secs(default)),
                Some(text) => humantime::parse_duration(&text).map_err(|e| ConfigError::Invalid {
                    key: key.into(),
                    message: format!("{text:?} is not a duration like \"15s\" or \"2m\": {e}"),
                }),
            }
        };
        let streams = stream_limits(
            file.max_streams_per_token,
            file.max_streams,
            file.stream_stall_timeout.clone(),
            duration,
        )?;
        let not_ready = duration("node_not_ready_after", file.node_not_ready_after, 15)?;
        let retention = duration(
            "telemetry_retention",
            file.telemetry_retention,
            DEFAULT_TELEMETRY_RETENTION.as_secs(),
        )?;
        if retention < Duration::from_secs(60) {
            return Err(ConfigError::Invalid {
                key: "telemetry_retention".into(),
                message: "must be at least 1m: rollups are per minute".into(),
            });
        }
        let metrics_text = file
            .metrics_listen
            .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.to_string());
        let metrics_listen = metrics_text.parse().map_err(|_| ConfigError::Invalid {
            key: "metrics_listen".into(),
            message: format!("{metrics_text:?} is not an address like 0.0.0.0:9401"),
        })?;
        let lost = duration("node_lost_after", file.node_lost_after, 60)?;
        if not_ready.is_zero() {
            return Err(ConfigError::Invalid {
                key: "node_not_ready_after".into(),
                message: "must be longer than zero".into(),
            });
        }
        if lost <= not_ready {
            return Err(ConfigError::Invalid {
                key: "node_lost_after".into(),
                message: format!(
                    "({}) must be longer than node_not_ready_after ({})",
                    humantime::format_duration(lost),
                    humantime::format_duration(not_ready)
                ),
            });
        }
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.into(),
            message,
        };
        let mut scheduler = SchedulerConfig::default();
        if let Some(policy) = &file.default_policy {
            scheduler.default_policy = match policy.as_str() {
                "cost" => Policy::Cost,
                "pack" => Policy::Pack,
                "spread" => Policy::Spread,
                other => {
                    return Err(invalid(
                        "default_policy",
                        format!("{other:?} is not a policy; accepted: cost, pack, spread"),
                    ));
                }
            };
        }
        let topology_block_label = file
            .topology_block_label
            .clone()
            .unwrap_or_else(|| DEFAULT_TOPOLOGY_BLOCK_LABEL.to_string());
        if topology_block_label.len() > crate::limits::NODE_LABEL_KEY_BYTES
            || topology_block_label.chars().any(|c| c.is_control())
        {
            return Err(invalid(
                "topology_block_label",
                format!(
                    "{:?} is not a node label key (at most {} bytes, no control characters); e.g. topology.block, or empty to turn the preference off",
                    topology_block_label.chars().take(64).collect::<String>(),
                    crate::limits::NODE_LABEL_KEY_BYTES
                ),
            ));
        }
        let half_life = duration(
            "fair_share_half_life",
            file.fair_share_half_life.clone(),
            24 * 3600,
        )?;
        if half_life.is_zero() {
            return Err(invalid(
                "fair_share_half_life",
                "must be longer than zero".into(),
            ));
        }
        let generation = |key: &str, name: &str| {
            gpufleet_core::parse_generation(name)
                .map(placement::generation_from_proto)
                .ok_or_else(|| {
                    invalid(
                        key,
                        format!(
                            "{name:?} is not a GPU generation; accepted: {}",
                            gpufleet_core::generation_names().join(", ")
                        ),
                    )
                })
        };
        for (name, factor) in file.generation_factors.clone().unwrap_or_default() {
            let key = format!("generation_factors.{name}");
            let g = generation(&key, &name)?;
            if !(factor.is_finite() && factor > 0.0 && factor <= 100.0) {
                return Err(invalid(
                    &key,
                    format!("{factor} must be a number in (0, 100]"),
                ));
            }
            scheduler.generation_factors.insert(g, factor);
        }
        for (tenant, t) in file.tenants.clone().unwrap_or_default() {
            let key = format!("tenants.{tenant}");
            if crate::validate::tenant_name(&tenant).is_err() {
                return Err(invalid(
                    &key,
                    "tenant names use 1-64 letters, digits, '-', '_' or '.'".into(),
                ));
            }
            let weight = t.weight.unwrap_or(1.0);
            if !(weight.is_finite() && weight > 0.0 && weight <= 1000.0) {
                return Err(invalid(
                    &format!("{key}.weight"),
                    format!("{weight} must be in (0, 1000]"),
                ));
            }
            let mut per_gen = HashMap::new();
            for (name, max) in t.max_gpus_per_generation.unwrap_or_default() {
                per_gen.insert(
                    generation(&format!("{key}.max_gpus_per_generation.{name}"), &name)?,
                    max,
                );
            }
            scheduler.tenants.insert(
                tenant,
                TenantPolicy {
                    weight,
                    max_gpus: t.max_gpus,
                    max_gpus_per_generation: per_gen,
                },
            );
        }
        let queues = file
            .queues
            .clone()
            .unwrap_or_else(|| vec!["default".to_string()]);
        for queue in &queues {
            if crate::validate::tenant_name(queue).is_err() {
                return Err(invalid(
                    "queues",
                    format!(
                        "{queue:?} is not a valid queue name: use 1-64 letters, digits, '-', '_' or '.'"
                    ),
                ));
            }
        }
        let usage_days = duration(
            "usage_retention",
            file.usage_retention.clone(),
            400 * 86_400,
        )?;
        let market = duration(
            "market_retention",
            file.market_retention.clone(),
            30 * 86_400,
        )?;
        if usage_days < Duration::from_secs(86_400) {
            return Err(invalid("usage_retention", "must be at least 1d".into()));
        }
        if market < Duration::from_secs(3600) {
            return Err(invalid("market_retention", "must be at least 1h".into()));
        }
        let price_sources = file
            .price_sources
            .clone()
            .unwrap_or_default()
            .iter()
            .map(|s| crate::pricing::source::PriceSource::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| invalid("price_sources", message))?;
        if price_sources.len() > MAX_PRICE_SOURCES {
            return Err(invalid(
                "price_sources",
                format!(
                    "{} sources; at most {MAX_PRICE_SOURCES}",
                    price_sources.len()
                ),
            ));
        }
        let price_refresh_interval = duration(
            "price_refresh_interval",
            file.price_refresh_interval.clone(),
            DEFAULT_PRICE_REFRESH_INTERVAL.as_secs(),
        )?;
        if price_refresh_interval < Duration::from_secs(1) {
            return Err(invalid(
                "price_refresh_interval",
                "must be at least 1s".into(),
            ));
        }
        let finished_job_retention = duration(
            "finished_job_retention",
            file.finished_job_retention.clone(),
            DEFAULT_FINISHED_JOB_RETENTION.as_secs(),
        )?;
        if finished_job_retention < Duration::from_secs(10) {
            return Err(invalid(
                "finished_job_retention",
                "must be at least 10s (clients read a job's outcome after it ends)".into(),
            ));
        }
        let store_cache_bytes = match &file.store_cache {
            None => DEFAULT_STORE_CACHE_BYTES,
            Some(text) => {
                let bytes = gpufleet_core::parse_size(text)
                    .map_err(|message| invalid("store_cache", message))?;
                if bytes < 1 << 20 {
                    return Err(invalid(
                        "store_cache",
                        format!("{text:?} is below the smallest useful cache, 1MiB"),
                    ));
                }
                bytes
            }
        };
        if file.tls_cert.is_some() != file.tls_key.is_some() {
            return Err(invalid(
                "tls_cert",
                "tls_cert and tls_key go together: give both, or neither for plain gRPC".into(),
            ));
        }
        if file.tls_client_ca.is_some() && file.tls_cert.is_none() {
            return Err(invalid(
                "tls_client_ca",
                "mutual TLS needs TLS: also give tls_cert and tls_key".into(),
            ));
        }
        let usage_retention = crate::usage::Retention {
            records: usage_days.as_secs(),
            ..Default::default()
        };
        let rate = file
            .rate_limit_per_token
            .unwrap_or(DEFAULT_RATE_LIMIT_PER_TOKEN);
        let burst = file.rate_limit_burst.unwrap_or(rate.saturating_mul(2));
        if rate > 0 && burst == 0 {
            return Err(invalid(
                "rate_limit_burst",
                "must be at least 1 while rate_limit_per_token is on".into(),
            ));
        }
        let rate_limit = (rate > 0).then(|| crate::auth::RateLimit {
            per_second: f64::from(rate),
            burst: f64::from(burst),
        });
        let data_dir = file
            .data_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        Ok(Self {
            usage_retention,
            market_retention: market,
            finished_job_retention,
            store_cache_bytes,
            listen,
            admin_token_file: file
                .admin_token_file
                .unwrap_or_else(|| data_dir.join("admin.token")),
            data_dir,
            rate_limit,
            streams,
            join_token: file.join_token.unwrap_or_default(),
            node_not_ready_after: not_ready,
            node_lost_after: lost,
            scheduler,
            topology_block_label,
            fair_share_half_life: half_life,
            queues,
            telemetry_retention: retention,
            metrics_listen,
            tls: TlsServerConfig {
                cert: file.tls_cert.clone(),
                key: file.tls_key.clone(),
                client_ca: file.tls_client_ca.clone(),
            },
            price_sources,
            price_refresh_interval,
            store,
        })
    }

    /// The effective configuration as a config file, for `--print-config`.
    pub fn to_toml(&self) -> String {
        let mut file = ControllerSettings {
            listen: Some(self.listen.to_string()),
            data_dir: Some(self.data_dir.clone()),
            join_token: Some(self.join_token.clone()),
            admin_token_file: Some(self.admin_token_file.clone()),
            rate_limit_per_token: Some(self.rate_limit.map_or(0, |r| r.per_second as u32)),
            rate_limit_burst: self.rate_limit.map(|r| r.burst as u32),
            max_streams_per_token: Some(self.streams.per_token),
            max_streams: Some(self.streams.total),
            stream_stall_timeout: Some(
                humantime::format_duration(self.streams.stall_timeout).to_string(),
            ),
            node_not_ready_after: Some(
                humantime::format_duration(self.node_not_ready_after).to_string(),
            ),
            node_lost_after: Some(humantime::format_duration(self.node_lost_after).to_string()),
            default_policy: Some(
                match self.scheduler.default_policy {
                    Policy::Pack => "pack",
                    Policy::Spread => "spread",
                    _ => "cost",
                }
                .to_string(),
            ),
            topology_block_label: Some(self.topology_block_label.clone()),
            fair_share_half_life: Some(
                humantime::format_duration(self.fair_share_half_life).to_string(),
            ),
            usage_retention: Some(
                humantime::format_duration(Duration::from_secs(self.usage_retention.records))
                    .to_string(),
            ),
            market_retention: Some(humantime::format_duration(self.market_retention).to_string()),
            finished_job_retention: Some(
                humantime::format_duration(self.finished_job_retention).to_string(),
            ),
            store_cache: Some(format!("{}", self.store_cache_bytes)),
            price_sources: Some(self.price_sources.iter().map(|s| s.to_string()).collect()),
            price_refresh_interval: Some(
                humantime::format_duration(self.price_refresh_interval).to_string(),
            ),
            queues: Some(self.queues.clone()),
            generation_factors: Some(
                self.scheduler
                    .generation_factors
                    .iter()
                    .map(|(g, f)| (placement::generation_name(*g).to_string(), *f))
                    .collect(),
            ),
            tenants: Some(
                self.scheduler
                    .tenants
                    .iter()
                    .map(|(name, t)| {
                        (
                            name.clone(),
                            TenantConfig {
                                weight: Some(t.weight),
                                max_gpus: t.max_gpus,
                                max_gpus_per_generation: Some(
                                    t.max_gpus_per_generation
                                        .iter()
                                        .map(|(g, n)| {
                                            (placement::generation_name(*g).to_string(), *n)
                                        })
                                        .collect(),
                                ),
                            },
                        )
                    })
                    .collect(),
            ),
            telemetry_retention: Some(
                humantime::format_duration(self.telemetry_retention).to_string(),
            ),
            metrics_listen: Some(self.metrics_listen.to_string()),
            tls_cert: self.tls.cert.clone(),
            tls_key: self.tls.key.clone(),
            tls_client_ca: self.tls.client_ca.clone(),
            ..ControllerSettings::default()
        };
        store::store_settings(&self.store, &mut file);
        toml::to_string(&file).unwrap_or_default()
    }
}

/// `max_streams_per_token`, `max_streams` and `stream_stall_timeout`.
fn stream_limits(
    per_token: Option<u32>,
    total: Option<u32>,
    stall_timeout: Option<String>,
    duration: impl Fn(&str, Option<String>, u64) -> Result<Duration, ConfigError>,
) -> Result<crate::stream_quota::StreamLimits, ConfigError> {
    use crate::stream_quota::{
        DEFAULT_MAX_STREAMS, DEFAULT_MAX_STREAMS_PER_TOKEN, DEFAULT_STREAM_STALL_TIMEOUT,
    };
    let per_token = per_token.unwrap_or(DEFAULT_MAX_STREAMS_PER_TOKEN);
    let total = total.unwrap_or(DEFAULT_MAX_STREAMS);
    let at_least_one = |key: &str, value: u32| {
        if value == 0 {
            Err(ConfigError::Invalid {
                key: key.into(),
                message: "must be at least 1 (0 would refuse every stream)".into(),
            })
        } else {
            Ok(value)
        }
    };
    let stall_timeout = duration(
        "stream_stall_timeout",
        stall_timeout,
        DEFAULT_STREAM_STALL_TIMEOUT.as_secs(),
    )?;
    if stall_timeout < Duration::from_secs(1) {
        return Err(ConfigError::Invalid {
            key: "stream_stall_timeout".into(),
            message: "must be at least 1s: a busy client may pause that long between reads".into(),
        });
    }
    Ok(crate::stream_quota::StreamLimits {
        per_token: at_least_one("max_streams_per_token", per_token)?,
        total: at_least_one("max_streams", total)?,
        stall_timeout,
    })
}
