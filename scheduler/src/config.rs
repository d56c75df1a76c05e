//! Policy for a pass: the default placement policy, tenants' weights and
//! quotas, generation factors, and what the tenants hold and have used.

use std::collections::HashMap;

use crate::domain::{Generation, Policy};

#[derive(Debug, Clone, Default)]
pub struct TenantPolicy {
    /// Relative share; default 1.
    pub weight: f64,
    /// Most GPUs the tenant may hold at once (shares count as their part
    /// of a GPU).
    pub max_gpus: Option<u32>,
    /// Most GPUs of one generation at once (shares count likewise).
    pub max_gpus_per_generation: HashMap<Generation, u32>,
}

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub default_policy: Policy,
    /// Unknown tenants get weight 1 and no quota.
    pub tenants: HashMap<String, TenantPolicy>,
    /// Normalisation of GPU-hours by generation; default 1.
    pub generation_factors: HashMap<Generation, f64>,
    /// Reservations per pass (one per priority level at most).
    pub max_reservations: usize,
    /// Preemption attempts per pass.
    pub max_preemptions: usize,
    pub preferred_region_discount: f64,
    /// Record the time of every decision in
    /// [`crate::PassResult::decision_nanos`]. A benchmark's stopwatch, not
    /// scheduling time: nothing decided depends on it.
    pub measure_decisions: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            default_policy: Policy::Cost,
            tenants: HashMap::new(),
            generation_factors: HashMap::new(),
            max_reservations: 8,
            max_preemptions: 16,
            preferred_region_discount: 0.10,
            measure_decisions: false,
        }
    }
}

impl SchedulerConfig {
    pub fn weight(&self, tenant: &str) -> f64 {
        self.tenants
            .get(tenant)
            .map_or(1.0, |t| if t.weight > 0.0 { t.weight } else { 1.0 })
    }

    pub fn factor(&self, generation: Generation) -> f64 {
        self.generation_factors
            .get(&generation)
            .copied()
            .unwrap_or(1.0)
    }
}

/// What tenants hold now and have used, for fair share and quotas.
#[derive(Debug, Clone, Default)]
pub struct TenantState {
    /// Decayed normalised GPU-hours ([`crate::FairShare::usage`]).
    pub usage: HashMap<String, f64>,
    /// Thousandths of GPUs held now per tenant, per generation (a whole GPU
    /// is 1000, a share its thousandths, a MIG instance its SM share).
    pub allocated: HashMap<String, HashMap<Generation, u64>>,
}
