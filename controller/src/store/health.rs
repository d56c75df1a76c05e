//! Whether the controller's disk writes are working: the group commit
//! ([`crate::commit`]) and the telemetry rollup files report each failure
//! and each recovery here; the health service, `/metrics` and the gRPC
//! layer (which refuses new changes while writes fail) read it.
//!
//! A failed write is not lost: the group commit keeps it queued and retries
//! until it is stored, so the controller recovers by itself once the disk
//! has room again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use super::StoreError;

/// What failed to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorePart {
    /// The state store behind the group commit (jobs, nodes, tokens…).
    State,
    /// The telemetry rollup files.
    Rollups,
}

/// Why each part is failing now (None: working).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Degraded {
    pub state: Option<Arc<str>>,
    pub rollups: Option<Arc<str>>,
}

impl Degraded {
    pub fn is_degraded(&self) -> bool {
        self.state.is_some() || self.rollups.is_some()
    }
}

/// Shared by everything that writes to the controller's disk.
#[derive(Debug)]
pub struct StoreHealth {
    now: watch::Sender<Degraded>,
    failures: AtomicU64,
    reopens: AtomicU64,
}

impl Default for StoreHealth {
    fn default() -> Self {
        Self {
            now: watch::channel(Degraded::default()).0,
            failures: AtomicU64::new(0),
            reopens: AtomicU64::new(0),
        }
    }
}

impl StoreHealth {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A write of `part` failed with `error`; it is being retried.
    pub fn failed(&self, part: StorePart, error: &StoreError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let reason: Arc<str> = describe(error).into();
        self.now.send_if_modified(|now| {
            let slot = now.slot(part);
            let was_failing = slot.is_some();
            *slot = Some(reason);
            if !was_failing {
                tracing::error!(part = ?part, reason = %slot.as_deref().unwrap_or_default(), "store writes are failing; refusing changes until they work again");
            }
            // Only the failing/working edge wakes the watchers.
            !was_failing
        });
    }

    /// A write of `part` succeeded.
    pub fn recovered(&self, part: StorePart) {
        self.now.send_if_modified(|now| {
            let slot = now.slot(part);
            let was_failing = slot.take().is_some();
            if was_failing {
                tracing::info!(part = ?part, "store writes work again");
            }
            was_failing
        });
    }

    /// The state store was closed and opened again to recover.
    pub fn reopened(&self) {
        self.reopens.fetch_add(1, Ordering::Relaxed);
    }

    /// Why new changes are refused now: the state store cannot write.
    pub fn writes_refused(&self) -> Option<Arc<str>> {
        self.now.borrow().state.clone()
    }

    pub fn now(&self) -> Degraded {
        self.now.borrow().clone()
    }

    /// Changes on every failing/working edge.
    pub fn subscribe(&self) -> watch::Receiver<Degraded> {
        self.now.subscribe()
    }

    /// Failed writes so far (each retry that fails counts).
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Times the state store was reopened to recover.
    pub fn reopens(&self) -> u64 {
        self.reopens.load(Ordering::Relaxed)
    }
}

impl Degraded {
    fn slot(&mut self, part: StorePart) -> &mut Option<Arc<str>> {
        match part {
            StorePart::State => &mut self.state,
            StorePart::Rollups => &mut self.rollups,
        }
    }
}

/// `error` in words an operator acts on: a full disk says so.
pub fn describe(error: &StoreError) -> String {
    let text = error.to_string();
    if is_disk_full(&text) {
        format!("the controller's disk is full: {text}")
    } else {
        format!("the controller's store cannot write: {text}")
    }
}

/// ENOSPC and EDQUOT, by their text: the error reaches here through sled's
/// and the store's own error types, which do not all expose their source.
fn is_disk_full(text: &str) -> bool {
    text.contains("No space left on device")
        || text.contains("os error 28")
        || text.contains("Disk quota exceeded")
        || text.contains("os error 122")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> StoreError {
        StoreError::Io(Box::new(std::io::Error::from_raw_os_error(28)))
    }

    #[test]
    fn a_failure_flips_once_and_recovery_flips_back() {
        let health = StoreHealth::new();
        let mut seen = health.subscribe();
        assert!(!health.now().is_degraded());
        health.failed(StorePart::State, &full());
        health.failed(StorePart::State, &full());
        assert_eq!(health.failures(), 2);
        assert!(seen.has_changed().unwrap());
        seen.mark_unchanged();
        let reason = health.writes_refused().unwrap();
        assert!(
            reason.starts_with("the controller's disk is full"),
            "{reason}"
        );
        health.failed(StorePart::Rollups, &StoreError::Io("broken".into()));
        assert!(health.now().rollups.unwrap().contains("cannot write"));
        health.recovered(StorePart::State);
        assert!(health.writes_refused().is_none());
        assert!(health.now().is_degraded(), "rollups still fail");
        health.recovered(StorePart::Rollups);
        assert!(!health.now().is_degraded());
    }
}
