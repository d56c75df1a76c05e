//! The node registry: cordon, drain, leases (NotReady, Lost), listings and
//! capacity.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use gpufleet_proto::v1::{
    CapacityDimension, GetCapacityResponse, Job, JobState, Node, NodeState, WorkloadState,
};

use super::*;
use crate::error::{ControllerError, Result};
use crate::lifecycle::{
    derive_job_state, enforce_max_runtime, is_desired, job_nodes, requeue, task_holds_gpus,
};
use crate::store::{Keyspace, WriteBatch};
use crate::telemetry::TelemetryHub;
use crate::validate;

impl Controller {
    pub fn cordon_node(&self, node_id: &str, reason: &str) -> Result<Node> {
        validate::cordon_reason(reason)?;
        self.update_node(node_id, |node| {
            node.cordoned = true;
            node.cordon_reason = if reason.is_empty() {
                "cordoned by an operator".to_string()
            } else {
                reason.to_string()
            };
        })
    }

    pub fn uncordon_node(&self, node_id: &str) -> Result<Node> {
        let node = self.update_node(node_id, |node| {
            node.cordoned = false;
            node.cordon_reason.clear();
            node.drain_deadline = None;
        })?;
        self.inner.schedule.notify_one();
        Ok(node)
    }

    /// Cordons the node; work still running at the deadline is evicted and
    /// queued again.
    pub fn drain_node(&self, node_id: &str, deadline: Duration) -> Result<Node> {
        let at = self.inner.clock.now() + deadline;
        let node = self.update_node(node_id, |node| {
            node.cordoned = true;
            node.cordon_reason = "draining".to_string();
            node.drain_deadline = Some(prost_types::Timestamp::from(at));
        })?;
        self.check_leases()?;
        Ok(node)
    }

    pub(super) fn update_node(
        &self,
        node_id: &str,
        change: impl FnOnce(&mut Node),
    ) -> Result<Node> {
        validate::node_id("node_id", node_id)?;
        let mut state = self.lock();
        let entry = state.nodes.get(node_id).ok_or_else(|| {
            ControllerError::NotFound(format!("node {node_id} is not registered"))
        })?;
        let mut record = entry.record.clone();
        change(&mut record);
        let mut batch = WriteBatch::default();
        batch.put(Keyspace::Nodes, node_id, &record);
        self.inner.store.write(batch);
        if let Some(entry) = state.nodes.get_mut(node_id) {
            entry.record = record;
        }
        let entry = &state.nodes[node_id];
        Ok(node_view(&state, entry, &self.inner.telemetry))
    }

