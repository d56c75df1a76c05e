//! The gpufleet scheduler: a pure, synchronous library. `(fleet, queue,
//! config, now) → decisions`: no I/O, no async, no locks, no clock of its
//! own (the caller passes `now`), and no wire format: it speaks its own
//! domain types ([`Constraints`], [`Generation`], [`Locality`],
//! [`PendingReason`], [`NodeInput`], [`JobInput`], [`Outcome`]). The
//! controller converts its wire records to and from them; the
//! benchmarks, the property tests and the simulator use them directly.
//!
//! # One pass
//! 1. Jobs are ordered by priority (higher first); within a priority, the
//!    tenant with the lowest fair share goes next (see [`queue`]); within a
//!    tenant, the oldest job.
//! 2. Each job is matched against equivalence classes of nodes (provider,
//!    region, model, price, spot) — never against every node — and placed by
//!    its policy (below). A gang (several tasks) is placed whole or not at all,
//!    by default inside one region. It prefers one network block (nodes of
//!    one [`NodeInput::block`]) and, where its locality allows more than a
//!    region, one region; it spans blocks or regions only when no single
//!    one has room (each [`TaskPlacement`] names its region and block, so
//!    the caller can say so).
//! 3. The first job of each priority level that does not fit gets a
//!    *reservation*: the nodes where it will fit earliest (from the expected
//!    ends of running work, i.e. start + max runtime). Later jobs may use free
//!    GPUs on reserved nodes only if their own max runtime ends before the
//!    reservation's start — so they cannot delay it. Jobs without a max runtime
//!    never backfill into a reservation. A job that fits only once work with
//!    no expected end has left holds its first slot "until never": that slot
//!    drains for it.
//! 4. A job that does not fit, is not preemptible, and outranks preemptible
//!    running work may evict the smallest set of such work that makes room.
//!    The victims are stopped with their grace period and queued again; the
//!    job is placed in a later pass, when their GPUs are free.
//!
//! # Placement policies and scoring
//! Among slots (a node's GPUs of one model) in eligible classes with at least
//! the task's GPUs free:
//! * `cost`: lowest effective price per GPU-hour; then the fewest free GPUs
//!   (pack); then class and slot order.
//! * `pack`: fewest free GPUs (best fit: partly used nodes fill first and
//!   whole nodes stay whole for 8-GPU tasks); then effective price.
//! * `spread`: most free GPUs; then effective price.
//!
//! The *effective price* is the node's price, discounted by
//! [`SchedulerConfig::preferred_region_discount`] (default 10 %) in a
//! preferred region: a soft preference that changes the order among GPUs

pub mod explain;
pub mod fleet;
pub mod live;
pub mod market;
pub mod queue;
pub mod reason;
pub mod sim;

mod compiled;
mod config;
mod domain;
mod eligible;
mod pass;
mod place;
mod preempt;
mod reserve;
mod units;
mod verdict;

pub use config::{SchedulerConfig, TenantPolicy, TenantState};
pub use domain::{
    Constraints, Generation, GpuUnit, JobInput, Locality, Outcome, PassResult, Policy,
    TaskPlacement,
};
pub use explain::{ConstraintExclusion, ExcludedBy, Explanation, RegionExplanation, RegionVerdict};
pub use fleet::{Fleet, FleetTemplate, GpuInput, MigInput, NEVER, NodeInput, RunningInput};
pub use live::{LiveFleet, LiveRun};
pub use pass::schedule;
pub use queue::FairShare;
pub use reason::PendingReason;

/// `3930000` → `$3.93`.
pub fn format_usd(micro_usd: u64) -> String {
    let cents = (micro_usd + 5_000) / 10_000;
    format!("${}.{:02}", cents / 100, cents % 100)
}

#[cfg(test)]
mod test_support;
