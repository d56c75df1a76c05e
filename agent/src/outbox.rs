//! The agent's store-and-forward outbox: every sequenced event for the
//! controller (telemetry batches, workload status changes) is written here
//! first and stays until the controller acknowledges its sequence number.
//! After a partition, or an agent restart, whatever is still here is sent
//! again in sequence order; the controller drops what it already applied.
//!
//! One sled tree keyed by the big-endian seq, so iteration order is send
//! order. Each value is one kind byte followed by the encoded
//! `AgentMessage`. The tree is bounded in bytes: when an append goes over,
//! the oldest telemetry is dropped (and counted) until it fits. Status
//! events are never dropped; if only they are left and the bound is still
//! exceeded they are kept, and a warning says so.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use gpufleet_proto::v1::AgentMessage;
use gpufleet_proto::v1::agent_message::Body;
use prost::Message as _;
use tokio::sync::Notify;
use tracing::warn;

/// Name of the outbox tree in the agent's sled database.
pub const TREE: &str = "outbox";

const KIND_STATUS: u8 = 1;
const KIND_TELEMETRY: u8 = 2;
const KEY_BYTES: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("the agent's outbox store failed: {0}")]
    Store(#[from] sled::Error),
    #[error("only telemetry and workload status go through the outbox")]
    NotSequenced,
}

/// Sizes and counters, for `/metrics` and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Bytes held (keys and values).
    pub bytes: u64,
    /// Events held, not yet acknowledged.
    pub events: u64,
    /// How many of them are workload status events.
    pub status_events: u64,
    /// Telemetry events dropped to stay within the bound, since start.
    pub dropped_events: u64,
    /// GPU samples in those dropped events.
    pub dropped_samples: u64,
    /// GPU samples appended, since start.
    pub appended_samples: u64,
}

#[derive(Debug, Default)]
struct Held {
    bytes: u64,
    events: u64,
    status_events: u64,
    /// Seq the next append gets.
    next_seq: u64,
    /// Whether the last append found only status events over the bound
    /// (so the warning is logged once per episode, not per append).
    over_with_status_only: bool,
}

/// See the module docs.
#[derive(Debug)]
pub struct Outbox {
    tree: sled::Tree,
    max_bytes: u64,
    /// Appends and acks both change `held` and the tree together.
    held: Mutex<Held>,
    dropped_events: AtomicU64,
    dropped_samples: AtomicU64,
    appended_samples: AtomicU64,
    appended: Notify,
}

fn seq_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

fn kind_of(body: &Body) -> Option<u8> {
    match body {
        Body::Telemetry(_) => Some(KIND_TELEMETRY),
        Body::WorkloadStatus(_) => Some(KIND_STATUS),
        Body::Hello(_) | Body::LogResponse(_) => None,
    }
}

