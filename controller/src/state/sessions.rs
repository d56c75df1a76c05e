//! Agent sessions: hello and reconciliation, sequence numbers and acks,
//! workload status events, and the desired-state push.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gpufleet_proto::v1::{
    AgentHello, Allocation, ControllerMessage, DesiredState, GpuHealth, GpuStatus, HelloAck,
    JobState, Node, NodeState, WorkloadState, WorkloadStatus, controller_message,
};
use tokio::sync::mpsc;

use super::*;
use crate::error::{ControllerError, Result};
use crate::lifecycle::{
    apply_status, derive_job_state, gang_for, is_desired, job_nodes, task_holds_gpus,
};
use crate::store::{Keyspace, StoreError, WriteBatch};
use crate::validate;

impl Controller {
    /// Registers an agent's stream. Refuses a node id that another live
    /// agent holds.
    pub fn connect_agent(&self, hello: AgentHello) -> Result<AgentSession> {
        let identity = hello
            .identity
            .clone()
            .ok_or_else(|| ControllerError::invalid("hello.identity", "is required"))?;
        validate::node_id("hello.identity.node_id", &identity.node_id)?;
        crate::limits::check_hello(&hello)?;
        for (field, value) in [
            ("provider", &identity.provider),
            ("region", &identity.region),
        ] {
            if value.is_empty() {
                return Err(ControllerError::invalid(
                    format!("hello.identity.{field}"),
                    format!("is empty; configure the agent's {field}"),
                ));
            }
        }
        self.inner
            .auth
            .check_join_token(&identity.node_id, &hello.join_token)?;
        let mut seen = HashSet::new();
        for gpu in &hello.gpus {
            if gpu.uuid.is_empty() || !seen.insert(gpu.uuid.as_str()) {
                return Err(ControllerError::invalid(
                    "hello.gpus",
                    format!(
                        "GPU UUIDs must be present and unique; {:?} is not",
                        gpu.uuid
                    ),
                ));
            }
        }

        let node_id = identity.node_id.clone();
        let mut state = self.lock();
        let now = self.inner.clock.monotonic();
        if let Some(entry) = state.nodes.get(&node_id)
            && entry.session.is_some()
            && now.duration_since(entry.last_seen) < self.inner.config.node_not_ready_after
        {
            {
                return Err(ControllerError::AlreadyExists(format!(
                    "node id {node_id} is held by another connected agent (host {:?}); give each agent a distinct node id (--node-id)",
                    entry
                        .record
                        .identity
                        .as_ref()
                        .map(|i| i.hostname.as_str())
                        .unwrap_or("")
                )));
            }
        }
        // After the live-session check, so that an agent refused as a
        // duplicate never binds (or rebinds) the id.
        // The binding of a first registration is written with the node's
        // record: one flushed batch per registration.
        let mut batch = WriteBatch::default();
        let identity_check =
            self.inner
                .auth
                .check_node(&mut batch, &node_id, &hello.node_secret)?;
        let (tx, rx) = mpsc::channel(DOWNLINK_CAPACITY);
        let session_id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let previous = state.nodes.remove(&node_id);
        let registered_at = previous
            .as_ref()
            .and_then(|p| p.record.registered_at)
            .unwrap_or_else(|| self.now_ts());
        let record = Node {
            identity: Some(identity),
            state: NodeState::Ready as i32,
            gpus: hello
                .gpus
                .iter()
                .map(|info| GpuStatus {
                    info: Some(info.clone()),
                    health: GpuHealth::Healthy as i32,
                    ..Default::default()
                })
                .collect(),
            registered_at: Some(registered_at),
            last_seen_at: Some(self.now_ts()),
            connected: true,
            agent_version: hello.agent_version.clone(),
            driver_version: hello.driver_version.clone(),
            allocated_gpus: 0,
            // Maintenance state belongs to operators; a reconnect keeps it.
            cordoned: previous.as_ref().is_some_and(|p| p.record.cordoned),
            cordon_reason: previous
                .as_ref()
                .map(|p| p.record.cordon_reason.clone())
                .unwrap_or_default(),
            drain_deadline: previous.as_ref().and_then(|p| p.record.drain_deadline),
            mig_layouts: previous
                .as_ref()
                .map(|p| {
                    super::mig_layout::with_refusals(
                        &p.record.mig_layouts,
                        &hello.refused_mig_layouts,
                    )
                })
                .unwrap_or_default(),
        };
        batch.put(Keyspace::Nodes, &node_id, &record);
        self.inner.store.write(batch);
        let issued_secret = self.inner.auth.bound(identity_check);
        let uuids: Vec<String> = hello.gpus.iter().map(|g| g.uuid.clone()).collect();
        self.inner.telemetry.register_node(&node_id, &uuids);
        let generation = previous
            .as_ref()
            .map_or(0, |p| p.generation)
            .max(hello.applied_generation);
        let last_seq = previous.as_ref().map_or(0, |p| p.last_seq);
        let persisted_seq = previous.as_ref().map_or(0, |p| p.persisted_seq);
        state.nodes.insert(
            node_id.clone(),
            NodeEntry {
                record,
                last_seen: now,
                session: Some(Session {
                    id: session_id,
                    tx: tx.clone(),
                    undelivered: Arc::new(AtomicBool::new(false)),
                }),
                generation,
                last_seq,
                persisted_seq,
                last_sent: None,
            },
        );
        let ack = ControllerMessage {
            body: Some(controller_message::Body::HelloAck(HelloAck {
                node_id: node_id.clone(),
                last_seq,
                heartbeat_interval_ms: HEARTBEAT_INTERVAL.as_millis() as u32,
                server_time: Some(self.now_ts()),
                node_secret: issued_secret.unwrap_or_default(),
            })),
        };
        // After the hello's writes (the node's record, a new identity
        // binding whose secret the ack carries). A fresh channel has room;
        // failing here means the receiver is gone.
        self.inner.store.hold(move || {
            let _ = tx.try_send(Box::new(ack));
        });

        // Reconcile what the agent reports against what we believe.
        let reported: HashMap<&str, &WorkloadStatus> = hello
            .workloads
            .iter()
            .map(|w| (w.allocation_id.as_str(), w))
            .collect();
        let mut changed = Vec::new();
        let mut retired = Vec::new();
        let mut port_learned = Vec::new();
        for job in state.jobs.values() {
            let mut job_changed = job.clone();
            let mut touched = false;
            for task in job_changed
                .tasks
                .iter_mut()
                .filter(|t| t.node_id == node_id)
            {
                if let Some(status) = reported.get(task.allocation_id.as_str()) {
                    let port_before = task.rendezvous_port;
                    touched |= apply_status(task, status, self.now());
                    if task.index == 0 && port_before == 0 && task.rendezvous_port != 0 {
                        port_learned.push(job.id.clone());
                    }
                } else if matches!(
                    task.state(),
                    WorkloadState::Starting | WorkloadState::Pulling | WorkloadState::Running
                ) {
                    task.set_state(WorkloadState::Lost);
                    task.message = "the agent reconnected without this workload (it restarted or lost track of it)".to_string();
                    task.finished_at = Some(self.now_ts());
                    touched = true;
                } else if task.state() == WorkloadState::Unspecified && !is_desired(job) {
                    // The agent never received it, and the job no longer
                    // wants it (e.g. a gang partner failed while the
                    // controller was down): nothing will ever report its
                    // end, so release its GPUs now.
                    task.set_state(WorkloadState::Stopped);
                    task.message =
                        "never started: the job no longer needed it when its agent reconnected"
                            .to_string();
                    task.finished_at = Some(self.now_ts());
                    touched = true;
                }
            }
            if touched {
                retired.extend(derive_job_state(&mut job_changed, self.now()));
                job_changed.version += 1;
                changed.push(job_changed);
            }
        }
        self.commit_jobs_retiring(&mut state, changed, retired)?;
        self.push_desired(&mut state, &node_id, true);
        // A rank 0 whose port the controller learns only now: its peers wait.
        let peer_nodes: BTreeSet<String> = port_learned
            .iter()
            .filter_map(|id| state.jobs.get(id))
            .filter(|job| is_desired(job))
            .flat_map(job_nodes)
            .filter(|node| *node != node_id)
            .collect();
        for node in peer_nodes {
            self.push_desired(&mut state, &node, true);
        }
        drop(state);
        tracing::info!(node_id = %node_id, gpus = hello.gpus.len(), session_id, "agent connected");
        self.inner.schedule.notify_one();
        Ok(AgentSession {
            node_id,
            session_id,
            downlink: rx,
        })
    }

