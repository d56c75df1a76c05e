//! Group commit: the controller's writes stop waiting for the disk.
//!
//! The controller changes its state under one lock, and every change is
//! written to the store (write first, then act). A disk sync per change,
//! under that lock, made every client and agent wait for every other's
//! sync. Here a change is only *queued* under the lock ([`GroupCommit::write`],
//! microseconds); one syncer thread applies everything queued since its
//! last round as one atomic batch and syncs once, so concurrent changes
//! share a sync.
//!
//! The rule that keeps this safe: **nothing leaves the controller (a reply,
//! a job event, a desired state, an ack) that depends on a write not yet
//! durable.** What a change announces is handed to [`GroupCommit::hold`],
//! which runs it once every write queued before it is durable, in the
//! order it was held; replies wait for [`GroupCommit::settled`]. A crash
//! therefore loses only changes that nobody outside was told of: a client
//! whose submit got no reply, an agent event that was not acknowledged
//! (the agent sends it again).
//!
//! Writes are applied in the order they were queued, each round after the
//! previous one is durable, so what survives a crash is always a prefix of
//! the writes: any write being durable implies every earlier one is.
//!
//! Reads go through here too: a queued write is visible at once (an
//! overlay of the queued values over the store), so the controller reads
//! its own writes whether or not the syncer got to them.
//!
//! When the store cannot write (a full disk), the failed round stays queued
//! and is retried with backoff, after asking the store to recover (sled is
//! reopened); [`StoreHealth`] says meanwhile that writes fail, and
//! everything waiting for a queued write gets the reason at once instead
//! of waiting. A reply that read only durable records need not wait at all:
//! [`tracking_reads`] and [`GroupCommit::note_read`] let a read say which
//! queued write (if any) it showed.

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::store::{
    IdRange, Keyspace, Store, StoreError, StoreHealth, StorePart, StoreTraffic, WriteBatch,
};

/// Writes queued but not yet durable, at most; a writer beyond it waits
/// for the syncer (a stalled disk then stalls the controller instead of
/// growing memory without bound).
const MAX_QUEUED_BATCHES: usize = 10_000;
/// How long the syncer waits before retrying a failed round; doubled on
/// each failure in a row up to [`RETRY_AFTER_MAX`].
const RETRY_AFTER: Duration = Duration::from_millis(250);
/// See [`RETRY_AFTER`]: how long a freed disk may wait to be noticed.
const RETRY_AFTER_MAX: Duration = Duration::from_secs(4);
/// Under sustained writes (a round that begins within [`BUSY_WINDOW`] of
/// the previous one's end) the syncer lets writes gather this long before
/// it applies them, so that more share one sync: each sync also wakes the
/// store's IO thread, and under `dispatch` this took the syncs per job
/// from 2.3 to 0.7 for at most a millisecond more per write. Idle, a write
/// is applied at once.
const GATHER: Duration = Duration::from_millis(1);
/// See [`GATHER`].
const BUSY_WINDOW: Duration = Duration::from_millis(2);

/// Something to send once the writes before it are durable.
type Announcement = Box<dyn FnOnce() + Send>;

/// The embedded store behind a group-commit queue. Implements [`Store`]:
/// its `apply` queues the batch and waits until it is durable.
pub struct GroupCommit {
    shared: Arc<Shared>,
    syncer: Option<JoinHandle<()>>,
}

struct Shared {
    store: Box<dyn Store>,
    health: Arc<StoreHealth>,
    traffic: Arc<StoreTraffic>,
    queue: Mutex<Queue>,
    /// The syncer waits here for writes; writers wait here for room.
    changed: Condvar,
    durable: watch::Sender<Durable>,
}

#[derive(Default)]
struct Queue {
    /// Number of the last batch queued (batches are numbered from 1).
    written: u64,
    batches: VecDeque<(u64, WriteBatch)>,
    /// The latest queued value of each key not yet in the store (None: a
    /// delete), with the number of the batch that wrote it.
    overlay: BTreeMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
    /// Announcements waiting for the batch number they follow.
    held: VecDeque<(u64, Announcement)>,
    /// Announcements that follow batches up to this one have been sent.
    released: u64,
    closing: bool,
}

