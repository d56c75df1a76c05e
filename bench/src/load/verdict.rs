//! The report: RSS over time and whether it stayed flat after warm-up.

use std::time::Duration;

use super::*;

/// Whether RSS stayed flat from a third of the run (the warm-up) to its
/// end, judged by floors (see [`FLOOR_WINDOW`]).
#[derive(Debug, Clone, PartialEq)]
struct Flatness {
    /// Where the comparison starts: the first sample at or after a third.
    from: Duration,
    window: Duration,
    floor_start: u64,
    floor_end: u64,
    floor_growth: f64,
    floor_share: f64,
    floor_per_job: f64,
    /// The single samples at `from` and at the end, compared.
    sample_growth: f64,
    sample_share: f64,
    /// The highest sample from `from` on.
    peak: u64,
}

impl Flatness {
    fn of(points: &[RssPoint], duration: Duration) -> Self {
        Self::of_value(points, duration, |p| p.rss)
    }

    /// The same test over another figure of the samples (the live heap).
    fn of_value(points: &[RssPoint], duration: Duration, value: fn(&RssPoint) -> u64) -> Self {
        let third = duration / 3;
        let window = FLOOR_WINDOW.min(third);
        let start = points
            .iter()
            .position(|p| p.at >= third)
            .unwrap_or(0)
            .min(points.len().saturating_sub(1));
        let after = points.get(start..).unwrap_or_default();
        let (Some(first), Some(last)) = (after.first(), after.last()) else {
            return Self {
                from: Duration::ZERO,
                window,
                floor_start: 0,
                floor_end: 0,
                floor_growth: 0.0,
                floor_share: 0.0,
                floor_per_job: 0.0,
                sample_growth: 0.0,
                sample_share: 0.0,
                peak: 0,
            };
        };
        // The lowest sample of a window, and the jobs submitted by then.
        let floor = |in_window: &dyn Fn(&RssPoint) -> bool, or: &RssPoint| {
            let lowest = after
                .iter()
                .filter(|p| in_window(p))
                .min_by_key(|p| value(p))
                .unwrap_or(or);
            (value(lowest), lowest.submitted)
        };
        let (floor_start, jobs_start) = floor(&|p| p.at <= first.at + window, first);
        // The end window never reaches back into the start window; a run
        // too short for both compares its last sample.
        let (floor_end, jobs_end) = floor(
            &|p| p.at + window >= last.at && p.at > first.at + window,
            last,
        );
        let floor_growth = floor_end as f64 - floor_start as f64;
        let sample_growth = value(last) as f64 - value(first) as f64;
        Self {
            from: first.at,
            window,
            floor_start,
            floor_end,
            floor_growth,
            floor_share: floor_growth / floor_start.max(1) as f64,
            floor_per_job: floor_growth / jobs_end.saturating_sub(jobs_start).max(1) as f64,
            sample_growth,
            sample_share: sample_growth / value(first).max(1) as f64,
            peak: after.iter().map(value).max().unwrap_or(0),
        }
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

pub(super) fn print_report(args: &LoadArgs, o: &Outcome, log_errors: usize) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "load: {} agents x {} GPUs, telemetry every {}, {} jobs/s offered for {} (jobs run {}), {cores} CPU cores",
        args.agents,
        args.gpus,
        humantime::format_duration(args.telemetry_interval),
        args.submit_rate,
        humantime::format_duration(args.duration),
        humantime::format_duration(args.job_runtime),
    );
    println!(
        "agents connected and Ready in {:.1} s; controller = gpufleet-controller child process",
        o.connect_time.as_secs_f64()
    );
    println!();
    let rows: Vec<Vec<String>> = o
        .rss
        .iter()
        .zip(&o.window_latency)
        .map(|(p, latency)| {
            vec![
                format!("{:.0}", p.at.as_secs_f64()),
                format!("{:.1}", mib(p.rss)),
                p.heap.map_or("-".into(), |h| format!("{:.1}", mib(h))),
                p.submitted.to_string(),
                latency.map_or("-".into(), |(p50, p99)| {
                    format!("{:.1} / {:.1}", p50 as f64 / 1000.0, p99 as f64 / 1000.0)
                }),
            ]
        })
        .collect();
    report::table(
        &[
            "t (s)",
            "controller RSS (MiB)",
            "live heap (MiB)",
            "jobs submitted",
            "submit p50 / p99 in interval (ms)",
        ],
        &rows,
    );
    println!();