    /// The agent's stream ended.
    pub fn disconnect_agent(&self, node_id: &str, session_id: u64) {
        let mut state = self.lock();
        if let Some(entry) = state.nodes.get_mut(node_id)
            && entry.session.as_ref().is_some_and(|s| s.id == session_id)
        {
            entry.session = None;
            entry.record.connected = false;
            tracing::info!(node_id, "agent disconnected");
        }
    }

    /// Refreshes the node's lease; returns false when the message is a
    /// duplicate (already applied), or when the controller is shutting
    /// down: what is not acknowledged the agent sends again to the next
    /// controller. Apply the message, then `applied_seq`.
    pub fn accept_seq(&self, node_id: &str, seq: u64) -> bool {
        if *self.inner.closing.borrow() {
            return false;
        }
        let mut state = self.lock();
        let Some(entry) = state.nodes.get_mut(node_id) else {
            return false;
        };
        entry.last_seen = self.inner.clock.monotonic();
        entry.record.last_seen_at = Some(self.now_ts());
        seq == 0 || seq > entry.last_seq
    }

    /// Marks message `seq` applied and acknowledges it. Only after the
    /// message's effects are in the store (write first, then act): an
    /// agent may forget what was acknowledged.
    pub fn applied_seq(&self, node_id: &str, seq: u64) {
        if seq == 0 {
            // Unsequenced (hellos, heartbeats): nothing to acknowledge.
            return;
        }
        let mut state = self.lock();
        let Some(entry) = state.nodes.get_mut(node_id) else {
            return;
        };
        entry.last_seq = entry.last_seq.max(seq);
        if let Some(session) = &entry.session {
            let ack = ControllerMessage {
                body: Some(controller_message::Body::Ack(gpufleet_proto::v1::Ack {
                    seq,
                })),
            };
            // Sent once the message's effects are durable (its writes were
            // queued before this). Acks are cumulative: dropping one when
            // the channel is full is harmless.
            let tx = session.tx.clone();
            self.inner.store.hold(move || {
                let _ = tx.try_send(Box::new(ack));
            });
        }
    }

