use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use gpufleet_proto::v1::{
    CapacityDimension, CapacityGroup, CordonNodeRequest, DrainNodeRequest, GetCapacityRequest,
    GetNodeRequest, GpuGeneration, ListNodesRequest, ListNodesResponse, Node, UncordonNodeRequest,
};

use crate::client;
use crate::output::{self, Format};

#[derive(Debug, Args)]
pub struct NodesArgs {
    #[command(subcommand)]
    command: Option<NodesCommand>,
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// List nodes (the default).
    List {
        /// Only nodes of this provider.
        #[arg(long)]
        provider: Option<String>,
        /// Only nodes in this region.
        #[arg(long)]
        region: Option<String>,
    },
    /// Show one node with its GPUs and their latest telemetry.
    Get {
        /// Node id.
        node_id: String,
    },
    /// Place no new work on the node; running work continues.
    Cordon {
        node_id: String,
        /// Shown with the node.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Let the node receive work again (also ends a drain).
    Uncordon { node_id: String },
    /// Return an Unhealthy GPU to service now instead of after the clean
    /// period; a fault seen again takes it out again.
    UncordonGpu { node_id: String, gpu_uuid: String },
    /// Cordon the node and evict what still runs at the deadline (evicted jobs are queued again).
    Drain {
        node_id: String,
        /// Time running jobs get to finish, e.g. 10m; 0s evicts now.
        #[arg(long, default_value = "10m")]
        deadline: String,
    },
    /// Forget the agent identity bound to a node id, so a reinstalled host
    /// can register under it again (admin).
    ResetIdentity { node_id: String },
    /// Split a GPU into MIG instances, e.g. `mig-layout node-1 0
    /// 3g.40gb,2g.20gb,1g.10gb,1g.10gb`. The agent applies it once no
    /// workload runs on the GPU (drain or cordon the node first); the
    /// scheduler never changes a layout. `--withdraw` drops the wish.
    MigLayout {
        node_id: String,
        /// GPU index (as `nodes get` shows) or UUID.
        gpu: String,
        /// Comma-separated MIG profiles, at most 7.
        #[arg(required_unless_present = "withdraw")]
        profiles: Option<String>,
        /// Drop the wanted layout of this GPU (its instances stay as they are).
        #[arg(long, conflicts_with = "profiles")]
        withdraw: bool,
    },
}

pub async fn nodes(address: &str, format: Format, args: NodesArgs) -> anyhow::Result<ExitCode> {
    let mut fleet = client::fleet(address).await?;
    match args.command.unwrap_or(NodesCommand::List {
        provider: None,
        region: None,
    }) {
        NodesCommand::List { provider, region } => {
            // Pages end at a byte budget too: follow them all.
            let mut request = ListNodesRequest {
                provider: provider.unwrap_or_default(),
                region: region.unwrap_or_default(),
                ..Default::default()
            };
            let mut response = ListNodesResponse::default();
            loop {
                let page = fleet.list_nodes(request.clone()).await?.into_inner();
                response.nodes.extend(page.nodes);
                if page.next_page_token.is_empty() {
                    break;
                }
                request.page_token = page.next_page_token;
            }
            if format == Format::Json {
                output::print_json(&response, true)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut table = output::table(&[
                "NODE",
                "PROVIDER",
                "REGION",
                "STATE",
                "GPUS",
                "MODEL",
                "PRICE/GPU-H",
                "SEEN",
            ]);
            for node in &response.nodes {
                let identity = node.identity.clone().unwrap_or_default();
                table.add_row(vec![
                    identity.node_id,
                    identity.provider,
                    identity.region,
                    output::enum_label(node.state().as_str_name(), "NODE_STATE_")
                        + if node.drain_deadline.is_some() {
                            ",Draining"
                        } else if node.cordoned {
                            ",Cordoned"
                        } else {
                            ""
                        },
                    format!("{}/{}", node.allocated_gpus, node.gpus.len()),
                    models(node),
                    output::usd(identity.price_per_gpu_hour_micro_usd)
                        + if identity.spot { " spot" } else { "" },
                    output::age(node.last_seen_at.as_ref()),
                ]);
            }
            output::print_table(&table);
            if response.nodes.is_empty() {
                eprintln!("no nodes yet: start an agent pointed at {address}");
            }
        }
        NodesCommand::Cordon { node_id, reason } => {
            let node = fleet
                .cordon_node(CordonNodeRequest {
                    node_id,
                    reason: reason.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_change(&node, format, "cordoned")?;
        }
        NodesCommand::ResetIdentity { node_id } => {
            let response = fleet
                .reset_node_identity(gpufleet_proto::v1::ResetNodeIdentityRequest {
                    node_id: node_id.clone(),
                })
                .await?
                .into_inner();
            if format == Format::Json {
                output::print_json(&response, true)?;
            } else if response.was_bound {
                say!(
                    "node {node_id}: identity forgotten; the next agent to register as {node_id} binds it"
                );
            } else {
                say!("node {node_id} had no bound identity");
            }
        }
        NodesCommand::UncordonGpu { node_id, gpu_uuid } => {
            let node = fleet
                .uncordon_gpu(gpufleet_proto::v1::UncordonGpuRequest {
                    node_id,
                    gpu_uuid: gpu_uuid.clone(),
                })
                .await?
                .into_inner();
            print_change(
                &node,
                format,
                &format!("GPU {gpu_uuid} returned to service"),
            )?;
        }
        NodesCommand::MigLayout {
            node_id,
            gpu,
            profiles,
            withdraw: _,
        } => {
            let node = fleet
                .get_node(GetNodeRequest {
                    node_id: node_id.clone(),
                })
                .await?
                .into_inner();
            let gpu_uuid = node
                .gpus
                .iter()
                .filter_map(|g| g.info.as_ref())
                .find(|i| i.uuid == gpu || i.index.to_string() == gpu)
                .map(|i| i.uuid.clone())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "node {node_id} has no GPU {gpu:?}; `gpufleet nodes get {node_id}` lists its GPUs"
                    )
                })?;
            let profiles: Vec<String> = profiles
                .iter()
                .flat_map(|p| p.split(','))
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect();
            let node = fleet
                .set_mig_layout(gpufleet_proto::v1::SetMigLayoutRequest {
                    node_id,
                    gpu_uuid: gpu_uuid.clone(),
                    profiles: profiles.clone(),
                })
                .await?
                .into_inner();
            let what = if profiles.is_empty() {
                format!("no MIG layout wanted for GPU {gpu_uuid}")
            } else {
                format!(
                    "MIG layout {} wanted for GPU {gpu_uuid}; the agent applies it once the GPU is idle (`gpufleet nodes get` shows its instances)",
                    profiles.join(",")
                )
            };
            print_change(&node, format, &what)?;
        }
        NodesCommand::Uncordon { node_id } => {
            let node = fleet
                .uncordon_node(UncordonNodeRequest { node_id })
                .await?
                .into_inner();
            print_change(&node, format, "uncordoned")?;
        }
        NodesCommand::Drain { node_id, deadline } => {
            let secs = humantime::parse_duration(&deadline)
                .map_err(|e| {
                    anyhow::anyhow!("--deadline {deadline:?} is not a duration like 10m: {e}")
                })?
                .as_secs();
            let deadline_seconds = u32::try_from(secs)
                .map_err(|_| anyhow::anyhow!("--deadline {deadline:?} is too long"))?;
            let node = fleet
                .drain_node(DrainNodeRequest {
                    node_id,
                    deadline_seconds,
                })
                .await?
                .into_inner();
            print_change(
                &node,
                format,
                &format!(
                    "draining; running work is evicted at {}",
                    output::time(node.drain_deadline.as_ref())
                ),
            )?;
        }
        NodesCommand::Get { node_id } => {
            let node = fleet
                .get_node(GetNodeRequest { node_id })
                .await?
                .into_inner();
            if format == Format::Json {
                output::print_json(&node, true)?;
                return Ok(ExitCode::SUCCESS);
            }
            print_node(&node);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_change(node: &Node, format: Format, what: &str) -> anyhow::Result<()> {
    if format == Format::Json {
        return output::print_json(node, true);
    }
    let id = node
        .identity
        .as_ref()
        .map(|i| i.node_id.as_str())
        .unwrap_or_default();
    say!("{id} {what}");
    Ok(())
}

fn models(node: &Node) -> String {
    let mut models: Vec<String> = node
        .gpus
        .iter()
        .filter_map(|g| g.info.as_ref().map(|i| i.model.clone()))
        .collect();
    models.dedup();
    models.join(",")
}

fn print_node(node: &Node) {
    let identity = node.identity.clone().unwrap_or_default();
    say!("Node:          {}", identity.node_id);
    say!(
        "Provider:      {} / {} / {}",
        identity.provider,
        identity.region,
        if identity.zone.is_empty() {
            "-"
        } else {
            &identity.zone
        }
    );
    say!(
        "Instance type: {}",
        if identity.instance_type.is_empty() {
            "-"
        } else {
            &identity.instance_type
        }
    );
    say!(
        "Price:         {}/GPU-hour{}",
        output::usd(identity.price_per_gpu_hour_micro_usd),
        if identity.spot { " (spot)" } else { "" }
    );
    say!(
        "State:         {}{}",
        output::enum_label(node.state().as_str_name(), "NODE_STATE_"),
        if node.connected {
            ""
        } else {
            " (disconnected)"
        }
    );
    if node.cordoned {
        say!("Cordoned:      {}", node.cordon_reason);
    }
    say!(
        "Last seen:     {} ago",
        output::age(node.last_seen_at.as_ref())
    );
    say!(
        "Agent:         {} (driver {})",
        node.agent_version,
        node.driver_version
    );
    if !identity.runtimes.is_empty() {
        let runtimes: Vec<String> = identity
            .runtimes
            .iter()
            .map(|r| output::safe(r).into_owned())
            .collect();
        say!("Runtimes:      {}", runtimes.join(","));
    }
    if !identity.labels.is_empty() {
        let labels: Vec<String> = identity
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        say!("Labels:        {}", labels.join(","));
    }
    say!();
    let mut table = output::table(&[
        "GPU", "UUID", "MODEL", "MEMORY", "UTIL", "MEM USED", "TEMP", "POWER", "JOB",
    ]);
    for gpu in &node.gpus {
        let info = gpu.info.clone().unwrap_or_default();
        let sample = gpu.latest.clone().unwrap_or_default();
        table.add_row(vec![
            info.index.to_string(),
            info.uuid,
            info.model,
            format!("{} GiB", info.memory_bytes >> 30),
            sample
                .gpu_utilization_percent
                .map_or("-".into(), |u| format!("{u}%")),
            sample.memory_used_bytes.map_or("-".into(), |b| {
                format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
            }),
            sample
                .temperature_celsius
                .map_or("-".into(), |t| format!("{t}°C")),
            sample
                .power_usage_milliwatts
                .map_or("-".into(), |p| format!("{} W", p / 1000)),
            if gpu.job_id.is_empty() {
                "-".into()
            } else {
                gpu.job_id.clone()
            },
        ]);
    }
    output::print_table(&table);
    let mig: Vec<_> = node
        .gpus
        .iter()
        .filter_map(|g| g.info.as_ref())
        .filter(|i| i.mig_enabled)
        .collect();
    if !mig.is_empty() {
        say!();
        say!("MIG instances:");
        let mut table = output::table(&["GPU", "UUID", "PROFILE", "MEMORY", "SM SHARE"]);
        for info in mig {
            for m in &info.mig_instances {
                table.add_row(vec![
                    info.index.to_string(),
                    m.uuid.clone(),
                    m.profile.clone(),
                    format!("{:.1} GiB", m.memory_bytes as f64 / (1u64 << 30) as f64),
                    format!("{:.1}%", f64::from(m.sm_share_milli) / 10.0),
                ]);
            }
        }
        output::print_table(&table);
    }
    if !node.mig_layouts.is_empty() {
        say!();
        say!("Wanted MIG layouts (applied by the agent once the GPU is idle):");
        for l in &node.mig_layouts {
            let have = node
                .gpus
                .iter()
                .filter_map(|g| g.info.as_ref())
                .find(|i| i.uuid == l.gpu_uuid)
                .map(|i| {
                    let mut p: Vec<&str> =
                        i.mig_instances.iter().map(|m| m.profile.as_str()).collect();
                    p.sort_unstable();
                    p
                })
                .unwrap_or_default();
            let mut want: Vec<&str> = l.profiles.iter().map(String::as_str).collect();
            want.sort_unstable();
            let status = if have == want {
                "applied".to_string()
            } else if !l.error.is_empty() {
                format!("refused: {}", l.error)
            } else {
                "pending".to_string()
            };
            say!("  {}: {} ({status})", l.gpu_uuid, l.profiles.join(","));
        }
    }
}

/// A fleet grouping dimension, shared by `capacity` and `telemetry aggregates`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dimension {
    Provider,
    Region,
    Generation,
    Model,
}

impl Dimension {
    pub fn proto(self) -> CapacityDimension {
        match self {
            Dimension::Provider => CapacityDimension::Provider,
            Dimension::Region => CapacityDimension::Region,
            Dimension::Generation => CapacityDimension::Generation,
            Dimension::Model => CapacityDimension::Model,
        }
    }

    pub fn header(self) -> &'static str {
        match self {
            Dimension::Provider => "PROVIDER",
            Dimension::Region => "REGION",
            Dimension::Generation => "GENERATION",
            Dimension::Model => "MODEL",
        }
    }
}

#[derive(Debug, Args)]
pub struct CapacityArgs {
    /// Group by these dimensions (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "provider,region"
    )]
    by: Vec<Dimension>,
}

