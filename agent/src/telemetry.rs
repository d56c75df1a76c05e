//! The sampler: samples the backend every interval and keeps the latest
//! samples for the local API and the uplink.

use std::sync::Arc;
use std::time::Duration;

use gpufleet_proto::v1::{GpuInfo, GpuSample, NodeIdentity};
use tokio::sync::watch;
use tracing::warn;

use crate::backend::GpuBackend;

/// Static node facts plus the latest samples.
#[derive(Debug)]
pub struct Telemetry {
    pub identity: NodeIdentity,
    pub gpus: Vec<GpuInfo>,
    pub driver_version: String,
    pub backend_name: &'static str,
    latest: watch::Sender<Arc<Vec<GpuSample>>>,
}

impl Telemetry {
    pub fn new(identity: NodeIdentity, backend: &dyn GpuBackend) -> Self {
        Self {
            identity,
            gpus: backend.gpus(),
            driver_version: backend.driver_version(),
            backend_name: backend.name(),
            latest: watch::Sender::new(Arc::new(Vec::new())),
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

    /// Samples every `interval` until `shutdown` turns true.
    pub(crate) async fn run_sampler(
        self: Arc<Self>,
        backend: Arc<dyn GpuBackend>,
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
            let b = backend.clone();
            // NVML calls block; keep them off the async workers.
            match tokio::task::spawn_blocking(move || b.sample()).await {
                Ok(samples) => {
                    self.latest.send_replace(Arc::new(samples));
                }
                Err(e) => warn!(error = %e, "GPU sampling failed"),
            }
        }
    }
}
