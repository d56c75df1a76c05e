use std::pin::Pin;
use std::time::Duration;

use futures::StreamExt;
use gpufleet_proto::v1::agent_control_server::AgentControl;
use gpufleet_proto::v1::{AgentMessage, ControllerMessage, agent_message};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use super::to_status;
use crate::state::Controller;

/// How long a new stream may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub struct AgentControlService {
    controller: Controller,
}

impl AgentControlService {
    pub fn new(controller: Controller) -> Self {
        Self { controller }
    }
}

type DownlinkStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentControl for AgentControlService {
    type ConnectStream = DownlinkStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let peer = request.remote_addr();
        // With mutual TLS configured, only agents with a client certificate
        // signed by the configured CA may join (the TLS layer verified it).
        if self.controller.config().tls.client_ca.is_some()
            && request.peer_certs().is_none_or(|certs| certs.is_empty())
        {
            return Err(Status::unauthenticated(
                "this controller requires agents to present a client certificate (mutual TLS): configure the agent's tls_cert and tls_key",
            ));
        }
        let mut inbound = request.into_inner();
        let first = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "no hello within 10s of opening the stream",
                ));
            }
            Ok(Err(status)) => return Err(status),
            Ok(Ok(None)) => return Err(Status::invalid_argument("stream closed before hello")),
            Ok(Ok(Some(message))) => message,
        };
        let Some(agent_message::Body::Hello(hello)) = first.body else {
            return Err(Status::invalid_argument(
                "the first message on AgentControl.Connect must be a hello",
            ));
        };
        let session = self.controller.connect_agent(hello).map_err(|e| {
            tracing::warn!(?peer, error = %e, "agent refused");
            to_status(e)
        })?;
        // connect_agent queued what the hello reported; the ack waits
        // in the store until it is durable.
        if self.controller.accept_seq(&session.node_id, first.seq) {
            self.controller.applied_seq(&session.node_id, first.seq);
        }

        let controller = self.controller.clone();
        let node_id = session.node_id.clone();
        let session_id = session.session_id;
        let closed = self.controller.closed();
        let stream_guard = self.controller.agent_stream_started();
        tokio::spawn(async move {
            let _stream_guard = stream_guard;
            tokio::pin!(closed);
            loop {
                let next = tokio::select! {
                    // Closing wins over a waiting message: shutdown's last
                    // flush must see everything that was applied.
                    biased;
                    _ = &mut closed => break,
                    next = inbound.message() => next,
                };
                let message = match next {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(node_id, %status, "agent stream error");
                        break;
                    }
                };
                let Some(body) = message.body else { continue };
                if let agent_message::Body::LogResponse(response) = body {
                    // Replies are correlated by request id, not sequenced.
                    controller.complete_log_request(response);
                    continue;
                }
                if !controller.accept_seq(&node_id, message.seq) {
                    continue;
                }
                match body {
                    agent_message::Body::Telemetry(batch) => {
                        controller.record_telemetry(&node_id, batch.samples)
                    }
                    agent_message::Body::WorkloadStatus(status) => {
                        if let Err(e) = controller.record_workload_status(&node_id, status) {
                            // Unacknowledged and unapplied: end the stream so
                            // that the agent's next hello reports it again.
                            tracing::error!(node_id, error = %e, "cannot record workload status; closing the agent's stream");
                            break;
                        }
                    }
                    agent_message::Body::Hello(_) => {
                        tracing::warn!(node_id, "second hello on one stream ignored");
                    }
                    agent_message::Body::LogResponse(_) => {}
                    agent_message::Body::InterruptionNotice(notice) => {
                        if let Err(e) = controller.record_interruption(&node_id, notice) {
                            tracing::error!(node_id, error = %e, "cannot record the interruption notice; closing the agent's stream");
                            break;
                        }
                    }
                }
                controller.applied_seq(&node_id, message.seq);
            }
            controller.disconnect_agent(&node_id, session_id);
        });

        let stream = ReceiverStream::new(session.downlink)
            .map(|message| Ok(*message))
            .take_until(Box::pin(self.controller.closed()));
        Ok(Response::new(Box::pin(stream)))
    }
}
