//! The usage ledger: one record per allocation when it ends, rollups for
//! reports, and market signals (see [`market`]). Plain Rust over prost
//! records; the `Usage` gRPC service is an adapter on top.

pub mod market;
pub mod rollup;
pub mod waste;

use std::collections::{BTreeMap, HashMap};

pub use gpufleet_proto::v1::UsageDimension;
use gpufleet_proto::v1::{
    GpuSample, Job, PriceChangePoint, TaskStatus, UsagePoint, UsageRecord, UsageReportResponse,
    UsageRow, WorkloadState,
};
use prost_types::Timestamp;

use self::rollup::{Cell, Contribution, Rollups, micro_usd};
use crate::store::{self, IdRange, Keyspace, Store, StoreError, WriteBatch};

/// The dimensions usage is grouped by.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Dims {
    pub provider: String,
    pub region: String,
    pub generation: i32,
    pub model: String,
    pub tenant: String,
    pub workload_class: String,
    pub job_name: String,
}

impl Dims {
    pub fn of(record: &UsageRecord) -> Self {
        Self {
            provider: record.provider.clone(),
            region: record.region.clone(),
            generation: record.generation,
            model: record.model.clone(),
            tenant: record.tenant.clone(),
            workload_class: record.workload_class.clone(),
            job_name: record.job_name.clone(),
        }
    }

    /// Only the fields named in `group_by`.
    pub fn project(&self, group_by: &[UsageDimension]) -> Self {
        let has = |d| group_by.contains(&d);
        Self {
            provider: if has(UsageDimension::Provider) {
                self.provider.clone()
            } else {
                String::new()
            },
            region: if has(UsageDimension::Region) {
                self.region.clone()
            } else {
                String::new()
            },
            generation: if has(UsageDimension::Generation) {
                self.generation
            } else {
                0
            },
            model: if has(UsageDimension::Model) {
                self.model.clone()
            } else {
                String::new()
            },
            tenant: if has(UsageDimension::Tenant) {
                self.tenant.clone()
            } else {
                String::new()
            },
            workload_class: if has(UsageDimension::WorkloadClass) {
                self.workload_class.clone()
            } else {
                String::new()
            },
            job_name: if has(UsageDimension::JobName) {
                self.job_name.clone()
            } else {
                String::new()
            },
        }
    }
}

pub fn ts_ms(ts: &Timestamp) -> u64 {
    (ts.seconds.max(0) as u64) * 1000 + (ts.nanos.max(0) as u64) / 1_000_000
}

