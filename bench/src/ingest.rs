//! `gpufleet-bench ingest`: N simulated agents stream telemetry batches over
//! loopback, first to a bare tonic server that decodes and discards them
//! (the baseline), then to a real controller started in-process; both rates
//! come from the same run so their ratio survives a noisy machine. Then the
//! controller's memory per GPU: RSS growth while registering the same
//! fleet and ingesting two minutes of samples, divided by the GPU count.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::Args;
use gpufleet_controller::store::SledStore;
use gpufleet_controller::telemetry::segments::{ROLLUP_DIR, SegmentRollupStore};
use gpufleet_controller::{Controller, ControllerConfig};
use gpufleet_proto::v1::agent_control_server::{AgentControl, AgentControlServer};
use gpufleet_proto::v1::{AgentMessage, ControllerMessage, TelemetryBatch, agent_message};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

use crate::sim_agent::{
    BENCH_JOIN_TOKEN, Connection, batch, connect, gpu_uuid, hello_message, node_id,
};

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Simulated agents, one gRPC connection each.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// GPUs per agent (samples per TelemetryBatch).
    #[arg(long, default_value_t = 8)]
    gpus: usize,
    /// Measured time per server, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Sending before measuring starts.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// In the memory phase, keep finished minutes queued instead of writing
    /// them to the store: separates the controller's own memory from the store's.
    #[arg(long)]
    skip_rollup_writes: bool,
}

pub fn run(args: IngestArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.agents > 0 && args.gpus > 0,
        "--agents and --gpus must be > 0"
    );
    // First, on a fresh heap: memory freed by the throughput phases would
    // be reused and hide the controller's growth.
    let memory = measure_memory(args.agents, args.gpus, !args.skip_rollup_writes)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (baseline, controller) = runtime.block_on(async {
        let baseline = measure_baseline(&args).await?;
        let controller = measure_controller(&args).await?;
        anyhow::Ok((baseline, controller))
    })?;
    drop(runtime);

    let ratio = controller.samples_per_s / baseline.samples_per_s;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "ingest: {} agents x {} GPUs, {} measured per server after {} warm-up, {} CPU cores",
        args.agents,
        args.gpus,
        humantime::format_duration(args.duration),
        humantime::format_duration(args.warmup),
        cores
    );
    println!();
    println!(
        "{:<34} {:>16} {:>14}",
        "server", "GPU samples/s", "batches/s"
    );
    for (name, rate) in [
        ("bare tonic stream (discard)", &baseline),
        ("gpufleet controller", &controller),
    ] {
        println!(
            "{:<34} {:>16.0} {:>14.0}",
            name,
            rate.samples_per_s,
            rate.samples_per_s / args.gpus as f64
        );
    }
    println!("{:<34} {:>16.2}", "ratio controller / bare", ratio);
    println!();
    println!(
        "controller memory: {} GPUs, RSS +{:.1} MiB, {:.0} bytes per GPU (target <= 2048)",
        memory.gpus,
        memory.total.rss as f64 / (1 << 20) as f64,
        memory.per_gpu(memory.total.rss)
    );
    println!(
        "{:<40} {:>12} {:>12}",
        "  of which (bytes per GPU)", "RSS", "live heap"
    );
    for (name, phase) in [
        ("opening the controller", &memory.open),
        ("registry + agent sessions", &memory.registry),
        ("telemetry: latest, rollups, store", &memory.telemetry),
        ("total", &memory.total),
    ] {
        println!(
            "  {:<38} {:>12.0} {:>12.0}",
            name,
            memory.per_gpu(phase.rss),
            memory.per_gpu(phase.heap)
        );
    }
    println!(
        "telemetry hub ingest: {:.0} ns per sample (memory phase: one thread, no gRPC)",
        memory.ingest_ns_per_sample
    );
    let summary = serde_json::json!({
        "bench": "ingest",
        "agents": args.agents,
        "gpus_per_agent": args.gpus,
        "duration_s": args.duration.as_secs_f64(),
        "cores": cores,
        "baseline_samples_per_s": baseline.samples_per_s.round(),
        "controller_samples_per_s": controller.samples_per_s.round(),
        "ratio": (ratio * 1000.0).round() / 1000.0,
        "controller_bytes_per_gpu": memory.per_gpu(memory.total.rss).round(),
        "controller_heap_bytes_per_gpu": memory.per_gpu(memory.total.heap).round(),
        "hub_ingest_ns_per_sample": memory.ingest_ns_per_sample.round(),
        "open_bytes_per_gpu": memory.per_gpu(memory.open.rss).round(),
        "registry_bytes_per_gpu": memory.per_gpu(memory.registry.rss).round(),
        "telemetry_bytes_per_gpu": memory.per_gpu(memory.telemetry.rss).round(),
        "rollups_written": !args.skip_rollup_writes,
    });
    println!("{summary}");
    Ok(())
}

