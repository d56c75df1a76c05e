//! The door of every client-facing service: the caller's token is checked
//! from the `authorization` header before a byte of the request body is
//! read, and the body is capped per RPC while it streams in. An
//! unauthenticated or oversized request so costs the controller a header
//! lookup, not the decoding of megabytes it will refuse anyway.
//!
//! Only authentication happens here; each handler still checks the role
//! and tenant its action needs (and spends the rate limit). Health and
//! reflection are not wrapped, so they stay reachable without a token.
//! AgentControl is not wrapped either: agents authenticate inside their
//! hello (join token, node secret), and its per-message limit is tonic's
//! ([`AGENT_MESSAGE_BYTES`]).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Bytes, Service, http};
use tonic::server::NamedService;

use super::to_status;
use crate::state::Controller;

/// The largest request body of an RPC not listed in [`REQUEST_LIMITS`]:
/// their requests are ids, filters and page tokens.
pub const DEFAULT_REQUEST_BYTES: usize = 64 * 1024;

/// Requests allowed more than [`DEFAULT_REQUEST_BYTES`], by gRPC path. A
/// job spec is the one large request: argv up to 64 KiB, its environment
/// and constraints; the field limits of `validate.rs` keep a valid one
/// well under this.
pub const REQUEST_LIMITS: &[(&str, usize)] = &[("/gpufleet.v1.Jobs/SubmitJob", 256 * 1024)];

/// Largest message on an agent's stream: a log chunk (1 MiB at most, the
/// agent's `MAX_LOG_CHUNK`), a telemetry batch or a hello listing every
/// workload of the node fit with room to spare.
pub const AGENT_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Largest response the controller sends: what gRPC clients accept by
/// default. A larger one would fail at the client with a less helpful
/// error; lists are paged to stay under it.
pub const RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// A gRPC message's prefix: a compression flag and a 4-byte length.
const PREFIX_BYTES: usize = 5;

/// The most a request to `path` may carry, message bytes (without the
/// gRPC prefix).
pub fn request_limit(path: &str) -> usize {
    REQUEST_LIMITS
        .iter()
        .find(|(p, _)| *p == path)
        .map_or(DEFAULT_REQUEST_BYTES, |(_, limit)| *limit)
}

/// The largest request of any RPC of `service` (`gpufleet.v1.Jobs`): the
/// service's tonic decoding limit, so that tonic never refuses before the
/// guard does (with a clearer message and code).
pub fn service_request_limit(service: &str) -> usize {
    REQUEST_LIMITS
        .iter()
        .filter(|(path, _)| {
            path.strip_prefix('/')
                .and_then(|p| p.split_once('/'))
                .is_some_and(|(s, _)| s == service)
        })
        .map(|(_, limit)| *limit)
        .fold(DEFAULT_REQUEST_BYTES, usize::max)
}

/// Wraps a client-facing gRPC service (see the module doc).
#[derive(Clone)]
pub struct Guarded<S> {
    inner: S,
    controller: Controller,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, controller: Controller) -> Self {
        Self { inner, controller }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Guarded<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if let Err(status) = self.authenticated(request.headers()) {
            // The body is dropped unread: h2 resets the stream, and the
            // flow-control window bounds what the client could send.
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let (parts, body) = request.into_parts();
        let limit = request_limit(parts.uri.path());
        let body = Body::new(CappedBody::new(body, limit, parts.uri.path().to_string()));
        let reply = self.inner.call(http::Request::from_parts(parts, body));
        Box::pin(reply)
    }
}

impl<S> Guarded<S> {
    fn authenticated(&self, headers: &http::HeaderMap) -> Result<(), Status> {
        let header = match headers.get("authorization") {
            None => None,
            Some(value) => Some(value.to_str().map_err(|_| {
                Status::unauthenticated("the authorization header is not printable ASCII")
            })?),
        };
        self.controller
            .auth()
            .authenticate(header)
            .map(|_| ())
            .map_err(to_status)
    }
}

/// A request body that fails with `RESOURCE_EXHAUSTED` as soon as it
/// declares or carries more than its RPC allows, so that nothing larger is
/// ever buffered. Client RPCs take one request message, so the whole body
/// is one prefix and one message.
struct CappedBody {
    inner: Body,
    limit: usize,
    path: String,
    /// Body bytes seen so far.
    seen: usize,
    /// The message prefix, as it arrives (it may be split across frames).
    prefix: [u8; PREFIX_BYTES],
    refused: bool,
}

