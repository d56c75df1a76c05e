//! The sampler: samples the backend every interval, attributes GPU
//! processes and XIDs to the allocations that own them, judges health, and
//! keeps the latest samples for the local API, `/metrics` and the uplink.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use gpufleet_proto::v1::agent_message::Body;
use gpufleet_proto::v1::{GpuInfo, GpuSample, NodeIdentity, TelemetryBatch, WorkloadState};
use tokio::sync::watch;
use tracing::warn;

use crate::backend::GpuBackend;
use crate::health::{HealthPolicy, HealthTracker, Owner, RawXid};
use crate::kmsg;
use crate::outbox::Outbox;
use crate::supervisor::Supervisor;

/// The same XID from NVML and the kernel log within this window is one event.
const XID_DEDUP_WINDOW: Duration = Duration::from_secs(5);

/// Static node facts plus the latest samples.
#[derive(Debug)]
pub struct Telemetry {
    pub identity: NodeIdentity,
    pub gpus: Vec<GpuInfo>,
    pub driver_version: String,
    pub backend_name: &'static str,
    latest: watch::Sender<Arc<Vec<GpuSample>>>,
    health: Mutex<HealthTracker>,
    /// XIDs read from the kernel log, drained every sample.
    kmsg_xids: Arc<Mutex<Vec<RawXid>>>,
    /// Job id running on each GPU (absent: idle), as of the latest sample.
    gpu_jobs: Mutex<Arc<HashMap<String, String>>>,
    /// XIDs already taken, for de-duplicating NVML against kmsg.
    seen_xids: Mutex<Vec<RawXid>>,
}

impl Telemetry {
    pub fn new(identity: NodeIdentity, backend: &dyn GpuBackend, policy: HealthPolicy) -> Self {
        Self {
            identity,
            gpus: backend.gpus(),
            driver_version: backend.driver_version(),
            backend_name: backend.name(),
            latest: watch::Sender::new(Arc::new(Vec::new())),
            health: Mutex::new(HealthTracker::new(policy)),
            kmsg_xids: Arc::new(Mutex::new(Vec::new())),
            gpu_jobs: Mutex::new(Arc::new(HashMap::new())),
            seen_xids: Mutex::new(Vec::new()),
        }
    }

    /// The most recent samples (empty before the first one).
    pub fn latest(&self) -> Arc<Vec<GpuSample>> {
        self.latest.borrow().clone()
    }

    /// Notified on every new set of samples.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<GpuSample>>> {
        self.latest.subscribe()
    }

    /// Job id per busy GPU UUID, as of the latest sample.
    pub fn gpu_jobs(&self) -> Arc<HashMap<String, String>> {
        self.gpu_jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts the `/dev/kmsg` reader thread (when the kernel log is readable).
    pub(crate) fn start_kmsg_reader(&self) {
        kmsg::spawn_reader(&self.gpus, self.kmsg_xids.clone());
    }

    /// One round: sample, attribute, judge health, publish. Returns what
    /// was published.
    pub fn sample_once(
        &self,
        backend: &dyn GpuBackend,
        supervisor: &Supervisor,
    ) -> Arc<Vec<GpuSample>> {
        let owners = WorkloadOwners::from_supervisor(supervisor);
        backend.set_workload_pids(&owners.pids_by_gpu);
        let mut samples = backend.sample();
        for sample in &mut samples {
            for p in &mut sample.processes {
                if let Some((allocation_id, job_id)) = owners.owner_of_pid(p.pid) {
                    p.allocation_id = allocation_id.clone();
                    p.job_id = job_id.clone();
                }
            }
        }
        // Shared allocations over their GPU memory limit are stopped.
        supervisor.enforce_memory_limits(&samples);
        let now = SystemTime::now();
        let mut xids = backend.drain_xids();
        xids.append(&mut self.kmsg_xids.lock().unwrap_or_else(|e| e.into_inner()));
        let xids = {
            let mut seen = self.seen_xids.lock().unwrap_or_else(|e| e.into_inner());
            dedup_xids(&mut seen, xids, now)
        };
        let visible = backend.visible_gpu_count();
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(now, &mut samples, xids, visible, &|uuid| {
                owners.by_gpu.get(uuid).cloned()
            });
        let jobs = owners
            .by_gpu
            .iter()
            .map(|(uuid, (_, job))| (uuid.clone(), job.clone()))
            .collect();
        *self.gpu_jobs.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(jobs);
        let samples = Arc::new(samples);
        self.latest.send_replace(samples.clone());
        samples
    }

    /// Samples every `interval` until `shutdown` turns true; every round
    /// goes into the outbox for the controller.
    pub(crate) async fn run_sampler(
        self: Arc<Self>,
        backend: Arc<dyn GpuBackend>,
        supervisor: Supervisor,
        outbox: Arc<Outbox>,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let (this, b, s) = (self.clone(), backend.clone(), supervisor.clone());
            let outbox = outbox.clone();
            // NVML calls and the outbox write block; keep them off the
            // async workers.
            let sampled = tokio::task::spawn_blocking(move || {
                // An operator's MIG layouts, on GPUs that became idle.
                s.apply_mig_layouts();
                let samples = this.sample_once(b.as_ref(), &s);
                if samples.is_empty() {
                    return Ok(());
                }
                let batch = TelemetryBatch {
                    samples: samples.as_ref().clone(),
                };
                outbox.append(Body::Telemetry(batch)).map(|_| ())
            })
            .await;
            match sampled {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "samples not recorded for the controller"),
                Err(e) => warn!(error = %e, "GPU sampling failed"),
            }
        }
    }
}

