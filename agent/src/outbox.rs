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
//!
//! When the disk refuses a write (full), the outbox degrades instead of
//! failing: status events are held in memory (bounded by
//! [`MAX_UNWRITTEN_BYTES`]) and sent from there, telemetry is dropped and
//! counted. sled 0.34 refuses every write after one failed until the
//! database is opened again, so [`Outbox::keep_recovering`] probes the
//! disk with a test file and, once it takes writes, reopens the database
//! and writes again what the old handle and memory held.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpufleet_proto::v1::AgentMessage;
use gpufleet_proto::v1::agent_message::Body;
use prost::Message as _;
use tokio::sync::{Notify, watch};
use tracing::{debug, error, info, warn};

use crate::store;

/// Name of the outbox tree in the agent's sled database.
pub const TREE: &str = "outbox";

/// Most bytes of status events held in memory while the disk refuses
/// them; over it the oldest go (the hello after a reconnect carries every
/// workload's current status anyway).
pub const MAX_UNWRITTEN_BYTES: u64 = 8 << 20;

/// First and longest wait between attempts to write to the disk again.
const RECOVER_FIRST_WAIT: Duration = Duration::from_millis(250);
const RECOVER_MAX_WAIT: Duration = Duration::from_secs(2);

const KIND_STATUS: u8 = 1;
const KIND_TELEMETRY: u8 = 2;
const KEY_BYTES: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("the agent's outbox store failed: {0}")]
    Store(#[from] sled::Error),
    #[error(transparent)]
    Open(#[from] store::OpenError),
    #[error("only telemetry and workload status go through the outbox")]
    NotSequenced,
}

/// Sizes and counters, for `/metrics` and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Bytes held on disk (keys and values).
    pub bytes: u64,
    /// Events held on disk, not yet acknowledged.
    pub events: u64,
    /// How many of them are workload status events.
    pub status_events: u64,
    /// Telemetry events dropped to stay within the bound, since start.
    pub dropped_events: u64,
    /// GPU samples in those dropped events.
    pub dropped_samples: u64,
    /// GPU samples appended, since start.
    pub appended_samples: u64,
    /// Whether writes to the disk fail now (status events wait in memory).
    pub degraded: bool,
    /// Writes to the disk that failed, since start.
    pub write_failures: u64,
    /// Times the database was reopened after failed writes, since start.
    pub reopens: u64,
    /// Status events held only in memory, not yet acknowledged.
    pub unwritten_events: u64,
    /// Telemetry events dropped because the disk refused them, since start.
    pub unwritten_dropped_telemetry: u64,
    /// Status events dropped because memory held [`MAX_UNWRITTEN_BYTES`].
    pub unwritten_dropped_status: u64,
}

struct Opened {
    db: sled::Db,
    tree: sled::Tree,
}

#[derive(Default)]
struct Held {
    bytes: u64,
    events: u64,
    status_events: u64,
    /// Seq the next append gets.
    next_seq: u64,
    /// Whether the last append found only status events over the bound
    /// (so the warning is logged once per episode, not per append).
    over_with_status_only: bool,
    /// The database; None only while a reopen could not open it.
    open: Option<Opened>,
    /// Status events the disk refused, by seq (values as in the tree).
    unwritten: BTreeMap<u64, Vec<u8>>,
    unwritten_bytes: u64,
}

/// See the module docs.
pub struct Outbox {
    data_dir: PathBuf,
    max_bytes: u64,
    /// Appends, acks and reopens change `held` and the tree together.
    held: Mutex<Held>,
    dropped_events: AtomicU64,
    dropped_samples: AtomicU64,
    appended_samples: AtomicU64,
    write_failures: AtomicU64,
    reopens: AtomicU64,
    unwritten_dropped_telemetry: AtomicU64,
    unwritten_dropped_status: AtomicU64,
    appended: Notify,
    /// Why writes fail now (None: they work).
    failing: watch::Sender<Option<Arc<str>>>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("data_dir", &self.data_dir)
            .field("stats", &self.stats())
            .finish()
    }
}

fn seq_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

fn kind_of(body: &Body) -> Option<u8> {
    match body {
        Body::Telemetry(_) => Some(KIND_TELEMETRY),
        // An interruption notice is never dropped, like a status.
        Body::WorkloadStatus(_) | Body::InterruptionNotice(_) => Some(KIND_STATUS),
        Body::Hello(_) | Body::LogResponse(_) => None,
    }
}

