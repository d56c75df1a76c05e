//! Where jobs live. A job is *resident* (held in memory) while it is live:
//! not finished, or finished with tasks that still hold GPUs. A settled job
//! (finished, every task ended) can never change again, so it lives in the
//! store only. Memory therefore grows with the jobs in flight, not with
//! history.
//!
//! Job ids begin with their submit second ([`new_job_id`]), so the store's
//! own order of jobs is their submit order: listings walk it newest first
//! and retention oldest first, and a job costs the store one key. Every key
//! costs sled memory for as long as it is stored (about 13 B, measured by
//! `gpufleet-bench store-growth`), so the creation and end indexes a job
//! needed before are kept only for the 12-digit ids of older controllers,
//! which carry no time.

use gpufleet_proto::v1::{Job, JobState};

use crate::lifecycle::task_holds_gpus;
use crate::store::{self, IdRange, Keyspace, Store, StoreError, WriteBatch};
use gpufleet_core::is_terminal_job;

/// A new job id: `job-` and 16 hex digits, the submit's Unix second (9
/// digits) then 28 random bits (7 digits).
///
/// Time first, so that ids sort by submit second: the store keeps jobs and
/// usage records by id, and new ids then land among the newest keys instead
/// of anywhere in those trees. With random ids every submit, status change
/// and usage record touched a random page of the store, pulling old pages
/// into its cache and evicting others, so the cache churned with every job
/// (measured in BENCHMARKS.md, `load`). The random part keeps ids
/// unguessable within a second; the caller still checks for a collision.
pub fn new_job_id(now: std::time::SystemTime, random: u32) -> String {
    format!(
        "job-{:09x}{:07x}",
        unix_secs(now) & 0xf_ffff_ffff,
        random & 0x0fff_ffff
    )
}

fn unix_secs(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The submit second an id from [`new_job_id`] begins with; None for the
/// 12-digit ids of older controllers, which only the indexes place in time.
pub fn submit_second(id: &str) -> Option<u64> {
    let digits = id.strip_prefix("job-")?;
    if digits.len() != 16
        || !digits
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    u64::from_str_radix(&digits[..9], 16).ok()
}

/// The first id (exclusive bound) of jobs submitted at `second` or later.
fn second_bound(second: u64) -> String {
    format!("job-{:09x}", second.min(0xf_ffff_ffff))
}

/// Where a job sorts in listings, which show the highest first: submit
/// second, then creation time, then id. The submit second is the id's own
/// (the creation time's for older ids), so a store walk by id visits jobs
/// in this order a second at a time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListKey {
    pub second: u64,
    pub nanos: u64,
    pub id: String,
}

impl ListKey {
    pub fn new(nanos: u64, id: &str) -> Self {
        Self {
            second: submit_second(id).unwrap_or(nanos / 1_000_000_000),
            nanos,
            id: id.to_string(),
        }
    }

    pub fn of(job: &Job) -> Self {
        Self::new(nanos(job.created_at.as_ref()), &job.id)
    }
}

/// Whether the job must stay in memory: it can still change.
pub fn is_resident(job: &Job) -> bool {
    !is_terminal_job(job.state()) || job.tasks.iter().any(task_holds_gpus)
}

fn nanos(ts: Option<&prost_types::Timestamp>) -> u64 {
    ts.map_or(0, |t| {
        (t.seconds.max(0) as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.nanos.max(0) as u64)
    })
}

/// The job's id in the creation-time index.
pub fn created_key(job: &Job) -> String {
    created_bound(nanos(job.created_at.as_ref()), &job.id)
}

/// `<created ns, 20 digits>/<job id>`: sorts by creation time, then id.
pub fn created_bound(created_nanos: u64, job_id: &str) -> String {
    format!("{created_nanos:020}/{job_id}")
}

/// The job's id in the end-time index.
fn finished_key(job: &Job) -> String {
    let secs = job
        .finished_at
        .as_ref()
        .map_or(0, |t| t.seconds.max(0) as u64);
    format!("{}/{}", finished_bound(secs), job.id)
}

/// Fixed width keeps text order equal to time order.
fn finished_bound(secs: u64) -> String {
    format!("{:012}", secs.min(999_999_999_999))
}

