//! GPU health judgement: pure, no I/O. The sampler feeds it every sample and
//! every XID; it marks each GPU Healthy, Degraded or Unhealthy with
//! machine-readable reasons.
//!
//! Every fault is a *condition* with a last-seen time. A condition is active
//! until one clean period (`health_clean_period`) has passed without seeing
//! it again, so a GPU always returns to service once the fault stops — it
//! never stays out forever by accident. Conditions that persist in the
//! hardware (a pending row remap, NVML failing) are re-seen on every sample
//! while they last.
//!
//! XID table (NVIDIA's XID catalogue; configurable with `critical_xids` and
//! `application_xids`):
//!
//! | XID | Meaning | Effect |
//! |-----|---------|--------|
//! | 48 | double-bit ECC error | Unhealthy |
//! | 63 | ECC page retirement / row remap recording event | Unhealthy |
//! | 64 | ECC page retirement / row remap recording failure | Unhealthy |
//! | 74 | NVLink error | Unhealthy |
//! | 79 | GPU has fallen off the bus | Unhealthy |
//! | 92 | high single-bit ECC error rate | Unhealthy |
//! | 94 | contained ECC error | Unhealthy |
//! | 95 | uncontained ECC error | Unhealthy |
//! | 119 | GSP RPC timeout | Unhealthy |
//! | 120 | GSP error | Unhealthy |
//! | 13 | graphics engine exception (application fault) | job only |
//! | 31 | GPU memory page fault (application fault) | job only |
//! | 43 | GPU stopped processing (application fault) | job only |
//! | 45 | preemptive cleanup after an application fault | job only |
//! | 68 | video processor exception (application fault) | job only |
//!
//! Other XIDs are recorded and counted but do not change health.
//! Application XIDs never mark the GPU; they are attributed to the
//! allocation running on it in `recent_xids`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use gpufleet_proto::v1::{GpuHealth, GpuSample, HealthReason, XidEvent};

pub const DEFAULT_CRITICAL_XIDS: [u32; 10] = [48, 63, 64, 74, 79, 92, 94, 95, 119, 120];
pub const DEFAULT_APPLICATION_XIDS: [u32; 5] = [13, 31, 43, 45, 68];
pub const DEFAULT_CLEAN_PERIOD: Duration = Duration::from_secs(600);
pub const DEFAULT_SLOWDOWN_DEGRADED_AFTER: Duration = Duration::from_secs(60);
/// Correctable (single-bit) ECC errors per minute that count as a storm.
pub const DEFAULT_SBE_STORM_PER_MINUTE: u64 = 100;
/// How many XIDs each GPU keeps in `recent_xids`.
const RECENT_XIDS: usize = 32;
const STORM_WINDOW: Duration = Duration::from_secs(60);

/// Throttle reasons that mean the hardware is protecting itself.
const SLOWDOWN_REASONS: [&str; 4] = [
    "hw_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
    "sw_thermal_slowdown",
];

/// What the operator configured.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthPolicy {
    pub clean_period: Duration,
    pub critical_xids: BTreeSet<u32>,
    pub application_xids: BTreeSet<u32>,
    /// GPUs this host must have; fewer visible marks every GPU Unhealthy.
    pub expected_gpu_count: Option<u32>,
    /// HW/thermal slowdown lasting this long marks the GPU Degraded.
    pub slowdown_degraded_after: Duration,
    pub sbe_storm_per_minute: u64,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            clean_period: DEFAULT_CLEAN_PERIOD,
            critical_xids: DEFAULT_CRITICAL_XIDS.into_iter().collect(),
            application_xids: DEFAULT_APPLICATION_XIDS.into_iter().collect(),
            expected_gpu_count: None,
            slowdown_degraded_after: DEFAULT_SLOWDOWN_DEGRADED_AFTER,
            sbe_storm_per_minute: DEFAULT_SBE_STORM_PER_MINUTE,
        }
    }
}

/// An XID as a source reported it, before attribution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawXid {
    pub gpu_uuid: String,
    pub xid: u32,
    pub at: SystemTime,
    /// `nvml`, `kmsg` or `simulated`.
    pub source: &'static str,
}

/// Which allocation runs on a GPU: (allocation id, job id).
pub type Owner = (String, String);

