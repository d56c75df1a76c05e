//! `gpufleet usage waste`: jobs, tenants or workload classes ranked by
//! paid-but-idle GPU-hours (allocated GPU-time whose GPUs were measured
//! idle) and what that idle time cost.

use crate::client::Authed;
use clap::{Args, ValueEnum};
use gpufleet_proto::v1::usage_client::UsageClient;
use gpufleet_proto::v1::{UsageDimension, UsageWasteRequest, UsageWasteResponse, WasteRow};

use crate::output::{self, Format};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WasteBy {
    /// Jobs, by name.
    Job,
    Tenant,
    WorkloadClass,
}

#[derive(Debug, Args)]
pub struct WasteArgs {
    #[arg(long, value_enum, default_value = "job")]
    by: WasteBy,
    /// How far back, e.g. 7d, 24h (or an RFC 3339 time).
    #[arg(long, default_value = "7d")]
    since: String,
    /// Rows, 1 to 1000.
    #[arg(long, default_value_t = 20)]
    limit: u32,
    /// Only this tenant's usage (a token scoped to one tenant sees only its own).
    #[arg(long)]
    tenant: Option<String>,
}

fn hours(gpu_ms: u64) -> String {
    format!("{:.2}", gpu_ms as f64 / 3_600_000.0)
}

fn activity(row: &WasteRow) -> String {
    match row.mean_activity_percent {
        Some(a) if row.activity_source == "sm_active" => format!("{a:.0}% SM active"),
        Some(a) => format!("{a:.0}% util"),
        None => "-".to_string(),
    }
}

fn print(answer: &UsageWasteResponse, by: WasteBy, format: Format) -> anyhow::Result<()> {
    let key_header = match by {
        WasteBy::Job => "JOB NAME",
        WasteBy::Tenant => "TENANT",
        WasteBy::WorkloadClass => "CLASS",
    };
    match format {
        Format::Json => output::print_json(answer, true),
        Format::Csv => {
            say!(
                "{},allocated_gpu_hours,measured_gpu_hours,idle_gpu_hours,idle_cost_usd,cost_usd,mean_activity_percent,activity_source,allocations",
                key_header.to_ascii_lowercase().replace(' ', "_")
            );
            for row in &answer.rows {
                say!(
                    "{},{:.6},{:.6},{:.6},{:.6},{:.6},{},{},{}",
                    output::csv_field(&row.key),
                    row.allocated_gpu_milliseconds as f64 / 3_600_000.0,
                    row.measured_gpu_milliseconds as f64 / 3_600_000.0,
                    row.idle_gpu_milliseconds as f64 / 3_600_000.0,
                    row.idle_cost_micro_usd as f64 / 1e6,
                    row.cost_micro_usd as f64 / 1e6,
                    row.mean_activity_percent
                        .map_or(String::new(), |a| format!("{a:.1}")),
                    output::csv_field(&row.activity_source),
                    row.allocations
                );
            }
            Ok(())
        }
        Format::Table => {
            let mut table = output::table(&[
                key_header,
                "GPU-HOURS",
                "IDLE GPU-H",
                "IDLE COST",
                "COST",
                "ACTIVITY",
                "ALLOCS",
            ]);
            let mut add = |key: String, row: &WasteRow| {
                table.add_row(vec![
                    key,
                    hours(row.allocated_gpu_milliseconds),
                    hours(row.idle_gpu_milliseconds),
                    output::usd(row.idle_cost_micro_usd),
                    output::usd(row.cost_micro_usd),
                    activity(row),
                    row.allocations.to_string(),
                ]);
            };
            for row in &answer.rows {
                let key = if row.key.is_empty() {
                    "-".to_string()
                } else {
                    row.key.clone()
                };
                add(key, row);
            }
            if let Some(total) = &answer.total {
                add("TOTAL".to_string(), total);
            }
            output::print_table(&table);
            say!(
                "from {} to {}; idle = measured GPU-time × (1 − activity of exactly its GPUs)",
                output::time(answer.since.as_ref()),
                output::time(answer.until.as_ref())
            );
            Ok(())
        }
    }
}

pub(crate) async fn run(
    client: &mut UsageClient<Authed>,
    format: Format,
    args: WasteArgs,
    since: prost_types::Timestamp,
) -> anyhow::Result<()> {
    let by = match args.by {
        WasteBy::Job => UsageDimension::JobName,
        WasteBy::Tenant => UsageDimension::Tenant,
        WasteBy::WorkloadClass => UsageDimension::WorkloadClass,
    };
    let answer = client
        .usage_waste(UsageWasteRequest {
            by: by as i32,
            since: Some(since),
            until: None,
            limit: args.limit,
            tenant: args.tenant.unwrap_or_default(),
        })
        .await?
        .into_inner();
    print(&answer, args.by, format)
}

/// The `--since` text, for the caller to parse with the usage commands' rules.
pub(crate) fn since(args: &WasteArgs) -> &str {
    &args.since
}