/// Adds the index entries a change from `before` to `job` needs: the
/// creation entry for a new job, the end entry when it finishes. Only ids
/// without a submit second need them; the store's order is theirs.
pub fn index(batch: &mut WriteBatch, before: Option<&Job>, job: &Job) {
    if submit_second(&job.id).is_some() {
        return;
    }
    let tenant = job.spec.as_ref().map(|s| s.tenant.as_str()).unwrap_or("");
    if before.is_none() {
        batch.put_raw(
            Keyspace::JobsByCreated,
            &created_key(job),
            tenant.as_bytes().to_vec(),
        );
    }
    let was_finished = before.is_some_and(|b| is_terminal_job(b.state()));
    if is_terminal_job(job.state()) && !was_finished {
        batch.put_raw(Keyspace::JobsByFinished, &finished_key(job), Vec::new());
    }
}

/// A finished job past its retention.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub job_id: String,
    /// The record; None when only the index still names the job.
    pub job: Option<Job>,
    /// Its entry in the end-time index, for ids that need the indexes.
    pub index_id: Option<String>,
}

/// Adds the deletion of a finished job, its record and any index entries
/// to `batch`.
pub fn delete(batch: &mut WriteBatch, entry: &Finished) {
    if let Some(index_id) = &entry.index_id {
        batch.delete(Keyspace::JobsByFinished, index_id);
    }
    batch.delete(Keyspace::Jobs, &entry.job_id);
    if let Some(job) = &entry.job
        && submit_second(&job.id).is_none()
    {
        batch.delete(Keyspace::JobsByCreated, &created_key(job));
    }
}

/// A stored job.
pub fn get(store: &dyn Store, id: &str) -> Result<Option<Job>, StoreError> {
    store::get(store, Keyspace::Jobs, id)
}

/// Where the last retention pass stopped among jobs in submit order, so
/// that the next goes on from there instead of revisiting from the oldest
/// the jobs it kept (still running, or finished too recently).
#[derive(Debug, Default)]
pub struct ExpiryCursor {
    after: Option<String>,
}

/// Jobs that finished before `cutoff_secs`, at most `limit`, passing over
/// those `keep` names (they neither count nor appear).
///
/// A job finishes after its submit, so only jobs submitted before the
/// cutoff can have expired: the walk goes through those in submit order,
/// from where the last pass stopped, and looks at no more than `4 × limit`
/// of them, so that a pass under the state lock stays short however many
/// old jobs are still running. Jobs with older ids are found through the
/// end-time index.
pub fn finished_before(
    store: &dyn Store,
    cutoff_secs: u64,
    limit: usize,
    keep: &dyn Fn(&str) -> bool,
    cursor: &mut ExpiryCursor,
) -> Result<Vec<Finished>, StoreError> {
    let mut expired = Vec::new();
    let mut failed = None;
    let to = finished_bound(cutoff_secs);
    store.visit_raw(
        Keyspace::JobsByFinished,
        IdRange::below(&to),
        &mut |key, _| {
            let Some((_, id)) = key.split_once('/') else {
                return true;
            };
            if keep(id) {
                return true;
            }
            match get(store, id) {
                Ok(job) => expired.push(Finished {
                    job_id: id.to_string(),
                    job,
                    index_id: Some(key.to_string()),
                }),
                Err(e) => failed = Some(e),
            }
            failed.is_none() && expired.len() < limit
        },
    )?;
    if let Some(e) = failed {
        return Err(e);
    }

    let to = second_bound(cutoff_secs);
    // Strictly after the last id visited: ids are ASCII, so NUL sorts
    // before any character that could follow.
    let previous = cursor.after.take();
    let from = previous.as_ref().map(|id| format!("{id}\0"));
    let budget = limit.saturating_mul(4);
    let mut visited = 0;
    let mut last_visited = None;
    let mut walk_ended = true;
    store.visit_raw(
        Keyspace::Jobs,
        IdRange {
            from: from.as_deref().unwrap_or(""),
            to: Some(&to),
            reverse: false,
        },
        &mut |id, bytes| {
            if expired.len() >= limit || visited >= budget {
                walk_ended = false;
                return false;
            }
            if submit_second(id).is_none() {
                return true;
            }
            visited += 1;
            last_visited = Some(id.to_string());
            if keep(id) {
                return true;
            }
            let Some(job) = decode_in_walk(id, bytes, &mut failed) else {
                return false;
            };
            let finished = job
                .finished_at
                .as_ref()
                .map_or(0, |t| t.seconds.max(0) as u64);
            if is_terminal_job(job.state()) && finished < cutoff_secs && !is_resident(&job) {
                expired.push(Finished {
                    job_id: id.to_string(),
                    job: Some(job),
                    index_id: None,
                });
            }
            true
        },
    )?;
    if let Some(e) = failed {
        return Err(e);
    }
    // A walk that reached the cutoff starts from the oldest next time, for
    // the jobs it kept that may have expired since.
    // One that stopped before its first job (the older ids' index filled
    // the batch) keeps its place.
    cursor.after = if walk_ended {
        None
    } else {
        last_visited.or(previous)
    };
    Ok(expired)
}

