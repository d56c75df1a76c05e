//! A simulated agent: streams telemetry and runs what it is given.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use gpufleet_proto::v1::{
    AgentMessage, Allocation, TelemetryBatch, WorkloadState, WorkloadStatus, agent_message,
    controller_message,
};
use prost_types::Timestamp;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;

use super::*;
use crate::sim_agent::{self, Connection};

/// One simulated agent on its own stream: telemetry on a timer, and the
/// allocations of each desired state "run" for `job_runtime`.
pub(super) struct SimAgent {
    pub(super) node: usize,
    pub(super) gpus: usize,
    pub(super) job_runtime: Duration,
    pub(super) telemetry_interval: Duration,
    pub(super) counters: Arc<AgentCounters>,
    pub(super) errors: Arc<Errors>,
}

impl SimAgent {
    pub(super) async fn run(self, connection: Connection, mut stop: watch::Receiver<bool>) {
        let Connection {
            uplink,
            mut downlink,
        } = connection;
        let uuids: Vec<String> = (0..self.gpus)
            .map(|g| sim_agent::gpu_uuid(self.node, g))
            .collect();
        // Spread the fleet's batches over the interval, as real agents'
        // start times spread them.
        let offset = self
            .telemetry_interval
            .mul_f64((self.node % 1000) as f64 / 1000.0);
        let mut telemetry = tokio::time::interval_at(
            tokio::time::Instant::now() + offset,
            self.telemetry_interval,
        );
        telemetry.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The hello was seq 1.
        let mut seq = 1u64;
        let mut known: HashSet<String> = HashSet::new();
        // Constant runtime: finishing order is starting order.
        let mut running: VecDeque<(tokio::time::Instant, Allocation)> = VecDeque::new();
        let mut k = 0u64;
        loop {
            let next_finish = running.front().map(|(at, _)| *at);
            let message = tokio::select! {
                _ = stop.changed() => return,
                _ = telemetry.tick() => {
                    k += 1;
                    self.counters.batches.fetch_add(1, Ordering::Relaxed);
                    agent_message::Body::Telemetry(TelemetryBatch {
                        samples: sim_agent::batch(&uuids, SystemTime::now(), k),
                    })
                }
                _ = sleep_until_some(next_finish) => {
                    let Some((_, allocation)) = running.pop_front() else { continue };
                    self.counters.succeeded.fetch_add(1, Ordering::Relaxed);
                    let mut status = status_of(&allocation, WorkloadState::Succeeded);
                    status.exit_code = Some(0);
                    status.finished_at = Some(Timestamp::from(SystemTime::now()));
                    agent_message::Body::WorkloadStatus(status)
                }
                answer = downlink.message() => match answer {
                    Ok(Some(message)) => {
                        let Some(controller_message::Body::DesiredState(desired)) = message.body else {
                            continue;
                        };
                        // Level-triggered: forget what is no longer wanted,
                        // start what is new.
                        let wanted: HashSet<&str> =
                            desired.allocations.iter().map(|a| a.allocation_id.as_str()).collect();
                        known.retain(|id| wanted.contains(id.as_str()));
                        running.retain(|(_, a)| wanted.contains(a.allocation_id.as_str()));
                        let mut statuses = Vec::new();
                        for allocation in desired.allocations {
                            if known.insert(allocation.allocation_id.clone()) {
                                self.counters.started.fetch_add(1, Ordering::Relaxed);
                                let mut status = status_of(&allocation, WorkloadState::Running);
                                status.started_at = Some(Timestamp::from(SystemTime::now()));
                                statuses.push(status);
                                running.push_back((tokio::time::Instant::now() + self.job_runtime, allocation));
                            }
                        }
                        for status in statuses {
                            seq += 1;
                            let message = AgentMessage { seq, body: Some(agent_message::Body::WorkloadStatus(status)) };
                            if uplink.send(message).await.is_err() {
                                self.errors.record(format!("agent {}: the stream closed", self.node));
                                return;
                            }
                        }
                        continue;
                    }
                    Ok(None) => {
                        if !*stop.borrow() {
                            self.errors.record(format!("agent {}: the controller ended the stream", self.node));
                        }
                        return;
                    }
                    Err(status) => {
                        if !*stop.borrow() {
                            self.errors.record(format!("agent {}: stream error: {status}", self.node));
                        }
                        return;
                    }
                },
            };
            seq += 1;
            if uplink
                .send(AgentMessage {
                    seq,
                    body: Some(message),
                })
                .await
                .is_err()
            {
                self.errors
                    .record(format!("agent {}: the stream closed", self.node));
                return;
            }
        }
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn status_of(allocation: &Allocation, state: WorkloadState) -> WorkloadStatus {
    WorkloadStatus {
        allocation_id: allocation.allocation_id.clone(),
        job_id: allocation.job_id.clone(),
        task_index: allocation.task_index,
        state: state as i32,
        gpu_uuids: allocation.gpu_uuids.clone(),
        ..Default::default()
    }
}
