//! GPU health as agents report it, and an operator's return of a GPU to
//! service.

use std::collections::{BTreeMap, HashMap};

use gpufleet_proto::v1::{GpuHealth, GpuSample, Job, Node};

use super::*;
use crate::error::{ControllerError, Result};
use crate::lifecycle::task_holds_gpus;
use crate::validate;

impl UsageFeed {
    /// Feeds samples of allocated GPUs to their allocation's usage record
    /// and returns the GPUs whose health changed, as `(uuid, health)`. An
    /// operator's return to service holds until the fault is seen again
    /// (a later `last_seen`) or the agent reports the GPU healthy.
    fn observe(&mut self, samples: &[GpuSample]) -> Vec<(String, i32)> {
        let mut changes = Vec::new();
        for sample in samples {
            if let Some(owners) = self.gpu_owner.get(&sample.uuid) {
                for allocation in owners {
                    self.acc.entry(allocation.clone()).or_default().add(sample);
                }
            }
            // A MIG instance's own profiling (GPM) figures go to the
            // allocation that holds it; NVML has no per-instance utilisation.
            for mig in &sample.mig_samples {
                let Some(owners) = self.gpu_owner.get(&mig.uuid) else {
                    continue;
                };
                let own = GpuSample {
                    uuid: mig.uuid.clone(),
                    sampled_at: sample.sampled_at,
                    gpm: mig.gpm,
                    ..Default::default()
                };
                for allocation in owners {
                    self.acc.entry(allocation.clone()).or_default().add(&own);
                }
            }
            if let Some(&seen) = self.overrides.get(&sample.uuid) {
                if sample.health == GpuHealth::Healthy as i32 || last_fault_seen(sample) > seen {
                    self.overrides.remove(&sample.uuid);
                } else {
                    continue;
                }
            }
            // Older agents leave health unspecified: keep what the hello set.
            if sample.health != GpuHealth::Unspecified as i32 {
                let known = self
                    .health
                    .get(&sample.uuid)
                    .copied()
                    .unwrap_or(GpuHealth::Healthy as i32);
                if known != sample.health {
                    self.health.insert(sample.uuid.clone(), sample.health);
                    changes.push((sample.uuid.clone(), sample.health));
                }
            }
        }
        changes
    }
}

impl Controller {
    /// Returns a GPU to service now. The agent keeps reporting the fault
    /// until its clean period passes; those reports are ignored until the
    /// fault is seen *again* (a reason's `last_seen` moves past the one
    /// known now) or the agent reports the GPU healthy.
    pub fn uncordon_gpu(&self, node_id: &str, uuid: &str) -> Result<Node> {
        validate::node_id("node_id", node_id)?;
        {
            let state = self.lock();
            let entry = state.nodes.get(node_id).ok_or_else(|| {
                ControllerError::NotFound(format!("node {node_id} is not registered"))
            })?;
            if !entry
                .record
                .gpus
                .iter()
                .any(|g| g.info.as_ref().is_some_and(|i| i.uuid == uuid))
            {
                return Err(ControllerError::NotFound(format!(
                    "node {node_id} has no GPU {uuid:?}; `gpufleet nodes get {node_id}` lists its GPUs"
                )));
            }
        }
        let seen = self
            .inner
            .telemetry
            .latest_for_node(node_id)
            .get(uuid)
            .map_or(0, last_fault_seen);
        {
            let mut feed = self.usage_feed();
            feed.overrides.insert(uuid.to_string(), seen);
            feed.health
                .insert(uuid.to_string(), GpuHealth::Healthy as i32);
        }
        let node = self.update_node(node_id, |node| {
            for gpu in &mut node.gpus {
                if gpu.info.as_ref().is_some_and(|i| i.uuid == uuid) {
                    gpu.health = GpuHealth::Healthy as i32;
                }
            }
        })?;
        tracing::info!(
            node_id,
            gpu = uuid,
            "GPU returned to service by an operator"
        );
        self.inner.schedule.notify_one();
        Ok(node)
    }

