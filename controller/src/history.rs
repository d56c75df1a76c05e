//! Where jobs live. A job is *resident* (held in memory) while it is live:
//! not finished, or finished with tasks that still hold GPUs. A settled job
//! (finished, every task ended) can never change again, so it lives in the
//! store only, found through two indexes: by creation time (listings, newest
//! first) and by end time (retention, oldest first). Memory therefore grows
//! with the jobs in flight, not with history.

use gpufleet_proto::v1::{Job, JobState};

use crate::lifecycle::{is_terminal_job, task_holds_gpus};
use crate::store::{self, IdRange, Keyspace, Store, StoreError, WriteBatch};

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
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!(
        "job-{:09x}{:07x}",
        secs & 0xf_ffff_ffff,
        random & 0x0fff_ffff
    )
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
/// creation entry for a new job, the end entry when it finishes.
pub fn index(batch: &mut WriteBatch, before: Option<&Job>, job: &Job) {
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

/// An entry of the end-time index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub index_id: String,
    pub job_id: String,
}

/// Adds the deletion of a finished job, its record (when still stored)
/// and its index entries to `batch`.
pub fn delete(batch: &mut WriteBatch, entry: &Finished, job: Option<&Job>) {
    batch.delete(Keyspace::JobsByFinished, &entry.index_id);
    batch.delete(Keyspace::Jobs, &entry.job_id);
    if let Some(job) = job {
        batch.delete(Keyspace::JobsByCreated, &created_key(job));
    }
}

/// A stored job.
pub fn get(store: &dyn Store, id: &str) -> Result<Option<Job>, StoreError> {
    store::get(store, Keyspace::Jobs, id)
}

/// Jobs that finished before `cutoff_secs`, oldest first, at most `limit`,
/// passing over those `keep` names (they neither count nor appear).
pub fn finished_before(
    store: &dyn Store,
    cutoff_secs: u64,
    limit: usize,
    keep: &dyn Fn(&str) -> bool,
) -> Result<Vec<Finished>, StoreError> {
    let to = finished_bound(cutoff_secs);
    let mut ids = Vec::new();
    store.visit_raw(
        Keyspace::JobsByFinished,
        IdRange::below(&to),
        &mut |key, _| {
            if let Some((_, id)) = key.split_once('/')
                && !keep(id)
            {
                ids.push(Finished {
                    index_id: key.to_string(),
                    job_id: id.to_string(),
                });
            }
            ids.len() < limit
        },
    )?;
    Ok(ids)
}

/// Walks the creation index newest first, strictly before `before` (an
/// index id; None = from the newest), calling `visit(job id, tenant)`
/// until it returns false.
pub fn newest_first(
    store: &dyn Store,
    before: Option<&str>,
    visit: &mut dyn FnMut(&str, &str) -> bool,
) -> Result<(), StoreError> {
    store.visit_raw(
        Keyspace::JobsByCreated,
        IdRange {
            from: "",
            to: before,
            reverse: true,
        },
        &mut |key, tenant| {
            let Some((_, id)) = key.split_once('/') else {
                return true;
            };
            visit(id, &String::from_utf8_lossy(tenant))
        },
    )
}

/// Stores written before the job and usage indexes existed get them once,
/// at open; the setting records that it was done.
const INDEX_VERSION_SETTING: &str = "index-version";
const INDEX_VERSION: u64 = 1;

/// Builds the indexes of a store that predates them. Returns how many jobs
/// were indexed (0 when the store was already indexed).
pub fn migrate(store: &dyn Store) -> Result<usize, StoreError> {
    if store::get::<u64>(store, Keyspace::Settings, INDEX_VERSION_SETTING)?
        .is_some_and(|v| v >= INDEX_VERSION)
    {
        return Ok(0);
    }
    let mut writer = store::ChunkedWriter::new(store);
    store::visit::<Job>(store, Keyspace::Jobs, IdRange::default(), |_, job| {
        index(writer.batch(), None, &job);
        writer.record_done()?;
        Ok(true)
    })?;
    let jobs = writer.finish()?;
    crate::usage::index_records(store)?;
    let mut batch = WriteBatch::default();
    batch.put(Keyspace::Settings, INDEX_VERSION_SETTING, &INDEX_VERSION);
    store.apply(batch)?;
    Ok(jobs)
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

    #[test]
    fn indexes_list_newest_first_and_expire_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let mut batch = WriteBatch::default();
        for (id, created) in [("job-old", 100), ("job-mid", 200), ("job-new", 300)] {
            let pending = job(id, created, JobState::Pending);
            index(&mut batch, None, &pending);
            let done = job(id, created, JobState::Succeeded);
            index(&mut batch, Some(&pending), &done);
            batch.put(Keyspace::Jobs, id, &done);
        }
        store.apply(batch).unwrap();
        let mut seen = Vec::new();
        newest_first(&store, None, &mut |id, tenant| {
            assert_eq!(tenant, "team-a");
            seen.push(id.to_string());
            true
        })
        .unwrap();
        assert_eq!(seen, ["job-new", "job-mid", "job-old"]);
        // A page token is an index id: strictly older jobs follow it.
        let token = created_bound(200 * 1_000_000_000, "job-mid");
        let mut seen = Vec::new();
        newest_first(&store, Some(&token), &mut |id, _| {
            seen.push(id.to_string());
            true
        })
        .unwrap();
        assert_eq!(seen, ["job-old"]);
        // Finished at 110, 210, 310: a cutoff of 300 expires two.
        let ids = |limit| -> Vec<String> {
            finished_before(&store, 300, limit, &|_| false)
                .unwrap()
                .into_iter()
                .map(|f| f.job_id)
                .collect()
        };
        assert_eq!(ids(10), ["job-old", "job-mid"]);
        assert_eq!(ids(1), ["job-old"]);
        let not_old = |id: &str| id == "job-old";
        assert_eq!(
            finished_before(&store, 300, 1, &not_old).unwrap()[0].job_id,
            "job-mid",
            "a kept job takes no place in the batch"
        );
        let oldest = finished_before(&store, 300, 1, &|_| false)
            .unwrap()
            .remove(0);
        let mut batch = WriteBatch::default();
        delete(
            &mut batch,
            &oldest,
            get(&store, "job-old").unwrap().as_ref(),
        );
        store.apply(batch).unwrap();
        assert_eq!(ids(10), ["job-mid"]);
        assert!(get(&store, "job-old").unwrap().is_none());
        let mut seen = Vec::new();
        newest_first(&store, None, &mut |id, _| {
            seen.push(id.to_string());
            true
        })
        .unwrap();
        assert_eq!(seen, ["job-new", "job-mid"], "the creation entry went too");
    }

    #[test]
    fn migration_indexes_an_old_store_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let mut batch = WriteBatch::default();
        batch.put(
            Keyspace::Jobs,
            "job-a",
            &job("job-a", 5, JobState::Succeeded),
        );
        store.apply(batch).unwrap();
        assert_eq!(migrate(&store).unwrap(), 1);
        assert_eq!(
            finished_before(&store, 100, 10, &|_| false).unwrap()[0].job_id,
            "job-a"
        );
        assert_eq!(migrate(&store).unwrap(), 0, "already indexed");
    }
}
