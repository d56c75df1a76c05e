//! `gpufleet usage …`: the ledger and its reports.

use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use gpufleet_proto::v1::usage_client::UsageClient;
use gpufleet_proto::v1::{
    GpuGeneration, Granularity, ListUsageRecordsRequest, TopUsageRequest, UsageByGenerationRequest,
    UsageDimension, UsageReportRequest, UsageReportResponse, UsageRow,
};
use prost_types::Timestamp;

use crate::client;
use crate::output::{self, Format};

#[derive(Debug, Args)]
pub struct UsageArgs {
    #[command(subcommand)]
    command: UsageCommand,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Dim {
    Provider,
    Region,
    Generation,
    Model,
    Tenant,
    WorkloadClass,
    JobName,
}

impl Dim {
    fn proto(self) -> UsageDimension {
        match self {
            Dim::Provider => UsageDimension::Provider,
            Dim::Region => UsageDimension::Region,
            Dim::Generation => UsageDimension::Generation,
            Dim::Model => UsageDimension::Model,
            Dim::Tenant => UsageDimension::Tenant,
            Dim::WorkloadClass => UsageDimension::WorkloadClass,
            Dim::JobName => UsageDimension::JobName,
        }
    }

    fn header(self) -> &'static str {
        match self {
            Dim::Provider => "PROVIDER",
            Dim::Region => "REGION",
            Dim::Generation => "GENERATION",
            Dim::Model => "MODEL",
            Dim::Tenant => "TENANT",
            Dim::WorkloadClass => "CLASS",
            Dim::JobName => "JOB NAME",
        }
    }