    /// Moves silent nodes to NotReady, then Lost; ends the tasks of lost
    /// nodes. Call about once a second.
    pub fn check_leases(&self) -> Result<()> {
        let mut state = self.lock();
        let now = self.inner.clock.monotonic();
        let config = &self.inner.config;
        let mut node_updates = Vec::new();
        let mut lost_nodes = Vec::new();
        for (id, entry) in &mut state.nodes {
            let silent = now.duration_since(entry.last_seen);
            let next = lease_transition(
                entry.record.state(),
                silent,
                entry.session.is_some(),
                config.node_not_ready_after,
                config.node_lost_after,
            );
            if let Some(next) = next {
                tracing::warn!(node_id = %id, silent_for = ?silent, state = ?next, "node lease missed");
                entry.record.set_state(next);
                node_updates.push((id.clone(), entry.record.clone()));
                if next == NodeState::Lost {
                    lost_nodes.push(id.clone());
                }
            }
        }
        let mut batch = WriteBatch::default();
        for (id, record) in &node_updates {
            batch.put(Keyspace::Nodes, id, record);
        }
        self.inner.store.write(batch);

        let mut changed = Vec::new();
        let mut retired = Vec::new();
        if !lost_nodes.is_empty() {
            for job in state.jobs.values() {
                let mut job = job.clone();
                let mut touched = false;
                for task in job
                    .tasks
                    .iter_mut()
                    .filter(|t| lost_nodes.contains(&t.node_id))
                {
                    if task_holds_gpus(task) {
                        task.set_state(WorkloadState::Lost);
                        task.message = format!("node {} was lost", task.node_id);
                        task.finished_at = Some(self.now_ts());
                        touched = true;
                    }
                }
                if touched {
                    retired.extend(derive_job_state(&mut job, self.now()));
                    job.version += 1;
                    changed.push(job);
                }
            }
        }
        // Max runtimes, and drains whose deadline passed.
        let wall = self.inner.clock.now();
        let drained: BTreeSet<String> = state
            .nodes
            .iter()
            .filter(|(_, e)| {
                e.record
                    .drain_deadline
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .is_some_and(|deadline| deadline <= wall)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for job in state.jobs.values() {
            if changed.iter().any(|c: &Job| c.id == job.id) {
                continue;
            }
            let mut job = job.clone();
            if let Some(ended) = enforce_max_runtime(&mut job, wall) {
                tracing::info!(job_id = %job.id, "job exceeded its max runtime");
                retired.extend(ended);
                job.version += 1;
                changed.push(job);
            } else if is_desired(&job)
                && job
                    .tasks
                    .iter()
                    .any(|t| drained.contains(&t.node_id) && task_holds_gpus(t))
            {
                let nodes: Vec<String> = job_nodes(&job)
                    .into_iter()
                    .filter(|n| drained.contains(n))
                    .collect();
                retired.extend(requeue(
                    &mut job,
                    format!("evicted: node {} was drained", nodes.join(",")),
                    None,
                    self.now(),
                ));
                job.version += 1;
                changed.push(job);
            }
        }
        let touched: BTreeSet<String> = changed.iter().flat_map(job_nodes).collect();
        let requeued = changed.iter().any(|j| j.state() == JobState::Pending);
        self.commit_jobs_retiring(&mut state, changed, retired)?;
        if requeued {
            self.inner.schedule.notify_one();
        }
        let resend: Vec<String> = state
            .nodes
            .iter()
            .filter(|(_, e)| {
                e.session
                    .as_ref()
                    .is_some_and(|s| s.undelivered.load(Ordering::SeqCst))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for node_id in touched.into_iter().chain(resend) {
            self.push_desired(&mut state, &node_id, false);
        }
        if !node_updates.is_empty() {
            self.inner.schedule.notify_one();
        }
        Ok(())
    }

    pub fn list_nodes(&self, provider: &str, region: &str, states: &[NodeState]) -> Vec<Node> {
        let state = self.lock();
        self.note_node_reads(&state, None);
        state
            .nodes
            .values()
            .filter(|e| {
                let identity = e.record.identity.clone().unwrap_or_default();
                (provider.is_empty() || identity.provider == provider)
                    && (region.is_empty() || identity.region == region)
                    && (states.is_empty() || states.contains(&e.record.state()))
            })
            .map(|e| node_view(&state, e, &self.inner.telemetry))
            .collect()
    }

    pub fn get_node(&self, node_id: &str) -> Result<Node> {
        validate::node_id("node_id", node_id)?;
        let state = self.lock();
        self.note_node_reads(&state, Some(node_id));
        state
            .nodes
            .get(node_id)
            .map(|e| node_view(&state, e, &self.inner.telemetry))
            .ok_or_else(|| ControllerError::NotFound(format!("node {node_id} is not registered")))
    }

    /// Declares to a reply tracking its reads (see
    /// [`crate::commit::tracking_reads`]) the queued writes a node view
    /// shows: the node records, and the jobs holding GPUs (a view names
    /// the job on each GPU).
    fn note_node_reads(&self, state: &State, node_id: Option<&str>) {
        let store = &self.inner.store;
        if !store.tracking_reads() {
            return;
        }
        store.note_read(match node_id {
            Some(id) => store.pending_key(Keyspace::Nodes, id),
            None => store.pending_space(Keyspace::Nodes),
        });
        for job in state.jobs.values() {
            if job.tasks.iter().any(task_holds_gpus) {
                store.note_read(store.pending_key(Keyspace::Jobs, &job.id));
            }
        }
    }

    pub fn capacity(&self, group_by: &[CapacityDimension]) -> Result<GetCapacityResponse> {
        let state = self.lock();
        let held = capacity::held_units(state.jobs.values());
        let mut response = capacity::summarize(
            state.nodes.iter().map(|(id, e)| (id.as_str(), &e.record)),
            &|uuid| held.get(uuid).copied().unwrap_or_default(),
            group_by,
        )?;
        response.as_of = Some(self.now_ts());
        Ok(response)
    }
}

/// The state a node moves to after `silent` without a message, if any:
/// Ready → NotReady (silent too long, or its stream ended) → Lost.
fn lease_transition(
    current: NodeState,
    silent: Duration,
    connected: bool,
    not_ready_after: Duration,
    lost_after: Duration,
) -> Option<NodeState> {
    match current {
        NodeState::Ready if silent >= not_ready_after || !connected => Some(NodeState::NotReady),
        NodeState::NotReady if silent >= lost_after => Some(NodeState::Lost),
        _ => None,
    }
}

/// GPU UUID → (job id, allocation id) for every GPU a task still holds.
/// (job id, allocation id) holding each GPU or MIG instance: one, or every
/// share of a shared GPU.
pub(super) fn held_gpus(state: &State) -> HashMap<String, Vec<(String, String)>> {
    let mut held: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for job in state.jobs.values() {
        for task in job.tasks.iter().filter(|t| task_holds_gpus(t)) {
            for uuid in &task.gpu_uuids {
                held.entry(uuid.clone())
                    .or_default()
                    .push((job.id.clone(), task.allocation_id.clone()));
            }
        }
    }
    held
}

pub(super) fn node_view(state: &State, entry: &NodeEntry, telemetry: &TelemetryHub) -> Node {
    let held = held_gpus(state);
    let mut node = entry.record.clone();
    let node_id = node
        .identity
        .as_ref()
        .map(|i| i.node_id.as_str())
        .unwrap_or_default();
    let mut latest = telemetry.latest_for_node(node_id);
    node.connected = entry.session.is_some();
    let mut allocated = 0;
    for gpu in &mut node.gpus {
        let uuid = gpu
            .info
            .as_ref()
            .map(|i| i.uuid.clone())
            .unwrap_or_default();
        // A shared GPU names every share's job; a MIG GPU its instances' jobs.
        let instances = gpu
            .info
            .as_ref()
            .map(|i| i.mig_instances.iter().map(|m| m.uuid.clone()).collect())
            .unwrap_or_else(Vec::new);
        let holders: Vec<&(String, String)> = std::iter::once(&uuid)
            .chain(instances.iter())
            .filter_map(|u| held.get(u))
            .flatten()
            .collect();
        if !holders.is_empty() {
            let join = |f: fn(&(String, String)) -> &str| {
                holders.iter().map(|h| f(h)).collect::<Vec<_>>().join(",")
            };
            gpu.job_id = join(|h| h.0.as_str());
            gpu.allocation_id = join(|h| h.1.as_str());
            allocated += 1;
        }
        gpu.latest = latest.remove(&uuid).map(Box::new);
    }
    node.allocated_gpus = allocated;
    crate::limits::clip_node(&mut node);
    node
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_move_ready_to_not_ready_to_lost_and_no_further() {
        let (not_ready, lost) = (Duration::from_secs(15), Duration::from_secs(60));
        let step = |state, silent_secs, connected| {
            lease_transition(
                state,
                Duration::from_secs(silent_secs),
                connected,
                not_ready,
                lost,
            )
        };
        assert_eq!(step(NodeState::Ready, 14, true), None);
        assert_eq!(step(NodeState::Ready, 15, true), Some(NodeState::NotReady));
        assert_eq!(
            step(NodeState::Ready, 0, false),
            Some(NodeState::NotReady),
            "stream ended"
        );
        assert_eq!(step(NodeState::NotReady, 59, false), None);
        assert_eq!(step(NodeState::NotReady, 60, false), Some(NodeState::Lost));
        assert_eq!(
            step(NodeState::Ready, 3600, true),
            Some(NodeState::NotReady),
            "one step per check"
        );
        assert_eq!(step(NodeState::Lost, 3600, false), None);
    }
}