struct Rate {
    samples_per_s: f64,
}

/// Decodes and discards: the cost floor of receiving the same stream.
struct Discard {
    samples: Arc<AtomicU64>,
}

type Downlink = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentControl for Discard {
    type ConnectStream = Downlink;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let samples = self.samples.clone();
        // Nothing is sent down; the stream ends when the agent's does, so
        // that the server can shut down gracefully.
        let (alive, downlink) = mpsc::channel(1);
        tokio::spawn(async move {
            let _alive = alive;
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(agent_message::Body::Telemetry(batch)) = message.body {
                    samples.fetch_add(batch.samples.len() as u64, Ordering::Relaxed);
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(downlink))))
    }
}

async fn measure_baseline(args: &IngestArgs) -> anyhow::Result<Rate> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let samples = Arc::new(AtomicU64::new(0));
    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentControlServer::new(Discard {
                samples: samples.clone(),
            }))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    let count = {
        let samples = samples.clone();
        move || samples.load(Ordering::Relaxed)
    };
    let rate = drive(args, &endpoint, false, count).await;
    let _ = stop_server.send(());
    server.await??;
    rate
}

async fn measure_controller(args: &IngestArgs) -> anyhow::Result<Rate> {
    let dir = tempfile::tempdir()?;
    let mut config = ControllerConfig::for_data_dir(dir.path());
    config.listen = "127.0.0.1:0".parse()?;
    config.join_token = BENCH_JOIN_TOKEN.to_string();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let running = gpufleet_controller::start(config, Some(listener)).await?;
    let controller = running.controller().clone();
    let count = move || {
        controller
            .telemetry()
            .all_stats()
            .iter()
            .map(|s| s.samples_accepted)
            .sum::<u64>()
    };
    let rate = drive(args, &running.endpoint(), true, count).await;
    running.shutdown().await?;
    rate
}

