//! The scheduler benchmark's mixed workload: whole GPUs, MIG instances and
//! shares of GPUs arriving and leaving on a fleet where a quarter of the
//! nodes run half their GPUs in MIG mode. The scheduler (`pack`) against
//! first fit on the same arrivals: how many jobs each places, and how much
//! free GPU capacity each leaves stranded in slivers no waiting job fits.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use gpufleet_scheduler::{
    Fleet, GpuUnit, JobInput, MigInput, NodeInput, Outcome, Policy, RunningInput, SchedulerConfig,
    TaskPlacement, TenantState, schedule,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// (profile, share of the GPU's memory in eighths, SM share ‰): an H100's
/// 3g + 2g + 1g + 1g layout, memory scaled to each model.
const LAYOUT: &[(&str, u64, u32)] = &[
    ("3g.40gb", 4, 429),
    ("2g.20gb", 2, 286),
    ("1g.10gb", 1, 143),
    ("1g.10gb", 1, 143),
];

/// Shares asked, as in Alibaba's openb trace (`gpu_milli`).
const SHARES: &[u32] = &[100, 200, 230, 250, 300, 460, 470, 500, 650, 810];

/// Turns GPUs 0–3 of every fourth node into MIG GPUs.
pub fn with_mig(mut nodes: Vec<NodeInput>) -> Vec<NodeInput> {
    for (n, node) in nodes.iter_mut().enumerate() {
        if n % 4 != 0 {
            continue;
        }
        for gpu in node.gpus.iter_mut().take(4) {
            gpu.mig_enabled = true;
            gpu.mig_instances = LAYOUT
                .iter()
                .enumerate()
                .map(|(i, (profile, eighths, sm))| MigInput {
                    uuid: format!("MIG-{}-{i}", gpu.uuid),
                    profile: (*profile).to_string(),
                    memory_bytes: gpu.memory_bytes / 8 * eighths,
                    sm_share_milli: *sm,
                })
                .collect();
        }
    }
    nodes
}

fn arrival(rng: &mut StdRng, id: u64, policy: Policy) -> JobInput {
    let kind: f64 = rng.random();
    let (gpus, unit) = if kind < 0.45 {
        let milli = SHARES[rng.random_range(0..SHARES.len())];
        let memory = if rng.random_bool(0.3) {
            u64::from(rng.random_range(4u32..=16)) << 30
        } else {
            0
        };
        (
            1,
            GpuUnit::Share {
                milli,
                memory_bytes: memory,
            },
        )
    } else if kind < 0.6 {
        let unit = if rng.random_bool(0.5) {
            GpuUnit::Mig {
                profile: Some(LAYOUT[rng.random_range(0..LAYOUT.len())].0.to_string()),
                min_memory_bytes: 0,
                min_sm_share_milli: 0,
            }
        } else {
            GpuUnit::Mig {
                profile: None,
                min_memory_bytes: 0,
                min_sm_share_milli: [100, 200, 400][rng.random_range(0..3)],
            }
        };
        (1, unit)
    } else {
        let gpus = match rng.random_range(0..10) {
            0..=4 => 1,
            5..=6 => 2,
            7 => 4,
            _ => 8,
        };
        (gpus, GpuUnit::Whole)
    };
    JobInput {
        id: format!("m-{id}"),
        tenant: "t".into(),
        submitted_at: id,
        tasks: 1,
        gpus_per_task: gpus,
        unit,
        policy: Some(policy),
        max_runtime_secs: Some(rng.random_range(5..60)),
        ..Default::default()
    }
}

/// What one policy did with the mixed arrivals.
pub struct Mixed {
    pub arrived: usize,
    pub placed: usize,
    /// Mean, over measured steps, of allocated ÷ total capacity (‰ GPUs).
    pub utilisation: f64,
    /// Mean, over measured steps, of free capacity no waiting job fits
    /// (slivers of shared GPUs below the smallest waiting share, free MIG
    /// instances no waiting MIG job matches, whole GPUs on nodes with too
    /// few free for the smallest waiting whole job) ÷ total capacity.
    pub stranded: f64,
    pub pass_secs: f64,
}

/// Capacity in thousandths: 1000 per whole GPU (a MIG GPU counts as the
/// sum of its instances).
fn capacity(nodes: &[NodeInput]) -> u64 {
    nodes
        .iter()
        .flat_map(|n| n.gpus.iter())
        .map(|g| {
            if g.mig_enabled {
                g.mig_instances
                    .iter()
                    .map(|m| u64::from(m.sm_share_milli))
                    .sum()
            } else {
                1000
            }
        })
        .sum()
}

