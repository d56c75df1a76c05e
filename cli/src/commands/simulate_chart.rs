//! Terminal charts of a simulation: one row of block characters per
//! policy, all rows of a panel on one scale so that policies compare at a
//! glance; the SVG (`--svg`) is the full-size picture.

use std::fmt::Write as _;

use gpufleet_scheduler::sim::{self, PolicyReport, inflation::InflationReport};

/// Columns of a chart row.
pub(crate) const WIDTH: usize = 60;
const LEVELS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// The mean of a step function over `width` equal columns of `0..end`:
/// each point's value holds from its time until the next point's (the
/// last until `end`); before the first point nothing is known (`None`).
pub(crate) fn column_means(points: &[(u64, f64)], end: u64, width: usize) -> Vec<Option<f64>> {
    let width = width.max(1);
    let end = end.max(1);
    let column = |t: u64| ((u128::from(t) * width as u128) / u128::from(end)) as usize;
    let mut sum = vec![0.0f64; width];
    let mut covered = vec![0.0f64; width];
    for (i, &(from, value)) in points.iter().enumerate() {
        let to = points.get(i + 1).map_or(end, |p| p.0).min(end);
        if to <= from {
            continue;
        }
        // Split [from, to) at column boundaries (in virtual seconds).
        let mut t = from;
        while t < to {
            let c = column(t).min(width - 1);
            let boundary = ((c as u128 + 1) * u128::from(end)).div_ceil(width as u128) as u64;
            let next = boundary.clamp(t + 1, to);
            let span = (next - t) as f64;
            sum[c] += value * span;
            covered[c] += span;
            t = next;
        }
    }
    sum.iter()
        .zip(&covered)
        .map(|(s, c)| (*c > 0.0).then(|| s / c))
        .collect()
}

/// At most `width` columns: past that, each the mean of its share of the
/// values (in order).
pub(crate) fn at_most(values: &[f64], width: usize) -> Vec<Option<f64>> {
    let (n, width) = (values.len(), width.max(1));
    if n <= width {
        return values.iter().map(|v| Some(*v)).collect();
    }
    (0..width)
        .map(|c| {
            let part = &values[c * n / width..((c + 1) * n / width).max(c * n / width + 1)];
            Some(part.iter().sum::<f64>() / part.len() as f64)
        })
        .collect()
}

/// One row: a block per column, scaled to `max` (blank where unknown).
pub(crate) fn sparkline(values: &[Option<f64>], max: f64) -> String {
    values
        .iter()
        .map(|v| match v {
            None => ' ',
            Some(v) if max <= 0.0 || *v <= 0.0 => LEVELS[0],
            Some(v) => {
                let level = (v / max * (LEVELS.len() - 1) as f64).round() as usize;
                LEVELS[level.min(LEVELS.len() - 1)]
            }
        })
        .collect()
}

/// A titled panel: one labelled row per series, and the axis beneath.
fn panel(
    out: &mut String,
    title: &str,
    rows: &[(String, Vec<Option<f64>>)],
    max: f64,
    axis: (&str, &str),
) {
    let label_width = rows
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    let _ = writeln!(out, "{title}");
    for (label, values) in rows {
        let _ = writeln!(out, "  {label:<label_width$}  {}", sparkline(values, max));
    }
    let gap = WIDTH.saturating_sub(axis.0.chars().count() + axis.1.chars().count());
    let _ = writeln!(
        out,
        "  {:<label_width$}  {}{}{}",
        "",
        axis.0,
        " ".repeat(gap),
        axis.1
    );
}

/// Virtual time for an axis, in one unit: `100 s`, `45 min`, `7.5 h`, `149.3 days`.
fn span(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7_200 => format!("{:.0} min", secs as f64 / 60.0),
        7_200..172_800 => format!("{:.1} h", secs as f64 / 3600.0),
        _ => format!("{:.1} days", secs as f64 / 86_400.0),
    }
}