impl CappedBody {
    fn new(inner: Body, limit: usize, path: String) -> Self {
        Self {
            inner,
            limit,
            path,
            seen: 0,
            prefix: [0; PREFIX_BYTES],
            refused: false,
        }
    }

    fn too_large(&self, found: &str) -> Status {
        Status::resource_exhausted(format!(
            "request too large: {} accepts at most {} bytes ({} KiB) per request; this one {found}",
            self.path,
            self.limit,
            self.limit / 1024
        ))
    }

    /// Counts a data frame; the refusal once the request is over its limit.
    fn check(&mut self, data: &[u8]) -> Result<(), Status> {
        let before = self.seen;
        self.seen = self.seen.saturating_add(data.len());
        if before < PREFIX_BYTES {
            let take = (PREFIX_BYTES - before).min(data.len());
            self.prefix[before..before + take].copy_from_slice(&data[..take]);
            if self.seen >= PREFIX_BYTES {
                let declared = u32::from_be_bytes([
                    self.prefix[1],
                    self.prefix[2],
                    self.prefix[3],
                    self.prefix[4],
                ]) as usize;
                if declared > self.limit {
                    return Err(self.too_large(&format!("declares {declared} bytes")));
                }
            }
        }
        if self.seen > self.limit + PREFIX_BYTES {
            return Err(self.too_large(&format!(
                "carries more than {} bytes",
                self.seen - PREFIX_BYTES
            )));
        }
        Ok(())
    }
}

impl http_body::Body for CappedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.refused {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref()
            && let Err(status) = self.check(data)
        {
            self.refused = true;
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.refused || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of the given frames.
    struct Frames(std::collections::VecDeque<Bytes>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn message(len: usize, declared: u32) -> Vec<u8> {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&declared.to_be_bytes());
        bytes.resize(PREFIX_BYTES + len, b'x');
        bytes
    }

    /// Reads a capped body of `chunks` to its end: bytes read, or the refusal.
    async fn read(chunks: Vec<Vec<u8>>, limit: usize) -> Result<usize, Status> {
        use futures::future::poll_fn;
        let inner = Body::new(Frames(chunks.into_iter().map(Bytes::from).collect()));
        let mut body = CappedBody::new(inner, limit, "/gpufleet.v1.Jobs/SubmitJob".into());
        let mut total = 0;
        while let Some(frame) =
            poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx)).await
        {
            total += frame?.into_data().map_or(0, |d| d.len());
        }
        Ok(total)
    }

    #[tokio::test]
    async fn a_request_within_its_limit_passes_whole() {
        let bytes = message(1000, 1000);
        let halves = vec![bytes[..3].to_vec(), bytes[3..].to_vec()];
        assert_eq!(read(halves, 1000).await.unwrap(), 1005);
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_at_the_prefix() {
        // The prefix arrives split, and nothing after it is needed.
        let bytes = message(0, 10_000_000);
        let status = read(vec![bytes[..2].to_vec(), bytes[2..].to_vec()], 1000)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("at most 1000 bytes"), "{status}");
        assert!(status.message().contains("declares 10000000"), "{status}");
    }

    #[tokio::test]
    async fn more_bytes_than_the_limit_are_refused_whatever_the_prefix_says() {
        let bytes = message(5000, 10);
        let chunks = bytes.chunks(512).map(<[u8]>::to_vec).collect();
        let status = read(chunks, 1000).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("/gpufleet.v1.Jobs/SubmitJob"));
    }

    #[test]
    fn limits_come_from_the_table_with_a_default() {
        assert_eq!(request_limit("/gpufleet.v1.Jobs/SubmitJob"), 256 * 1024);
        assert_eq!(
            request_limit("/gpufleet.v1.Jobs/GetJob"),
            DEFAULT_REQUEST_BYTES
        );
        assert_eq!(service_request_limit("gpufleet.v1.Jobs"), 256 * 1024);
        assert_eq!(
            service_request_limit("gpufleet.v1.Fleet"),
            DEFAULT_REQUEST_BYTES
        );
        // Every listed path names an RPC in the form gRPC sends it.
        for (path, limit) in REQUEST_LIMITS {
            assert!(path.starts_with("/gpufleet.v1.") && path.matches('/').count() == 2);
            assert!(*limit >= DEFAULT_REQUEST_BYTES && *limit < RESPONSE_BYTES);
        }
    }
}