    let verdict = Flatness::of(&o.rss, args.duration);
    let flat = verdict.floor_share <= FLAT_GROWTH;
    // The heap by the same test, when every sample has it: what the
    // controller holds, against what the allocator keeps.
    let heap = o
        .rss
        .iter()
        .all(|p| p.heap.is_some())
        .then(|| Flatness::of_value(&o.rss, args.duration, |p| p.heap.unwrap_or(0)));
    let p = |q: f64| report::percentile(&o.submit_latency, q) as f64 / 1000.0;
    let (p50, p99, max) = (
        p(50.0),
        p(99.0),
        o.submit_latency.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    let errors = o.errors + log_errors as u64 + o.failed + o.unfinished;
    report::table(
        &["figure", "value", "goal"],
        &[
            vec![
                "errors (clients, agents, controller log, failed or unfinished jobs)".into(),
                errors.to_string(),
                "0".into(),
            ],
            vec![
                "jobs submitted (achieved rate)".into(),
                format!("{} ({:.1}/s)", o.submitted, o.achieved_rate),
                format!("{}/s", args.submit_rate),
            ],
            vec![
                "jobs started / succeeded on the agents".into(),
                format!("{} / {}", o.started, o.succeeded),
                "= submitted".into(),
            ],
            vec![
                "telemetry batches sent".into(),
                o.batches.to_string(),
                "-".into(),
            ],
            vec![
                "submit latency p50 / p99 / max".into(),
                format!("{p50:.2} / {p99:.2} / {max:.2} ms"),
                "-".into(),
            ],
            vec![
                format!(
                    "RSS floor growth: lowest in {:.0}s from t={:.0}s, to lowest in the last {:.0}s",
                    verdict.window.as_secs_f64(),
                    verdict.from.as_secs_f64(),
                    verdict.window.as_secs_f64(),
                ),
                format!(
                    "{:.1} -> {:.1} MiB: {:+.1} MiB ({:+.1} %), {:.0} B per job submitted meanwhile",
                    mib(verdict.floor_start),
                    mib(verdict.floor_end),
                    verdict.floor_growth / (1 << 20) as f64,
                    verdict.floor_share * 100.0,
                    verdict.floor_per_job
                ),
                format!("<= {:.0} % (flat)", FLAT_GROWTH * 100.0),
            ],
            vec![
                format!(
                    "RSS sample at t={:.0}s to the last sample",
                    verdict.from.as_secs_f64()
                ),
                format!(
                    "{:+.1} MiB ({:+.1} %)",
                    verdict.sample_growth / (1 << 20) as f64,
                    verdict.sample_share * 100.0,
                ),
                "-".into(),
            ],
            vec![
                "RSS peak after warm-up".into(),
                format!("{:.1} MiB", mib(verdict.peak)),
                "-".into(),
            ],
            vec![
                "live heap floor growth, the same windows".into(),
                heap.as_ref()
                    .map_or("- (no gpufleet_controller_heap_bytes)".into(), |h| {
                        format!(
                            "{:.1} -> {:.1} MiB: {:+.1} MiB ({:+.1} %), {:.0} B per job",
                            mib(h.floor_start),
                            mib(h.floor_end),
                            h.floor_growth / (1 << 20) as f64,
                            h.floor_share * 100.0,
                            h.floor_per_job
                        )
                    }),
                "-".into(),
            ],
        ],
    );
    println!(
        "verdict: controller RSS {} after warm-up",
        if flat { "flat" } else { "NOT flat" }
    );
    for e in &o.first_errors {
        println!("error: {e}");
    }
    let summary = serde_json::json!({
        "bench": "load",
        "agents": args.agents,
        "gpus_per_agent": args.gpus,
        "duration_s": args.duration.as_secs_f64(),
        "submit_rate": args.submit_rate,
        "achieved_rate": (o.achieved_rate * 10.0).round() / 10.0,
        "cores": cores,
        "errors": errors,
        "jobs_submitted": o.submitted,
        "jobs_succeeded_on_agents": o.succeeded,
        "telemetry_batches": o.batches,
        "submit_p50_ms": p50,
        "submit_p99_ms": p99,
        "submit_max_ms": max,
        "rss_mib": o.rss.iter().map(|p| [p.at.as_secs_f64().round(), (mib(p.rss) * 10.0).round() / 10.0]).collect::<Vec<_>>(),
        "rss_floor_growth_after_third": (verdict.floor_share * 1000.0).round() / 1000.0,
        "rss_floor_bytes_per_job": verdict.floor_per_job.round(),
        "rss_sample_growth_after_third": (verdict.sample_share * 1000.0).round() / 1000.0,
        "rss_peak_after_third_mib": (mib(verdict.peak) * 10.0).round() / 10.0,
        "rss_flat": flat,
        "heap_mib": o.rss.iter().filter_map(|p| p.heap.map(|h| [p.at.as_secs_f64().round(), (mib(h) * 10.0).round() / 10.0])).collect::<Vec<_>>(),
        "heap_floor_growth_after_third": heap.as_ref().map(|h| (h.floor_share * 1000.0).round() / 1000.0),
        "heap_floor_bytes_per_job": heap.as_ref().map(|h| h.floor_per_job.round()),
    });
    println!("{summary}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples every 10 s of a 300 s run: `base` MiB plus `slope` MiB per
    /// 10 s, plus `peak` MiB on every sixth sample (the minute's writes).
    fn run(base: f64, slope: f64, peak: f64, peak_at_end: bool) -> Vec<RssPoint> {
        (0..=30u64)
            .map(|i| {
                let minute_peak = i % 6 == 2 || (peak_at_end && i == 30);
                let value = base + slope * i as f64 + if minute_peak { peak } else { 0.0 };
                RssPoint {
                    at: Duration::from_secs(10 * i),
                    rss: (value * (1 << 20) as f64) as u64,
                    heap: None,
                    submitted: 1000 * i,
                }
            })
            .collect()
    }

    #[test]
    fn a_peak_on_the_last_sample_does_not_decide_the_verdict() {
        let points = run(90.0, 0.0, 5.0, true);
        let v = Flatness::of(&points, Duration::from_secs(300));
        assert_eq!(v.from, Duration::from_secs(100));
        assert!(v.sample_share > FLAT_GROWTH, "{v:?}");
        assert_eq!(v.floor_start, v.floor_end, "{v:?}");
        assert!(v.floor_share.abs() < 1e-9);
        assert!(mib(v.peak) > 94.9, "{v:?}");
    }

    #[test]
    fn steady_growth_under_the_peaks_is_not_flat() {
        // 0.5 MiB per 10 s: +10 MiB over the last 200 s on about 95 MiB.
        let points = run(90.0, 0.5, 5.0, false);
        let v = Flatness::of(&points, Duration::from_secs(300));
        assert!(v.floor_share > FLAT_GROWTH, "{v:?}");
        assert!(v.floor_per_job > 0.0);
    }

    #[test]
    fn a_run_too_short_for_two_windows_compares_its_last_sample() {
        let points: Vec<RssPoint> = (0..=3u64)
            .map(|i| RssPoint {
                at: Duration::from_secs(10 * i),
                rss: (100 + 10 * i) << 20,
                heap: Some(50 << 20),
                submitted: 100 * i,
            })
            .collect();
        let v = Flatness::of(&points, Duration::from_secs(30));
        assert_eq!(v.floor_end, 130 << 20, "{v:?}");
        assert!(v.floor_share > FLAT_GROWTH);
        assert!(Flatness::of(&[], Duration::from_secs(30)).floor_share == 0.0);
        // The same test over the heap, which stayed level.
        let heap = Flatness::of_value(&points, Duration::from_secs(30), |p| p.heap.unwrap_or(0));
        assert_eq!(heap.floor_growth, 0.0, "{heap:?}");
    }
}
