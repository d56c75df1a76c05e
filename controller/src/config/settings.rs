//! Every controller config key, declared once: one field whose doc comment
//! is its `--help` text, read by serde from the TOML file and by clap from
//! flags and (through [`gpufleet_core::layered`]) the environment. The
//! tables (`queues`, `generation_factors`, `tenants`) are file-only.
//! docs/configuration.md documents each key once; a test keeps it in step
//! with this file.
//!
//! Values stay close to what the user wrote (text for durations and
//! addresses); [`super::ControllerConfig::from_settings`] checks them and
//! names the key in its errors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Parser};
use gpufleet_core::layered::trimmed;
use serde::{Deserialize, Serialize};

/// The gpufleet controller: aggregates GPU capacity across clouds and
/// regions, schedules jobs onto agents, and serves the gRPC API.
///
/// Every option is also an environment variable, and every option but
/// --config, --print-config and --log-format is a key of the TOML file
/// given with --config. Precedence: flag > environment > file > default.
#[derive(Debug, Parser)]
#[command(name = "gpufleet-controller", version, about)]
pub struct ControllerCli {
    /// TOML config file; flags and GPUFLEET_* variables override its keys.
    #[arg(long, env = "GPUFLEET_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Copy the sled store of this data dir into etcd (store = "etcd"),
    /// then exit. Stop every controller first; the etcd prefix must be
    /// empty.
    #[arg(long, value_name = "DIR")]
    pub migrate_from_sled: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, env = "GPUFLEET_LOG_FORMAT", value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    #[command(flatten)]
    pub settings: ControllerSettings,
}