/// Which allocation owns which GPU and process, from the supervisor.
#[derive(Debug, Default)]
struct WorkloadOwners {
    by_gpu: HashMap<String, Owner>,
    /// Workload pid = its process group id (the supervisor starts each
    /// workload in its own group).
    by_pgid: HashMap<u32, Owner>,
    pids_by_gpu: HashMap<String, Vec<u32>>,
}

impl WorkloadOwners {
    fn from_supervisor(supervisor: &Supervisor) -> Self {
        let mut o = Self::default();
        for st in supervisor.statuses() {
            if !matches!(st.state(), WorkloadState::Running | WorkloadState::Starting) {
                continue;
            }
            let owner = (st.allocation_id.clone(), st.job_id.clone());
            for uuid in &st.gpu_uuids {
                o.by_gpu.insert(uuid.clone(), owner.clone());
                if st.pid > 0 {
                    o.pids_by_gpu.entry(uuid.clone()).or_default().push(st.pid);
                }
            }
            if st.pid > 0 {
                o.by_pgid.insert(st.pid, owner);
            }
        }
        o
    }

    fn owner_of_pid(&self, pid: u32) -> Option<&Owner> {
        if let Some(o) = self.by_pgid.get(&pid) {
            return Some(o);
        }
        let raw = i32::try_from(pid).ok()?;
        let pgid = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(raw))).ok()?;
        self.by_pgid.get(&u32::try_from(pgid.as_raw()).ok()?)
    }
}

/// Drops an XID already reported by another source within
/// [`XID_DEDUP_WINDOW`]; `seen` keeps the window's XIDs.
fn dedup_xids(seen: &mut Vec<RawXid>, xids: Vec<RawXid>, now: SystemTime) -> Vec<RawXid> {
    seen.retain(|x| {
        now.duration_since(x.at)
            .map_or(true, |d| d <= XID_DEDUP_WINDOW * 2)
    });
    let mut out = Vec::with_capacity(xids.len());
    for x in xids {
        let duplicate = seen.iter().any(|s| {
            s.gpu_uuid == x.gpu_uuid
                && s.xid == x.xid
                && s.source != x.source
                && s.at
                    .duration_since(x.at)
                    .or_else(|_| x.at.duration_since(s.at))
                    .is_ok_and(|d| d <= XID_DEDUP_WINDOW)
        });
        if !duplicate {
            seen.push(x.clone());
            out.push(x);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(xid: u32, source: &'static str, secs: u64) -> RawXid {
        RawXid {
            gpu_uuid: "GPU-a".into(),
            xid,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1000 + secs),
            source,
        }
    }

    #[test]
    fn the_same_xid_from_two_sources_counts_once() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1010);
        let mut seen = Vec::new();
        let out = dedup_xids(
            &mut seen,
            vec![x(79, "nvml", 0), x(79, "kmsg", 1), x(48, "kmsg", 1)],
            now,
        );
        assert_eq!(out.len(), 2);
        // Later, from the other source, still within the window.
        let out = dedup_xids(&mut seen, vec![x(48, "nvml", 3)], now);
        assert!(out.is_empty());
        // Repeats from one source are real repeats.
        let out = dedup_xids(&mut seen, vec![x(79, "nvml", 2)], now);
        assert_eq!(out.len(), 1);
    }
}