#[derive(Debug, Clone, Default)]
struct Durable {
    /// Every batch up to this one is durable.
    through: u64,
    /// The last round failed, and why: every batch after `through` waits
    /// for a retry.
    failing: Option<Arc<str>>,
}

impl GroupCommit {
    /// Starts the syncer thread over `store`, whose `apply` must be atomic
    /// and durable.
    pub fn new(store: Box<dyn Store>) -> Result<Self, StoreError> {
        Self::with_health(store, StoreHealth::new())
    }

    /// [`Self::new`], reporting failed and recovered rounds to `health`.
    pub fn with_health(
        store: Box<dyn Store>,
        health: Arc<StoreHealth>,
    ) -> Result<Self, StoreError> {
        let shared = Arc::new(Shared {
            store,
            health,
            traffic: Arc::default(),
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            durable: watch::channel(Durable::default()).0,
        });
        let syncer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("store-sync".into())
                .spawn(move || shared.run_syncer())
                .map_err(|e| {
                    StoreError::Io(format!("cannot start the store's sync thread: {e}").into())
                })?
        };
        Ok(Self {
            shared,
            syncer: Some(syncer),
        })
    }

    /// Queues `batch` (atomic, applied after every batch queued before it)
    /// and returns its number. Readable through this store at once;
    /// durable once [`Self::durable`] says so. Call it where the change is
    /// made (under the state lock), so the order of writes is the order of
    /// changes.
    pub fn write(&self, batch: WriteBatch) -> u64 {
        let mut queue = self.shared.lock();
        while queue.batches.len() >= MAX_QUEUED_BATCHES && !queue.closing {
            queue = self
                .shared
                .changed
                .wait(queue)
                .unwrap_or_else(|p| p.into_inner());
        }
        if batch.is_empty() {
            return queue.written;
        }
        queue.written += 1;
        let number = queue.written;
        for (key, value) in batch.ops() {
            queue.overlay.insert(key.clone(), (number, value.clone()));
        }
        queue.batches.push_back((number, batch));
        drop(queue);
        self.shared.changed.notify_all();
        number
    }

    /// Runs `announce` once every batch queued so far is durable, after
    /// everything held before it. Call it where the change is made, after
    /// its write. `announce` runs on the syncer thread under the queue's
    /// lock: it must not block or touch the store (a `try_send`, a
    /// broadcast).
    pub fn hold(&self, announce: impl FnOnce() + Send + 'static) {
        let mut queue = self.shared.lock();
        let after = queue.written;
        if after <= queue.released {
            // Everything it follows is durable and everything held before
            // it was sent; under the lock, like a round's releases.
            announce();
        } else {
            queue.held.push_back((after, Box::new(announce)));
        }
    }

    /// The number of the last batch queued.
    pub fn written(&self) -> u64 {
        self.shared.lock().written
    }

    /// Resolves once batch `number` (and so every batch before it) is
    /// durable and what was held behind it has been sent; an error, at
    /// once, while it is not and the store's writes are failing (the batch
    /// stays queued and is retried).
    pub async fn durable(&self, number: u64) -> Result<(), StoreError> {
        let mut durable = self.shared.durable.subscribe();
        let state = durable
            .wait_for(|d| d.through >= number || d.failing.is_some())
            .await
            .map_err(|_| StoreError::Io("the store was closed".into()))?
            .clone();
        match state.failing {
            Some(why) if state.through < number => Err(StoreError::NotDurable(why.to_string())),
            _ => Ok(()),
        }
    }

    /// Whether the store's writes work; shared with whoever reports it.
    pub fn health(&self) -> &Arc<StoreHealth> {
        &self.shared.health
    }

    /// What was asked of the store so far (commits, writes, reads).
    pub fn traffic(&self) -> &Arc<StoreTraffic> {
        &self.shared.traffic
    }

    /// The latest queued (not yet durable) batch that wrote `id`; 0 when
    /// its stored value is durable.
    pub fn pending_key(&self, space: Keyspace, id: &str) -> u64 {
        let queue = self.shared.lock();
        queue.overlay.get(&space.key(id)).map_or(0, |(n, _)| *n)
    }

    /// The latest queued batch that wrote anything in `space`; 0 if none.
    pub fn pending_space(&self, space: Keyspace) -> u64 {
        let Some((start, end)) = space.bounds(IdRange::default()) else {
            return 0;
        };
        let queue = self.shared.lock();
        queue
            .overlay
            .range(start..end)
            .map(|(_, (n, _))| *n)
            .max()
            .unwrap_or(0)
    }

    /// Notes, for the reply being built (inside [`tracking_reads`]), that
    /// it shows what batch `number` wrote (0: only durable records).
    /// Outside it, nothing: the reply waits for every queued write.
    pub fn note_read(&self, number: u64) {
        let _ = REPLY_READS.try_with(|reads| {
            reads.set(Some(reads.get().unwrap_or(0).max(number)));
        });
    }

    /// Whether a reply is tracking its reads now (so computing what it
    /// read is worth it).
    pub fn tracking_reads(&self) -> bool {
        REPLY_READS.try_with(|_| ()).is_ok()
    }

    /// Resolves once every batch queued so far is durable.
    pub async fn settled(&self) -> Result<(), StoreError> {
        self.durable(self.written()).await
    }

    /// [`Self::durable`] for code outside an async runtime (blocks the thread).
    pub fn wait_durable(&self, number: u64) -> Result<(), StoreError> {
        futures::executor::block_on(self.durable(number))
    }
}

