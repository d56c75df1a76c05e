//! Hostile stream clients (issue 21): clients that open log and watch
//! streams and never read them, and streams whose token is revoked or
//! expires while they are open. Each case checks that the controller
//! bounds or ends the stream with a clear status while other clients are
//! still served.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use gpufleet_controller::ControllerConfig;
use gpufleet_proto::v1::jobs_client::JobsClient;
use gpufleet_proto::v1::tokens_client::TokensClient;
use gpufleet_proto::v1::*;
use gpufleet_tests::{Authed, BearerToken, Cluster, NodeSpec, authed, eventually};
use tokio_stream::StreamExt as _;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};

/// Revocation reaches an open stream at once (a watch channel); the slack
/// is for a busy CI machine.
const REVOCATION_DEADLINE: Duration = Duration::from_secs(2);

fn one_node() -> Vec<NodeSpec> {
    vec![NodeSpec::new(
        "node-a",
        "aws",
        "us-east-1",
        "4xH100-SXM-80GB",
        3.0,
    )]
}

/// Small stream caps and a short stall timeout, so the tests reach them.
fn small_limits(config: &mut ControllerConfig) {
    config.streams.per_token = 3;
    config.streams.total = 100;
    config.streams.stall_timeout = Duration::from_secs(1);
}

/// A token of `role` for every tenant, made with the admin token.
async fn token(
    cluster: &Cluster,
    name: &str,
    role: Role,
    ttl: u64,
) -> anyhow::Result<TokenInfoAndText> {
    let mut tokens = TokensClient::new(authed(&cluster.endpoint(), &cluster.admin_token).await?);
    let created = tokens
        .create_token(CreateTokenRequest {
            name: name.into(),
            role: role as i32,
            tenant: "*".into(),
            ttl_seconds: ttl,
        })
        .await?
        .into_inner();
    Ok(TokenInfoAndText {
        id: created.info.context("no token info")?.id,
        text: created.token,
    })
}

struct TokenInfoAndText {
    id: String,
    text: String,
}

/// A client whose HTTP/2 windows are as small as the protocol allows
/// (64 KiB), so that a client that does not read fills them quickly and
/// holds little itself.
async fn small_window_client(endpoint: &str, token: &str) -> anyhow::Result<JobsClient<Authed>> {
    let channel: Channel = Endpoint::from_shared(endpoint.to_string())?
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await?;
    Ok(JobsClient::new(InterceptedService::new(
        channel,
        BearerToken::with(token)?,
    )))
}

fn follow(job_id: &str) -> StreamJobLogsRequest {
    StreamJobLogsRequest {
        job_id: job_id.to_string(),
        task_index: 0,
        offset: 0,
        follow: true,
    }
}

/// A running job that wrote `bytes` of log and then stays quiet.
async fn chatty_job(cluster: &Cluster, bytes: u32) -> anyhow::Result<Job> {
    let script = format!("head -c {bytes} /dev/zero | tr '\\0' x; sleep 600");
    let job = cluster.submit(1, &["sh", "-c", &script]).await?;
    cluster
        .wait_job(&job.id, "its task running", |j| {
            j.tasks.iter().any(|t| t.state() == WorkloadState::Running)
        })
        .await
}

