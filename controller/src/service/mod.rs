//! gRPC adapters: `into_inner()` → validate → call the domain → map the
//! error to a `Status` here, in one place.

mod agent_control;
mod fleet;
pub mod guard;
mod jobs;
mod streams;
mod telemetry;
mod tokens;
mod usage;

pub use agent_control::AgentControlService;
pub use fleet::FleetService;
pub use guard::Guarded;
pub use jobs::JobsService;
pub use telemetry::TelemetryService;
pub use tokens::TokensService;
pub use usage::UsageService;

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;

use crate::auth::{Action, Principal};
use crate::error::ControllerError;
use crate::state::Controller;

/// The caller of a client call, checked for `action` (role and rate
/// limit). Every client RPC starts here.
pub(crate) fn caller<T>(
    controller: &Controller,
    request: &tonic::Request<T>,
    action: Action,
) -> Result<Principal, Status> {
    let header = match request.metadata().get("authorization") {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            Status::unauthenticated("the authorization header is not printable ASCII")
        })?),
    };
    controller.authorize(header, action).map_err(to_status)
}

pub(crate) fn to_status(err: ControllerError) -> Status {
    match err {
        ControllerError::InvalidArgument { .. } => Status::invalid_argument(err.to_string()),
        ControllerError::NotFound(m) => Status::not_found(m),
        ControllerError::AlreadyExists(m) => Status::already_exists(m),
        ControllerError::FailedPrecondition(m) => Status::failed_precondition(m),
        ControllerError::Unauthenticated(m) => Status::unauthenticated(m),
        ControllerError::PermissionDenied(m) => Status::permission_denied(m),
        ControllerError::Unavailable(m) => Status::unavailable(m),
        ControllerError::ResourceExhausted(m) => Status::resource_exhausted(m),
        ControllerError::Store(e) => {
            tracing::error!(error = %e, "store failure");
            Status::internal(e.to_string())
        }
        ControllerError::Internal(m) => Status::internal(m),
    }
}

/// Wraps a gRPC service so that a reply leaves only once every change made
/// so far is durable ([`Controller::settled`]). A handler's reply may show
/// state whose writes are still queued — its own change, or another
/// client's it read — and nothing may leave the controller that depends on
/// a write not yet durable. Waiting here, after the handler returned,
/// covers every reply of the service in one place; with nothing queued it
/// costs one check.
#[derive(Clone)]
pub struct Settled<S> {
    inner: S,
    controller: Controller,
}

impl<S> Settled<S> {
    pub fn new(inner: S, controller: Controller) -> Self {
        Self { inner, controller }
    }
}

impl<S: NamedService> NamedService for Settled<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Settled<S>
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
        let reply = self.inner.call(request);
        let controller = self.controller.clone();
        Box::pin(async move {
            let response = reply.await?;
            match controller.settled().await {
                Ok(()) => Ok(response),
                Err(e) => Ok(to_status(e).into_http()),
            }
        })
    }
}
