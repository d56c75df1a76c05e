//! The controller's Prometheus `/metrics`: fleet gauges per provider, region
//! and generation, nodes and jobs by state, and telemetry counters. The text
//! format (0.0.4) is written by hand: it is small, and keeping it here
//! avoids a metrics registry mirroring state the controller already has.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;

use gpufleet_proto::v1::{
    CapacityDimension, GetAggregatesResponse, GetCapacityResponse, GpuGeneration, JobState,
    NodeState, NodeTelemetryStats,
};
use tokio::net::TcpListener;

use crate::state::Controller;
use crate::telemetry::{self, DROP_REASONS};

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Gauge,
    Counter,
}

/// Writes metric families in the Prometheus text format.
#[derive(Default)]
pub struct Encoder {
    out: String,
}

impl Encoder {
    /// Starts a family: `# HELP` and `# TYPE` lines. Counters end in `_total`.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let kind = match kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let value = value
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{key}=\"{value}\"");
            }
            self.out.push('}');
        }
        let value = if value.is_nan() {
            "NaN".to_string()
        } else if value.is_infinite() {
            if value > 0.0 { "+Inf" } else { "-Inf" }.to_string()
        } else {
            value.to_string()
        };
        let _ = writeln!(self.out, " {value}");
    }

    /// A whole histogram family: cumulative `_bucket`s, `_sum`, `_count`.
    pub fn histogram(&mut self, name: &str, help: &str, h: &crate::state::WaitHistogram) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} histogram");
        let mut cumulative = 0u64;
        for (bound, count) in crate::state::WAIT_BUCKETS.iter().zip(&h.counts) {
            cumulative += count;
            let le = bound.to_string();
            self.sample(&format!("{name}_bucket"), &[("le", &le)], cumulative as f64);
        }
        self.sample(&format!("{name}_bucket"), &[("le", "+Inf")], h.count as f64);
        self.sample(&format!("{name}_sum"), &[], h.sum);
        self.sample(&format!("{name}_count"), &[], h.count as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// Everything `/metrics` shows, read from the controller at scrape time.
pub struct Snapshot {
    /// Grouped by provider, region, generation.
    pub capacity: GetCapacityResponse,
    /// Grouped by provider, region, generation.
    pub aggregates: GetAggregatesResponse,
    pub nodes_by_state: BTreeMap<NodeState, u64>,
    pub jobs_by_state: BTreeMap<JobState, u64>,
    /// Jobs held in memory (live ones); finished jobs are in the store.
    pub resident_jobs: u64,
    /// Live heap, when the binary's allocator counts it.
    pub heap_bytes: Option<u64>,
    pub telemetry: Vec<NodeTelemetryStats>,
    pub rollups_dropped: u64,
    /// Rollup segment files on disk, when the store keeps them in files.
    pub rollup_disk: Option<crate::telemetry::RollupDiskUsage>,
    /// Finished usage by provider, region, generation, tenant (retained ledger).
    pub usage: gpufleet_proto::v1::UsageReportResponse,
    /// Latest market signal per region and generation.
    pub market: gpufleet_proto::v1::MarketTightnessResponse,
    /// Created → scheduled waits of placed jobs (since the controller started).
    pub queue_wait: crate::state::WaitHistogram,
    /// Whether the store's writes work, and how often they failed.
    pub store: StoreStatus,
    /// Prices in force from the price sources.
    pub prices: gpufleet_proto::v1::MarketPricesResponse,
    /// Spot interruptions in the last 7 days, with their rates.
    pub interruptions: gpufleet_proto::v1::MarketInterruptionsResponse,
}

/// The store's write health (see [`crate::store::StoreHealth`]).
#[derive(Debug, Clone, Default)]
pub struct StoreStatus {
    pub failures: u64,
    pub reopens: u64,
    pub degraded: crate::store::Degraded,
    pub traffic: crate::store::TrafficSnapshot,
}

const GROUPING: [CapacityDimension; 3] = [
    CapacityDimension::Provider,
    CapacityDimension::Region,
    CapacityDimension::Generation,
];

impl Snapshot {
    pub fn take(controller: &Controller) -> crate::error::Result<Self> {
        let nodes = controller.list_nodes("", "", &[]);
        let mut nodes_by_state = BTreeMap::new();
        for node in &nodes {
            *nodes_by_state.entry(node.state()).or_insert(0) += 1;
        }
        Ok(Self {
            capacity: controller.capacity(&GROUPING)?,
            aggregates: telemetry::aggregates(&nodes, &GROUPING, controller.now())?,
            nodes_by_state,
            jobs_by_state: controller.job_counts(),
            resident_jobs: controller.resident_jobs() as u64,
            heap_bytes: crate::memory::heap_bytes(),
            telemetry: controller.telemetry().all_stats(),
            rollups_dropped: controller.telemetry().rollups_dropped(),
            rollup_disk: controller.telemetry().disk_usage(),
            usage: {
                use crate::usage::{ReportQuery, UsageDimension};
                let now = controller.clock().unix_secs();
                controller.usage_report(
                    &ReportQuery {
                        group_by: vec![
                            UsageDimension::Provider,
                            UsageDimension::Region,
                            UsageDimension::Generation,
                            UsageDimension::Tenant,
                        ],
                        since_secs: now.saturating_sub(controller.config().usage_retention.records),
                        until_secs: now + 1,
                        series_secs: None,
                        limit: 0,
                        tenant: None,
                        by_used: false,
                    },
                    false,
                )
            },
            queue_wait: controller.queue_wait(),
            store: {
                let health = controller.store_health();
                StoreStatus {
                    failures: health.failures(),
                    reopens: health.reopens(),
                    degraded: health.now(),
                    traffic: controller.store_traffic(),
                }
            },
            market: controller.market_tightness(controller.clock().unix_secs().saturating_sub(120)),
            prices: {
                let mut prices = controller.market_prices(&crate::state::prices::PriceQuery {
                    since_ms: controller.clock().unix_millis(),
                    limit: 1,
                    ..Default::default()
                });
                prices.history.clear();
                prices
            },
            interruptions: controller
                .market_interruptions(controller.clock().unix_secs().saturating_sub(7 * 86_400), 1),
        })
    }
}

/// `GPU_GENERATION_HOPPER` → `hopper`.
fn generation_label(generation: i32) -> String {
    let name = GpuGeneration::try_from(generation)
        .unwrap_or(GpuGeneration::Unspecified)
        .as_str_name();
    name.strip_prefix("GPU_GENERATION_")
        .unwrap_or(name)
        .to_ascii_lowercase()
}

fn state_label(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

pub fn render(snapshot: &Snapshot) -> String {
    let mut e = Encoder::default();
    type AggField = fn(&gpufleet_proto::v1::TelemetryGroup) -> f64;
    let telemetry: [(&str, &str, AggField); 5] = [
        (
            "gpufleet_gpus_reporting",
            "GPUs on Ready nodes with a latest telemetry sample.",
            |g| f64::from(g.reporting_gpus),
        ),
        (
            "gpufleet_gpus_unhealthy",
            "GPUs whose health is Unhealthy.",
            |g| f64::from(g.unhealthy_gpus),
        ),
        (
            "gpufleet_gpu_utilization_mean_percent",
            "Mean GPU utilisation of the reporting GPUs, in percent.",
            |g| g.mean_gpu_utilization_percent,
        ),
        (
            "gpufleet_gpu_power_watts",
            "Total power drawn by the reporting GPUs, in watts.",
            |g| g.total_power_watts,
        ),
        (
            "gpufleet_gpu_memory_used_bytes",
            "Framebuffer memory used on the reporting GPUs, in bytes.",
            |g| g.memory_used_bytes as f64,
        ),
    ];
    for (name, help, field) in telemetry {
        e.family(name, Kind::Gauge, help);
        for g in &snapshot.aggregates.groups {
            let generation = generation_label(g.generation);
            let labels = [
                ("provider", g.provider.as_str()),
                ("region", g.region.as_str()),
                ("generation", generation.as_str()),
            ];
            e.sample(name, &labels, field(g));
        }
    }
    e.family("gpufleet_nodes", Kind::Gauge, "Registered nodes by state.");
    for state in [NodeState::Ready, NodeState::NotReady, NodeState::Lost] {
        let count = snapshot.nodes_by_state.get(&state).copied().unwrap_or(0);
        let label = state_label(state.as_str_name(), "NODE_STATE_");
        e.sample("gpufleet_nodes", &[("state", &label)], count as f64);
    }
    e.family(
        "gpufleet_jobs",
        Kind::Gauge,
        "Jobs known to the controller by state.",
    );
    for (state, count) in &snapshot.jobs_by_state {
        let label = state_label(state.as_str_name(), "JOB_STATE_");
        e.sample("gpufleet_jobs", &[("state", &label)], *count as f64);
    }
    e.family(
        "gpufleet_controller_resident_jobs",
        Kind::Gauge,
        "Jobs held in the controller's memory: the live ones (finished jobs are read from the store).",
    );
    e.sample(
        "gpufleet_controller_resident_jobs",
        &[],
        snapshot.resident_jobs as f64,
    );
    if let Some(heap) = snapshot.heap_bytes {
        e.family(
            "gpufleet_controller_heap_bytes",
            Kind::Gauge,
            "Bytes the controller has allocated and not freed; RSS above it is memory the allocator keeps.",
        );
        e.sample("gpufleet_controller_heap_bytes", &[], heap as f64);
    }
    e.family(
        "gpufleet_telemetry_samples_accepted_total",
        Kind::Counter,
        "GPU samples accepted from each node since the controller started.",
    );
    for stats in &snapshot.telemetry {
        e.sample(
            "gpufleet_telemetry_samples_accepted_total",
            &[("node", &stats.node_id)],
            stats.samples_accepted as f64,
        );
    }
    e.family(
        "gpufleet_telemetry_samples_dropped_total",
        Kind::Counter,
        "Malformed or out-of-range GPU samples dropped, by node and reason.",
    );
    for stats in &snapshot.telemetry {
        for reason in DROP_REASONS {
            let count = stats
                .dropped_by_reason
                .get(reason.as_str())
                .copied()
                .unwrap_or(0);
            e.sample(
                "gpufleet_telemetry_samples_dropped_total",
                &[("node", &stats.node_id), ("reason", reason.as_str())],
                count as f64,
            );
        }
    }
    e.family(
        "gpufleet_telemetry_rollups_dropped_total",
        Kind::Counter,
        "Per-minute rollups lost because the store could not keep up.",
    );
    e.sample(
        "gpufleet_telemetry_rollups_dropped_total",
        &[],
        snapshot.rollups_dropped as f64,
    );
    e.family(
        "gpufleet_controller_store_write_failures_total",
        Kind::Counter,
        "Store writes (state batches, telemetry rollups) that failed with an I/O error, a full disk among them; each retry that fails counts.",
    );
    e.sample(
        "gpufleet_controller_store_write_failures_total",
        &[],
        snapshot.store.failures as f64,
    );
    e.family(
        "gpufleet_controller_store_reopens_total",
        Kind::Counter,
        "Times the state store was reopened to recover from a failed write.",
    );
    e.sample(
        "gpufleet_controller_store_reopens_total",
        &[],
        snapshot.store.reopens as f64,
    );
    let traffic = &snapshot.store.traffic;
    for (name, help, value) in [
        (
            "gpufleet_controller_store_commits_total",
            "Group-commit rounds applied to the state store, each one atomic batch (on etcd one transaction, a quorum round trip).",
            traffic.commits,
        ),
        (
            "gpufleet_controller_store_written_keys_total",
            "Key writes (puts and deletes) those rounds carried, each key once per round.",
            traffic.writes,
        ),
        (
            "gpufleet_controller_store_written_bytes_total",
            "Bytes of those key writes, keys plus values.",
            traffic.written_bytes,
        ),
        (
            "gpufleet_controller_store_reads_total",
            "Reads that reached the state store (a key read, or a range walk: on etcd a round trip per 512 keys); reads of queued writes are answered from memory and not counted.",
            traffic.reads,
        ),
    ] {
        e.family(name, Kind::Counter, help);
        e.sample(name, &[], value as f64);
    }
    e.family(
        "gpufleet_controller_store_degraded",
        Kind::Gauge,
        "1 while writes to this part of the store fail (health NOT_SERVING, changes refused for part=\"state\"), else 0.",
    );
    for (part, failing) in [
        ("state", &snapshot.store.degraded.state),
        ("rollups", &snapshot.store.degraded.rollups),
    ] {
        e.sample(
            "gpufleet_controller_store_degraded",
            &[("part", part)],
            if failing.is_some() { 1.0 } else { 0.0 },
        );
    }
    if let Some(disk) = snapshot.rollup_disk {
        e.family(
            "gpufleet_telemetry_rollup_segments",
            Kind::Gauge,
            "Telemetry rollup segment files on disk, the one being written included.",
        );
        e.sample(
            "gpufleet_telemetry_rollup_segments",
            &[],
            disk.segments as f64,
        );
        e.family(
            "gpufleet_telemetry_rollup_disk_bytes",
            Kind::Gauge,
            "Bytes of the telemetry rollup segment files and their indexes.",
        );
        e.sample(
            "gpufleet_telemetry_rollup_disk_bytes",
            &[],
            disk.bytes as f64,
        );
    }

    // Usage: totals of the retained ledger (finished allocations); they
    // drop when retention deletes records, which Prometheus reads as a reset.
    type UsageValue = fn(&gpufleet_proto::v1::UsageRow) -> f64;
    let usage_families: [(&str, &str, UsageValue); 2] = [
        (
            "gpufleet_usage_gpu_seconds_total",
            "GPU-seconds of finished allocations, by provider, region, generation and tenant.",
            |row| row.gpu_milliseconds as f64 / 1000.0,
        ),
        (
            "gpufleet_usage_cost_usd_total",
            "Cost in USD of finished allocations at their nodes' prices.",
            |row| row.cost_micro_usd as f64 / 1_000_000.0,
        ),
    ];
    for (name, help, value) in usage_families {
        e.family(name, Kind::Counter, help);
        for row in &snapshot.usage.rows {
            let generation = generation_label(row.generation);
            e.sample(
                name,
                &[
                    ("provider", &row.provider),
                    ("region", &row.region),
                    ("generation", &generation),
                    ("tenant", &row.tenant),
                ],
                value(row),
            );
        }
    }

    // Market: the latest minute's signal per region and generation.
    for (name, help) in [
        (
            "gpufleet_market_supply_gpus",
            "Healthy GPUs on ready nodes.",
        ),
        ("gpufleet_market_free_gpus", "Free healthy GPUs."),
        (
            "gpufleet_region_tightness",
            "Pending demand per free GPU (pending ÷ max(free, 1)).",
        ),
    ] {
        e.family(name, Kind::Gauge, help);
        for r in &snapshot.market.regions {
            let generation = generation_label(r.generation);
            let value = match name {
                "gpufleet_market_supply_gpus" => r.supply_gpus as f64,
                "gpufleet_market_free_gpus" => r.free_gpus as f64,
                _ => r.tightness_now,
            };
            e.sample(
                name,
                &[("region", &r.region), ("generation", &generation)],
                value,
            );
        }
    }
    // Capacity, one family with a state label (what the shipped dashboards
    // and alerts query; deploy/metrics.yaml).
    e.family(
        "gpufleet_fleet_gpus",
        Kind::Gauge,
        "GPUs by provider, region, generation and state (total, healthy, allocated, free).",
    );
    for g in &snapshot.capacity.groups {
        let generation = generation_label(g.generation);
        for (state, value) in [
            ("total", g.total_gpus),
            ("healthy", g.healthy_gpus),
            ("allocated", g.allocated_gpus),
            ("free", g.free_gpus),
        ] {
            e.sample(
                "gpufleet_fleet_gpus",
                &[
                    ("provider", &g.provider),
                    ("region", &g.region),
                    ("generation", &generation),
                    ("state", state),
                ],
                value as f64,
            );
        }
    }
    e.family(
        "gpufleet_price_per_gpu_hour_usd",
        Kind::Gauge,
        "Lowest on-demand price per GPU-hour, by provider, region and generation.",
    );
    for g in &snapshot.capacity.groups {
        let generation = generation_label(g.generation);
        e.sample(
            "gpufleet_price_per_gpu_hour_usd",
            &[
                ("provider", &g.provider),
                ("region", &g.region),
                ("generation", &generation),
            ],
            g.min_price_per_gpu_hour_micro_usd as f64 / 1_000_000.0,
        );
    }
    e.family(
        "gpufleet_pending_gpus",
        Kind::Gauge,
        "GPUs requested by pending jobs that could run in the region (latest market minute).",
    );
    for r in &snapshot.market.regions {
        let generation = generation_label(r.generation);
        e.sample(
            "gpufleet_pending_gpus",
            &[("region", &r.region), ("generation", &generation)],
            r.pending_demand_gpus as f64,
        );
    }
    e.histogram(
        "gpufleet_queue_wait_seconds",
        "Time from submission to placement of placed jobs.",
        &snapshot.queue_wait,
    );
    e.family(
        "gpufleet_market_unmet_demand_gpus",
        Kind::Gauge,
        "GPUs requested by pending jobs that no region can satisfy.",
    );
    e.sample(
        "gpufleet_market_unmet_demand_gpus",
        &[],
        snapshot.market.unmet_demand_gpus as f64,
    );
    e.family(
        "gpufleet_source_price_per_gpu_hour_usd",
        Kind::Gauge,
        "Price in force from the price sources, per price key (empty labels match any).",
    );
    for entry in &snapshot.prices.current {
        let key = entry.key.clone().unwrap_or_default();
        e.sample(
            "gpufleet_source_price_per_gpu_hour_usd",
            &[
                ("provider", &key.provider),
                ("region", &key.region),
                ("model", &key.model),
                ("capacity", if key.spot { "spot" } else { "on-demand" }),
            ],
            entry.price_per_gpu_hour_micro_usd as f64 / 1_000_000.0,
        );
    }
    // One family at a time: every sample follows its own HELP/TYPE block.
    e.family(
        "gpufleet_spot_interruptions",
        Kind::Gauge,
        "Spot interruptions in the last 7 days.",
    );
    for rate in &snapshot.interruptions.rates {
        let generation = generation_label(rate.generation);
        e.sample(
            "gpufleet_spot_interruptions",
            &[
                ("provider", &rate.provider),
                ("region", &rate.region),
                ("generation", &generation),
            ],
            rate.interruptions as f64,
        );
    }
    e.family(
        "gpufleet_spot_interruptions_per_node_hour",
        Kind::Gauge,
        "Spot interruptions per spot node-hour over the last 7 days.",
    );
    for rate in &snapshot.interruptions.rates {
        let generation = generation_label(rate.generation);
        if let Some(per_hour) = rate.interruptions_per_node_hour {
            e.sample(
                "gpufleet_spot_interruptions_per_node_hour",
                &[
                    ("provider", &rate.provider),
                    ("region", &rate.region),
                    ("generation", &generation),
                ],
                per_hour,
            );
        }
    }
    e.finish()
}

/// Serves `GET /metrics` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    controller: Controller,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let controller = controller.clone();
            async move {
                // Like every reply, only once what it shows is durable;
                // except while the store cannot write: then the counts may
                // include queued changes, and the scrape shows the failure.
                let snapshot = Snapshot::take(&controller);
                let settled = match controller.settled().await {
                    Err(crate::error::ControllerError::Store(
                        crate::store::StoreError::NotDurable(_),
                    )) => Ok(()),
                    other => other,
                };
                let snapshot = settled.and(snapshot);
                match snapshot {
                    Ok(snapshot) => (
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, CONTENT_TYPE)],
                        render(&snapshot),
                    ),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                        format!("cannot read the fleet: {e}\n"),
                    ),
                }
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Address helper for logs.
pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::{CapacityGroup, TelemetryGroup};
    use std::collections::HashSet;

    /// A parser-level check of the exposition format, the rules
    /// `promtool check metrics` enforces that a hand-written encoder can
    /// break: HELP and TYPE before samples, valid names and labels, parseable
    /// values, counters named `_total`, no duplicate series, each family in
    /// one block.
    pub(crate) fn check_exposition(text: &str) -> Result<usize, String> {
        let name_ok = |n: &str| {
            let mut chars = n.chars();
            chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        let mut typed: BTreeMap<String, String> = BTreeMap::new();
        let mut helped = HashSet::new();
        let mut finished_families = HashSet::new();
        let mut current: Option<String> = None;
        let mut series = HashSet::new();
        let mut samples = 0;
        if !text.ends_with('\n') {
            return Err("exposition must end with a newline".into());
        }
        for (n, line) in text.lines().enumerate() {
            let at = |m: &str| format!("line {}: {m}: {line}", n + 1);
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or_default();
                if !name_ok(name) || !helped.insert(name.to_string()) {
                    return Err(at("bad or repeated HELP"));
                }
                if let Some(prev) = current.replace(name.to_string())
                    && prev != name
                {
                    finished_families.insert(prev);
                }
                if finished_families.contains(name) {
                    return Err(at("family split in two blocks"));
                }
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split(' ');
                let (name, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                if !["gauge", "counter", "histogram"].contains(&kind) || typed.contains_key(name) {
                    return Err(at("bad or repeated TYPE"));
                }
                if kind == "counter" && !name.ends_with("_total") {
                    return Err(at("counter not named _total"));
                }
                typed.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                return Err(at("unexpected line"));
            }
            let (series_text, value) = line.rsplit_once(' ').ok_or_else(|| at("no value"))?;
            if value.parse::<f64>().is_err() && !["NaN", "+Inf", "-Inf"].contains(&value) {
                return Err(at("bad value"));
            }
            let sample_name = series_text.split('{').next().unwrap_or_default();
            // A histogram's samples are its `_bucket`, `_sum` and `_count`.
            let name = match current.as_deref() {
                Some(family)
                    if typed.get(family).is_some_and(|k| k == "histogram")
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|suffix| sample_name.strip_suffix(suffix) == Some(family)) =>
                {
                    family
                }
                _ => sample_name,
            };
            if !name_ok(name) || current.as_deref() != Some(name) || !typed.contains_key(name) {
                return Err(at("sample outside its family's HELP/TYPE block"));
            }
            if let Some(labels) = series_text
                .strip_prefix(sample_name)
                .filter(|l| !l.is_empty())
            {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .ok_or_else(|| at("bad label braces"))?;
                // key="value" pairs; values may contain escaped quotes.
                let mut rest = inner;
                while !rest.is_empty() {
                    let (key, after) = rest.split_once("=\"").ok_or_else(|| at("bad label"))?;
                    if !name_ok(key) || key.starts_with("__") {
                        return Err(at("bad label name"));
                    }
                    let mut escaped = false;
                    let end = after
                        .char_indices()
                        .find(|(_, c)| {
                            let stop = *c == '"' && !escaped;
                            escaped = *c == '\\' && !escaped;
                            stop
                        })
                        .map(|(i, _)| i)
                        .ok_or_else(|| at("unterminated label value"))?;
                    rest = &after[end + 1..];
                    rest = rest.strip_prefix(',').unwrap_or(rest);
                }
            }
            if !series.insert(series_text.to_string()) {
                return Err(at("duplicate series"));
            }
            samples += 1;
        }
        Ok(samples)
    }

    fn snapshot() -> Snapshot {
        let capacity_group = CapacityGroup {
            provider: "aws".into(),
            region: "us-east-1".into(),
            generation: GpuGeneration::Hopper as i32,
            total_gpus: 8,
            healthy_gpus: 7,
            allocated_gpus: 2,
            free_gpus: 5,
            ..Default::default()
        };
        let telemetry_group = TelemetryGroup {
            provider: "a \"quoted\\\" provider\nwith newline".into(),
            region: "us-east-1".into(),
            generation: GpuGeneration::Hopper as i32,
            gpus: 8,
            reporting_gpus: 8,
            mean_gpu_utilization_percent: 42.5,
            total_power_watts: 5600.0,
            memory_used_bytes: 1 << 40,
            ..Default::default()
        };
        Snapshot {
            capacity: GetCapacityResponse {
                groups: vec![capacity_group],
                ..Default::default()
            },
            aggregates: GetAggregatesResponse {
                groups: vec![telemetry_group],
                ..Default::default()
            },
            nodes_by_state: BTreeMap::from([(NodeState::Ready, 3)]),
            jobs_by_state: BTreeMap::from([(JobState::Running, 2), (JobState::Pending, 1)]),
            resident_jobs: 3,
            heap_bytes: Some(83_886_080),
            telemetry: vec![NodeTelemetryStats {
                node_id: "node-a".into(),
                samples_accepted: 10,
                samples_dropped: 4,
                dropped_by_reason: [("out_of_range".to_string(), 4)].into_iter().collect(),
            }],
            rollups_dropped: 0,
            store: StoreStatus {
                failures: 3,
                reopens: 1,
                degraded: crate::store::Degraded {
                    state: Some("the controller's disk is full".into()),
                    rollups: None,
                },
                traffic: crate::store::TrafficSnapshot {
                    commits: 5,
                    batches: 9,
                    writes: 20,
                    written_bytes: 4_096,
                    reads: 2,
                },
            },
            rollup_disk: Some(crate::telemetry::RollupDiskUsage {
                segments: 3,
                bytes: 1_234_567,
            }),
            usage: gpufleet_proto::v1::UsageReportResponse {
                rows: vec![gpufleet_proto::v1::UsageRow {
                    provider: "aws".into(),
                    region: "us-east-1".into(),
                    generation: GpuGeneration::Hopper as i32,
                    tenant: "research".into(),
                    gpu_milliseconds: 7_200_000,
                    cost_micro_usd: 7_860_000,
                    ..Default::default()
                }],
                ..Default::default()
            },
            queue_wait: {
                let mut h = crate::state::WaitHistogram::default();
                h.observe(3.0);
                h.observe(700.0);
                h
            },
            market: gpufleet_proto::v1::MarketTightnessResponse {
                regions: vec![gpufleet_proto::v1::RegionTightness {
                    region: "us-east-1".into(),
                    generation: GpuGeneration::Hopper as i32,
                    supply_gpus: 8,
                    free_gpus: 1,
                    pending_demand_gpus: 16,
                    tightness_now: 16.0,
                    ..Default::default()
                }],
                unmet_demand_gpus: 4,
            },
            prices: gpufleet_proto::v1::MarketPricesResponse {
                current: vec![gpufleet_proto::v1::PriceEntry {
                    key: Some(gpufleet_proto::v1::PriceKey {
                        provider: "aws".into(),
                        region: "us-east-1".into(),
                        model: "H100-SXM-80GB".into(),
                        spot: true,
                    }),
                    price_per_gpu_hour_micro_usd: 2_100_000,
                    ..Default::default()
                }],
                ..Default::default()
            },
            interruptions: gpufleet_proto::v1::MarketInterruptionsResponse {
                rates: vec![gpufleet_proto::v1::InterruptionRate {
                    provider: "aws".into(),
                    region: "us-east-1".into(),
                    generation: GpuGeneration::Hopper as i32,
                    interruptions: 3,
                    spot_node_hours: 12.0,
                    interruptions_per_node_hour: Some(0.25),
                }],
                ..Default::default()
            },
        }
    }

    #[test]
    fn rendered_metrics_are_valid_exposition() {
        let text = render(&snapshot());
        let samples = check_exposition(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert!(samples > 10);
        assert!(text.contains("gpufleet_source_price_per_gpu_hour_usd{provider=\"aws\",region=\"us-east-1\",model=\"H100-SXM-80GB\",capacity=\"spot\"} 2.1\n"), "{text}");
        assert!(text.contains("gpufleet_spot_interruptions_per_node_hour{provider=\"aws\",region=\"us-east-1\",generation=\"hopper\"} 0.25\n"), "{text}");
        assert!(text.contains("gpufleet_usage_gpu_seconds_total{provider=\"aws\",region=\"us-east-1\",generation=\"hopper\",tenant=\"research\"} 7200"), "{text}");
        assert!(text.contains("gpufleet_usage_cost_usd_total{provider=\"aws\",region=\"us-east-1\",generation=\"hopper\",tenant=\"research\"} 7.86"), "{text}");
        assert!(
            text.contains(
                "gpufleet_region_tightness{region=\"us-east-1\",generation=\"hopper\"} 16"
            ),
            "{text}"
        );
        assert!(text.contains(
            "gpufleet_fleet_gpus{provider=\"aws\",region=\"us-east-1\",generation=\"hopper\",state=\"free\"} 5\n"
        ));
        assert!(text.contains("gpufleet_nodes{state=\"ready\"} 3\n"));
        assert!(text.contains("gpufleet_nodes{state=\"lost\"} 0\n"));
        assert!(text.contains("gpufleet_jobs{state=\"running\"} 2\n"));
        assert!(text.contains("gpufleet_controller_heap_bytes 83886080\n"));
        assert!(text.contains("gpufleet_controller_store_commits_total 5\n"));
        assert!(text.contains("gpufleet_controller_store_written_keys_total 20\n"));
        assert!(text.contains("gpufleet_controller_store_written_bytes_total 4096\n"));
        assert!(text.contains("gpufleet_controller_store_reads_total 2\n"));
        assert!(
            text.contains("gpufleet_telemetry_rollup_segments 3\n"),
            "{text}"
        );
        assert!(
            text.contains("gpufleet_telemetry_rollup_disk_bytes 1234567\n"),
            "{text}"
        );
        let without_heap = render(&Snapshot {
            heap_bytes: None,
            ..snapshot()
        });
        assert!(!without_heap.contains("gpufleet_controller_heap_bytes"));
        assert!(text.contains(
            "gpufleet_telemetry_samples_dropped_total{node=\"node-a\",reason=\"out_of_range\"} 4\n"
        ));
        // Label values are escaped.
        assert!(text.contains(r#"provider="a \"quoted\\\" provider\nwith newline""#));
        assert!(text.contains("gpufleet_gpu_memory_used_bytes{"));
        assert!(text.contains("} 1099511627776\n"));
    }

    #[test]
    fn the_checker_catches_what_promtool_would() {
        for bad in [
            "gpufleet_x 1\n",
            "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v} 1\n",
            "# HELP a x\n# TYPE a counter\na 1\n",
            "# HELP a x\n# TYPE a gauge\na 1\na 2\n",
            "# HELP a x\n# TYPE a gauge\na one\n",
            "# HELP a x\n# TYPE a gauge\na 1",
        ] {
            assert!(check_exposition(bad).is_err(), "accepted {bad:?}");
        }
    }
}
