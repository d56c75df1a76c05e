//! The gpufleet controller: node registry with leases, job store and
//! scheduler, and the gRPC API for agents, schedulers and operators.

pub mod auth;
pub mod commit;
pub mod config;
pub mod error;
pub mod history;
pub mod lifecycle;
pub mod memory;
pub mod metrics;
pub mod placement;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod usage;
pub mod validate;

/// The scheduler crate under its old path, so `crate::scheduler::…` in the
/// controller and `gpufleet_controller::scheduler::…` in its clients (the
/// CLI's price formatting, the usage benchmark) keep working; the adapter
/// that converts to and from proto is [`placement`].
pub use gpufleet_scheduler as scheduler;

pub use config::ControllerConfig;
pub use server::{RunningController, start};
pub use state::Controller;
