//! History queries: a requested range and step checked and rounded into
//! whole minutes, and per-minute rollups folded into the steps of each
//! GPU's series.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use gpufleet_proto::v1::{GetHistoryResponse, HistoryPoint, HistorySeries};
use prost_types::Timestamp;

use super::catalogue::Metric;
use super::rollup::{Acc, Rollup};
use super::time::{minute_to_ts, system_nanos, ts_nanos};
use crate::error::{ControllerError, Result};

/// Most points one history series may have.
pub const MAX_HISTORY_POINTS: u64 = 10_000;
/// Points a series gets when the caller leaves the step to the controller.
pub const AUTO_HISTORY_POINTS: u64 = 500;

/// A validated history query, in whole minutes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPlan {
    pub start_minute: u64,
    pub end_minute: u64,
    pub step_minutes: u64,
}

/// Checks a history range and step and rounds them to whole minutes
/// (start down, end up). `step_seconds == 0` picks one.
pub fn plan_history(
    start: Option<&Timestamp>,
    end: Option<&Timestamp>,
    step_seconds: u32,
    now: SystemTime,
) -> Result<HistoryPlan> {
    let start = ts_nanos(start).ok_or_else(|| {
        ControllerError::invalid("start", "is required and must be a valid time after 1970")
    })?;
    let end = match end {
        None => system_nanos(now),
        Some(ts) => ts_nanos(Some(ts))
            .ok_or_else(|| ControllerError::invalid("end", "must be a valid time after 1970"))?,
    };
    if end <= start {
        return Err(ControllerError::invalid(
            "end",
            "must be after start (the range is [start, end))",
        ));
    }
    const MINUTE: i128 = 60_000_000_000;
    let start_minute = (start / MINUTE) as u64;
    let end_minute = ((end + MINUTE - 1) / MINUTE) as u64;
    let span = end_minute - start_minute;
    let step_minutes = if step_seconds == 0 {
        span.div_ceil(AUTO_HISTORY_POINTS).max(1)
    } else {
        if step_seconds < 60 || !step_seconds.is_multiple_of(60) {
            return Err(ControllerError::invalid(
                "step",
                format!(
                    "is {step_seconds}s; rollups are per minute, so the step must be a whole number of minutes (at least 60s)"
                ),
            ));
        }
        u64::from(step_seconds / 60)
    };
    let points = span.div_ceil(step_minutes);
    if points > MAX_HISTORY_POINTS {
        let least = span.div_ceil(MAX_HISTORY_POINTS);
        return Err(ControllerError::invalid(
            "step",
            format!(
                "a {}m step over {} gives {points} points; at most {MAX_HISTORY_POINTS} are returned: use a step of at least {least}m or a shorter range",
                step_minutes,
                humantime::format_duration(Duration::from_secs(span * 60)),
            ),
        ));
    }
    Ok(HistoryPlan {
        start_minute,
        end_minute,
        step_minutes,
    })
}

/// Folds per-minute rollups into steps; steps without samples are left out.
pub fn bucket(
    minutes: &BTreeMap<u64, Rollup>,
    metric: &Metric,
    plan: &HistoryPlan,
) -> Vec<HistoryPoint> {
    let mut steps: BTreeMap<u64, Acc> = BTreeMap::new();
    for (minute, rollup) in minutes.range(plan.start_minute..plan.end_minute) {
        let acc = rollup.get(metric);
        if acc.count == 0 {
            continue;
        }
        let step = plan.start_minute
            + (minute - plan.start_minute) / plan.step_minutes * plan.step_minutes;
        steps.entry(step).or_default().merge(&acc);
    }
    steps
        .into_iter()
        .filter_map(|(step, acc)| {
            Some(HistoryPoint {
                time: Some(minute_to_ts(step)),
                mean: acc.mean()?,
                max: acc.max,
                samples: u64::from(acc.count),
            })
        })
        .collect()
}