pub fn ms_ts(ms: u64) -> Timestamp {
    Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// The profiling (GPM) activities of a sample, 0..100: (SM active, tensor
/// active), from the agent's `GpuSample.gpm` (ratios 0..1, as
/// dcgm-exporter's). Absent, never 0, on GPUs without GPM: usage then falls
/// back to the coarse utilisation.
pub fn profiling_activity(sample: &GpuSample) -> (Option<f64>, Option<f64>) {
    let Some(gpm) = sample.gpm.as_ref() else {
        return (None, None);
    };
    let percent = |ratio: Option<f64>| {
        ratio
            .filter(|r| r.is_finite())
            .map(|r| (r * 100.0).clamp(0.0, 100.0))
    };
    (percent(gpm.sm_active), percent(gpm.tensor_active))
}

/// What a record says its GPUs did, 0..100, and whether profiling measured
/// it: SM activity (GPM) when known, else NVML's coarse utilisation.
pub fn activity_of(record: &UsageRecord) -> (Option<f64>, bool) {
    match record.mean_sm_active_percent {
        Some(a) => (Some(a), true),
        None => (record.mean_sm_utilization_percent, false),
    }
}

/// Telemetry of one allocation's GPUs while it runs.
#[derive(Debug, Clone, Default)]
pub struct Accumulator {
    util_sum: f64,
    util_n: u64,
    sm_active_sum: f64,
    sm_active_n: u64,
    tensor_active_sum: f64,
    tensor_active_n: u64,
    mem_sum: f64,
    mem_n: u64,
    /// Joules integrated from power samples.
    energy_joules: f64,
    /// Per GPU: last (sample ms, power mW) for integration.
    last_power: HashMap<String, (u64, u32)>,
    /// Per GPU: (first, last) total-energy counter readings, millijoules.
    energy_counter: HashMap<String, (u64, u64)>,
}

impl Accumulator {
    /// Energy over the allocation: from the GPUs' energy counters when every
    /// GPU reported one, else integrated power.
    pub fn energy_joules(&self) -> Option<f64> {
        let from_counters: u64 = self
            .energy_counter
            .values()
            .map(|(first, last)| last.saturating_sub(*first))
            .sum();
        if !self.energy_counter.is_empty()
            && self.energy_counter.len() >= self.last_power.len()
            && from_counters > 0
        {
            return Some(from_counters as f64 / 1000.0);
        }
        (self.energy_joules > 0.0).then_some(self.energy_joules)
    }

    /// Folds one sample of one of the allocation's GPUs in.
    pub fn add(&mut self, sample: &GpuSample) {
        if let Some(mj) = sample.total_energy_millijoules {
            let entry = self
                .energy_counter
                .entry(sample.uuid.clone())
                .or_insert((mj, mj));
            // A counter that went backwards (driver reload) restarts the span.
            if mj < entry.1 {
                *entry = (mj, mj);
            }
            entry.1 = mj;
        }
        if let Some(u) = sample.gpu_utilization_percent {
            self.util_sum += u as f64;
            self.util_n += 1;
        }
        if let Some(u) = sample.memory_utilization_percent {
            self.mem_sum += u as f64;
            self.mem_n += 1;
        }
        let (sm_active, tensor_active) = profiling_activity(sample);
        if let Some(a) = sm_active {
            self.sm_active_sum += a;
            self.sm_active_n += 1;
        }
        if let Some(a) = tensor_active {
            self.tensor_active_sum += a;
            self.tensor_active_n += 1;
        }
        let (Some(power), Some(at)) = (sample.power_usage_milliwatts, sample.sampled_at.as_ref())
        else {
            return;
        };
        let at = ts_ms(at);
        if let Some((last_at, last_power)) = self.last_power.get(&sample.uuid).copied()
            && at > last_at
            && at - last_at < 600_000
        {
            // Trapezoid over the interval; gaps over 10 minutes are not guessed.
            let watts = (power as f64 + last_power as f64) / 2.0 / 1000.0;
            self.energy_joules += watts * (at - last_at) as f64 / 1000.0;
        }
        self.last_power.insert(sample.uuid.clone(), (at, power));
    }
}

/// Facts about the node a task ran on, for its record.
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    pub zone: String,
    pub spot: bool,
    /// The prices in force over the task's span (see
    /// [`crate::pricing::PriceBook::timeline`]); empty: the task's price
    /// at placement throughout.
    pub price_timeline: Vec<(u64, u64)>,
}

