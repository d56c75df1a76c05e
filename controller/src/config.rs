//! Controller configuration: a TOML file, `GPUFLEET_*` environment variables
//! and flags, in rising precedence. Unknown keys are rejected.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::placement;
use crate::scheduler::{Policy, SchedulerConfig, TenantPolicy};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

/// Every key of the controller's config file. Each is also a flag
/// (`--listen`) and an environment variable (`GPUFLEET_LISTEN`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ConfigFile {
    /// gRPC listen address.
    pub listen: Option<String>,
    /// Directory of the embedded store.
    pub data_dir: Option<PathBuf>,
    /// Token agents must present to join; empty: the controller generates
    /// one at its first start and writes it to `join.token` in the data dir.
    pub join_token: Option<String>,
    /// Where the first start writes the bootstrap admin token (mode 0600);
    /// default `admin.token` in the data dir.
    pub admin_token_file: Option<PathBuf>,
    /// Requests per second each client token may make; 0 turns the limit off.
    pub rate_limit_per_token: Option<u32>,
    /// Requests a token may make at once above its rate; default 2 × the rate.
    pub rate_limit_burst: Option<u32>,
    /// Silence after which a node becomes NotReady (humantime, e.g. "15s").
    pub node_not_ready_after: Option<String>,
    /// Silence after which a NotReady node becomes Lost and its jobs end.
    pub node_lost_after: Option<String>,
    /// How long per-minute telemetry rollups are kept (humantime, e.g. "7d").
    pub telemetry_retention: Option<String>,
    /// HTTP address of the Prometheus `/metrics` endpoint.
    pub metrics_listen: Option<String>,
    /// PEM certificate chain and key for TLS on the gRPC listener.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// PEM CA for agents' client certificates: agents must present one (mutual TLS).
    pub tls_client_ca: Option<PathBuf>,
    /// Placement policy for jobs that name none: cost, pack or spread.
    pub default_policy: Option<String>,
    /// Half-life of past usage in fair share (humantime, e.g. "24h").
    pub fair_share_half_life: Option<String>,
    /// Queues jobs may name; empty accepts only "default".
    pub queues: Option<Vec<String>>,
    /// GPU-hours of a generation in normalised units, e.g. hopper = 2.0.
    pub generation_factors: Option<BTreeMap<String, f64>>,
    /// Tenants with weights and quotas. When any is listed, jobs must name one.
    pub tenants: Option<BTreeMap<String, TenantConfig>>,
    /// How long usage records and daily rollups are kept (e.g. "400d").
    pub usage_retention: Option<String>,
    /// How long per-minute market signals are kept (e.g. "30d").
    pub market_retention: Option<String>,
    /// How long finished jobs are kept before they are deleted from memory
    /// and the store (their usage records stay); e.g. "7d".
    pub finished_job_retention: Option<String>,
    /// The embedded store's page cache (e.g. "16MiB"). sled holds up to
    /// twice this in heap; beyond it, the store's memory follows the keys it
    /// holds (about 13 B each), which retention bounds.
    pub store_cache: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct TenantConfig {
    /// Relative fair share, 0 < weight ≤ 1000; default 1.
    pub weight: Option<f64>,
    /// Most GPUs held at once.
    pub max_gpus: Option<u32>,
    /// Most GPUs of one generation held at once, e.g. { hopper = 16 }.
    pub max_gpus_per_generation: Option<BTreeMap<String, u32>>,
}

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
    pub node_not_ready_after: Duration,
    pub node_lost_after: Duration,
    pub scheduler: SchedulerConfig,
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
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/gpufleet/controller";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9401";
pub const DEFAULT_RATE_LIMIT_PER_TOKEN: u32 = 1000;
/// A week: several fair-share half-lives, so forgetting a job's usage there
/// changes nothing that matters.
pub const DEFAULT_FINISHED_JOB_RETENTION: Duration = Duration::from_secs(7 * 86_400);
/// See [`crate::store::DEFAULT_CACHE_BYTES`].
pub const DEFAULT_STORE_CACHE_BYTES: u64 = crate::store::DEFAULT_CACHE_BYTES;
pub const DEFAULT_TELEMETRY_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

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
            node_not_ready_after: Duration::from_secs(15),
            node_lost_after: Duration::from_secs(60),
            scheduler: SchedulerConfig::default(),
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
        }
    }

    /// Layers file < env < flags (the `overrides` file, built from flags).
    pub fn load(
        file: Option<&Path>,
        env: &HashMap<String, String>,
        overrides: ConfigFile,
    ) -> Result<Self, ConfigError> {
        let mut merged = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                toml::from_str::<ConfigFile>(&text).map_err(|e| ConfigError::Parse {
                    path: path.display().to_string(),
                    message: e.to_string().trim().replace('\n', " "),
                })?
            }
            None => ConfigFile::default(),
        };
        let from_env = ConfigFile {
            listen: env.get("GPUFLEET_LISTEN").cloned(),
            data_dir: env.get("GPUFLEET_DATA_DIR").map(PathBuf::from),
            join_token: env.get("GPUFLEET_JOIN_TOKEN").cloned(),
            admin_token_file: env.get("GPUFLEET_ADMIN_TOKEN_FILE").map(PathBuf::from),
            rate_limit_per_token: parse_env_u32(env, "GPUFLEET_RATE_LIMIT_PER_TOKEN")?,
            rate_limit_burst: parse_env_u32(env, "GPUFLEET_RATE_LIMIT_BURST")?,
            node_not_ready_after: env.get("GPUFLEET_NODE_NOT_READY_AFTER").cloned(),
            node_lost_after: env.get("GPUFLEET_NODE_LOST_AFTER").cloned(),
            telemetry_retention: env.get("GPUFLEET_TELEMETRY_RETENTION").cloned(),
            metrics_listen: env.get("GPUFLEET_METRICS_LISTEN").cloned(),
            tls_cert: env.get("GPUFLEET_TLS_CERT").map(PathBuf::from),
            tls_key: env.get("GPUFLEET_TLS_KEY").map(PathBuf::from),
            tls_client_ca: env.get("GPUFLEET_TLS_CLIENT_CA").map(PathBuf::from),
            default_policy: env.get("GPUFLEET_DEFAULT_POLICY").cloned(),
            fair_share_half_life: env.get("GPUFLEET_FAIR_SHARE_HALF_LIFE").cloned(),
            usage_retention: env.get("GPUFLEET_USAGE_RETENTION").cloned(),
            market_retention: env.get("GPUFLEET_MARKET_RETENTION").cloned(),
            finished_job_retention: env.get("GPUFLEET_FINISHED_JOB_RETENTION").cloned(),
            store_cache: env.get("GPUFLEET_STORE_CACHE").cloned(),
            ..Default::default()
        };
        for layer in [from_env, overrides] {
            merged.listen = layer.listen.or(merged.listen);
            merged.data_dir = layer.data_dir.or(merged.data_dir);
            merged.join_token = layer.join_token.or(merged.join_token);
            merged.admin_token_file = layer.admin_token_file.or(merged.admin_token_file);
            merged.rate_limit_per_token =
                layer.rate_limit_per_token.or(merged.rate_limit_per_token);
            merged.rate_limit_burst = layer.rate_limit_burst.or(merged.rate_limit_burst);
            merged.node_not_ready_after =
                layer.node_not_ready_after.or(merged.node_not_ready_after);
            merged.node_lost_after = layer.node_lost_after.or(merged.node_lost_after);
            merged.default_policy = layer.default_policy.or(merged.default_policy);
            merged.fair_share_half_life =
                layer.fair_share_half_life.or(merged.fair_share_half_life);
            merged.usage_retention = layer.usage_retention.or(merged.usage_retention);
            merged.market_retention = layer.market_retention.or(merged.market_retention);
            merged.finished_job_retention = layer
                .finished_job_retention
                .or(merged.finished_job_retention);
            merged.store_cache = layer.store_cache.or(merged.store_cache);
            merged.telemetry_retention = layer.telemetry_retention.or(merged.telemetry_retention);
            merged.metrics_listen = layer.metrics_listen.or(merged.metrics_listen);
            merged.tls_cert = layer.tls_cert.or(merged.tls_cert);
            merged.tls_key = layer.tls_key.or(merged.tls_key);
            merged.tls_client_ca = layer.tls_client_ca.or(merged.tls_client_ca);
        }
        Self::from_file(merged)
    }

    fn from_file(file: ConfigFile) -> Result<Self, ConfigError> {
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
            join_token: file.join_token.unwrap_or_default(),
            node_not_ready_after: not_ready,
            node_lost_after: lost,
            scheduler,
            fair_share_half_life: half_life,
            queues,
            telemetry_retention: retention,
            metrics_listen,
            tls: TlsServerConfig {
                cert: file.tls_cert.clone(),
                key: file.tls_key.clone(),
                client_ca: file.tls_client_ca.clone(),
            },
        })
    }

    /// The effective configuration as a config file, for `--print-config`.
    pub fn to_toml(&self) -> String {
        let file = ConfigFile {
            listen: Some(self.listen.to_string()),
            data_dir: Some(self.data_dir.clone()),
            join_token: Some(self.join_token.clone()),
            admin_token_file: Some(self.admin_token_file.clone()),
            rate_limit_per_token: Some(self.rate_limit.map_or(0, |r| r.per_second as u32)),
            rate_limit_burst: self.rate_limit.map(|r| r.burst as u32),
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
        };
        toml::to_string(&file).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_flag_over_env_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:1\"\ndata_dir = \"/from/file\"\nnode_lost_after = \"5m\"\n",
        )
        .unwrap();
        let env = HashMap::from([("GPUFLEET_LISTEN".to_string(), "127.0.0.1:2".to_string())]);
        let flags = ConfigFile {
            data_dir: Some("/from/flag".into()),
            ..Default::default()
        };
        let c = ControllerConfig::load(Some(&path), &env, flags).unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(c.node_lost_after, Duration::from_secs(300));
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listn = \"127.0.0.1:1\"\n").unwrap();
        let err = ControllerConfig::load(Some(&path), &HashMap::new(), ConfigFile::default())
            .unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let env = HashMap::from([("GPUFLEET_NODE_LOST_AFTER".to_string(), "1s".to_string())]);
        let err = ControllerConfig::load(None, &env, ConfigFile::default()).unwrap_err();
        assert!(err.to_string().starts_with("node_lost_after"), "{err}");
        let env = HashMap::from([("GPUFLEET_LISTEN".to_string(), "nowhere".to_string())]);
        let err = ControllerConfig::load(None, &env, ConfigFile::default()).unwrap_err();
        assert!(err.to_string().starts_with("listen"), "{err}");
        for bad in ["lots", "512KiB"] {
            let env = HashMap::from([("GPUFLEET_STORE_CACHE".to_string(), bad.to_string())]);
            let err = ControllerConfig::load(None, &env, ConfigFile::default()).unwrap_err();
            assert!(err.to_string().starts_with("store_cache"), "{err}");
        }
        let env = HashMap::from([("GPUFLEET_STORE_CACHE".to_string(), "64MiB".to_string())]);
        let c = ControllerConfig::load(None, &env, ConfigFile::default()).unwrap();
        assert_eq!(c.store_cache_bytes, 64 << 20);
        let again: ConfigFile = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(again.store_cache.as_deref(), Some("67108864"));
    }

    #[test]
    fn telemetry_keys_from_env_and_defaults() {
        let c = ControllerConfig::load(None, &HashMap::new(), ConfigFile::default()).unwrap();
        assert_eq!(c.telemetry_retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.metrics_listen.to_string(), "127.0.0.1:9401");
        let env = HashMap::from([
            ("GPUFLEET_TELEMETRY_RETENTION".to_string(), "2d".to_string()),
            (
                "GPUFLEET_METRICS_LISTEN".to_string(),
                "0.0.0.0:9999".to_string(),
            ),
        ]);
        let c = ControllerConfig::load(None, &env, ConfigFile::default()).unwrap();
        assert_eq!(c.telemetry_retention, Duration::from_secs(2 * 86_400));
        assert_eq!(c.metrics_listen.port(), 9999);
        let env = HashMap::from([(
            "GPUFLEET_TELEMETRY_RETENTION".to_string(),
            "30s".to_string(),
        )]);
        let err = ControllerConfig::load(None, &env, ConfigFile::default()).unwrap_err();
        assert!(err.to_string().starts_with("telemetry_retention"), "{err}");
    }

    #[test]
    fn printed_config_round_trips() {
        let c = ControllerConfig::for_data_dir("/d");
        let again: ConfigFile = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(again.data_dir, Some(PathBuf::from("/d")));
    }
}

