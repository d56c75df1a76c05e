//! What may run: the local API's requests (refused when bad) and the
//! controller's desired state, reconciled against what runs (started when
//! missing, stopped when no longer wanted, forgotten once finished).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use gpufleet_proto::v1::{Allocation, DesiredState, WorkloadState, WorkloadStatus};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use super::workload::{WAITING_FOR_PORT, Workload, awaits_port};
use super::{Source, State, Supervisor, SupervisorError, invalid};

/// Checks that an allocation id is safe as one path component:
/// `[A-Za-z0-9._-]{1,128}` and not `.` or `..`.
pub fn validate_allocation_id(id: &str) -> Result<(), SupervisorError> {
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if id.is_empty() || id.len() > 128 || !ok_chars || id == "." || id == ".." {
        return Err(invalid(
            "allocation_id",
            format!("{id:?} must be 1-128 characters of A-Z a-z 0-9 . _ - and not . or .."),
        ));
    }
    Ok(())
}

/// Rank 0 of a gang whose port is not chosen yet gets a free port of this
/// host (see [`crate::gang::pick_free_port`]); every other allocation is
/// returned as it is.
fn choose_rendezvous_port(mut allocation: Allocation) -> Result<Allocation, String> {
    if let Some(gang) = allocation.gang.as_mut()
        && gang.rank == 0
        && gang.master_port == 0
    {
        let port = crate::gang::pick_free_port()
            .map_err(|e| format!("cannot choose a rendezvous port for the gang: {e}"))?;
        gang.master_port = u32::from(port);
        info!(allocation_id = %allocation.allocation_id, port, "chose the gang's rendezvous port");
    }
    Ok(allocation)
}

/// What a start task needs of the workload [`Supervisor::admit`] recorded.
pub(super) struct Admitted {
    /// Marks the workload ended.
    pub(super) done: watch::Sender<bool>,
    pub(super) stop_while_queued: Arc<Notify>,
    /// Wakes a gang rank waiting for rank 0's port.
    pub(super) port_known: Arc<Notify>,
}

impl Supervisor {
    /// Starts a workload for the local API and returns its status once the
    /// start has settled (running or failed). Unlike the controller path,
    /// bad requests are refused rather than recorded as failed workloads.
    /// An empty allocation id gets `local-<uuid>`.
    pub async fn run_local(
        &self,
        mut allocation: Allocation,
    ) -> Result<WorkloadStatus, SupervisorError> {
        if allocation.allocation_id.is_empty() {
            allocation.allocation_id = format!("local-{}", uuid::Uuid::new_v4());
        }
        validate_allocation_id(&allocation.allocation_id)?;
        let argv = allocation
            .workload
            .as_ref()
            .map(|w| w.argv.as_slice())
            .unwrap_or_default();
        if argv.first().is_none_or(|a| a.is_empty()) {
            return Err(invalid("workload.argv", "must name a program to run"));
        }
        let mut seen = HashSet::new();
        for uuid in &allocation.gpu_uuids {
            if !seen.insert(uuid) {
                return Err(invalid("gpu_uuids", format!("{uuid} is listed twice")));
            }
            self.check_known_gpu(uuid)?;
        }
        let done = {
            let mut st = self.lock();
            if st.shutting_down {
                return Err(SupervisorError::ShuttingDown);
            }
            if st.workloads.contains_key(&allocation.allocation_id) {
                return Err(SupervisorError::AlreadyExists(allocation.allocation_id));
            }
            // Shares of one GPU may run side by side up to a whole GPU;
            // anything else needs the GPU to itself.
            let mut shared: HashMap<&str, u32> = HashMap::new();
            for (id, w) in &st.workloads {
                if w.terminal() {
                    continue;
                }
                for uuid in allocation
                    .gpu_uuids
                    .iter()
                    .filter(|u| w.allocation.gpu_uuids.contains(u))
                {
                    let (mine, theirs) = (allocation.gpu_share_milli, w.allocation.gpu_share_milli);
                    let total = shared.entry(uuid.as_str()).or_insert(mine);
                    *total = total.saturating_add(theirs);
                    if mine == 0 || theirs == 0 || *total > 1000 {
                        return Err(SupervisorError::GpuBusy {
                            uuid: uuid.clone(),
                            holder: id.clone(),
                        });
                    }
                }
            }
            self.admit(&mut st, allocation.clone(), Source::Local)
        };
        let id = allocation.allocation_id.clone();
        // Awaited, not run here: the start completes even if this caller
        // goes away (a client that hung up mid-call).
        let _ = self.spawn_start(allocation, Source::Local, done).await;
        self.status(&id).ok_or(SupervisorError::NotFound(id))
    }