/// Decodes a job record met in a store walk. A corrupt one goes to
/// `failed` and gives None: the walk stops there and reports it.
fn decode_in_walk(id: &str, bytes: &[u8], failed: &mut Option<StoreError>) -> Option<Job> {
    match store::decode::<Job>(Keyspace::Jobs, id, bytes) {
        Ok(job) => Some(job),
        Err(e) => {
            *failed = Some(e);
            None
        }
    }
}

/// What [`newest_first`] found.
#[derive(Debug, Default)]
pub struct Listed {
    /// Highest [`ListKey`] first.
    pub jobs: Vec<Job>,
    /// Set when the walk stopped at its budget before `limit` jobs were
    /// found: every job at or above this key was examined, none below.
    /// The next page starts strictly below it.
    pub resume: Option<ListKey>,
}

/// The [`ListKey`] below every job submitted in `second` and above every
/// job of earlier seconds: where a walk stopped between two seconds goes
/// on. (Its id is empty, which no job's is.)
pub fn second_start(second: u64) -> ListKey {
    ListKey {
        second,
        nanos: second.saturating_mul(1_000_000_000),
        id: String::new(),
    }
}

/// Up to `limit` stored jobs, highest [`ListKey`] first and strictly below
/// `before`, each passed through `pick`, which returns the version to list
/// (the resident one, say) or None to pass the job over. `may_match` sees
/// each record's bytes first and can pass it over without decoding it (a
/// tenant's name that does not occur in them, say).
///
/// Jobs with time-ordered ids come from the store's walk by id, newest
/// submit second first; the jobs of one second are read together and
/// sorted. Older ids come from the creation index. Both give their first
/// `limit` picks, merged.
///
/// Each of the two walks examines about `budget` records at most (whole
/// seconds at a time): a filter that few jobs match (a rare tenant or
/// state in a store of millions) then costs a bounded pass per call, and
/// [`Listed::resume`] says where the next one goes on.
pub fn newest_first(
    store: &dyn Store,
    before: Option<&ListKey>,
    limit: usize,
    budget: usize,
    may_match: &dyn Fn(&[u8]) -> bool,
    pick: &mut dyn FnMut(Job) -> Option<Job>,
) -> Result<Listed, StoreError> {
    let below = |job: &Job| before.is_none_or(|b| ListKey::of(job) < *b);
    let mut listed: Vec<Job> = Vec::new();
    let mut failed = None;
    let mut examined = 0_usize;
    let mut resume: Option<ListKey> = None;

    let to = before.map(|b| second_bound(b.second.saturating_add(1)));
    // The jobs of the second being read, and which second that is.
    let mut second: Vec<Job> = Vec::new();
    let mut second_at = u64::MAX;
    let mut flush = |second: &mut Vec<Job>, listed: &mut Vec<Job>| {
        second.sort_by_cached_key(|job| std::cmp::Reverse(ListKey::of(job)));
        for job in second.drain(..) {
            if listed.len() >= limit {
                break;
            }
            if below(&job)
                && let Some(job) = pick(job)
            {
                listed.push(job);
            }
        }
    };
    store.visit_raw(
        Keyspace::Jobs,
        IdRange {
            from: "",
            to: to.as_deref(),
            reverse: true,
        },
        &mut |id, bytes| {
            let Some(at) = submit_second(id) else {
                return true;
            };
            if at != second_at {
                flush(&mut second, &mut listed);
                if listed.len() >= limit {
                    return false;
                }
                // Everything from `second_at` up is examined. (Not when
                // that is no lower than where this page began: the first
                // second of a page resumed at a second's start.)
                let stop_at = second_start(second_at);
                if examined >= budget
                    && second_at != u64::MAX
                    && before.is_none_or(|b| stop_at < *b)
                {
                    resume = Some(stop_at);
                    return false;
                }
                second_at = at;
            }
            examined += 1;
            if !may_match(bytes) {
                return true;
            }
            let Some(job) = decode_in_walk(id, bytes, &mut failed) else {
                return false;
            };
            second.push(job);
            true
        },
    )?;
    if let Some(e) = failed {
        return Err(e);
    }
    flush(&mut second, &mut listed);

    // Older ids, by the creation index: everything created before the end
    // of `before`'s second, then exactly by key.
    let to =
        before.map(|b| created_bound(b.second.saturating_add(1).saturating_mul(1_000_000_000), ""));
    let mut older = Vec::new();
    let mut older_examined = 0_usize;
    let mut older_resume: Option<ListKey> = None;
    store.visit_raw(
        Keyspace::JobsByCreated,
        IdRange {
            from: "",
            to: to.as_deref(),
            reverse: true,
        },
        &mut |key, _| {
            let Some((_, id)) = key.split_once('/') else {
                return true;
            };
            match get(store, id) {
                Ok(Some(job)) => {
                    if !below(&job) {
                        // Listed or examined by an earlier page.
                        return true;
                    }
                    older_examined += 1;
                    let key = ListKey::of(&job);
                    if let Some(job) = pick(job) {
                        older.push(job);
                    }
                    if older_examined >= budget && older.len() < limit {
                        // Everything from this job up is examined.
                        older_resume = Some(key);
                        return false;
                    }
                }
                Ok(None) => {}
                Err(e) => failed = Some(e),
            }
            failed.is_none() && older.len() < limit
        },
    )?;
    if let Some(e) = failed {
        return Err(e);
    }
    // Both walks examined everything at or above the higher of their
    // stopping points; what either listed below it is left for the next
    // page, which goes on from there.
    let resume = resume.max(older_resume);
    if !older.is_empty() {
        listed.append(&mut older);
        listed.sort_by_cached_key(|job| std::cmp::Reverse(ListKey::of(job)));
    }
    if let Some(resume) = &resume {
        listed.retain(|job| ListKey::of(job) >= *resume);
    }
    listed.truncate(limit);
    Ok(Listed {
        jobs: listed,
        resume,
    })
}

