//! gRPC adapters: `into_inner()` → validate → call the domain → map the
//! error to a `Status` here, in one place.

mod agent_control;
mod fleet;
mod jobs;
mod telemetry;
mod tokens;
mod usage;

pub use agent_control::AgentControlService;
pub use fleet::FleetService;
pub use jobs::JobsService;
pub use telemetry::TelemetryService;
pub use tokens::TokensService;
pub use usage::UsageService;

use tonic::Status;

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
