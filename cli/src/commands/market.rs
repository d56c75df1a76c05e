//! `gpufleet market …`: tightness, elasticity, prices and their history,
//! spot interruptions.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use gpufleet_core::{generation_names, parse_generation};
use gpufleet_proto::v1::usage_client::UsageClient;
use gpufleet_proto::v1::{
    MarketElasticityRequest, MarketInterruptionsRequest, MarketPricesRequest,
    MarketTightnessRequest,
};

use super::usage::{generation_label, when};
use crate::client;
use crate::output::{self, Format};

#[derive(Debug, Args)]
pub struct MarketArgs {
    #[command(subcommand)]
    command: MarketCommand,
}

#[derive(Debug, Subcommand)]
enum MarketCommand {
    /// Regions ranked by tightness (pending GPUs per free GPU), with queue waits.
    Tight {
        #[arg(long, default_value = "24h")]
        since: String,
    },
    /// The demand curve and the price-elasticity estimates for one region and generation.
    Elasticity {
        #[arg(long)]
        region: String,
        #[arg(long)]
        generation: String,
        #[arg(long, default_value = "7d")]
        since: String,
        /// Width of the buckets of the over-time estimate (starts and the
        /// median ask per bucket), e.g. 1h or 5m; at least 1m.
        #[arg(long, default_value = "1h")]
        bucket: String,
    },
    /// Prices in force (from the price sources) and how they moved, with a
    /// chart per price.
    Prices {
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        region: Option<String>,
        /// GPU model or instance type.
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value = "30d")]
        since: String,
        /// Most changes listed (newest kept).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Spot interruptions, and the rate per provider, region and generation.
    Interruptions {
        #[arg(long, default_value = "7d")]
        since: String,
        /// Most interruptions listed (newest kept).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

pub async fn market(address: &str, format: Format, args: MarketArgs) -> anyhow::Result<ExitCode> {
    let mut client = UsageClient::new(client::channel(address).await?);
    match args.command {
        MarketCommand::Tight { since } => {
            let response = client
                .market_tightness(MarketTightnessRequest {
                    since: Some(when("--since", &since)?),
                })
                .await?
                .into_inner();
            if format == Format::Json {
                output::print_json(&response, true)?;
                return Ok(ExitCode::SUCCESS);
            }
            let wait = |v: Option<f64>| {
                v.map_or("-".to_string(), |s| {
                    humantime::format_duration(Duration::from_secs(s.round() as u64)).to_string()
                })
            };
            let mut table = output::table(&[
                "REGION",
                "GENERATION",
                "TIGHTNESS",
                "MEAN",
                "PENDING GPUS",
                "FREE",
                "SUPPLY",
                "WAIT P50",
                "WAIT P95",
                "ASK FROM",
            ]);
            for r in &response.regions {
                table.add_row(vec![
                    r.region.clone(),
                    generation_label(r.generation),
                    format!("{:.2}", r.tightness_now),
                    format!("{:.2}", r.tightness_mean),
                    r.pending_demand_gpus.to_string(),
                    r.free_gpus.to_string(),
                    r.supply_gpus.to_string(),
                    wait(r.queue_wait_p50_seconds),
                    wait(r.queue_wait_p95_seconds),
                    output::usd(r.ask_min_micro_usd),
                ]);
            }
            output::print_table(&table);
            if response.regions.is_empty() {
                eprintln!("no market signals yet: the controller records them once a minute");
            }
            say!(
                "unmet demand (fits no region): {} GPUs",
                response.unmet_demand_gpus
            );
        }
        MarketCommand::Prices {
            provider,
            region,
            model,
            since,
            limit,
        } => {
            let since = when("--since", &since)?;
            let response = client
                .market_prices(MarketPricesRequest {
                    provider: provider.unwrap_or_default(),
                    region: region.unwrap_or_default(),
                    model: model.unwrap_or_default(),
                    since: Some(since),
                    limit,
                })
                .await?
                .into_inner();
            if format == Format::Json {
                output::print_json(&response, true)?;
                return Ok(ExitCode::SUCCESS);
            }
            if format == Format::Csv {
                bail!("-o csv is not available for market prices; use -o json");
            }
            super::prices::print(&response, since.seconds.max(0) as u64);
        }
        MarketCommand::Interruptions { since, limit } => {
            let response = client
                .market_interruptions(MarketInterruptionsRequest {
                    since: Some(when("--since", &since)?),
                    limit,
                })
                .await?
                .into_inner();
            if format == Format::Json {
                output::print_json(&response, true)?;
                return Ok(ExitCode::SUCCESS);
            }
            if format == Format::Csv {
                bail!("-o csv is not available for market interruptions; use -o json");
            }
            super::prices::print_interruptions(&response);
        }
        MarketCommand::Elasticity {
            region,
            generation,
            since,
            bucket,
        } => {
            let bucket = humantime::parse_duration(&bucket)
                .ok()
                .filter(|b| b.as_secs() >= 60)
                .with_context(|| {
                    format!("--bucket {bucket:?} is not a duration of at least 1m, like 1h or 5m")
                })?;
            let generation = parse_generation(&generation).with_context(|| {
                format!(
                    "--generation {generation:?} is not a GPU generation; accepted: {}",
                    generation_names().join(", ")
                )
            })?;
            let response = client
                .market_elasticity(MarketElasticityRequest {
                    region,
                    generation: generation as i32,
                    since: Some(when("--since", &since)?),
                    bucket_seconds: bucket.as_secs().min(u64::from(u32::MAX)) as u32,
                })
                .await?
                .into_inner();
            if format == Format::Json {
                output::print_json(&response, true)?;
                return Ok(ExitCode::SUCCESS);
            }
            if format == Format::Csv {
                bail!("-o csv is not available for market elasticity; use -o json");
            }
            say!(
                "{} {} — {} observations; median ask {}/GPU-hour",
                response.region,
                generation_label(response.generation),
                response.observations,
                output::usd(response.ask_median_micro_usd)
            );
            say!(
                "demand curve (GPUs wanted by pending jobs at a bid ≥ price; in brackets, by jobs that accept spot):"
            );
            let max = response
                .demand_curve
                .iter()
                .map(|d| d.gpus)
                .max()
                .unwrap_or(0) as f64;
            for point in &response.demand_curve {
                let marker = if point.price_micro_usd >= response.ask_median_micro_usd
                    && response
                        .demand_curve
                        .iter()
                        .filter(|d| d.price_micro_usd >= response.ask_median_micro_usd)
                        .map(|d| d.price_micro_usd)
                        .min()
                        == Some(point.price_micro_usd)
                {
                    " ← ask"
                } else {
                    ""
                };
                let spot = response
                    .spot_demand_curve
                    .iter()
                    .find(|s| s.price_micro_usd == point.price_micro_usd)
                    .map_or(0, |s| s.gpus);
                say!(
                    "  {:>7} │{:<40} {} [{spot}]{marker}",
                    output::usd(point.price_micro_usd),
                    output::bar(point.gpus as f64, max, 40),
                    point.gpus
                );
            }
            let show =
                |v: Option<f64>| v.map_or("not available".to_string(), |e| format!("{e:.2}"));
            say!(
                "elasticity from the curve (±10 % around the ask): {}",
                show(response.elasticity_from_curve)
            );
            let confidence = match (
                response.elasticity_over_time_std_error,
                response.elasticity_over_time_r_squared,
            ) {
                (Some(se), Some(r2)) if response.elasticity_over_time.is_some() => {
                    format!(" ± {se:.2} (standard error), R² {r2:.2}")
                }
                _ => String::new(),
            };
            say!(
                "elasticity over time (starts vs ask, log-log):   {}{confidence}, from {} bucket(s) with starts",
                show(response.elasticity_over_time),
                response.over_time_points
            );
            say!("method: {}", response.method);
        }
    }
    Ok(ExitCode::SUCCESS)
}
