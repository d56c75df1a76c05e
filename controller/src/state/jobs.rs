//! Jobs: submit, read, list, cancel, and the commit of job changes (with
//! their usage records) under the state lock; finished-job retention.

use std::collections::{BTreeMap, HashSet};
use std::time::SystemTime;

use gpufleet_proto::v1::{
    Job, JobSpec, JobState, ListJobsResponse, PendingReason, TaskStatus, WorkloadState,
};
use tokio::sync::broadcast;

use super::job_ids::Taken;
use super::ledger::task_facts;
use super::*;
use crate::error::{ControllerError, Result};
use crate::history;
use crate::lifecycle::{job_nodes, task_holds_gpus};
use crate::limits;
use crate::placement;

use crate::store::{Keyspace, WriteBatch};
use crate::usage;
use crate::validate;

impl Controller {
    /// The catalog plus any model a node reported that the catalog lacks.
    pub(super) fn submit_rules(&self, state: &State) -> validate::SubmitRules {
        let mut models = self.inner.known_models.clone();
        for entry in state.nodes.values() {
            for info in entry.record.gpus.iter().filter_map(|g| g.info.as_ref()) {
                if !info.model.is_empty() && !models.iter().any(|m| m.name == info.model) {
                    models.push(validate::ModelFacts {
                        name: info.model.clone(),
                        generation: info.generation,
                        memory_bytes: info.memory_bytes,
                        compute_capability: (
                            info.compute_capability_major,
                            info.compute_capability_minor,
                        ),
                    });
                }
            }
        }
        models.sort_by(|a, b| a.name.cmp(&b.name));
        let config = &self.inner.config;
        let mut tenants: Vec<String> = config.scheduler.tenants.keys().cloned().collect();
        tenants.sort();
        validate::SubmitRules {
            models,
            tenants,
            queues: config.queues.clone(),
        }
    }

    pub fn submit_job(&self, spec: JobSpec) -> Result<Job> {
        let mut state = self.lock();
        let spec = validate::job_spec(spec, &self.submit_rules(&state))?;
        if let Some(secret) = spec
            .workload
            .as_ref()
            .and_then(|w| w.container.as_ref())
            .map(|c| c.registry_secret.as_str())
            .filter(|s| !s.is_empty())
            && !self.inner.secrets.exists(&spec.tenant, secret)
        {
            return Err(crate::error::ControllerError::invalid(
                "spec.workload.container.registry_secret",
                format!(
                    "tenant {:?} has no registry secret {secret:?}; create it with `gpufleet secrets put {secret} --registry HOST --username USER` (password on stdin)",
                    spec.tenant
                ),
            ));
        }
        // 28 random bits per second: a collision is rare but would
        // overwrite a finished job's record, so it is checked: in memory
        // where memory knows every id of that second (`job_ids`), else in
        // the store (its queue, then sled or etcd).
        // One clock read for the id and the creation time: listings order
        // by the id's second, then the creation time.
        let now = self.inner.clock.now();
        let id = loop {
            let random = uuid::Uuid::new_v4().as_u128() as u32 & 0x0fff_ffff;
            let candidate = history::new_job_id(now, random);
            let second = history::submit_second(&candidate).unwrap_or(0);
            if state.jobs.contains_key(&candidate) {
                continue;
            }
            let taken = match state.issued_ids.check(second, random) {
                Taken::Yes => true,
                Taken::No => false,
                Taken::AskTheStore => history::get(&self.inner.store, &candidate)?.is_some(),
            };
            if !taken {
                state.issued_ids.issued(second, random);
                break candidate;
            }
        };
        let job = Job {
            id: id.clone(),
            spec: Some(spec),
            state: JobState::Pending as i32,
            pending_reason: Some(PendingReason {
                code: gpufleet_scheduler::reason::WAITING_FOR_SCHEDULER.to_string(),
                message: "waiting for the next scheduling pass".to_string(),
                exclusions: Vec::new(),
            }),
            created_at: Some(now.into()),
            version: 1,
            ..Default::default()
        };
        let mut batch = WriteBatch::default();
        batch.put(Keyspace::Jobs, &id, &job);
        history::index(&mut batch, None, &job);
        self.inner.store.write(batch);
        state.jobs.insert(id.clone(), job.clone());
        self.announce_job(job.clone());
        drop(state);
        tracing::info!(job_id = %id, "job submitted");
        self.inner.schedule.notify_one();
        Ok(job)
    }