/// Bytes, events and status events in `tree`; deletes keys that are not
/// seqs (not written by this code: nothing to send). Returns the last seq.
fn count(tree: &sled::Tree, held: &mut Held) -> Result<u64, sled::Error> {
    let (mut bytes, mut events, mut status_events, mut last) = (0, 0, 0, 0);
    for entry in tree.iter() {
        let (key, value) = entry?;
        let Some(seq) = seq_of(&key) else {
            warn!(
                key_bytes = key.len(),
                "outbox key is not a seq; deleting it"
            );
            tree.remove(&key)?;
            continue;
        };
        bytes += KEY_BYTES + value.len() as u64;
        events += 1;
        status_events += u64::from(value.first() == Some(&KIND_STATUS));
        last = seq;
    }
    (held.bytes, held.events, held.status_events) = (bytes, events, status_events);
    Ok(last)
}

impl Outbox {
    /// Opens (or creates) the agent's database in `data_dir` and its outbox
    /// tree. The first new event gets a seq above both `min_seq` and
    /// everything already stored. Blocks; call it off the async workers.
    pub fn open(data_dir: &Path, max_bytes: u64, min_seq: u64) -> Result<Self, OutboxError> {
        let db = store::open(data_dir)?;
        let tree = db.open_tree(TREE)?;
        let mut held = Held::default();
        let last = count(&tree, &mut held)?;
        held.next_seq = min_seq.max(last.saturating_add(1));
        held.open = Some(Opened { db, tree });
        Ok(Self {
            data_dir: data_dir.to_path_buf(),
            max_bytes,
            held: Mutex::new(held),
            dropped_events: AtomicU64::new(0),
            dropped_samples: AtomicU64::new(0),
            appended_samples: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
            reopens: AtomicU64::new(0),
            unwritten_dropped_telemetry: AtomicU64::new(0),
            unwritten_dropped_status: AtomicU64::new(0),
            appended: Notify::new(),
            failing: watch::channel(None).0,
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why writes to the disk fail now; None while they work.
    pub fn failing(&self) -> Option<Arc<str>> {
        self.failing.borrow().clone()
    }

    /// A write failed: degrade (once per episode in the log).
    fn write_failed(&self, error: &sled::Error) {
        self.write_failures.fetch_add(1, Ordering::Relaxed);
        let reason: Arc<str> = store::name_full_disk(format!(
            "the agent's outbox cannot write to {}: {error}",
            self.data_dir.display()
        ))
        .into();
        self.failing.send_if_modified(|now| {
            if now.is_some() {
                return false;
            }
            error!(%reason, "outbox writes fail; workload status events wait in memory and telemetry is dropped until the disk takes writes again");
            *now = Some(reason);
            true
        });
    }

    /// Stores one event under the next seq and returns that seq. Status
    /// events are flushed to disk before returning; telemetry rides on
    /// sled's periodic flush. While the disk refuses writes, status events
    /// are held in memory and telemetry is dropped (see the module docs).
    pub fn append(&self, body: Body) -> Result<u64, OutboxError> {
        let (seq, flush) = self.insert(body)?;
        if let Some(tree) = flush
            && let Err(e) = tree.flush()
        {
            // The event stays in the old handle's memory; a reopen writes it.
            self.write_failed(&e);
        }
        self.appended.notify_waiters();
        Ok(seq)
    }

    /// Stores events under consecutive seqs, in order, like [`Outbox::append`]
    /// but with one flush for the lot: a burst of status changes costs one
    /// disk sync, not one each.
    pub fn append_all(&self, bodies: impl IntoIterator<Item = Body>) -> Result<(), OutboxError> {
        let mut flush = None;
        let mut result = Ok(());
        for body in bodies {
            match self.insert(body) {
                Ok((_, tree)) => flush = flush.or(tree),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if let Some(tree) = flush
            && let Err(e) = tree.flush()
        {
            self.write_failed(&e);
        }
        self.appended.notify_waiters();
        result
    }

    /// Puts one event in the tree under the next seq (not flushed, not yet
    /// announced), or in memory while writes fail; returns its seq and the
    /// tree to flush (a status event written to the tree).
    fn insert(&self, body: Body) -> Result<(u64, Option<sled::Tree>), OutboxError> {
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
        held.next_seq = seq + 1;
        self.appended_samples.fetch_add(samples, Ordering::Relaxed);
        let tree = match &held.open {
            Some(open) if self.failing.borrow().is_none() => open.tree.clone(),
            _ => {
                self.hold_in_memory(&mut held, seq, value);
                return Ok((seq, None));
            }
        };
        if let Err(e) = tree.insert(seq.to_be_bytes(), value.as_slice()) {
            self.write_failed(&e);
            self.hold_in_memory(&mut held, seq, value);
            return Ok((seq, None));
        }
        held.bytes += KEY_BYTES + value.len() as u64;
        held.events += 1;
        held.status_events += u64::from(kind == KIND_STATUS);
        if held.bytes > self.max_bytes {
            self.shed_telemetry(&tree, &mut held)?;
        }
        Ok((seq, (kind == KIND_STATUS).then_some(tree)))
    }

    /// Keeps a status event the disk refused in memory (bounded); drops
    /// telemetry.
    fn hold_in_memory(&self, held: &mut Held, seq: u64, value: Vec<u8>) {
        if value.first() != Some(&KIND_STATUS) {
            self.unwritten_dropped_telemetry
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        held.unwritten_bytes += KEY_BYTES + value.len() as u64;
        held.unwritten.insert(seq, value);
        while held.unwritten_bytes > MAX_UNWRITTEN_BYTES && held.unwritten.len() > 1 {
            let Some((_, oldest)) = held.unwritten.pop_first() else {
                break;
            };
            held.unwritten_bytes -= KEY_BYTES + oldest.len() as u64;
            if self
                .unwritten_dropped_status
                .fetch_add(1, Ordering::Relaxed)
                == 0
            {
                warn!(
                    max_bytes = MAX_UNWRITTEN_BYTES,
                    "workload status events held in memory while the disk is full reached their bound; dropping the oldest (the hello after a reconnect carries every current status)"
                );
            }
        }
    }

    /// Drops the oldest telemetry until the outbox fits its bound.
    fn shed_telemetry(&self, tree: &sled::Tree, held: &mut Held) -> Result<(), OutboxError> {
        let mut batch = sled::Batch::default();
        let (mut bytes, mut events, mut samples) = (held.bytes, 0u64, 0u64);
        for entry in tree.iter() {
            if bytes <= self.max_bytes {
                break;
            }
            let (key, value) = entry?;
            if value.first() != Some(&KIND_TELEMETRY) {
                continue;
            }
            bytes -= KEY_BYTES + value.len() as u64;
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
        if let Err(e) = tree.apply_batch(batch) {
            // Nothing was dropped; the reopen after recovery sheds again.
            self.write_failed(&e);
            return Ok(());
        }
        held.bytes = bytes;
        held.events -= events;
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

    /// Up to `limit` held events with a seq above `after`, in seq order:
    /// from the disk and from memory (status events the disk refused).
    /// An entry that cannot be decoded (a damaged disk) is deleted with a
    /// warning rather than blocking every later event.
    pub fn after(&self, after: u64, limit: usize) -> Result<Vec<AgentMessage>, OutboxError> {
        if after == u64::MAX {
            return Ok(Vec::new());
        }
        let mut held = self.held();
        let mut found = BTreeMap::new();
        let mut corrupt = Vec::new();
        let from_disk = held.open.as_ref().map(|open| open.tree.clone());
        let decode = |value: &[u8]| match value.get(1..).map(AgentMessage::decode) {
            Some(Ok(message)) => Ok(message),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("empty value".to_string()),
        };
        if let Some(tree) = &from_disk {
            for entry in tree.range((after + 1).to_be_bytes()..).take(limit) {
                let (key, value) = entry?;
                match decode(&value) {
                    Ok(message) => {
                        found.insert(message.seq, message);
                    }
                    Err(why) => corrupt.push((key, why)),
                }
            }
        }
        for (_, value) in held.unwritten.range(after + 1..).take(limit) {
            if let Ok(message) = decode(value) {
                found.insert(message.seq, message);
            }
        }
        if let Some(tree) = &from_disk {
            for (key, why) in corrupt {
                let seq = seq_of(&key).unwrap_or(0);
                warn!(seq, %why, "outbox entry cannot be decoded; deleting it");
                match tree.remove(&key) {
                    Ok(Some(value)) => {
                        held.bytes -= KEY_BYTES + value.len() as u64;
                        held.events -= 1;
                        held.status_events -= u64::from(value.first() == Some(&KIND_STATUS));
                    }
                    Ok(None) => {}
                    Err(e) => self.write_failed(&e),
                }
            }
        }
        Ok(found.into_values().take(limit).collect())
    }

    /// The controller applied everything up to `seq`: forget it. Returns
    /// how many events went.
    ///
    /// Removed one key at a time, not as one sled batch: a batch seals
    /// sled's current write buffer and hands it to an IO thread, which
    /// for an ack per event was two thread wake-ups each. Atomicity is not
    /// needed: an acked event that outlives a crash (or a failed removal)
    /// is sent again and the controller drops it as a duplicate.
    pub fn ack(&self, seq: u64) -> Result<u64, OutboxError> {
        let mut held = self.held();
        let mut removed = 0;
        let still_held = held.unwritten.split_off(&seq.saturating_add(1));
        for value in std::mem::replace(&mut held.unwritten, still_held).into_values() {
            held.unwritten_bytes -= KEY_BYTES + value.len() as u64;
            removed += 1;
        }
        if let Some(tree) = held.open.as_ref().map(|open| open.tree.clone()) {
            for entry in tree.range(..=seq.to_be_bytes()) {
                let (key, value) = entry?;
                if let Err(e) = tree.remove(&key) {
                    self.write_failed(&e);
                    break;
                }
                held.bytes -= KEY_BYTES + value.len() as u64;
                held.events -= 1;
                held.status_events -= u64::from(value.first() == Some(&KIND_STATUS));
                removed += 1;
            }
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
            degraded: self.failing.borrow().is_some(),
            write_failures: self.write_failures.load(Ordering::Relaxed),
            reopens: self.reopens.load(Ordering::Relaxed),
            unwritten_events: held.unwritten.len() as u64,
            unwritten_dropped_telemetry: self.unwritten_dropped_telemetry.load(Ordering::Relaxed),
            unwritten_dropped_status: self.unwritten_dropped_status.load(Ordering::Relaxed),
        }
    }

    /// Writes everything to disk (at shutdown). While writes fail, says
    /// why: the status events held in memory are lost with the process
    /// (the next hello carries the workloads' current statuses).
    pub fn flush(&self) -> Result<(), OutboxError> {
        if let Some(why) = self.failing() {
            let unwritten = self.held().unwritten.len();
            warn!(unwritten, %why, "status events held in memory are not on disk at shutdown");
        }
        let tree = self.held().open.as_ref().map(|open| open.tree.clone());
        if let Some(tree) = tree {
            tree.flush()?;
        }
        Ok(())
    }

    /// While writes fail: once a test file shows the disk has room, reopens
    /// the database and writes again what the old handle held (sled may
    /// have lost its unflushed part) and what memory held. `Ok(false)`:
    /// nothing was failing; an error says why not yet. Blocks.
    pub fn recover(&self) -> Result<bool, String> {
        if self.failing().is_none() {
            return Ok(false);
        }
        store::probe_room(&self.data_dir).map_err(|e| {
            store::name_full_disk(format!(
                "cannot write a test file to {}: {e}",
                self.data_dir.display()
            ))
        })?;
        let mut held = self.held();
        // What the old handle holds, read before it is closed (sled's reads
        // work after a failed write).
        let mut pending: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        if let Some(old) = held.open.take() {
            for (key, value) in old.tree.iter().flatten() {
                if let Some(seq) = seq_of(&key) {
                    pending.insert(seq, value.to_vec());
                }
            }
            // The old database must be gone (its file lock released) first.
            drop(old);
        }
        pending.append(&mut held.unwritten);
        held.unwritten_bytes = 0;
        (held.bytes, held.events, held.status_events) = (0, 0, 0);
        let reopened = store::open(&self.data_dir)
            .map_err(|e| e.to_string())
            .and_then(|db| {
                let tree = db.open_tree(TREE).map_err(|e| e.to_string())?;
                Ok(Opened { db, tree })
            });
        let written = reopened.and_then(|open| {
            let mut batch = sled::Batch::default();
            for (seq, value) in &pending {
                batch.insert(&seq.to_be_bytes(), value.as_slice());
            }
            let stored = open
                .tree
                .apply_batch(batch)
                .and_then(|()| open.db.flush().map(|_| ()))
                .and_then(|()| count(&open.tree, &mut held).map(|_| ()));
            held.open = Some(open);
            stored.map_err(|e| e.to_string())
        });
        if let Err(why) = written {
            // Memory holds the status events until the next attempt.
            for (seq, value) in pending {
                self.hold_in_memory(&mut held, seq, value);
            }
            self.write_failures.fetch_add(1, Ordering::Relaxed);
            return Err(store::name_full_disk(format!(
                "cannot reopen the agent's database in {}: {why}",
                self.data_dir.display()
            )));
        }
        if held.bytes > self.max_bytes
            && let Some(tree) = held.open.as_ref().map(|open| open.tree.clone())
        {
            // A read error leaves it over the bound until the next append.
            let _ = self.shed_telemetry(&tree, &mut held);
        }
        drop(held);
        self.reopens.fetch_add(1, Ordering::Relaxed);
        self.failing.send_replace(None);
        info!(dir = %self.data_dir.display(), "outbox writes work again (database reopened)");
        self.appended.notify_waiters();
        Ok(true)
    }

    /// Runs [`Outbox::recover`] whenever writes fail, with a growing pause
    /// between attempts, until `shutdown`.
    pub async fn keep_recovering(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut failing = self.failing.subscribe();
        loop {
            tokio::select! {
                changed = failing.wait_for(Option::is_some) => if changed.is_err() { return },
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let mut wait = RECOVER_FIRST_WAIT;
            while self.failing().is_some() {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                let this = self.clone();
                match tokio::task::spawn_blocking(move || this.recover()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(why)) => debug!(%why, "outbox writes still fail"),
                    Err(e) => warn!(error = %e, "recovering the outbox panicked"),
                }
                wait = (wait * 2).min(RECOVER_MAX_WAIT);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::{GpuSample, TelemetryBatch, WorkloadState, WorkloadStatus};

    fn open(dir: &tempfile::TempDir, max_bytes: u64, min_seq: u64) -> Outbox {
        Outbox::open(dir.path(), max_bytes, min_seq).unwrap()
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
        let outbox = open(&dir, 1 << 20, 100);
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
        let outbox = open(&dir, 1 << 20, 10);
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
        let outbox = open(&dir, bound, 1);
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
        let outbox = open(&dir, 1, 1);
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
        {
            let outbox = open(&dir, 1 << 20, 1);
            outbox.append(telemetry(1)).unwrap();
            outbox.append(telemetry(1)).unwrap();
            outbox.flush().unwrap();
        }
        // Damage entry 1 and add a stray key behind the outbox's back.
        {
            let db = store::open(dir.path()).unwrap();
            let tree = db.open_tree(TREE).unwrap();
            tree.insert(1u64.to_be_bytes(), &[KIND_TELEMETRY, 0xff, 0xff][..])
                .unwrap();
            tree.insert(b"junk", &b"x"[..]).unwrap();
            db.flush().unwrap();
        }
        let outbox = open(&dir, 1 << 20, 1);
        assert_eq!(outbox.stats().events, 2);
        assert_eq!(seqs(&outbox), [2]);
        assert_eq!(outbox.stats().events, 1);
        assert_eq!(outbox.stats().bytes, size_of(telemetry(1)));
        let tree = outbox.held().open.as_ref().unwrap().tree.clone();
        assert!(!tree.contains_key(b"junk").unwrap());
    }

    #[test]
    fn events_survive_a_reopen_and_seqs_keep_rising() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = open(&dir, 1 << 20, 50);
            outbox.append(telemetry(1)).unwrap();
            outbox.append(status("a")).unwrap();
            outbox.append(telemetry(1)).unwrap();
            outbox.ack(50).unwrap();
            outbox.flush().unwrap();
        }
        // A lower starting point (clock went back) never reuses a seq.
        let outbox = open(&dir, 1 << 20, 10);
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

    #[test]
    fn while_writes_fail_status_waits_in_memory_and_a_reopen_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = open(&dir, 1 << 20, 1);
        outbox.append(status("before")).unwrap(); // 1, on disk
        // What a full disk does to the next write.
        outbox.write_failed(&sled::Error::Io(std::io::Error::from_raw_os_error(28)));
        let why = outbox.failing().unwrap();
        assert!(why.starts_with("the agent's disk is full"), "{why}");
        outbox.append(telemetry(2)).unwrap(); // 2: dropped
        outbox
            .append_all([status("a"), status("b")]) // 3, 4: in memory
            .unwrap();
        let stats = outbox.stats();
        assert!(stats.degraded);
        assert_eq!((stats.events, stats.unwritten_events), (1, 2));
        assert_eq!(stats.unwritten_dropped_telemetry, 1);
        // Sent from memory, in seq order with what the disk holds.
        assert_eq!(seqs(&outbox), [1, 3, 4]);
        assert_eq!(outbox.after(1, 1).unwrap()[0].body, Some(status("a")));
        assert_eq!(outbox.ack(3).unwrap(), 2);
        assert_eq!(seqs(&outbox), [4]);

        assert!(outbox.recover().unwrap(), "the disk has room: reopened");
        let stats = outbox.stats();
        assert!(!stats.degraded);
        assert_eq!(stats.reopens, 1);
        assert_eq!((stats.events, stats.unwritten_events), (1, 0));
        assert_eq!(stats.status_events, 1);
        assert_eq!(seqs(&outbox), [4]);
        assert_eq!(outbox.append(status("c")).unwrap(), 5);
        assert!(!outbox.recover().unwrap(), "nothing to recover");
        drop(outbox);
        // Written for real: a restart finds them.
        let outbox = open(&dir, 1 << 20, 1);
        assert_eq!(seqs(&outbox), [4, 5]);
    }
}