/// The record of a task, ended (`running` false) or live up to `now_ms`.
/// None when the task never started.
pub fn build_record(
    job: &Job,
    task: &TaskStatus,
    node: &NodeFacts,
    acc: Option<&Accumulator>,
    now_ms: u64,
) -> Option<UsageRecord> {
    let started = ts_ms(task.started_at.as_ref()?);
    let running = !gpufleet_core::is_terminal_workload(task.state());
    let ended = if running {
        now_ms
    } else {
        task.finished_at.as_ref().map_or(now_ms, ts_ms)
    }
    .max(started);
    let gpus = task.gpu_uuids.len() as u32;
    // Weighted by the share (milli-GPU-seconds): a GPU shared by two
    // halves is billed 0.5 + 0.5, never twice.
    let milli = crate::placement::task_milli_gpus(task);
    let gpu_ms = (ended - started) * milli / 1000;
    let spec = job.spec.clone().unwrap_or_default();
    let timeline = match node.price_timeline.as_slice() {
        [] => vec![(started, task.price_per_gpu_hour_micro_usd)],
        given => given.to_vec(),
    };
    let price = timeline[0].1;
    let cost_exact = crate::pricing::cost_exact(&timeline, started, ended, milli);
    let mean = |sum: f64, n: u64| (n > 0).then(|| sum / n as f64);
    let (sm, mem, energy, sm_active, tensor_active) = match acc {
        Some(a) => (
            mean(a.util_sum, a.util_n),
            mean(a.mem_sum, a.mem_n),
            // A share's GPU is measured whole: its energy is split by share.
            a.energy_joules().map(|e| {
                if task.gpu_share_milli > 0 && task.mig_profile.is_empty() {
                    e * task.gpu_share_milli as f64 / 1000.0
                } else {
                    e
                }
            }),
            mean(a.sm_active_sum, a.sm_active_n),
            mean(a.tensor_active_sum, a.tensor_active_n),
        ),
        None => (None, None, None, None, None),
    };
    Some(UsageRecord {
        allocation_id: task.allocation_id.clone(),
        job_id: job.id.clone(),
        task_index: task.index,
        tenant: spec.tenant.clone(),
        workload_class: spec.workload_class.clone(),
        job_name: spec.name.clone(),
        provider: task.provider.clone(),
        region: task.region.clone(),
        zone: node.zone.clone(),
        generation: task.generation,
        model: task.model.clone(),
        gpu_count: gpus,
        started_at: Some(ms_ts(started)),
        ended_at: Some(ms_ts(ended)),
        gpu_milliseconds: gpu_ms,
        price_per_gpu_hour_micro_usd: price,
        spot: node.spot,
        cost_micro_usd: micro_usd(cost_exact),
        mean_sm_utilization_percent: sm,
        mean_memory_utilization_percent: mem,
        energy_joules: energy,
        ended_as: if running {
            WorkloadState::Unspecified as i32
        } else {
            task.state
        },
        running,
        price_changes: timeline[1..]
            .iter()
            .filter(|(at, _)| *at > started && *at < ended)
            .map(|&(at, price)| PriceChangePoint {
                at: Some(ms_ts(at)),
                price_per_gpu_hour_micro_usd: price,
            })
            .collect(),
        gpu_share_milli: task.gpu_share_milli,
        mig_profile: task.mig_profile.clone(),
        mean_sm_active_percent: sm_active,
        mean_tensor_active_percent: tensor_active,
        job_submitted_at: job.created_at,
        job_tasks: spec.tasks.max(1),
        job_gpus_per_task: spec.gpus_per_task,
        job_priority: spec.priority,
        job_preemptible: spec.preemptible,
        job_attempt: job.attempt,
        job_constraints: spec.constraints.clone(),
    })
}

/// A record's prices over its span: (from ms, price), first at its start.
pub fn price_timeline(record: &UsageRecord) -> Vec<(u64, u64)> {
    let start = record.started_at.as_ref().map_or(0, ts_ms);
    std::iter::once((start, record.price_per_gpu_hour_micro_usd))
        .chain(record.price_changes.iter().map(|c| {
            (
                c.at.as_ref().map_or(start, ts_ms),
                c.price_per_gpu_hour_micro_usd,
            )
        }))
        .collect()
}

fn contribution(record: &UsageRecord) -> Option<Contribution> {
    let start = ts_ms(record.started_at.as_ref()?);
    let end = ts_ms(record.ended_at.as_ref()?);
    Some(Contribution {
        dims: Dims::of(record),
        start_ms: start,
        end_ms: end,
        gpus: record.gpu_count,
        prices: price_timeline(record),
        share_milli: record.gpu_share_milli,
        mean_util: record.mean_sm_utilization_percent,
        energy_joules: record.energy_joules,
        activity: activity_of(record).0,
        activity_profiled: activity_of(record).1,
    })
}

/// Retention of the ledger and its rollups, seconds.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub records: u64,
    pub minute: u64,
    pub hour: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            records: 400 * rollup::DAY,
            minute: 2 * rollup::DAY,
            hour: 90 * rollup::DAY,
        }
    }
}

