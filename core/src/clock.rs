//! Time as domain code reads it. Leases, scheduling, usage and market
//! signals take a [`Clock`] instead of calling `SystemTime::now`, so that
//! tests and the trace simulator can run them on virtual time.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of wall-clock and monotonic time.
pub trait Clock: Send + Sync + Debug {
    /// Wall-clock time: timestamps in records, usage, market minutes.
    fn now(&self) -> SystemTime;
    /// Monotonic time: leases and timeouts, which must not jump when an
    /// operator or NTP sets the wall clock.
    fn monotonic(&self) -> Instant;

    /// Seconds since the Unix epoch (0 before it).
    fn unix_secs(&self) -> u64 {
        unix_secs(self.now())
    }

    /// Milliseconds since the Unix epoch (0 before it).
    fn unix_millis(&self) -> u64 {
        self.now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock handle that domain structs keep.
pub type SharedClock = Arc<dyn Clock>;

/// Seconds since the Unix epoch of `time` (0 before it).
pub fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The operating system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl SystemClock {
    pub fn shared() -> SharedClock {
        Arc::new(SystemClock)
    }
}

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn monotonic(&self) -> Instant {
        Instant::now()
    }
}

/// Virtual time that moves only when told to: for tests and the
/// simulator. Wall and monotonic time advance together.
#[derive(Debug)]
pub struct ManualClock {
    wall_start: SystemTime,
    mono_start: Instant,
    /// Nanoseconds advanced since the start.
    offset_nanos: AtomicU64,
}

impl ManualClock {
    /// A clock whose wall time starts at `start`.
    pub fn new(start: SystemTime) -> Self {
        Self {
            wall_start: start,
            mono_start: Instant::now(),
            offset_nanos: AtomicU64::new(0),
        }
    }

    /// A clock that starts at `secs` seconds after the Unix epoch.
    pub fn at_unix_secs(secs: u64) -> Self {
        Self::new(UNIX_EPOCH + Duration::from_secs(secs))
    }

    /// Moves both clocks forward by `by`.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.offset_nanos.fetch_add(nanos, Ordering::SeqCst);
    }

    /// Moves both clocks forward to wall time `to`; never backwards.
    pub fn advance_to(&self, to: SystemTime) {
        if let Ok(ahead) = to.duration_since(self.now()) {
            self.advance(ahead);
        }
    }

    fn offset(&self) -> Duration {
        Duration::from_nanos(self.offset_nanos.load(Ordering::SeqCst))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        self.wall_start + self.offset()
    }

    fn monotonic(&self) -> Instant {
        self.mono_start + self.offset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::at_unix_secs(1_000);
        let mono = clock.monotonic();
        assert_eq!(clock.unix_secs(), 1_000);
        clock.advance(Duration::from_millis(1_500));
        assert_eq!(clock.unix_millis(), 1_001_500);
        assert_eq!(clock.monotonic() - mono, Duration::from_millis(1_500));
        clock.advance_to(UNIX_EPOCH + Duration::from_secs(10));
        assert_eq!(clock.unix_secs(), 1_001, "never backwards");
        clock.advance_to(UNIX_EPOCH + Duration::from_secs(2_000));
        assert_eq!(clock.unix_secs(), 2_000);
    }

    #[test]
    fn system_clock_reads_the_os() {
        let before = SystemTime::now();
        let now = SystemClock.now();
        assert!(now >= before);
        assert!(SystemClock.unix_secs() > 1_700_000_000);
    }
}
