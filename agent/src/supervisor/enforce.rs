//! The agent's own limits on running workloads: a shared GPU allocation
//! whose processes hold more GPU memory than its limit is stopped and ends
//! Failed with the reason (`crate::sharing` explains which guarantee holds
//! where).

use gpufleet_proto::v1::{GpuSample, WorkloadState};
use tracing::warn;

use super::Supervisor;
use crate::sharing::{Overrun, memory_overruns};

impl Supervisor {
    /// Stops every running workload over its GPU memory limit in
    /// `samples` (processes attributed to allocations). Returns the
    /// overruns acted on; one already being stopped is not counted again.
    pub fn enforce_memory_limits(&self, samples: &[GpuSample]) -> Vec<Overrun> {
        let mut st = self.lock();
        let running: Vec<_> = st
            .workloads
            .values()
            .filter(|w| w.state == WorkloadState::Running && !w.stop_requested)
            .map(|w| w.allocation.clone())
            .collect();
        let running: Vec<_> = running.iter().collect();
        let overruns = memory_overruns(samples, &running);
        for o in &overruns {
            let Some(w) = st.workloads.get_mut(&o.allocation_id) else {
                continue;
            };
            warn!(allocation_id = %o.allocation_id, reason = %o.reason, "stopping a workload over its GPU memory limit");
            w.enforced = Some(o.reason.clone());
            let _ = self.request_stop(w, None);
        }
        overruns
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use gpufleet_proto::v1::{
        Allocation, DesiredState, GpuProcess, GpuSample, WorkloadSpec, WorkloadState,
    };

    use crate::backend::simulated::SimulatedBackend;
    use crate::runtime::memory::MemoryRuntime;
    use crate::sharing::GpuSharing;
    use crate::supervisor::{Supervisor, SupervisorSettings};

    fn shared(id: &str, gpu: &str, share: u32, limit: u64) -> Allocation {
        Allocation {
            allocation_id: id.into(),
            job_id: format!("job-{id}"),
            gpu_uuids: vec![gpu.into()],
            gpu_share_milli: share,
            gpu_memory_limit_bytes: limit,
            workload: Some(WorkloadSpec {
                argv: vec!["serve".into()],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn wait_state(sup: &Supervisor, id: &str, want: WorkloadState) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while sup.status(id).is_none_or(|s| s.state != want as i32) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} never became {want:?}: {:?}",
                sup.status(id)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn shares_get_their_limits_and_a_memory_overrun_fails_with_the_reason() {
        let backend = Arc::new(SimulatedBackend::new("n1", &["1xH100-SXM-80GB".into()]).unwrap());
        let gpu = crate::GpuBackend::gpus(backend.as_ref())[0].uuid.clone();
        let runtime = Arc::new(MemoryRuntime::new());
        let mut settings = SupervisorSettings::new("/nonexistent/gpufleet-test".into());
        settings.gpu_sharing = GpuSharing::Mps {
            pipe_directory: "/run/mps".into(),
        };
        let sup = Supervisor::with_runtime(backend, settings, runtime.clone());
        // Two shares of one GPU, side by side.
        sup.reconcile(&DesiredState {
            generation: 1,
            allocations: vec![
                shared("a", &gpu, 500, 12 << 30),
                shared("b", &gpu, 500, 12 << 30),
            ],
            ..Default::default()
        });
        wait_state(&sup, "a", WorkloadState::Running).await;
        wait_state(&sup, "b", WorkloadState::Running).await;
        let requests = runtime.launch_requests();
        let a = requests.iter().find(|r| r.allocation_id() == "a").unwrap();
        assert_eq!(a.gpu_uuids, std::slice::from_ref(&gpu));
        assert!(
            a.gpu_env
                .contains(&("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE".into(), "50".into())),
            "{:?}",
            a.gpu_env
        );
        assert!(
            a.gpu_env
                .contains(&("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT".into(), "0=12288M".into()))
        );

        // "a" grows past its 12 GiB; "b" stays inside.
        let sample = GpuSample {
            uuid: gpu.clone(),
            processes: vec![
                GpuProcess {
                    pid: 10,
                    used_memory_bytes: Some(13 << 30),
                    allocation_id: "a".into(),
                    ..Default::default()
                },
                GpuProcess {
                    pid: 11,
                    used_memory_bytes: Some(11 << 30),
                    allocation_id: "b".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let acted = sup.enforce_memory_limits(std::slice::from_ref(&sample));
        assert_eq!(acted.len(), 1);
        wait_state(&sup, "a", WorkloadState::Failed).await;
        let status = sup.status("a").unwrap();
        assert!(
            status.message.contains("13.0 GiB") && status.message.contains("limit of 12.0 GiB"),
            "{status:?}"
        );
        assert_eq!(
            sup.status("b").unwrap().state,
            WorkloadState::Running as i32
        );
        // Acting once: a second look finds nothing new to stop.
        assert!(sup.enforce_memory_limits(&[sample]).is_empty());
    }
}