/// The ledger of ended allocations. Records live in the store only (by
/// allocation id, indexed by end time), so a record costs memory only as
/// the store's per-key bookkeeping (about 26 B for its two keys, until
/// `usage_retention` deletes it); the rollups that reports read are kept
/// in memory, bounded by their retention, and rebuilt from the records
/// when the controller starts.
#[derive(Debug)]
pub struct Ledger {
    rollups: Rollups,
    retention: Retention,
}

/// Which ledger records to list.
#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    pub since_ms: u64,
    pub until_ms: u64,
    pub tenant: String,
    pub job_id: String,
    pub include_running: bool,
}

impl RecordFilter {
    pub fn matches(&self, record: &UsageRecord) -> bool {
        (self.tenant.is_empty() || record.tenant == self.tenant)
            && (self.job_id.is_empty() || record.job_id == self.job_id)
    }

    fn in_range(&self, record: &UsageRecord) -> bool {
        let end = record.ended_at.as_ref().map_or(0, ts_ms);
        self.since_ms <= end && end < self.until_ms
    }
}

/// A usage query, already validated.
#[derive(Debug, Clone, Default)]
pub struct ReportQuery {
    pub group_by: Vec<UsageDimension>,
    pub since_secs: u64,
    pub until_secs: u64,
    pub series_secs: Option<u64>,
    pub limit: usize,
    /// Only this tenant's usage.
    pub tenant: Option<String>,
    /// Rank rows by used GPU-time (allocated × measured activity).
    pub by_used: bool,
}

/// The id of a record's entry in the end-time index.
fn end_key(allocation_id: &str, end_ms: u64) -> String {
    format!("{}/{allocation_id}", end_bound(end_ms))
}

/// Sorts before every index entry that ended at `ms` or later, and after
/// every one that ended earlier.
fn end_bound(ms: u64) -> String {
    // Fixed width keeps text order equal to time order (until year 2286).
    format!("{:013}", ms.min(9_999_999_999_999))
}

/// Adds a record and its index entry to `batch`.
pub fn put_record(batch: &mut WriteBatch, record: &UsageRecord) {
    let end = record.ended_at.as_ref().map_or(0, ts_ms);
    batch.put(Keyspace::Usage, &record.allocation_id, record);
    batch.put_raw(
        Keyspace::UsageByEnd,
        &end_key(&record.allocation_id, end),
        Vec::new(),
    );
}

/// Whether the allocation already has its record.
pub fn has_record(store: &dyn Store, allocation_id: &str) -> Result<bool, StoreError> {
    Ok(store.get_raw(Keyspace::Usage, allocation_id)?.is_some())
}

/// Writes the end-time index entry of every record that lacks one (stores
/// written before the index existed). Returns how many were written.
pub fn index_records(store: &dyn Store) -> Result<usize, StoreError> {
    let mut writer = store::ChunkedWriter::new(store);
    store::visit::<UsageRecord>(store, Keyspace::Usage, IdRange::default(), |_, record| {
        let end = record.ended_at.as_ref().map_or(0, ts_ms);
        writer.batch().put_raw(
            Keyspace::UsageByEnd,
            &end_key(&record.allocation_id, end),
            Vec::new(),
        );
        writer.record_done()?;
        Ok(true)
    })?;
    writer.finish()
}

impl Ledger {
    pub fn new(retention: Retention) -> Self {
        Self {
            rollups: Rollups::new([retention.minute, retention.hour, retention.records]),
            retention,
        }
    }

    /// Rebuilds the rollups from every stored record, one at a time.
    /// Returns how many records there were.
    pub fn load(&mut self, store: &dyn Store, now_secs: u64) -> Result<usize, StoreError> {
        let mut count = 0;
        store::visit::<UsageRecord>(store, Keyspace::Usage, IdRange::default(), |_, record| {
            self.add(&record, now_secs);
            count += 1;
            Ok(true)
        })?;
        Ok(count)
    }

    /// Adds a record (already in the store, see [`put_record`]) to the
    /// rollups. The caller adds each record once: where the task that it
    /// accounts for ended (`Controller::commit_jobs_retiring`).
    pub fn add(&mut self, record: &UsageRecord, now_secs: u64) {
        if let Some(c) = contribution(record) {
            self.rollups.add(&c, now_secs);
        }
    }

