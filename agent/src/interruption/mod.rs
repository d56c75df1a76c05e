//! Spot interruption notices: the agent watches its cloud's metadata
//! service ([`cloud`]), and on a notice tells every workload (SIGTERM, the
//! deadline in the file `GPUFLEET_INTERRUPT_FILE` names, SIGKILL shortly
//! before the deadline) and the controller (an `InterruptionNotice` in the
//! outbox, never dropped), which cordons the node and queues its work
//! elsewhere at once. A rebalance recommendation only reaches the
//! controller. [`mock`] serves the same formats on loopback for tests.

pub mod cloud;
pub mod http;
pub mod mock;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gpufleet_proto::v1::InterruptionNotice;
use gpufleet_proto::v1::agent_message::Body;
use tokio::sync::watch;
use tracing::{error, info, warn};

use self::cloud::{Metadata, Notice};
use crate::outbox::Outbox;
use crate::supervisor::{Interruption, Supervisor};

/// How the watcher runs.
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// Pause between polls (clouds that long-poll do not pause).
    pub poll_interval: Duration,
    /// Workloads are killed this long before the deadline.
    pub stop_margin: Duration,
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// Acts on one notice; returns how many workloads were stopped.
pub async fn act(
    notice: &Notice,
    supervisor: &Supervisor,
    outbox: &Arc<Outbox>,
    stop_margin: Duration,
) -> usize {
    let stopped = if notice.reclaims() {
        supervisor.interrupt(
            &Interruption {
                source: notice.source.to_string(),
                action: notice.action.clone(),
                deadline: notice.deadline,
            },
            stop_margin,
        )
    } else {
        0
    };
    let mut detail = notice.detail.clone();
    gpufleet_core::limits::clip(&mut detail, 4096);
    let message = InterruptionNotice {
        source: notice.source.to_string(),
        action: notice.action.clone(),
        noticed_at: Some(timestamp(SystemTime::now())),
        deadline: Some(timestamp(notice.deadline)),
        detail,
    };
    let outbox = outbox.clone();
    let written = tokio::task::spawn_blocking(move || {
        outbox.append_all(std::iter::once(Body::InterruptionNotice(message)))
    })
    .await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            error!(error = %e, "cannot queue the interruption notice for the controller; its lease will notice the node's loss")
        }
        Err(e) => error!(error = %e, "queueing the interruption notice panicked"),
    }
    stopped
}

/// Polls `metadata` until `shutdown`, acting once on each new notice.
pub async fn watch(
    mut metadata: Metadata,
    supervisor: Supervisor,
    outbox: Arc<Outbox>,
    settings: WatchSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut acted: Option<(String, SystemTime)> = None;
    let mut last_error: Option<String> = None;
    info!(
        cloud = metadata.cloud().name(),
        "watching for spot interruption notices"
    );
    loop {
        let polled = tokio::select! {
            polled = metadata.poll(SystemTime::now()) => polled,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let pause = match polled {
            Ok(Some(notice)) => {
                last_error = None;
                let seen = (notice.action.clone(), notice.deadline);
                if acted.as_ref() != Some(&seen) {
                    warn!(source = notice.source, action = %notice.action, deadline = %humantime::format_rfc3339_seconds(notice.deadline), "spot interruption notice");
                    act(&notice, &supervisor, &outbox, settings.stop_margin).await;
                    acted = Some(seen);
                }
                // A notice stands; keep looking for a changed one.
                true
            }
            Ok(None) => {
                last_error = None;
                !metadata.long_polls()
            }
            Err(e) => {
                if last_error.as_ref() != Some(&e) {
                    warn!(error = %e, "cannot read the cloud's interruption notices; retrying");
                    last_error = Some(e);
                }
                true
            }
        };
        if pause {
            tokio::select! {
                _ = tokio::time::sleep(settings.poll_interval) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests;