    fn value(self, row: &UsageRow) -> String {
        let text = match self {
            Dim::Provider => row.provider.clone(),
            Dim::Region => row.region.clone(),
            Dim::Generation => generation_label(row.generation),
            Dim::Model => row.model.clone(),
            Dim::Tenant => row.tenant.clone(),
            Dim::WorkloadClass => row.workload_class.clone(),
            Dim::JobName => row.job_name.clone(),
        };
        if text.is_empty() {
            "-".to_string()
        } else {
            text
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TopBy {
    WorkloadClass,
    JobName,
    Tenant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Step {
    Minute,
    Hour,
    Day,
}

#[derive(Debug, Subcommand)]
enum UsageCommand {
    /// Most active workloads by GPU-hours and cost.
    Top {
        #[arg(long, value_enum, default_value = "workload-class")]
        by: TopBy,
        /// How far back, e.g. 7d, 24h (or an RFC 3339 time).
        #[arg(long, default_value = "7d")]
        since: String,
        #[arg(long, default_value_t = 10)]
        limit: u32,
        /// Only this tenant's usage (a token scoped to one tenant sees only its own).
        #[arg(long)]
        tenant: Option<String>,
        /// Rank by used GPU-hours (allocated × measured activity of exactly
        /// their GPUs) rather than allocated ones.
        #[arg(long)]
        by_used: bool,
    },
    /// Jobs, tenants or workload classes by paid-but-idle GPU-hours and cost.
    Waste(super::waste::WasteArgs),
    /// GPU-hours, share, utilisation and cost per generation, with the daily trend.
    ByGeneration {
        #[arg(long, default_value = "30d")]
        since: String,
        /// Only this tenant's usage (a token scoped to one tenant sees only its own).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// The general form: group by any dimensions over a range.
    Report {
        /// Dimensions, comma-separated.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "provider,region"
        )]
        group_by: Vec<Dim>,
        #[arg(long, default_value = "7d")]
        since: String,
        /// End of the range (default: now).
        #[arg(long)]
        until: Option<String>,
        /// Add a time series per row.
        #[arg(long, value_enum)]
        series: Option<Step>,
        /// Leave out allocations still running.
        #[arg(long)]
        finished_only: bool,
        /// Only this tenant's usage (a token scoped to one tenant sees only its own).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Finished allocations with their jobs' requests (submit time, tasks,
    /// GPUs, share, constraints, priority) and actual run times, one
    /// protobuf-JSON `UsageRecord` per line, newest first: the input of
    /// `gpufleet simulate --history`.
    Export {
        /// Allocations that ended after this (a duration like 30d, or an RFC 3339 time).
        #[arg(long, default_value = "30d")]
        since: String,
        /// ... and before this (default: now).
        #[arg(long)]
        until: Option<String>,
        /// Only this tenant's allocations (a token scoped to one tenant sees only its own).
        #[arg(long)]
        tenant: Option<String>,
        /// Write to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
    },
    /// Ledger records, newest first.
    Records {
        #[arg(long, default_value = "7d")]
        since: String,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        job: Option<String>,
        /// Include running allocations (up to now).
        #[arg(long)]
        running: bool,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

pub(crate) fn generation_label(generation: i32) -> String {
    GpuGeneration::try_from(generation)
        .ok()
        .filter(|g| *g != GpuGeneration::Unspecified)
        .map(|g| output::enum_label(g.as_str_name(), "GPU_GENERATION_"))
        .unwrap_or_else(|| "-".to_string())
}

/// `7d` (that long ago) or an RFC 3339 time.
pub(crate) fn when(flag: &str, text: &str) -> anyhow::Result<Timestamp> {
    if let Ok(ago) = humantime::parse_duration(text) {
        let at = SystemTime::now()
            .checked_sub(ago)
            .with_context(|| format!("{flag} {text:?} reaches before 1970"))?;
        return Ok(Timestamp::from(at));
    }
    let at = humantime::parse_rfc3339_weak(text).with_context(|| {
        format!(
            "{flag} {text:?} is neither a duration like 7d nor a time like 2026-11-01T00:00:00Z"
        )
    })?;
    Ok(Timestamp::from(at))
}

fn hours(gpu_ms: u64) -> String {
    let h = gpu_ms as f64 / 3_600_000.0;
    if h < 1.0 {
        format!("{h:.4}")
    } else {
        format!("{h:.2}")
    }
}

fn util(row: &UsageRow) -> String {
    row.mean_sm_utilization_percent
        .map_or("-".to_string(), |u| format!("{u:.0}%"))
}

fn print_report(
    report: &UsageReportResponse,
    dims: &[Dim],
    format: Format,
    trend: bool,
    used: bool,
) -> anyhow::Result<()> {
    match format {
        Format::Json => output::print_json(report, true),
        Format::Csv => {
            let mut header: Vec<String> = dims
                .iter()
                .map(|d| d.header().to_ascii_lowercase().replace(' ', "_"))
                .collect();
            header.extend(
                [
                    "gpu_hours",
                    "cost_usd",
                    "share",
                    "allocations",
                    "mean_sm_util_percent",
                ]
                .map(String::from),
            );
            if used {
                header.push("used_gpu_hours".to_string());
            }
            say!("{}", header.join(","));
            for row in &report.rows {
                let mut cells: Vec<String> = dims
                    .iter()
                    .map(|d| output::csv_field(&d.value(row)))
                    .collect();
                cells.push(format!("{:.6}", row.gpu_milliseconds as f64 / 3_600_000.0));
                cells.push(format!("{:.6}", row.cost_micro_usd as f64 / 1_000_000.0));
                cells.push(format!("{:.4}", row.share));
                cells.push(row.allocations.to_string());
                cells.push(
                    row.mean_sm_utilization_percent
                        .map_or(String::new(), |u| format!("{u:.1}")),
                );
                if used {
                    cells.push(format!(
                        "{:.6}",
                        row.used_gpu_milliseconds as f64 / 3_600_000.0
                    ));
                }
                say!("{}", cells.join(","));
            }
            Ok(())
        }
        Format::Table => {
            let mut headers: Vec<&str> = dims.iter().map(|d| d.header()).collect();
            headers.extend(["GPU-HOURS", "COST", "SHARE", "ALLOCS", "SM UTIL"]);
            if used {
                headers.push("USED GPU-H");
            }
            if trend {
                headers.push("TREND");
            }
            let mut table = output::table(&headers);
            for row in &report.rows {
                let mut cells: Vec<String> = dims.iter().map(|d| d.value(row)).collect();
                cells.extend([
                    hours(row.gpu_milliseconds),
                    output::usd(row.cost_micro_usd),
                    format!("{:.1}%", row.share * 100.0),
                    row.allocations.to_string(),
                    util(row),
                ]);
                if used {
                    cells.push(hours(row.used_gpu_milliseconds));
                }
                if trend {
                    let values: Vec<f64> = row
                        .series
                        .iter()
                        .map(|p| p.gpu_milliseconds as f64)
                        .collect();
                    cells.push(output::sparkline(&values));
                }
                table.add_row(cells);
            }
            if let Some(total) = &report.total {
                let mut cells: Vec<String> = dims
                    .iter()
                    .enumerate()
                    .map(|(i, _)| {
                        if i == 0 {
                            "TOTAL".into()
                        } else {
                            String::new()
                        }
                    })
                    .collect();
                if cells.is_empty() {
                    cells.push("TOTAL".into());
                }
                cells.extend([
                    hours(total.gpu_milliseconds),
                    output::usd(total.cost_micro_usd),
                    "100%".into(),
                    total.allocations.to_string(),
                    util(total),
                ]);
                if used {
                    cells.push(hours(total.used_gpu_milliseconds));
                }
                table.add_row(cells);
            }
            output::print_table(&table);
            say!(
                "from {} to {}",
                output::time(report.since.as_ref()),
                output::time(report.until.as_ref())
            );
            Ok(())
        }
    }
}

pub async fn usage(address: &str, format: Format, args: UsageArgs) -> anyhow::Result<ExitCode> {
    let mut client = UsageClient::new(client::channel(address).await?);
    match args.command {
        UsageCommand::Top {
            by,
            since,
            limit,
            tenant,
            by_used,
        } => {
            let (dim, proto) = match by {
                TopBy::WorkloadClass => (Dim::WorkloadClass, UsageDimension::WorkloadClass),
                TopBy::JobName => (Dim::JobName, UsageDimension::JobName),
                TopBy::Tenant => (Dim::Tenant, UsageDimension::Tenant),
            };
            let report = client
                .top_usage(TopUsageRequest {
                    by: proto as i32,
                    since: Some(when("--since", &since)?),
                    limit,
                    tenant: tenant.unwrap_or_default(),
                    by_used,
                })
                .await?
                .into_inner();
            print_report(&report, &[dim], format, false, by_used)?;
        }
        UsageCommand::Waste(args) => {
            let since = when("--since", super::waste::since(&args))?;
            super::waste::run(&mut client, format, args, since).await?;
        }
        UsageCommand::ByGeneration { since, tenant } => {
            let report = client
                .usage_by_generation(UsageByGenerationRequest {
                    since: Some(when("--since", &since)?),
                    tenant: tenant.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_report(&report, &[Dim::Generation], format, true, false)?;
        }
        UsageCommand::Report {
            group_by,
            since,
            until,
            series,
            finished_only,
            tenant,
        } => {
            let request = UsageReportRequest {
                group_by: group_by.iter().map(|d| d.proto() as i32).collect(),
                since: Some(when("--since", &since)?),
                until: until.as_deref().map(|u| when("--until", u)).transpose()?,
                series: match series {
                    None => Granularity::Unspecified,
                    Some(Step::Minute) => Granularity::Minute,
                    Some(Step::Hour) => Granularity::Hour,
                    Some(Step::Day) => Granularity::Day,
                } as i32,
                include_running: !finished_only,
                limit: 0,
                tenant: tenant.unwrap_or_default(),
            };
            let report = client.get_usage_report(request).await?.into_inner();
            print_report(&report, &group_by, format, series.is_some(), false)?;
        }
        UsageCommand::Export {
            since,
            until,
            tenant,
            out,
        } => {
            let request = ListUsageRecordsRequest {
                since: Some(when("--since", &since)?),
                until: until.as_deref().map(|u| when("--until", u)).transpose()?,
                tenant: tenant.unwrap_or_default(),
                job_id: String::new(),
                include_running: false,
                page_size: 1000,
                page_token: String::new(),
            };
            let written = export(&mut client, request, out.as_deref()).await?;
            if let Some(path) = &out {
                eprintln!("{written} records written to {}", path.display());
            }
        }
        UsageCommand::Records {
            since,
            tenant,
            job,
            running,
            limit,
        } => {
            let response = client
                .list_usage_records(ListUsageRecordsRequest {
                    since: Some(when("--since", &since)?),
                    until: None,
                    tenant: tenant.unwrap_or_default(),
                    job_id: job.unwrap_or_default(),
                    include_running: running,
                    page_size: limit,
                    page_token: String::new(),
                })
                .await?
                .into_inner();
            if format == Format::Json {
                output::print_json(&response, true)?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut table = output::table(&[
                "ALLOCATION",
                "TENANT",
                "CLASS",
                "WHERE",
                "GPUS",
                "MODEL",
                "GPU-HOURS",
                "COST",
                "SM UTIL",
                "ENERGY",
                "ENDED",
            ]);
            for r in &response.records {
                table.add_row(vec![
                    r.allocation_id.clone(),
                    r.tenant.clone(),
                    if r.workload_class.is_empty() {
                        "-".into()
                    } else {
                        r.workload_class.clone()
                    },
                    format!("{}/{}", r.provider, r.region),
                    // A share or MIG instance: the part of its GPU billed.
                    if !r.mig_profile.is_empty() {
                        format!("MIG {}", r.mig_profile)
                    } else if r.gpu_share_milli > 0 {
                        format!("{}/1000", r.gpu_share_milli)
                    } else {
                        r.gpu_count.to_string()
                    },
                    r.model.clone(),
                    hours(r.gpu_milliseconds),
                    output::usd(r.cost_micro_usd),
                    r.mean_sm_utilization_percent
                        .map_or("-".into(), |u| format!("{u:.0}%")),
                    r.energy_joules
                        .map_or("-".into(), |j| format!("{:.1} Wh", j / 3600.0)),
                    if r.running {
                        "running".into()
                    } else {
                        output::enum_label(r.ended_as().as_str_name(), "WORKLOAD_STATE_")
                    },
                ]);
            }
            output::print_table(&table);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Pages through the ledger and writes each finished record as one JSON
/// line as it arrives (memory holds one page, whatever the range).
async fn export(
    client: &mut UsageClient<client::Authed>,
    mut request: ListUsageRecordsRequest,
    out: Option<&std::path::Path>,
) -> anyhow::Result<u64> {
    use std::io::Write as _;
    let mut sink: Box<dyn std::io::Write> = match out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("--out: cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    // A closed stdout (`| head`) ends as every command's does (status 141).
    let failed = |e: std::io::Error| match out {
        Some(path) => anyhow::Error::new(e).context(format!("--out: writing {}", path.display())),
        None => output::stdout_error(e),
    };
    let mut written = 0u64;
    loop {
        let page = client
            .list_usage_records(request.clone())
            .await?
            .into_inner();
        for record in page.records.iter().filter(|r| !r.running) {
            writeln!(sink, "{}", output::json_line(record)?).map_err(failed)?;
            written += 1;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    sink.flush().map_err(failed)?;
    Ok(written)
}
