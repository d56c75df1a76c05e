//! FGD, the fragmentation-aware placement of Weng et al., "Beware of
//! Fragmentation: Scheduling GPU-Sharing Workloads with Fragmentation
//! Gradient Descent" (USENIX ATC 2023), implemented from the paper's
//! description as a **simulator baseline** (not the gpufleet scheduler).
//!
//! The paper measures a node's fragmentation against the workload's task
//! mix `M` (each task shape with its popularity `p_m`):
//! - `F_n(m)`, the GPU capacity on node `n` that task `m` cannot use: all of
//!   the node's free capacity when `m` cannot run there at all (model not
//!   allowed, not enough free GPUs); otherwise the free capacity of the GPUs
//!   too full for it (for a share of `d` thousandths, GPUs with less than `d`
//!   free; for whole GPUs, every partly used GPU);
//! - `F_n(M) = Σ_m p_m · F_n(m)`, the node's expected fragmentation.
//!
//! Each task goes to the node and GPU whose placement increases `F_n(M)`
//! least (the "gradient"); ties go to the first node in list order, then the
//! lowest GPU position. Here `p_m` is the task's count in the workload (a
//! constant factor), so the arithmetic is integer and deterministic. The
//! scheduler's CPU and memory dimensions are not modelled (the simulator
//! places GPUs only), so a node "cannot run" a task only for GPU reasons.

use std::collections::HashMap;

use crate::sim::workload::{SimJob, SimNode, Workload};

/// Most memoised node states (a few MB).
const MEMO_LIMIT: usize = 1 << 16;

/// One task shape of the workload and how often it occurs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    /// Whole GPUs (0 for a share).
    gpus: u32,
    /// A share in thousandths (0 for whole GPUs).
    milli: u32,
    count: u64,
}

/// The FGD placer: the workload's task mix and a memo of node
/// fragmentation by (model, free capacity per GPU).
#[derive(Debug)]
pub(crate) struct Fgd {
    shapes: Vec<Shape>,
    /// Per shape, per model index: may the shape run on that model?
    allowed: Vec<Vec<bool>>,
    /// Per node: its model index.
    node_model: Vec<u16>,
    /// Fragmentation of a (model, sorted free thousandths) state: nodes of
    /// one shape in one state (e.g. all empty ones) are computed once.
    /// Per model index (looked up by slice: no key is built to look).
    memo: Vec<HashMap<Vec<u16>, u64>>,
    /// Scratch for a sorted state.
    sorted: Vec<u16>,
}

impl Fgd {
    pub(crate) fn new(workload: &Workload) -> Self {
        let mut models: Vec<&str> = Vec::new();
        let node_model = workload
            .nodes
            .iter()
            .map(|n| {
                let i = models
                    .iter()
                    .position(|m| m.eq_ignore_ascii_case(&n.model))
                    .unwrap_or_else(|| {
                        models.push(&n.model);
                        models.len() - 1
                    });
                i as u16
            })
            .collect();
        // Shapes in first-seen order (deterministic).
        let mut index: HashMap<(u32, u32, &[String]), usize> = HashMap::new();
        let mut shapes = Vec::new();
        let mut allowed = Vec::new();
        for job in &workload.jobs {
            let key = shape_key(job);
            let i = *index
                .entry((key.0, key.1, job.models.as_slice()))
                .or_insert_with(|| {
                    shapes.push(Shape {
                        gpus: key.0,
                        milli: key.1,
                        count: 0,
                    });
                    allowed.push(
                        models
                            .iter()
                            .map(|m| {
                                job.models.is_empty()
                                    || job.models.iter().any(|a| a.eq_ignore_ascii_case(m))
                            })
                            .collect(),
                    );
                    shapes.len() - 1
                });
            shapes[i].count += 1;
        }
        Fgd {
            shapes,
            allowed,
            node_model,
            memo: vec![HashMap::new(); models.len()],
            sorted: Vec::new(),
        }
    }

