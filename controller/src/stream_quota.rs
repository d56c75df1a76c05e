//! Caps on the client streams open at once (`WatchJob`, `StreamJobLogs`):
//! per token and in total. Every open stream holds a [`StreamPermit`];
//! dropping it, whatever ended the stream, gives the slot back.
//!
//! Each open stream costs memory (a producer task and the messages queued
//! behind a client that reads slowly, see docs/grpc.md "Limits on
//! streams"), so these caps bound what streams can cost in all. Nothing
//! here knows tonic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::{ControllerError, Result};

/// Limits on client streams (config keys `max_streams_per_token`,
/// `max_streams`, `stream_stall_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Streams one token may hold open at once.
    pub per_token: u32,
    /// Streams all clients together may hold open at once.
    pub total: u32,
    /// A stream whose client takes nothing from its full buffer for this
    /// long is ended: a client that does not read is dropped rather than
    /// buffered for.
    pub stall_timeout: Duration,
}

pub const DEFAULT_MAX_STREAMS_PER_TOKEN: u32 = 64;
pub const DEFAULT_MAX_STREAMS: u32 = 1024;
pub const DEFAULT_STREAM_STALL_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            per_token: DEFAULT_MAX_STREAMS_PER_TOKEN,
            total: DEFAULT_MAX_STREAMS,
            stall_timeout: DEFAULT_STREAM_STALL_TIMEOUT,
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    per_token: HashMap<String, u32>,
}

/// The open-stream counts; cheap to clone (one shared count).
#[derive(Debug, Clone)]
pub struct StreamQuotas {
    limits: StreamLimits,
    counts: Arc<Mutex<Counts>>,
    /// Streams ended because their client stopped reading, since start.
    stalled: Arc<AtomicU64>,
}

impl StreamQuotas {
    pub fn new(limits: StreamLimits) -> Self {
        Self {
            limits,
            counts: Arc::default(),
            stalled: Arc::default(),
        }
    }

    pub fn limits(&self) -> StreamLimits {
        self.limits
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for one more stream of `token_id`, or `ResourceExhausted`
    /// naming the limit that refused it and its value.
    pub fn open(&self, token_id: &str) -> Result<StreamPermit> {
        let mut counts = self.counts();
        if counts.total >= self.limits.total {
            return Err(ControllerError::ResourceExhausted(format!(
                "the controller already serves {} streams, its limit (max_streams); retry later",
                self.limits.total
            )));
        }
        let held = counts.per_token.get(token_id).copied().unwrap_or(0);
        if held >= self.limits.per_token {
            return Err(ControllerError::ResourceExhausted(format!(
                "token {token_id} already holds {held} open streams, its limit (max_streams_per_token is {}); close one first",
                self.limits.per_token
            )));
        }
        counts.total += 1;
        counts.per_token.insert(token_id.to_string(), held + 1);
        Ok(StreamPermit {
            counts: self.counts.clone(),
            token_id: token_id.to_string(),
        })
    }

    /// Counts a stream ended because its client stopped reading.
    pub fn record_stall(&self) {
        self.stalled.fetch_add(1, Ordering::Relaxed);
    }

    /// Streams ended because their client stopped reading, since start.
    pub fn stalled_streams(&self) -> u64 {
        self.stalled.load(Ordering::Relaxed)
    }

    /// Streams open now, in all.
    pub fn open_streams(&self) -> u32 {
        self.counts().total
    }

    /// Streams `token_id` holds open now.
    pub fn open_streams_of(&self, token_id: &str) -> u32 {
        self.counts().per_token.get(token_id).copied().unwrap_or(0)
    }
}

/// One open stream's slot; given back when dropped.
#[derive(Debug)]
pub struct StreamPermit {
    counts: Arc<Mutex<Counts>>,
    token_id: String,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        counts.total = counts.total.saturating_sub(1);
        if let Some(held) = counts.per_token.get_mut(&self.token_id) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                counts.per_token.remove(&self.token_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quotas(per_token: u32, total: u32) -> StreamQuotas {
        StreamQuotas::new(StreamLimits {
            per_token,
            total,
            ..StreamLimits::default()
        })
    }

    #[test]
    fn a_token_over_its_cap_is_refused_naming_the_limit() {
        let quotas = quotas(2, 10);
        let a1 = quotas.open("a").unwrap();
        let _a2 = quotas.open("a").unwrap();
        let err = quotas.open("a").unwrap_err();
        assert!(
            matches!(err, ControllerError::ResourceExhausted(_)),
            "{err}"
        );
        assert!(
            err.to_string().contains("max_streams_per_token is 2"),
            "{err}"
        );
        // Another token is still served.
        let _b = quotas.open("b").unwrap();
        drop(a1);
        assert_eq!(quotas.open_streams_of("a"), 1);
        let _a3 = quotas.open("a").unwrap();
    }

    #[test]
    fn the_total_cap_is_refused_naming_the_limit_and_permits_come_back() {
        let quotas = quotas(10, 2);
        let a = quotas.open("a").unwrap();
        let b = quotas.open("b").unwrap();
        let err = quotas.open("c").unwrap_err();
        assert!(err.to_string().contains("(max_streams)"), "{err}");
        assert!(err.to_string().contains("2 streams"), "{err}");
        drop((a, b));
        assert_eq!(quotas.open_streams(), 0);
        assert_eq!(quotas.open_streams_of("a"), 0);
        quotas.open("c").unwrap();
    }
}