    /// The job as served: stored free text clipped (`limits::clip_job`).
    pub fn get_job(&self, id: &str) -> Result<Job> {
        validate::job_id("job_id", id)?;
        let mut job = self.find_job(&self.lock(), id)?.ok_or_else(|| {
            ControllerError::NotFound(format!(
                "job {id} does not exist (finished jobs are kept for {}; their usage records stay: gpufleet usage records --job {id})",
                humantime::format_duration(self.inner.config.finished_job_retention)
            ))
        })?;
        limits::clip_job(&mut job);
        Ok(job)
    }

    /// A resident job from memory, else a settled one from the store.
    /// Declares to a reply tracking its reads the queued write it shows.
    pub(super) fn find_job(&self, state: &State, id: &str) -> Result<Option<Job>> {
        let store = &self.inner.store;
        store.note_read(store.pending_key(Keyspace::Jobs, id));
        if let Some(job) = state.jobs.get(id) {
            return Ok(Some(job.clone()));
        }
        Ok(history::get(&self.inner.store, id)?)
    }

    /// Deletes finished jobs that ended more than `finished_job_retention`
    /// before `now`, from the store and then from memory, at most `limit` per
    /// call so that the state lock is never held long. Their usage records
    /// stay in the ledger. Returns how many were deleted.
    pub fn gc_finished_jobs(&self, now: SystemTime, limit: usize) -> Result<usize> {
        let cutoff = now
            .checked_sub(self.inner.config.finished_job_retention)
            .map_or(0, placement::unix_secs);
        let store = &self.inner.store;
        let mut guard = self.lock();
        let state = &mut *guard;
        let mut batch = WriteBatch::default();
        let mut deleted = Vec::new();
        // A finished job whose tasks still hold GPUs (a lost node not yet
        // given up) is resident and stays until they end.
        let jobs = &state.jobs;
        let resident = |id: &str| jobs.contains_key(id);
        for entry in history::finished_before(store, cutoff, limit, &resident, &mut state.expiry)? {
            history::delete(&mut batch, &entry);
            if let Some(job) = &entry.job {
                deleted.push(job.state());
            }
        }
        if batch.is_empty() {
            return Ok(0);
        }
        self.inner.store.write(batch);
        for job_state in &deleted {
            if let Some(count) = state.settled.get_mut(job_state) {
                *count = count.saturating_sub(1);
            }
        }
        Ok(deleted.len())
    }