    /// `F_n(M)` (times the number of tasks) for a node of `model` whose GPUs
    /// have `free` thousandths free each.
    fn fragmentation(&mut self, model: u16, free: &[u16]) -> u64 {
        self.sorted.clear();
        self.sorted.extend_from_slice(free);
        self.sorted.sort_unstable();
        let Some(memo) = self.memo.get(model as usize) else {
            return self.compute(model, &self.sorted);
        };
        if let Some(&f) = memo.get(self.sorted.as_slice()) {
            return f;
        }
        let f = self.compute(model, &self.sorted);
        let key = self.sorted.clone();
        let memo = &mut self.memo[model as usize];
        // Bounded: a long replay meets ever new states; recomputing is cheap.
        if memo.len() >= MEMO_LIMIT {
            memo.clear();
        }
        memo.insert(key, f);
        f
    }

    fn compute(&self, model: u16, free: &[u16]) -> u64 {
        let total: u64 = free.iter().map(|&f| u64::from(f)).sum();
        let whole_free = free.iter().filter(|&&f| f == 1000).count() as u64;
        self.shapes
            .iter()
            .zip(&self.allowed)
            .map(|(shape, allowed)| {
                let unusable = if !allowed.get(model as usize).copied().unwrap_or(false) {
                    total
                } else if shape.milli == 0 {
                    if whole_free >= u64::from(shape.gpus) {
                        total - whole_free * 1000
                    } else {
                        total
                    }
                } else if free.iter().any(|&f| u32::from(f) >= shape.milli) {
                    free.iter()
                        .filter(|&&f| u32::from(f) < shape.milli)
                        .map(|&f| u64::from(f))
                        .sum()
                } else {
                    total
                };
                shape.count * unusable
            })
            .sum()
    }

    /// The fleet's expected fragmentation in GPUs: `Σ_n F_n(M)` with the
    /// popularities normalised to sum to 1, i.e. the free capacity a task
    /// drawn from the mix could not use, summed over nodes.
    pub(crate) fn fleet_fragmentation(
        &mut self,
        nodes: &[SimNode],
        free: &[u32],
        shares: &[[u32; 32]],
    ) -> f64 {
        let tasks: u64 = self.shapes.iter().map(|s| s.count).sum();
        if tasks == 0 {
            return 0.0;
        }
        let mut state = Vec::new();
        let mut sum: u128 = 0;
        for (i, node) in nodes.iter().enumerate() {
            node_state(node, free[i], &shares[i], &mut state);
            sum += u128::from(self.fragmentation(self.node_model[i], &state));
        }
        sum as f64 / tasks as f64 / 1000.0
    }

    /// Where FGD puts `job`: `(node, GPU mask)`, or `None` when it fits
    /// nowhere. `free` is each node's mask of free GPUs, `shares` the
    /// thousandths held by shares per GPU position.
    pub(crate) fn place(
        &mut self,
        job: &SimJob,
        nodes: &[SimNode],
        free: &[u32],
        shares: &[[u32; 32]],
    ) -> Option<(u32, u32)> {
        let (gpus, milli) = shape_key(job);
        // (increase, node, mask)
        let mut best: Option<(i64, u32, u32)> = None;
        let mut state: Vec<u16> = Vec::new();
        let mut after: Vec<u16> = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            if !super::allows(job, node) {
                continue;
            }
            let model = self.node_model[i];
            node_state(node, free[i], &shares[i], &mut state);
            let before = self.fragmentation(model, &state) as i64;
            let consider = |after: u64, mask: u32, best: &mut Option<(i64, u32, u32)>| {
                let delta = after as i64 - before;
                if best.is_none_or(|(d, ..)| delta < d) {
                    *best = Some((delta, i as u32, mask));
                }
            };
            if milli == 0 {
                if free[i].count_ones() < gpus {
                    continue;
                }
                let mask = crate::fleet::lowest_bits(free[i], gpus);
                after.clear();
                after.extend_from_slice(&state);
                for p in super::positions(mask) {
                    after[p as usize] = 0;
                }
                let f = self.fragmentation(model, &after);
                consider(f, mask, &mut best);
            } else {
                // GPUs with the same free capacity are interchangeable: try
                // the first of each.
                let mut tried: Vec<u16> = Vec::new();
                for p in 0..state.len() {
                    let f = state[p];
                    if u32::from(f) < milli || tried.contains(&f) {
                        continue;
                    }
                    tried.push(f);
                    after.clear();
                    after.extend_from_slice(&state);
                    after[p] = f - milli as u16;
                    let frag = self.fragmentation(model, &after);
                    consider(frag, 1 << p, &mut best);
                }
            }
        }
        best.map(|(_, node, mask)| (node, mask))
    }
}

