//! Hostile clients against the real `gpufleet-controller` binary, run as a
//! child process so that its RSS is its own: oversized `SubmitJob`s with no
//! token, a bad token and a valid one, and one a byte over its limit, many
//! at once. Each is refused with the right code, the controller's RSS
//! stays within a bound, and a well-behaved client keeps being served
//! meanwhile; health stays reachable without a token.
//!
//! The requests go out as raw HTTP/2 (h2), so the test sends one shared
//! 14 MB buffer many times without encoding it per call, and the bodies
//! are exactly what an attacker would send.
//!
//! Needs the controller binary built: `cargo test --workspace` builds it;
//! with `-p`, run `cargo build -p gpufleet-controller` first.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use gpufleet_proto::v1::jobs_client::JobsClient;
use gpufleet_proto::v1::{JobSpec, ListJobsRequest, SubmitJobRequest, WorkloadSpec};
use gpufleet_tests::{DEADLINE, JOIN_TOKEN, admin_token_in, authed, workspace_binary};
use tokio::process::{Child, Command};
use tonic::Code;
use tonic::codegen::{Bytes, http};

/// About the size of the request (13.9 MB).
const OVERSIZED_BYTES: usize = 14_000_000;
/// Requests of each kind in flight at once (the 32).
const CONCURRENT: usize = 32;
/// How much the controller's RSS may grow under the storm. Before the
/// guard, one such request cost it 220 MB and 32 at once 800 MB.
const RSS_GROWTH_BOUND: u64 = 96 << 20;
const SUBMIT: &str = "/gpufleet.v1.Jobs/SubmitJob";

/// The controller binary on a free loopback port, killed when dropped.
struct ControllerProcess {
    child: Child,
    addr: SocketAddr,
    token: String,
}