    /// Drops rollup buckets past retention, and adds to `batch` the
    /// deletion of at most `limit` records that ended before the ledger's
    /// retention. Returns how many records it dropped.
    pub fn prune(
        &mut self,
        store: &dyn Store,
        batch: &mut WriteBatch,
        now_secs: u64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        self.rollups.prune(now_secs);
        let cutoff = end_bound(now_secs.saturating_sub(self.retention.records) * 1000);
        let mut dropped = 0;
        store.visit_raw(
            Keyspace::UsageByEnd,
            IdRange::below(&cutoff),
            &mut |key, _| {
                if let Some((_, allocation_id)) = key.split_once('/') {
                    batch.delete(Keyspace::Usage, allocation_id);
                }
                batch.delete(Keyspace::UsageByEnd, key);
                dropped += 1;
                dropped < limit
            },
        )?;
        Ok(dropped)
    }

    /// Records that ended in [since, until) and match `filter`, newest
    /// first: `page_size` of them after skipping `skip`, and whether more
    /// follow. A job's records are found through their allocation ids
    /// (`<job id>.<n>`) without walking the whole ledger.
    pub fn list(
        &self,
        store: &dyn Store,
        filter: &RecordFilter,
        skip: usize,
        page_size: usize,
    ) -> Result<(Vec<UsageRecord>, bool), StoreError> {
        let mut skipped = 0;
        let mut page = Vec::new();
        let mut more = false;
        let mut take = |record: UsageRecord| {
            if !filter.in_range(&record) || !filter.matches(&record) {
                return true;
            }
            if skipped < skip {
                skipped += 1;
                return true;
            }
            if page.len() == page_size {
                more = true;
                return false;
            }
            page.push(record);
            true
        };
        if !filter.job_id.is_empty() {
            let prefix = format!("{}.", filter.job_id);
            let mut records = Vec::new();
            store::visit::<UsageRecord>(
                store,
                Keyspace::Usage,
                IdRange::prefixed(&prefix),
                |id, record| {
                    if !id.starts_with(&prefix) {
                        return Ok(false);
                    }
                    records.push(record);
                    Ok(true)
                },
            )?;
            records.sort_by_key(|r| {
                std::cmp::Reverse((
                    r.ended_at.as_ref().map_or(0, ts_ms),
                    r.allocation_id.clone(),
                ))
            });
            for record in records {
                if !take(record) {
                    break;
                }
            }
            return Ok((page, more));
        }
        let from = end_bound(filter.since_ms);
        let to = end_bound(filter.until_ms);
        let mut failed = None;
        store.visit_raw(
            Keyspace::UsageByEnd,
            IdRange {
                from: &from,
                to: Some(&to),
                reverse: true,
            },
            &mut |key, _| {
                let Some((_, allocation_id)) = key.split_once('/') else {
                    return true;
                };
                match store::get::<UsageRecord>(store, Keyspace::Usage, allocation_id) {
                    Ok(Some(record)) => take(record),
                    // Pruned between the index read and this one.
                    Ok(None) => true,
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                }
            },
        )?;
        match failed {
            Some(e) => Err(e),
            None => Ok((page, more)),
        }
    }

    /// Grouped rows from the rollups plus `live` records (running
    /// allocations up to now), unsorted, and the series' bucket width.
    pub(crate) fn rows(
        &self,
        query: &ReportQuery,
        live: &[UsageRecord],
        now_secs: u64,
    ) -> (Vec<rollup::Row>, u64) {
        let (rows, width) = self.rollups.query(
            &query.group_by,
            query.since_secs,
            query.until_secs,
            query.series_secs,
            query.tenant.as_deref(),
            now_secs,
        );
        let mut merged: HashMap<Dims, rollup::Row> =
            rows.into_iter().map(|r| (r.dims.clone(), r)).collect();
        if !live.is_empty() {
            let mut scratch = Rollups::new([
                self.retention.minute,
                self.retention.hour,
                self.retention.records,
            ]);
            for record in live {
                if let Some(c) = contribution(record) {
                    scratch.add(&c, now_secs);
                }
            }
            let (extra, _) = scratch.query(
                &query.group_by,
                query.since_secs,
                query.until_secs,
                query.series_secs,
                query.tenant.as_deref(),
                now_secs,
            );
            for row in extra {
                let entry = merged
                    .entry(row.dims.clone())
                    .or_insert_with(|| rollup::Row {
                        dims: row.dims.clone(),
                        ..Default::default()
                    });
                add_cell(&mut entry.total, &row.total);
                for (bucket, cell) in row.series {
                    add_cell(entry.series.entry(bucket).or_default(), &cell);
                }
            }
        }
        (merged.into_values().collect(), width)
    }