#[derive(Debug, Clone)]
struct Condition {
    severity: GpuHealth,
    message: String,
    xid: Option<u32>,
    last_seen: SystemTime,
}

#[derive(Debug, Default)]
struct GpuState {
    /// Keyed by (code, xid) so each critical XID is its own condition.
    conditions: BTreeMap<(&'static str, u32), Condition>,
    last_sbe_volatile: Option<u64>,
    last_dbe_volatile: Option<u64>,
    /// (time, volatile SBE count) over the storm window.
    sbe_history: VecDeque<(SystemTime, u64)>,
    slowdown_since: Option<SystemTime>,
    recent_xids: VecDeque<XidEvent>,
    xid_count: u64,
}

/// Health of every GPU of one host, across samples.
#[derive(Debug)]
pub struct HealthTracker {
    policy: HealthPolicy,
    gpus: HashMap<String, GpuState>,
}

fn xid_description(xid: u32) -> &'static str {
    match xid {
        13 => "graphics engine exception",
        31 => "GPU memory page fault",
        43 => "GPU stopped processing",
        45 => "preemptive cleanup",
        48 => "double-bit ECC error",
        63 => "ECC page retirement or row remapping event",
        64 => "ECC page retirement or row remapping failure",
        68 => "video processor exception",
        74 => "NVLink error",
        79 => "GPU has fallen off the bus",
        92 => "high single-bit ECC error rate",
        94 => "contained ECC error",
        95 => "uncontained ECC error",
        119 => "GSP RPC timeout",
        120 => "GSP error",
        _ => "see NVIDIA's XID catalogue",
    }
}

fn since(now: SystemTime, then: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or(Duration::ZERO)
}

impl GpuState {
    fn see(
        &mut self,
        code: &'static str,
        xid: Option<u32>,
        severity: GpuHealth,
        message: String,
        at: SystemTime,
    ) {
        let key = (code, xid.unwrap_or(0));
        let entry = self.conditions.entry(key).or_insert(Condition {
            severity,
            message: message.clone(),
            xid,
            last_seen: at,
        });
        if at >= entry.last_seen {
            entry.last_seen = at;
            entry.message = message;
        }
    }
}

impl HealthTracker {
    pub fn new(policy: HealthPolicy) -> Self {
        Self {
            policy,
            gpus: HashMap::new(),
        }
    }

    pub fn policy(&self) -> &HealthPolicy {
        &self.policy
    }

