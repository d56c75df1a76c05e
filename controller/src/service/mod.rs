//! gRPC adapters: `into_inner()` → validate → call the domain → map the
//! error to a `Status` here, in one place.

mod agent_control;
mod fleet;
pub mod guard;
mod jobs;
mod secrets;
mod streams;
mod telemetry;
mod tokens;
mod usage;

pub use agent_control::AgentControlService;
pub use fleet::FleetService;
pub use guard::Guarded;
pub use jobs::JobsService;
pub use secrets::SecretsService;
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
use crate::commit::tracking_reads;
use crate::error::ControllerError;
use crate::state::Controller;
use crate::store::StoreError;

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
        // Not lost: queued, and retried until the disk takes it.
        ControllerError::Store(e @ StoreError::NotDurable(_)) => Status::unavailable(e.to_string()),
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
///
/// The calls in [`READS`] change nothing: they are served while the store
/// cannot write, and wait only for the queued writes their reads declared
/// (see [`crate::commit::tracking_reads`]; one that declares none waits
/// for all). Every other call is refused with `UNAVAILABLE` and the reason
/// while the store cannot write, before it changes anything.
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
        let read = READS.contains(&request.uri().path());
        let controller = self.controller.clone();
        if !read && let Some(reason) = controller.store_health().writes_refused() {
            let refused = Status::unavailable(format!(
                "{reason}; nothing was lost, retrying; this change was not made: try again once the controller's health is SERVING"
            ));
            return Box::pin(async move { Ok(refused.into_http()) });
        }
        let reply = self.inner.call(request);
        Box::pin(async move {
            let (response, reads) = if read {
                tracking_reads(reply).await
            } else {
                (reply.await, None)
            };
            let response = response?;
            let settled = match reads {
                Some(number) => controller.durable(number).await,
                None => controller.settled().await,
            };
            match settled {
                Ok(()) => Ok(response),
                Err(e) => Ok(to_status(e).into_http()),
            }
        })
    }
}

/// The calls that change nothing (gRPC paths), served while the store
/// cannot write. See [`Settled`].
const READS: &[&str] = &[
    "/gpufleet.v1.Jobs/GetJob",
    "/gpufleet.v1.Jobs/ListJobs",
    "/gpufleet.v1.Jobs/WatchJob",
    "/gpufleet.v1.Jobs/StreamJobLogs",
    "/gpufleet.v1.Jobs/ExplainJob",
    "/gpufleet.v1.Fleet/ListNodes",
    "/gpufleet.v1.Fleet/GetNode",
    "/gpufleet.v1.Fleet/GetCapacity",
    "/gpufleet.v1.Telemetry/GetLatest",
    "/gpufleet.v1.Telemetry/GetHistory",
    "/gpufleet.v1.Telemetry/GetAggregates",
    "/gpufleet.v1.Usage/ListUsageRecords",
    "/gpufleet.v1.Usage/GetUsageReport",
    "/gpufleet.v1.Usage/TopUsage",
    "/gpufleet.v1.Usage/UsageByGeneration",
    "/gpufleet.v1.Usage/MarketTightness",
    "/gpufleet.v1.Usage/MarketElasticity",
    "/gpufleet.v1.Usage/MarketPrices",
    "/gpufleet.v1.Usage/MarketInterruptions",
    "/gpufleet.v1.Tokens/ListTokens",
    "/gpufleet.v1.Tokens/WhoAmI",
];