    /// Validates and keeps a batch of samples. Takes only the telemetry
    /// locks: `accept_seq`, called for every message, already refreshed the
    /// node's lease.
    pub fn record_telemetry(&self, node_id: &str, samples: Vec<GpuSample>) {
        // GPU health, as the agent judges it (XIDs, ECC, remaps). The state
        // lock is taken only when a GPU's health changes, so ingest stays
        // off the state lock in the common case.
        let changes = self.usage_feed().observe(&samples);
        if !changes.is_empty() {
            let mut returned = false;
            let mut state = self.lock();
            if let Some(entry) = state.nodes.get_mut(node_id) {
                for (uuid, health) in &changes {
                    if let Some(gpu) = entry
                        .record
                        .gpus
                        .iter_mut()
                        .find(|g| g.info.as_ref().is_some_and(|i| &i.uuid == uuid))
                    {
                        returned |= gpu.health == GpuHealth::Unhealthy as i32
                            && *health != GpuHealth::Unhealthy as i32;
                        tracing::info!(node_id, gpu = %uuid, health = ?GpuHealth::try_from(*health).unwrap_or_default(), "GPU health changed");
                        gpu.health = *health;
                    }
                }
            }
            // A running job on a GPU that turned Unhealthy is told so: the
            // line lands in its history, and the log says which job to check.
            let sick: Vec<&String> = changes
                .iter()
                .filter(|(_, h)| *h == GpuHealth::Unhealthy as i32)
                .map(|(uuid, _)| uuid)
                .collect();
            let mut reported: BTreeMap<String, Job> = BTreeMap::new();
            if !sick.is_empty() {
                let reasons: HashMap<&str, String> = samples
                    .iter()
                    .map(|s| {
                        let why: Vec<String> =
                            s.health_reasons.iter().map(|r| r.message.clone()).collect();
                        (s.uuid.as_str(), why.join("; "))
                    })
                    .collect();
                for job in state.jobs.values() {
                    for task in job
                        .tasks
                        .iter()
                        .filter(|t| task_holds_gpus(t) && t.node_id == node_id)
                    {
                        for uuid in task.gpu_uuids.iter().filter(|u| sick.contains(u)) {
                            tracing::warn!(job_id = %job.id, node_id, gpu = %uuid, "a GPU of a running job became unhealthy");
                            let job = reported.entry(job.id.clone()).or_insert_with(|| {
                                let mut job = job.clone();
                                job.version += 1;
                                job
                            });
                            job.history.push(format!(
                                "GPU {uuid} on {node_id} became unhealthy while task {} ran: {}",
                                task.index,
                                reasons.get(uuid.as_str()).cloned().unwrap_or_default()
                            ));
                        }
                    }
                }
            }
            if let Err(e) = self.commit_jobs(&mut state, reported.into_values().collect()) {
                tracing::error!(error = %e, "cannot record an unhealthy GPU on its job");
            }
            drop(state);
            if returned {
                // A GPU came back into service: pending jobs may fit now.
                self.request_schedule();
            }
        }
        self.inner
            .telemetry
            .ingest(node_id, samples, self.inner.clock.now());
    }
}

/// When the sample's latest health fault was seen, in nanoseconds (0: none).
pub(super) fn last_fault_seen(sample: &GpuSample) -> i128 {
    sample
        .health_reasons
        .iter()
        .filter_map(|r| r.last_seen.as_ref())
        .map(|t| t.seconds as i128 * 1_000_000_000 + t.nanos as i128)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::HealthReason;

    fn sample(uuid: &str, health: GpuHealth, fault_seen_secs: Option<i64>) -> GpuSample {
        GpuSample {
            uuid: uuid.into(),
            health: health as i32,
            health_reasons: fault_seen_secs
                .map(|seconds| HealthReason {
                    last_seen: Some(prost_types::Timestamp { seconds, nanos: 0 }),
                    ..Default::default()
                })
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn health_changes_are_reported_once_and_an_override_holds_until_the_fault_recurs() {
        let mut feed = UsageFeed::default();
        let sick = sample("g0", GpuHealth::Unhealthy, Some(100));
        assert_eq!(
            feed.observe(std::slice::from_ref(&sick)),
            [("g0".to_string(), GpuHealth::Unhealthy as i32)]
        );
        assert!(
            feed.observe(std::slice::from_ref(&sick)).is_empty(),
            "no change, no report"
        );
        assert!(
            feed.observe(&[sample("g0", GpuHealth::Unspecified, None)])
                .is_empty(),
            "an older agent's unspecified health keeps what is known"
        );

        // An operator returns g0 to service with the fault seen at 100.
        feed.overrides.insert("g0".into(), last_fault_seen(&sick));
        feed.health.insert("g0".into(), GpuHealth::Healthy as i32);
        assert!(
            feed.observe(std::slice::from_ref(&sick)).is_empty(),
            "the same fault is ignored"
        );
        let again = sample("g0", GpuHealth::Unhealthy, Some(200));
        assert_eq!(feed.observe(&[again]).len(), 1, "a new occurrence counts");
        assert!(feed.overrides.is_empty());
    }
}
