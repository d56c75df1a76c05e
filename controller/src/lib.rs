//! The gpufleet controller: node registry with leases, job store and
//! scheduler, and the gRPC API for agents, schedulers and operators.

pub mod auth;
pub mod commit;
pub mod config;
pub mod error;
pub mod ha;
pub mod history;
pub mod lifecycle;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod placement;
pub mod pricing;
pub mod secrets;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
pub mod stream_quota;
pub mod telemetry;
pub mod usage;
pub mod validate;

pub use config::ControllerConfig;
pub use server::{RunningController, start};
pub use state::Controller;
