//! `telemetry-history`: what one GPU's history query costs the store, with
//! the rollups keyed minute first (`telemetry.v3`, what the controller
//! writes) against the same records keyed node first (`telemetry.v2`, what
//! it wrote before), in the same run.
//!
//! Data: `--nodes` nodes × 8 GPUs reporting every minute of `--days` days,
//! written through the controller's own `SledRollupStore::merge` into a
//! fresh store opened as the controller opens it (its cache included). The
//! node-first copy holds the same records under node-first keys, read
//! through the controller's upgrade path (`with_node_first`). Queries: one
//! GPU of a random node over the last hour, day and week
//! (`RollupStore::range`, what `GetHistory` reads before bucketing), and
//! all 8 GPUs of the node read together (`RollupStore::range_gpus`, what
//! `GetHistory` does for GPUs of one node) and one by one (what it did
//! before); each the median of `--queries` runs, a different node each
//! time.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use gpufleet_controller::store::SledStore;
use gpufleet_controller::telemetry::{
    FinishedRollup, NODE_FIRST_ROLLUP_TREE, NodeMinute, ROLLUP_TREE, Rollup, RollupStore,
    SledRollupStore,
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

/// `<node id length: 4 bytes BE><node id><minute: 8 bytes BE>`, the
/// documented key of `telemetry.v2` (docs/telemetry.md).
fn node_first_key(node: &[u8], minute: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(12 + node.len());
    key.extend_from_slice(&(node.len() as u32).to_be_bytes());
    key.extend_from_slice(node);
    key.extend_from_slice(&minute.to_be_bytes());
    key
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

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes > 0, "--nodes must be at least 1");
    anyhow::ensure!(args.days > 0, "--days must be at least 1");
    let minutes = args.days * 24 * 60;
    let end = 1_800_000_000 / 60;
    let start = end - minutes;
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let store = SledStore::open(dir.path()).context("opening the store")?;
    let minute_first = SledRollupStore::new(store.open_tree(ROLLUP_TREE)?);
    let node_first_tree = store.open_tree(NODE_FIRST_ROLLUP_TREE)?;

    println!(
        "telemetry-history: {} nodes x {GPUS_PER_NODE} GPUs, every minute of {} days ({} node-minute records), {} queries per range",
        args.nodes,
        args.days,
        args.nodes as u64 * minutes,
        args.queries
    );
    let started = Instant::now();
    let node_ids: Vec<Arc<str>> = (0..args.nodes).map(|n| node_id(n).into()).collect();
    let uuids: Vec<Vec<Arc<str>>> = (0..args.nodes)
        .map(|n| (0..GPUS_PER_NODE).map(|g| uuid(n, g).into()).collect())
        .collect();
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
        let records = NodeMinute::group(&finished);
        minute_first.merge(&records)?;
        let mut batch = sled::Batch::default();
        for record in &records {
            batch.insert(
                node_first_key(record.node_id.as_bytes(), record.minute),
                record.record.clone(),
            );
        }
        node_first_tree.apply_batch(batch)?;
    }
    node_first_tree.flush()?;
    let written = started.elapsed();
    let node_first = SledRollupStore::new(store.open_tree("telemetry.bench-empty")?)
        .with_node_first(node_first_tree);

    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut rows = Vec::new();
    let mut summary = serde_json::Map::new();
    let node_uuids =
        |node: usize| -> Vec<String> { (0..GPUS_PER_NODE).map(|g| uuid(node, g)).collect() };
    for (name, span) in [("1 hour", 60), ("1 day", 24 * 60), ("7 days", 7 * 24 * 60)] {
        let span = span.min(minutes);
        let from = end - span;
        let key = name.replace(' ', "_");
        // One GPU.
        let gpu = |node: usize| uuid(node, 3);
        let (new_ms, new_rows) = median_ms(&mut rng, args.nodes, args.queries, |node| {
            Ok(minute_first
                .range(&node_id(node), &gpu(node), from, end)?
                .len())
        })?;
        let (old_ms, old_rows) = median_ms(&mut rng, args.nodes, args.queries, |node| {
            Ok(node_first
                .range(&node_id(node), &gpu(node), from, end)?
                .len())
        })?;
        anyhow::ensure!(
            new_rows == span as usize && old_rows == span as usize,
            "a {name} query returned {new_rows} and {old_rows} minutes, not {span}"
        );
        let ratio = new_ms / old_ms.max(1e-9);
        rows.push(vec![
            name.to_string(),
            "1".to_string(),
            new_rows.to_string(),
            format!("{new_ms:.2}"),
            "-".to_string(),
            format!("{old_ms:.2}"),
            format!("{ratio:.2}"),
        ]);
        summary.insert(format!("minute_first_{key}_ms"), new_ms.into());
        summary.insert(format!("node_first_{key}_ms"), old_ms.into());
        summary.insert(format!("ratio_{key}"), ratio.into());

        // A whole node: its GPUs read together (what GetHistory does for
        // GPUs of one node), and one at a time (what it did before).
        let together = |store: &SledRollupStore, node: usize| -> anyhow::Result<usize> {
            let uuids = node_uuids(node);
            let uuids: Vec<&str> = uuids.iter().map(String::as_str).collect();
            let series = store.range_gpus(&node_id(node), &uuids, from, end)?;
            Ok(series.iter().map(Vec::len).sum())
        };
        let (node_new_ms, node_new_rows) = median_ms(&mut rng, args.nodes, args.queries, |node| {
            together(&minute_first, node)
        })?;
        let (node_each_ms, node_each_rows) =
            median_ms(&mut rng, args.nodes, args.queries, |node| {
                let mut rows = 0;
                for uuid in node_uuids(node) {
                    rows += minute_first.range(&node_id(node), &uuid, from, end)?.len();
                }
                Ok(rows)
            })?;
        let (node_old_ms, node_old_rows) = median_ms(&mut rng, args.nodes, args.queries, |node| {
            together(&node_first, node)
        })?;
        let expected = span as usize * GPUS_PER_NODE;
        anyhow::ensure!(
            [node_new_rows, node_each_rows, node_old_rows] == [expected; 3],
            "a {name} query of a whole node returned {node_new_rows}, {node_each_rows} and {node_old_rows} GPU-minutes, not {expected}"
        );
        let node_ratio = node_new_ms / node_old_ms.max(1e-9);
        rows.push(vec![
            name.to_string(),
            GPUS_PER_NODE.to_string(),
            expected.to_string(),
            format!("{node_new_ms:.2}"),
            format!("{node_each_ms:.2}"),
            format!("{node_old_ms:.2}"),
            format!("{node_ratio:.2}"),
        ]);
        summary.insert(format!("minute_first_node_{key}_ms"), node_new_ms.into());
        summary.insert(
            format!("minute_first_gpu_by_gpu_node_{key}_ms"),
            node_each_ms.into(),
        );
        summary.insert(format!("node_first_node_{key}_ms"), node_old_ms.into());
        summary.insert(format!("ratio_node_{key}"), node_ratio.into());
    }
    println!(
        "written in {:.1} s (both layouts); RSS {:.0} MiB",
        written.as_secs_f64(),
        report::rss_bytes() as f64 / (1 << 20) as f64
    );
    println!();
    report::table(
        &[
            "range",
            "GPUs",
            "GPU-minutes",
            "minute first (ms, median)",
            "minute first, GPU by GPU",
            "node first (ms, median)",
            "ratio",
        ],
        &rows,
    );
    summary.insert("bench".into(), "telemetry-history".into());
    summary.insert("nodes".into(), args.nodes.into());
    summary.insert("days".into(), args.days.into());
    summary.insert("queries".into(), args.queries.into());
    println!("{}", serde_json::Value::Object(summary));
    Ok(())
}
