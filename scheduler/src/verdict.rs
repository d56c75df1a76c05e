//! Per-pass memory of the work a failed whole-GPU request cost, kept by
//! what the request resolves to (its eligible classes and the few fields
//! placement reads), so that requests that differ only in constraints that
//! select the same classes (two price caps between the same class prices,
//! say) share it.
//!
//! Unlike the pass's memo of failed shapes, which answers a repeated shape
//! with its stored verdict, this cache only skips computations whose
//! answers cannot have changed; every decision is the one a full
//! evaluation would make. It rests on three facts of one pass:
//! * whole-GPU placement without NVLink succeeds exactly when some tier
//!   (network block, region, locality group) has room for every task
//!   (`place::has_room` is exact then), and room only shrinks within a
//!   pass (placements take GPUs; reservations and preemptions move slots
//!   to the reserved lists, which admit only jobs that end in time): a
//!   request that failed with end `e` fails again with any end ≥ `e`;
//! * what fits when idle reads healthy GPUs only, which a pass never
//!   changes;
//! * free plus reserved-free GPUs only shrink, so once reserved capacity
//!   would not have fit the request, it never will again in this pass.

use std::collections::HashMap;

use crate::compiled::Compiled;
use crate::domain::{GpuUnit, JobInput, Policy};
use crate::fleet::MAX_GPUS_PER_SLOT;

#[cfg(test)]
mod tests;

#[cfg(test)]
thread_local! {
    /// Set by tests that compare decisions with and without the pass's
    /// shortcuts (this cache and `eligible.rs`).
    static SHORTCUTS_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the pass's shortcuts are off (only ever, in tests).
pub(crate) fn shortcuts_off() -> bool {
    #[cfg(test)]
    return SHORTCUTS_OFF.with(|off| off.get());
    #[cfg(not(test))]
    false
}

/// What is known about one resolved request this pass.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Verdict {
    /// The earliest end with which placement failed (`None`: none failed).
    pub(crate) failed_end: Option<u64>,
    /// Whether it fits when nothing runs (`None`: not yet computed).
    pub(crate) fits_when_idle: Option<bool>,
    /// Reserved capacity was found not to fit it.
    pub(crate) reserved_would_not_fit: bool,
}

/// Key words kept at most (16 MiB): past that, new requests are evaluated
/// in full (slower, never different).
const MAX_KEY_WORDS: usize = 4 << 20;

/// Resolved requests of one pass. Keys are flat `u32` signatures, built in
/// a reused buffer, so that a decision allocates nothing here.
#[derive(Default)]
pub(crate) struct Verdicts {
    index: HashMap<Vec<u32>, Verdict, foldhash::fast::RandomState>,
    key_words: usize,
    /// The signature of the request last looked up.
    key: Vec<u32>,
}

impl Verdicts {
    /// What is known of a request (all `None` when nothing is yet), or
    /// `None` where the facts above do not hold (fractions of GPUs, NVLink
    /// gangs, the first-fit baseline). `class_count`: the fleet's classes.
    pub(crate) fn lookup(
        &mut self,
        job: &JobInput,
        compiled: &Compiled,
        classes: &[u32],
        policy: Policy,
        class_count: usize,
    ) -> Option<Verdict> {
        let per_task = job.gpus_per_task;
        if job.unit != GpuUnit::Whole
            || per_task == 0
            || per_task as usize > MAX_GPUS_PER_SLOT
            || (compiled.nvlink && per_task > 1)
            || policy == Policy::FirstFit
            || shortcuts_off()
        {
            return None;
        }
        let key = &mut self.key;
        key.clear();
        key.extend([
            job.tasks.max(1),
            per_task,
            policy as u32,
            compiled.locality as u32,
            compiled.preferred.len() as u32,
        ]);
        key.extend(compiled.preferred.iter().map(|&r| u32::from(r)));
        // The eligible classes as a set (their order follows from it):
        // a bit set or a list, whichever is shorter, tagged.
        let words = class_count.div_ceil(32);
        if words <= classes.len() {
            key.push(0);
            let start = key.len();
            key.resize(start + words, 0);
            for &c in classes {
                key[start + c as usize / 32] |= 1 << (c % 32);
            }
        } else {
            key.push(1);
            key.extend_from_slice(classes);
        }
        Some(self.index.get(key.as_slice()).copied().unwrap_or_default())
    }

    /// Records what is now known of the request last looked up.
    pub(crate) fn store(&mut self, verdict: Verdict) {
        if let Some(known) = self.index.get_mut(self.key.as_slice()) {
            *known = verdict;
        } else if self.key_words + self.key.len() <= MAX_KEY_WORDS {
            self.key_words += self.key.len();
            self.index.insert(self.key.clone(), verdict);
        }
    }
}
