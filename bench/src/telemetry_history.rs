//! `telemetry-history`: what a history query costs the store, with the
//! rollups in segment files (`SegmentRollupStore`, what the controller
//! writes) against the same records in sled keyed minute first
//! (`telemetry.v3`, what it wrote before), in the same run.
//!
//! Data: `--nodes` nodes × 8 GPUs reporting every minute of `--days` days,
//! written through each store's own `merge` in the controller's chunks of
//! at most 100 node-minutes, into a fresh directory opened as the
//! controller opens it (sled's cache included). Queries: one GPU of a
//! random node over the last hour, day and week (`RollupStore::range`,
//! what `GetHistory` reads before bucketing), and all 8 GPUs of the node
//! read together (`RollupStore::range_gpus`, what `GetHistory` does for
//! GPUs of one node); each the median of `--queries` runs, a different
//! node each time.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use gpufleet_controller::store::SledStore;
use gpufleet_controller::telemetry::segments::{ROLLUP_DIR, SegmentRollupStore};
use gpufleet_controller::telemetry::{
    FinishedRollup, NodeMinute, ROLLUP_TREE, Rollup, RollupStore, SledRollupStore,
};
use gpufleet_proto::v1::GpuSample;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::report;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Nodes (8 GPUs each) reporting every minute.
    #[arg(long, default_value_t = 20)]
    nodes: usize,
    /// Days of minutes stored.
    #[arg(long, default_value_t = 7)]
    days: u64,
    /// Queries per range, each on a random node.
    #[arg(long, default_value_t = 50)]
    queries: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

const GPUS_PER_NODE: usize = 8;

fn uuid(node: usize, gpu: usize) -> String {
    format!("GPU-{node:08x}-0000-4000-8000-{gpu:012x}")
}

fn node_id(node: usize) -> String {
    format!("node-{node:05}")
}

/// Median milliseconds of `queries` runs of `query` on a random node, and
/// the rows the last returned.
fn median_ms(
    rng: &mut StdRng,
    nodes: usize,
    queries: usize,
    mut query: impl FnMut(usize) -> anyhow::Result<usize>,
) -> anyhow::Result<(f64, usize)> {
    let mut times = Vec::with_capacity(queries);
    let mut rows = 0;
    for _ in 0..queries.max(1) {
        let node = rng.random_range(0..nodes);
        let started = Instant::now();
        rows = query(node)?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], rows))
}