#[cfg(test)]
mod shipped_config {
    use super::*;

    /// The example in deploy/ must load and match the defaults it documents.
    #[test]
    fn deploy_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/controller.toml");
        let loaded =
            ControllerConfig::load(Some(&path), &HashMap::new(), ConfigFile::default()).unwrap();
        let defaults =
            ControllerConfig::load(None, &HashMap::new(), ConfigFile::default()).unwrap();
        assert_eq!(loaded.listen, defaults.listen);
        assert_eq!(loaded.data_dir, defaults.data_dir);
        assert_eq!(loaded.node_not_ready_after, defaults.node_not_ready_after);
        assert_eq!(loaded.node_lost_after, defaults.node_lost_after);
        assert_eq!(loaded.telemetry_retention, defaults.telemetry_retention);
        assert_eq!(loaded.metrics_listen, defaults.metrics_listen);
        assert_eq!(loaded.store_cache_bytes, defaults.store_cache_bytes);
    }
}

#[cfg(test)]
mod tls_keys {
    use super::*;

    #[test]
    fn tls_keys_are_checked_together() {
        let env = HashMap::from([("GPUFLEET_TLS_CERT".to_string(), "/c.pem".to_string())]);
        let err = ControllerConfig::load(None, &env, ConfigFile::default()).unwrap_err();
        assert!(err.to_string().starts_with("tls_cert"), "{err}");
        let env = HashMap::from([("GPUFLEET_TLS_CLIENT_CA".to_string(), "/ca.pem".to_string())]);
        let err = ControllerConfig::load(None, &env, ConfigFile::default()).unwrap_err();
        assert!(err.to_string().starts_with("tls_client_ca"), "{err}");
        let flags = ConfigFile {
            tls_cert: Some("/c.pem".into()),
            tls_key: Some("/k.pem".into()),
            ..Default::default()
        };
        let c = ControllerConfig::load(None, &HashMap::new(), flags).unwrap();
        assert_eq!(c.tls.key, Some(PathBuf::from("/k.pem")));
    }
}

fn parse_env_u32(env: &HashMap<String, String>, key: &str) -> Result<Option<u32>, ConfigError> {
    env.get(key)
        .map(|v| {
            v.trim().parse::<u32>().map_err(|_| ConfigError::Invalid {
                key: key.into(),
                message: format!("{v:?} is not a whole number"),
            })
        })
        .transpose()
}
