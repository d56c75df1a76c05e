//! Spot interruptions: an agent relays its cloud's notice that the machine
//! is being reclaimed. The node is cordoned at once (no new work), every
//! allocation on it ends as `Interrupted` (the job follows its node-loss
//! retry policy, so it is queued again now, not when the lease runs out),
//! and the interruption is recorded for the market's interruption rates.
//! A rebalance recommendation (AWS) only cordons: nothing is reclaimed yet.

use std::collections::BTreeMap;

use gpufleet_proto::v1::{
    InterruptionNotice, InterruptionRate, Job, MarketInterruptionsResponse, WorkloadState,
};

use super::*;
use crate::error::Result;
use crate::lifecycle::{derive_job_state, is_desired, job_nodes};
use crate::store::{IdRange, WriteBatch};

/// Interruptions kept in memory and listed at most (newest kept); the
/// store keeps them under the market retention.
pub const MAX_INTERRUPTIONS: usize = 10_000;
/// Longest `detail` kept from a notice.
pub const NOTICE_DETAIL_BYTES: usize = 4096;
/// Longest `source` or `action`.
pub const NOTICE_WORD_BYTES: usize = 64;

/// Interruptions per node-hour by (provider, region, generation), as the
/// scheduler reads them: milli-interruptions per node-hour.
pub type InterruptionRates = BTreeMap<(String, String, i32), u32>;

/// The window interruption rates are measured over.
pub const RATE_WINDOW_SECS: u64 = 7 * 86_400;

pub(super) fn load(store: &dyn Store) -> Result<Vec<gpufleet_proto::v1::Interruption>> {
    let mut out = Vec::new();
    crate::store::visit::<gpufleet_proto::v1::Interruption>(
        store,
        Keyspace::Interruptions,
        IdRange::default(),
        |_, i| {
            out.push(i);
            Ok(true)
        },
    )?;
    let skip = out.len().saturating_sub(MAX_INTERRUPTIONS);
    Ok(out.into_iter().skip(skip).collect())
}

fn interruption_id(i: &gpufleet_proto::v1::Interruption) -> String {
    let ms = i.noticed_at.as_ref().map_or(0, usage::ts_ms);
    format!("{ms:013}/{}", i.node_id)
}

impl Controller {
    /// Applies a node's interruption notice (see the module doc).
    pub fn record_interruption(&self, node_id: &str, mut notice: InterruptionNotice) -> Result<()> {
        // An agent's notice is clipped, not refused: it carries a reclaim.
        for value in [&mut notice.source, &mut notice.action] {
            value.retain(|c| !c.is_control());
            gpufleet_core::limits::clip(value, NOTICE_WORD_BYTES);
        }
        gpufleet_core::limits::clip(&mut notice.detail, NOTICE_DETAIL_BYTES);
        let now = self.now();
        let now_ts = self.now_ts();
        let mut state = self.lock();
        let Some(entry) = state.nodes.get_mut(node_id) else {
            return Ok(());
        };
        entry.last_seen = self.inner.clock.monotonic();
        let deadline_text = notice
            .deadline
            .and_then(|d| std::time::SystemTime::try_from(d).ok())
            .map(|d| humantime::format_rfc3339_seconds(d).to_string())
            .unwrap_or_else(|| "soon".to_string());
        let reclaim = notice.action != "rebalance";
        let reason = if reclaim {
            format!(
                "spot interruption: {} {} at {deadline_text}",
                notice.source, notice.action
            )
        } else {
            format!("spot rebalance recommended by {}", notice.source)
        };
        let mut record = entry.record.clone();
        let already = record.cordoned && record.cordon_reason == reason;
        record.cordoned = true;
        record.cordon_reason = reason.clone();
        let identity = record.identity.clone().unwrap_or_default();
        let generation = super::prices::first_gpu(&record).map_or(0, |i| i.generation);
        let mut batch = WriteBatch::default();
        batch.put(Keyspace::Nodes, node_id, &record);
        if let Some(entry) = state.nodes.get_mut(node_id) {
            entry.record = record;
        }
        if already || !reclaim {
            self.inner.store.write(batch);
            drop(state);
            tracing::warn!(node_id, %reason, "node cordoned");
            return Ok(());
        }
        let mut changed: Vec<Job> = Vec::new();
        let mut retired = Vec::new();
        let mut allocation_ids = Vec::new();
        for job in state.jobs.values() {
            if !job
                .tasks
                .iter()
                .any(|t| t.node_id == node_id && task_holds_gpus(t))
            {
                continue;
            }
            let mut job = job.clone();
            for task in job
                .tasks
                .iter_mut()
                .filter(|t| t.node_id == node_id && task_holds_gpus(t))
            {
                task.set_state(WorkloadState::Interrupted);
                task.message = reason.clone();
                task.finished_at = Some(now_ts);
                allocation_ids.push(task.allocation_id.clone());
            }
            retired.extend(derive_job_state(&mut job, now));
            job.version += 1;
            changed.push(job);
        }
        let interruption = gpufleet_proto::v1::Interruption {
            node_id: node_id.to_string(),
            provider: identity.provider,
            region: identity.region,
            generation,
            source: notice.source.clone(),
            action: notice.action.clone(),
            noticed_at: Some(now_ts),
            deadline: notice.deadline,
            allocation_ids,
        };
        batch.put(
            Keyspace::Interruptions,
            &interruption_id(&interruption),
            &interruption,
        );
        self.inner.store.write(batch);
        state.interruptions.push_back(interruption);
        while state.interruptions.len() > MAX_INTERRUPTIONS {
            state.interruptions.pop_front();
        }
        let now_secs = self.inner.clock.unix_secs();
        state.interruption_rates = scheduler_rates(&state, now_secs);
        let touched: std::collections::BTreeSet<String> =
            changed.iter().flat_map(job_nodes).collect();
        let requeued = changed.iter().any(|j| !is_desired(j));
        self.commit_jobs_retiring(&mut state, changed, retired)?;
        self.push_desired(&mut state, node_id, false);
        for node in touched {
            self.push_desired(&mut state, &node, false);
        }
        drop(state);
        tracing::warn!(node_id, %reason, "spot interruption: node cordoned, its work requeued");
        if requeued {
            self.request_schedule();
        }
        Ok(())
    }

