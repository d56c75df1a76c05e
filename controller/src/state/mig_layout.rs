//! An operator's MIG layout for one GPU (`Fleet.SetMigLayout`): kept with
//! the node's record (so a restart or a reconnect keeps it) and sent in
//! every desired state; the agent applies it once the GPU is idle. The
//! scheduler never changes a layout.

use gpufleet_proto::v1::{MigLayout, Node};

use super::Controller;
use crate::error::{ControllerError, Result};
use crate::validate;

/// The wishes with the agent's refusals (from its hello) recorded on them:
/// a wish the agent refused as it is gets the reason; every other wish
/// has none.
pub(super) fn with_refusals(wanted: &[MigLayout], refused: &[MigLayout]) -> Vec<MigLayout> {
    wanted
        .iter()
        .map(|w| MigLayout {
            error: refused
                .iter()
                .find(|r| r.gpu_uuid == w.gpu_uuid && r.profiles == w.profiles)
                .map(|r| r.error.clone())
                .unwrap_or_default(),
            ..w.clone()
        })
        .collect()
}

impl Controller {
    /// Wants `gpu_uuid` of `node_id` split into `profiles` (empty: the wish
    /// is withdrawn) and pushes the node's desired state.
    pub fn set_mig_layout(
        &self,
        node_id: &str,
        gpu_uuid: &str,
        profiles: &[String],
    ) -> Result<Node> {
        validate::node_id("node_id", node_id)?;
        crate::limits::check_filter("gpu_uuid", gpu_uuid, crate::limits::ID_BYTES)?;
        validate::mig_profiles("profiles", profiles)?;
        {
            let state = self.lock();
            let entry = state.nodes.get(node_id).ok_or_else(|| {
                ControllerError::NotFound(format!("node {node_id} is not registered"))
            })?;
            if !entry
                .record
                .gpus
                .iter()
                .any(|g| g.info.as_ref().is_some_and(|i| i.uuid == gpu_uuid))
            {
                return Err(ControllerError::NotFound(format!(
                    "node {node_id} has no GPU {gpu_uuid:?}; `gpufleet nodes get {node_id}` lists its GPUs"
                )));
            }
        }
        let node = self.update_node(node_id, |node| {
            node.mig_layouts.retain(|l| l.gpu_uuid != gpu_uuid);
            if !profiles.is_empty() {
                node.mig_layouts.push(MigLayout {
                    gpu_uuid: gpu_uuid.to_string(),
                    profiles: profiles.to_vec(),
                    error: String::new(),
                });
            }
        })?;
        let mut state = self.lock();
        self.push_desired(&mut state, node_id, true);
        Ok(node)
    }
}
