//! Which new job ids are taken, answered from memory where that is exact.
//!
//! A job id is its submit second and 28 random bits
//! ([`crate::history::new_job_id`]), so a new id can only collide with a
//! job of the same second. A collision would overwrite a finished job's
//! record, so each id was checked with a store read, under the state lock:
//! on etcd a quorum round trip per submit. But this controller is the only
//! writer of jobs from the moment it opened the store (on etcd every other
//! controller's writes are fenced off before this one loads), so for a
//! second later than every job id it loaded, the ids it issued itself are
//! all the ids there are. It remembers those for the last
//! [`KEPT_SECONDS`]; a candidate of any other second (a store that holds
//! later ids, a clock stepped back further) is still checked in the store.

use std::collections::{BTreeMap, HashSet};

/// Seconds of issued ids kept: the current one and the few before it, for
/// a clock that steps back a little.
const KEPT_SECONDS: u64 = 4;
/// Ids kept at most (docs/limits.md): past it the oldest seconds are
/// forgotten, and their ids checked in the store again.
const MAX_KEPT_IDS: usize = 200_000;

#[derive(Debug, Default)]
pub(super) struct IssuedIds {
    /// Seconds from this one on hold no id this controller did not issue
    /// (one past the latest submit second among the jobs it loaded).
    trusted_from: u64,
    /// Seconds below this one may have been dropped from `by_second`.
    dropped_below: u64,
    by_second: BTreeMap<u64, HashSet<u32>>,
    /// Ids in `by_second`.
    kept: usize,
}

/// What memory says of a candidate id.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Taken {
    Yes,
    No,
    /// Memory cannot tell: read the store.
    AskTheStore,
}

impl IssuedIds {
    /// A job of submit second `second` (None: an id of an older format,
    /// which never collides with a new one) was loaded from the store.
    pub(super) fn loaded(&mut self, second: Option<u64>) {
        if let Some(second) = second {
            self.trusted_from = self.trusted_from.max(second.saturating_add(1));
        }
    }

    pub(super) fn check(&self, second: u64, random: u32) -> Taken {
        if second < self.trusted_from.max(self.dropped_below) {
            return Taken::AskTheStore;
        }
        match self.by_second.get(&second) {
            Some(ids) if ids.contains(&random) => Taken::Yes,
            _ => Taken::No,
        }
    }

    /// Remembers an id this controller issued; forgets seconds older than
    /// [`KEPT_SECONDS`] before the latest.
    pub(super) fn issued(&mut self, second: u64, random: u32) {
        if self.by_second.entry(second).or_default().insert(random) {
            self.kept += 1;
        }
        let Some(&latest) = self.by_second.keys().next_back() else {
            return;
        };
        let keep_from = latest.saturating_sub(KEPT_SECONDS - 1);
        while let Some(entry) = self.by_second.first_entry() {
            if *entry.key() >= keep_from && self.kept <= MAX_KEPT_IDS {
                break;
            }
            self.dropped_below = self.dropped_below.max(entry.key() + 1);
            self.kept -= entry.remove().len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_up_to_the_latest_loaded_one_are_checked_in_the_store() {
        let mut ids = IssuedIds::default();
        ids.loaded(Some(100));
        ids.loaded(None);
        ids.loaded(Some(90));
        assert_eq!(ids.check(100, 7), Taken::AskTheStore);
        assert_eq!(ids.check(50, 7), Taken::AskTheStore);
        assert_eq!(ids.check(101, 7), Taken::No);
        ids.issued(101, 7);
        assert_eq!(ids.check(101, 7), Taken::Yes);
        assert_eq!(ids.check(101, 8), Taken::No);
        assert_eq!(ids.check(102, 7), Taken::No);
    }

    #[test]
    fn a_second_whose_ids_were_forgotten_is_checked_in_the_store() {
        let mut ids = IssuedIds::default();
        ids.issued(10, 1);
        ids.issued(13, 2);
        // 10 is still within the 4 seconds kept.
        assert_eq!(ids.check(10, 1), Taken::Yes);
        ids.issued(14, 3);
        assert_eq!(ids.check(10, 1), Taken::AskTheStore);
        assert_eq!(ids.check(11, 1), Taken::No);
        assert_eq!(ids.check(14, 3), Taken::Yes);
        // A clock stepped far back: the store decides.
        assert_eq!(ids.check(5, 9), Taken::AskTheStore);
        assert!(ids.by_second.len() <= KEPT_SECONDS as usize);
    }

    #[test]
    fn past_the_most_ids_kept_the_oldest_seconds_go_to_the_store() {
        let mut ids = IssuedIds::default();
        for n in 0..MAX_KEPT_IDS as u32 {
            ids.issued(20, n);
        }
        assert_eq!(ids.check(20, 0), Taken::Yes);
        ids.issued(21, 0);
        assert_eq!(ids.kept, 1);
        assert_eq!(ids.check(20, 0), Taken::AskTheStore);
        assert_eq!(ids.check(21, 0), Taken::Yes);
        // Even the current second, when it alone holds too many.
        for n in 1..=MAX_KEPT_IDS as u32 {
            ids.issued(21, n);
        }
        assert_eq!(ids.kept, 0);
        assert_eq!(ids.check(21, 5), Taken::AskTheStore);
    }
}