    /// Folds one round of samples and the XIDs that arrived since the last
    /// round into the state, then writes `health`, `health_reasons`,
    /// `recent_xids` and `xid_count` into each sample. `visible_gpus` is how
    /// many GPUs the driver sees now; `owner` names the allocation on a GPU.
    pub fn observe(
        &mut self,
        now: SystemTime,
        samples: &mut [GpuSample],
        xids: Vec<RawXid>,
        visible_gpus: Option<u32>,
        owner: &dyn Fn(&str) -> Option<Owner>,
    ) {
        let policy = &self.policy;
        for raw in xids {
            let state = self.gpus.entry(raw.gpu_uuid.clone()).or_default();
            state.xid_count += 1;
            let (allocation_id, job_id) = owner(&raw.gpu_uuid).unwrap_or_default();
            state.recent_xids.push_back(XidEvent {
                xid: raw.xid,
                at: Some(prost_types::Timestamp::from(raw.at)),
                source: raw.source.to_string(),
                allocation_id,
                job_id,
            });
            while state.recent_xids.len() > RECENT_XIDS {
                state.recent_xids.pop_front();
            }
            if policy.critical_xids.contains(&raw.xid)
                && !policy.application_xids.contains(&raw.xid)
            {
                state.see(
                    "xid_critical",
                    Some(raw.xid),
                    GpuHealth::Unhealthy,
                    format!("XID {}: {}", raw.xid, xid_description(raw.xid)),
                    raw.at,
                );
            }
        }

        let missing = match (policy.expected_gpu_count, visible_gpus) {
            (Some(expected), Some(visible)) if visible < expected => Some((expected, visible)),
            _ => None,
        };

        for sample in samples.iter_mut() {
            let state = self.gpus.entry(sample.uuid.clone()).or_default();
            let unhealthy = GpuHealth::Unhealthy;
            if let Some((expected, visible)) = missing {
                state.see(
                    "gpu_count_below_expected",
                    None,
                    unhealthy,
                    format!("the driver sees {visible} GPUs, the host should have {expected}"),
                    now,
                );
            }
            if !sample.sample_error.is_empty() {
                state.see(
                    "nvml_error",
                    None,
                    unhealthy,
                    format!("NVML cannot reach the GPU: {}", sample.sample_error),
                    now,
                );
            }
            // Uncorrectable ECC: the volatile count rising (or non-zero the
            // first time it is read) is an occurrence.
            if let Some(dbe) = sample.ecc_dbe_volatile {
                if dbe > state.last_dbe_volatile.unwrap_or(0) {
                    state.see(
                        "ecc_uncorrectable",
                        None,
                        unhealthy,
                        format!("{dbe} uncorrectable ECC errors since the driver loaded"),
                        now,
                    );
                }
                state.last_dbe_volatile = Some(dbe);
            }
            if sample.row_remap_failure == Some(true) {
                state.see(
                    "row_remap_failure",
                    None,
                    unhealthy,
                    "row remapping failed; the GPU needs service".to_string(),
                    now,
                );
            }
            if sample.row_remap_pending == Some(true) {
                state.see(
                    "row_remap_pending",
                    None,
                    unhealthy,
                    "a row remap is pending; reset the GPU to apply it".to_string(),
                    now,
                );
            }
            if sample.retired_pages_pending == Some(true) {
                state.see(
                    "retired_pages_pending",
                    None,
                    unhealthy,
                    "a page retirement is pending; reset the GPU to apply it".to_string(),
                    now,
                );
            }
            // Sustained slowdown.
            let slowing: Vec<&str> = sample
                .throttle_reasons
                .iter()
                .map(String::as_str)
                .filter(|r| SLOWDOWN_REASONS.contains(r))
                .collect();
            if slowing.is_empty() {
                state.slowdown_since = None;
            } else {
                let start = *state.slowdown_since.get_or_insert(now);
                if since(now, start) >= policy.slowdown_degraded_after {
                    let thermal = slowing.iter().any(|r| r.contains("thermal"));
                    state.see(
                        if thermal {
                            "thermal_slowdown"
                        } else {
                            "hw_slowdown"
                        },
                        None,
                        GpuHealth::Degraded,
                        format!(
                            "clocks slowed ({}) for {}s",
                            slowing.join(", "),
                            since(now, start).as_secs()
                        ),
                        now,
                    );
                }
            }
            // Correctable-error storm: SBEs over the last minute.
            if let Some(sbe) = sample.ecc_sbe_volatile {
                if state.last_sbe_volatile.is_some_and(|last| sbe < last) {
                    // Counter reset (driver reload): start over.
                    state.sbe_history.clear();
                }
                state.last_sbe_volatile = Some(sbe);
                state.sbe_history.push_back((now, sbe));
                while state
                    .sbe_history
                    .front()
                    .is_some_and(|(t, _)| since(now, *t) > STORM_WINDOW)
                {
                    state.sbe_history.pop_front();
                }
                if let Some((_, first)) = state.sbe_history.front() {
                    let rise = sbe - first;
                    if rise >= policy.sbe_storm_per_minute {
                        state.see(
                            "correctable_error_storm",
                            None,
                            GpuHealth::Degraded,
                            format!("{rise} correctable ECC errors in the last minute"),
                            now,
                        );
                    }
                }
            }

            // Conditions a clean period old are over.
            state
                .conditions
                .retain(|_, c| since(now, c.last_seen) < policy.clean_period);
            let health = state
                .conditions
                .values()
                .map(|c| c.severity)
                .max_by_key(|s| *s as i32)
                .unwrap_or(GpuHealth::Healthy);
            sample.health = health as i32;
            sample.health_reasons = state
                .conditions
                .iter()
                .map(|((code, _), c)| HealthReason {
                    code: (*code).to_string(),
                    severity: c.severity as i32,
                    message: c.message.clone(),
                    xid: c.xid,
                    last_seen: Some(prost_types::Timestamp::from(c.last_seen)),
                })
                .collect();
            let cutoff = now.checked_sub(policy.clean_period);
            sample.recent_xids = state
                .recent_xids
                .iter()
                .filter(|x| {
                    let at =
                        x.at.and_then(|t| SystemTime::try_from(t).ok())
                            .unwrap_or(now);
                    cutoff.is_none_or(|c| at > c)
                })
                .cloned()
                .collect();
            sample.xid_count = state.xid_count;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPU: &str = "GPU-a";

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn sample() -> GpuSample {
        GpuSample {
            uuid: GPU.into(),
            ecc_sbe_volatile: Some(0),
            ecc_dbe_volatile: Some(0),
            ..Default::default()
        }
    }

    fn xid(xid: u32, at: SystemTime) -> RawXid {
        RawXid {
            gpu_uuid: GPU.into(),
            xid,
            at,
            source: "nvml",
        }
    }

    fn tracker() -> HealthTracker {
        HealthTracker::new(HealthPolicy {
            clean_period: Duration::from_secs(300),
            ..Default::default()
        })
    }

    fn observe(h: &mut HealthTracker, now: SystemTime, s: GpuSample, x: Vec<RawXid>) -> GpuSample {
        let mut v = [s];
        h.observe(now, &mut v, x, Some(1), &|_| {
            Some(("job-1.0".into(), "job-1".into()))
        });
        let [s] = v;
        s
    }

    fn codes(s: &GpuSample) -> Vec<&str> {
        s.health_reasons.iter().map(|r| r.code.as_str()).collect()
    }

    #[test]
    fn healthy_without_faults() {
        let mut h = tracker();
        let s = observe(&mut h, t(0), sample(), vec![]);
        assert_eq!(s.health(), GpuHealth::Healthy);
        assert!(s.health_reasons.is_empty());
    }

    #[test]
    fn critical_xid_marks_unhealthy_until_a_clean_period_passes() {
        let mut h = tracker();
        let s = observe(&mut h, t(10), sample(), vec![xid(79, t(9))]);
        assert_eq!(s.health(), GpuHealth::Unhealthy);
        assert_eq!(codes(&s), ["xid_critical"]);
        assert_eq!(s.health_reasons[0].xid, Some(79));
        assert!(s.health_reasons[0].message.contains("fallen off the bus"));
        assert_eq!(s.xid_count, 1);
        assert_eq!(s.recent_xids[0].job_id, "job-1");
        // Still out just before the clean period ends...
        let s = observe(&mut h, t(9 + 299), sample(), vec![]);
        assert_eq!(s.health(), GpuHealth::Unhealthy);
        // ...and back once it has.
        let s = observe(&mut h, t(9 + 300), sample(), vec![]);
        assert_eq!(s.health(), GpuHealth::Healthy);
        assert!(s.recent_xids.is_empty());
        assert_eq!(s.xid_count, 1);
    }

    #[test]
    fn application_xids_are_attributed_not_marked() {
        let mut h = tracker();
        let s = observe(&mut h, t(1), sample(), vec![xid(13, t(0)), xid(31, t(0))]);
        assert_eq!(s.health(), GpuHealth::Healthy);
        assert_eq!(s.recent_xids.len(), 2);
        assert_eq!(s.recent_xids[0].allocation_id, "job-1.0");
        assert_eq!(s.recent_xids[1].xid, 31);
    }

    #[test]
    fn xid_table_is_configurable() {
        let mut h = HealthTracker::new(HealthPolicy {
            critical_xids: [13].into_iter().collect(),
            application_xids: BTreeSet::new(),
            ..Default::default()
        });
        let s = observe(&mut h, t(1), sample(), vec![xid(79, t(0))]);
        assert_eq!(s.health(), GpuHealth::Healthy);
        let s = observe(&mut h, t(2), sample(), vec![xid(13, t(1))]);
        assert_eq!(s.health(), GpuHealth::Unhealthy);
    }

    #[test]
    fn uncorrectable_ecc_rise_is_unhealthy() {
        let mut h = tracker();
        observe(&mut h, t(0), sample(), vec![]);
        let s = observe(
            &mut h,
            t(1),
            GpuSample {
                ecc_dbe_volatile: Some(2),
                ..sample()
            },
            vec![],
        );
        assert_eq!(s.health(), GpuHealth::Unhealthy);
        assert_eq!(codes(&s), ["ecc_uncorrectable"]);
        // An unchanged count is not a new occurrence: clears after the period.
        let s = observe(
            &mut h,
            t(301),
            GpuSample {
                ecc_dbe_volatile: Some(2),
                ..sample()
            },
            vec![],
        );
        assert_eq!(s.health(), GpuHealth::Healthy);
    }

    #[test]
    fn persistent_conditions_hold_while_present() {
        let mut h = tracker();
        let pending = GpuSample {
            row_remap_pending: Some(true),
            ..sample()
        };
        for secs in [0, 200, 400, 600] {
            let s = observe(&mut h, t(secs), pending.clone(), vec![]);
            assert_eq!(s.health(), GpuHealth::Unhealthy, "at {secs}s");
        }
        let failing = GpuSample {
            row_remap_failure: Some(true),
            retired_pages_pending: Some(true),
            sample_error: "GPU is lost".into(),
            ..sample()
        };
        let s = observe(&mut h, t(601), failing, vec![]);
        let mut c = codes(&s);
        c.sort_unstable();
        assert_eq!(
            c,
            [
                "nvml_error",
                "retired_pages_pending",
                "row_remap_failure",
                "row_remap_pending"
            ]
        );
        let s = observe(&mut h, t(601 + 300), sample(), vec![]);
        assert_eq!(s.health(), GpuHealth::Healthy);
    }

    #[test]
    fn sustained_slowdown_degrades() {
        let mut h = tracker();
        let slow = GpuSample {
            throttle_reasons: vec!["hw_thermal_slowdown".into(), "sw_power_cap".into()],
            ..sample()
        };
        let s = observe(&mut h, t(0), slow.clone(), vec![]);
        assert_eq!(s.health(), GpuHealth::Healthy, "a blip is not sustained");
        let s = observe(&mut h, t(30), slow.clone(), vec![]);
        assert_eq!(s.health(), GpuHealth::Healthy);
        let s = observe(&mut h, t(60), slow, vec![]);
        assert_eq!(s.health(), GpuHealth::Degraded);
        assert_eq!(codes(&s), ["thermal_slowdown"]);
        // Power capping alone is normal operation.
        let mut h = tracker();
        for secs in [0, 100, 200] {
            let capped = GpuSample {
                throttle_reasons: vec!["sw_power_cap".into()],
                ..sample()
            };
            let s = observe(&mut h, t(secs), capped, vec![]);
            assert_eq!(s.health(), GpuHealth::Healthy);
        }
    }

    #[test]
    fn correctable_error_storm_degrades_but_a_trickle_does_not() {
        let mut h = tracker();
        let with_sbe = |n| GpuSample {
            ecc_sbe_volatile: Some(n),
            ..sample()
        };
        observe(&mut h, t(0), with_sbe(10), vec![]);
        let s = observe(&mut h, t(30), with_sbe(50), vec![]);
        assert_eq!(s.health(), GpuHealth::Healthy);
        let s = observe(&mut h, t(50), with_sbe(150), vec![]);
        assert_eq!(s.health(), GpuHealth::Degraded);
        assert_eq!(codes(&s), ["correctable_error_storm"]);
        // Unhealthy wins over Degraded.
        let s = observe(&mut h, t(51), with_sbe(150), vec![xid(48, t(51))]);
        assert_eq!(s.health(), GpuHealth::Unhealthy);
    }

    #[test]
    fn fewer_gpus_than_expected_marks_every_gpu() {
        let mut h = HealthTracker::new(HealthPolicy {
            expected_gpu_count: Some(8),
            ..Default::default()
        });
        let mut v = [
            sample(),
            GpuSample {
                uuid: "GPU-b".into(),
                ..sample()
            },
        ];
        h.observe(t(0), &mut v, vec![], Some(7), &|_| None);
        for s in &v {
            assert_eq!(s.health(), GpuHealth::Unhealthy);
            assert_eq!(codes(s), ["gpu_count_below_expected"]);
        }
        h.observe(t(1), &mut v, vec![], Some(8), &|_| None);
        assert_eq!(
            v[0].health(),
            GpuHealth::Unhealthy,
            "clears after the clean period"
        );
    }
}
