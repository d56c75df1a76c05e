//! Log reads relayed to an agent over its stream.

use std::collections::HashMap;
use std::sync::MutexGuard;

use gpufleet_proto::v1::{
    ControllerMessage, LogChunk, LogRequest, LogResponse, controller_message,
};
use tokio::sync::oneshot;

use super::*;
use crate::error::{ControllerError, Result};

impl Controller {
    /// Reads part of an allocation's log from its agent.
    pub async fn fetch_log(
        &self,
        node_id: &str,
        allocation_id: &str,
        offset: u64,
        max_bytes: u32,
    ) -> Result<LogChunk> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let tx = {
            let state = self.lock();
            let entry = state.nodes.get(node_id).ok_or_else(|| {
                ControllerError::NotFound(format!("node {node_id} is not registered"))
            })?;
            entry
                .session
                .as_ref()
                .map(|s| s.tx.clone())
                .ok_or_else(|| {
                    ControllerError::Unavailable(format!(
                        "node {node_id} is not connected; its logs are readable again once its agent reconnects"
                    ))
                })?
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        self.log_waiters().insert(request_id.clone(), reply_tx);
        let request = ControllerMessage {
            body: Some(controller_message::Body::LogRequest(LogRequest {
                request_id: request_id.clone(),
                allocation_id: allocation_id.to_string(),
                offset,
                max_bytes,
            })),
        };
        if tx.send(Box::new(request)).await.is_err() {
            self.log_waiters().remove(&request_id);
            return Err(ControllerError::Unavailable(format!(
                "node {node_id} disconnected"
            )));
        }
        let reply = tokio::time::timeout(LOG_REQUEST_TIMEOUT, reply_rx).await;
        self.log_waiters().remove(&request_id);
        match reply {
            Ok(Ok(response)) if response.error.is_empty() => Ok(response.chunk.unwrap_or_default()),
            Ok(Ok(response)) => Err(ControllerError::FailedPrecondition(format!(
                "node {node_id} could not read the log of {allocation_id}: {}",
                response.error
            ))),
            Ok(Err(_)) => Err(ControllerError::Unavailable(format!(
                "node {node_id} disconnected"
            ))),
            Err(_) => Err(ControllerError::Unavailable(format!(
                "node {node_id} did not answer a log request within {}s",
                LOG_REQUEST_TIMEOUT.as_secs()
            ))),
        }
    }

    pub fn complete_log_request(&self, response: LogResponse) {
        if let Some(waiter) = self.log_waiters().remove(&response.request_id) {
            let _ = waiter.send(response);
        }
    }

    pub(super) fn log_waiters(
        &self,
    ) -> MutexGuard<'_, HashMap<String, oneshot::Sender<LogResponse>>> {
        self.inner
            .log_waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}
