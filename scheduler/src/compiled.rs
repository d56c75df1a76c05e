//! A job's constraints resolved once against one fleet's interned names, so
//! that testing a class is a few integer comparisons.

use crate::domain::{Constraints, JobInput, Locality};
use crate::fleet::{self, Fleet};

/// A job's constraints resolved against one fleet's interned names.
pub(crate) struct Compiled {
    pub(crate) models: Vec<bool>,
    pub(crate) providers_allow: Option<Vec<u16>>,
    pub(crate) providers_deny: Vec<u16>,
    pub(crate) regions_allow: Option<Vec<u16>>,
    pub(crate) regions_deny: Vec<u16>,
    pub(crate) preferred: Vec<u16>,
    pub(crate) max_price: u64,
    pub(crate) allow_spot: bool,
    pub(crate) require_spot: bool,
    pub(crate) max_interruption_milli: u32,
    pub(crate) locality: Locality,
    pub(crate) nvlink: bool,
    pub(crate) oci: bool,
}

pub(crate) fn model_matches(constraints: &Constraints, model: &fleet::ModelInfo) -> bool {
    (constraints.generations.is_empty() || constraints.generations.contains(&model.generation))
        && constraints
            .min_generation
            .is_none_or(|min| model.generation >= min)
        && (constraints.models.is_empty()
            || constraints
                .models
                .iter()
                .any(|m| m.eq_ignore_ascii_case(&model.name)))
        && model.memory_bytes >= constraints.min_gpu_memory_bytes
        && model.compute_capability >= constraints.min_compute_capability
}

impl Compiled {
    pub(crate) fn new(fleet: &Fleet, job: &JobInput) -> Self {
        let c = &job.constraints;
        let names = |list: &[String], interner: &fleet::Interner| -> Vec<u16> {
            list.iter().filter_map(|n| interner.get(n)).collect()
        };
        let locality = match c.locality {
            Locality::Unspecified if job.tasks > 1 => Locality::Region,
            Locality::Unspecified => Locality::Any,
            other => other,
        };
        Self {
            models: fleet.models.iter().map(|m| model_matches(c, m)).collect(),
            providers_allow: (!c.providers.is_empty())
                .then(|| names(&c.providers, &fleet.providers)),
            providers_deny: names(&c.exclude_providers, &fleet.providers),
            regions_allow: (!c.regions.is_empty()).then(|| names(&c.regions, &fleet.regions)),
            regions_deny: names(&c.exclude_regions, &fleet.regions),
            preferred: names(&c.preferred_regions, &fleet.regions),
            max_price: c.max_price_per_gpu_hour_micro_usd.unwrap_or(u64::MAX),
            allow_spot: c.allow_spot || c.require_spot,
            require_spot: c.require_spot,
            max_interruption_milli: c.max_interruption_milli_per_hour.unwrap_or(u32::MAX),
            locality,
            nvlink: c.require_nvlink,
            oci: c.require_oci,
        }
    }

    pub(crate) fn class_ok(&self, class: &fleet::Class) -> bool {
        class.price <= self.max_price && self.class_ok_at_any_price(class)
    }

    /// [`Compiled::class_ok`] without the price cap.
    pub(crate) fn class_ok_at_any_price(&self, class: &fleet::Class) -> bool {
        self.models[class.model as usize]
            && (class.oci || !self.oci)
            && self.spot_ok(class)
            && self
                .providers_allow
                .as_ref()
                .is_none_or(|a| a.contains(&class.provider))
            && !self.providers_deny.contains(&class.provider)
            && self
                .regions_allow
                .as_ref()
                .is_none_or(|a| a.contains(&class.region))
            && !self.regions_deny.contains(&class.region)
    }

    /// Spot allowed (or required), and not interrupted too often.
    pub(crate) fn spot_ok(&self, class: &fleet::Class) -> bool {
        if class.spot {
            self.allow_spot && class.interruption_milli <= self.max_interruption_milli
        } else {
            !self.require_spot
        }
    }

    /// The price the cost policy compares: spot at its expected cost per
    /// useful GPU-hour, `price / (1 − p)` where p, the chance an hour's work
    /// is lost, is the measured interruptions per node-hour (capped at
    /// 0.9); a preferred region at its discount.
    pub(crate) fn effective_price(&self, class: &fleet::Class, discount: f64) -> u64 {
        let mut price = class.price;
        if class.spot && class.interruption_milli > 0 {
            let lost = u64::from(class.interruption_milli.min(900));
            price = price.saturating_mul(1000) / (1000 - lost);
        }
        if self.preferred.contains(&class.region) {
            (price as f64 * (1.0 - discount)) as u64
        } else {
            price
        }
    }

    pub(crate) fn group_of(&self, class: &fleet::Class) -> u16 {
        match self.locality {
            Locality::Region => class.region,
            Locality::Provider => class.provider,
            _ => 0,
        }
    }
}
