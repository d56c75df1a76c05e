//! The classes a request may use, remembered per pass by the constraints
//! that decide them. A class's eligibility reads only what the class is
//! (model, provider, region, price, spot, runtime), which a pass never
//! changes; and since classes are kept by ascending price, a price cap
//! keeps a prefix of the list found at any price. So requests that differ
//! only in their cap, their preferences or their size share one filter.

use std::collections::HashMap;

use crate::compiled::Compiled;
use crate::domain::{Constraints, Generation};
use crate::fleet::Fleet;

/// Class ids kept at most (16 MiB): past that, lists are filtered afresh.
const MAX_CACHED_IDS: usize = 4 << 20;

/// Everything in [`Constraints`] that [`Compiled::class_ok`] reads, but
/// the price cap.
#[derive(PartialEq, Eq, Hash)]
struct Key<'a> {
    generations: &'a [Generation],
    models: &'a [String],
    min_gpu_memory_bytes: u64,
    providers: &'a [String],
    regions: &'a [String],
    min_generation: Option<Generation>,
    min_compute_capability: (u32, u32),
    exclude_providers: &'a [String],
    exclude_regions: &'a [String],
    allow_spot: bool,
    require_spot: bool,
    max_interruption_milli_per_hour: Option<u32>,
    require_oci: bool,
}

impl<'a> Key<'a> {
    fn of(c: &'a Constraints) -> Self {
        // Destructured so that a new constraint cannot be missed here.
        let Constraints {
            generations,
            models,
            min_gpu_memory_bytes,
            providers,
            regions,
            max_price_per_gpu_hour_micro_usd: _,
            min_generation,
            min_compute_capability,
            exclude_providers,
            exclude_regions,
            preferred_regions: _,
            allow_spot,
            require_spot,
            max_interruption_milli_per_hour,
            locality: _,
            require_nvlink: _,
            require_oci,
        } = c;
        Key {
            generations,
            models,
            min_gpu_memory_bytes: *min_gpu_memory_bytes,
            providers,
            regions,
            min_generation: *min_generation,
            min_compute_capability: *min_compute_capability,
            exclude_providers,
            exclude_regions,
            allow_spot: *allow_spot,
            require_spot: *require_spot,
            max_interruption_milli_per_hour: *max_interruption_milli_per_hour,
            require_oci: *require_oci,
        }
    }
}

/// Eligible classes at any price, by constraints, for one pass.
#[derive(Default)]
pub(crate) struct Eligible<'a> {
    lists: HashMap<Key<'a>, Vec<u32>, foldhash::fast::RandomState>,
    cached_ids: usize,
}

impl<'a> Eligible<'a> {
    /// The classes a request with `constraints` (compiled as `compiled`)
    /// may use, cheapest first: `fleet.classes_by_price` filtered by
    /// [`Compiled::class_ok`].
    pub(crate) fn classes(
        &mut self,
        fleet: &Fleet,
        constraints: &'a Constraints,
        compiled: &Compiled,
    ) -> Vec<u32> {
        let within_cap = |list: &[u32]| -> Vec<u32> {
            let end =
                list.partition_point(|&c| fleet.classes[c as usize].price <= compiled.max_price);
            list[..end].to_vec()
        };
        let key = Key::of(constraints);
        if let Some(list) = self.lists.get(&key) {
            return within_cap(list);
        }
        if crate::verdict::shortcuts_off() {
            return fleet
                .classes_by_price
                .iter()
                .copied()
                .filter(|&c| compiled.class_ok(&fleet.classes[c as usize]))
                .collect();
        }
        let any_price: Vec<u32> = fleet
            .classes_by_price
            .iter()
            .copied()
            .filter(|&c| compiled.class_ok_at_any_price(&fleet.classes[c as usize]))
            .collect();
        let classes = within_cap(&any_price);
        // Each entry counts at least one: lists that came out empty bound
        // the map too.
        let cost = any_price.len().max(1);
        if self.cached_ids + cost <= MAX_CACHED_IDS {
            self.cached_ids += cost;
            self.lists.insert(key, any_price);
        }
        classes
    }
}
