//! What the controller asked of its store: how many commits (group-commit
//! rounds; one etcd transaction each), how many key writes and bytes they
//! carried, and how many reads reached the store (the group commit's
//! overlay answers reads of queued writes without it). On etcd each commit
//! and each read is a round trip to a quorum, so these say what a job
//! costs etcd; `/metrics` shows them and `gpufleet-bench dispatch` divides
//! them by jobs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters, shared by the group commit that counts and whoever reports.
#[derive(Debug, Default)]
pub struct StoreTraffic {
    commits: AtomicU64,
    batches: AtomicU64,
    writes: AtomicU64,
    written_bytes: AtomicU64,
    reads: AtomicU64,
}

/// The counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrafficSnapshot {
    /// Rounds applied to the store, each one atomic batch (an etcd
    /// transaction).
    pub commits: u64,
    /// The controller's own batches those rounds carried.
    pub batches: u64,
    /// Key writes (puts and deletes) those rounds carried, after the
    /// round kept only the last write of each key.
    pub writes: u64,
    /// Bytes of those writes: keys plus values.
    pub written_bytes: u64,
    /// Reads that reached the store: single-key reads, and each range walk
    /// (on etcd one round trip per page of it).
    pub reads: u64,
}

impl TrafficSnapshot {
    /// What happened between `earlier` and this snapshot.
    pub fn since(&self, earlier: &TrafficSnapshot) -> TrafficSnapshot {
        TrafficSnapshot {
            commits: self.commits.saturating_sub(earlier.commits),
            batches: self.batches.saturating_sub(earlier.batches),
            writes: self.writes.saturating_sub(earlier.writes),
            written_bytes: self.written_bytes.saturating_sub(earlier.written_bytes),
            reads: self.reads.saturating_sub(earlier.reads),
        }
    }
}

impl StoreTraffic {
    /// One round applied: `batches` batches, `writes` key writes of
    /// `bytes` bytes.
    pub(crate) fn committed(&self, batches: usize, writes: usize, bytes: usize) {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.batches.fetch_add(batches as u64, Ordering::Relaxed);
        self.writes.fetch_add(writes as u64, Ordering::Relaxed);
        self.written_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn read(&self) {
        self.reads.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> TrafficSnapshot {
        TrafficSnapshot {
            commits: self.commits.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            written_bytes: self.written_bytes.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
        }
    }
}
