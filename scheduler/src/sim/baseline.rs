//! The simulator's baselines (see [`super::SimPolicy`]): pending jobs in
//! arrival order, each on the first (or best-fitting) node, or where FGD
//! puts it; gangs task by task, all or none.

use std::collections::HashSet;

use super::{Engine, Run, SimJob, SimPolicy, allows};
use crate::fleet::lowest_bits;

impl Engine<'_> {
    /// One baseline pass: pending jobs in arrival order, each placed on the
    /// first (or best-fitting) node with enough free GPUs of an allowed
    /// model; a job that does not fit waits without blocking later ones.
    pub(super) fn baseline_pass(&mut self, now: u64) {
        let best_fit = self.policy == SimPolicy::BaselineBestFit;
        let pending = std::mem::take(&mut self.pending);
        let mut still_pending = Vec::with_capacity(pending.len());
        // Free capacity only shrinks within a pass: a request shape that
        // failed once fails again.
        let mut failed: HashSet<(u32, u32, u32, &[String])> = HashSet::new();
        for job in pending {
            let spec = &self.workload.jobs[job];
            let shape = (
                spec.gpus,
                spec.gpu_milli,
                spec.tasks.max(1),
                spec.models.as_slice(),
            );
            if failed.contains(&shape) {
                still_pending.push(job);
                continue;
            }
            let placed = if spec.tasks > 1 {
                // Not empty: a gang has tasks.
                self.baseline_gang(spec, best_fit).map(|mut runs| {
                    let first = runs.remove(0);
                    (first, runs)
                })
            } else {
                self.baseline_task(spec, best_fit)
                    .map(|run| (run, Vec::new()))
            };
            match placed {
                Some((first, more)) => self.start(job, first, more, now),
                None => {
                    failed.insert(shape);
                    still_pending.push(job);
                }
            }
        }
        self.pending = still_pending;
    }

    /// Where a baseline puts one task of `spec` now.
    fn baseline_task(&mut self, spec: &SimJob, best_fit: bool) -> Option<Run> {
        if let Some(fgd) = &mut self.fgd {
            let (node, mask) = fgd.place(spec, &self.workload.nodes, &self.free, &self.shares)?;
            return Some(Run {
                node,
                mask,
                milli: spec.gpu_milli,
            });
        }
        if spec.gpu_milli > 0 {
            let (node, pos) = self.baseline_share(spec, best_fit)?;
            return Some(Run {
                node,
                mask: 1 << pos,
                milli: spec.gpu_milli,
            });
        }
        let mut chosen: Option<(u32, u32)> = None; // (node, free after)
        for (i, node) in self.workload.nodes.iter().enumerate() {
            let free = self.free[i].count_ones();
            if free < spec.gpus || !allows(spec, node) {
                continue;
            }
            let left = free - spec.gpus;
            if chosen.is_none_or(|(_, best)| left < best) {
                chosen = Some((i as u32, left));
            }
            if !best_fit || left == 0 {
                break;
            }
        }
        let (node, _) = chosen?;
        Some(Run {
            node,
            mask: lowest_bits(self.free[node as usize], spec.gpus),
            milli: 0,
        })
    }

    /// A gang on the baselines: its tasks placed one after another, each as
    /// a single task would be with the earlier ones' GPUs taken; all or
    /// none (the taken GPUs are given back either way, [`Engine::start`]
    /// takes them).
    fn baseline_gang(&mut self, spec: &SimJob, best_fit: bool) -> Option<Vec<Run>> {
        let mut runs = Vec::new();
        for _ in 0..spec.tasks {
            let Some(run) = self.baseline_task(spec, best_fit) else {
                break;
            };
            self.take(run);
            runs.push(run);
        }
        for &run in runs.iter().rev() {
            self.release(run);
        }
        (runs.len() == spec.tasks as usize && !runs.is_empty()).then_some(runs)
    }

    /// The baselines' GPU for a share: the first GPU (node order, then
    /// position) already shared with room or free, or the one left with
    /// the least share after placing it.
    fn baseline_share(&self, spec: &SimJob, best_fit: bool) -> Option<(u32, u32)> {
        let mut chosen: Option<(u32, u32, u32)> = None; // (node, pos, left)
        for (i, node) in self.workload.nodes.iter().enumerate() {
            if !allows(spec, node) {
                continue;
            }
            for pos in 0..node.gpus.min(32) {
                let held = self.shares[i][pos as usize];
                let fits = if held > 0 {
                    held + spec.gpu_milli <= 1000
                } else {
                    self.free[i] & (1 << pos) != 0
                };
                if !fits {
                    continue;
                }
                let left = 1000 - held - spec.gpu_milli;
                if chosen.is_none_or(|(_, _, best)| left < best) {
                    chosen = Some((i as u32, pos, left));
                }
                if !best_fit || left == 0 {
                    return chosen.map(|(n, p, _)| (n, p));
                }
            }
        }
        chosen.map(|(n, p, _)| (n, p))
    }
}
