//! A spot interruption reaches the workloads: each is told the deadline in
//! the file its `GPUFLEET_INTERRUPT_FILE` names, gets SIGTERM now, and is
//! killed shortly before the cloud takes the machine.

use std::time::{Duration, SystemTime};

use super::Supervisor;

/// The file, in a workload's allocation directory, that an interruption
/// notice is written to (`GPUFLEET_INTERRUPT_FILE` names it).
pub const INTERRUPT_FILE: &str = "interruption";

/// What the workloads are told.
#[derive(Debug, Clone)]
pub struct Interruption {
    pub source: String,
    pub action: String,
    pub deadline: SystemTime,
}

impl Interruption {
    /// The file's contents: `KEY=value` lines a shell can `source`.
    fn file_text(&self) -> String {
        let unix = self
            .deadline
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!(
            "GPUFLEET_INTERRUPT_DEADLINE={}\nGPUFLEET_INTERRUPT_DEADLINE_UNIX={unix}\nGPUFLEET_INTERRUPT_SOURCE={}\nGPUFLEET_INTERRUPT_ACTION={}\n",
            humantime::format_rfc3339_seconds(self.deadline),
            self.source,
            self.action,
        )
    }
}

impl Supervisor {
    /// Tells every workload not yet ended of `interruption` and stops it:
    /// SIGTERM now, SIGKILL `margin` before the deadline (at least a second
    /// after the SIGTERM). Returns how many workloads were told.
    pub fn interrupt(&self, interruption: &Interruption, margin: Duration) -> usize {
        let now = SystemTime::now();
        let grace = interruption
            .deadline
            .duration_since(now)
            .unwrap_or_default()
            .saturating_sub(margin)
            .max(Duration::from_secs(1));
        let why = format!(
            "spot interruption: {} {} at {}",
            interruption.source,
            interruption.action,
            humantime::format_rfc3339_seconds(interruption.deadline)
        );
        let text = interruption.file_text();
        let mut st = self.lock();
        let ids: Vec<String> = st
            .workloads
            .iter()
            .filter(|(_, w)| !w.terminal())
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            let path = self.allocation_dir(id).join(INTERRUPT_FILE);
            // Whole or not at all: a workload polling the file never reads half.
            let tmp = path.with_extension("tmp");
            let written = std::fs::create_dir_all(self.allocation_dir(id))
                .and_then(|()| std::fs::write(&tmp, &text))
                .and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                tracing::warn!(allocation_id = %id, error = %e, "cannot write the interruption file; the workload still gets SIGTERM");
            }
            if let Some(w) = st.workloads.get_mut(id) {
                w.interrupted = Some(why.clone());
                let _ = self.request_stop(w, Some(grace));
            }
        }
        tracing::warn!(workloads = ids.len(), grace = ?grace, %why, "spot interruption: workloads told and stopped");
        ids.len()
    }
}
