//! The queue of finished minutes between flushes: node-minute records
//! by (minute, node), bounded by dropping the oldest first.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::telemetry::codec::NodeMinute;

/// Finished minutes waiting for the next flush, already encoded, by
/// (minute, node) so that the oldest go first when the queue is full.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) records: BTreeMap<(u64, Arc<str>), NodeMinute>,
    pub(super) gpu_minutes: usize,
}

impl Pending {
    pub(super) fn add(&mut self, record: NodeMinute) {
        self.gpu_minutes += record.gpu_minutes;
        match self.records.entry((record.minute, record.node_id.clone())) {
            std::collections::btree_map::Entry::Occupied(mut queued) => {
                queued.get_mut().append(&record)
            }
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(record);
            }
        }
    }

    /// Drops the oldest records beyond `limit` GPU-minutes; returns how
    /// many GPU-minutes went.
    pub(super) fn trim(&mut self, limit: usize) -> usize {
        let mut dropped = 0;
        while self.gpu_minutes > limit
            && let Some((_, oldest)) = self.records.pop_first()
        {
            self.gpu_minutes -= oldest.gpu_minutes;
            dropped += oldest.gpu_minutes;
        }
        dropped
    }

    /// Removes and returns up to `limit` records, oldest minute first.
    pub(super) fn take_oldest(&mut self, limit: usize) -> Vec<NodeMinute> {
        if limit >= self.records.len() {
            self.gpu_minutes = 0;
            return std::mem::take(&mut self.records).into_values().collect();
        }
        let mut taken = Vec::with_capacity(limit);
        while taken.len() < limit
            && let Some((_, record)) = self.records.pop_first()
        {
            self.gpu_minutes -= record.gpu_minutes;
            taken.push(record);
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::rollup::Rollup;
    use crate::telemetry::test_support::{finished, sample, t0};

    #[test]
    fn a_full_queue_drops_its_oldest_minutes_first() {
        let mut pending = Pending::default();
        let r = |minute| {
            let mut r = Rollup::new(minute);
            r.add(&sample("GPU-a", t0(), 1, 1));
            r
        };
        for (node, minute) in [("n2", 7), ("n1", 5), ("n1", 6), ("n1", 5)] {
            let uuid = if minute == 5 && node == "n1" && pending.gpu_minutes > 0 {
                "GPU-b"
            } else {
                "GPU-a"
            };
            for record in NodeMinute::group(&[finished(node, uuid, &r(minute))]) {
                pending.add(record);
            }
        }
        // n1's minute 5 holds two GPUs, queued at different times.
        assert_eq!(pending.gpu_minutes, 4);
        assert_eq!(pending.trim(3), 2);
        assert_eq!(pending.gpu_minutes, 2);
        let oldest: Vec<(u64, String)> = pending
            .take_oldest(1)
            .iter()
            .map(|r| (r.minute, r.node_id.to_string()))
            .collect();
        assert_eq!(oldest, [(6, "n1".to_string())]);
        assert_eq!(pending.gpu_minutes, 1);
        let left: Vec<(u64, String)> = pending
            .take_oldest(usize::MAX)
            .iter()
            .map(|r| (r.minute, r.node_id.to_string()))
            .collect();
        assert_eq!(left, [(7, "n2".to_string())]);
        assert_eq!(pending.gpu_minutes, 0);
    }
}