impl ControllerProcess {
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let free_port = || -> anyhow::Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let data_dir = dir.join("controller");
        let child = Command::new(workspace_binary("gpufleet-controller")?)
            .arg("--listen")
            .arg(addr.to_string())
            .args([
                "--metrics-listen",
                "127.0.0.1:0",
                "--join-token",
                JOIN_TOKEN,
            ])
            .arg("--data-dir")
            .arg(&data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(
                dir.join("controller.log"),
            )?))
            .kill_on_drop(true)
            .spawn()
            .context("cannot start gpufleet-controller")?;
        let deadline = Instant::now() + DEADLINE;
        let endpoint = format!("http://{addr}");
        loop {
            if let Ok(token) = admin_token_in(&data_dir)
                && !token.is_empty()
                && let Ok(channel) = authed(&endpoint, &token).await
                && JobsClient::new(channel)
                    .list_jobs(ListJobsRequest::default())
                    .await
                    .is_ok()
            {
                return Ok(Self { child, addr, token });
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default();
                bail!("the controller did not serve within {DEADLINE:?}; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn rss_bytes(&self) -> anyhow::Result<u64> {
        let pid = self.child.id().context("the controller has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .context("no VmRSS in the controller's status")
    }
}

/// A gRPC message as sent: the 5-byte prefix declaring `declared` bytes,
/// then `len` bytes of filler.
fn grpc_body(len: usize, declared: u32) -> Bytes {
    let mut bytes = Vec::with_capacity(5 + len);
    bytes.push(0);
    bytes.extend_from_slice(&declared.to_be_bytes());
    bytes.resize(5 + len, b'x');
    Bytes::from(bytes)
}

/// One unary call as raw HTTP/2 on `connection`: its gRPC status.
async fn raw_call(
    connection: h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: Bytes,
) -> anyhow::Result<tonic::Status> {
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let mut connection = connection.ready().await?;
    let (response, mut send) = connection.send_request(request.body(())?, false)?;
    // Queued, not copied: h2 sends it as the window allows, and drops
    // the rest when the controller resets the stream.
    send.send_data(body, true)?;
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

async fn h2_connection(addr: SocketAddr) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (send, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_and_unauthenticated_requests_are_refused_cheaply() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let controller = ControllerProcess::start(dir.path()).await?;
    let addr = controller.addr;
    let endpoint = format!("http://{addr}");
    let token = controller.token.clone();

    // Health and reflection need no token, as before.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(endpoint.clone())?
            .connect()
            .await?,
    );
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "gpufleet.v1.Jobs".into(),
        })
        .await?
        .into_inner();
    ensure!(
        serving.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // A well-behaved client, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let well_behaved = {
        let (stop, served) = (stop.clone(), served.clone());
        let mut jobs = JobsClient::new(authed(&endpoint, &token).await?);
        tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let spec = JobSpec {
                    name: "well-behaved".into(),
                    gpus_per_task: 1,
                    workload: Some(WorkloadSpec {
                        argv: vec!["true".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let submitted = jobs.submit_job(SubmitJobRequest { spec: Some(spec) }).await;
                let listed = jobs.list_jobs(ListJobsRequest::default()).await;
                match (submitted, listed) {
                    (Ok(_), Ok(_)) => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    (Err(e), _) | (_, Err(e)) if errors.len() < 5 => errors.push(e),
                    _ => {}
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            errors
        })
    };

    let baseline = controller.rss_bytes()?;
    let oversized = grpc_body(OVERSIZED_BYTES, OVERSIZED_BYTES as u32);
    // One byte over SubmitJob's limit.
    let just_over = grpc_body(256 * 1024 + 1, 256 * 1024 + 1);
    let connections = {
        let mut all = Vec::new();
        for _ in 0..8 {
            all.push(h2_connection(addr).await?);
        }
        all
    };
    let mut calls = Vec::new();
    for i in 0..CONCURRENT {
        for (kind, auth, body) in [
            ("unauthenticated", None, oversized.clone()),
            (
                "bad token",
                Some("gft_0000000000000000_00"),
                oversized.clone(),
            ),
            ("authenticated", Some(token.as_str()), oversized.clone()),
            (
                "just over the limit",
                Some(token.as_str()),
                just_over.clone(),
            ),
        ] {
            let connection = connections[i % connections.len()].clone();
            let auth = auth.map(str::to_string);
            calls.push(tokio::spawn(async move {
                let status = raw_call(connection, addr, SUBMIT, auth.as_deref(), body).await;
                (kind, status)
            }));
        }
    }
    let mut peak = baseline;
    while calls.iter().any(|c| !c.is_finished()) {
        peak = peak.max(controller.rss_bytes()?);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for call in calls {
        let (kind, status) = call.await?;
        let status = status.with_context(|| format!("{kind} call failed below gRPC"))?;
        let expected = match kind {
            "unauthenticated" | "bad token" => Code::Unauthenticated,
            _ => Code::ResourceExhausted,
        };
        ensure!(
            status.code() == expected,
            "{kind}: expected {expected:?}, got {status:?}"
        );
        if expected == Code::ResourceExhausted {
            ensure!(
                status.message().contains(SUBMIT)
                    && status.message().contains("at most 262144 bytes"),
                "{kind}: the refusal names the RPC and its limit: {status:?}"
            );
        }
    }
    // A moment more of the well-behaved client after the storm.
    let served_during = served.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    peak = peak.max(controller.rss_bytes()?);
    stop.store(true, Ordering::Relaxed);
    let errors = well_behaved.await?;
    ensure!(
        errors.is_empty(),
        "the well-behaved client was refused: {errors:?}"
    );
    ensure!(
        served.load(Ordering::Relaxed) > served_during,
        "the well-behaved client was served after the storm"
    );
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "controller RSS: {} MiB before, {} MiB peak ({} requests of {OVERSIZED_BYTES} bytes)",
        baseline >> 20,
        peak >> 20,
        4 * CONCURRENT
    );
    ensure!(
        growth < RSS_GROWTH_BOUND,
        "the controller's RSS grew by {} MiB under the storm (bound {} MiB)",
        growth >> 20,
        RSS_GROWTH_BOUND >> 20
    );
    Ok(())
}
