//! Usage rollups: GPU-time and cost per (time bucket × provider, region,
//! generation, model, tenant, workload class, job name), at minute, hour and
//! day granularity, each with its own retention. Pure and in memory; rebuilt
//! from the ledger when the controller starts.
//!
//! Money is kept exact: a cell stores `price (micro-USD per GPU-hour) ×
//! GPU-milliseconds`, an integer, and divides by 3,600,000 only when a report
//! is rendered, so any sum of cells equals the sum of the records it covers.

use std::collections::{BTreeMap, HashMap};

use super::{Dims, UsageDimension};

pub const MINUTE: u64 = 60;
pub const HOUR: u64 = 3600;
pub const DAY: u64 = 86_400;
/// The coarsest rollup: 30-day buckets (aligned to the Unix epoch).
pub const MONTH: u64 = 30 * DAY;

/// One record's contribution, ready to be split over buckets.
#[derive(Debug, Clone, Default)]
pub struct Contribution {
    pub dims: Dims,
    pub start_ms: u64,
    pub end_ms: u64,
    pub gpus: u32,
    /// (from ms, price per GPU-hour in micro-USD), first at `start_ms`.
    pub prices: Vec<(u64, u64)>,
    /// 0: whole GPUs. Else the thousandths of its one GPU the allocation
    /// held: its GPU-time (and cost) is weighted by it.
    pub share_milli: u32,
    pub mean_util: Option<f64>,
    pub energy_joules: Option<f64>,
    /// What the GPUs did, 0..100: SM activity from profiling when known,
    /// else the coarse utilisation (see [`crate::usage::activity_of`]).
    pub activity: Option<f64>,
    /// `activity` came from the profiling (GPM) fields.
    pub activity_profiled: bool,
}