pub async fn capacity(
    address: &str,
    format: Format,
    args: CapacityArgs,
) -> anyhow::Result<ExitCode> {
    let mut fleet = client::fleet(address).await?;
    let group_by: Vec<i32> = args.by.iter().map(|d| d.proto() as i32).collect();
    let response = fleet
        .get_capacity(GetCapacityRequest { group_by })
        .await?
        .into_inner();
    if format == Format::Json {
        output::print_json(&response, true)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut headers: Vec<&str> = args.by.iter().map(|d| d.header()).collect();
    headers.extend([
        "NODES",
        "GPUS",
        "HEALTHY",
        "ALLOCATED",
        "FREE",
        "PRICE/GPU-H",
    ]);
    // Columns for MIG instances and shared GPUs only where a fleet has them.
    let fractions = response
        .total
        .as_ref()
        .is_some_and(|t| t.mig_gpus > 0 || t.shared_gpus > 0);
    if fractions {
        headers.extend([
            "MIG FREE/ALL",
            "SHARED GPUS",
            "SHARED FREE",
            "ALLOCATED GPU",
        ]);
    }
    let mut table = output::table(&headers);
    let row = |group: &CapacityGroup, label: Option<&str>| {
        let mut cells: Vec<String> = args
            .by
            .iter()
            .enumerate()
            .map(|(i, d)| match (label, i) {
                (Some(label), 0) => label.to_string(),
                (Some(_), _) => String::new(),
                (None, _) => match d {
                    Dimension::Provider => group.provider.clone(),
                    Dimension::Region => group.region.clone(),
                    Dimension::Generation => GpuGeneration::try_from(group.generation)
                        .map(|g| output::enum_label(g.as_str_name(), "GPU_GENERATION_"))
                        .unwrap_or_default(),
                    Dimension::Model => group.model.clone(),
                },
            })
            .collect();
        let price =
            if group.min_price_per_gpu_hour_micro_usd == group.max_price_per_gpu_hour_micro_usd {
                output::usd(group.min_price_per_gpu_hour_micro_usd)
            } else {
                format!(
                    "{}-{}",
                    output::usd(group.min_price_per_gpu_hour_micro_usd),
                    output::usd(group.max_price_per_gpu_hour_micro_usd)
                )
            };
        cells.extend([
            group.nodes.to_string(),
            group.total_gpus.to_string(),
            group.healthy_gpus.to_string(),
            group.allocated_gpus.to_string(),
            group.free_gpus.to_string(),
            price,
        ]);
        if fractions {
            cells.extend([
                format!("{}/{}", group.free_mig_instances, group.mig_instances),
                group.shared_gpus.to_string(),
                format!("{:.3}", group.shared_free_milli as f64 / 1000.0),
                format!("{:.3}", group.allocated_milli as f64 / 1000.0),
            ]);
        }
        cells
    };
    for group in &response.groups {
        table.add_row(row(group, None));
    }
    if let Some(total) = &response.total {
        table.add_row(row(total, Some("TOTAL")));
    }
    output::print_table(&table);
    Ok(ExitCode::SUCCESS)
}