    /// One page, newest first: at most `page_size` jobs and at most
    /// `limits::RESPONSE_BUDGET_BYTES` encoded, stored free text clipped
    /// (`limits::clip_job`), so that no page passes what a gRPC client
    /// accepts by default.
    pub fn list_jobs(
        &self,
        states: &[JobState],
        tenant: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<ListJobsResponse> {
        let page_size = match page_size {
            0 => 100,
            n if n > 1000 => {
                return Err(ControllerError::invalid(
                    "page_size",
                    format!("is {n}; at most 1000"),
                ));
            }
            n => n as usize,
        };
        validate::label_filter("tenant", tenant)?;
        validate::filter_list("states", states.len())?;
        validate::page_token(page_token)?;
        // Newest first: by submit second, creation time and id, descending
        // (`history::ListKey`). The token is the key of the last job returned.
        let after = if page_token.is_empty() {
            None
        } else {
            Some(parse_page_token(page_token)?)
        };
        let wanted = |job: &Job| {
            (states.is_empty() || states.contains(&job.state()))
                && (tenant.is_empty() || job.spec.as_ref().is_some_and(|s| s.tenant == tenant))
        };
        let below_token = |job: &Job| {
            after
                .as_ref()
                .is_none_or(|key| history::ListKey::of(job) < *key)
        };
        let newest_first = |jobs: &mut Vec<Job>| {
            jobs.sort_by_cached_key(|job| std::cmp::Reverse(history::ListKey::of(job)))
        };
        let token = |key: &history::ListKey| format!("{}:{}", key.nanos, key.id);
        // What a page shows may include any queued job write.
        let store = &self.inner.store;
        store.note_read(store.pending_space(Keyspace::Jobs));
        let only_live = !states.is_empty() && states.iter().all(|s| !is_terminal_job(*s));
        if only_live {
            // Only resident jobs can be in these states: no store walk.
            let mut jobs: Vec<Job> = self
                .lock()
                .jobs
                .values()
                .filter(|job| wanted(job) && below_token(job))
                .cloned()
                .collect();
            newest_first(&mut jobs);
            let more = jobs.len() > page_size;
            jobs.truncate(page_size);
            let next_page_token = match (more, jobs.last()) {
                (true, Some(last)) => token(&history::ListKey::of(last)),
                _ => String::new(),
            };
            return Ok(within_budget(jobs, next_page_token, &token));
        }

        // The store walk runs without the state lock: a filter few jobs
        // match can examine many records.
        // A record that does not contain the tenant's name is not the
        // tenant's: passed over without decoding it.
        let tenant_bytes = tenant.as_bytes();
        let may_match = |bytes: &[u8]| {
            tenant_bytes.is_empty() || bytes.windows(tenant_bytes.len()).any(|w| w == tenant_bytes)
        };
        let listed = history::newest_first(
            &self.inner.store,
            after.as_ref(),
            page_size + 1,
            LIST_SCAN_BUDGET,
            &may_match,
            &mut |stored| wanted(&stored).then_some(stored),
        )?;
        // Everything at or above `covered` (and below the token) was
        // examined: where the walk stopped, or the last of a full page's
        // matches; None when the walk reached the oldest job.
        let covered = match listed.resume {
            Some(resume) => Some(resume),
            None if listed.jobs.len() > page_size => listed.jobs.last().map(history::ListKey::of),
            None => None,
        };
        let in_covered = |job: &Job| {
            covered
                .as_ref()
                .is_none_or(|c| history::ListKey::of(job) >= *c)
        };
        // Resident jobs are newer than their stored records by at most a
        // commit: listed as they are now, including those whose stored
        // record did not match but whose current state does.
        let mut jobs = Vec::with_capacity(listed.jobs.len());
        {
            let state = self.lock();
            for stored in listed.jobs {
                match state.jobs.get(&stored.id) {
                    Some(resident) => {
                        if wanted(resident) {
                            jobs.push(resident.clone());
                        }
                    }
                    None => jobs.push(stored),
                }
            }
            let seen: HashSet<&str> = jobs.iter().map(|job| job.id.as_str()).collect();
            let resident: Vec<Job> = state
                .jobs
                .values()
                .filter(|job| {
                    !seen.contains(job.id.as_str())
                        && wanted(job)
                        && below_token(job)
                        && in_covered(job)
                })
                .cloned()
                .collect();
            jobs.extend(resident);
        }
        newest_first(&mut jobs);
        let next_page_token = if jobs.len() > page_size {
            jobs.truncate(page_size);
            jobs.last()
                .map(|last| token(&history::ListKey::of(last)))
                .unwrap_or_default()
        } else {
            // A short page (even an empty one) with a token: the walk
            // stopped at its budget, or found more matches than fit.
            covered.as_ref().map(token).unwrap_or_default()
        };
        Ok(within_budget(jobs, next_page_token, &token))
    }

    pub fn cancel_job(&self, id: &str, reason: &str) -> Result<Job> {
        validate::job_id("job_id", id)?;
        validate::cancel_reason(reason)?;
        let mut state = self.lock();
        let Some(mut job) = self.find_job(&state, id)? else {
            return Err(ControllerError::NotFound(format!(
                "job {id} does not exist"
            )));
        };
        if is_terminal_job(job.state()) {
            return Ok(job);
        }
        job.set_state(JobState::Cancelled);
        job.pending_reason = None;
        job.finished_at = Some(self.now_ts());
        job.message = if reason.is_empty() {
            "cancelled by request".to_string()
        } else {
            format!("cancelled: {reason}")
        };
        // Tasks the agent never acknowledged would otherwise hold their GPUs
        // forever: nothing is running to report an end.
        for task in &mut job.tasks {
            if task.state() == WorkloadState::Unspecified {
                task.set_state(WorkloadState::Stopped);
                task.message = "cancelled before it started".to_string();
                task.finished_at = Some(self.now_ts());
            }
        }
        job.version += 1;
        let nodes = job_nodes(&job);
        self.commit_jobs(&mut state, vec![job.clone()])?;
        for node_id in nodes {
            self.push_desired(&mut state, &node_id, false);
        }
        drop(state);
        tracing::info!(job_id = %id, "job cancelled");
        self.inner.schedule.notify_one();
        Ok(job)
    }

    /// Sends a job change to watchers once its writes are durable. Call it
    /// under the state lock, after the change's write, so that watchers see
    /// changes in the order they were made. Events are served to `WatchJob`
    /// as they are: clipped like `get_job`.
    pub(super) fn announce_job(&self, mut job: Job) {
        limits::clip_job(&mut job);
        let events = self.inner.job_events.clone();
        self.inner.store.hold(move || {
            let _ = events.send(job);
        });
    }

    /// Every job change, once durable. Subscribe before reading the
    /// current job to miss nothing.
    pub fn subscribe_jobs(&self) -> broadcast::Receiver<Job> {
        self.inner.job_events.subscribe()
    }

    /// Persists changed jobs (one atomic batch), then updates memory and
    /// announces them.
    pub(super) fn commit_jobs(&self, state: &mut State, jobs: Vec<Job>) -> Result<()> {
        self.commit_jobs_retiring(state, jobs, Vec::new())
    }

    /// Like `commit_jobs`, where `retired` holds tasks that a return to the
    /// queue dropped from these jobs (see `lifecycle::settle_requeue`):
    /// they ended with this change, so their usage records belong in the
    /// same batch.
    pub(super) fn commit_jobs_retiring(
        &self,
        state: &mut State,
        jobs: Vec<Job>,
        retired: Vec<TaskStatus>,
    ) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        let now_ms = self.inner.clock.unix_secs() * 1000;
        let mut records = Vec::new();
        for job in &jobs {
            batch.put(Keyspace::Jobs, &job.id, job);
            history::index(&mut batch, state.jobs.get(&job.id), job);
            // A task that just ended gets its ledger record in the same
            // atomic batch: written exactly once, whatever restarts later.
            // Exactly once without reading the store: a task ends once (an
            // ended task never changes again, `lifecycle::apply_status`;
            // allocation ids are unique per attempt), memory changes only
            // with the write that makes it so, and that write carries the
            // record, so a task that held GPUs in memory has none yet.
            let before = state.jobs.get(&job.id);
            let prefix = format!("{}.", job.id);
            let retired_here = retired
                .iter()
                .filter(|t| t.allocation_id.starts_with(&prefix));
            for task in job.tasks.iter().chain(retired_here) {
                let was_holding = before
                    .and_then(|b| {
                        b.tasks
                            .iter()
                            .find(|t| t.allocation_id == task.allocation_id)
                    })
                    .is_some_and(task_holds_gpus);
                if !was_holding || task_holds_gpus(task) {
                    continue;
                }
                let facts = task_facts(state, task, now_ms);
                let feed = self.usage_feed();
                if let Some(record) = usage::build_record(
                    job,
                    task,
                    &facts,
                    feed.acc.get(&task.allocation_id),
                    now_ms,
                ) {
                    usage::put_record(&mut batch, &record);
                    records.push(record);
                }
            }
        }
        self.inner.store.write(batch);
        let now_secs = now_ms / 1000;
        let mut feed = self.usage_feed();
        for record in records {
            feed.acc.remove(&record.allocation_id);
            state.ledger.add(&record, now_secs);
        }
        for job in jobs {
            if let Some(before) = state.jobs.get(&job.id) {
                for task in &before.tasks {
                    for uuid in &task.gpu_uuids {
                        feed.disown(uuid, &task.allocation_id);
                    }
                }
            }
            for task in job.tasks.iter().filter(|t| task_holds_gpus(t)) {
                for uuid in &task.gpu_uuids {
                    feed.own(uuid, &task.allocation_id);
                }
            }
            if history::is_resident(&job) {
                state.jobs.insert(job.id.clone(), job.clone());
            } else {
                // Settled: it can never change again; the store has it.
                state.jobs.remove(&job.id);
                *state.settled.entry(job.state()).or_insert(0) += 1;
            }
            self.announce_job(job);
        }
        Ok(())
    }