/// The stream's next message that is not log data, within `deadline`.
async fn end_of<T>(
    stream: &mut Streaming<T>,
    deadline: Duration,
) -> anyhow::Result<Option<tonic::Status>> {
    let until = Instant::now() + deadline;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.next()).await {
            Err(_) => anyhow::bail!("the stream did not end within {deadline:?}"),
            Ok(None) => return Ok(None),
            Ok(Some(Err(status))) => return Ok(Some(status)),
            Ok(Some(Ok(_))) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn non_reading_streams_are_capped_per_token_while_other_tokens_are_served()
-> anyhow::Result<()> {
    let cluster = Cluster::start_configured(
        &one_node(),
        (Duration::from_secs(15), Duration::from_secs(60)),
        small_limits,
    )
    .await?;
    let job = chatty_job(&cluster, 900_000).await?;
    let hostile = token(&cluster, "hostile", Role::Viewer, 0).await?;
    let polite = token(&cluster, "polite", Role::Viewer, 0).await?;

    let mut jobs = small_window_client(&cluster.endpoint(), &hostile.text).await?;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(jobs.stream_job_logs(follow(&job.id)).await?.into_inner());
    }
    let refused = jobs
        .stream_job_logs(follow(&job.id))
        .await
        .expect_err("the 4th stream of a token capped at 3");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("max_streams_per_token is 3"),
        "{}",
        refused.message()
    );
    // A watch counts against the same cap.
    let refused = jobs
        .watch_job(WatchJobRequest {
            job_id: job.id.clone(),
        })
        .await
        .expect_err("a watch over the cap");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");

    // Another token is served, streams included.
    let mut others = JobsClient::new(authed(&cluster.endpoint(), &polite.text).await?);
    others
        .get_job(GetJobRequest {
            job_id: job.id.clone(),
        })
        .await?;
    let mut log = others.stream_job_logs(follow(&job.id)).await?.into_inner();
    let first = log.next().await.context("no log chunk")??;
    assert!(!first.data.is_empty());
    drop(log);

    // Streams ended by their client give their slots back.
    drop(held);
    let controller = cluster
        .controller
        .as_ref()
        .context("no controller")?
        .controller()
        .clone();
    let id = hostile.id.clone();
    eventually("the hostile token's streams to be released", || {
        let quotas = controller.stream_quotas().clone();
        let id = id.clone();
        async move { Ok((quotas.open_streams_of(&id) == 0).then_some(())) }
    })
    .await?;
    jobs.stream_job_logs(follow(&job.id)).await?;
    // The controller's state is released only once no handle is left.
    drop(controller);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_whose_client_stops_reading_is_dropped_and_its_slot_released() -> anyhow::Result<()>
{
    let cluster = Cluster::start_configured(
        &one_node(),
        (Duration::from_secs(15), Duration::from_secs(60)),
        small_limits,
    )
    .await?;
    let job = chatty_job(&cluster, 900_000).await?;
    let reader = token(&cluster, "slow-reader", Role::Viewer, 0).await?;
    let controller = cluster
        .controller
        .as_ref()
        .context("no controller")?
        .controller()
        .clone();

    let mut jobs = small_window_client(&cluster.endpoint(), &reader.text).await?;
    let mut stalled = jobs.stream_job_logs(follow(&job.id)).await?.into_inner();
    // Not reading: the windows and the one-message buffer fill, and after
    // stream_stall_timeout (1 s here) the controller gives up on it.
    eventually("the controller to drop the stalled stream", || {
        let quotas = controller.stream_quotas().clone();
        async move { Ok((quotas.stalled_streams() >= 1).then_some(())) }
    })
    .await?;
    // Reading again, the client gets what was in flight, then the reason.
    let mut received = 0usize;
    let status = loop {
        match stalled.next().await {
            Some(Ok(chunk)) => received += chunk.data.len(),
            Some(Err(status)) => break status,
            None => anyhow::bail!("the stalled stream ended without a status"),
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("stream_stall_timeout"),
        "{}",
        status.message()
    );
    // Far less than the log: the controller did not read ahead for it.
    assert!(received < 900_000, "received {received} bytes");
    assert!(stalled.next().await.is_none());
    drop(stalled);
    let id = reader.id.clone();
    eventually("the dropped stream's slot to be released", || {
        let quotas = controller.stream_quotas().clone();
        let id = id.clone();
        async move { Ok((quotas.open_streams_of(&id) == 0).then_some(())) }
    })
    .await?;
    drop(controller);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_tokens_open_streams_end_with_unauthenticated() -> anyhow::Result<()> {
    let cluster = Cluster::start(&one_node()).await?;
    let job = chatty_job(&cluster, 1_000).await?;
    let viewer = token(&cluster, "soon-revoked", Role::Viewer, 0).await?;
    let mut jobs = JobsClient::new(authed(&cluster.endpoint(), &viewer.text).await?);
    let mut logs = jobs.stream_job_logs(follow(&job.id)).await?.into_inner();
    logs.next().await.context("no log chunk")??;
    let mut watch = jobs
        .watch_job(WatchJobRequest {
            job_id: job.id.clone(),
        })
        .await?
        .into_inner();
    watch.next().await.context("no first job state")??;

    let mut tokens = TokensClient::new(authed(&cluster.endpoint(), &cluster.admin_token).await?);
    tokens
        .revoke_token(RevokeTokenRequest {
            id: viewer.id.clone(),
        })
        .await?;
    for (what, status) in [
        ("log stream", end_of(&mut logs, REVOCATION_DEADLINE).await?),
        (
            "watch stream",
            end_of(&mut watch, REVOCATION_DEADLINE).await?,
        ),
    ] {
        let status = status.with_context(|| format!("the {what} ended without a status"))?;
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
        assert!(
            status.message().contains("revoked"),
            "{what}: {}",
            status.message()
        );
    }
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expiring_tokens_open_stream_ends_at_its_expiry() -> anyhow::Result<()> {
    let cluster = Cluster::start(&one_node()).await?;
    let job = chatty_job(&cluster, 1_000).await?;
    let viewer = token(&cluster, "short-lived", Role::Viewer, 2).await?;
    let mut jobs = JobsClient::new(authed(&cluster.endpoint(), &viewer.text).await?);
    let mut watch = jobs
        .watch_job(WatchJobRequest {
            job_id: job.id.clone(),
        })
        .await?
        .into_inner();
    watch.next().await.context("no first job state")??;
    // The token lives 2 s (whole seconds: up to 3 s from its creation).
    let status = end_of(&mut watch, Duration::from_secs(3) + REVOCATION_DEADLINE)
        .await?
        .context("the watch ended without a status")?;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("expired"), "{}", status.message());
    cluster.shutdown().await
}

/// Resident memory of this process, bytes (Linux).
fn rss_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("short /proc/self/statm")?
        .parse()?;
    Ok(pages * 4096)
}

/// What docs/grpc.md quotes as the memory of an open stream. The whole
/// cluster and its clients run in this process, so the figure includes
/// the 64 KiB each small-window client holds on its side.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_per_non_reading_log_stream_is_bounded() -> anyhow::Result<()> {
    const STREAMS: usize = 200;
    let cluster = Cluster::start_configured(
        &one_node(),
        (Duration::from_secs(15), Duration::from_secs(60)),
        |config| {
            config.streams.per_token = STREAMS as u32;
            config.streams.stall_timeout = Duration::from_secs(600);
        },
    )
    .await?;
    let job = chatty_job(&cluster, 900_000).await?;
    let hostile = token(&cluster, "hostile", Role::Viewer, 0).await?;
    // Clients first, so their connections are not counted.
    let mut clients = Vec::new();
    for _ in 0..STREAMS / 50 {
        clients.push(small_window_client(&cluster.endpoint(), &hostile.text).await?);
    }
    let before = rss_bytes()?;
    let mut held = Vec::new();
    for i in 0..STREAMS {
        let n = clients.len();
        let client = &mut clients[i % n];
        held.push(client.stream_job_logs(follow(&job.id)).await?.into_inner());
    }
    // Every stream fills what it may hold and stops; wait for the growth
    // to settle (polled, with a deadline).
    let mut last = rss_bytes()?;
    let settled = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_bytes()?;
        if now.abs_diff(last) < 1 << 20 || Instant::now() > settled {
            last = now;
            break;
        }
        last = now;
    }
    let per_stream = last.saturating_sub(before) / STREAMS as u64;
    println!(
        "{STREAMS} non-reading log streams: RSS {} MiB -> {} MiB, {} KiB per stream",
        before >> 20,
        last >> 20,
        per_stream >> 10
    );
    // Before the bound it was about 5 MB per stream.
    assert!(
        per_stream < 1 << 20,
        "{} KiB per open stream",
        per_stream >> 10
    );
    drop(held);
    cluster.shutdown().await
}
