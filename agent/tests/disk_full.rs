//! A full disk under a real agent: its data dir is a small tmpfs that a
//! filler file fills. The agent keeps running: its API answers, a workload
//! start fails with a message naming the full disk, the outbox degrades
//! (status events held in memory, telemetry dropped and counted) and
//! `/metrics` says so, and status events still reach the controller. Once the filler is gone the agent recovers by itself
//! (the database is reopened): the outbox writes again, what memory held is
//! on disk, and a workload starts.
//!
//! Mounting needs root (CI runs as root); elsewhere the test prints why it
//! is skipped and passes.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{DEADLINE, allocation};
use gpufleet_agent::{AgentConfig, NodeConfig, RunningAgent};
use gpufleet_proto::v1::agent_client::AgentClient;
use gpufleet_proto::v1::agent_control_server::{AgentControl, AgentControlServer};
use gpufleet_proto::v1::agent_message::Body;
use gpufleet_proto::v1::{
    AgentMessage, ControllerMessage, HelloAck, ListWorkloadsRequest, RunWorkloadRequest,
    WorkloadState, controller_message,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status, Streaming};

/// Small enough to fill in a moment, large enough for a fresh agent.
const TMPFS_SIZE: &str = "16m";

/// A tmpfs mounted for the test; unmounted when dropped, whatever happened.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// None (with the reason printed) when this process may not mount.
    fn mount(dir: &Path) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_SIZE}"), "tmpfs"])
            .arg(dir)
            .output();
        match out {
            Ok(out) if out.status.success() => Some(Self {
                dir: dir.to_path_buf(),
            }),
            Ok(out) => {
                eprintln!(
                    "skipped: cannot mount a tmpfs (needs root): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: an agent that is still closing may hold files open.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Writes a file until the filesystem refuses; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xA5u8; 64 << 10];
    loop {
        if let Err(e) = file.write_all(&chunk).and_then(|()| file.sync_data()) {
            assert_eq!(
                e.raw_os_error(),
                Some(28),
                "filling the tmpfs failed with something other than ENOSPC: {e}"
            );
            return path;
        }
    }
}

/// A controller that answers every session with a hello ack (nothing
/// applied yet, and no acks later: every event stays in the outbox) and
/// passes on what the agent sends.
struct FakeController {
    inbound: mpsc::UnboundedSender<AgentMessage>,
}

#[tonic::async_trait]
impl AgentControl for FakeController {
    type ConnectStream = ReceiverStream<Result<ControllerMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let ack = ControllerMessage {
            body: Some(controller_message::Body::HelloAck(HelloAck {
                node_id: "node-disk".into(),
                last_seq: 0,
                heartbeat_interval_ms: 1000,
                server_time: None,
                node_secret: String::new(),
            })),
        };
        let _ = tx.send(Ok(ack)).await;
        let mut stream = request.into_inner();
        let inbound = self.inbound.clone();
        tokio::spawn(async move {
            // Held so the session stays open.
            let _tx = tx;
            while let Some(Ok(m)) = stream.next().await {
                if inbound.send(m).is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn fake_controller() -> (SocketAddr, mpsc::UnboundedReceiver<AgentMessage>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (inbound, from_agent) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentControlServer::new(FakeController { inbound }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (addr, from_agent)
}

/// Waits for the status of `allocation_id` in `state` from the agent.
async fn status_reaches_controller(
    from_agent: &mut mpsc::UnboundedReceiver<AgentMessage>,
    allocation_id: &str,
    state: WorkloadState,
) {
    let wait = async {
        while let Some(m) = from_agent.recv().await {
            if let Some(Body::WorkloadStatus(s)) = m.body
                && s.allocation_id == allocation_id
                && s.state == state as i32
            {
                return;
            }
        }
        panic!("the agent's stream ended");
    };
    tokio::time::timeout(DEADLINE, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {allocation_id}'s status"));
}

fn config(controller: SocketAddr, data_dir: &Path) -> AgentConfig {
    let node = NodeConfig {
        address: None,
        id: Some("node-disk".into()),
        provider: "aws".into(),
        region: "us-east-1".into(),
        zone: "us-east-1a".into(),
        instance_type: "g6.12xlarge".into(),
        price_per_gpu_hour_usd: 0.8,
        spot: false,
        labels: BTreeMap::new(),
    };
    let mut config = AgentConfig {
        sample_interval: Duration::from_millis(50),
        stop_grace_period: Duration::from_secs(2),
        log_max_bytes: 1 << 20,
        shim_program: Some(common::SHIM.into()),
        ..AgentConfig::simulated(
            format!("http://{controller}"),
            "token-1",
            node,
            vec!["4xL4".into()],
            data_dir,
        )
    };
    config.monitoring.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config
}

/// The value of the agent series `name` on `/metrics`.
async fn metric(agent: &RunningAgent, name: &str) -> u64 {
    let addr: SocketAddr = agent.metrics_addr().expect("metrics are served");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let prefix = format!("{name}{{");
    response
        .lines()
        .find(|line| line.starts_with(&prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} on /metrics:\n{response}"))
}

/// Polls `check` until it is true, failing after [`DEADLINE`].
async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !check().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_dir_degrades_the_agent_and_it_recovers_by_itself() {
    let root = tempfile::tempdir().unwrap();
    let Some(tmpfs) = Tmpfs::mount(&root.path().join("data")) else {
        return;
    };
    let (controller, mut from_agent) = fake_controller().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = gpufleet_agent::start(config(controller, &tmpfs.dir), Some(listener))
        .await
        .unwrap();
    let gpus = agent.gpu_uuids();
    let channel = Endpoint::from_shared(format!("http://{}", agent.local_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = AgentClient::new(channel);
    assert_eq!(metric(&agent, "gpufleet_agent_outbox_degraded").await, 0);

    // A workload that writes 8 KiB lines: its output is lost while the
    // disk is full, not for the rest of its life.
    let ticker = client
        .run_workload(RunWorkloadRequest {
            allocation: Some(allocation(
                "ticker",
                &[
                    "sh",
                    "-c",
                    "while :; do printf '%8192s\\n' tick; sleep 0.05; done",
                ],
                &[gpus[2].clone()],
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ticker.state, WorkloadState::Running as i32, "{ticker:?}");
    let ticker_log = tmpfs.dir.join("allocations/ticker/output.log");

    let filler = fill(&tmpfs.dir);

    // A start cannot write its records: it fails, naming the full disk.
    let failed = client
        .run_workload(RunWorkloadRequest {
            allocation: Some(allocation("on-full-disk", &["true"], &[gpus[0].clone()])),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failed.state, WorkloadState::Failed as i32, "{failed:?}");
    assert!(
        failed.message.contains("disk is full"),
        "the start names the full disk: {:?}",
        failed.message
    );

    // The outbox degrades; the failed start's status waits in memory (or
    // in the old database handle) and telemetry is dropped, counted.
    until("the outbox to degrade", async || {
        metric(&agent, "gpufleet_agent_outbox_degraded").await == 1
    })
    .await;
    until("telemetry dropped while the disk is full", async || {
        agent.outbox_stats().unwritten_dropped_telemetry > 0
    })
    .await;
    assert!(metric(&agent, "gpufleet_agent_outbox_write_failures_total").await > 0);
    status_reaches_controller(&mut from_agent, "on-full-disk", WorkloadState::Failed).await;
    // A status change while degraded is held in memory and sent from there.
    let second = client
        .run_workload(RunWorkloadRequest {
            allocation: Some(allocation("still-full", &["true"], &[gpus[0].clone()])),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.state, WorkloadState::Failed as i32, "{second:?}");
    until("the status held in memory", async || {
        agent.outbox_stats().unwritten_events >= 1
    })
    .await;
    assert_eq!(metric(&agent, "gpufleet_agent_outbox_degraded").await, 1);
    status_reaches_controller(&mut from_agent, "still-full", WorkloadState::Failed).await;
    // The agent keeps answering.
    let listed = client
        .list_workloads(ListWorkloadsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .workloads
            .iter()
            .any(|w| w.allocation_id == "on-full-disk")
    );

    // Room again: the agent recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    until("the outbox to write again", async || {
        metric(&agent, "gpufleet_agent_outbox_degraded").await == 0
    })
    .await;
    assert!(metric(&agent, "gpufleet_agent_outbox_reopens_total").await >= 1);
    let stats = agent.outbox_stats();
    assert_eq!(stats.unwritten_events, 0, "memory was written: {stats:?}");
    assert!(
        stats.status_events >= 2,
        "the failed starts' statuses: {stats:?}"
    );

    let started = client
        .run_workload(RunWorkloadRequest {
            allocation: Some(allocation(
                "after-recovery",
                &["sleep", "30"],
                &[gpus[1].clone()],
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.state, WorkloadState::Running as i32, "{started:?}");
    // Its status goes to disk, not to memory.
    until("the new workload's status on disk", async || {
        let stats = agent.outbox_stats();
        stats.status_events > 1 && stats.unwritten_events == 0 && !stats.degraded
    })
    .await;

    // The workload's output resumes, after a line saying some was lost.
    until("the ticker's output after the full disk", async || {
        let log = std::fs::read_to_string(&ticker_log).unwrap_or_default();
        log.split_once("some output was lost while the agent's disk was full")
            .is_some_and(|(_, after)| after.contains("tick"))
    })
    .await;

    tokio::time::timeout(DEADLINE, agent.shutdown())
        .await
        .unwrap()
        .unwrap();
    drop(tmpfs);
}