    /// Grouped totals from the rollups, plus `live` records (running
    /// allocations up to now), rendered as the API's report.
    pub fn report(
        &self,
        query: &ReportQuery,
        live: &[UsageRecord],
        now_secs: u64,
    ) -> UsageReportResponse {
        let (mut rows, width) = self.rows(query, live, now_secs);
        rows.sort_by(|a, b| {
            let key = |c: &Cell| {
                if query.by_used {
                    c.active_gpu_ms as u64
                } else {
                    c.gpu_ms
                }
            };
            key(&b.total)
                .cmp(&key(&a.total))
                .then_with(|| b.total.gpu_ms.cmp(&a.total.gpu_ms))
                .then_with(|| format!("{:?}", a.dims).cmp(&format!("{:?}", b.dims)))
        });
        let mut total = Cell::default();
        for row in &rows {
            add_cell(&mut total, &row.total);
        }
        if query.limit > 0 {
            rows.truncate(query.limit);
        }
        let render = |dims: &Dims, cell: &Cell, series: &BTreeMap<u64, Cell>| UsageRow {
            provider: dims.provider.clone(),
            region: dims.region.clone(),
            generation: dims.generation,
            model: dims.model.clone(),
            tenant: dims.tenant.clone(),
            workload_class: dims.workload_class.clone(),
            job_name: dims.job_name.clone(),
            gpu_milliseconds: cell.gpu_ms,
            cost_micro_usd: micro_usd(cell.cost_exact),
            allocations: cell.allocations as u64,
            share: if total.gpu_ms == 0 {
                0.0
            } else {
                cell.gpu_ms as f64 / total.gpu_ms as f64
            },
            mean_sm_utilization_percent: (cell.util_weight > 0.0)
                .then(|| cell.util_weighted / cell.util_weight),
            energy_joules: (cell.energy_joules > 0.0).then_some(cell.energy_joules),
            used_gpu_milliseconds: cell.active_gpu_ms.round() as u64,
            series: series
                .iter()
                .map(|(bucket, c)| UsagePoint {
                    bucket: Some(Timestamp {
                        seconds: *bucket as i64,
                        nanos: 0,
                    }),
                    gpu_milliseconds: c.gpu_ms,
                    cost_micro_usd: micro_usd(c.cost_exact),
                })
                .collect(),
        };
        let from = (query.since_secs / width) * width;
        let to = query.until_secs.div_ceil(width) * width;
        UsageReportResponse {
            rows: rows
                .iter()
                .map(|r| render(&r.dims, &r.total, &r.series))
                .collect(),
            total: Some(render(&Dims::default(), &total, &BTreeMap::new())),
            since: Some(Timestamp {
                seconds: from as i64,
                nanos: 0,
            }),
            until: Some(Timestamp {
                seconds: to as i64,
                nanos: 0,
            }),
        }
    }
}