/// Bytes of the files under `path`.
fn disk_bytes(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The controller writes at most this many node-minutes per `merge`.
const CHUNK: usize = 100;

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes > 0, "--nodes must be at least 1");
    anyhow::ensure!(args.days > 0, "--days must be at least 1");
    let minutes = args.days * 24 * 60;
    let end = 1_800_000_000 / 60;
    let start = end - minutes;
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let store = SledStore::open(&dir.path().join("sled")).context("opening the store")?;
    let sled_store = SledRollupStore::new(store.open_tree(ROLLUP_TREE)?);
    let segments = SegmentRollupStore::open(&dir.path().join(ROLLUP_DIR))
        .context("opening the segment files")?;

    println!(
        "telemetry-history: {} nodes x {GPUS_PER_NODE} GPUs, every minute of {} days ({} node-minute records), {} queries per range",
        args.nodes,
        args.days,
        args.nodes as u64 * minutes,
        args.queries
    );
    let node_ids: Vec<Arc<str>> = (0..args.nodes).map(|n| node_id(n).into()).collect();
    let uuids: Vec<Vec<Arc<str>>> = (0..args.nodes)
        .map(|n| (0..GPUS_PER_NODE).map(|g| uuid(n, g).into()).collect())
        .collect();
    let (mut segments_write, mut sled_write) = (0.0, 0.0);
    let mut chunk: Vec<NodeMinute> = Vec::with_capacity(CHUNK + args.nodes);
    for minute in start..end {
        let mut finished = Vec::with_capacity(args.nodes * GPUS_PER_NODE);
        for (n, node) in node_ids.iter().enumerate() {
            for (g, gpu) in uuids[n].iter().enumerate() {
                let mut rollup = Rollup::new(minute);
                rollup.add(&GpuSample {
                    uuid: gpu.to_string(),
                    gpu_utilization_percent: Some(((minute as usize + g) % 101) as u32),
                    power_usage_milliwatts: Some(300_000 + (n as u32 % 100) * 1_000),
                    temperature_celsius: Some(60),
                    memory_used_bytes: Some(40 << 30),
                    ..Default::default()
                });
                finished.push(FinishedRollup {
                    node_id: node.clone(),
                    uuid: gpu.clone(),
                    rollup,
                });
            }
        }
        chunk.extend(NodeMinute::group(&finished));
        if chunk.len() + args.nodes > CHUNK || minute + 1 == end {
            for part in chunk.chunks(CHUNK) {
                let started = Instant::now();
                segments.merge(part)?;
                segments_write += started.elapsed().as_secs_f64();
                let started = Instant::now();
                sled_store.merge(part)?;
                sled_write += started.elapsed().as_secs_f64();
            }
            chunk.clear();
        }
    }

    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut rows = Vec::new();
    let mut summary = serde_json::Map::new();
    let node_uuids =
        |node: usize| -> Vec<String> { (0..GPUS_PER_NODE).map(|g| uuid(node, g)).collect() };
    let stores: [&dyn RollupStore; 2] = [&segments, &sled_store];
    for (name, span) in [("1 hour", 60), ("1 day", 24 * 60), ("7 days", 7 * 24 * 60)] {
        let span = span.min(minutes);
        let from = end - span;
        let key = name.replace(' ', "_");
        for gpus in [1, GPUS_PER_NODE] {
            let mut ms = [0.0; 2];
            for (i, store) in stores.iter().enumerate() {
                let (median, got) = median_ms(&mut rng, args.nodes, args.queries, |node| {
                    let uuids = node_uuids(node);
                    // One GPU is GPU 3; a node is all of them.
                    let uuids: Vec<&str> = if gpus == 1 {
                        vec![uuids[3].as_str()]
                    } else {
                        uuids.iter().map(String::as_str).collect()
                    };
                    let series = store.range_gpus(&node_id(node), &uuids, from, end)?;
                    Ok(series.iter().map(Vec::len).sum())
                })?;
                let expected = span as usize * gpus;
                anyhow::ensure!(
                    got == expected,
                    "a {name} query of {gpus} GPUs returned {got} GPU-minutes, not {expected}"
                );
                ms[i] = median;
            }
            let ratio = ms[0] / ms[1].max(1e-9);
            rows.push(vec![
                name.to_string(),
                gpus.to_string(),
                (span as usize * gpus).to_string(),
                format!("{:.2}", ms[0]),
                format!("{:.2}", ms[1]),
                format!("{ratio:.2}"),
            ]);
            let what = if gpus == 1 { "gpu" } else { "node" };
            summary.insert(format!("segments_{what}_{key}_ms"), ms[0].into());
            summary.insert(format!("sled_{what}_{key}_ms"), ms[1].into());
            summary.insert(format!("ratio_{what}_{key}"), ratio.into());
        }
    }
    drop(segments);
    drop(sled_store);
    drop(store);
    let segments_bytes = disk_bytes(&dir.path().join(ROLLUP_DIR));
    let sled_bytes = disk_bytes(&dir.path().join("sled"));
    println!(
        "written in {segments_write:.1} s to segment files ({:.0} MiB on disk), {sled_write:.1} s to sled ({:.0} MiB); RSS {:.0} MiB",
        segments_bytes as f64 / (1 << 20) as f64,
        sled_bytes as f64 / (1 << 20) as f64,
        report::rss_bytes() as f64 / (1 << 20) as f64
    );
    println!();
    report::table(
        &[
            "range",
            "GPUs",
            "GPU-minutes",
            "segment files (ms, median)",
            "sled minute first (ms, median)",
            "ratio",
        ],
        &rows,
    );
    summary.insert("bench".into(), "telemetry-history".into());
    summary.insert("nodes".into(), args.nodes.into());
    summary.insert("days".into(), args.days.into());
    summary.insert("queries".into(), args.queries.into());
    summary.insert("segments_write_s".into(), segments_write.into());
    summary.insert("sled_write_s".into(), sled_write.into());
    summary.insert("segments_disk_bytes".into(), segments_bytes.into());
    summary.insert("sled_disk_bytes".into(), sled_bytes.into());
    println!("{}", serde_json::Value::Object(summary));
    Ok(())
}