impl Drop for GroupCommit {
    /// Makes everything queued durable (and sends what it held) before the
    /// store closes.
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_all();
        if let Some(syncer) = self.syncer.take()
            && syncer.join().is_err()
        {
            tracing::error!("the store's sync thread panicked");
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run_syncer(&self) {
        // Waiters must not wait forever for a thread that is gone.
        struct PanicGuard<'a>(&'a Shared);
        impl Drop for PanicGuard<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.durable.send_modify(|d| {
                        d.failing = Some("the store's sync thread panicked".into());
                    });
                }
            }
        }
        let _guard = PanicGuard(self);
        let mut last_round_end: Option<Instant> = None;
        let mut retry_after = RETRY_AFTER;
        loop {
            let closing = {
                let mut queue = self.lock();
                while queue.batches.is_empty() && !queue.closing {
                    queue = self.changed.wait(queue).unwrap_or_else(|p| p.into_inner());
                }
                if queue.batches.is_empty() {
                    return;
                }
                queue.closing
            };
            if !closing && last_round_end.is_some_and(|end| end.elapsed() < BUSY_WINDOW) {
                std::thread::sleep(GATHER);
            }
            let round = self.sync_round();
            last_round_end = Some(Instant::now());
            match round {
                Ok(()) => retry_after = RETRY_AFTER,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?retry_after, "store write failed; retrying");
                    if self.lock().closing {
                        tracing::error!("queued writes were not stored at shutdown");
                        return;
                    }
                    std::thread::sleep(retry_after);
                    retry_after = (retry_after * 2).min(RETRY_AFTER_MAX);
                    self.recover();
                }
            }
        }
    }

    /// Asks the store to recover (reopen) before a retry.
    fn recover(&self) {
        match self.store.recover() {
            Ok(true) => self.health.reopened(),
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(error = %e, "the store cannot recover yet");
                self.health.failed(StorePart::State, &e);
                self.durable.send_modify(|d| {
                    d.failing = Some(crate::store::describe(&e).into());
                });
            }
        }
    }

    /// Applies everything queued as one atomic batch, syncs, then sends
    /// what was held behind it and publishes the new durable point.
    fn sync_round(&self) -> Result<(), StoreError> {
        let (through, round, batches) = {
            let queue = self.lock();
            let Some(&(through, _)) = queue.batches.back() else {
                return Ok(());
            };
            // Cloned, not taken: a failed round is retried from the queue.
            // A store that bounds a transaction (etcd's --max-txn-ops) gets
            // the longest prefix of whole batches within it; the rest is
            // the next round, so what is durable is still a prefix.
            let limit = self.store.max_batch_ops();
            let mut round = WriteBatch::default();
            let mut through = through;
            let mut ops = 0;
            let mut batches = 0;
            for (number, batch) in &queue.batches {
                let len = batch.ops().len();
                if ops > 0 && limit.is_some_and(|limit| ops + len > limit) {
                    break;
                }
                ops += len;
                batches += 1;
                through = *number;
                round.append(batch.clone());
            }
            // A key written by several batches of the round (a job
            // scheduled, then running) is written once, with its last
            // value: what applying them in order leaves.
            (through, round.coalesced(), batches)
        };
        let (writes, bytes) = (round.ops().len(), round.bytes());
        // Atomic and synced: the inner store's apply returns once durable.
        if let Err(e) = self.store.apply(round) {
            self.health.failed(StorePart::State, &e);
            self.durable
                .send_modify(|d| d.failing = Some(crate::store::describe(&e).into()));
            return Err(e);
        }
        self.health.recovered(StorePart::State);
        self.traffic.committed(batches, writes, bytes);
        {
            let mut queue = self.lock();
            while queue.batches.front().is_some_and(|(n, _)| *n <= through) {
                queue.batches.pop_front();
            }
            // Keys written again after this round keep their newer value.
            queue.overlay.retain(|_, (n, _)| *n > through);
            queue.released = through;
            // Under the queue's lock, so a `hold` meanwhile cannot overtake.
            while queue
                .held
                .front()
                .is_some_and(|(after, _)| *after <= through)
            {
                if let Some((_, announce)) = queue.held.pop_front() {
                    announce();
                }
            }
        }
        self.changed.notify_all();
        self.durable.send_modify(|d| {
            d.through = through;
            d.failing = None;
        });
        Ok(())
    }
}

