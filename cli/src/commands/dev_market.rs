//! `gpufleet dev --market-demo`: prices that move and a spot node that is
//! reclaimed, so the market commands have something to answer within
//! minutes. A local price file changes every minute (a seeded random walk
//! around each node's list price); small Hopper jobs arrive every few
//! seconds, fewer when Hopper is dear; two minutes in, a mock AWS metadata
//! service announces the spot node's interruption.

use std::time::{Duration, SystemTime};

use anyhow::Context;
use gpufleet_agent::config::InterruptionConfig;
use gpufleet_agent::interruption::cloud::Cloud;
use gpufleet_agent::interruption::http::Endpoint;
use gpufleet_agent::interruption::mock::MockMetadata;
use gpufleet_proto::v1::jobs_client::JobsClient;
use gpufleet_proto::v1::{
    GpuGeneration, JobConstraints, JobSpec, RetryPolicy, SpotPolicy, SubmitJobRequest, WorkloadSpec,
};

/// How often the price file moves.
pub const PRICE_STEP: Duration = Duration::from_secs(60);
/// When the spot node is reclaimed, after the start.
pub const NOTICE_AFTER: Duration = Duration::from_secs(120);
/// How often demand arrives.
const ARRIVALS_EVERY: Duration = Duration::from_secs(5);

/// A node's list price and what it is.
pub struct Listed {
    pub provider: &'static str,
    pub region: &'static str,
    pub gpus: &'static str,
    pub price: f64,
    pub spot: bool,
}

/// The GPU model of a declaration such as `8xH100-SXM-80GB`.
fn model(gpus: &str) -> &str {
    gpus.split_once('x').map_or(gpus, |(_, m)| m)
}

/// A small deterministic generator (xorshift): the demo is the same each run.
struct Walk(u64);

