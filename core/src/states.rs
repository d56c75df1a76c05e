//! Predicates over job and workload states that agent, controller and CLI
//! must agree on.

use gpufleet_proto::v1::{JobState, WorkloadState};

/// A job in one of these states never changes again.
pub fn is_terminal_job(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Lost
    )
}

/// A workload in one of these states holds no GPUs and runs no process.
pub fn is_terminal_workload(state: WorkloadState) -> bool {
    matches!(
        state,
        WorkloadState::Succeeded
            | WorkloadState::Failed
            | WorkloadState::Stopped
            | WorkloadState::Lost
            | WorkloadState::Interrupted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_final_states_are_terminal() {
        let terminal_jobs: Vec<JobState> = (0..20)
            .filter_map(|v| JobState::try_from(v).ok())
            .filter(|s| is_terminal_job(*s))
            .collect();
        assert_eq!(
            terminal_jobs,
            [
                JobState::Succeeded,
                JobState::Failed,
                JobState::Cancelled,
                JobState::Lost
            ]
        );
        assert!(!is_terminal_job(JobState::Requeuing));
        assert!(!is_terminal_workload(WorkloadState::Running));
        assert!(is_terminal_workload(WorkloadState::Stopped));
    }
}
