//! The limits on the agent's local API requests, in one place (the
//! workload's own limits are shared with the controller and live in
//! `gpufleet_core::limits`). `docs/limits.md` lists them.

use gpufleet_core::limits::{Violation, check_count, check_free_text, check_workload};
use gpufleet_proto::v1::Allocation;

/// GPU UUIDs one local workload may name: more than any node holds, MIG
/// instances included.
pub const GPU_UUIDS: usize = 256;
/// Ids a local client passes (allocation ids, job ids, GPU UUIDs).
pub const ID_BYTES: usize = 128;

/// The limits of a `RunWorkload` request (meaning is the supervisor's to
/// check).
pub fn check_allocation(allocation: &Allocation) -> Result<(), Violation> {
    check_id("allocation.allocation_id", &allocation.allocation_id)?;
    check_id("allocation.job_id", &allocation.job_id)?;
    check_count(
        "allocation.gpu_uuids",
        allocation.gpu_uuids.len(),
        GPU_UUIDS,
    )?;
    for (i, uuid) in allocation.gpu_uuids.iter().enumerate() {
        check_id(&format!("allocation.gpu_uuids[{i}]"), uuid)?;
    }
    if let Some(workload) = &allocation.workload {
        check_workload("allocation.workload", workload)?;
    }
    Ok(())
}

/// An id: bounded and printable.
pub fn check_id(field: &str, value: &str) -> Result<(), Violation> {
    check_free_text(field, value, ID_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::WorkloadSpec;

    #[test]
    fn run_requests_are_bounded() {
        let ok = Allocation {
            allocation_id: "local-1".into(),
            gpu_uuids: vec!["GPU-1".into()],
            workload: Some(WorkloadSpec {
                argv: vec!["true".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(check_allocation(&ok).is_ok());
        let mut a = ok.clone();
        a.gpu_uuids = vec!["GPU-1".into(); GPU_UUIDS + 1];
        assert_eq!(
            check_allocation(&a).unwrap_err().field,
            "allocation.gpu_uuids"
        );
        let mut a = ok.clone();
        a.job_id = "j".repeat(ID_BYTES + 1);
        assert_eq!(check_allocation(&a).unwrap_err().field, "allocation.job_id");
        let mut a = ok.clone();
        a.gpu_uuids = vec!["GPU-\x1b[2J".into()];
        assert_eq!(
            check_allocation(&a).unwrap_err().field,
            "allocation.gpu_uuids[0]"
        );
        let mut a = ok;
        a.workload.as_mut().unwrap().argv = vec!["x".into(); 5000];
        assert_eq!(
            check_allocation(&a).unwrap_err().field,
            "allocation.workload.argv"
        );
    }
}
