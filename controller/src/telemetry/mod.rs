//! Fleet telemetry: the latest sample of every GPU in memory, validation of
//! what agents send (bad samples are dropped and counted per node), and
//! per-minute rollups (count, sum and max of each metric per GPU) persisted
//! with bounded retention, plus the history and aggregate queries over them.
//!
//! One module per job, in the order data flows through them:
//!
//! - [`catalogue`]: the metrics (ids, units, aliases, plausible ranges);
//! - [`validation`]: why a sample is dropped, and the check of its values;
//! - [`time`]: timestamps and whole minutes;
//! - [`rollup`]: a GPU's count, sum and max of each metric over a minute;
//! - [`hub`]: the latest sample per GPU, ingest and the paced flush;
//! - [`codec`]: the node-minute record, the stored form of rollups;
//! - [`store`]: the `RollupStore` trait and an in-memory store;
//! - [`segments`]: the controller's store, append-only segment files;
//! - [`sled_store`]: rollups in a sled tree, the benchmarks' baseline;
//! - [`history`]: history ranges and steps, rollups folded into series;
//! - [`aggregates`]: `GetLatest`'s filter and fleet aggregates over the
//!   nodes' latest samples.
//!
//! Nothing here knows the controller's state: the `Telemetry` service
//! adapter ([`crate::service`]) looks nodes up and calls these functions.

pub mod aggregates;
pub mod catalogue;
pub mod codec;
pub mod history;
pub mod hub;
pub mod rollup;
pub mod segments;
pub mod sled_store;
pub mod store;
pub mod time;
pub mod validation;

#[cfg(test)]
mod test_support;

// The paths callers outside telemetry use; everything else is reached
// through its module.
pub use aggregates::{aggregates, latest};
pub use catalogue::{Metric, metric};
pub use codec::NodeMinute;
pub use history::plan_history;
pub use hub::{TelemetryHub, paced_flush_budget};
pub use rollup::{FinishedRollup, Rollup};
pub use sled_store::{ROLLUP_TREE, SledRollupStore};
pub use store::{MemoryRollupStore, ReportingRollups, RollupDiskUsage, RollupStore};
pub use validation::DROP_REASONS;