impl Walk {
    fn next_unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The price document for `step` (0 = list prices).
fn document(fleet: &[Listed], step: u32) -> String {
    let mut walk = Walk(0x9E37_79B9_7F4A_7C15);
    let mut text = String::from(
        "# gpufleet dev --market-demo: moves every minute\nprovider,region,model,capacity,price_per_gpu_hour_usd\n",
    );
    for node in fleet {
        let mut factor: f64 = 1.0;
        for _ in 0..step {
            // ±15 % a minute, kept within half to twice the list price.
            factor = (factor * (0.85 + 0.3 * walk.next_unit())).clamp(0.5, 2.0);
        }
        text.push_str(&format!(
            "{},{},{},{},{:.2}\n",
            node.provider,
            node.region,
            model(node.gpus),
            if node.spot { "spot" } else { "on-demand" },
            node.price * factor
        ));
    }
    text
}

/// Writes step `step`'s prices to `path` whole (a rename), returning the
/// cheapest Hopper price relative to the cheapest Hopper list price (the
/// demo's demand goes where Hopper is cheapest).
pub fn write_prices(path: &std::path::Path, fleet: &[Listed], step: u32) -> anyhow::Result<f64> {
    let text = document(fleet, step);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    let hopper = |gpus: &str| gpus.contains("H100") || gpus.contains("H200");
    let now = fleet
        .iter()
        .zip(text.lines().skip(2))
        .filter(|(n, _)| hopper(n.gpus))
        .filter_map(|(_, line)| line.rsplit(',').next()?.parse::<f64>().ok())
        .fold(f64::INFINITY, f64::min);
    let list = fleet
        .iter()
        .filter(|n| hopper(n.gpus))
        .map(|n| n.price)
        .fold(f64::INFINITY, f64::min);
    Ok(if now.is_finite() && list.is_finite() && list > 0.0 {
        now / list
    } else {
        1.0
    })
}

/// The spot node's agent watches `metadata` for notices.
pub fn watch(metadata: &MockMetadata) -> anyhow::Result<InterruptionConfig> {
    Ok(InterruptionConfig {
        cloud: Cloud::Aws,
        endpoint: Endpoint::parse(&metadata.addr().to_string()).map_err(anyhow::Error::msg)?,
        poll_interval: Duration::from_secs(1),
        stop_margin: Duration::from_secs(5),
    })
}

/// Runs until dropped: moves prices, submits demand, reclaims the spot node.
pub async fn run(
    endpoint: String,
    token: String,
    prices: std::path::PathBuf,
    fleet: Vec<Listed>,
    metadata: MockMetadata,
) {
    let started = tokio::time::Instant::now();
    let mut step = 0u32;
    let mut relative = 1.0;
    let mut announced = false;
    let mut next_price = started + PRICE_STEP;
    let mut jobs = None;
    loop {
        tokio::time::sleep(ARRIVALS_EVERY).await;
        let now = tokio::time::Instant::now();
        if now >= next_price {
            step += 1;
            next_price += PRICE_STEP;
            match write_prices(&prices, &fleet, step) {
                Ok(r) => relative = r,
                Err(e) => tracing::warn!(error = %e, "market demo: cannot move prices"),
            }
        }
        if !announced && now >= started + NOTICE_AFTER {
            announced = true;
            metadata.announce("terminate", SystemTime::now() + Duration::from_secs(120));
        }
        if jobs.is_none() {
            jobs = client(&endpoint, &token).await.ok();
        }
        let Some(jobs) = jobs.as_mut() else { continue };
        // Fewer arrivals when Hopper is dear: demand that responds to price.
        let arrivals = (4.0 / (relative * relative)).round().clamp(1.0, 12.0) as u32;
        for _ in 0..arrivals {
            let _ = jobs
                .submit_job(SubmitJobRequest {
                    spec: Some(demand()),
                })
                .await;
        }
    }
}

type Jobs = JobsClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        crate::client::BearerToken,
    >,
>;

async fn client(endpoint: &str, token: &str) -> anyhow::Result<Jobs> {
    let channel = tonic::transport::Channel::from_shared(endpoint.to_string())?
        .connect()
        .await?;
    Ok(JobsClient::new(
        tonic::service::interceptor::InterceptedService::new(
            channel,
            crate::client::BearerToken::with(token)?,
        ),
    ))
}

fn demand() -> JobSpec {
    JobSpec {
        name: "market-demo".into(),
        workload_class: "demo".into(),
        gpus_per_task: 1,
        max_runtime_seconds: 60,
        constraints: Some(JobConstraints {
            generations: vec![GpuGeneration::Hopper as i32],
            spot: SpotPolicy::Allowed as i32,
            ..Default::default()
        }),
        retry: Some(RetryPolicy {
            max_retries_on_node_loss: 1,
            ..Default::default()
        }),
        workload: Some(WorkloadSpec {
            argv: vec!["sleep".into(), "20".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLEET: &[Listed] = &[
        Listed {
            provider: "aws",
            region: "us-east-1",
            gpus: "8xH100-SXM-80GB",
            price: 4.0,
            spot: false,
        },
        Listed {
            provider: "nebius",
            region: "eu-north1",
            gpus: "2xL40S",
            price: 1.5,
            spot: true,
        },
    ];

    #[test]
    fn prices_start_at_list_and_move_within_bounds_the_same_each_run() {
        let list = document(FLEET, 0);
        assert!(
            list.contains("aws,us-east-1,H100-SXM-80GB,on-demand,4.00\n"),
            "{list}"
        );
        assert!(list.contains("nebius,eu-north1,L40S,spot,1.50\n"), "{list}");
        let moved = document(FLEET, 5);
        assert_ne!(list, moved);
        assert_eq!(moved, document(FLEET, 5));
        let table = gpufleet_controller::pricing::table::parse(&moved).unwrap();
        for price in table.values() {
            assert!((750_000..=8_000_000).contains(price), "{price}");
        }
    }
}
