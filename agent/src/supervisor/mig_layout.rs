//! An operator's MIG layouts (`DesiredState.mig_layouts`, from
//! `gpufleet nodes mig-layout`): each is applied through the `GpuBackend`
//! once no workload uses its GPU or any of its instances, never while one
//! does. Level-triggered: a layout the GPU already has is done; a refused
//! one is not retried until the wish changes. After a change the uplink
//! says hello again, so the controller learns the new instances.

use std::sync::Arc;

use gpufleet_proto::v1::GpuInfo;
use tracing::{info, warn};

use super::Supervisor;

/// What one pass did for one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutOutcome {
    Applied {
        gpu_uuid: String,
    },
    /// A workload still uses the GPU; tried again next pass.
    Busy {
        gpu_uuid: String,
    },
    Refused {
        gpu_uuid: String,
        reason: String,
    },
}

/// Longest refusal reason sent to the controller (its free-text limit is
/// 256 bytes).
const REASON_BYTES: usize = 240;

/// `reason` on one line of printable characters, at most [`REASON_BYTES`].
fn one_line_clipped(reason: &str) -> String {
    let mut out = String::new();
    for c in reason.chars() {
        let c = if gpufleet_core::limits::is_unsafe_char(c) {
            ' '
        } else {
            c
        };
        if out.len() + c.len_utf8() > REASON_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

/// The GPU's instance profiles, sorted: what a layout is compared by.
fn current_profiles(gpu: &GpuInfo) -> Vec<String> {
    let mut p: Vec<String> = gpu
        .mig_instances
        .iter()
        .map(|m| m.profile.clone())
        .collect();
    p.sort();
    p
}

impl Supervisor {
    /// The GPUs (and their MIG instances) as the backend sees them now.
    pub fn gpus(&self) -> Vec<GpuInfo> {
        self.inner.backend.gpus()
    }

    /// The MIG layouts the controller last asked for.
    pub fn wanted_mig_layouts(&self) -> Vec<gpufleet_proto::v1::MigLayout> {
        self.lock().mig_layouts.clone()
    }

    /// The wanted layouts the backend refused, each with its one-line
    /// reason (clipped to what a hello may carry).
    pub fn refused_mig_layouts(&self) -> Vec<gpufleet_proto::v1::MigLayout> {
        let st = self.lock();
        st.mig_layouts
            .iter()
            .filter_map(|l| {
                let (tried, reason) = st.mig_refused.get(&l.gpu_uuid)?;
                (*tried == l.profiles).then(|| gpufleet_proto::v1::MigLayout {
                    gpu_uuid: l.gpu_uuid.clone(),
                    profiles: l.profiles.clone(),
                    error: one_line_clipped(reason),
                })
            })
            .collect()
    }

    /// Notified after a MIG layout was applied.
    pub fn inventory_changed(&self) -> Arc<tokio::sync::Notify> {
        self.inner.inventory_changed.clone()
    }

    /// Applies every wanted layout whose GPU is idle and differs. Blocks
    /// (NVML); runs on the sampler's blocking thread. Holds the state lock
    /// while it applies, so no workload is admitted onto a GPU being
    /// reconfigured (an operator action on a drained GPU: rare, and worth
    /// a status query waiting).
    pub fn apply_mig_layouts(&self) -> Vec<LayoutOutcome> {
        let mut st = self.lock();
        if st.mig_layouts.is_empty() {
            return Vec::new();
        }
        let gpus = self.inner.backend.gpus();
        let mut outcomes = Vec::new();
        for layout in st.mig_layouts.clone() {
            let Some(gpu) = gpus.iter().find(|g| g.uuid == layout.gpu_uuid) else {
                continue;
            };
            let mut wanted = layout.profiles.clone();
            wanted.sort();
            if gpu.mig_enabled && current_profiles(gpu) == wanted {
                st.mig_refused.remove(&gpu.uuid);
                continue;
            }
            if st
                .mig_refused
                .get(&gpu.uuid)
                .is_some_and(|(tried, _)| *tried == layout.profiles)
            {
                continue;
            }
            let in_use = st.workloads.values().any(|w| {
                !w.terminal()
                    && w.allocation
                        .gpu_uuids
                        .iter()
                        .any(|u| *u == gpu.uuid || gpu.mig_instances.iter().any(|m| m.uuid == *u))
            });
            if in_use {
                outcomes.push(LayoutOutcome::Busy {
                    gpu_uuid: gpu.uuid.clone(),
                });
                continue;
            }
            match self
                .inner
                .backend
                .apply_mig_layout(&gpu.uuid, &layout.profiles)
            {
                Ok(()) => {
                    info!(gpu_uuid = %gpu.uuid, profiles = ?layout.profiles, "MIG layout applied");
                    st.mig_refused.remove(&gpu.uuid);
                    outcomes.push(LayoutOutcome::Applied {
                        gpu_uuid: gpu.uuid.clone(),
                    });
                }
                Err(reason) => {
                    warn!(gpu_uuid = %gpu.uuid, profiles = ?layout.profiles, %reason, "MIG layout not applied");
                    st.mig_refused
                        .insert(gpu.uuid.clone(), (layout.profiles.clone(), reason.clone()));
                    outcomes.push(LayoutOutcome::Refused {
                        gpu_uuid: gpu.uuid.clone(),
                        reason,
                    });
                }
            }
        }
        drop(st);
        // A new hello carries the new instances, or the refusal.
        if outcomes.iter().any(|o| {
            matches!(
                o,
                LayoutOutcome::Applied { .. } | LayoutOutcome::Refused { .. }
            )
        }) {
            self.inner.inventory_changed.notify_one();
        }
        outcomes
    }
}