pub fn churn(nodes: &[NodeInput], policy: Policy, steps: usize, load: f64, seed: u64) -> Mixed {
    let mut rng = StdRng::seed_from_u64(seed);
    let total = capacity(nodes);
    // Mean demand per job about 1.05 GPUs, mean runtime 32 steps.
    let arrivals = ((total as f64 / 1000.0 * load) / (1.05 * 32.0)).max(1.0) as usize;
    let mut running: Vec<(TaskPlacement, u64)> = Vec::new();
    let mut queue: Vec<JobInput> = Vec::new();
    let (mut arrived, mut placed, mut next) = (0usize, 0usize, 0u64);
    let (mut utilisation, mut stranded, mut measured) = (0.0, 0.0, 0usize);
    let mut pass_secs = 0.0;
    for step in 0..steps as u64 {
        running.retain(|(_, end)| *end > step);
        for _ in 0..arrivals {
            next += 1;
            queue.push(arrival(&mut rng, next, policy));
            arrived += 1;
        }
        let inputs: Vec<RunningInput> = running
            .iter()
            .map(|(p, _)| RunningInput {
                job_id: p.node_id.clone(),
                node_id: p.node_id.clone(),
                gpu_uuids: p.gpu_uuids.clone(),
                share_milli: if p.mig_profile.is_some() {
                    0
                } else {
                    p.share_milli
                },
                memory_bytes: p.memory_limit_bytes,
                ..Default::default()
            })
            .collect();
        let started = Instant::now();
        let mut fleet = Fleet::build(nodes, &inputs);
        let result = schedule(
            &mut fleet,
            &queue,
            &SchedulerConfig::default(),
            &TenantState::default(),
            step,
        );
        pass_secs += started.elapsed().as_secs_f64();
        let mut still = Vec::new();
        for (job, outcome) in queue.drain(..).zip(result.outcomes) {
            match outcome {
                Outcome::Placed(tasks) => {
                    placed += 1;
                    let end = step + job.max_runtime_secs.unwrap_or(10);
                    running.extend(tasks.into_iter().map(|t| (t, end)));
                }
                _ => still.push(job),
            }
        }
        queue = still;
        if step < steps as u64 / 4 {
            continue; // warm-up
        }
        measured += 1;
        let allocated: u64 = running.iter().map(|(p, _)| p.milli_gpus()).sum();
        utilisation += allocated as f64 / total as f64;
        stranded += stranded_milli(nodes, &running, &queue) as f64 / total as f64;
    }
    Mixed {
        arrived,
        placed,
        utilisation: utilisation / measured.max(1) as f64,
        stranded: stranded / measured.max(1) as f64,
        pass_secs,
    }
}

/// Free capacity (‰) that no waiting job could use now.
fn stranded_milli(
    nodes: &[NodeInput],
    running: &[(TaskPlacement, u64)],
    queue: &[JobInput],
) -> u64 {
    let min_share = queue
        .iter()
        .filter_map(|j| match j.unit {
            GpuUnit::Share { milli, .. } => Some(milli),
            _ => None,
        })
        .min();
    let min_whole = queue
        .iter()
        .filter(|j| j.unit == GpuUnit::Whole)
        .map(|j| j.gpus_per_task)
        .min();
    let mig_wanted: Vec<&GpuUnit> = queue
        .iter()
        .map(|j| &j.unit)
        .filter(|u| matches!(u, GpuUnit::Mig { .. }))
        .collect();
    let mut exclusive: HashSet<&str> = HashSet::new();
    let mut shared: HashMap<&str, u32> = HashMap::new();
    for (p, _) in running {
        if p.share_milli > 0 && p.mig_profile.is_none() {
            *shared.entry(p.gpu_uuids[0].as_str()).or_default() += p.share_milli;
        } else {
            exclusive.extend(p.gpu_uuids.iter().map(String::as_str));
        }
    }
    let mut out = 0u64;
    for node in nodes {
        let free_whole = node
            .gpus
            .iter()
            .filter(|g| {
                !g.mig_enabled
                    && !exclusive.contains(g.uuid.as_str())
                    && !shared.contains_key(g.uuid.as_str())
            })
            .count() as u32;
        // Free whole GPUs: usable by a waiting share, or a whole job small enough.
        if min_share.is_none() && min_whole.is_none_or(|m| m > free_whole) {
            out += u64::from(free_whole) * 1000;
        }
        for gpu in &node.gpus {
            if gpu.mig_enabled {
                for m in &gpu.mig_instances {
                    let free = !exclusive.contains(m.uuid.as_str());
                    let wanted = mig_wanted.iter().any(|u| match u {
                        GpuUnit::Mig {
                            profile: Some(p), ..
                        } => *p == m.profile,
                        GpuUnit::Mig {
                            min_sm_share_milli, ..
                        } => m.sm_share_milli >= *min_sm_share_milli,
                        _ => false,
                    });
                    if free && !wanted {
                        out += u64::from(m.sm_share_milli);
                    }
                }
            } else if let Some(used) = shared.get(gpu.uuid.as_str()) {
                let left = 1000u32.saturating_sub(*used);
                if min_share.is_none_or(|m| m > left) {
                    out += u64::from(left);
                }
            }
        }
    }
    out
}
