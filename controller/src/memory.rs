//! Gives the system back memory the allocator holds after the controller
//! freed it.
//!
//! glibc's malloc returns freed memory to the kernel only from the top of
//! each arena. A controller that creates and drops a record per job across
//! many runtime threads leaves free pages scattered below live ones, and
//! its resident size then creeps up with the jobs it has seen although the
//! live heap stays level (measured in BENCHMARKS.md, `load`).
//! `malloc_trim(0)` walks every arena and hands those free pages back.
//!
//! The `gpufleet-controller` binary allocates with mimalloc, which returns
//! freed pages by itself; there the trim finds glibc's heap all but empty
//! and costs microseconds. It matters where the controller runs in a binary
//! on glibc's malloc (`gpufleet dev`, embedders).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Reads the live heap from the global allocator, which only the binary
/// chooses (the controller's counts; `gpufleet dev` and tests do not).
static HEAP_PROBE: OnceLock<fn() -> usize> = OnceLock::new();

/// Called once by a binary whose global allocator counts live bytes.
pub fn set_heap_probe(probe: fn() -> usize) {
    let _ = HEAP_PROBE.set(probe);
}

/// Bytes allocated and not yet freed, when the binary counts them.
pub fn heap_bytes() -> Option<u64> {
    HEAP_PROBE.get().map(|probe| probe() as u64)
}

/// How often the controller trims. A trim of a ~100 MiB heap takes a few
/// milliseconds on a blocking thread, and locks one arena at a time.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Returns free pages of every malloc arena to the system; true when any
/// were returned. Does nothing off glibc: other allocators have no such
/// call, and musl's returns memory itself.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes no pointers and has no preconditions; glibc
    // locks each arena while it walks it, like any other malloc call.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Returns free pages of every malloc arena to the system; true when any
/// were returned. Does nothing off glibc: other allocators have no such
/// call, and musl's returns memory itself.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

/// Trims every `every`, on a blocking thread so that the walk never holds
/// up a runtime worker. Runs until the task is dropped.
pub async fn trim_periodically(every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; nothing has been freed yet.
    tick.tick().await;
    loop {
        tick.tick().await;
        let started = Instant::now();
        match tokio::task::spawn_blocking(release_free_memory).await {
            Ok(released) => {
                tracing::trace!(released, took = ?started.elapsed(), "malloc arenas trimmed")
            }
            Err(e) => tracing::warn!(error = %e, "malloc trim task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_after_freeing_a_large_scattered_heap_does_not_disturb_live_data() {
        // Many small blocks, every other one freed: free pages below live
        // ones, which only a trim can return.
        let mut blocks: Vec<Vec<u8>> = (0..20_000).map(|i| vec![(i % 251) as u8; 512]).collect();
        let kept: Vec<Vec<u8>> = blocks
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| i % 2 == 0)
            .map(|(_, b)| std::mem::take(b))
            .collect();
        drop(blocks);
        release_free_memory();
        for (n, block) in kept.iter().enumerate() {
            let i = n * 2;
            assert!(block.iter().all(|&b| b == (i % 251) as u8));
        }
    }
}
