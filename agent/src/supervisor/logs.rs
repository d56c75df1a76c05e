//! Log reads: chunks of a workload's log by offset, with end of file
//! once the workload has ended. The runtime reads the bytes.

use gpufleet_proto::v1::LogChunk;

use super::{Supervisor, SupervisorError, validate_allocation_id};

/// Largest log chunk one read returns.
pub const MAX_LOG_CHUNK: u32 = 1024 * 1024;

impl Supervisor {
    /// Reads up to `max_bytes` (0 or more than 1 MiB means 1 MiB) of a
    /// workload's log from `offset`. `eof` is set when the workload has
    /// ended and the chunk reaches the end of the file. Logs of workloads
    /// already forgotten stay readable while their file exists.
    pub async fn read_log(
        &self,
        allocation_id: &str,
        offset: u64,
        max_bytes: u32,
    ) -> Result<LogChunk, SupervisorError> {
        validate_allocation_id(allocation_id)?;
        // Terminal is read before the file, so a terminal workload's file
        // is already complete when we measure it.
        let known = {
            let st = self.lock();
            st.workloads
                .get(allocation_id)
                .map(|w| (w.terminal(), w.allocation.task_index))
        };
        let (terminal, task_index) = known.unwrap_or((true, 0));
        let max = if max_bytes == 0 {
            MAX_LOG_CHUNK
        } else {
            max_bytes.min(MAX_LOG_CHUNK)
        };
        let mut chunk = LogChunk {
            allocation_id: allocation_id.to_string(),
            offset,
            data: Vec::new(),
            eof: false,
            task_index,
        };
        let read = self
            .inner
            .runtime
            .read_log(&self.log_path(allocation_id), offset, max)
            .await
            .map_err(|source| SupervisorError::Log {
                id: allocation_id.to_string(),
                source,
            })?;
        let Some(read) = read else {
            if known.is_none() {
                return Err(SupervisorError::NoLog(allocation_id.to_string()));
            }
            // Known but never got a log (rejected before launching).
            chunk.eof = terminal;
            return Ok(chunk);
        };
        chunk.data = read.data;
        chunk.eof = terminal && offset + chunk.data.len() as u64 >= read.len;
        Ok(chunk)
    }
}
