//! What the unit tests share: a node of eight GPUs of one model, and
//! random small fleets with running work.

use crate::domain::Generation;
use crate::fleet::{GpuInput, NEVER, NodeInput, RunningInput};
use crate::sim::workload::Rng;

/// A schedulable aws node `id` in `region` with eight healthy 80 GiB GPUs
/// of `model` (compute capability 9.0) at `price` micro-USD per GPU-hour.
pub(crate) fn node(
    id: &str,
    region: &str,
    price: u64,
    model: &str,
    generation: Generation,
) -> NodeInput {
    NodeInput {
        id: id.into(),
        provider: "aws".into(),
        region: region.into(),
        price_per_gpu_hour_micro_usd: price,
        schedulable: true,
        gpus: (0..8)
            .map(|g| GpuInput {
                uuid: format!("{id}-{g}"),
                model: model.into(),
                generation,
                memory_bytes: 80 << 30,
                compute_capability: (9, 0),
                healthy: true,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Ten H100 nodes of 1–8 GPUs over `regions` regions, at 1–3 micro-USD, a
/// sixth cordoned and an eighth of GPUs unhealthy; on about half the GPUs
/// one task runs, a third of them shares, most with an expected end.
pub(crate) fn random_fleet(rng: &mut Rng, regions: u64) -> (Vec<NodeInput>, Vec<RunningInput>) {
    let nodes: Vec<NodeInput> = (0..10)
        .map(|n| NodeInput {
            id: format!("n{n}"),
            provider: "p".into(),
            region: format!("r{}", n % regions.max(1)),
            price_per_gpu_hour_micro_usd: 1 + rng.below(3),
            schedulable: rng.below(6) != 0,
            gpus: (0..1 + rng.below(8))
                .map(|g| GpuInput {
                    uuid: format!("n{n}-{g}"),
                    model: "H100".into(),
                    generation: Generation::Hopper,
                    memory_bytes: 80 << 30,
                    healthy: rng.below(8) != 0,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    let mut running = Vec::new();
    for node in &nodes {
        for gpu in &node.gpus {
            if rng.below(2) == 0 {
                running.push(RunningInput {
                    job_id: format!("j{}", running.len()),
                    node_id: node.id.clone(),
                    gpu_uuids: vec![gpu.uuid.clone()],
                    share_milli: [0, 0, 250, 500][rng.below(4) as usize],
                    expected_end: Some(if rng.below(4) == 0 {
                        NEVER
                    } else {
                        100 + rng.below(50)
                    }),
                    ..Default::default()
                });
            }
        }
    }
    (nodes, running)
}
