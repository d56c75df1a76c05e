//! Why a job is still pending, as a value and as its machine-readable code.
//! The codes are part of the API (stored with jobs, shown by clients, and
//! matched by scripts): never rename one.

/// The machine-readable codes, as [`PendingReason::code`] returns them.
pub const NO_NODES: &str = "NO_NODES";
pub const NO_FEASIBLE_NODES: &str = "NO_FEASIBLE_NODES";
pub const INSUFFICIENT_FREE_GPUS: &str = "INSUFFICIENT_FREE_GPUS";
pub const QUOTA_EXCEEDED: &str = "QUOTA_EXCEEDED";
pub const BACKOFF: &str = "BACKOFF";
pub const RESERVED_FOR_HIGHER_PRIORITY: &str = "RESERVED_FOR_HIGHER_PRIORITY";
pub const PREEMPTING: &str = "PREEMPTING";
pub const WAITING_FOR_SCHEDULER: &str = "WAITING_FOR_SCHEDULER";

/// Why a job is still pending after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PendingReason {
    /// No node has registered.
    NoNodes,
    /// No set of nodes could hold the job even if nothing ran.
    NoFeasibleNodes,
    /// It would fit, but not now: waiting for running work to end.
    InsufficientFreeGpus,
    /// The tenant would exceed a GPU quota.
    QuotaExceeded,
    /// Its retry backoff has not passed.
    Backoff,
    /// Free GPUs that would fit are held for a higher-priority job.
    ReservedForHigherPriority,
    /// Lower-priority preemptible work is being evicted to make room.
    Preempting,
    /// Not yet considered by a pass.
    WaitingForScheduler,
}

impl PendingReason {
    pub const ALL: [PendingReason; 8] = [
        PendingReason::NoNodes,
        PendingReason::NoFeasibleNodes,
        PendingReason::InsufficientFreeGpus,
        PendingReason::QuotaExceeded,
        PendingReason::Backoff,
        PendingReason::ReservedForHigherPriority,
        PendingReason::Preempting,
        PendingReason::WaitingForScheduler,
    ];

    /// The machine-readable code, e.g. `"NO_FEASIBLE_NODES"`.
    pub fn code(self) -> &'static str {
        match self {
            PendingReason::NoNodes => NO_NODES,
            PendingReason::NoFeasibleNodes => NO_FEASIBLE_NODES,
            PendingReason::InsufficientFreeGpus => INSUFFICIENT_FREE_GPUS,
            PendingReason::QuotaExceeded => QUOTA_EXCEEDED,
            PendingReason::Backoff => BACKOFF,
            PendingReason::ReservedForHigherPriority => RESERVED_FOR_HIGHER_PRIORITY,
            PendingReason::Preempting => PREEMPTING,
            PendingReason::WaitingForScheduler => WAITING_FOR_SCHEDULER,
        }
    }

    /// The reason a code names; `None` for a code this version does not know.
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }
}

impl std::fmt::Display for PendingReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_distinct() {
        for reason in PendingReason::ALL {
            assert_eq!(PendingReason::from_code(reason.code()), Some(reason));
        }
        assert_eq!(PendingReason::from_code(""), None);
        assert_eq!(PendingReason::from_code("no_nodes"), None);
    }
}
