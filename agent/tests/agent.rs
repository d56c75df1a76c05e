//! The whole agent: local API through a real tonic client, and the uplink
//! against a fake controller, all on 127.0.0.1:0.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{DEADLINE, allocation};
use gpufleet_agent::{AgentConfig, GpuBackendKind, NodeConfig};
use gpufleet_proto::v1::agent_client::AgentClient;
use gpufleet_proto::v1::agent_control_server::{AgentControl, AgentControlServer};
use gpufleet_proto::v1::agent_message::Body;
use gpufleet_proto::v1::controller_message;
use gpufleet_proto::v1::{
    AgentMessage, ControllerMessage, DesiredState, GetTelemetryRequest, HelloAck,
    ListWorkloadsRequest, LogRequest, RunWorkloadRequest, StopWorkloadRequest, StreamLogsRequest,
    WorkloadState,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

fn config(controller: SocketAddr, data_dir: &Path, node: &str) -> AgentConfig {
    let node = NodeConfig {
        address: None,
        id: Some(node.into()),
        provider: "aws".into(),
        region: "us-east-1".into(),
        zone: "us-east-1a".into(),
        instance_type: "g6.12xlarge".into(),
        price_per_gpu_hour_usd: 0.8,
        spot: false,
        labels: BTreeMap::new(),
    };
    AgentConfig {
        sample_interval: Duration::from_millis(100),
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
    }
}

/// What the fake answers one `Connect` with: a stream, or a refusal.
type Session = Result<mpsc::Receiver<Result<ControllerMessage, Status>>, Status>;

/// A controller that records what agents send and lets the test talk back.
struct FakeController {
    inbound: mpsc::Sender<AgentMessage>,
    /// One entry per session the agent opens, in order: a stream to
    /// answer with, or a refusal.
    sessions: std::sync::Mutex<VecDeque<Session>>,
}

#[tonic::async_trait]
impl AgentControl for FakeController {
    type ConnectStream = ReceiverStream<Result<ControllerMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let rx = self
            .sessions
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| Err(Status::unavailable("no more sessions in this test")))?;
        let mut stream = request.into_inner();
        let inbound = self.inbound.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                if inbound.send(m).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Controller {
    addr: SocketAddr,
    from_agent: mpsc::Receiver<AgentMessage>,
    to_agent: mpsc::Sender<Result<ControllerMessage, Status>>,
    server: tokio::task::JoinHandle<()>,
}

async fn fake_controller() -> Controller {
    let (to_agent, out_rx) = mpsc::channel(16);
    let mut c = fake_controller_with(VecDeque::from([Ok(out_rx)])).await;
    c.to_agent = to_agent;
    c
}

async fn fake_controller_with(sessions: VecDeque<Session>) -> Controller {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (in_tx, from_agent) = mpsc::channel(1024);
    let (to_agent, _) = mpsc::channel(1);
    let fake = FakeController {
        inbound: in_tx,
        sessions: std::sync::Mutex::new(sessions),
    };
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(AgentControlServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    Controller {
        addr,
        from_agent,
        to_agent,
        server,
    }
}

impl Controller {
    /// Next message from the agent that `pick` accepts.
    async fn next<T>(&mut self, what: &str, mut pick: impl FnMut(AgentMessage) -> Option<T>) -> T {
        let wait = async {
            while let Some(m) = self.from_agent.recv().await {
                if let Some(v) = pick(m) {
                    return v;
                }
            }
            panic!("the agent stream ended while waiting for {what}");
        };
        tokio::time::timeout(DEADLINE, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    async fn send(&self, body: controller_message::Body) {
        self.to_agent
            .send(Ok(ControllerMessage { body: Some(body) }))
            .await
            .unwrap();
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn local_api_runs_lists_and_streams_logs() {
    let controller = fake_controller().await;
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = gpufleet_agent::start(
        config(controller.addr, dir.path(), "node-local"),
        Some(listener),
    )
    .await
    .unwrap();
    assert_eq!(agent.node_id(), "node-local");
    let gpus = agent.gpu_uuids();
    assert_eq!(gpus.len(), 4);
    let mut client = AgentClient::new(channel(agent.local_addr()).await);

    // Bad requests name the field.
    let err = client
        .run_workload(RunWorkloadRequest {
            allocation: Some(allocation("", &[], &[])),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("argv"), "{}", err.message());

    let status = client
        .run_workload(RunWorkloadRequest {
            allocation: Some(allocation(
                "",
                &[
                    "sh",
                    "-c",
                    "for i in 1 2 3; do echo line $i; sleep 0.1; done; echo $CUDA_VISIBLE_DEVICES",
                ],
                &[gpus[2].clone()],
            )),
        })
        .await
        .unwrap()
        .into_inner();
    let id = status.allocation_id.clone();
    assert!(id.starts_with("local-"), "{id}");
    assert_eq!(status.state, WorkloadState::Running as i32);

    let err = client
        .run_workload(RunWorkloadRequest {
            allocation: Some(allocation("other", &["true"], &[gpus[2].clone()])),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    let listed = client
        .list_workloads(ListWorkloadsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.workloads.iter().any(|w| w.allocation_id == id));

    // Following from offset 0 yields the whole output, then eof.
    let mut stream = client
        .stream_logs(StreamLogsRequest {
            allocation_id: id.clone(),
            offset: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut data = Vec::new();
    let mut eof = false;
    while let Some(chunk) = tokio::time::timeout(DEADLINE, stream.next()).await.unwrap() {
        let chunk = chunk.unwrap();
        assert_eq!(chunk.offset as usize, data.len());
        data.extend_from_slice(&chunk.data);
        if chunk.eof {
            eof = true;
            break;
        }
    }
    assert!(eof);
    assert_eq!(
        String::from_utf8(data).unwrap(),
        format!("line 1\nline 2\nline 3\n{}\n", gpus[2])
    );

    let err = client
        .stream_logs(StreamLogsRequest {
            allocation_id: "nope".into(),
            offset: 0,
            follow: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = client
        .stop_workload(StopWorkloadRequest {
            allocation_id: "nope".into(),
            grace_period_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let telemetry = client
        .get_telemetry(GetTelemetryRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(telemetry.backend, "simulated");
    assert_eq!(telemetry.gpus.len(), 4);
    assert_eq!(
        telemetry.identity.unwrap().price_per_gpu_hour_micro_usd,
        800_000
    );

    // A running workload is stopped by shutdown.
    let long = client
        .run_workload(RunWorkloadRequest {
            allocation: Some(allocation("long", &["sleep", "30"], &[])),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(long.pid > 0);
    drop(client);
    agent.shutdown().await.unwrap();
    // The process group is gone.
    let alive = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(long.pid as i32), None);
    assert!(alive.is_err(), "workload still running after shutdown");
    controller.server.abort();
}

#[tokio::test]
async fn uplink_says_hello_reconciles_and_answers_log_requests() {
    let mut controller = fake_controller().await;
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = gpufleet_agent::start(
        config(controller.addr, dir.path(), "node-up"),
        Some(listener),
    )
    .await
    .unwrap();
    let gpus = agent.gpu_uuids();

    let (hello_seq, hello) = controller
        .next("hello", |m| match m.body {
            Some(Body::Hello(h)) => Some((m.seq, h)),
            other => panic!("first message must be hello, got {other:?}"),
        })
        .await;
    assert_eq!(hello.join_token, "token-1");
    assert_eq!(hello.identity.as_ref().unwrap().node_id, "node-up");
    assert_eq!(hello.gpus.len(), 4);
    assert_eq!(hello.gpus[0].model, "L4");
    assert_eq!(hello.telemetry_interval_ms, 100);
    assert_eq!(hello.applied_generation, 0);

    controller
        .send(controller_message::Body::HelloAck(HelloAck {
            node_id: "node-up".into(),
            last_seq: 0,
            heartbeat_interval_ms: 1000,
            server_time: None,
            node_secret: String::new(),
        }))
        .await;
    let batch = controller
        .next("telemetry", |m| match m.body {
            Some(Body::Telemetry(t)) if !t.samples.is_empty() => Some((m.seq, t)),
            _ => None,
        })
        .await;
    assert!(batch.0 > hello_seq);
    assert_eq!(batch.1.samples.len(), 4);

    let alloc = allocation(
        "job-7.0",
        &["sh", "-c", "echo hello from $GPUFLEET_JOB_ID"],
        &[gpus[0].clone()],
    );
    controller
        .send(controller_message::Body::DesiredState(DesiredState {
            generation: 1,
            allocations: vec![alloc],
            ..Default::default()
        }))
        .await;
    let mut last_seq = batch.0;
    let final_status = controller
        .next("job-7.0 to succeed", |m| {
            // Heartbeats and log replies are unsequenced (0).
            if m.seq != 0 {
                assert!(m.seq > last_seq, "seq must increase");
                last_seq = m.seq;
            }
            match m.body {
                Some(Body::WorkloadStatus(s))
                    if s.allocation_id == "job-7.0"
                        && s.state == WorkloadState::Succeeded as i32 =>
                {
                    Some(s)
                }
                _ => None,
            }
        })
        .await;
    assert_eq!(final_status.exit_code, Some(0));
    assert_eq!(final_status.gpu_uuids, vec![gpus[0].clone()]);

    controller
        .send(controller_message::Body::LogRequest(LogRequest {
            request_id: "r1".into(),
            allocation_id: "job-7.0".into(),
            offset: 0,
            max_bytes: 0,
        }))
        .await;
    let response = controller
        .next("log response", |m| match m.body {
            Some(Body::LogResponse(r)) => Some(r),
            _ => None,
        })
        .await;
    assert_eq!(response.request_id, "r1");
    assert_eq!(response.error, "");
    let chunk = response.chunk.unwrap();
    assert_eq!(chunk.data, b"hello from job-000000000001\n");
    assert!(chunk.eof);

    controller
        .send(controller_message::Body::LogRequest(LogRequest {
            request_id: "r2".into(),
            allocation_id: "../x".into(),
            offset: 0,
            max_bytes: 10,
        }))
        .await;
    let response = controller
        .next("log error", |m| match m.body {
            Some(Body::LogResponse(r)) => Some(r),
            _ => None,
        })
        .await;
    assert_eq!(response.request_id, "r2");
    assert!(
        response.error.contains("allocation_id"),
        "{}",
        response.error
    );
    assert!(response.chunk.is_none());

    agent.shutdown().await.unwrap();
    controller.server.abort();
}

#[tokio::test]
async fn nvml_backend_without_a_driver_names_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config("127.0.0.1:9".parse().unwrap(), dir.path(), "node-nvml");
    config.gpu_backend = GpuBackendKind::Nvml;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    match gpufleet_agent::start(config, Some(listener)).await {
        Err(e) => {
            let msg = format!("{e:#}");
            assert!(msg.contains("--gpu-backend simulated"), "{msg}");
            assert!(!msg.contains('\n'), "{msg}");
        }
        // A host with a real driver: nothing to check here.
        Ok(agent) => agent.shutdown().await.unwrap(),
    }
}

#[tokio::test]
async fn uplink_retries_after_a_refusal_and_rehellos_with_current_statuses() {
    let (first_tx, first_rx) = mpsc::channel(16);
    let (second_tx, second_rx) = mpsc::channel(16);
    let mut controller = fake_controller_with(VecDeque::from([
        Err(Status::already_exists("node node-re is already connected")),
        Ok(first_rx),
        Ok(second_rx),
    ]))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = gpufleet_agent::start(
        config(controller.addr, dir.path(), "node-re"),
        Some(listener),
    )
    .await
    .unwrap();
    let is_hello = |m: AgentMessage| match m.body {
        Some(Body::Hello(h)) => Some((m.seq, h)),
        _ => None,
    };
    // The fake forwards nothing from a refused session, so this hello
    // comes from the retry.
    let (seq1, _) = controller.next("hello after the refusal", is_hello).await;

    let ack = |tx: mpsc::Sender<Result<ControllerMessage, Status>>| async move {
        tx.send(Ok(ControllerMessage {
            body: Some(controller_message::Body::HelloAck(HelloAck {
                node_id: "node-re".into(),
                last_seq: 0,
                heartbeat_interval_ms: 200,
                server_time: None,
                // The first registration binds the node id; the agent must
                // keep the secret and present it from then on.
                node_secret: "gfn_issued-secret".into(),
            })),
        }))
        .await
        .unwrap();
        tx
    };
    let first_tx = ack(first_tx).await;
    first_tx
        .send(Ok(ControllerMessage {
            body: Some(controller_message::Body::DesiredState(DesiredState {
                generation: 5,
                allocations: vec![allocation("job-9.0", &["true"], &[])],
                ..Default::default()
            })),
        }))
        .await
        .unwrap();
    controller
        .next("job-9.0 to succeed", |m| match m.body {
            Some(Body::WorkloadStatus(s)) if s.state == WorkloadState::Succeeded as i32 => Some(()),
            _ => None,
        })
        .await;
    // The controller goes away; the next hello carries what happened.
    drop(first_tx);
    let (seq2, hello) = controller
        .next("hello after the stream ended", is_hello)
        .await;
    // Hellos are unsequenced: the hello ack says where the replay starts.
    assert_eq!((seq1, seq2), (0, 0));
    assert_eq!(hello.applied_generation, 5);
    assert_eq!(hello.node_secret, "gfn_issued-secret");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("node.secret"))
            .unwrap()
            .trim(),
        "gfn_issued-secret"
    );
    let job = hello
        .workloads
        .iter()
        .find(|w| w.allocation_id == "job-9.0")
        .expect("the finished workload is in the hello");
    assert_eq!(job.state, WorkloadState::Succeeded as i32);
    drop(second_tx);
    agent.shutdown().await.unwrap();
    controller.server.abort();
}

#[test]
fn tls_settings_are_checked_together() {
    use gpufleet_agent::AgentConfig;
    use std::collections::HashMap;
    let load = |flags: &[&str]| {
        let base = [
            "agent",
            "--gpu-backend",
            "simulated",
            "--simulated-gpus",
            "1xL4",
        ];
        AgentConfig::load(base.iter().chain(flags).copied(), &HashMap::new())
    };
    // Without a CA, an https controller needs a publicly trusted certificate.
    assert!(load(&["--controller", "https://c:7070"]).is_ok());
    let err = load(&["--tls-cert", "/c.pem"]).unwrap_err();
    assert!(err.to_string().contains("tls_key"), "{err}");
    let ok = load(&["--controller", "https://c:7070", "--tls-ca", "/ca.pem"]).unwrap();
    assert_eq!(ok.tls.ca.as_deref(), Some(std::path::Path::new("/ca.pem")));
}

fn hello_ack(node: &str, last_seq: u64) -> Result<ControllerMessage, Status> {
    Ok(ControllerMessage {
        body: Some(controller_message::Body::HelloAck(HelloAck {
            node_id: node.into(),
            last_seq,
            heartbeat_interval_ms: 1000,
            server_time: None,
            node_secret: String::new(),
        })),
    })
}

/// Seq of the next sequenced (non-zero) message from the agent.
async fn next_seq(controller: &mut Controller, what: &str) -> u64 {
    controller
        .next(what, |m| (m.seq != 0).then_some(m.seq))
        .await
}

#[tokio::test]
async fn unacknowledged_events_are_replayed_after_a_reconnect_and_a_restart() {
    let (first_tx, first_rx) = mpsc::channel(16);
    let (second_tx, second_rx) = mpsc::channel(16);
    let mut controller = fake_controller_with(VecDeque::from([Ok(first_rx), Ok(second_rx)])).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = gpufleet_agent::start(
        config(controller.addr, dir.path(), "node-replay"),
        Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
    )
    .await
    .unwrap();
    let is_hello = |m: AgentMessage| matches!(m.body, Some(Body::Hello(_))).then_some(());

    controller.next("first hello", is_hello).await;
    first_tx.send(hello_ack("node-replay", 0)).await.unwrap();
    let mut seqs = Vec::new();
    for _ in 0..4 {
        seqs.push(next_seq(&mut controller, "telemetry").await);
    }
    // Seqs are consecutive: nothing but telemetry goes through the outbox here.
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    // The controller acknowledges up to seqs[1], then the stream breaks
    // (the ack is read before the end of the stream).
    first_tx
        .send(Ok(ControllerMessage {
            body: Some(controller_message::Body::Ack(gpufleet_proto::v1::Ack {
                seq: seqs[1],
            })),
        }))
        .await
        .unwrap();
    drop(first_tx);
    // A controller that lost track (last_seq 0) gets everything not
    // acknowledged, in order: from seqs[2], although it was sent before.
    controller.next("second hello", is_hello).await;
    second_tx.send(hello_ack("node-replay", 0)).await.unwrap();
    assert_eq!(next_seq(&mut controller, "the replay").await, seqs[2]);
    assert_eq!(next_seq(&mut controller, "the replay").await, seqs[3]);
    // The agent restarts; what was never acknowledged is still there, and
    // the hello ack acknowledges too: the replay starts right above it.
    agent.shutdown().await.unwrap();
    drop(second_tx);
    controller.server.abort();
    let mut controller = fake_controller().await;
    let agent = gpufleet_agent::start(
        config(controller.addr, dir.path(), "node-replay"),
        Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
    )
    .await
    .unwrap();
    assert!(agent.outbox_stats().events >= 2);
    controller.next("hello after the restart", is_hello).await;
    controller
        .to_agent
        .send(hello_ack("node-replay", seqs[2]))
        .await
        .unwrap();
    assert_eq!(
        next_seq(&mut controller, "the replay after the restart").await,
        seqs[3]
    );
    agent.shutdown().await.unwrap();
    controller.server.abort();
}

#[tokio::test]
async fn the_agent_api_off_loopback_needs_a_token() {
    let controller = fake_controller().await;
    let dir = tempfile::tempdir().unwrap();

    // Every interface, no token: refused at start, with the way out.
    let open = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = gpufleet_agent::start(
        config(controller.addr, &dir.path().join("open"), "node-open"),
        Some(open),
    )
    .await
    .expect_err("an open Agent API without a token must not start");
    assert!(err.to_string().contains("api_token"), "{err}");

    // With a token: calls without it, or with another one, are refused.
    let token = "0123456789abcdef0123456789abcdef";
    let mut with_token = config(controller.addr, &dir.path().join("tok"), "node-tok");
    with_token.api_token = Some(token.into());
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let agent = gpufleet_agent::start(with_token, Some(listener))
        .await
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], agent.local_addr().port()));
    let mut anonymous = AgentClient::new(channel(addr).await);
    let err = anonymous
        .list_workloads(gpufleet_proto::v1::ListWorkloadsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    for (presented, ok) in [("wrong-token-0123456789", false), (token, true)] {
        let value: tonic::metadata::MetadataValue<_> =
            format!("Bearer {presented}").parse().unwrap();
        let mut client =
            AgentClient::with_interceptor(channel(addr).await, move |mut r: Request<()>| {
                r.metadata_mut().insert("authorization", value.clone());
                Ok(r)
            });
        let result = client
            .list_workloads(gpufleet_proto::v1::ListWorkloadsRequest::default())
            .await;
        assert_eq!(result.is_ok(), ok, "{presented}: {result:?}");
    }
    agent.shutdown().await.unwrap();
    controller.server.abort();
}
