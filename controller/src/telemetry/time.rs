//! Time as telemetry counts it: protobuf timestamps checked into
//! nanoseconds, and whole minutes since the epoch (the rollup grain).

use std::time::{SystemTime, UNIX_EPOCH};

use prost_types::Timestamp;

/// Nanoseconds since the epoch, or `None` for a missing/invalid timestamp.
pub(crate) fn ts_nanos(ts: Option<&Timestamp>) -> Option<i128> {
    let ts = ts?;
    if !(0..1_000_000_000).contains(&ts.nanos) || ts.seconds < 0 {
        return None;
    }
    Some(ts.seconds as i128 * 1_000_000_000 + ts.nanos as i128)
}

pub(crate) fn system_nanos(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Minutes since the epoch.
pub fn minute_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 60)
        .unwrap_or(0)
}

pub(crate) fn minute_to_ts(minute: u64) -> Timestamp {
    Timestamp {
        seconds: (minute * 60) as i64,
        nanos: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_before_1970_or_with_bad_nanos_are_not_times() {
        assert_eq!(ts_nanos(None), None);
        let ts = |seconds, nanos| Timestamp { seconds, nanos };
        assert_eq!(ts_nanos(Some(&ts(-1, 0))), None);
        assert_eq!(ts_nanos(Some(&ts(5, -1))), None);
        assert_eq!(ts_nanos(Some(&ts(5, 1_000_000_000))), None);
        assert_eq!(ts_nanos(Some(&ts(5, 7))), Some(5_000_000_007));
    }

    #[test]
    fn minutes_round_down_and_convert_back() {
        let t = UNIX_EPOCH + Duration::from_secs(3 * 60 + 59);
        assert_eq!(minute_of(t), 3);
        assert_eq!(
            minute_to_ts(3),
            Timestamp {
                seconds: 180,
                nanos: 0
            }
        );
        assert_eq!(system_nanos(t), 239_000_000_000);
        assert_eq!(minute_of(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }
}
