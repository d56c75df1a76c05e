//! Queue order: priority (higher first), then fair share across tenants,
//! then submit time.
//!
//! Fair share: each tenant's *share* is its decayed past usage plus what it
//! runs now, divided by its weight. Usage is in normalised GPU-hours (a
//! generation's factor converts, e.g. one Hopper GPU-hour = 2 Ampere ones)
//! and decays with a half-life. A GPU running now counts as one GPU-hour,
//! so a tenant that just got GPUs yields to one that has waited. Within a
//! priority level the tenant with the lowest share goes next, one job at a
//! time, and its share grows by what it was given — so over a long run each
//! tenant's share of GPU time converges to its weight's share.

use std::cmp::Ordering;
use std::collections::binary_heap::PeekMut;
use std::collections::{BinaryHeap, HashMap};

use crate::domain::JobInput;

/// Per-tenant decayed usage, in normalised GPU-hours. Pure: callers pass time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FairShare {
    /// Half-life of past usage, seconds.
    pub half_life_secs: f64,
    usage: HashMap<String, f64>,
    last_update: Option<u64>,
}

impl FairShare {
    pub fn new(half_life_secs: f64) -> Self {
        Self {
            half_life_secs: half_life_secs.max(1.0),
            usage: HashMap::new(),
            last_update: None,
        }
    }

    /// Decays everything to `now` and adds what ran since the last call:
    /// `running` is normalised GPUs per tenant over that interval.
    pub fn advance(&mut self, now: u64, running: &HashMap<String, f64>) {
        let Some(last) = self.last_update else {
            self.last_update = Some(now);
            return;
        };
        if now <= last {
            return;
        }
        let dt = (now - last) as f64;
        let decay = 0.5f64.powf(dt / self.half_life_secs);
        for value in self.usage.values_mut() {
            *value *= decay;
        }
        for (tenant, gpus) in running {
            // Integral of a constant rate under exponential decay over dt.
            let added =
                gpus * self.half_life_secs / std::f64::consts::LN_2 * (1.0 - decay) / 3600.0;
            *self.usage.entry(tenant.clone()).or_insert(0.0) += added;
        }
        self.usage.retain(|_, v| *v > 1e-9);
        self.last_update = Some(now);
    }

    pub fn usage(&self) -> &HashMap<String, f64> {
        &self.usage
    }

    pub fn restore(&mut self, usage: HashMap<String, f64>, at: u64) {
        self.usage = usage;
        self.last_update = Some(at);
    }
}

#[derive(Debug, Clone, Copy)]
struct TenantKey {
    share: f64,
    /// Submit time of the tenant's next job, to break ties fairly.
    next_submit: u64,
    tenant: usize,
}

impl PartialEq for TenantKey {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for TenantKey {}
impl PartialOrd for TenantKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for TenantKey {
    // BinaryHeap is a max-heap: reverse so the lowest share pops first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .share
            .total_cmp(&self.share)
            .then(other.next_submit.cmp(&self.next_submit))
            .then(other.tenant.cmp(&self.tenant))
    }
}

/// The jobs of one priority level by tenant: tenants in order of their
/// first job, and each tenant's (submit time, job index) in input order.
#[derive(Default)]
pub(crate) struct Level<'a> {
    names: Vec<&'a str>,
    fifo: Vec<Vec<(u64, usize)>>,
    tenant_ids: HashMap<&'a str, usize, foldhash::fast::RandomState>,
}

impl<'a> Level<'a> {
    fn push(&mut self, job: usize, tenant: &'a str, submit: u64) {
        let id = *self.tenant_ids.entry(tenant).or_insert_with(|| {
            self.fifo.push(Vec::new());
            self.names.push(tenant);
            self.fifo.len() - 1
        });
        self.fifo[id].push((submit, job));
    }
}

/// The jobs of each priority level, highest level first, grouped in one
/// walk over the jobs.
pub(crate) fn levels(jobs: &[JobInput]) -> Vec<Level<'_>> {
    let mut level_of: HashMap<i32, usize, foldhash::fast::RandomState> = HashMap::default();
    let mut levels: Vec<(i32, Level<'_>)> = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let level = *level_of.entry(job.priority).or_insert_with(|| {
            levels.push((job.priority, Level::default()));
            levels.len() - 1
        });
        levels[level]
            .1
            .push(i, job.tenant.as_str(), job.submitted_at);
    }
    levels.sort_unstable_by_key(|level| std::cmp::Reverse(level.0));
    levels.into_iter().map(|(_, level)| level).collect()
}