    /// Interruptions since `since_secs` (newest `limit`, oldest first) and
    /// the rate per (provider, region, generation) over the same window.
    pub fn market_interruptions(
        &self,
        since_secs: u64,
        limit: usize,
    ) -> MarketInterruptionsResponse {
        let state = self.lock();
        let since_ms = since_secs * 1000;
        let mut interruptions: Vec<gpufleet_proto::v1::Interruption> = state
            .interruptions
            .iter()
            .rev()
            .filter(|i| i.noticed_at.as_ref().map_or(0, usage::ts_ms) >= since_ms)
            .take(limit.clamp(1, MAX_INTERRUPTIONS))
            .cloned()
            .collect();
        interruptions.reverse();
        let rates = rates(&state, since_secs)
            .into_iter()
            .map(
                |((provider, region, generation), (count, hours))| InterruptionRate {
                    provider,
                    region,
                    generation,
                    interruptions: count,
                    spot_node_hours: hours,
                    interruptions_per_node_hour: (hours > 0.0).then(|| count as f64 / hours),
                },
            )
            .collect();
        MarketInterruptionsResponse {
            interruptions,
            rates,
        }
    }
}

/// (interruptions, spot node-hours) per (provider, region, generation)
/// since `since_secs`: node-hours from the market minutes' spot-node counts.
fn rates(state: &State, since_secs: u64) -> BTreeMap<(String, String, i32), (u32, f64)> {
    let mut out: BTreeMap<(String, String, i32), (u32, f64)> = BTreeMap::new();
    for (key, minutes) in state.market.spot_node_minutes(since_secs) {
        out.entry(key).or_default().1 = minutes as f64 / 60.0;
    }
    for i in state
        .interruptions
        .iter()
        .filter(|i| i.noticed_at.as_ref().map_or(0, usage::ts_ms) >= since_secs * 1000)
        .filter(|i| i.action != "rebalance")
    {
        out.entry((i.provider.clone(), i.region.clone(), i.generation))
            .or_default()
            .0 += 1;
    }
    out
}

/// The rates the scheduler prices spot by: milli-interruptions per node-hour
/// over the last [`RATE_WINDOW_SECS`], where there were spot node-hours.
pub(super) fn scheduler_rates(state: &State, now_secs: u64) -> InterruptionRates {
    rates(state, now_secs.saturating_sub(RATE_WINDOW_SECS))
        .into_iter()
        .filter(|(_, (_, hours))| *hours > 0.0)
        .map(|(key, (count, hours))| (key, ((count as f64 / hours) * 1000.0).round() as u32))
        .collect()
}