tokio::task_local! {
    /// What the reply being built read: the latest queued batch it showed
    /// (None: it declared nothing, so it waits for every queued write).
    static REPLY_READS: Cell<Option<u64>>;
}

/// Runs `reply` and returns, with its output, the latest queued batch that
/// its reads declared through [`GroupCommit::note_read`] (None when they
/// declared nothing: then it depends on every queued write). Only for a
/// reply whose every read of controller state declares itself.
pub async fn tracking_reads<F: Future>(reply: F) -> (F::Output, Option<u64>) {
    REPLY_READS
        .scope(Cell::new(None), async move {
            let output = reply.await;
            (output, REPLY_READS.with(Cell::get))
        })
        .await
}

impl Store for GroupCommit {
    /// Queues the batch and waits until it is durable (blocks the thread).
    fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let number = self.write(batch);
        self.wait_durable(number)
    }

    fn get_raw(&self, space: Keyspace, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some((_, value)) = self.shared.lock().overlay.get(&space.key(id)) {
            return Ok(value.clone());
        }
        // Absent from the overlay: either never queued, or already applied
        // (a round applies before it clears the overlay).
        self.shared.traffic.read();
        self.shared.store.get_raw(space, id)
    }

    /// The store's records merged with the queued ones (a queued value
    /// replaces the stored one; a queued delete hides it).
    fn visit_raw(
        &self,
        space: Keyspace,
        range: IdRange<'_>,
        visit: &mut dyn FnMut(&str, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let Some((start, end)) = space.bounds(range) else {
            return Ok(());
        };
        self.shared.traffic.read();
        // Taken before the store is read: a round that applies meanwhile
        // only makes the store agree with what was taken.
        let mut queued: VecDeque<(String, Option<Vec<u8>>)> = {
            let queue = self.shared.lock();
            let entries = queue.overlay.range(start..end);
            let entries: Box<dyn Iterator<Item = _>> = if range.reverse {
                Box::new(entries.rev())
            } else {
                Box::new(entries)
            };
            entries
                .map(|(key, (_, value))| (space.id_of(key).into_owned(), value.clone()))
                .collect()
        };
        if queued.is_empty() {
            return self.shared.store.visit_raw(space, range, visit);
        }
        // Does `a` come before `b` in this walk's order?
        let before = |a: &str, b: &str| if range.reverse { a > b } else { a < b };
        let mut stopped = false;
        self.shared
            .store
            .visit_raw(space, range, &mut |id, stored| {
                while let Some((next, _)) = queued.front()
                    && before(next, id)
                {
                    if let Some((next, Some(value))) = queued.pop_front()
                        && !visit(&next, &value)
                    {
                        stopped = true;
                        return false;
                    }
                }
                let more = match queued.front() {
                    Some((next, _)) if next == id => match queued.pop_front() {
                        Some((next, Some(value))) => visit(&next, &value),
                        // Deleted by a queued write.
                        _ => true,
                    },
                    _ => visit(id, stored),
                };
                stopped = !more;
                more
            })?;
        if !stopped {
            for (id, value) in queued {
                if let Some(value) = value
                    && !visit(&id, &value)
                {
                    break;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{MemoryStore, SledStore};
    use futures::FutureExt;
    use gpufleet_proto::v1::Job;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// Records the size of every round it is given; bounds them at 4.
    struct Bounded(MemoryStore, Arc<Mutex<Vec<usize>>>);

    impl Store for Bounded {
        fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
            self.1.lock().unwrap().push(batch.ops().len());
            self.0.apply(batch)
        }
        fn get_raw(&self, space: Keyspace, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.get_raw(space, id)
        }
        fn visit_raw(
            &self,
            space: Keyspace,
            range: IdRange<'_>,
            visit: &mut dyn FnMut(&str, &[u8]) -> bool,
        ) -> Result<(), StoreError> {
            self.0.visit_raw(space, range, visit)
        }
        fn max_batch_ops(&self) -> Option<usize> {
            Some(4)
        }
    }

    #[test]
    fn rounds_stay_within_the_stores_transaction_bound_and_in_order() {
        let rounds = Arc::new(Mutex::new(Vec::new()));
        let commit =
            GroupCommit::new(Box::new(Bounded(MemoryStore::new(), Arc::clone(&rounds)))).unwrap();
        let mut last = 0;
        for n in 0..10 {
            let mut batch = WriteBatch::default();
            batch.put_raw(Keyspace::Jobs, &format!("a{n}"), vec![1]);
            batch.put_raw(Keyspace::Jobs, &format!("b{n}"), vec![1]);
            last = commit.write(batch);
        }
        let mut big = WriteBatch::default();
        for n in 0..6 {
            big.put_raw(Keyspace::Nodes, &format!("n{n}"), vec![1]);
        }
        last = last.max(commit.write(big));
        commit.wait_durable(last).unwrap();
        let rounds = rounds.lock().unwrap().clone();
        assert_eq!(rounds.iter().sum::<usize>(), 26, "{rounds:?}");
        // A batch larger than the bound goes alone; the others share.
        assert!(rounds.iter().all(|&n| n <= 4 || n == 6), "{rounds:?}");
        assert_eq!(commit.scan_raw(Keyspace::Jobs).unwrap().len(), 20);
    }

    /// The in-memory store, whose `apply` waits while the test holds
    /// `gate` and fails while `fail` is set: the syncer's round can be
    /// stopped half-way at will.
    #[derive(Default)]
    struct Gated {
        data: MemoryStore,
        gate: Mutex<()>,
        fail: AtomicBool,
        /// `recover` calls that reopened (the store failed before).
        reopened: AtomicUsize,
    }

    struct GatedStore(Arc<Gated>);

    impl Store for GatedStore {
        fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
            drop(self.0.gate.lock().unwrap());
            if self.0.fail.load(Ordering::SeqCst) {
                return Err(StoreError::NotDurable("disk on fire".into()));
            }
            self.0.data.apply(batch)
        }

        fn get_raw(&self, space: Keyspace, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.data.get_raw(space, id)
        }

        fn recover(&self) -> Result<bool, StoreError> {
            if self.0.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Io("still on fire".into()));
            }
            self.0.reopened.fetch_add(1, Ordering::SeqCst);
            Ok(true)
        }

        fn visit_raw(
            &self,
            space: Keyspace,
            range: IdRange<'_>,
            visit: &mut dyn FnMut(&str, &[u8]) -> bool,
        ) -> Result<(), StoreError> {
            self.0.data.visit_raw(space, range, visit)
        }
    }

    fn gated() -> (Arc<Gated>, GroupCommit) {
        let inner = Arc::new(Gated::default());
        let commit = GroupCommit::new(Box::new(GatedStore(inner.clone()))).unwrap();
        (inner, commit)
    }

    fn put(id: &str) -> WriteBatch {
        let mut batch = WriteBatch::default();
        batch.put(
            Keyspace::Jobs,
            id,
            &Job {
                id: id.to_string(),
                ..Default::default()
            },
        );
        batch
    }

    fn ids(store: &dyn Store, range: IdRange<'_>) -> Vec<String> {
        let mut out = Vec::new();
        store
            .visit_raw(Keyspace::Jobs, range, &mut |id, _| {
                out.push(id.to_string());
                true
            })
            .unwrap();
        out
    }

    fn stored(inner: &Gated, id: &str) -> bool {
        inner.data.get_raw(Keyspace::Jobs, id).unwrap().is_some()
    }

    #[test]
    fn durable_means_in_the_store_and_announcements_wait_for_it() {
        let (inner, commit) = gated();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let gate = inner.gate.lock().unwrap();
        let mut numbers = Vec::new();
        for id in ["job-a", "job-b", "job-c"] {
            numbers.push(commit.write(put(id)));
            let sent = sent.clone();
            let inner = inner.clone();
            commit.hold(move || {
                // Runs only once its write reached the store.
                sent.lock().unwrap().push((id, stored(&inner, id)));
            });
        }
        assert!(
            commit.durable(numbers[0]).now_or_never().is_none(),
            "not durable while the store has not applied it"
        );
        assert!(sent.lock().unwrap().is_empty(), "nothing announced yet");
        drop(gate);
        commit.wait_durable(numbers[2]).unwrap();
        assert!(stored(&inner, "job-c"));
        assert_eq!(
            *sent.lock().unwrap(),
            [("job-a", true), ("job-b", true), ("job-c", true)],
            "in the order held, each after its write"
        );
        // With nothing queued, an announcement goes at once.
        let ran = Arc::new(AtomicUsize::new(0));
        let counter = ran.clone();
        commit.hold(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn traffic_counts_rounds_their_last_writes_and_reads_that_reach_the_store() {
        let (inner, commit) = gated();
        let mut batch = put("job-a");
        batch.append(put("job-a"));
        batch.delete(Keyspace::Jobs, "job-b");
        let bytes = put("job-a").bytes() + Keyspace::Jobs.key("job-b").len();
        commit.apply(batch).unwrap();
        let after_write = commit.traffic().snapshot();
        assert_eq!(
            after_write,
            crate::store::TrafficSnapshot {
                commits: 1,
                batches: 1,
                writes: 2,
                written_bytes: bytes as u64,
                reads: 0,
            },
            "job-a written twice in the round is one write"
        );
        assert!(stored(&inner, "job-a"));
        // A queued write is read from the overlay, not the store.
        let gate = inner.gate.lock().unwrap();
        commit.write(put("job-c"));
        assert!(commit.get_raw(Keyspace::Jobs, "job-c").unwrap().is_some());
        assert_eq!(commit.traffic().snapshot().reads, 0);
        assert!(commit.get_raw(Keyspace::Jobs, "job-a").unwrap().is_some());
        ids(&commit, IdRange::default());
        drop(gate);
        assert_eq!(commit.traffic().snapshot().since(&after_write).reads, 2);
    }

    #[test]
    fn reads_see_queued_writes_merged_with_stored_ones() {
        let (inner, commit) = gated();
        let mut batch = WriteBatch::default();
        for id in ["job-a", "job-c", "job-e"] {
            batch.append(put(id));
        }
        commit.apply(batch).unwrap();
        // The syncer is stopped in its round: these stay queued.
        let gate = inner.gate.lock().unwrap();
        let mut batch = put("job-b");
        batch.delete(Keyspace::Jobs, "job-c");
        batch.append(put("job-f"));
        let number = commit.write(batch);
        assert_eq!(
            ids(&commit, IdRange::default()),
            ["job-a", "job-b", "job-e", "job-f"]
        );
        let reverse = IdRange {
            reverse: true,
            ..Default::default()
        };
        assert_eq!(ids(&commit, reverse), ["job-f", "job-e", "job-b", "job-a"]);
        assert_eq!(ids(&commit, IdRange::below("job-c")), ["job-a", "job-b"]);
        assert!(commit.get_raw(Keyspace::Jobs, "job-c").unwrap().is_none());
        assert!(commit.get_raw(Keyspace::Jobs, "job-b").unwrap().is_some());
        assert!(!stored(&inner, "job-b"), "still only queued");
        // A walk that stops early stops in the queued part too.
        let mut first = Vec::new();
        commit
            .visit_raw(Keyspace::Jobs, IdRange::default(), &mut |id, _| {
                first.push(id.to_string());
                first.len() < 2
            })
            .unwrap();
        assert_eq!(first, ["job-a", "job-b"]);
        drop(gate);
        commit.wait_durable(number).unwrap();
        assert!(stored(&inner, "job-b") && !stored(&inner, "job-c"));
        assert_eq!(
            ids(&commit, IdRange::default()),
            ["job-a", "job-b", "job-e", "job-f"]
        );
    }

    #[test]
    fn a_failed_round_announces_nothing_and_is_retried() {
        let (inner, commit) = gated();
        inner.fail.store(true, Ordering::SeqCst);
        let sent = Arc::new(AtomicBool::new(false));
        let number = commit.write(put("job-a"));
        let flag = sent.clone();
        commit.hold(move || flag.store(true, Ordering::SeqCst));
        let err = commit.wait_durable(number).unwrap_err();
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert!(!sent.load(Ordering::SeqCst));
        // Still readable from memory, and stored once the disk recovers.
        assert!(commit.get_raw(Keyspace::Jobs, "job-a").unwrap().is_some());
        inner.fail.store(false, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !sent.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "never retried");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(stored(&inner, "job-a"));
    }

    #[test]
    fn while_writes_fail_waiters_get_the_reason_at_once_and_health_recovers() {
        let (inner, commit) = gated();
        let health = commit.health().clone();
        inner.fail.store(true, Ordering::SeqCst);
        let first = commit.write(put("job-a"));
        assert!(commit.wait_durable(first).is_err());
        assert!(health.writes_refused().is_some());
        // A later write fails at once, not after the next retry.
        let second = commit.write(put("job-b"));
        let err = commit
            .durable(second)
            .now_or_never()
            .expect("answered at once while failing")
            .unwrap_err();
        assert!(err.to_string().contains("nothing was lost"), "{err}");
        assert_eq!(commit.pending_key(Keyspace::Jobs, "job-b"), second);
        assert_eq!(commit.pending_key(Keyspace::Jobs, "job-z"), 0);
        assert_eq!(commit.pending_space(Keyspace::Jobs), second);
        assert_eq!(commit.pending_space(Keyspace::Nodes), 0);
        // A reply that read only durable records need not wait.
        let (_, read) = futures::executor::block_on(tracking_reads(async {
            commit.note_read(commit.pending_key(Keyspace::Jobs, "job-z"));
        }));
        assert_eq!(read, Some(0));
        assert!(commit.durable(0).now_or_never().unwrap().is_ok());
        inner.fail.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(30);
        while health.writes_refused().is_some() {
            assert!(Instant::now() < deadline, "never recovered");
            std::thread::sleep(Duration::from_millis(10));
        }
        commit.wait_durable(second).unwrap();
        assert!(stored(&inner, "job-a") && stored(&inner, "job-b"));
        assert!(inner.reopened.load(Ordering::SeqCst) >= 1);
        assert_eq!(
            health.reopens(),
            inner.reopened.load(Ordering::SeqCst) as u64
        );
        assert!(health.failures() >= 1);
    }

    #[test]
    fn a_durable_write_survives_reopening_a_sled_store() {
        let dir = tempfile::tempdir().unwrap();
        {
            let commit = GroupCommit::new(Box::new(SledStore::open(dir.path()).unwrap())).unwrap();
            let number = commit.write(put("job-a"));
            commit.wait_durable(number).unwrap();
            // Queued only: dropping the store still stores it.
            commit.write(put("job-b"));
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(ids(&store, IdRange::default()), ["job-a", "job-b"]);
    }
}