    /// Job counts by state, for `/metrics`.
    /// Jobs held in memory: the live ones (see [`history`]).
    pub fn resident_jobs(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Jobs by state, resident and settled.
    pub fn job_counts(&self) -> BTreeMap<JobState, u64> {
        let state = self.lock();
        let mut counts = state.settled.clone();
        for job in state.jobs.values() {
            *counts.entry(job.state()).or_insert(0) += 1;
        }
        counts
    }
}

pub(super) fn parse_page_token(token: &str) -> Result<history::ListKey> {
    let invalid = || {
        ControllerError::invalid(
            "page_token",
            "is not a token this server issued; pass next_page_token unchanged",
        )
    };
    let (nanos, id) = token.split_once(':').ok_or_else(invalid)?;
    let nanos = nanos.parse().map_err(|_| invalid())?;
    if id.is_empty() {
        // Where a listing stopped between two seconds (`second_start`).
        if nanos % 1_000_000_000 != 0 {
            return Err(invalid());
        }
        return Ok(history::second_start(nanos / 1_000_000_000));
    }
    validate::job_id("page_token", id).map_err(|_| invalid())?;
    Ok(history::ListKey::new(nanos, id))
}

/// A page clipped to the response budget: stored free text clipped, and
/// the page cut before the job that would pass the budget, whose key
/// becomes the next page token (the next page starts below the last job
/// returned, as for a full page).
fn within_budget(
    mut jobs: Vec<Job>,
    next_page_token: String,
    token: &dyn Fn(&history::ListKey) -> String,
) -> ListJobsResponse {
    jobs.iter_mut().for_each(limits::clip_job);
    let fit = limits::fitting(&jobs);
    if fit == jobs.len() {
        return ListJobsResponse {
            jobs,
            next_page_token,
        };
    }
    jobs.truncate(fit);
    let next_page_token = jobs
        .last()
        .map(|last| token(&history::ListKey::of(last)))
        .unwrap_or_default();
    ListJobsResponse {
        jobs,
        next_page_token,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_are_a_jobs_key_or_a_seconds_start() {
        let id = "job-00000041f0000300";
        let key = parse_page_token(&format!("1055000000123:{id}")).unwrap();
        assert_eq!(key, history::ListKey::new(1_055_000_000_123, id));
        // Where a budgeted listing stopped: below every job of second 1,055.
        let start = parse_page_token("1055000000000:").unwrap();
        assert_eq!(start, history::second_start(1_055));
        assert!(start < key);
        assert!(history::second_start(1_054) < start);
        for bad in ["1055000000123:", "x:", "1055", ":job-1", "12:not an id"] {
            let err = parse_page_token(bad).unwrap_err().to_string();
            assert!(err.contains("page_token"), "{bad}: {err}");
        }
    }
}