    /// Writes each agent's highest applied seq that changed since the last
    /// call, so a restarted controller keeps dropping replays of events it
    /// already applied. Called after each telemetry flush and at shutdown;
    /// returns how many were written.
    pub fn persist_agent_seqs(&self) -> std::result::Result<usize, StoreError> {
        let changed: Vec<(String, u64)> = self
            .lock()
            .nodes
            .iter()
            .filter(|(_, e)| e.last_seq != e.persisted_seq)
            .map(|(id, e)| (id.clone(), e.last_seq))
            .collect();
        if changed.is_empty() {
            return Ok(0);
        }
        let mut batch = WriteBatch::default();
        for (id, seq) in &changed {
            batch.put(Keyspace::AgentSeq, id, seq);
        }
        // Queued after the writes of every message these seqs cover, and
        // writes become durable in order: once this one is, so are they.
        self.inner.store.apply(batch)?;
        let mut state = self.lock();
        for (id, seq) in &changed {
            if let Some(entry) = state.nodes.get_mut(id) {
                entry.persisted_seq = entry.persisted_seq.max(*seq);
            }
        }
        Ok(changed.len())
    }

    /// Counts an agent stream until the guard is dropped, so shutdown can
    /// wait for ingest to stop before its last flush.
    pub fn agent_stream_started(&self) -> AgentStreamGuard {
        self.inner.agent_streams.fetch_add(1, Ordering::SeqCst);
        AgentStreamGuard {
            controller: self.clone(),
        }
    }

    /// Agent streams still being read.
    pub fn agent_streams(&self) -> usize {
        self.inner.agent_streams.load(Ordering::SeqCst)
    }

