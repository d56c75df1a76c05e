//! The local `Agent` gRPC API: adapters that validate a request, call the
//! supervisor or backend, and map domain errors to `Status` in one place.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use gpufleet_proto::v1::agent_server::Agent;
use gpufleet_proto::v1::{
    GetTelemetryRequest, GetTelemetryResponse, ListWorkloadsRequest, ListWorkloadsResponse,
    LogChunk, RunWorkloadRequest, StopWorkloadRequest, StreamLogsRequest, WorkloadStatus,
};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::supervisor::{Supervisor, SupervisorError};
use crate::telemetry::Telemetry;

/// How often a following log stream looks for new output.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Chunks queued between a log stream's reader and its client: the next
/// chunk is read from disk while the client takes this one, never more.
const STREAM_CAPACITY: usize = 1;
/// Bytes read per chunk: with [`STREAM_CAPACITY`], what one log stream
/// holds for a client that reads slowly (plus one chunk in HTTP/2).
const LOG_CHUNK_BYTES: u32 = 64 * 1024;
/// A client that takes nothing from a full stream for this long is
/// dropped rather than buffered for.
const STREAM_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Log streams open at once; more are refused with `RESOURCE_EXHAUSTED`.
const MAX_LOG_STREAMS: usize = 64;

/// The one place domain errors become gRPC statuses.
pub(crate) fn to_status(err: SupervisorError) -> Status {
    let msg = err.to_string();
    match err {
        SupervisorError::InvalidArgument { .. } => Status::invalid_argument(msg),
        SupervisorError::NotFound(_) | SupervisorError::NoLog(_) => Status::not_found(msg),
        SupervisorError::AlreadyExists(_) => Status::already_exists(msg),
        SupervisorError::GpuBusy { .. } => Status::failed_precondition(msg),
        SupervisorError::Log { .. } => Status::internal(msg),
        SupervisorError::ShuttingDown => Status::unavailable(msg),
    }
}

/// Implements `gpufleet.v1.Agent`.
#[derive(Debug, Clone)]
pub struct AgentService {
    supervisor: Supervisor,
    telemetry: Arc<Telemetry>,
    /// One permit per open log stream ([`MAX_LOG_STREAMS`]).
    log_streams: Arc<Semaphore>,
}

impl AgentService {
    pub fn new(supervisor: Supervisor, telemetry: Arc<Telemetry>) -> Self {
        Self {
            supervisor,
            telemetry,
            log_streams: Arc::new(Semaphore::new(MAX_LOG_STREAMS)),
        }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn run_workload(
        &self,
        request: Request<RunWorkloadRequest>,
    ) -> Result<Response<WorkloadStatus>, Status> {
        let allocation = request
            .into_inner()
            .allocation
            .ok_or_else(|| Status::invalid_argument("invalid allocation: missing"))?;
        crate::limits::check_allocation(&allocation)
            .map_err(|v| Status::invalid_argument(v.to_string()))?;
        self.supervisor
            .run_local(allocation)
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn stop_workload(
        &self,
        request: Request<StopWorkloadRequest>,
    ) -> Result<Response<WorkloadStatus>, Status> {
        let req = request.into_inner();
        crate::limits::check_id("allocation_id", &req.allocation_id)
            .map_err(|v| Status::invalid_argument(v.to_string()))?;
        let grace = (req.grace_period_seconds > 0)
            .then(|| Duration::from_secs(u64::from(req.grace_period_seconds)));
        self.supervisor
            .stop(&req.allocation_id, grace)
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn list_workloads(
        &self,
        _request: Request<ListWorkloadsRequest>,
    ) -> Result<Response<ListWorkloadsResponse>, Status> {
        Ok(Response::new(ListWorkloadsResponse {
            workloads: self.supervisor.statuses(),
        }))
    }

    async fn get_telemetry(
        &self,
        _request: Request<GetTelemetryRequest>,
    ) -> Result<Response<GetTelemetryResponse>, Status> {
        let t = &self.telemetry;
        Ok(Response::new(GetTelemetryResponse {
            identity: Some(t.identity.clone()),
            gpus: t.gpus.clone(),
            samples: t.latest().as_ref().clone(),
            driver_version: t.driver_version.clone(),
            backend: t.backend_name.to_string(),
        }))
    }

    type StreamLogsStream = LogStream;

    async fn stream_logs(
        &self,
        request: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let req = request.into_inner();
        crate::limits::check_id("allocation_id", &req.allocation_id)
            .map_err(|v| Status::invalid_argument(v.to_string()))?;
        let permit = self.log_streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "this agent already serves {MAX_LOG_STREAMS} log streams, its limit; close one first"
            ))
        })?;
        // Fail fast (before the stream opens) for a bad or unknown id.
        let first = self
            .supervisor
            .read_log(&req.allocation_id, req.offset, LOG_CHUNK_BYTES)
            .await
            .map_err(to_status)?;
        let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
        let stalled = Arc::new(AtomicBool::new(false));
        let stream = LogStream {
            chunks: ReceiverStream::new(rx),
            stalled: stalled.clone(),
            ended: false,
        };
        let supervisor = self.supervisor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tx = Sink { tx, stalled };
            let mut chunk = first;
            loop {
                let next_offset = chunk.offset + chunk.data.len() as u64;
                let eof = chunk.eof;
                let has_data = !chunk.data.is_empty();
                if (has_data || eof) && !send_or_drop(&tx, Ok(chunk)).await {
                    return;
                }
                if eof || (!req.follow && !has_data) {
                    return;
                }
                if !has_data {
                    tokio::select! {
                        _ = tokio::time::sleep(FOLLOW_POLL) => {}
                        _ = tx.closed() => return,
                    }
                }
                chunk = match supervisor
                    .read_log(&req.allocation_id, next_offset, LOG_CHUNK_BYTES)
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        send_or_drop(&tx, Err(to_status(e))).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(stream))
    }
}