/// Connects every agent, lets them send for warm-up + duration, and
/// measures `count` over the duration.
async fn drive(
    args: &IngestArgs,
    endpoint: &str,
    hello: bool,
    count: impl Fn() -> u64,
) -> anyhow::Result<Rate> {
    let (go_tx, go) = watch::channel(false);
    let (stop_tx, stop) = watch::channel(false);
    let (ready_tx, mut ready) = mpsc::channel::<anyhow::Result<()>>(args.agents);
    // A thousand simultaneous connects overflow the listen backlog; a
    // real fleet's agents do not all dial in the same millisecond either.
    let dialing = Arc::new(tokio::sync::Semaphore::new(64));
    let mut agents = Vec::with_capacity(args.agents);
    for node in 0..args.agents {
        let endpoint = endpoint.to_string();
        let (go, stop, ready) = (go.clone(), stop.clone(), ready_tx.clone());
        let gpus = args.gpus;
        let dialing = dialing.clone();
        agents.push(tokio::spawn(async move {
            agent(endpoint, node, gpus, hello, go, stop, ready, dialing).await
        }));
    }
    drop(ready_tx);
    for _ in 0..args.agents {
        match ready.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e.context("an agent could not connect")),
            None => anyhow::bail!("agents ended before connecting"),
        }
    }
    go_tx.send_replace(true);
    tokio::time::sleep(args.warmup).await;
    let (t0, c0) = (Instant::now(), count());
    tokio::time::sleep(args.duration).await;
    let (t1, c1) = (Instant::now(), count());
    stop_tx.send_replace(true);
    for agent in agents {
        agent.await??;
    }
    Ok(Rate {
        samples_per_s: (c1 - c0) as f64 / (t1 - t0).as_secs_f64(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn agent(
    endpoint: String,
    node: usize,
    gpus: usize,
    hello: bool,
    mut go: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
    ready: mpsc::Sender<anyhow::Result<()>>,
    dialing: Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<()> {
    let permit = dialing.acquire_owned().await?;
    let connected = async {
        let Connection {
            uplink,
            mut downlink,
        } = connect(endpoint, hello.then(|| hello_message(node, gpus))).await?;
        // Acks and desired state: read and dropped, as an agent would consume them.
        tokio::spawn(async move { while let Ok(Some(_)) = downlink.message().await {} });
        anyhow::Ok(uplink)
    }
    .await;
    drop(permit);
    let tx = match connected {
        Ok(tx) => {
            let _ = ready.send(Ok(())).await;
            tx
        }
        Err(e) => {
            let _ = ready.send(Err(e)).await;
            return Ok(());
        }
    };
    let _ = go.wait_for(|go| *go).await;
    let uuids: Vec<String> = (0..gpus).map(|g| gpu_uuid(node, g)).collect();
    let start = SystemTime::now();
    let mut k: u64 = 0;
    while !*stop.borrow() {
        // Strictly increasing per GPU, 1 ms apart: never stale, and far
        // from the controller's future-skew limit for any realistic run.
        let at = start + Duration::from_millis(k);
        let message = AgentMessage {
            seq: k + 2,
            body: Some(agent_message::Body::Telemetry(TelemetryBatch {
                samples: batch(&uuids, at, k),
            })),
        };
        if tx.send(message).await.is_err() {
            break;
        }
        k += 1;
    }
    Ok(())
}

/// Growth of resident memory and of live heap bytes over one phase.
#[derive(Debug, Clone, Copy, Default)]
struct Growth {
    rss: i64,
    heap: i64,
}

/// RSS and live heap at one moment.
#[derive(Debug, Clone, Copy)]
struct Mark {
    rss: u64,
    heap: usize,
}

impl Mark {
    fn now() -> anyhow::Result<Self> {
        Ok(Self {
            rss: rss_bytes()?,
            heap: crate::heap_bytes(),
        })
    }

    fn since(self, earlier: Mark) -> Growth {
        Growth {
            rss: self.rss as i64 - earlier.rss as i64,
            heap: self.heap as i64 - earlier.heap as i64,
        }
    }
}

struct Memory {
    /// `TelemetryHub::ingest` time per sample in the memory phase (one
    /// thread, no gRPC, no contention): the hub's own CPU cost.
    ingest_ns_per_sample: f64,
    gpus: usize,
    /// Opening the controller (fixed costs, spread over the GPUs).
    open: Growth,
    /// Registering the nodes: registry, store, agent sessions.
    registry: Growth,
    /// Ingesting two minutes: latest samples, rollups, store writes.
    telemetry: Growth,
    total: Growth,
}

impl Memory {
    fn per_gpu(&self, bytes: i64) -> f64 {
        bytes as f64 / self.gpus as f64
    }
}

fn rss_bytes() -> anyhow::Result<u64> {
    let statm =
        std::fs::read_to_string("/proc/self/statm").context("cannot read /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .context("unexpected /proc/self/statm")?;
    Ok(pages * 4096)
}

/// Registers the fleet and ingests two minutes of samples on virtual time
/// straight into the controller's domain (no gRPC clients in the process
/// to blur the figure), flushing rollups to the store as the server would.
fn measure_memory(agents: usize, gpus: usize, write_rollups: bool) -> anyhow::Result<Memory> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _guard = runtime.enter();
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path())?;
    let rollups = Arc::new(SegmentRollupStore::open(&dir.path().join(ROLLUP_DIR))?);
    let mut config = ControllerConfig::for_data_dir(dir.path());
    config.join_token = BENCH_JOIN_TOKEN.to_string();
    let before = Mark::now()?;
    let controller = Controller::open(config, Box::new(store), rollups, Vec::new())?;
    let opened = Mark::now()?;
    let mut sessions = Vec::with_capacity(agents);
    for node in 0..agents {
        let Some(agent_message::Body::Hello(hello)) = hello_message(node, gpus).body else {
            anyhow::bail!("hello_message built no hello");
        };
        sessions.push(controller.connect_agent(hello)?);
    }
    let registered = Mark::now()?;
    let uuids: Vec<Vec<String>> = (0..agents)
        .map(|n| (0..gpus).map(|g| gpu_uuid(n, g)).collect())
        .collect();
    let flush_every = gpufleet_controller::server::ROLLUP_FLUSH_INTERVAL
        .as_secs()
        .max(1);
    let start = SystemTime::now() - Duration::from_secs(180);
    let mut ingest_time = Duration::ZERO;
    for second in 0..120u64 {
        let at = start + Duration::from_secs(second);
        for (node, uuids) in uuids.iter().enumerate() {
            let samples = batch(uuids, at, second);
            let t0 = Instant::now();
            controller.telemetry().ingest(&node_id(node), samples, at);
            ingest_time += t0.elapsed();
        }
        // As often as the server's flush task, on the same virtual clock.
        if write_rollups && (second + 1) % flush_every == 0 {
            controller.telemetry().flush(at)?;
        }
    }
    drop(uuids);
    let after = Mark::now()?;
    drop(sessions);
    Ok(Memory {
        ingest_ns_per_sample: ingest_time.as_nanos() as f64 / (120 * agents * gpus) as f64,
        gpus: agents * gpus,
        open: opened.since(before),
        registry: registered.since(opened),
        telemetry: after.since(registered),
        total: after.since(before),
    })
}
