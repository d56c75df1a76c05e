//! Scheduling passes, explain, and the market signals recorded once a
//! minute: the controller's side of the pure scheduler (see
//! [`crate::placement`] for the conversions).

use std::collections::BTreeSet;
use std::time::SystemTime;

use gpufleet_proto::v1::{JobState, TaskStatus};

use super::*;
use crate::error::{ControllerError, Result};
use crate::lifecycle::{is_desired, job_nodes, requeue};
use crate::placement;
use crate::store::{Keyspace, WriteBatch};
use crate::usage;
use crate::validate;
use gpufleet_scheduler::{Fleet, NodeInput, Outcome};

impl Controller {
    /// Waits until something may have made a pending job placeable.
    pub async fn schedule_wanted(&self) {
        self.inner.schedule.notified().await;
    }

    pub fn request_schedule(&self) {
        self.inner.schedule.notify_one();
    }

    /// One scheduling pass over every pending job. Returns how many were placed.
    pub fn schedule_pass(&self) -> Result<usize> {
        // While the store cannot write, a placement could not be made
        // durable (nor announced): pending jobs wait for the disk.
        if self.store_health().writes_refused().is_some() {
            return Ok(0);
        }
        let mut state = self.lock();
        let config = &self.inner.config.scheduler;
        let now = self.inner.clock.unix_secs();
        let (held, running_norm) = placement::tenant_allocation(state.jobs.values(), config);
        state.fair.advance(now, &running_norm);
        let pending = placement::pending_jobs(state.jobs.values());
        // Every finished task asks for a pass; with nothing queued there is
        // nothing to decide, and building the fleet index is most of a pass.
        if pending.is_empty() {
            return Ok(0);
        }
        let mut fleet = fleet_index(&state, &self.inner.config.topology_block_label);
        let inputs: Vec<gpufleet_scheduler::JobInput> =
            pending.iter().map(|j| placement::job_input(j)).collect();
        let tenants = placement::tenant_state(&state.fair, held);
        let result = gpufleet_scheduler::schedule(&mut fleet, &inputs, config, &tenants, now);

        let ts = self.now_ts();
        let mut changed = Vec::new();
        let mut starts = Vec::new();
        let mut victims: BTreeSet<String> = BTreeSet::new();
        for ((job, input), outcome) in pending.iter().zip(&inputs).zip(result.outcomes) {
            match outcome {
                Outcome::Placed(placements) => {
                    let mut job = (*job).clone();
                    job.set_state(JobState::Scheduled);
                    job.pending_reason = None;
                    job.scheduled_at = Some(ts);
                    job.not_before = None;
                    job.placement_note = placement::placement_note(
                        &placements,
                        &self.inner.config.topology_block_label,
                    );
                    if !job.placement_note.is_empty() {
                        tracing::info!(job_id = %job.id, note = %job.placement_note, "gang placed across regions or blocks");
                    }
                    job.tasks = placements
                        .into_iter()
                        .enumerate()
                        .map(|(index, p)| {
                            let model = state
                                .nodes
                                .get(&p.node_id)
                                .and_then(|e| {
                                    e.record
                                        .gpus
                                        .iter()
                                        .filter_map(|g| g.info.as_ref())
                                        .find(|i| {
                                            // A MIG instance's model is its GPU's.
                                            p.gpu_uuids.first().is_some_and(|u| {
                                                *u == i.uuid
                                                    || i.mig_instances.iter().any(|m| m.uuid == *u)
                                            })
                                        })
                                })
                                .map(|i| i.model.clone())
                                .unwrap_or_default();
                            // Kept with the task: a gang's peers stay the
                            // same for the attempt even if a node's
                            // address changes later.
                            let address = state
                                .nodes
                                .get(&p.node_id)
                                .and_then(|e| e.record.identity.as_ref())
                                .map(|i| {
                                    // An agent from before advertised
                                    // addresses: its host name.
                                    if i.address.is_empty() {
                                        i.hostname.clone()
                                    } else {
                                        i.address.clone()
                                    }
                                })
                                .unwrap_or_default();
                            TaskStatus {
                                index: index as u32,
                                // Unique per attempt: an agent never re-runs an
                                // allocation id it has seen finish.
                                allocation_id: if job.attempt == 0 {
                                    format!("{}.{index}", job.id)
                                } else {
                                    format!("{}.{index}.{}", job.id, job.attempt)
                                },
                                node_id: p.node_id,
                                gpu_uuids: p.gpu_uuids,
                                provider: p.provider,
                                region: p.region,
                                price_per_gpu_hour_micro_usd: p.price_per_gpu_hour_micro_usd,
                                generation: placement::generation_wire(p.generation),
                                model,
                                address,
                                gpu_share_milli: p.share_milli,
                                gpu_memory_limit_bytes: p.memory_limit_bytes,
                                mig_profile: p.mig_profile.unwrap_or_default(),
                                ..Default::default()
                            }
                        })
                        .collect();
                    job.version += 1;
                    tracing::info!(job_id = %job.id, nodes = ?job_nodes(&job), "job scheduled");
                    let wait_secs = job
                        .created_at
                        .and_then(|t| SystemTime::try_from(t).ok())
                        .and_then(|t| self.inner.clock.now().duration_since(t).ok())
                        .map_or(0.0, |d| d.as_secs_f64());
                    for task in &job.tasks {
                        starts.push(usage::market::StartEvent {
                            first_task: task.index == 0,
                            provider: task.provider.clone(),
                            region: task.region.clone(),
                            generation: task.generation,
                            wait_secs,
                            gpus: task.gpu_uuids.len() as u32,
                        });
                    }
                    changed.push(job);
                }
                Outcome::Preempting { victims: evict } => {
                    victims.extend(evict);
                    let reason = gpufleet_proto::v1::PendingReason {
                        code: gpufleet_scheduler::reason::PREEMPTING.to_string(),
                        message: "evicting lower-priority preemptible work to make room"
                            .to_string(),
                        exclusions: Vec::new(),
                    };
                    if job.pending_reason.as_ref() != Some(&reason) {
                        let mut job = (*job).clone();
                        job.pending_reason = Some(reason);
                        job.version += 1;
                        changed.push(job);
                    }
                }
                Outcome::Pending(verdict) => {
                    // The full explanation only when the verdict changes:
                    // it is the costly part of a pass.
                    let same = job
                        .pending_reason
                        .as_ref()
                        .is_some_and(|r| r.code == verdict.code());
                    if !same {
                        let reason = placement::explain_pending(&fleet, input, verdict);
                        let mut job = (*job).clone();
                        job.pending_reason = Some(reason);
                        job.version += 1;
                        changed.push(job);
                    }
                }
            }
        }
        let placed = changed
            .iter()
            .filter(|j| j.state() == JobState::Scheduled)
            .count();
        let mut retired = Vec::new();
        for victim in &victims {
            if let Some(job) = state.jobs.get(victim)
                && is_desired(job)
            {
                let mut job = job.clone();
                job.preemptions += 1;
                retired.extend(requeue(
                    &mut job,
                    "preempted by a higher-priority job".to_string(),
                    None,
                    self.now(),
                ));
                job.version += 1;
                tracing::info!(job_id = %job.id, "job preempted");
                changed.push(job);
            }
        }
        let touched: BTreeSet<String> = changed.iter().flat_map(job_nodes).collect();
        self.commit_jobs_retiring(&mut state, changed, retired)?;
        {
            let mut feed = self.usage_feed();
            for start in &starts {
                // One observation per job (its first task carries the wait).
                if start.first_task {
                    feed.queue_wait.observe(start.wait_secs);
                }
            }
        }
        for start in &starts {
            state.starts.record(start);
        }
        for node_id in touched {
            self.push_desired(&mut state, &node_id, false);
        }
        Ok(placed)
    }

