//! Usage and market queries over the ledger and the live allocations.

use std::sync::MutexGuard;

use super::*;
use crate::error::Result;
use crate::lifecycle::task_holds_gpus;
use crate::usage;

impl Controller {
    /// Live records of running allocations, up to now.
    pub(super) fn live_usage(
        &self,
        state: &State,
        now_ms: u64,
    ) -> Vec<gpufleet_proto::v1::UsageRecord> {
        let feed = self.usage_feed();
        let mut out = Vec::new();
        for job in state.jobs.values() {
            for task in job.tasks.iter().filter(|t| task_holds_gpus(t)) {
                let facts = task_facts(state, task, now_ms);
                if let Some(r) = usage::build_record(
                    job,
                    task,
                    &facts,
                    feed.acc.get(&task.allocation_id),
                    now_ms,
                ) {
                    out.push(r);
                }
            }
        }
        out
    }

    pub fn usage_report(
        &self,
        query: &usage::ReportQuery,
        include_running: bool,
    ) -> gpufleet_proto::v1::UsageReportResponse {
        let state = self.lock();
        let now = self.inner.clock.unix_secs();
        let live = if include_running {
            self.live_usage(&state, now * 1000)
        } else {
            Vec::new()
        };
        state.ledger.report(query, &live, now)
    }

    /// Jobs, tenants or workload classes by paid-but-idle GPU-time, running
    /// allocations included up to now.
    pub fn usage_waste(
        &self,
        query: &usage::waste::WasteQuery,
    ) -> gpufleet_proto::v1::UsageWasteResponse {
        let state = self.lock();
        let now = self.inner.clock.unix_secs();
        let live = self.live_usage(&state, now * 1000);
        state.ledger.waste(query, &live, now)
    }

    /// Ledger records (and live ones when asked, first) matching `filter`,
    /// one page.
    pub fn list_usage(
        &self,
        filter: &usage::RecordFilter,
        page_size: usize,
        offset: usize,
    ) -> Result<(Vec<gpufleet_proto::v1::UsageRecord>, bool)> {
        let state = self.lock();
        let now_ms = self.inner.clock.unix_secs() * 1000;
        let live: Vec<gpufleet_proto::v1::UsageRecord> = if filter.include_running {
            self.live_usage(&state, now_ms)
                .into_iter()
                .filter(|r| filter.matches(r))
                .collect()
        } else {
            Vec::new()
        };
        let live_count = live.len();
        let mut page: Vec<_> = live.into_iter().skip(offset).take(page_size + 1).collect();
        if page.len() > page_size {
            page.truncate(page_size);
            return Ok((page, true));
        }
        let (stored, more) = state.ledger.list(
            &self.inner.store,
            filter,
            offset.saturating_sub(live_count),
            page_size - page.len(),
        )?;
        page.extend(stored);
        Ok((page, more))
    }

    pub fn market_tightness(&self, since_secs: u64) -> gpufleet_proto::v1::MarketTightnessResponse {
        let state = self.lock();
        gpufleet_proto::v1::MarketTightnessResponse {
            regions: state.market.tightness(since_secs),
            unmet_demand_gpus: state.market.unmet_demand_gpus,
        }
    }

    pub fn market_elasticity(
        &self,
        region: &str,
        generation: i32,
        since_secs: u64,
        bucket_secs: u64,
    ) -> gpufleet_proto::v1::MarketElasticityResponse {
        self.lock()
            .market
            .elasticity(region, generation, since_secs, bucket_secs)
    }

    /// The queue-wait histogram so far.
    pub fn queue_wait(&self) -> WaitHistogram {
        self.usage_feed().queue_wait.clone()
    }

    pub(super) fn usage_feed(&self) -> MutexGuard<'_, UsageFeed> {
        self.inner
            .usage_feed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// What a task's usage record needs to know of its node: its zone, spot,
/// and the prices in force from the task's start to its end (or `now_ms`).
pub(super) fn task_facts(
    state: &State,
    task: &gpufleet_proto::v1::TaskStatus,
    now_ms: u64,
) -> usage::NodeFacts {
    let Some(node) = state.nodes.get(&task.node_id).map(|e| &e.record) else {
        return usage::NodeFacts::default();
    };
    let identity = node.identity.clone().unwrap_or_default();
    let started = task.started_at.as_ref().map_or(now_ms, usage::ts_ms);
    let ended = task.finished_at.as_ref().map_or(now_ms, usage::ts_ms);
    // Where no source prices the node: its own configured price.
    let fallback = if identity.price_per_gpu_hour_micro_usd > 0 {
        identity.price_per_gpu_hour_micro_usd
    } else {
        task.price_per_gpu_hour_micro_usd
    };
    let mut key = super::prices::node_price_key(node);
    // The task's own model, in case the node mixes models.
    if !task.model.is_empty() {
        key.model = task.model.clone();
    }
    usage::NodeFacts {
        zone: identity.zone,
        spot: identity.spot,
        price_timeline: state
            .prices
            .timeline(&key, started, ended.max(started), fallback),
    }
}