/// The store's index layout, recorded once a store has it:
/// 1. jobs and usage records indexed by creation and end time;
/// 2. the job indexes kept only for ids without a submit second.
const INDEX_VERSION_SETTING: &str = "index-version";
const INDEX_VERSION: u64 = 2;

/// Brings a store written by an older controller to this one's index
/// layout. Returns how many index entries were written or deleted (0 when
/// the store was already current).
pub fn migrate(store: &dyn Store) -> Result<usize, StoreError> {
    let version = store::get::<u64>(store, Keyspace::Settings, INDEX_VERSION_SETTING)?.unwrap_or(0);
    if version >= INDEX_VERSION {
        return Ok(0);
    }
    let mut changed = 0;
    if version < 1 {
        let mut writer = store::ChunkedWriter::new(store);
        store::visit::<Job>(store, Keyspace::Jobs, IdRange::default(), |_, job| {
            if submit_second(&job.id).is_none() {
                index(writer.batch(), None, &job);
                writer.record_done()?;
            }
            Ok(true)
        })?;
        changed += writer.finish()?;
        changed += crate::usage::index_records(store)?;
    }
    // Version 1 indexed every job; time-ordered ids no longer need it.
    for space in [Keyspace::JobsByCreated, Keyspace::JobsByFinished] {
        let mut writer = store::ChunkedWriter::new(store);
        let mut failed = None;
        store.visit_raw(space, IdRange::default(), &mut |key, _| {
            if key
                .split_once('/')
                .is_some_and(|(_, id)| submit_second(id).is_some())
            {
                writer.batch().delete(space, key);
                if let Err(e) = writer.record_done() {
                    failed = Some(e);
                    return false;
                }
            }
            true
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        changed += writer.finish()?;
    }
    let mut batch = WriteBatch::default();
    batch.put(Keyspace::Settings, INDEX_VERSION_SETTING, &INDEX_VERSION);
    store.apply(batch)?;
    Ok(changed)
}

/// Counts of settled jobs by state, for metrics.
pub type SettledCounts = std::collections::BTreeMap<JobState, u64>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_sort_by_submit_second_and_differ_within_one() {
        use std::time::{Duration, UNIX_EPOCH};
        let at = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a = new_job_id(at, 0xffff_ffff);
        let b = new_job_id(at + Duration::from_secs(1), 0);
        assert_eq!(a, "job-06b49d200fffffff");
        assert_eq!(b, "job-06b49d2010000000");
        assert!(a < b, "a later second sorts after an earlier one");
        assert_ne!(new_job_id(at, 1), new_job_id(at, 2));
        assert_eq!(a.len(), "job-".len() + 16);
    }
    use crate::store::SledStore;
    use gpufleet_proto::v1::{JobSpec, TaskStatus, WorkloadState};
    use prost_types::Timestamp;

    fn job(id: &str, created: i64, state: JobState) -> Job {
        Job {
            id: id.into(),
            spec: Some(JobSpec {
                tenant: "team-a".into(),
                ..Default::default()
            }),
            state: state as i32,
            created_at: Some(Timestamp {
                seconds: created,
                nanos: 0,
            }),
            finished_at: (state == JobState::Succeeded).then_some(Timestamp {
                seconds: created + 10,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn resident_until_every_task_ended() {
        let mut j = job("job-a", 1, JobState::Cancelled);
        assert!(!is_resident(&j));
        j.tasks.push(TaskStatus {
            state: WorkloadState::Running as i32,
            ..Default::default()
        });
        assert!(is_resident(&j), "a cancelled job still holding GPUs");
        j.tasks[0].state = WorkloadState::Stopped as i32;
        assert!(!is_resident(&j));
        assert!(is_resident(&job("job-b", 1, JobState::Pending)));
    }

    fn ids(jobs: &[Job]) -> Vec<&str> {
        jobs.iter().map(|j| j.id.as_str()).collect()
    }

    fn list(store: &dyn Store, before: Option<&ListKey>, limit: usize) -> Vec<Job> {
        newest_first(store, before, limit, usize::MAX, &|_| true, &mut Some)
            .unwrap()
            .jobs
    }

    fn expire(
        store: &dyn Store,
        cutoff: u64,
        limit: usize,
        keep: &dyn Fn(&str) -> bool,
        cursor: &mut ExpiryCursor,
    ) -> Vec<String> {
        finished_before(store, cutoff, limit, keep, cursor)
            .unwrap()
            .into_iter()
            .map(|f| f.job_id)
            .collect()
    }

    /// Stores `job` as the controller does: at submit, then finished.
    fn store_finished(store: &dyn Store, done: &Job) {
        let mut pending = done.clone();
        pending.state = JobState::Pending as i32;
        pending.finished_at = None;
        let mut batch = WriteBatch::default();
        index(&mut batch, None, &pending);
        index(&mut batch, Some(&pending), done);
        batch.put(Keyspace::Jobs, &done.id, done);
        store.apply(batch).unwrap();
    }

    /// A time-ordered id for `second` with `random` as its low digits.
    fn timed(second: u64, random: u32) -> String {
        new_job_id(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(second),
            random,
        )
    }

    #[test]
    fn submit_second_is_read_back_from_new_ids_only() {
        assert_eq!(submit_second(&timed(1_800_000_000, 7)), Some(1_800_000_000));
        assert_eq!(submit_second("job-06b0bdffc3f2"), None, "12-digit id");
        assert_eq!(submit_second("job-06B49D200FFFFFFF"), None, "upper case");
        assert_eq!(submit_second("job-a"), None);
        assert_eq!(submit_second("06b49d200fffffff"), None);
    }

    #[test]
    fn time_ordered_jobs_need_no_index_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let done = job(&timed(1_000, 1), 1_000, JobState::Succeeded);
        store_finished(&store, &done);
        for space in [Keyspace::JobsByCreated, Keyspace::JobsByFinished] {
            assert!(store.scan_raw(space).unwrap().is_empty(), "{space:?}");
        }
        assert_eq!(ids(&list(&store, None, 10)), [done.id.as_str()]);
    }

    #[test]
    fn listing_goes_by_second_then_creation_time_then_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        // Second 1,000 holds three jobs whose random digits disagree with
        // their creation order; second 999 one; second 1,001 one.
        let mut made = Vec::new();
        for (second, random, nanos) in [
            (1_000, 9, 100),
            (1_000, 1, 300),
            (1_000, 5, 200),
            (999, 3, 0),
            (1_001, 2, 0),
        ] {
            let mut j = job(&timed(second, random), second as i64, JobState::Succeeded);
            j.created_at.as_mut().unwrap().nanos = nanos;
            store_finished(&store, &j);
            made.push(j.id);
        }
        let (in_mid_9, in_mid_1, in_mid_5, oldest, newest) = (
            made[0].as_str(),
            made[1].as_str(),
            made[2].as_str(),
            made[3].as_str(),
            made[4].as_str(),
        );
        let all = list(&store, None, 10);
        assert_eq!(ids(&all), [newest, in_mid_1, in_mid_5, in_mid_9, oldest]);
        // Pages: each starts strictly after the last job of the one before.
        let first = list(&store, None, 2);
        assert_eq!(ids(&first), [newest, in_mid_1]);
        let token = ListKey::of(first.last().unwrap());
        assert_eq!(ids(&list(&store, Some(&token), 2)), [in_mid_5, in_mid_9]);
        let token = ListKey::of(&all[3]);
        assert_eq!(ids(&list(&store, Some(&token), 2)), [oldest]);
        // `pick` filters and replaces: every other job, renamed.
        let mut n = 0;
        let picked = newest_first(&store, None, 2, usize::MAX, &|_| true, &mut |mut j| {
            n += 1;
            j.spec.as_mut().unwrap().tenant = "picked".into();
            (n % 2 == 1).then_some(j)
        })
        .unwrap()
        .jobs;
        assert_eq!(ids(&picked), [newest, in_mid_5]);
        assert!(
            picked
                .iter()
                .all(|j| j.spec.as_ref().unwrap().tenant == "picked")
        );
        // `may_match` passes records over before they are decoded.
        let none = newest_first(
            &store,
            None,
            10,
            usize::MAX,
            &|_| false,
            &mut |_| unreachable!(),
        )
        .unwrap()
        .jobs;
        assert!(none.is_empty());
    }

    #[test]
    fn older_ids_are_listed_among_new_ones_through_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let new_old = job(&timed(100, 1), 100, JobState::Succeeded);
        let legacy = job("job-0000000000aa", 200, JobState::Succeeded);
        let new_new = job(&timed(300, 1), 300, JobState::Succeeded);
        for j in [&new_old, &legacy, &new_new] {
            store_finished(&store, j);
        }
        assert_eq!(store.scan_raw(Keyspace::JobsByCreated).unwrap().len(), 1);
        let all = list(&store, None, 10);
        assert_eq!(
            ids(&all),
            [new_new.id.as_str(), "job-0000000000aa", new_old.id.as_str()]
        );
        let token = ListKey::of(&new_new);
        assert_eq!(ids(&list(&store, Some(&token), 1)), ["job-0000000000aa"]);
        let token = ListKey::of(&legacy);
        assert_eq!(ids(&list(&store, Some(&token), 10)), [new_old.id.as_str()]);
        // Finished at 110, 210 and 310.
        let mut cursor = ExpiryCursor::default();
        let expired = expire(&store, 250, 10, &|_| false, &mut cursor);
        assert_eq!(expired, ["job-0000000000aa", new_old.id.as_str()]);
        // When the index alone fills the batch (with a job after the cursor
        // within the cutoff), the walk keeps its place.
        let mut cursor = ExpiryCursor {
            after: Some(new_old.id.clone()),
        };
        assert_eq!(
            expire(&store, 350, 1, &|_| false, &mut cursor),
            ["job-0000000000aa"]
        );
        assert_eq!(cursor.after.as_deref(), Some(new_old.id.as_str()));
    }

    #[test]
    fn expiry_takes_jobs_finished_before_the_cutoff_in_bounded_passes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        // Jobs submitted at 100..110, finished 10 s later, except one still
        // running and one that ran until 1,000.
        let mut made = Vec::new();
        for second in 100..110 {
            let mut j = job(&timed(second, 0), second as i64, JobState::Succeeded);
            if second == 101 {
                j.state = JobState::Running as i32;
                j.finished_at = None;
            }
            if second == 102 {
                j.finished_at.as_mut().unwrap().seconds = 1_000;
            }
            store_finished(&store, &j);
            made.push(j.id);
        }
        let kept_by_caller = made[3].clone();
        let keep = move |id: &str| id == kept_by_caller;
        // Cutoff 200: everything finished except the running job, the late
        // one and the one the caller keeps. Each pass looks at 4 × limit
        // jobs at most and the next goes on from there.
        let mut cursor = ExpiryCursor::default();
        let first = expire(&store, 200, 1, &keep, &mut cursor);
        assert_eq!(first, [made[0].clone()]);
        let second = expire(&store, 200, 1, &keep, &mut cursor);
        assert_eq!(second, [made[4].clone()], "101 to 103 are kept: {second:?}");
        let rest = expire(&store, 200, 10, &keep, &mut cursor);
        assert_eq!(rest, made[5..].to_vec());
        // The walk reached the cutoff, so the next starts at the oldest.
        let again = expire(&store, 200, 10, &keep, &mut cursor);
        let mut everything = vec![made[0].clone()];
        everything.extend_from_slice(&made[4..]);
        assert_eq!(again, everything, "nothing was deleted");
        // Jobs submitted after the cutoff are never looked at: a cutoff of
        // 105 finds jobs submitted at 100 (finished at 110) not yet expired.
        assert!(expire(&store, 105, 10, &keep, &mut ExpiryCursor::default()).is_empty());
        let mut batch = WriteBatch::default();
        for entry in finished_before(&store, 200, 10, &keep, &mut ExpiryCursor::default()).unwrap()
        {
            assert!(entry.job.is_some() && entry.index_id.is_none());
            delete(&mut batch, &entry);
        }
        store.apply(batch).unwrap();
        let left = list(&store, None, 100);
        assert_eq!(
            ids(&left),
            [made[3].as_str(), made[2].as_str(), made[1].as_str()]
        );
        assert!(expire(&store, 2_000, 10, &|_| false, &mut cursor).contains(&made[2]));
    }

    #[test]
    fn a_budgeted_listing_pages_through_everything_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        // 60 seconds of time-ordered ids (0 to 3 a second, creation times
        // scattered within the second) and older 12-digit ids created in
        // the same seconds, found through the creation index.
        let mut seed = 0x9e37_79b9_u64;
        let mut next = || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            (seed >> 33) as u32
        };
        let mut legacy = 0;
        for second in 1_000..1_060_u64 {
            for k in 0..next() % 4 {
                let mut j = job(
                    &timed(second, next() % 1_000 + k),
                    second as i64,
                    JobState::Succeeded,
                );
                j.created_at.as_mut().unwrap().nanos = (next() % 1_000_000_000) as i32;
                store_finished(&store, &j);
            }
            if next() % 3 == 0 {
                legacy += 1;
                let id = format!("job-{legacy:012}");
                store_finished(&store, &job(&id, second as i64, JobState::Succeeded));
            }
        }
        // A filter few jobs pass.
        let wanted = |id: &str| id.bytes().map(u32::from).sum::<u32>() % 5 == 0;
        let everything: Vec<String> = list(&store, None, usize::MAX)
            .into_iter()
            .map(|j| j.id)
            .filter(|id| wanted(id))
            .collect();
        assert!(everything.len() > 5, "{}", everything.len());
        for budget in [1, 2, 7, 1_000] {
            for limit in [1, 3, 50] {
                let (mut before, mut paged, mut calls) = (None::<ListKey>, Vec::new(), 0);
                loop {
                    calls += 1;
                    assert!(calls < 1_000, "budget {budget} limit {limit}: no end");
                    let listed = newest_first(
                        &store,
                        before.as_ref(),
                        limit + 1,
                        budget,
                        &|_| true,
                        &mut |j| wanted(&j.id).then_some(j),
                    )
                    .unwrap();
                    let mut jobs = listed.jobs;
                    let more = jobs.len() > limit;
                    jobs.truncate(limit);
                    paged.extend(jobs.iter().map(|j| j.id.clone()));
                    before = match (more, jobs.last(), listed.resume) {
                        (true, Some(last), _) => Some(ListKey::of(last)),
                        (false, _, Some(resume)) => Some(resume),
                        _ => break,
                    };
                }
                assert_eq!(paged, everything, "budget {budget} limit {limit}");
                if budget == 1 && limit == 50 {
                    assert!(calls > 10, "a small budget pages in steps: {calls} calls");
                }
            }
        }
    }

    #[test]
    fn older_ids_list_newest_first_and_expire_oldest_first_by_the_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        for (id, created) in [
            ("job-000000000001", 100),
            ("job-000000000002", 200),
            ("job-000000000003", 300),
        ] {
            store_finished(&store, &job(id, created, JobState::Succeeded));
        }
        assert_eq!(store.scan_raw(Keyspace::JobsByCreated).unwrap().len(), 3);
        let old = "job-000000000001";
        let mid = "job-000000000002";
        let new = "job-000000000003";
        assert_eq!(ids(&list(&store, None, 10)), [new, mid, old]);
        let token = ListKey::new(200 * 1_000_000_000, mid);
        assert_eq!(ids(&list(&store, Some(&token), 10)), [old]);
        // Finished at 110, 210, 310: a cutoff of 300 expires two.
        let cursor = &mut ExpiryCursor::default();
        assert_eq!(expire(&store, 300, 10, &|_| false, cursor), [old, mid]);
        assert_eq!(expire(&store, 300, 1, &|_| false, cursor), [old]);
        let not_old = |id: &str| id == old;
        assert_eq!(
            expire(&store, 300, 1, &not_old, cursor),
            [mid],
            "a kept job takes no place in the batch"
        );
        let oldest = finished_before(&store, 300, 1, &|_| false, cursor)
            .unwrap()
            .remove(0);
        assert!(oldest.index_id.is_some());
        let mut batch = WriteBatch::default();
        delete(&mut batch, &oldest);
        store.apply(batch).unwrap();
        assert_eq!(expire(&store, 300, 10, &|_| false, cursor), [mid]);
        assert!(get(&store, old).unwrap().is_none());
        assert_eq!(ids(&list(&store, None, 10)), [new, mid]);
        assert_eq!(
            store.scan_raw(Keyspace::JobsByCreated).unwrap().len(),
            2,
            "the creation entry went too"
        );
    }

    #[test]
    fn migration_indexes_older_ids_and_drops_entries_new_ids_do_not_need() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let legacy = job("job-00000000000a", 5, JobState::Succeeded);
        let timed_job = job(&timed(5, 1), 5, JobState::Succeeded);
        let mut batch = WriteBatch::default();
        batch.put(Keyspace::Jobs, &legacy.id, &legacy);
        batch.put(Keyspace::Jobs, &timed_job.id, &timed_job);
        // Version 1 indexed every job, as the stores of the controllers
        // before this one have it.
        batch.put_raw(
            Keyspace::JobsByCreated,
            &created_key(&timed_job),
            b"team-a".to_vec(),
        );
        batch.put_raw(
            Keyspace::JobsByFinished,
            &format!("{}/{}", finished_bound(15), timed_job.id),
            Vec::new(),
        );
        store.apply(batch).unwrap();
        // A store without a version: the legacy job gains its two entries
        // and the time-ordered one loses the two it had.
        assert_eq!(migrate(&store).unwrap(), 1 + 2);
        let index_ids = |space| -> Vec<String> {
            store
                .scan_raw(space)
                .unwrap()
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(index_ids(Keyspace::JobsByCreated), [created_key(&legacy)]);
        assert_eq!(index_ids(Keyspace::JobsByFinished).len(), 1);
        assert_eq!(
            expire(&store, 100, 10, &|_| false, &mut ExpiryCursor::default()),
            [legacy.id.as_str(), timed_job.id.as_str()]
        );
        assert_eq!(migrate(&store).unwrap(), 0, "already current");

        // A version-1 store keeps its legacy entries and loses the others.
        let mut batch = WriteBatch::default();
        batch.put(Keyspace::Settings, INDEX_VERSION_SETTING, &1u64);
        batch.put_raw(
            Keyspace::JobsByCreated,
            &created_key(&timed_job),
            b"team-a".to_vec(),
        );
        store.apply(batch).unwrap();
        assert_eq!(migrate(&store).unwrap(), 1);
        assert_eq!(index_ids(Keyspace::JobsByCreated), [created_key(&legacy)]);
    }
}