    /// Once a minute: records market signals (and prunes what retention
    /// drops). Called from the lease ticker.
    pub fn record_market_minute(&self) -> Result<bool> {
        let minute = self.inner.clock.unix_secs() / 60;
        if minute <= self.lock().last_market_minute {
            return Ok(false);
        }
        self.record_market_at(minute)?;
        Ok(true)
    }

    /// Records the market signals of `minute` (Unix minutes) from the fleet
    /// and queue as they are now. The ticker calls it once a minute; tests
    /// and tools may call it directly.
    pub fn record_market_at(&self, minute: u64) -> Result<()> {
        let mut state = self.lock();
        let now = self.inner.clock.unix_secs().max(minute * 60);
        state.last_market_minute = state.last_market_minute.max(minute);
        let fleet = fleet_index(&state, &self.inner.config.topology_block_label);
        let pending: Vec<gpufleet_scheduler::JobInput> =
            placement::pending_jobs(state.jobs.values())
                .into_iter()
                .map(placement::job_input)
                .collect();
        let snapshot = gpufleet_scheduler::market::snapshot(&fleet, &pending);
        let starts = std::mem::take(&mut state.starts);
        let mut signals = usage::market::signals_for_minute(minute * 60, &snapshot, &starts);
        let spot_nodes = spot_nodes(&state);
        for signal in signals.iter_mut().filter(|s| !s.provider.is_empty()) {
            signal.spot_nodes = spot_nodes
                .get(&(
                    signal.provider.clone(),
                    signal.region.clone(),
                    signal.generation,
                ))
                .copied()
                .unwrap_or(0);
        }
        let mut batch = WriteBatch::default();
        for signal in &signals {
            batch.put(Keyspace::Market, &market_key(signal), signal);
        }
        for old in state.market.prune(now) {
            batch.delete(Keyspace::Market, &market_key(&old));
        }
        // Ledger retention: a walk that stops at the first record still
        // kept, so cheap when there is nothing to drop.
        let store = &self.inner.store;
        state
            .ledger
            .prune(store, &mut batch, now, LEDGER_PRUNE_BATCH)?;
        self.inner.store.write(batch);
        state.market.unmet_demand_gpus = snapshot.unmet_demand_gpus;
        for signal in signals {
            state.market.push(signal);
        }
        state.interruption_rates = super::interruptions::scheduler_rates(&state, now);
        Ok(())
    }