/// Free thousandths per GPU position of a node.
fn node_state(node: &SimNode, free: u32, shares: &[u32; 32], state: &mut Vec<u16>) {
    state.clear();
    state.extend((0..node.gpus.min(32)).map(|p| {
        let held = shares[p as usize].min(1000) as u16;
        if free & (1 << p) != 0 {
            1000
        } else if held > 0 {
            1000 - held
        } else {
            0 // whole-GPU work holds it
        }
    }));
}

/// (whole GPUs, share thousandths): exactly one is non-zero.
fn shape_key(job: &SimJob) -> (u32, u32) {
    if job.gpu_milli > 0 {
        (0, job.gpu_milli.min(1000))
    } else {
        (job.gpus, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Generation;

    fn node(id: &str, gpus: u32) -> SimNode {
        SimNode {
            id: id.into(),
            model: "T4".into(),
            generation: Generation::Turing,
            gpus,
            price_per_gpu_hour_micro_usd: 1,
            provider: "p".into(),
            region: "r".into(),
        }
    }

    fn job(gpus: u32, milli: u32) -> SimJob {
        SimJob {
            id: "j".into(),
            tenant: "t".into(),
            priority: 0,
            arrival: 0,
            duration: 1,
            gpus,
            gpu_milli: milli,
            models: Vec::new(),
            ..Default::default()
        }
    }

    /// Task mix: one whole-GPU task and one half-GPU share (p = 1 each).
    /// Node a (2 GPUs): GPU0 has 0.6 free (0.4 held), GPU1 free.
    /// Node b (2 GPUs): both free.
    /// F(a) = F_a(1 GPU) + F_a(0.5) = 600 (GPU0 too full for whole work)
    ///        + 0 (both GPUs take a half) = 600. F(b) = 0 + 0 = 0.
    /// A 0.5 share:
    /// - on a/GPU0 → (100, 1000): F = 100 + 100 = 200, Δ = −400;
    /// - on a/GPU1 → (600, 500): F = 1100 + 0 = 1100, Δ = +500;
    /// - on b/GPU0 → (500, 1000): F = 500 + 0 = 500, Δ = +500.
    ///   FGD fills a/GPU0 (best-fit would too; first-fit would too).
    ///
    /// A 0.3 share instead, with a third task of 0.7 in the mix (p = 1 each):
    /// F(a) = 600 (whole) + 0 (0.5 fits) + 600 (0.7: GPU0 has 0.6) = 1200.
    /// - a/GPU0 → (300, 1000): 300 + 300 + 300 = 900, Δ = −300;
    /// - a/GPU1 → (600, 700): 1300 + 0 + 600 = 1900, Δ = +700;
    /// - b/GPU0 → (700, 1000): 700 + 0 + 0 = 700, vs F(b) = 0: Δ = +700.
    ///   FGD again fills a/GPU0.
    #[test]
    fn a_share_goes_where_expected_fragmentation_grows_least() {
        let nodes = vec![node("a", 2), node("b", 2)];
        let free = vec![0b10, 0b11];
        let mut shares = vec![[0u32; 32]; 2];
        shares[0][0] = 400;
        let w = Workload {
            nodes: nodes.clone(),
            jobs: vec![job(1, 0), job(1, 500)],
            ..Default::default()
        };
        let mut fgd = Fgd::new(&w);
        assert_eq!(fgd.fragmentation(0, &[600, 1000]), 600);
        assert_eq!(fgd.fragmentation(0, &[100, 1000]), 200);
        assert_eq!(fgd.fragmentation(0, &[600, 500]), 1100);
        assert_eq!(
            fgd.place(&job(1, 500), &nodes, &free, &shares),
            Some((0, 0b01))
        );

        let w = Workload {
            nodes: nodes.clone(),
            jobs: vec![job(1, 0), job(1, 500), job(1, 700)],
            ..Default::default()
        };
        let mut fgd = Fgd::new(&w);
        assert_eq!(fgd.fragmentation(0, &[600, 1000]), 1200);
        assert_eq!(fgd.fragmentation(0, &[300, 1000]), 900);
        assert_eq!(fgd.fragmentation(0, &[700, 1000]), 700);
        assert_eq!(
            fgd.place(&job(1, 300), &nodes, &free, &shares),
            Some((0, 0b01))
        );
    }

    /// Where FGD and best-fit differ. Mix: 2-GPU tasks (p = 3) and 1-GPU
    /// tasks (p = 1). Node a: 3 free GPUs; node b: 4 free GPUs.
    /// A 1-GPU task:
    /// - on a → 2 free: F = 0 (both fit) → Δ = 0 − 0 = 0;
    /// - on b → 3 free: F = 0 → Δ = 0.
    ///   Tie → a (first). A 2-GPU task on a leaves 1 free: F(a) = 3·1000
    ///   (a 2-GPU task cannot run) + 0 = 3000, Δ = +3000; on b leaves 2:
    ///   Δ = 0 → FGD picks b, where best-fit (fewest left) picks a.
    #[test]
    fn whole_gpus_avoid_leaving_a_node_no_common_task_can_use() {
        let nodes = vec![node("a", 3), node("b", 4)];
        let free = vec![0b111, 0b1111];
        let shares = vec![[0u32; 32]; 2];
        let w = Workload {
            nodes: nodes.clone(),
            jobs: vec![job(2, 0), job(2, 0), job(2, 0), job(1, 0)],
            ..Default::default()
        };
        let mut fgd = Fgd::new(&w);
        assert_eq!(fgd.fragmentation(0, &[0, 0, 1000]), 3000);
        assert_eq!(
            fgd.place(&job(1, 0), &nodes, &free, &shares),
            Some((0, 0b001))
        );
        assert_eq!(
            fgd.place(&job(2, 0), &nodes, &free, &shares),
            Some((1, 0b0011))
        );
    }

    /// A task pinned to a model counts every free GPU of another model as
    /// fragmented (it cannot run there at all). Nodes in list order: b
    /// (2×A10), a (2×T4). Mix: a 1-GPU task pinned to A10 (p = 1) and an
    /// unpinned half share (p = 1).
    /// Empty: F(b) = 0 + 0 = 0; F(a) = 2000 (pinned task: wrong model) + 0.
    /// A half share:
    /// - on b/GPU0 → (500, 1000): pinned task still has a whole GPU, the
    ///   half-used one is its fragment: 500; share fits: 0. Δ = +500;
    /// - on a/GPU0 → (500, 1000): pinned: 1500 (all free), share: 0.
    ///   Δ = 1500 − 2000 = −500.
    ///   FGD takes the T4 and keeps the A10s whole; first fit would take b.
    ///   Fleet F(M) after: (0 + 1500) / 2 tasks = 750 thousandths = 0.75 GPUs.
    #[test]
    fn a_pinned_task_makes_other_models_free_gpus_fragments() {
        let mut b = node("b", 2);
        b.model = "A10".into();
        let nodes = vec![b, node("a", 2)];
        let mut pinned = job(1, 0);
        pinned.models = vec!["A10".into()];
        let w = Workload {
            nodes: nodes.clone(),
            jobs: vec![pinned, job(1, 500)],
            ..Default::default()
        };
        let mut fgd = Fgd::new(&w);
        let (a10, t4) = (fgd.node_model[0], fgd.node_model[1]);
        assert_eq!(fgd.fragmentation(a10, &[1000, 1000]), 0);
        assert_eq!(fgd.fragmentation(t4, &[1000, 1000]), 2000);
        assert_eq!(fgd.fragmentation(a10, &[500, 1000]), 500);
        assert_eq!(fgd.fragmentation(t4, &[500, 1000]), 1500);
        let mut shares = vec![[0u32; 32]; 2];
        assert_eq!(
            fgd.place(&job(1, 500), &nodes, &[0b11, 0b11], &shares),
            Some((1, 0b01))
        );
        shares[1][0] = 500;
        let f = fgd.fleet_fragmentation(&nodes, &[0b11, 0b10], &shares);
        assert!((f - 0.75).abs() < 1e-12, "{f}");
    }

    #[test]
    fn a_task_that_fits_nowhere_is_not_placed() {
        let nodes = vec![node("a", 2)];
        let w = Workload {
            nodes: nodes.clone(),
            jobs: vec![job(4, 0)],
            ..Default::default()
        };
        let mut fgd = Fgd::new(&w);
        let shares = vec![[0u32; 32]; 1];
        assert_eq!(fgd.place(&job(4, 0), &nodes, &[0b11], &shares), None);
    }
}
