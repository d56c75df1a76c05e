//! What the unit tests share: a node of eight GPUs of one model.

use crate::domain::Generation;
use crate::fleet::{GpuInput, NodeInput};

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