impl Contribution {
    /// Thousandths of GPUs held: 1000 per whole GPU, else the share.
    pub fn milli_gpus(&self) -> u64 {
        if self.share_milli > 0 {
            self.share_milli as u64
        } else {
            self.gpus as u64 * 1000
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Cell {
    pub combo: u32,
    pub gpu_ms: u64,
    /// price (micro-USD/GPU-hour) × GPU-ms.
    pub cost_exact: u128,
    pub allocations: u32,
    /// Σ utilisation × GPU-ms over the GPU-time with a known utilisation.
    pub util_weighted: f64,
    pub util_weight: f64,
    pub energy_joules: f64,
    /// Σ activity (0..1) × GPU-ms over the GPU-time with a measured
    /// activity: the GPU-time the silicon was busy.
    pub active_gpu_ms: f64,
    /// GPU-ms with a measured activity.
    pub measured_gpu_ms: f64,
    /// Of it, measured by the profiling (GPM) fields.
    pub profiled_gpu_ms: f64,
    /// Σ (1 − activity) × `cost_exact` over the measured GPU-time: what
    /// the idle part cost (one field, not two: a cell is kept per bucket
    /// and combination, so every byte counts).
    pub idle_cost: f64,
}

impl Cell {
    pub fn add(&mut self, other: &Cell) {
        self.gpu_ms += other.gpu_ms;
        self.cost_exact += other.cost_exact;
        self.allocations += other.allocations;
        self.util_weighted += other.util_weighted;
        self.util_weight += other.util_weight;
        self.energy_joules += other.energy_joules;
        self.active_gpu_ms += other.active_gpu_ms;
        self.measured_gpu_ms += other.measured_gpu_ms;
        self.profiled_gpu_ms += other.profiled_gpu_ms;
        self.idle_cost += other.idle_cost;
    }
}

/// `cost_exact` → micro-USD, rounded half up.
pub fn micro_usd(cost_exact: u128) -> u64 {
    ((cost_exact + 1_800_000) / 3_600_000) as u64
}

#[derive(Debug, Default)]
struct Bucket {
    cells: Vec<Cell>,
    index: HashMap<u32, u32>,
}

#[derive(Debug)]
struct Granularity {
    width: u64,
    retention: u64,
    buckets: BTreeMap<u64, Bucket>,
}

#[derive(Debug)]
pub struct Rollups {
    combos: Vec<Dims>,
    /// Per combination, each dimension as a small id (strings interned
    /// per dimension), so grouping never clones or hashes strings.
    combo_keys: Vec<[u32; 7]>,
    interned: [HashMap<String, u32>; 7],
    combo_index: HashMap<Dims, u32>,
    /// Minute, hour, day, 30 days.
    grans: [Granularity; 4],
}

/// A grouped total, optionally with a series.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub dims: Dims,
    pub total: Cell,
    pub series: BTreeMap<u64, Cell>,
}

impl Rollups {
    /// Retention per granularity (seconds): minute, hour, day.
    pub fn new(retention: [u64; 3]) -> Self {
        let g = |width, retention| Granularity {
            width,
            retention,
            buckets: BTreeMap::new(),
        };
        Self {
            combos: Vec::new(),
            combo_keys: Vec::new(),
            interned: Default::default(),
            combo_index: HashMap::new(),
            grans: [
                g(MINUTE, retention[0]),
                g(HOUR, retention[1]),
                g(DAY, retention[2]),
                g(MONTH, retention[2]),
            ],
        }
    }

    fn combo(&mut self, dims: &Dims) -> u32 {
        if let Some(&id) = self.combo_index.get(dims) {
            return id;
        }
        let id = self.combos.len() as u32;
        let fields = [
            &dims.provider,
            &dims.region,
            &String::new(),
            &dims.model,
            &dims.tenant,
            &dims.workload_class,
            &dims.job_name,
        ];
        let mut key = [0u32; 7];
        for (i, field) in fields.iter().enumerate() {
            let next = self.interned[i].len() as u32;
            key[i] = *self.interned[i].entry((*field).clone()).or_insert(next);
        }
        key[2] = dims.generation as u32;
        self.combo_keys.push(key);
        self.combos.push(dims.clone());
        self.combo_index.insert(dims.clone(), id);
        id
    }

    /// Adds a record, split over the buckets it overlaps (only buckets
    /// still within each granularity's retention at `now`).
    pub fn add(&mut self, c: &Contribution, now_secs: u64) {
        if c.gpus == 0 {
            return;
        }
        let combo = self.combo(&c.dims);
        // An allocation that ended within the millisecond it started (a
        // workload that failed at once) used no measurable GPU-time, but it
        // is still an allocation: it counts in the bucket of its start.
        let end_ms = c.end_ms.max(c.start_ms);
        let total_ms = end_ms - c.start_ms;
        let instant = total_ms == 0;
        for gran in &mut self.grans {
            let cutoff = now_secs.saturating_sub(gran.retention);
            let width_ms = gran.width * 1000;
            let mut bucket = (c.start_ms / width_ms) * width_ms;
            if bucket / 1000 + gran.width <= cutoff {
                bucket = (cutoff / gran.width) * width_ms;
            }
            let mut first = true;
            while bucket < end_ms || (instant && first && bucket <= c.start_ms) {
                let from = bucket.max(c.start_ms);
                let to = (bucket + width_ms).min(end_ms);
                if to > from || instant {
                    let ms = to - from;
                    // GPU-ms weighted by the share: milli-GPU-seconds.
                    let gpu_ms = ms * c.milli_gpus() / 1000;
                    // Each second at the price in force then, weighted likewise.
                    let cost_exact =
                        crate::pricing::cost_exact(&c.prices, from, to, c.milli_gpus());
                    let activity = c.activity.map(|a| (a / 100.0).clamp(0.0, 1.0));
                    let measured = if activity.is_some() {
                        gpu_ms as f64
                    } else {
                        0.0
                    };
                    let share = if instant {
                        1.0
                    } else {
                        ms as f64 / total_ms as f64
                    };
                    let cell = Cell {
                        combo,
                        gpu_ms,
                        cost_exact,
                        allocations: u32::from(first && bucket <= c.start_ms),
                        util_weighted: c.mean_util.map_or(0.0, |u| u * gpu_ms as f64),
                        util_weight: if c.mean_util.is_some() {
                            gpu_ms as f64
                        } else {
                            0.0
                        },
                        energy_joules: c.energy_joules.map_or(0.0, |e| e * share),
                        active_gpu_ms: activity.map_or(0.0, |a| a * gpu_ms as f64),
                        measured_gpu_ms: measured,
                        profiled_gpu_ms: if c.activity_profiled { measured } else { 0.0 },
                        idle_cost: activity.map_or(0.0, |a| (1.0 - a) * cost_exact as f64),
                    };
                    let b = gran.buckets.entry(bucket / 1000).or_default();
                    match b.index.get(&combo) {
                        Some(&i) => b.cells[i as usize].add(&cell),
                        None => {
                            b.index.insert(combo, b.cells.len() as u32);
                            b.cells.push(cell);
                        }
                    }
                }
                first = false;
                bucket += width_ms;
            }
        }
    }

    /// Drops buckets past their retention.
    pub fn prune(&mut self, now_secs: u64) {
        for gran in &mut self.grans {
            let cutoff = now_secs.saturating_sub(gran.retention);
            let keep = gran
                .buckets
                .split_off(&((cutoff / gran.width) * gran.width));
            gran.buckets = keep;
        }
    }

    /// The finest granularity whose retention reaches back to `since`.
    pub fn granularity_for(&self, since: u64, now_secs: u64) -> u64 {
        self.grans
            .iter()
            .take(3)
            .find(|g| since + g.retention >= now_secs)
            .map_or(DAY, |g| g.width)
    }

    /// Totals grouped by `group_by` over [since, until). The range is
    /// aligned to the finest granularity that still holds `since` (returned);
    /// its interior is read from the coarsest buckets that fit inside it
    /// (30 days, then days, hours, minutes), so a year-long report reads a
    /// few hundred thousand cells, not millions. With `series`, no bucket
    /// wider than the series step is used.
    pub fn query(
        &self,
        group_by: &[UsageDimension],
        since: u64,
        until: u64,
        series: Option<u64>,
        tenant: Option<&str>,
        now_secs: u64,
    ) -> (Vec<Row>, u64) {
        let width = self.granularity_for(since, now_secs);
        let from = (since / width) * width;
        let to = until.div_ceil(width) * width;
        let series_width = series.map(|s| s.max(width));
        // Granularities usable: at least `width`, at most the series step.
        let usable: Vec<&Granularity> = self
            .grans
            .iter()
            .filter(|g| g.width >= width && series_width.is_none_or(|s| g.width <= s))
            .collect();
        let mut segments: Vec<(usize, u64, u64)> = Vec::new();
        cover(&usable, usable.len(), from, to, &mut segments);

        let mask = DimMask::of(group_by);
        const NONE: u32 = u32::MAX;
        // Combos of other tenants, when the query names one.
        const SKIP: u32 = u32::MAX - 1;
        let mut row_of: Vec<u32> = vec![NONE; self.combos.len()];
        let mut rows: Vec<Row> = Vec::new();
        let mut row_index: HashMap<[u32; 7], u32> = HashMap::new();
        for (g, a, b) in segments {
            let gran = usable[g];
            for (&start, bucket) in gran.buckets.range(a..b) {
                for cell in &bucket.cells {
                    let mut row = row_of[cell.combo as usize];
                    if row == SKIP {
                        continue;
                    }
                    if row == NONE {
                        if tenant.is_some_and(|t| self.combos[cell.combo as usize].tenant != t) {
                            row_of[cell.combo as usize] = SKIP;
                            continue;
                        }
                        let key = mask.key(&self.combo_keys[cell.combo as usize]);
                        row = *row_index.entry(key).or_insert_with(|| {
                            rows.push(Row {
                                dims: mask.project(&self.combos[cell.combo as usize]),
                                ..Default::default()
                            });
                            (rows.len() - 1) as u32
                        });
                        row_of[cell.combo as usize] = row;
                    }
                    let row = &mut rows[row as usize];
                    row.total.add(cell);
                    if let Some(sw) = series_width {
                        row.series.entry((start / sw) * sw).or_default().add(cell);
                    }
                }
            }
        }
        (rows, width)
    }
}

/// Splits [from, to) into aligned segments of the coarsest usable
/// granularities: (granularity index, start, end).
fn cover(
    grans: &[&Granularity],
    upto: usize,
    from: u64,
    to: u64,
    out: &mut Vec<(usize, u64, u64)>,
) {
    if from >= to || upto == 0 {
        return;
    }
    let g = upto - 1;
    let w = grans[g].width;
    let a = from.div_ceil(w) * w;
    let b = (to / w) * w;
    if g == 0 || a >= b {
        if g == 0 {
            out.push((0, from, to));
        } else {
            cover(grans, g, from, to, out);
        }
        return;
    }
    cover(grans, g, from, a, out);
    out.push((g, a, b));
    cover(grans, g, b, to, out);
}

/// Which dimensions a report keeps.
struct DimMask([bool; 7]);

impl DimMask {
    fn of(group_by: &[UsageDimension]) -> Self {
        let has = |d| group_by.contains(&d);
        Self([
            has(UsageDimension::Provider),
            has(UsageDimension::Region),
            has(UsageDimension::Generation),
            has(UsageDimension::Model),
            has(UsageDimension::Tenant),
            has(UsageDimension::WorkloadClass),
            has(UsageDimension::JobName),
        ])
    }

    fn key(&self, ids: &[u32; 7]) -> [u32; 7] {
        let mut key = [u32::MAX; 7];
        for i in 0..7 {
            if self.0[i] {
                key[i] = ids[i];
            }
        }
        key
    }

    fn project(&self, d: &Dims) -> Dims {
        let keep = |i: usize, v: &String| if self.0[i] { v.clone() } else { String::new() };
        Dims {
            provider: keep(0, &d.provider),
            region: keep(1, &d.region),
            generation: if self.0[2] { d.generation } else { 0 },
            model: keep(3, &d.model),
            tenant: keep(4, &d.tenant),
            workload_class: keep(5, &d.workload_class),
            job_name: keep(6, &d.job_name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims(tenant: &str, generation: i32) -> Dims {
        Dims {
            provider: "aws".into(),
            region: "us-east-1".into(),
            generation,
            model: "H100-SXM-80GB".into(),
            tenant: tenant.into(),
            workload_class: "training".into(),
            job_name: "j".into(),
        }
    }

    #[test]
    fn splits_exactly_over_buckets_and_groups() {
        let mut r = Rollups::new([2 * DAY, 90 * DAY, 3650 * DAY]);
        let now = 500 * DAY;
        // 2 GPUs from 00:59:30 to 02:00:30 at $3.93: 2 × 3660 s.
        let start = 499 * DAY * 1000 + 3_570_000;
        r.add(
            &Contribution {
                dims: dims("a", 6),
                start_ms: start,
                end_ms: start + 3_660_000,
                gpus: 2,
                prices: vec![(start, 3_930_000)],
                mean_util: Some(50.0),
                energy_joules: Some(1000.0),
                ..Default::default()
            },
            now,
        );
        r.add(
            &Contribution {
                dims: dims("b", 4),
                start_ms: start,
                end_ms: start + 1_000,
                gpus: 1,
                prices: vec![(start, 1_000_000)],
                mean_util: None,
                energy_joules: None,
                ..Default::default()
            },
            now,
        );
        for since in [499 * DAY, 440 * DAY, 100 * DAY] {
            let (rows, _) = r.query(&[UsageDimension::Tenant], since, now, None, None, now);
            let a = rows.iter().find(|row| row.dims.tenant == "a").unwrap();
            assert_eq!(a.total.gpu_ms, 7_320_000);
            // 3.93 × 7320 / 3600 = 7.991 → $7.991000
            assert_eq!(micro_usd(a.total.cost_exact), 7_991_000);
            assert_eq!(a.total.allocations, 1);
            assert!((a.total.energy_joules - 1000.0).abs() < 1e-6);
            assert!((a.total.util_weighted / a.total.util_weight - 50.0).abs() < 1e-9);
            let (all, _) = r.query(&[], since, now, None, None, now);
            assert_eq!(all.len(), 1);
            assert_eq!(all[0].total.gpu_ms, 7_321_000);
            let (only_a, _) = r.query(&[], since, now, None, Some("a"), now);
            assert_eq!(only_a[0].total.gpu_ms, 7_320_000, "tenant filter");
            let (nobody, _) = r.query(&[], since, now, None, Some("zz"), now);
            assert!(nobody.is_empty());
        }
        let (series, width) = r.query(
            &[UsageDimension::Generation],
            499 * DAY,
            now,
            Some(HOUR),
            None,
            now,
        );
        assert_eq!(width, MINUTE);
        let hopper = series.iter().find(|row| row.dims.generation == 6).unwrap();
        let hours: Vec<u64> = hopper.series.values().map(|c| c.gpu_ms).collect();
        assert_eq!(hours, vec![60_000, 7_200_000, 60_000]);
    }

    #[test]
    fn an_allocation_shorter_than_a_millisecond_still_counts() {
        let mut r = Rollups::new([2 * DAY, 90 * DAY, 3650 * DAY]);
        let now = 500 * DAY;
        let at = 499 * DAY * 1000 + 1234;
        for (start, end) in [(at, at), (at, at + 60_000)] {
            r.add(
                &Contribution {
                    dims: dims("a", 6),
                    start_ms: start,
                    end_ms: end,
                    gpus: 2,
                    prices: vec![(start, 3_930_000)],
                    mean_util: None,
                    energy_joules: None,
                    ..Default::default()
                },
                now,
            );
        }
        for since in [499 * DAY, 440 * DAY, 100 * DAY] {
            let (all, _) = r.query(&[], since, now, None, None, now);
            assert_eq!(all.len(), 1);
            assert_eq!(all[0].total.allocations, 2, "since {since}");
            assert_eq!(all[0].total.gpu_ms, 120_000);
        }
        // Past every retention: not counted at all.
        let mut old = Rollups::new([2 * DAY, 90 * DAY, 3650 * DAY]);
        old.add(
            &Contribution {
                dims: dims("a", 6),
                start_ms: 1000,
                end_ms: 1000,
                gpus: 1,
                prices: vec![(1000, 1)],
                mean_util: None,
                energy_joules: None,
                ..Default::default()
            },
            now * 10,
        );
        assert!(
            old.query(&[], 0, now * 10, None, None, now * 10)
                .0
                .is_empty()
        );
    }

    #[test]
    fn long_ranges_mix_granularities_without_double_counting() {
        let mut r = Rollups::new([2 * DAY, 90 * DAY, 3650 * DAY]);
        let now = 1000 * DAY;
        // One record per day for 400 days, 1 GPU-hour each.
        for d in 0..400 {
            let start = (now - 400 * DAY + d * DAY + 3600) * 1000;
            r.add(
                &Contribution {
                    dims: dims("a", 6),
                    start_ms: start,
                    end_ms: start + 3_600_000,
                    gpus: 1,
                    prices: vec![(start, 1_000_000)],
                    mean_util: None,
                    energy_joules: None,
                    ..Default::default()
                },
                now,
            );
        }
        for back in [365, 100, 31, 7] {
            let (rows, _) = r.query(&[], now - back * DAY, now, None, None, now);
            assert_eq!(rows[0].total.gpu_ms, back * 3_600_000, "{back} days");
            assert_eq!(rows[0].total.allocations as u64, back);
        }
        let (rows, _) = r.query(
            &[UsageDimension::Tenant],
            now - 100 * DAY,
            now,
            Some(DAY),
            None,
            now,
        );
        assert_eq!(
            rows[0].series.len(),
            100,
            "daily series never uses 30-day buckets"
        );
    }

    #[test]
    fn prune_drops_old_buckets() {
        let mut r = Rollups::new([2 * DAY, 90 * DAY, 3650 * DAY]);
        let c = Contribution {
            dims: dims("a", 6),
            start_ms: 0,
            end_ms: 60_000,
            gpus: 1,
            prices: vec![(0, 1)],
            mean_util: None,
            energy_joules: None,
            ..Default::default()
        };
        r.add(&c, 60);
        r.prune(100 * DAY);
        assert!(r.grans[0].buckets.is_empty() && r.grans[1].buckets.is_empty());
        assert_eq!(r.grans[2].buckets.len(), 1);
        assert_eq!(r.grans[3].buckets.len(), 1);
    }
}
