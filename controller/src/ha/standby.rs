//! What a standby controller serves: health (NOT_SERVING), reflection, and
//! for every gpufleet.v1 service an `UNAVAILABLE` answer that names the
//! leader, in its message and in the `gpufleet-leader` metadata, so that
//! the CLI, agents and the Python example redirect without user action.
//! A standby proxies nothing: a client that follows the redirect talks to
//! the leader directly, so the leader's auth, rate limits and stream caps
//! apply as they are.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::server::NamedService;

pub use gpufleet_core::leader::LEADER_METADATA;

/// The answer a standby gives every call.
pub fn not_leader(leader: Option<&str>) -> Status {
    match leader {
        Some(leader) => {
            let mut metadata = MetadataMap::new();
            if let Ok(value) = MetadataValue::try_from(leader) {
                metadata.insert(LEADER_METADATA, value);
            }
            Status::with_metadata(
                tonic::Code::Unavailable,
                format!("this controller is a standby; the leader is at {leader}"),
                metadata,
            )
        }
        None => Status::unavailable(
            "this controller is a standby and no leader is elected yet; retry in a moment",
        ),
    }
}

/// Stands in for the service `S` on a standby.
pub struct Redirect<S> {
    leader: Arc<Mutex<Option<String>>>,
    service: PhantomData<fn() -> S>,
}

impl<S> Clone for Redirect<S> {
    fn clone(&self) -> Self {
        Self {
            leader: Arc::clone(&self.leader),
            service: PhantomData,
        }
    }
}

impl<S> Redirect<S> {
    pub fn new(leader: Arc<Mutex<Option<String>>>) -> Self {
        Self {
            leader,
            service: PhantomData,
        }
    }
}

impl<S: NamedService> NamedService for Redirect<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for Redirect<S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<Body>) -> Self::Future {
        let leader = self
            .leader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        std::future::ready(Ok(not_leader(leader.as_deref()).into_http()))
    }
}
