//! `gpufleet-bench abuse`: a well-behaved client's unary latency against a
//! real controller binary, alone and then while hostile clients run, in
//! one run: N streams (`StreamJobLogs(follow)` and `WatchJob`, half each)
//! whose responses are never read, and M oversized (14 MB) `SubmitJob`s a
//! second, half without a token and half with a valid one. Reports the
//! controller's peak RSS and the ratio of the two p99s.
//!
//! Hostile calls go out as raw HTTP/2 (h2): a stream is opened and its
//! response body never polled, so its flow-control window is never
//! released; one shared 14 MB buffer is the body of every oversized call.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use gpufleet_proto::v1::{
    GetJobRequest, JobSpec, StreamJobLogsRequest, SubmitJobRequest, WatchJobRequest, WorkloadSpec,
};
use prost::Message as _;
use tonic::codegen::{Bytes, http};

use crate::load::ControllerProcess;
use crate::{clients, report};

/// Goals from issue 21.
const GOAL_PEAK_RSS_MIB: f64 = 512.0;
const GOAL_P99_RATIO: f64 = 2.0;
/// The oversized request of the issue (13.9 MB).
const OVERSIZED_BYTES: usize = 14_000_000;
/// Hostile streams per connection: under the server's per-connection
/// stream limit.
const STREAMS_PER_CONNECTION: usize = 100;

#[derive(Debug, Args)]
pub struct AbuseArgs {
    /// Hostile streams opened and never read.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Oversized requests per second (half without a token).
    #[arg(long, default_value_t = 100)]
    oversized_per_s: u32,
    /// Length of each phase: the client alone, then under abuse.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// gpufleet-controller binary [default: next to this one].
    #[arg(long)]
    controller: Option<PathBuf>,
}

/// Unary call latencies (µs) of the well-behaved client in one phase.
struct Phase {
    latencies: Vec<u64>,
    errors: u64,
}

impl Phase {
    fn p(&self, p: f64) -> u64 {
        report::percentile(&self.latencies, p)
    }
}

struct Outcome {
    alone: Phase,
    loaded: Phase,
    rss_idle: u64,
    rss_peak: u64,
    streams_open: usize,
    oversized_sent: u64,
    /// Oversized calls answered with the expected code
    /// (UNAUTHENTICATED without a token, RESOURCE_EXHAUSTED with one).
    oversized_refused: u64,
}

pub fn run(args: AbuseArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.duration.is_zero() && args.duration <= Duration::from_secs(600),
        "--duration must be between 1s and 10m"
    );
    let binary = match &args.controller {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .with_file_name("gpufleet-controller"),
    };
    let dir = tempfile::tempdir()?;
    // Stream caps raised to admit every hostile stream: the bench measures
    // what the most streams a configuration allows cost (the caps
    // themselves are tested in tests/tests/streams.rs).
    let caps = args.streams.to_string();
    let cap_args = [
        "--max-streams-per-token".to_string(),
        caps.clone(),
        "--max-streams".to_string(),
        caps,
    ];
    let mut controller = ControllerProcess::start(&binary, dir.path(), &cap_args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = runtime.block_on(async {
        let data_dir = dir.path().join("controller");
        clients::use_admin_token(&data_dir).await?;
        controller.wait_serving(Duration::from_secs(30)).await?;
        let token = std::fs::read_to_string(data_dir.join("admin.token"))?
            .trim()
            .to_string();
        drive(&args, &controller, &token).await
    })?;
    drop(runtime);
    drop(controller);
    print_report(&args, &outcome);
    Ok(())
}