/// Interleaves jobs of one priority level by tenant share.
pub(crate) struct LevelQueue {
    /// Per tenant: (submit time, job index), latest first: pop from the end.
    fifo: Vec<Vec<(u64, usize)>>,
    share: Vec<f64>,
    weight: Vec<f64>,
    heap: BinaryHeap<TenantKey>,
}

impl LevelQueue {
    /// `jobs`: (job index, tenant, submit time) of one priority level.
    #[cfg(test)]
    pub(crate) fn new(
        jobs: Vec<(usize, &str, u64)>,
        share_of: impl Fn(&str) -> f64,
        weight_of: impl Fn(&str) -> f64,
    ) -> Self {
        let mut level = Level::default();
        for (job, tenant, submit) in jobs {
            level.push(job, tenant, submit);
        }
        Self::of_level(level, share_of, weight_of)
    }

    /// The queue of one level (see [`levels`]).
    pub(crate) fn of_level(
        level: Level<'_>,
        share_of: impl Fn(&str) -> f64,
        weight_of: impl Fn(&str) -> f64,
    ) -> Self {
        let Level { names, fifo, .. } = level;
        let mut queue = Self {
            fifo: Vec::with_capacity(fifo.len()),
            share: names.iter().map(|t| share_of(t)).collect(),
            weight: names.iter().map(|t| weight_of(t).max(1e-9)).collect(),
            heap: BinaryHeap::new(),
        };
        for (id, mut jobs) in fifo.into_iter().enumerate() {
            jobs.sort_unstable_by(|a, b| b.cmp(a));
            queue.fifo.push(jobs);
            queue.push_tenant(id);
        }
        queue
    }

    fn push_tenant(&mut self, id: usize) {
        if let Some(&(submit, _)) = self.fifo[id].last() {
            self.heap.push(TenantKey {
                share: self.share[id] / self.weight[id],
                next_submit: submit,
                tenant: id,
            });
        }
    }

    /// Next job and its tenant slot. The tenant stays at the top of the
    /// heap until [`LevelQueue::done`], which must follow every pop.
    pub(crate) fn pop(&mut self) -> Option<(usize, usize)> {
        let tenant = self.heap.peek()?.tenant;
        let (_, job) = self.fifo[tenant].pop()?;
        Some((job, tenant))
    }

    /// Puts the tenant back in order after its job was handled; `granted`
    /// is the normalised GPUs it was given (0 when the job did not fit).
    /// Its key is replaced in place (one sift instead of a pop and a
    /// push); keys are totally ordered, so the order is the same.
    pub(crate) fn done(&mut self, tenant: usize, granted: f64) {
        self.share[tenant] += granted;
        let Some(mut top) = self.heap.peek_mut() else {
            return;
        };
        debug_assert_eq!(top.tenant, tenant, "done follows pop");
        match self.fifo[tenant].last() {
            Some(&(submit, _)) => {
                *top = TenantKey {
                    share: self.share[tenant] / self.weight[tenant],
                    next_submit: submit,
                    tenant,
                };
            }
            None => {
                PeekMut::pop(top);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_decays_by_half_life() {
        let mut fair = FairShare::new(3600.0);
        fair.advance(0, &HashMap::new());
        let running = HashMap::from([("a".to_string(), 1.0)]);
        fair.advance(1, &running);
        let one_second = fair.usage()["a"];
        assert!((one_second - 1.0 / 3600.0).abs() < 1e-6, "{one_second}");
        fair.advance(3601, &HashMap::new());
        assert!((fair.usage()["a"] - one_second / 2.0).abs() < 1e-9);
    }

    #[test]
    fn lowest_share_goes_first_and_yields_after_a_grant() {
        let jobs = vec![(0, "a", 1), (1, "a", 2), (2, "b", 3), (3, "b", 4)];
        let shares = HashMap::from([("a", 0.0), ("b", 1.0)]);
        let mut queue = LevelQueue::new(jobs, |t| shares[t], |_| 1.0);
        let (job, tenant) = queue.pop().unwrap();
        assert_eq!(job, 0);
        queue.done(tenant, 2.0);
        let (job, tenant) = queue.pop().unwrap();
        assert_eq!(job, 2, "b now has the lower share");
        queue.done(tenant, 0.0);
        let (job, _) = queue.pop().unwrap();
        assert_eq!(job, 3, "b still lowest (1.0 < 2.0)");
    }
}