    /// Why a job is pending, per constraint and per region, against the
    /// fleet as it is now.
    pub fn explain_job(&self, id: &str) -> Result<gpufleet_proto::v1::ExplainJobResponse> {
        validate::job_id("job_id", id)?;
        let state = self.lock();
        let job = self
            .find_job(&state, id)?
            .ok_or_else(|| ControllerError::NotFound(format!("job {id} does not exist")))?;
        let fleet = fleet_index(&state, &self.inner.config.topology_block_label);
        let input = placement::job_input(&job);
        let code = match job.state() {
            JobState::Pending => job
                .pending_reason
                .as_ref()
                .map(|r| r.code.clone())
                .unwrap_or_else(|| gpufleet_scheduler::reason::WAITING_FOR_SCHEDULER.to_string()),
            _ => String::new(),
        };
        let (mut reason, regions, mut summary) = placement::explain_job(&fleet, &input, &code);
        if job.state() != JobState::Pending {
            reason.code = String::new();
            if !job.placement_note.is_empty() {
                summary = format!("placed, but {}. {summary}", job.placement_note);
            }
            summary = format!(
                "job {} is {} (not pending); this is how the fleet looks to its request now: {summary}",
                job.id,
                job.state()
                    .as_str_name()
                    .trim_start_matches("JOB_STATE_")
                    .to_ascii_lowercase()
            );
        }
        let mut job = job;
        crate::limits::clip_job(&mut job);
        Ok(gpufleet_proto::v1::ExplainJobResponse {
            job: Some(job),
            reason: Some(reason),
            regions,
            summary,
        })
    }
}

pub(super) fn market_key(signal: &gpufleet_proto::v1::MarketSignal) -> String {
    format!(
        "{:012}/{}/{}/{}",
        signal.at.map_or(0, |t| t.seconds),
        signal.provider,
        signal.region,
        signal.generation
    )
}

/// The scheduler's view of the fleet now.
/// Spot nodes connected and Ready per (provider, region, generation).
fn spot_nodes(state: &State) -> std::collections::BTreeMap<(String, String, i32), u32> {
    let mut out = std::collections::BTreeMap::new();
    for entry in state
        .nodes
        .values()
        .filter(|e| e.session.is_some() && e.record.state() == gpufleet_proto::v1::NodeState::Ready)
    {
        let Some(identity) = entry.record.identity.as_ref().filter(|i| i.spot) else {
            continue;
        };
        let generation = prices::first_gpu(&entry.record).map_or(0, |i| i.generation);
        *out.entry((
            identity.provider.clone(),
            identity.region.clone(),
            generation,
        ))
        .or_insert(0) += 1;
    }
    out
}

/// The scheduler's index of the fleet as it is now; `block_label`: the
/// node label naming a node's network block (`topology_block_label`).
pub(super) fn fleet_index(state: &State, block_label: &str) -> Fleet {
    let nodes: Vec<NodeInput> = state
        .nodes
        .values()
        .map(|e| {
            let mut input = placement::node_input(&e.record, e.session.is_some(), block_label);
            // A price source's price wins over the node's configured one.
            if let Some(price) = state.prices.resolve(&prices::node_price_key(&e.record)) {
                input.price_per_gpu_hour_micro_usd = price;
            }
            if input.spot {
                let generation = prices::first_gpu(&e.record).map_or(0, |i| i.generation);
                input.interruption_milli_per_hour = state
                    .interruption_rates
                    .get(&(input.provider.clone(), input.region.clone(), generation))
                    .copied()
                    .unwrap_or(0);
            }
            input
        })
        .collect();
    let running = placement::running_inputs(state.jobs.values());
    Fleet::build(&nodes, &running)
}