    /// `uuid` is a GPU of this node or one of its MIG instances, as the
    /// backend sees them now (an operator may change a MIG layout).
    fn check_known_gpu(&self, uuid: &str) -> Result<(), SupervisorError> {
        let gpus = self.inner.backend.gpus();
        let known: Vec<&str> = gpus
            .iter()
            .flat_map(|g| {
                std::iter::once(g.uuid.as_str())
                    .chain(g.mig_instances.iter().map(|m| m.uuid.as_str()))
            })
            .collect();
        if let Some(g) = gpus.iter().find(|g| g.uuid == uuid && g.mig_enabled) {
            // CUDA shows a MIG-mode GPU only through its instances.
            let instances: Vec<&str> = g.mig_instances.iter().map(|m| m.uuid.as_str()).collect();
            return Err(invalid(
                "gpu_uuids",
                format!(
                    "{uuid} is in MIG mode: allocate one of its MIG instances ({})",
                    if instances.is_empty() {
                        "it has none; create some with nvidia-smi mig".to_string()
                    } else {
                        instances.join(", ")
                    }
                ),
            ));
        }
        if known.contains(&uuid) {
            Ok(())
        } else {
            Err(invalid(
                "gpu_uuids",
                format!(
                    "{uuid} is not a GPU of this node (its GPUs and MIG instances: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ))
        }
    }

    /// Applies the controller's desired state: starts what is missing, stops
    /// controller workloads no longer listed, and forgets finished ones no
    /// longer listed. Finished allocations are never restarted. Older
    /// generations are ignored; re-applying the same one is harmless.
    ///
    /// Returns at once: new workloads are recorded as starting and started
    /// concurrently (at most [`super::SupervisorSettings::max_concurrent_starts`]
    /// at a time), each reported running (or failed) when its runtime
    /// answers. Must be called within a Tokio runtime.
    pub fn reconcile(&self, desired: &DesiredState) {
        let mut st = self.lock();
        if st.shutting_down {
            return;
        }
        if desired.generation < st.applied_generation {
            debug!(
                generation = desired.generation,
                applied = st.applied_generation,
                "ignoring an older desired state"
            );
            return;
        }
        st.applied_generation = desired.generation;
        // Applied by the sampler once each GPU is idle (mig_layout.rs).
        st.mig_layouts = desired.mig_layouts.clone();
        let wanted: HashSet<&str> = desired
            .allocations
            .iter()
            .map(|a| a.allocation_id.as_str())
            .collect();
        let mut starts = Vec::new();
        for allocation in &desired.allocations {
            match st.workloads.get_mut(&allocation.allocation_id) {
                None => match self
                    .validate_controller_allocation(allocation)
                    .and_then(|()| choose_rendezvous_port(allocation.clone()))
                {
                    Ok(allocation) => {
                        let done = self.admit(&mut st, allocation.clone(), Source::Controller);
                        if allocation.gang.is_some()
                            && let Some(w) = st.workloads.get_mut(&allocation.allocation_id)
                        {
                            // Rank 0 reports its port at once; the other
                            // ranks say what they wait for.
                            if w.awaiting_port() {
                                w.message = WAITING_FOR_PORT.to_string();
                            }
                            let status = w.status();
                            self.emit(&mut st, status);
                        }
                        starts.push((allocation, done));
                    }
                    Err(reason) => self.reject(&mut st, allocation.clone(), reason),
                },
                Some(w) if w.source == Source::Local => warn!(
                    allocation_id = %allocation.allocation_id,
                    "the controller wants an allocation id already used by a local workload; ignoring it"
                ),
                Some(w) => {
                    if w.state == WorkloadState::Starting
                        && w.awaiting_port()
                        && !awaits_port(allocation)
                    {
                        info!(allocation_id = %allocation.allocation_id, "rank 0's rendezvous port is known; starting");
                        w.allocation.gang = allocation.gang.clone();
                        w.message.clear();
                        w.port_known.notify_one();
                    }
                }
            }
        }
        // A finished workload's final status was emitted when it finished,
        // i.e. before this desired state arrived, so forgetting it loses
        // nothing the uplink has not already queued or sent in a hello.
        let mut forget = Vec::new();
        let mut stops = Vec::new();
        for (id, w) in &st.workloads {
            if w.source != Source::Controller || wanted.contains(id.as_str()) {
                continue;
            }
            if w.terminal() {
                forget.push(id.clone());
            } else {
                stops.push(id.clone());
            }
        }
        for id in forget {
            if let Some(w) = st.workloads.remove(&id) {
                // A restarted agent must not report it again.
                self.forget_in_runtime(&w);
            }
        }
        for id in stops {
            if let Some(w) = st.workloads.get_mut(&id) {
                info!(allocation_id = %id, "stopping a workload the controller no longer wants");
                self.request_stop(w, None);
            }
        }
        drop(st);
        for (allocation, done) in starts {
            self.spawn_start(allocation, Source::Controller, done);
        }
    }

    /// Controller allocations are authoritative, but one we cannot run is
    /// recorded as FAILED with the reason, so the controller learns why.
    fn validate_controller_allocation(&self, allocation: &Allocation) -> Result<(), String> {
        validate_allocation_id(&allocation.allocation_id).map_err(|e| e.to_string())?;
        let argv = allocation
            .workload
            .as_ref()
            .map(|w| w.argv.as_slice())
            .unwrap_or_default();
        if argv.first().is_none_or(|a| a.is_empty()) {
            return Err("invalid workload.argv: must name a program to run".into());
        }
        for uuid in &allocation.gpu_uuids {
            self.check_known_gpu(uuid).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Records a workload as starting; [`Supervisor::spawn_start`] starts
    /// it.
    fn admit(&self, st: &mut State, allocation: Allocation, source: Source) -> Admitted {
        let (done_tx, done_rx) = watch::channel(false);
        let id = allocation.allocation_id.clone();
        let w = Workload::starting(allocation, source, done_rx);
        let stop_while_queued = w.stop_while_queued.clone();
        let port_known = w.port_known.clone();
        st.workloads.insert(id, w);
        self.refresh_busy(st);
        Admitted {
            done: done_tx,
            stop_while_queued,
            port_known,
        }
    }

    /// Records a controller allocation that cannot run as failed, with why.
    /// It never reaches the runtime.
    fn reject(&self, st: &mut State, allocation: Allocation, reason: String) {
        let (done_tx, done_rx) = watch::channel(false);
        let id = allocation.allocation_id.clone();
        let mut w = Workload::starting(allocation, Source::Controller, done_rx);
        warn!(allocation_id = %id, %reason, "workload could not start");
        w.end(WorkloadState::Failed, reason);
        let _ = done_tx.send(true);
        let status = w.status();
        st.workloads.insert(id, w);
        self.emit(st, status);
    }
}