/// The keys of the controller's config file; `None`: not given at this
/// layer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Args)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ControllerSettings {
    /// gRPC listen address [default: 127.0.0.1:7070].
    #[arg(long, env = "GPUFLEET_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Directory of the embedded store [default: /var/lib/gpufleet/controller].
    #[arg(long, env = "GPUFLEET_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Token agents must present to join [default: generated at the first
    /// start, written to join.token in the data dir].
    #[arg(
        long,
        env = "GPUFLEET_JOIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub join_token: Option<String>,
    /// Where the first start writes the bootstrap admin token (mode 0600)
    /// [default: admin.token in the data dir].
    #[arg(long, env = "GPUFLEET_ADMIN_TOKEN_FILE", value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,
    /// Requests per second each client token may make; 0 = no limit [default: 1000].
    #[arg(long, env = "GPUFLEET_RATE_LIMIT_PER_TOKEN", value_name = "N", value_parser = trimmed::<u32>)]
    pub rate_limit_per_token: Option<u32>,
    /// Requests a token may make at once above its rate [default: 2 × the rate].
    #[arg(long, env = "GPUFLEET_RATE_LIMIT_BURST", value_name = "N", value_parser = trimmed::<u32>)]
    pub rate_limit_burst: Option<u32>,
    /// Streams (WatchJob, StreamJobLogs) one client token may hold open at once [default: 64].
    #[arg(long, env = "GPUFLEET_MAX_STREAMS_PER_TOKEN", value_name = "N", value_parser = trimmed::<u32>)]
    pub max_streams_per_token: Option<u32>,
    /// Streams all client tokens together may hold open at once [default: 1024].
    #[arg(long, env = "GPUFLEET_MAX_STREAMS", value_name = "N", value_parser = trimmed::<u32>)]
    pub max_streams: Option<u32>,
    /// A stream whose client reads nothing from its full buffer for this long is ended [default: 1m].
    #[arg(long, env = "GPUFLEET_STREAM_STALL_TIMEOUT", value_name = "DURATION")]
    pub stream_stall_timeout: Option<String>,
    /// Silence after which a node is NotReady [default: 15s].
    #[arg(long, env = "GPUFLEET_NODE_NOT_READY_AFTER", value_name = "DURATION")]
    pub node_not_ready_after: Option<String>,
    /// Silence after which a node is Lost and its jobs end [default: 60s].
    #[arg(long, env = "GPUFLEET_NODE_LOST_AFTER", value_name = "DURATION")]
    pub node_lost_after: Option<String>,
    /// How long per-minute telemetry rollups are kept [default: 7d].
    #[arg(long, env = "GPUFLEET_TELEMETRY_RETENTION", value_name = "DURATION")]
    pub telemetry_retention: Option<String>,
    /// HTTP address of the Prometheus /metrics endpoint [default: 127.0.0.1:9401].
    #[arg(long, env = "GPUFLEET_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// PEM certificate chain for TLS on the gRPC listener.
    #[arg(long, env = "GPUFLEET_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the gRPC listener.
    #[arg(long, env = "GPUFLEET_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA of agents' client certificates: agents must present one (mutual TLS).
    #[arg(long, env = "GPUFLEET_TLS_CLIENT_CA", value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// Placement policy for jobs that name none: cost, pack or spread [default: cost].
    #[arg(long, env = "GPUFLEET_DEFAULT_POLICY", value_name = "POLICY")]
    pub default_policy: Option<String>,
    /// Half-life of past usage in fair share [default: 24h].
    #[arg(long, env = "GPUFLEET_FAIR_SHARE_HALF_LIFE", value_name = "DURATION")]
    pub fair_share_half_life: Option<String>,
    /// Node label whose value names a node's network block: a gang prefers
    /// nodes that share one value; empty turns the preference off
    /// [default: topology.block].
    #[arg(long, env = "GPUFLEET_TOPOLOGY_BLOCK_LABEL", value_name = "KEY")]
    pub topology_block_label: Option<String>,
    /// Queues jobs may name (file only) [default: ["default"]].
    #[arg(skip)]
    pub queues: Option<Vec<String>>,
    /// GPU-hours of a generation in normalised units, e.g. hopper = 2.0
    /// (file only) [default: every generation 1.0].
    #[arg(skip)]
    pub generation_factors: Option<BTreeMap<String, f64>>,
    /// Tenants with weights and quotas (file only). When any is listed,
    /// jobs must name one.
    #[arg(skip)]
    pub tenants: Option<BTreeMap<String, TenantConfig>>,
    /// How long usage records are kept [default: 400d].
    #[arg(long, env = "GPUFLEET_USAGE_RETENTION", value_name = "DURATION")]
    pub usage_retention: Option<String>,
    /// How long per-minute market signals are kept [default: 30d].
    #[arg(long, env = "GPUFLEET_MARKET_RETENTION", value_name = "DURATION")]
    pub market_retention: Option<String>,
    /// How long finished jobs are kept before they are deleted (their usage
    /// records stay) [default: 7d].
    #[arg(long, env = "GPUFLEET_FINISHED_JOB_RETENTION", value_name = "DURATION")]
    pub finished_job_retention: Option<String>,
    /// The embedded store's page cache, e.g. 16MiB; sled holds up to twice
    /// this in heap [default: 4MiB].
    #[arg(long, env = "GPUFLEET_STORE_CACHE", value_name = "SIZE")]
    pub store_cache: Option<String>,
    /// Price sources, first listed wins a key two name: file:/path.csv,
    /// http(s)://host/prices.json (comma-separated as a flag or variable)
    /// [default: none; each node's configured price].
    #[arg(
        long = "price-source",
        env = "GPUFLEET_PRICE_SOURCES",
        value_name = "SOURCE",
        value_delimiter = ','
    )]
    pub price_sources: Option<Vec<String>>,
    /// How often price sources are read [default: 5m].
    #[arg(long, env = "GPUFLEET_PRICE_REFRESH_INTERVAL", value_name = "DURATION")]
    pub price_refresh_interval: Option<String>,
    /// Where the controller's state lives: sled (embedded, in data_dir) or
    /// etcd (shared by several controllers, one of them the leader;
    /// docs/ha.md) [default: sled].
    #[arg(long, env = "GPUFLEET_STORE", value_name = "BACKEND")]
    pub store: Option<String>,
    /// etcd members' client URLs, comma-separated: http://host:2379,
    /// https://host:2379 or unix:///path (store = "etcd").
    #[arg(long, env = "GPUFLEET_ETCD_ENDPOINTS", value_name = "URLS")]
    pub etcd_endpoints: Option<String>,
    /// Prefix of every etcd key this fleet uses [default: /gpufleet/].
    #[arg(long, env = "GPUFLEET_ETCD_PREFIX", value_name = "PREFIX")]
    pub etcd_prefix: Option<String>,
    /// PEM CA that signed the etcd members' certificates (https endpoints).
    #[arg(long, env = "GPUFLEET_ETCD_CA_FILE", value_name = "PEM")]
    pub etcd_ca_file: Option<PathBuf>,
    /// PEM client certificate for etcd (with etcd_key_file).
    #[arg(long, env = "GPUFLEET_ETCD_CERT_FILE", value_name = "PEM")]
    pub etcd_cert_file: Option<PathBuf>,
    /// PEM private key of etcd_cert_file.
    #[arg(long, env = "GPUFLEET_ETCD_KEY_FILE", value_name = "PEM")]
    pub etcd_key_file: Option<PathBuf>,
    /// etcd user (with etcd_password_file), when etcd has auth enabled.
    #[arg(long, env = "GPUFLEET_ETCD_USERNAME", value_name = "USER")]
    pub etcd_username: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, env = "GPUFLEET_ETCD_PASSWORD_FILE", value_name = "PATH")]
    pub etcd_password_file: Option<PathBuf>,
    /// The leader's lease in etcd: how long a dead leader can hold the
    /// fleet up before a standby takes over [default: 3s].
    #[arg(long, env = "GPUFLEET_LEADER_LEASE", value_name = "DURATION")]
    pub leader_lease: Option<String>,
    /// URL clients and agents should dial to reach this controller, which
    /// standbys name when they redirect to the leader [default:
    /// http(s)://<the bound listen address>].
    #[arg(long, env = "GPUFLEET_ADVERTISE_URL", value_name = "URL")]
    pub advertise_url: Option<String>,
}

/// One `[tenants.NAME]` table.
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