/// A log stream's producer side: the queue, and the flag it raises when
/// its client stopped reading.
struct Sink {
    tx: mpsc::Sender<Result<LogChunk, Status>>,
    stalled: Arc<AtomicBool>,
}

impl Sink {
    async fn closed(&self) {
        self.tx.closed().await
    }
}

/// The response of `StreamLogs`: the queued chunks, then
/// `RESOURCE_EXHAUSTED` if the producer gave up on a client that did not
/// read.
pub struct LogStream {
    chunks: ReceiverStream<Result<LogChunk, Status>>,
    stalled: Arc<AtomicBool>,
    ended: bool,
}

impl Stream for LogStream {
    type Item = Result<LogChunk, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.chunks).poll_next(cx) {
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(self.stalled.load(Ordering::Acquire).then(|| {
                    Err(Status::resource_exhausted(format!(
                        "this log stream was ended: its client read nothing for {}s",
                        STREAM_STALL_TIMEOUT.as_secs()
                    )))
                }))
            }
            other => other,
        }
    }
}

/// Queues `item`; false when the stream is over: the client went away, or
/// it took nothing for [`STREAM_STALL_TIMEOUT`] (then it is dropped, and
/// the chunks already queued are all it gets).
async fn send_or_drop(sink: &Sink, item: Result<LogChunk, Status>) -> bool {
    match tokio::time::timeout(STREAM_STALL_TIMEOUT, sink.tx.reserve()).await {
        Ok(Ok(slot)) => {
            slot.send(item);
            true
        }
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::info!("a log stream's client stopped reading; ending the stream");
            sink.stalled.store(true, Ordering::Release);
            false
        }
    }
}

/// With `token` configured, only calls carrying `authorization: Bearer
/// <token>` reach the Agent API.
pub fn check_api_token(
    token: Option<&str>,
    request: tonic::Request<()>,
) -> Result<tonic::Request<()>, Status> {
    let Some(token) = token else {
        return Ok(request);
    };
    let presented = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        None => Err(Status::unauthenticated(
            "this agent's API requires `authorization: Bearer <api_token>`",
        )),
        // Same length and no early exit: the comparison takes the same
        // time wherever the first wrong byte is.
        Some(p)
            if p.len() == token.len()
                && p.bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0 =>
        {
            Ok(request)
        }
        Some(_) => Err(Status::unauthenticated("wrong api_token for this agent")),
    }
}