fn add_cell(into: &mut Cell, other: &Cell) {
    into.add(other);
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::{JobSpec, JobState};

    fn job(tenant: &str, class: &str) -> Job {
        Job {
            id: "job-000000000001".into(),
            spec: Some(JobSpec {
                tenant: tenant.into(),
                workload_class: class.into(),
                name: "train".into(),
                ..Default::default()
            }),
            state: JobState::Succeeded as i32,
            ..Default::default()
        }
    }

    fn task(start: u64, end: u64, gpus: u32, price: u64) -> TaskStatus {
        TaskStatus {
            allocation_id: format!("job-000000000001.{start}"),
            node_id: "n".into(),
            gpu_uuids: (0..gpus).map(|g| format!("GPU-{g}")).collect(),
            state: WorkloadState::Succeeded as i32,
            started_at: Some(ms_ts(start * 1000)),
            finished_at: Some(ms_ts(end * 1000)),
            provider: "aws".into(),
            region: "us-east-1".into(),
            price_per_gpu_hour_micro_usd: price,
            generation: 6,
            model: "H100-SXM-80GB".into(),
            ..Default::default()
        }
    }

    #[test]
    fn profiling_fields_reach_the_record_as_percentages() {
        let mut acc = Accumulator::default();
        for (sm, tensor) in [(0.40, Some(0.10)), (0.60, Some(0.30))] {
            acc.add(&GpuSample {
                uuid: "GPU-0".into(),
                gpu_utilization_percent: Some(100),
                gpm: Some(gpufleet_proto::v1::GpmMetrics {
                    sm_active: Some(sm),
                    tensor_active: tensor,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        // A GPU without GPM: its fields stay absent, not zero.
        acc.add(&GpuSample {
            uuid: "GPU-0".into(),
            gpu_utilization_percent: Some(100),
            ..Default::default()
        });
        let record = build_record(
            &job("a", ""),
            &task(0, 60, 1, 1_000_000),
            &NodeFacts::default(),
            Some(&acc),
            60_000,
        )
        .unwrap();
        assert!((record.mean_sm_active_percent.unwrap() - 50.0).abs() < 1e-9);
        assert!((record.mean_tensor_active_percent.unwrap() - 20.0).abs() < 1e-9);
        assert_eq!(record.mean_sm_utilization_percent, Some(100.0));
        assert_eq!(activity_of(&record), (record.mean_sm_active_percent, true));
    }

    #[test]
    fn exact_totals_on_virtual_time() {
        let now = 10 * rollup::DAY;
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SledStore::open(dir.path()).unwrap();
        let mut ledger = Ledger::new(Retention::default());
        let day = 9 * rollup::DAY;
        // 2 GPUs × 1 h at $3.93, 8 GPUs × 30 min at $2.99, 1 GPU × 17 s at $0.75.
        for (t, tenant) in [
            (task(day, day + 3600, 2, 3_930_000), "a"),
            (task(day + 10, day + 10 + 1800, 8, 2_990_000), "b"),
            (task(day + 20, day + 37, 1, 750_000), "a"),
        ] {
            let r = build_record(
                &job(tenant, "training"),
                &t,
                &NodeFacts::default(),
                None,
                now * 1000,
            )
            .unwrap();
            let mut batch = WriteBatch::default();
            put_record(&mut batch, &r);
            store.apply(batch).unwrap();
            ledger.add(&r, now);
        }
        // The rollups rebuilt from the store match the ones built live.
        let mut reloaded = Ledger::new(Retention::default());
        assert_eq!(reloaded.load(&store, now).unwrap(), 3);
        let query = ReportQuery {
            group_by: vec![UsageDimension::Tenant],
            since_secs: day,
            until_secs: now,
            ..Default::default()
        };
        let report = ledger.report(&query, &[], now);
        assert_eq!(report, reloaded.report(&query, &[], now));
        let total = report.total.unwrap();
        assert_eq!(total.gpu_milliseconds, (7200 + 14_400 + 17) * 1000);
        // $7.86 + $11.96 + $0.00354166… = $19.82354 (micro-USD, rounded once).
        assert_eq!(total.cost_micro_usd, 19_823_542);
        let a = report.rows.iter().find(|r| r.tenant == "a").unwrap();
        assert_eq!(a.gpu_milliseconds, 7_217_000);
        assert_eq!(a.allocations, 2);
    }

    #[test]
    fn prune_drops_expired_records_in_batches_and_list_pages_by_end_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::SledStore::open(dir.path()).unwrap();
        let retention = Retention::default();
        let mut ledger = Ledger::new(retention);
        let now = 500 * rollup::DAY;
        let old = now - retention.records - rollup::DAY;
        let recent = now - rollup::DAY;
        let mut batch = WriteBatch::default();
        for (i, start) in [old, old + 1, old + 2, recent, recent + 1]
            .into_iter()
            .enumerate()
        {
            let mut t = task(start, start + 10, 1, 1_000_000);
            t.allocation_id = format!("job-000000000001.{i}");
            let r =
                build_record(&job("a", ""), &t, &NodeFacts::default(), None, now * 1000).unwrap();
            put_record(&mut batch, &r);
        }
        store.apply(batch).unwrap();
        let all = RecordFilter {
            until_ms: now * 1000,
            ..Default::default()
        };
        let (page, more) = ledger.list(&store, &all, 0, 10).unwrap();
        assert!(!more);
        let ids: Vec<&str> = page.iter().map(|r| r.allocation_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "job-000000000001.4",
                "job-000000000001.3",
                "job-000000000001.2",
                "job-000000000001.1",
                "job-000000000001.0"
            ],
            "newest first"
        );
        let (page, more) = ledger.list(&store, &all, 1, 2).unwrap();
        assert!(more);
        assert_eq!(page[0].allocation_id, "job-000000000001.3");
        // At most two per call: the third expired record waits for the next.
        let mut batch = WriteBatch::default();
        assert_eq!(ledger.prune(&store, &mut batch, now, 2).unwrap(), 2);
        store.apply(batch).unwrap();
        let mut batch = WriteBatch::default();
        assert_eq!(ledger.prune(&store, &mut batch, now, 2).unwrap(), 1);
        store.apply(batch).unwrap();
        let mut batch = WriteBatch::default();
        assert_eq!(ledger.prune(&store, &mut batch, now, 2).unwrap(), 0);
        let (page, _) = ledger.list(&store, &all, 0, 10).unwrap();
        assert_eq!(page.len(), 2, "the recent records stay");
        assert!(!has_record(&store, "job-000000000001.0").unwrap());
        assert!(has_record(&store, "job-000000000001.3").unwrap());
        // A job's records are found through their allocation ids.
        let by_job = RecordFilter {
            job_id: "job-000000000001".into(),
            ..all
        };
        assert_eq!(ledger.list(&store, &by_job, 0, 10).unwrap().0.len(), 2);
    }

    #[test]
    fn energy_prefers_counters_and_falls_back_to_power() {
        let sample = |uuid: &str, at_ms: u64, mw: u32, counter: Option<u64>| GpuSample {
            uuid: uuid.into(),
            sampled_at: Some(ms_ts(at_ms)),
            power_usage_milliwatts: Some(mw),
            total_energy_millijoules: counter,
            ..Default::default()
        };
        let mut acc = Accumulator::default();
        acc.add(&sample("g", 0, 100_000, None));
        acc.add(&sample("g", 10_000, 300_000, None));
        // Trapezoid: mean 200 W over 10 s.
        assert!((acc.energy_joules().unwrap() - 2000.0).abs() < 1e-9);
        let mut acc = Accumulator::default();
        acc.add(&sample("g", 0, 100_000, Some(5_000_000)));
        acc.add(&sample("g", 10_000, 300_000, Some(7_500_000)));
        assert_eq!(acc.energy_joules(), Some(2500.0), "the counter wins");
    }

    #[test]
    fn live_records_count_up_to_now() {
        let now = 1000;
        let ledger = Ledger::new(Retention::default());
        let mut t = task(400, 0, 4, 1_000_000);
        t.state = WorkloadState::Running as i32;
        t.finished_at = None;
        let live =
            build_record(&job("a", ""), &t, &NodeFacts::default(), None, now * 1000).unwrap();
        assert!(live.running);
        let report = ledger.report(
            &ReportQuery {
                since_secs: 0,
                until_secs: now,
                ..Default::default()
            },
            &[live],
            now,
        );
        assert_eq!(report.total.unwrap().gpu_milliseconds, 4 * 600 * 1000);
    }
}