/// Allocation and stranded GPUs over virtual time, every policy.
pub(crate) fn replay(reports: &[PolicyReport]) -> String {
    let mut out = String::new();
    let end = reports.iter().map(|r| r.end_time).max().unwrap_or(0);
    if reports.is_empty() || end == 0 {
        return out;
    }
    let series =
        |value: &dyn Fn(&PolicyReport, &sim::Sample) -> f64| -> Vec<(String, Vec<Option<f64>>)> {
            reports
                .iter()
                .map(|r| {
                    let points: Vec<(u64, f64)> =
                        r.series.iter().map(|s| (s.time, value(r, s))).collect();
                    (
                        r.policy.label().to_string(),
                        column_means(&points, end, WIDTH),
                    )
                })
                .collect()
        };
    let allocation =
        series(&|r, s| 100.0 * f64::from(s.allocated_gpus) / (r.total_gpus.max(1) as f64));
    let stranded = series(&|_, s| f64::from(s.stranded_gpus));
    let peak = |rows: &[(String, Vec<Option<f64>>)]| {
        rows.iter()
            .flat_map(|(_, v)| v.iter().flatten().copied())
            .fold(0.0f64, f64::max)
    };
    let axis = ("0 s".to_string(), span(end));
    // Scaled to the busiest column (a lightly loaded trace would draw a
    // flat floor on 0–100 %), the scale said in the title.
    let top_allocation = peak(&allocation);
    panel(
        &mut out,
        &format!(
            "GPUs allocated over time (% of all GPUs; ▁ 0 … █ {top_allocation:.1} %; each column the mean of its span):"
        ),
        &allocation,
        top_allocation,
        (&axis.0, &axis.1),
    );
    let top = peak(&stranded);
    panel(
        &mut out,
        &format!("GPUs stranded over time (free but usable by no pending job; ▁ 0 … █ {top:.0}):"),
        &stranded,
        top,
        (&axis.0, &axis.1),
    );
    out
}

/// Unallocated GPUs as arrived demand grows, every policy.
pub(crate) fn inflation(reports: &[InflationReport]) -> String {
    let mut out = String::new();
    let rows: Vec<(String, Vec<Option<f64>>)> = reports
        .iter()
        .map(|r| {
            (
                r.policy.label().to_string(),
                at_most(
                    &r.points
                        .iter()
                        .map(|p| p.unallocated_pct)
                        .collect::<Vec<_>>(),
                    WIDTH,
                ),
            )
        })
        .collect();
    let (Some(first), Some(last)) = (
        reports
            .iter()
            .flat_map(|r| r.points.first())
            .map(|p| p.demand_pct)
            .min(),
        reports
            .iter()
            .flat_map(|r| r.points.last())
            .map(|p| p.demand_pct)
            .max(),
    ) else {
        return out;
    };
    let top = rows
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .fold(0.0f64, f64::max);
    let (from, to) = (format!("{first} %"), format!("{last} % arrived demand"));
    let steps = rows.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    let label_width = rows
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "unallocated GPUs as demand arrives (% of capacity; ▁ 0 … █ {top:.1} %; a column per step, or the mean of neighbouring steps past {WIDTH}):"
    );
    for (label, values) in &rows {
        let _ = writeln!(out, "  {label:<label_width$}  {}", sparkline(values, top));
    }
    let gap = steps.saturating_sub(from.chars().count()).max(1);
    let _ = writeln!(out, "  {:<label_width$}  {from}{}{to}", "", " ".repeat(gap));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_time_weighted_means_of_the_steps() {
        // 10 before t=5, 30 from 5 until 20; two columns of 10 s.
        let c = column_means(&[(0, 10.0), (5, 30.0)], 20, 2);
        assert_eq!(c, vec![Some(20.0), Some(30.0)]);
        // Nothing is known before the first point.
        let c = column_means(&[(10, 4.0)], 20, 2);
        assert_eq!(c, vec![None, Some(4.0)]);
        // More columns than seconds: every column still gets its second.
        let c = column_means(&[(0, 1.0), (1, 2.0)], 2, 4);
        assert_eq!(c.iter().flatten().count(), 2, "{c:?}");
        assert_eq!(column_means(&[], 0, 3), vec![None, None, None]);
    }

    #[test]
    fn many_steps_become_at_most_width_columns() {
        let values: Vec<f64> = (0..950).map(f64::from).collect();
        let columns = at_most(&values, 60);
        assert_eq!(columns.len(), 60);
        assert_eq!(columns[0], Some((0..15).map(f64::from).sum::<f64>() / 15.0));
        assert_eq!(at_most(&[1.0, 2.0], 60), vec![Some(1.0), Some(2.0)]);
    }

    #[test]
    fn axis_spans_read_in_one_unit() {
        assert_eq!(span(100), "100 s");
        assert_eq!(span(2_700), "45 min");
        assert_eq!(span(27_000), "7.5 h");
        assert_eq!(span(12_900_000), "149.3 days");
    }

    #[test]
    fn sparklines_scale_to_the_common_maximum() {
        let line = sparkline(&[Some(0.0), Some(50.0), Some(100.0), None], 100.0);
        assert_eq!(line, "▁▅█ ");
        assert_eq!(
            sparkline(&[Some(3.0)], 0.0),
            "▁",
            "a zero scale draws the floor"
        );
    }
}
