//! Allocated versus used: which jobs, tenants and workload classes pay for
//! GPU-time their GPUs spend idle. Idle GPU-time is the measured part of an
//! allocation's GPU-time (weighted by share) times one minus the mean
//! activity of exactly its GPUs or MIG instance: SM activity from the
//! profiling (GPM) fields when the telemetry has them, else NVML's coarse
//! utilisation (which says busy while any kernel runs, so it understates
//! waste). GPU-time without any measurement is allocated but not judged.

use gpufleet_proto::v1::{UsageDimension, UsageRecord, UsageWasteResponse, WasteRow};
use prost_types::Timestamp;

use super::rollup::{Cell, Row, micro_usd};
use super::{Dims, Ledger, ReportQuery};

/// A waste query, already validated.
#[derive(Debug, Clone)]
pub struct WasteQuery {
    /// `JobName`, `Tenant` or `WorkloadClass`.
    pub by: UsageDimension,
    pub since_secs: u64,
    pub until_secs: u64,
    pub limit: usize,
    pub tenant: Option<String>,
}

fn key_of(dims: &Dims, by: UsageDimension) -> String {
    match by {
        UsageDimension::Tenant => dims.tenant.clone(),
        UsageDimension::WorkloadClass => dims.workload_class.clone(),
        _ => dims.job_name.clone(),
    }
}

fn row(key: String, cell: &Cell) -> WasteRow {
    let idle_ms = (cell.measured_gpu_ms - cell.active_gpu_ms).max(0.0);
    let idle_cost = cell.idle_cost.max(0.0);
    WasteRow {
        key,
        allocated_gpu_milliseconds: cell.gpu_ms,
        measured_gpu_milliseconds: cell.measured_gpu_ms.round() as u64,
        idle_gpu_milliseconds: idle_ms.round() as u64,
        idle_cost_micro_usd: micro_usd(idle_cost.round() as u128),
        cost_micro_usd: micro_usd(cell.cost_exact),
        mean_activity_percent: (cell.measured_gpu_ms > 0.0)
            .then(|| 100.0 * cell.active_gpu_ms / cell.measured_gpu_ms),
        activity_source: if cell.measured_gpu_ms == 0.0 {
            String::new()
        } else if cell.profiled_gpu_ms >= cell.measured_gpu_ms {
            "sm_active".to_string()
        } else {
            "gpu_utilization".to_string()
        },
        allocations: cell.allocations as u64,
    }
}

impl Ledger {
    /// Rows ranked by idle GPU-time (then idle cost, then key), with the
    /// total over every row.
    pub fn waste(
        &self,
        query: &WasteQuery,
        live: &[UsageRecord],
        now_secs: u64,
    ) -> UsageWasteResponse {
        let report = ReportQuery {
            group_by: vec![query.by],
            since_secs: query.since_secs,
            until_secs: query.until_secs,
            tenant: query.tenant.clone(),
            ..Default::default()
        };
        let (rows, width): (Vec<Row>, u64) = self.rows(&report, live, now_secs);
        let mut total = Cell::default();
        let mut out: Vec<WasteRow> = rows
            .iter()
            .map(|r| {
                total.add(&r.total);
                row(key_of(&r.dims, query.by), &r.total)
            })
            .collect();
        out.sort_by(|a, b| {
            b.idle_gpu_milliseconds
                .cmp(&a.idle_gpu_milliseconds)
                .then(b.idle_cost_micro_usd.cmp(&a.idle_cost_micro_usd))
                .then_with(|| a.key.cmp(&b.key))
        });
        if query.limit > 0 {
            out.truncate(query.limit);
        }
        let width = width.max(1);
        UsageWasteResponse {
            rows: out,
            total: Some(row(String::new(), &total)),
            since: Some(Timestamp {
                seconds: ((query.since_secs / width) * width) as i64,
                nanos: 0,
            }),
            until: Some(Timestamp {
                seconds: (query.until_secs.div_ceil(width) * width) as i64,
                nanos: 0,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::{Retention, ms_ts, rollup::DAY};

    fn record(
        id: &str,
        name: &str,
        tenant: &str,
        gpus: u32,
        share: u32,
        util: Option<f64>,
        sm_active: Option<f64>,
    ) -> UsageRecord {
        UsageRecord {
            allocation_id: id.into(),
            job_name: name.into(),
            tenant: tenant.into(),
            workload_class: "inference".into(),
            gpu_count: gpus,
            gpu_share_milli: share,
            started_at: Some(ms_ts(DAY * 1000)),
            ended_at: Some(ms_ts((DAY + 3600) * 1000)),
            price_per_gpu_hour_micro_usd: 2_000_000,
            mean_sm_utilization_percent: util,
            mean_sm_active_percent: sm_active,
            ..Default::default()
        }
    }

    #[test]
    fn ranks_by_paid_but_idle_gpu_time_and_prefers_profiling() {
        let mut ledger = Ledger::new(Retention::default());
        let now = 2 * DAY;
        // "busy": 8 GPUs for an hour at 95 % utilisation, but SM activity
        // (profiling) says 25 %: 6 idle GPU-hours. "half": a 500 ‰ share,
        // 10 % utilisation, no profiling: 0.45 idle GPU-hours. "dark": no
        // measurement at all: allocated, not judged.
        for r in [
            record("a.0", "busy", "t1", 8, 0, Some(95.0), Some(25.0)),
            record("b.0", "half", "t2", 1, 500, Some(10.0), None),
            record("c.0", "dark", "t2", 1, 0, None, None),
        ] {
            ledger.add(&r, now);
        }
        let query = WasteQuery {
            by: UsageDimension::JobName,
            since_secs: 0,
            until_secs: now,
            limit: 10,
            tenant: None,
        };
        let w = ledger.waste(&query, &[], now);
        let keys: Vec<&str> = w.rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["busy", "half", "dark"]);
        let busy = &w.rows[0];
        assert_eq!(busy.allocated_gpu_milliseconds, 8 * 3_600_000);
        assert_eq!(busy.idle_gpu_milliseconds, 6 * 3_600_000);
        assert_eq!(
            busy.idle_cost_micro_usd, 12_000_000,
            "6 idle GPU-hours at $2"
        );
        assert_eq!(busy.activity_source, "sm_active");
        let half = &w.rows[1];
        assert_eq!(
            half.allocated_gpu_milliseconds, 1_800_000,
            "billed as half a GPU"
        );
        assert_eq!(half.idle_gpu_milliseconds, 1_620_000);
        assert_eq!(half.activity_source, "gpu_utilization");
        assert_eq!(w.rows[2].measured_gpu_milliseconds, 0);
        assert_eq!(w.rows[2].mean_activity_percent, None);
        // By tenant, one tenant only.
        let w = ledger.waste(
            &WasteQuery {
                by: UsageDimension::Tenant,
                tenant: Some("t2".into()),
                ..query
            },
            &[],
            now,
        );
        assert_eq!(w.rows.len(), 1);
        assert_eq!(w.rows[0].key, "t2");
        assert_eq!(w.total.unwrap().idle_gpu_milliseconds, 1_620_000);
    }
}