/// History of one metric for the given GPUs (node id, uuid), in the order
/// given. `read_node(node, uuids, start, end)` returns the per-minute
/// rollups of several GPUs of one node, one map per uuid in that order.
pub(crate) fn read_history(
    gpus: &[(String, String)],
    metric: &'static Metric,
    plan: &HistoryPlan,
    mut read_node: impl FnMut(&str, &[&str], u64, u64) -> Result<Vec<BTreeMap<u64, Rollup>>>,
) -> Result<GetHistoryResponse> {
    // A node's GPUs share its records: read them once per node.
    let mut by_node: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut slot_of: HashMap<&str, usize> = HashMap::new();
    for (i, (node_id, _)) in gpus.iter().enumerate() {
        let slot = *slot_of.entry(node_id).or_insert_with(|| {
            by_node.push((node_id, Vec::new()));
            by_node.len() - 1
        });
        by_node[slot].1.push(i);
    }
    let mut points: Vec<Vec<HistoryPoint>> = vec![Vec::new(); gpus.len()];
    for (node_id, members) in by_node {
        let uuids: Vec<&str> = members.iter().map(|&i| gpus[i].1.as_str()).collect();
        let minutes = read_node(node_id, &uuids, plan.start_minute, plan.end_minute)?;
        for (&i, minutes) in members.iter().zip(minutes) {
            points[i] = bucket(&minutes, metric, plan);
        }
    }
    let series = gpus
        .iter()
        .zip(points)
        .map(|((node_id, uuid), points)| HistorySeries {
            gpu_uuid: uuid.clone(),
            node_id: node_id.clone(),
            points,
        })
        .collect();
    Ok(GetHistoryResponse {
        metric: metric.name.to_string(),
        unit: metric.unit.to_string(),
        step_seconds: plan.step_minutes as u32 * 60,
        start: Some(minute_to_ts(plan.start_minute)),
        end: Some(minute_to_ts(plan.end_minute)),
        series,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::test_support::{hub, sample, t0, util};
    use crate::telemetry::time::minute_of;

    /// The plan of a query over `[start, end)` asked at `end`.
    fn plan_between(start: SystemTime, end: SystemTime, step_seconds: u32) -> HistoryPlan {
        plan_history(
            Some(&Timestamp::from(start)),
            Some(&Timestamp::from(end)),
            step_seconds,
            end,
        )
        .unwrap()
    }

    #[test]
    fn history_merges_store_queue_and_current_minute() {
        let (_, hub) = hub();
        let start = t0();
        for i in 0..30u64 {
            let at = start + Duration::from_secs(i * 10);
            // Minute k has utilisation 10 * (k + 1).
            let util = 10 * (i / 6 + 1) as u32;
            hub.ingest("n1", vec![sample("GPU-a", at, util, 1000)], at);
            if i == 13 {
                hub.flush(at).unwrap();
            }
        }
        let plan = plan_between(start, start + Duration::from_secs(295), 120);
        assert_eq!(plan.step_minutes, 2);
        let response = hub
            .history(&[("n1".into(), "GPU-a".into())], util(), &plan)
            .unwrap();
        assert_eq!(response.step_seconds, 120);
        let points = &response.series[0].points;
        // Minutes 0+1, 2+3, 4 (current, unfinished).
        let got: Vec<(f64, f64, u64)> = points.iter().map(|p| (p.mean, p.max, p.samples)).collect();
        assert_eq!(
            got,
            vec![(15.0, 20.0, 12), (35.0, 40.0, 12), (50.0, 50.0, 6)]
        );
        assert_eq!(points[1].time, Some(minute_to_ts(minute_of(start) + 2)));
        // A GPU without samples has an empty series, not an error.
        let response = hub
            .history(&[("n1".into(), "GPU-b".into())], util(), &plan)
            .unwrap();
        assert!(response.series[0].points.is_empty());
    }

    #[test]
    fn history_ranges_and_steps_are_checked_and_capped() {
        let now = t0();
        let ts = |secs_ago: u64| Timestamp::from(now - Duration::from_secs(secs_ago));
        let err = |r: Result<HistoryPlan>| r.unwrap_err().to_string();
        assert!(err(plan_history(None, None, 60, now)).starts_with("start"));
        assert!(err(plan_history(Some(&ts(0)), Some(&ts(60)), 60, now)).starts_with("end"));
        let tiny = err(plan_history(Some(&ts(3600)), None, 10, now));
        assert!(tiny.contains("at least 60s"), "{tiny}");
        assert!(err(plan_history(Some(&ts(3600)), None, 90, now)).contains("whole number"));
        // 7 days at 1 minute = 10,080 points: over the cap, and the error
        // names the cap and the smallest step that fits.
        let huge = err(plan_history(Some(&ts(7 * 86_400)), None, 60, now));
        assert!(huge.starts_with("step"), "{huge}");
        assert!(
            huge.contains("10080 points") && huge.contains("10000"),
            "{huge}"
        );
        assert!(huge.contains("at least 2m"), "{huge}");
        assert!(plan_history(Some(&ts(7 * 86_400)), None, 120, now).is_ok());
        // Exactly at the cap is fine.
        assert!(plan_history(Some(&ts(10_000 * 60)), None, 60, now).is_ok());
        // Automatic step: at most AUTO_HISTORY_POINTS points, whole minutes.
        let auto = plan_history(Some(&ts(7 * 86_400)), None, 0, now).unwrap();
        assert_eq!(auto.step_minutes, 21);
        let auto = plan_history(Some(&ts(3600)), None, 0, now).unwrap();
        assert_eq!(auto.step_minutes, 1);
        assert_eq!(auto.end_minute - auto.start_minute, 60);
    }

    #[test]
    fn history_of_several_nodes_gpus_keeps_the_order_asked_for() {
        let (_, hub) = hub();
        hub.register_node("n2", &["GPU-z".into()]);
        let start = t0();
        for i in 0..3u64 {
            let at = start + Duration::from_secs(i * 60);
            let util = 10 * (i as u32 + 1);
            hub.ingest(
                "n1",
                vec![
                    sample("GPU-a", at, util, 1),
                    sample("GPU-b", at, util + 1, 1),
                ],
                at,
            );
            hub.ingest("n2", vec![sample("GPU-z", at, util + 2, 1)], at);
            if i == 1 {
                // Minute 0 stored, minute 1 queued, minute 2 current.
                hub.flush(at).unwrap();
            }
        }
        let plan = plan_between(start, start + Duration::from_secs(150), 60);
        let gpus = [
            ("n1", "GPU-b"),
            ("n2", "GPU-z"),
            ("n1", "GPU-a"),
            ("n1", "GPU-gone"),
        ]
        .map(|(n, u)| (n.to_string(), u.to_string()));
        let response = hub.history(&gpus, util(), &plan).unwrap();
        let got: Vec<(String, Vec<f64>)> = response
            .series
            .iter()
            .map(|s| {
                (
                    s.gpu_uuid.clone(),
                    s.points.iter().map(|p| p.mean).collect(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("GPU-b".to_string(), vec![11.0, 21.0, 31.0]),
                ("GPU-z".to_string(), vec![12.0, 22.0, 32.0]),
                ("GPU-a".to_string(), vec![10.0, 20.0, 30.0]),
                ("GPU-gone".to_string(), vec![]),
            ]
        );
    }
}