impl Outbox {
    /// Opens (or creates) the outbox tree of `db`. The first new event gets
    /// a seq above both `min_seq` and everything already stored.
    pub fn open(db: &sled::Db, max_bytes: u64, min_seq: u64) -> Result<Self, OutboxError> {
        let tree = db.open_tree(TREE)?;
        let mut held = Held::default();
        let mut last = 0;
        for entry in tree.iter() {
            let (key, value) = entry?;
            let Some(seq) = seq_of(&key) else {
                // Not written by this code: nothing to send, so not fatal.
                warn!(
                    key_bytes = key.len(),
                    "outbox key is not a seq; deleting it"
                );
                tree.remove(&key)?;
                continue;
            };
            held.bytes += KEY_BYTES + value.len() as u64;
            held.events += 1;
            held.status_events += u64::from(value.first() == Some(&KIND_STATUS));
            last = seq;
        }
        held.next_seq = min_seq.max(last.saturating_add(1));
        Ok(Self {
            tree,
            max_bytes,
            held: Mutex::new(held),
            dropped_events: AtomicU64::new(0),
            dropped_samples: AtomicU64::new(0),
            appended_samples: AtomicU64::new(0),
            appended: Notify::new(),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores one event under the next seq and returns that seq. Status
    /// events are flushed to disk before returning; telemetry rides on
    /// sled's periodic flush.
    pub fn append(&self, body: Body) -> Result<u64, OutboxError> {
        let (seq, kind) = self.insert(body)?;
        if kind == KIND_STATUS {
            self.tree.flush()?;
        }
        self.appended.notify_waiters();
        Ok(seq)
    }

    /// Stores events under consecutive seqs, in order, like [`Outbox::append`]
    /// but with one flush for the lot: a burst of status changes costs one
    /// disk sync, not one each.
    pub fn append_all(&self, bodies: impl IntoIterator<Item = Body>) -> Result<(), OutboxError> {
        let mut any_status = false;
        for body in bodies {
            let (_, kind) = self.insert(body)?;
            any_status |= kind == KIND_STATUS;
        }
        if any_status {
            self.tree.flush()?;
        }
        self.appended.notify_waiters();
        Ok(())
    }

    /// Puts one event in the tree under the next seq (not flushed, not yet
    /// announced); returns its seq and kind.
    fn insert(&self, body: Body) -> Result<(u64, u8), OutboxError> {
        let kind = kind_of(&body).ok_or(OutboxError::NotSequenced)?;
        let samples = match &body {
            Body::Telemetry(batch) => batch.samples.len() as u64,
            _ => 0,
        };
        let mut held = self.held();
        let seq = held.next_seq;
        let message = AgentMessage {
            seq,
            body: Some(body),
        };
        let mut value = Vec::with_capacity(1 + message.encoded_len());
        value.push(kind);
        value.extend_from_slice(&message.encode_to_vec());
        self.tree.insert(seq.to_be_bytes(), value.as_slice())?;
        held.next_seq = seq + 1;
        held.bytes += KEY_BYTES + value.len() as u64;
        held.events += 1;
        held.status_events += u64::from(kind == KIND_STATUS);
        if held.bytes > self.max_bytes {
            self.shed_telemetry(&mut held)?;
        }
        drop(held);
        self.appended_samples.fetch_add(samples, Ordering::Relaxed);
        Ok((seq, kind))
    }

    /// Drops the oldest telemetry until the outbox fits its bound.
    fn shed_telemetry(&self, held: &mut Held) -> Result<(), OutboxError> {
        let mut batch = sled::Batch::default();
        let (mut events, mut samples) = (0u64, 0u64);
        for entry in self.tree.iter() {
            if held.bytes <= self.max_bytes {
                break;
            }
            let (key, value) = entry?;
            if value.first() != Some(&KIND_TELEMETRY) {
                continue;
            }
            held.bytes -= KEY_BYTES + value.len() as u64;
            held.events -= 1;
            events += 1;
            // Only for the count; an undecodable entry is dropped all the same.
            if let Ok(AgentMessage {
                body: Some(Body::Telemetry(t)),
                ..
            }) = AgentMessage::decode(&value[1..])
            {
                samples += t.samples.len() as u64;
            }
            batch.remove(key);
        }
        self.tree.apply_batch(batch)?;
        self.dropped_events.fetch_add(events, Ordering::Relaxed);
        self.dropped_samples.fetch_add(samples, Ordering::Relaxed);
        let over = held.bytes > self.max_bytes;
        if over && !held.over_with_status_only {
            warn!(
                bytes = held.bytes,
                max_bytes = self.max_bytes,
                events = held.events,
                "the outbox is over outbox_max_bytes holding only workload status events; they are kept (status is never dropped)"
            );
        }
        held.over_with_status_only = over;
        Ok(())
    }

    /// Up to `limit` held events with a seq above `after`, in seq order.
    /// An entry that cannot be decoded (a damaged disk) is deleted with a
    /// warning rather than blocking every later event.
    pub fn after(&self, after: u64, limit: usize) -> Result<Vec<AgentMessage>, OutboxError> {
        let mut out = Vec::new();
        if after == u64::MAX {
            return Ok(out);
        }
        let start = (after + 1).to_be_bytes();
        let mut corrupt = Vec::new();
        for entry in self.tree.range(start..).take(limit) {
            let (key, value) = entry?;
            match value.get(1..).map(AgentMessage::decode) {
                Some(Ok(message)) => out.push(message),
                Some(Err(e)) => corrupt.push((key, e.to_string())),
                None => corrupt.push((key, "empty value".to_string())),
            }
        }
        for (key, why) in corrupt {
            let seq = seq_of(&key).unwrap_or(0);
            warn!(seq, %why, "outbox entry cannot be decoded; deleting it");
            let mut held = self.held();
            if let Some(value) = self.tree.remove(&key)? {
                held.bytes -= KEY_BYTES + value.len() as u64;
                held.events -= 1;
                held.status_events -= u64::from(value.first() == Some(&KIND_STATUS));
            }
        }
        Ok(out)
    }

    /// The controller applied everything up to `seq`: forget it. Returns
    /// how many events went.
    ///
    /// Removed one key at a time, not as one sled batch: a batch seals
    /// sled's current write buffer and hands it to an IO thread, which
    /// for an ack per event was two thread wake-ups each. Atomicity is not
    /// needed: an acked event that outlives a crash is sent again and the
    /// controller drops it as a duplicate.
    pub fn ack(&self, seq: u64) -> Result<u64, OutboxError> {
        let mut held = self.held();
        let mut removed = 0;
        for entry in self.tree.range(..=seq.to_be_bytes()) {
            let (key, value) = entry?;
            self.tree.remove(&key)?;
            held.bytes -= KEY_BYTES + value.len() as u64;
            held.events -= 1;
            held.status_events -= u64::from(value.first() == Some(&KIND_STATUS));
            removed += 1;
        }
        if removed > 0 && held.bytes <= self.max_bytes {
            held.over_with_status_only = false;
        }
        Ok(removed)
    }

    /// Never hand out a seq at or below `seq` (the controller's last
    /// applied, e.g. after this host's clock went backwards).
    pub fn raise_next_seq(&self, seq: u64) {
        let mut held = self.held();
        held.next_seq = held.next_seq.max(seq.saturating_add(1));
    }

    /// Resolves after the next append (register before checking `after`).
    pub fn appended(&self) -> tokio::sync::futures::Notified<'_> {
        self.appended.notified()
    }

    pub fn stats(&self) -> OutboxStats {
        let held = self.held();
        OutboxStats {
            bytes: held.bytes,
            events: held.events,
            status_events: held.status_events,
            dropped_events: self.dropped_events.load(Ordering::Relaxed),
            dropped_samples: self.dropped_samples.load(Ordering::Relaxed),
            appended_samples: self.appended_samples.load(Ordering::Relaxed),
        }
    }

    /// Writes everything to disk (at shutdown).
    pub fn flush(&self) -> Result<(), OutboxError> {
        self.tree.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::{GpuSample, TelemetryBatch, WorkloadState, WorkloadStatus};

    fn db(dir: &tempfile::TempDir) -> sled::Db {
        sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap()
    }

    fn telemetry(n: usize) -> Body {
        Body::Telemetry(TelemetryBatch {
            samples: (0..n)
                .map(|i| GpuSample {
                    uuid: format!("GPU-{i}"),
                    ..Default::default()
                })
                .collect(),
        })
    }

    fn status(id: &str) -> Body {
        Body::WorkloadStatus(WorkloadStatus {
            allocation_id: id.into(),
            state: WorkloadState::Running as i32,
            ..Default::default()
        })
    }

    fn seqs(outbox: &Outbox) -> Vec<u64> {
        outbox
            .after(0, usize::MAX)
            .unwrap()
            .iter()
            .map(|m| m.seq)
            .collect()
    }

    fn size_of(body: Body) -> u64 {
        // Seqs in these tests stay below 128: a one-byte varint.
        let m = AgentMessage {
            seq: 1,
            body: Some(body),
        };
        KEY_BYTES + 1 + m.encoded_len() as u64
    }

    #[test]
    fn events_come_back_in_seq_order_until_acked() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&db(&dir), 1 << 20, 100).unwrap();
        let a = outbox.append(telemetry(2)).unwrap();
        let b = outbox.append(status("x")).unwrap();
        let c = outbox.append(telemetry(1)).unwrap();
        assert_eq!((a, b, c), (100, 101, 102));
        assert_eq!(seqs(&outbox), [100, 101, 102]);
        assert_eq!(
            outbox.after(100, 1).unwrap()[0].body,
            Some(status("x")),
            "after() starts above the given seq"
        );
        assert_eq!(outbox.ack(101).unwrap(), 2);
        assert_eq!(seqs(&outbox), [102]);
        let stats = outbox.stats();
        assert_eq!(stats.events, 1);
        assert_eq!(stats.bytes, size_of(telemetry(1)));
        assert_eq!(stats.appended_samples, 3);
        assert_eq!(outbox.ack(102).unwrap(), 1);
        assert_eq!(outbox.stats().bytes, 0);
        assert!(matches!(
            outbox.append(Body::LogResponse(Default::default())),
            Err(OutboxError::NotSequenced)
        ));
    }

    #[test]
    fn a_burst_is_stored_in_order_under_consecutive_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&db(&dir), 1 << 20, 10).unwrap();
        outbox.append(telemetry(1)).unwrap();
        outbox
            .append_all([status("a"), status("b"), telemetry(2)])
            .unwrap();
        let stored = outbox.after(0, usize::MAX).unwrap();
        let got: Vec<_> = stored.iter().map(|m| (m.seq, m.body.clone())).collect();
        assert_eq!(
            got,
            [
                (10, Some(telemetry(1))),
                (11, Some(status("a"))),
                (12, Some(status("b"))),
                (13, Some(telemetry(2))),
            ]
        );
        assert_eq!(outbox.stats().status_events, 2);
        assert!(matches!(
            outbox.append_all([status("c"), Body::LogResponse(Default::default())]),
            Err(OutboxError::NotSequenced)
        ));
    }

    #[test]
    fn over_the_bound_the_oldest_telemetry_goes_and_status_stays() {
        let dir = tempfile::tempdir().unwrap();
        let one = size_of(telemetry(4));
        // Room for three telemetry events and the status event.
        let bound = 3 * one + size_of(status("s"));
        let outbox = Outbox::open(&db(&dir), bound, 1).unwrap();
        outbox.append(telemetry(4)).unwrap(); // 1
        outbox.append(status("s")).unwrap(); // 2
        outbox.append(telemetry(4)).unwrap(); // 3
        outbox.append(telemetry(4)).unwrap(); // 4
        assert_eq!(outbox.stats().dropped_events, 0);
        outbox.append(telemetry(4)).unwrap(); // 5: seq 1 goes
        assert_eq!(seqs(&outbox), [2, 3, 4, 5]);
        outbox.append(telemetry(4)).unwrap(); // 6: seq 3 goes, not the status
        assert_eq!(seqs(&outbox), [2, 4, 5, 6]);
        let stats = outbox.stats();
        assert_eq!((stats.dropped_events, stats.dropped_samples), (2, 8));
        assert!(stats.bytes <= bound);
    }

    #[test]
    fn status_events_are_kept_even_over_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(&db(&dir), 1, 1).unwrap();
        outbox.append(status("a")).unwrap();
        outbox.append(telemetry(1)).unwrap();
        outbox.append(status("b")).unwrap();
        // The telemetry went; both status events stay though over the bound.
        assert_eq!(seqs(&outbox), [1, 3]);
        let stats = outbox.stats();
        assert_eq!((stats.events, stats.status_events), (2, 2));
        assert_eq!(stats.dropped_events, 1);
        assert!(stats.bytes > 1);
        outbox.ack(3).unwrap();
        assert_eq!(outbox.stats().events, 0);
    }

    #[test]
    fn an_undecodable_entry_is_deleted_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let db = db(&dir);
        let outbox = Outbox::open(&db, 1 << 20, 1).unwrap();
        outbox.append(telemetry(1)).unwrap();
        outbox.append(telemetry(1)).unwrap();
        // Damage entry 1 and add a stray key behind the outbox's back.
        let tree = db.open_tree(TREE).unwrap();
        tree.insert(1u64.to_be_bytes(), &[KIND_TELEMETRY, 0xff, 0xff][..])
            .unwrap();
        tree.insert(b"junk", &b"x"[..]).unwrap();
        let outbox = Outbox::open(&db, 1 << 20, 1).unwrap();
        assert_eq!(outbox.stats().events, 2);
        assert_eq!(seqs(&outbox), [2]);
        assert_eq!(outbox.stats().events, 1);
        assert_eq!(outbox.stats().bytes, size_of(telemetry(1)));
        assert!(!tree.contains_key(b"junk").unwrap());
    }

    #[test]
    fn events_survive_a_reopen_and_seqs_keep_rising() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = db(&dir);
            let outbox = Outbox::open(&db, 1 << 20, 50).unwrap();
            outbox.append(telemetry(1)).unwrap();
            outbox.append(status("a")).unwrap();
            outbox.append(telemetry(1)).unwrap();
            outbox.ack(50).unwrap();
            outbox.flush().unwrap();
        }
        let db = db(&dir);
        // A lower starting point (clock went back) never reuses a seq.
        let outbox = Outbox::open(&db, 1 << 20, 10).unwrap();
        assert_eq!(seqs(&outbox), [51, 52]);
        assert_eq!(outbox.stats().events, 2);
        assert_eq!(outbox.stats().status_events, 1);
        assert_eq!(
            outbox.stats().bytes,
            size_of(status("a")) + size_of(telemetry(1))
        );
        assert_eq!(outbox.append(telemetry(1)).unwrap(), 53);
        outbox.raise_next_seq(1000);
        assert_eq!(outbox.append(telemetry(1)).unwrap(), 1001);
    }
}