async fn drive(
    args: &AbuseArgs,
    controller: &ControllerProcess,
    token: &str,
) -> anyhow::Result<Outcome> {
    let endpoint = controller.endpoint.clone();
    let addr: SocketAddr = endpoint
        .trim_start_matches("http://")
        .parse()
        .context("the controller's endpoint is not an address")?;
    // A job that stays pending (no agents): what the streams follow.
    let mut jobs = clients::jobs_client(&endpoint).await?;
    let job = jobs
        .submit_job(SubmitJobRequest {
            spec: Some(JobSpec {
                name: "abuse-target".into(),
                gpus_per_task: 1,
                workload: Some(WorkloadSpec {
                    argv: vec!["true".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
        .await?
        .into_inner()
        .job
        .context("SubmitJob returned no job")?;

    let alone = well_behaved(&endpoint, &job.id, args.duration).await?;
    let rss_idle = controller.rss_bytes()?;

    // Hostile streams, opened before the loaded phase and held through it.
    let mut held = Vec::with_capacity(args.streams);
    let mut connection = None;
    for i in 0..args.streams {
        if i % STREAMS_PER_CONNECTION == 0 {
            connection = Some(h2_connection(addr).await?);
        }
        let Some(conn) = connection.clone() else {
            bail!("no connection");
        };
        let (path, message) = if i % 2 == 0 {
            (
                "/gpufleet.v1.Jobs/StreamJobLogs",
                StreamJobLogsRequest {
                    job_id: job.id.clone(),
                    follow: true,
                    ..Default::default()
                }
                .encode_to_vec(),
            )
        } else {
            (
                "/gpufleet.v1.Jobs/WatchJob",
                WatchJobRequest {
                    job_id: job.id.clone(),
                }
                .encode_to_vec(),
            )
        };
        let body = grpc_body(&message, message.len() as u32);
        let (response, _send) = open(conn, addr, path, Some(token), body).await?;
        // Headers only; the body is kept and never read. A refusal comes
        // as headers that already carry the status (trailers-only).
        let response = response.await?;
        if response.headers().contains_key("grpc-status") {
            bail!(
                "hostile stream {i} was refused ({:?}): raise the controller's stream caps",
                response.headers().get("grpc-message")
            );
        }
        held.push(response);
    }
    let streams_open = held.len();

    // Oversized requests at a steady rate, until the phase ends.
    let oversized = Arc::new(grpc_body(
        &vec![b'x'; OVERSIZED_BYTES],
        OVERSIZED_BYTES as u32,
    ));
    let sent = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let flood = {
        let (sent, refused, token) = (sent.clone(), refused.clone(), token.to_string());
        let per_s = args.oversized_per_s.max(1);
        let oversized = oversized.clone();
        let connections = {
            let mut all = Vec::new();
            for _ in 0..8 {
                all.push(h2_connection(addr).await?);
            }
            all
        };
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / per_s);
            let mut n: u64 = 0;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let conn = connections[n as usize % connections.len()].clone();
                let with_token = n % 2 == 1;
                let auth = with_token.then(|| token.clone());
                let (body, sent, refused) = ((*oversized).clone(), sent.clone(), refused.clone());
                n += 1;
                tokio::spawn(async move {
                    sent.fetch_add(1, Ordering::Relaxed);
                    let expected = if with_token {
                        tonic::Code::ResourceExhausted
                    } else {
                        tonic::Code::Unauthenticated
                    };
                    if let Ok(status) = unary_status(conn, addr, auth.as_deref(), body).await
                        && status.code() == expected
                    {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        })
    };
    // The controller's RSS, sampled every 100 ms while the client runs.
    let peak = Arc::new(AtomicU64::new(rss_idle));
    let loaded = {
        let client = well_behaved(&endpoint, &job.id, args.duration);
        tokio::pin!(client);
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                done = &mut client => break done?,
                _ = every.tick() => {
                    peak.fetch_max(controller.rss_bytes()?, Ordering::Relaxed);
                }
            }
        }
    };
    peak.fetch_max(controller.rss_bytes()?, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let _ = flood.await;
    drop(held);
    Ok(Outcome {
        alone,
        loaded,
        rss_idle,
        rss_peak: peak.load(Ordering::Relaxed),
        streams_open,
        oversized_sent: sent.load(Ordering::Relaxed),
        oversized_refused: refused.load(Ordering::Relaxed),
    })
}

/// One client on its own connection, making `GetJob` calls back to back
/// for `duration`.
async fn well_behaved(endpoint: &str, job_id: &str, duration: Duration) -> anyhow::Result<Phase> {
    let mut jobs = clients::jobs_client(endpoint).await?;
    let mut phase = Phase {
        latencies: Vec::new(),
        errors: 0,
    };
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let started = Instant::now();
        let reply = jobs
            .get_job(GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await;
        match reply {
            Ok(_) => phase.latencies.push(started.elapsed().as_micros() as u64),
            Err(_) => phase.errors += 1,
        }
    }
    phase.latencies.sort_unstable();
    Ok(phase)
}

/// A gRPC message as sent: the 5-byte prefix declaring `declared` bytes,
/// then `message`.
fn grpc_body(message: &[u8], declared: u32) -> Bytes {
    let mut bytes = Vec::with_capacity(5 + message.len());
    bytes.push(0);
    bytes.extend_from_slice(&declared.to_be_bytes());
    bytes.extend_from_slice(message);
    Bytes::from(bytes)
}

async fn h2_connection(addr: SocketAddr) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (send, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

/// Opens a call and sends its whole body; the response is the caller's.
async fn open(
    connection: h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: Bytes,
) -> anyhow::Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>)> {
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let mut connection = connection.ready().await?;
    let (response, mut send) = connection.send_request(request.body(())?, false)?;
    send.send_data(body, true)?;
    Ok((response, send))
}

/// An oversized `SubmitJob`: the status it was answered with.
async fn unary_status(
    connection: h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    token: Option<&str>,
    body: Bytes,
) -> anyhow::Result<tonic::Status> {
    let (response, _send) =
        open(connection, addr, "/gpufleet.v1.Jobs/SubmitJob", token, body).await?;
    let response = response.await?;
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return Ok(status);
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        let data = data?;
        let _ = body.flow_control().release_capacity(data.len());
    }
    let trailers = body.trailers().await?.context("no trailers")?;
    tonic::Status::from_header_map(&trailers).context("no grpc-status in the trailers")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn ms(micros: u64) -> String {
    format!("{:.2}", micros as f64 / 1000.0)
}

fn print_report(args: &AbuseArgs, o: &Outcome) {
    let ratio = o.loaded.p(99.0) as f64 / o.alone.p(99.0).max(1) as f64;
    println!(
        "abuse: {} hostile streams never read, {} oversized ({} MB) SubmitJobs/s (half without a token); {:?} per phase",
        args.streams,
        args.oversized_per_s,
        OVERSIZED_BYTES / 1_000_000,
        args.duration
    );
    println!();
    report::table(
        &[
            "phase",
            "GetJob calls",
            "errors",
            "p50 ms",
            "p99 ms",
            "controller RSS MiB",
        ],
        &[
            vec![
                "alone".into(),
                o.alone.latencies.len().to_string(),
                o.alone.errors.to_string(),
                ms(o.alone.p(50.0)),
                ms(o.alone.p(99.0)),
                format!("{:.1}", mib(o.rss_idle)),
            ],
            vec![
                "under abuse".into(),
                o.loaded.latencies.len().to_string(),
                o.loaded.errors.to_string(),
                ms(o.loaded.p(50.0)),
                ms(o.loaded.p(99.0)),
                format!("{:.1} (peak)", mib(o.rss_peak)),
            ],
        ],
    );
    println!();
    let rss_ok = mib(o.rss_peak) < GOAL_PEAK_RSS_MIB;
    let p99_ok = ratio <= GOAL_P99_RATIO;
    println!(
        "hostile streams held open: {}; oversized sent: {}, refused with the right code: {}",
        o.streams_open, o.oversized_sent, o.oversized_refused
    );
    println!(
        "p99 under abuse / alone: {ratio:.2}× (goal ≤ {GOAL_P99_RATIO}×: {}); peak RSS {:.1} MiB (goal < {GOAL_PEAK_RSS_MIB} MiB: {})",
        if p99_ok { "met" } else { "missed" },
        mib(o.rss_peak),
        if rss_ok { "met" } else { "missed" }
    );
    let json = serde_json::json!({
        "bench": "abuse",
        "streams": args.streams,
        "streams_open": o.streams_open,
        "oversized_per_s": args.oversized_per_s,
        "oversized_sent": o.oversized_sent,
        "oversized_refused": o.oversized_refused,
        "phase_s": args.duration.as_secs_f64(),
        "alone_calls": o.alone.latencies.len(),
        "alone_errors": o.alone.errors,
        "alone_p50_ms": o.alone.p(50.0) as f64 / 1000.0,
        "alone_p99_ms": o.alone.p(99.0) as f64 / 1000.0,
        "loaded_calls": o.loaded.latencies.len(),
        "loaded_errors": o.loaded.errors,
        "loaded_p50_ms": o.loaded.p(50.0) as f64 / 1000.0,
        "loaded_p99_ms": o.loaded.p(99.0) as f64 / 1000.0,
        "p99_ratio": (ratio * 100.0).round() / 100.0,
        "rss_idle_mib": (mib(o.rss_idle) * 10.0).round() / 10.0,
        "rss_peak_mib": (mib(o.rss_peak) * 10.0).round() / 10.0,
        "goal_rss_met": rss_ok,
        "goal_p99_met": p99_ok,
    });
    println!("{json}");
}
