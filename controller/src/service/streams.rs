//! What every client stream of the controller (`WatchJob`,
//! `StreamJobLogs`) goes through, so that one bad client cannot hurt the
//! others:
//!
//! - a permit from [`crate::stream_quota`] (per token and in all), held
//!   until the stream is gone, whatever ended it;
//! - a one-message buffer between the producer and the client, so the
//!   producer reads (logs from an agent, job changes) only as fast as the
//!   client takes them;
//! - a producer that waits on its client for at most `stream_stall_timeout`
//!   and then ends the stream with `RESOURCE_EXHAUSTED`;
//! - the caller's token checked again at every revocation and at its
//!   expiry: the stream ends with `UNAUTHENTICATED` at once.
//!
//! The producer talks to a [`StreamSink`]; the response is the matching
//! [`GuardedStream`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::Status;

use super::to_status;
use crate::auth::{Authority, Principal};
use crate::state::Controller;
use crate::stream_quota::StreamPermit;

/// Messages queued between a stream's producer and its client. One: the
/// producer fetches the next message while the client takes this one, and
/// never more (a log chunk is up to 64 KiB; see docs/grpc.md).
const STREAM_BUFFER: usize = 1;

/// A response stream as the generated servers want it.
pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// How a stream ends early (revoked, stalled): set by the producer, shown
/// to the client before anything still queued.
type Verdict = Arc<Mutex<Option<Status>>>;

fn take(verdict: &Verdict) -> Option<Status> {
    verdict
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
}

/// The producer must stop: its client left, or the stream's end was
/// decided and will be shown to the client.
#[derive(Debug)]
pub(crate) struct Ended;

/// Opens a stream for `who`: refused with `RESOURCE_EXHAUSTED` when the
/// token or the controller is at its stream cap.
pub(crate) fn open<T: Send + 'static>(
    controller: &Controller,
    who: &Principal,
) -> Result<(StreamSink<T>, BoxStream<T>), Status> {
    let permit = Arc::new(
        controller
            .stream_quotas()
            .open(&who.token_id)
            .map_err(to_status)?,
    );
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let verdict = Verdict::default();
    let sink = StreamSink {
        tx,
        verdict: verdict.clone(),
        controller: controller.clone(),
        token_id: who.token_id.clone(),
        revocations: controller.auth().revocations(),
        stall_timeout: controller.stream_quotas().limits().stall_timeout,
        _permit: permit.clone(),
    };
    let stream = GuardedStream {
        rx,
        verdict,
        done: false,
        _permit: permit,
    }
    .take_until(Box::pin(controller.closed()));
    Ok((sink, Box::pin(stream)))
}

/// The producer's end of a stream.
pub(crate) struct StreamSink<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    verdict: Verdict,
    controller: Controller,
    token_id: String,
    revocations: watch::Receiver<u64>,
    stall_timeout: Duration,
    /// Shared with the response: the slot is free once both are gone.
    _permit: Arc<StreamPermit>,
}

impl<T> StreamSink<T> {
    /// Queues `item` for the client, waiting for room at most
    /// `stream_stall_timeout`.
    pub(crate) async fn send(&mut self, item: T) -> Result<(), Ended> {
        self.deliver(Ok(item)).await
    }

    /// Ends the stream with `status` after what is already queued.
    pub(crate) async fn fail(mut self, status: Status) {
        let _ = self.deliver(Err(status)).await;
    }

    /// Runs `work` (a wait for news, a read from an agent) unless the
    /// stream must end first: the client left, or the token was revoked
    /// or expired.
    pub(crate) async fn guard<F: Future>(&mut self, work: F) -> Result<F::Output, Ended> {
        tokio::select! {
            biased;
            status = until_invalid(&mut self.revocations, self.controller.auth(), &self.token_id) => {
                self.end(status);
                Err(Ended)
            }
            _ = self.tx.closed() => Err(Ended),
            out = work => Ok(out),
        }
    }

    async fn deliver(&mut self, item: Result<T, Status>) -> Result<(), Ended> {
        let room = tokio::select! {
            biased;
            status = until_invalid(&mut self.revocations, self.controller.auth(), &self.token_id) => {
                self.end(status);
                return Err(Ended);
            }
            room = tokio::time::timeout(self.stall_timeout, self.tx.reserve()) => room,
        };
        match room {
            Ok(Ok(slot)) => {
                slot.send(item);
                Ok(())
            }
            // The client went away.
            Ok(Err(_)) => Err(Ended),
            Err(_) => {
                tracing::info!(
                    token_id = %self.token_id,
                    stall_timeout = ?self.stall_timeout,
                    "a stream's client stopped reading; ending the stream"
                );
                self.controller.stream_quotas().record_stall();
                self.end(Status::resource_exhausted(format!(
                    "this stream was ended: its client read nothing for {} (stream_stall_timeout) while a message waited",
                    humantime::format_duration(self.stall_timeout)
                )));
                Err(Ended)
            }
        }
    }

    /// Ends the stream with `status`, ahead of anything still queued.
    fn end(&self, status: Status) {
        let mut verdict = self
            .verdict
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        verdict.get_or_insert(status);
    }
}

/// Resolves with `UNAUTHENTICATED` once the token may no longer be used:
/// checked now, at every revocation, and at its expiry.
async fn until_invalid(
    revocations: &mut watch::Receiver<u64>,
    auth: &Authority,
    token_id: &str,
) -> Status {
    loop {
        if let Err(e) = auth.check_still_valid(token_id) {
            return to_status(e);
        }
        // A valid token that expires does so at least a second from now
        // (whole seconds), so this never spins.
        let expiry = auth.expires_in(token_id);
        tokio::select! {
            changed = revocations.changed() => {
                if changed.is_err() {
                    // No more revocations can come; expiry still can.
                    match expiry {
                        Some(left) => tokio::time::sleep(left).await,
                        None => std::future::pending::<()>().await,
                    }
                }
            }
            _ = async {
                match expiry {
                    Some(left) => tokio::time::sleep(left).await,
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    }
}

/// The response side of a stream: the queued messages, preceded by the
/// producer's verdict once it has one.
struct GuardedStream<T> {
    rx: mpsc::Receiver<Result<T, Status>>,
    verdict: Verdict,
    done: bool,
    _permit: Arc<StreamPermit>,
}

impl<T> Stream for GuardedStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(status) = take(&self.verdict) {
            self.done = true;
            return Poll::Ready(Some(Err(status)));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(item)),
            // The producer set its verdict (if any) before it let go.
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(take(&self.verdict).map(Err))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