    /// Applies a workload status event from `node_id`.
    pub fn record_workload_status(&self, node_id: &str, mut status: WorkloadStatus) -> Result<()> {
        // An agent's message is clipped, not refused: the status carries state.
        gpufleet_core::limits::clip(&mut status.message, crate::limits::STATUS_MESSAGE_BYTES);
        let mut state = self.lock();
        if let Some(entry) = state.nodes.get_mut(node_id) {
            entry.last_seen = self.inner.clock.monotonic();
        }
        let job_id = if status.job_id.is_empty() {
            status
                .allocation_id
                .split('.')
                .next()
                .unwrap_or_default()
                .to_string()
        } else {
            status.job_id.clone()
        };
        let Some(job) = state.jobs.get(&job_id) else {
            tracing::debug!(node_id, allocation_id = %status.allocation_id, "status for an unknown job ignored");
            return Ok(());
        };
        let mut job = job.clone();
        let Some(task) = job
            .tasks
            .iter_mut()
            .find(|t| t.allocation_id == status.allocation_id && t.node_id == node_id)
        else {
            return Ok(());
        };
        let released = !is_terminal_workload(task.state()) && is_terminal_workload(status.state());
        let port_before = task.rendezvous_port;
        if !apply_status(task, &status, self.now()) {
            return Ok(());
        }
        // Rank 0 chose its rendezvous port: the other ranks' agents, which
        // hold their launch until they know it, get it with their next
        // desired state (written first, sent after).
        let port_learned = task.index == 0 && port_before == 0 && task.rendezvous_port != 0;
        let was_desired = is_desired(&job);
        let retired = derive_job_state(&mut job, self.now());
        job.version += 1;
        let is_desired_after = is_desired(&job);
        let left_desired = was_desired && !is_desired_after;
        let requeued = job.state() == JobState::Pending;
        let nodes = job_nodes(&job);
        tracing::info!(job_id = %job.id, allocation_id = %status.allocation_id, state = ?status.state(), job_state = ?job.state(), "workload status");
        self.commit_jobs_retiring(&mut state, vec![job], retired)?;
        if left_desired || (port_learned && is_desired_after) {
            for node in nodes {
                self.push_desired(&mut state, &node, port_learned);
            }
        }
        drop(state);
        if released || requeued {
            self.inner.schedule.notify_one();
        }
        Ok(())
    }

    /// Sends the node its whole desired allocation set if it changed (or
    /// always, with `force`).
    pub(super) fn push_desired(&self, state: &mut State, node_id: &str, force: bool) {
        let mut allocations = desired_allocations(state, node_id);
        // Credentials only on the wire, resolved now (never in a record).
        for allocation in &mut allocations {
            let Some(secret) = allocation
                .workload
                .as_ref()
                .and_then(|w| w.container.as_ref())
                .map(|c| c.registry_secret.as_str())
                .filter(|s| !s.is_empty())
            else {
                continue;
            };
            let tenant = state
                .jobs
                .get(&allocation.job_id)
                .and_then(|j| j.spec.as_ref())
                .map(|s| s.tenant.as_str())
                .unwrap_or_default();
            allocation.registry_auth = self.inner.secrets.resolve(tenant, secret);
        }
        let Some(entry) = state.nodes.get_mut(node_id) else {
            return;
        };
        let ids: Vec<String> = allocations
            .iter()
            .map(|a| a.allocation_id.clone())
            .collect();
        let Some(session) = &entry.session else {
            return;
        };
        let retry = session.undelivered.swap(false, Ordering::SeqCst);
        if !force && !retry && entry.last_sent.as_ref() == Some(&ids) {
            return;
        }
        entry.generation += 1;
        let message = ControllerMessage {
            body: Some(controller_message::Body::DesiredState(DesiredState {
                generation: entry.generation,
                allocations,
                mig_layouts: entry.record.mig_layouts.clone(),
            })),
        };
        // Sent once the writes it reflects are durable, in order with the
        // node's other messages. A full channel is retried on the next
        // lease tick (the whole set: re-sending is always safe).
        let tx = session.tx.clone();
        let undelivered = session.undelivered.clone();
        self.inner.store.hold(move || {
            if tx.try_send(Box::new(message)).is_err() {
                undelivered.store(true, Ordering::SeqCst);
            }
        });
        entry.last_sent = Some(ids);
    }
}

pub(super) fn desired_allocations(state: &State, node_id: &str) -> Vec<Allocation> {
    let mut allocations: Vec<Allocation> = state
        .jobs
        .values()
        .filter(|job| is_desired(job))
        .flat_map(|job| {
            job.tasks
                .iter()
                .filter(|t| t.node_id == node_id && task_holds_gpus(t))
                .map(move |t| Allocation {
                    allocation_id: t.allocation_id.clone(),
                    job_id: job.id.clone(),
                    task_index: t.index,
                    gpu_uuids: t.gpu_uuids.clone(),
                    workload: job.spec.as_ref().and_then(|s| s.workload.clone()),
                    gang: gang_for(job, t.index),
                    // A MIG instance is whole to its workload: only a share
                    // tells the agent to share (MPS or time-slicing).
                    gpu_share_milli: if t.mig_profile.is_empty() {
                        t.gpu_share_milli
                    } else {
                        0
                    },
                    gpu_memory_limit_bytes: t.gpu_memory_limit_bytes,
                    // Filled on the wire only (`push_desired`), never stored.
                    registry_auth: None,
                })
        })
        .collect();
    allocations.sort_by(|a, b| a.allocation_id.cmp(&b.allocation_id));
    allocations
}
