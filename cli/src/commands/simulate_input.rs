//! Inputs of `gpufleet simulate` that come from a live fleet: its node list
//! (`gpufleet -o json nodes list`) and its usage history (`gpufleet usage
//! export`), read from their protobuf JSON and converted into the
//! simulator's plain types. The conversion rules are the scheduler's
//! (`gpufleet_scheduler::sim::history`); this file only reads and maps
//! wire values.

use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::Path;

use anyhow::Context;
use gpufleet_proto::v1::{
    GpuGeneration, JobConstraints, ListNodesResponse, MarketPricesResponse, UsageRecord,
};
use gpufleet_scheduler::Generation;
use gpufleet_scheduler::sim::history::HistoryRecord;
use gpufleet_scheduler::sim::{PriceStep, SimNode};

use crate::output;

/// Largest `--fleet` file read (a 125,000-node fleet's JSON is well below).
pub const MAX_FLEET_BYTES: u64 = 512 << 20;
/// Most records one `--history` file may hold (a busy fleet's month).
pub const MAX_HISTORY_RECORDS: usize = 10_000_000;
/// Longest line of a `--history` file (one record with its constraints).
pub const MAX_HISTORY_LINE_BYTES: usize = 1 << 20;
/// GPUs per simulated node (the simulator's per-node masks).
const MAX_NODE_GPUS: usize = 32;

/// Largest `--prices` file read (`gpufleet market prices -o json`).
pub const MAX_PRICES_BYTES: u64 = 256 << 20;
/// Largest openb `--nodes` or `--pods` file read (the published pod list is
/// about 1.5 MB; ten million pods fit).
pub const MAX_TRACE_BYTES: u64 = 1 << 30;

/// A whole file as text, at most `max` bytes: what it says is only believed
/// after reading (a pipe or a device reports no size).
pub fn read_bounded(flag: &str, path: &Path, max: u64, fix: &str) -> anyhow::Result<String> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)
        .with_context(|| format!("{flag}: cannot read {}", path.display()))?;
    let mut text = String::new();
    file.take(max + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("{flag}: cannot read {} as UTF-8 text", path.display()))?;
    if text.len() as u64 > max {
        anyhow::bail!(
            "{flag} {}: over the {max}-byte limit (docs/limits.md); {fix}",
            path.display()
        );
    }
    Ok(text)
}
/// Most price changes one replay applies (over all nodes).
pub const MAX_PRICE_STEPS: usize = 10_000_000;

/// The prices of a `gpufleet market prices -o json` answer (the prices in
/// force and their history) as each node's price over the replay, resolved
/// as the controller resolves them (`gpufleet_controller::pricing::PriceBook`:
/// the most specific key matching the node's provider, region and model,
/// else the node's own price). Virtual time 0 is `start_ms` (Unix ms; a
/// history replay's earliest submit), or else the earliest recorded
/// change. Sets each node's price at time 0; returns the later changes
/// (each at the next whole virtual second) and notes.
pub fn read_prices(
    path: &Path,
    nodes: &mut [SimNode],
    start_ms: Option<u64>,
) -> anyhow::Result<(Vec<PriceStep>, Vec<String>)> {
    use gpufleet_controller::pricing::{Change, Current, NodePriceKey, PriceBook, PriceKey};
    let text = read_bounded(
        "--prices",
        path,
        MAX_PRICES_BYTES,
        "export a shorter range with `gpufleet -o json market prices --since 30d`",
    )?;
    let response: MarketPricesResponse = output::from_json(&text).with_context(|| {
        format!(
            "--prices {}: not the output of `gpufleet -o json market prices`",
            path.display()
        )
    })?;
    if response.current.is_empty() && response.history.is_empty() {
        anyhow::bail!(
            "--prices {}: no prices (neither prices in force nor changes); export them with `gpufleet -o json market prices --since 30d`",
            path.display()
        );
    }
    let ms = |t: &prost_types::Timestamp| {
        t.seconds.max(0) as u64 * 1000 + (t.nanos.max(0) as u64) / 1_000_000
    };
    let current = response
        .current
        .iter()
        .filter_map(|e| {
            Some((
                PriceKey::from_proto(e.key.as_ref()?),
                Current {
                    price: e.price_per_gpu_hour_micro_usd,
                    source: e.source.clone(),
                    since_ms: e.since.as_ref().map_or(0, ms),
                },
            ))
        })
        .collect();
    let history: Vec<Change> = response.history.iter().map(Change::from_proto).collect();
    let start = start_ms.unwrap_or_else(|| history.iter().map(|c| c.at_ms).min().unwrap_or(0));
    let book = PriceBook::new(Vec::new(), current, history);
    let mut steps = Vec::new();
    let mut priced = 0usize;
    for (i, node) in nodes.iter_mut().enumerate() {
        let key = NodePriceKey {
            provider: node.provider.clone(),
            region: node.region.clone(),
            model: node.model.clone(),
            instance_type: String::new(),
            spot: false,
        };
        let timeline = book.timeline(&key, start, u64::MAX, node.price_per_gpu_hour_micro_usd);
        if timeline.len() > 1
            || timeline.first().map(|(_, p)| *p) != Some(node.price_per_gpu_hour_micro_usd)
        {
            priced += 1;
        }
        if let Some(&(_, price)) = timeline.first() {
            node.price_per_gpu_hour_micro_usd = price;
        }
        for &(at, price) in timeline.iter().skip(1) {
            if steps.len() == MAX_PRICE_STEPS {
                anyhow::bail!(
                    "--prices {}: over {MAX_PRICE_STEPS} price changes across the fleet; export a shorter range (--since)",
                    path.display()
                );
            }
            steps.push(PriceStep {
                at: (at - start).div_ceil(1000),
                node: i as u32,
                price_per_gpu_hour_micro_usd: price,
            });
        }
    }
    let from = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(start),
    );
    let notes = vec![format!(
        "prices: {} price changes on {priced} of {} nodes replayed from {from} (virtual time 0)",
        steps.len(),
        nodes.len()
    )];
    Ok((steps, notes))
}

/// A wire generation as the scheduler's.
pub fn generation(wire: i32) -> Generation {
    match GpuGeneration::try_from(wire).unwrap_or(GpuGeneration::Unspecified) {
        GpuGeneration::Unspecified => Generation::Unspecified,
        GpuGeneration::Pascal => Generation::Pascal,
        GpuGeneration::Volta => Generation::Volta,
        GpuGeneration::Turing => Generation::Turing,
        GpuGeneration::Ampere => Generation::Ampere,
        GpuGeneration::Ada => Generation::Ada,
        GpuGeneration::Hopper => Generation::Hopper,
        GpuGeneration::Blackwell => Generation::Blackwell,
    }
}

/// The GPU catalogue as `--add` may name it: (model, generation).
pub fn catalogue() -> Vec<(&'static str, Generation)> {
    gpufleet_core::catalog::MODELS
        .iter()
        .map(|m| (m.model, generation(m.generation as i32)))
        .collect()
}

/// The nodes of a `gpufleet -o json nodes list` answer, plus notes on what
/// was changed: every node counts whatever its state (the question is what
/// the fleet could do), nodes without GPUs are left out, a node of mixed
/// models counts as its most common one, and at most 32 GPUs per node.
pub fn read_fleet(path: &Path) -> anyhow::Result<(Vec<SimNode>, Vec<String>)> {
    let text = read_bounded(
        "--fleet",
        path,
        MAX_FLEET_BYTES,
        "give the output of `gpufleet -o json nodes list`",
    )?;
    let list: ListNodesResponse = output::from_json(&text).with_context(|| {
        format!(
            "--fleet {}: not the output of `gpufleet -o json nodes list`",
            path.display()
        )
    })?;
    let (mut no_gpus, mut mixed, mut clamped, mut spot) = (0u64, 0u64, 0u64, 0u64);
    let mut nodes = Vec::with_capacity(list.nodes.len());
    for node in &list.nodes {
        let identity = node.identity.clone().unwrap_or_default();
        // MIG-enabled GPUs count whole: the simulator places whole GPUs and shares.
        let infos: Vec<_> = node.gpus.iter().filter_map(|g| g.info.as_ref()).collect();
        if infos.is_empty() {
            no_gpus += 1;
            continue;
        }
        let mut by_model: BTreeMap<&str, (usize, i32)> = BTreeMap::new();
        for info in &infos {
            by_model
                .entry(info.model.as_str())
                .or_insert((0, info.generation))
                .0 += 1;
        }
        if by_model.len() > 1 {
            mixed += 1;
        }
        let Some((model, (_, generation_wire))) = by_model.iter().max_by_key(|(_, (n, _))| *n)
        else {
            continue;
        };
        if infos.len() > MAX_NODE_GPUS {
            clamped += 1;
        }
        // The simulator has no spot capacity: such a node serves every job.
        if identity.spot {
            spot += 1;
        }
        nodes.push(SimNode {
            id: identity.node_id,
            model: if model.is_empty() {
                "unknown".to_string()
            } else {
                (*model).to_string()
            },
            generation: generation(*generation_wire),
            gpus: infos.len().min(MAX_NODE_GPUS) as u32,
            price_per_gpu_hour_micro_usd: identity.price_per_gpu_hour_micro_usd,
            provider: identity.provider,
            region: identity.region,
        });
    }
    let mut notes = Vec::new();
    if no_gpus > 0 {
        notes.push(format!(
            "{no_gpus} nodes without GPUs left out of the fleet"
        ));
    }
    if mixed > 0 {
        notes.push(format!(
            "{mixed} nodes of mixed GPU models counted as their most common model"
        ));
    }
    if clamped > 0 {
        notes.push(format!("{clamped} nodes of over 32 GPUs counted as 32"));
    }
    if spot > 0 {
        notes.push(format!(
            "{spot} spot nodes replayed as on-demand capacity (any job may use them)"
        ));
    }
    Ok((nodes, notes))
}

fn ts_ms(ts: Option<&prost_types::Timestamp>) -> Option<u64> {
    let ts = ts?;
    let ms = ts.seconds.checked_mul(1000)? + i64::from(ts.nanos / 1_000_000);
    u64::try_from(ms).ok()
}

/// The simulator's terms for one exported record.
pub fn history_record(record: &UsageRecord) -> anyhow::Result<HistoryRecord> {
    let started = ts_ms(record.started_at.as_ref()).context("no started_at")?;
    let ended = ts_ms(record.ended_at.as_ref()).context("no ended_at")?;
    let c: JobConstraints = record.job_constraints.clone().unwrap_or_default();
    let mut generations: Vec<Generation> = c.generations.iter().map(|&g| generation(g)).collect();
    if c.min_generation != 0 {
        let min = generation(c.min_generation);
        generations.extend(Generation::ALL.into_iter().filter(|g| *g >= min));
    }
    generations.retain(|g| *g != Generation::Unspecified);
    generations.sort();
    generations.dedup();
    let unmodelled = !c.providers.is_empty()
        || !c.regions.is_empty()
        || !c.exclude_providers.is_empty()
        || !c.exclude_regions.is_empty()
        || c.max_price_per_gpu_hour_micro_usd.is_some()
        || c.min_gpu_memory_bytes > 0
        || c.min_compute_capability_major > 0
        || c.require_nvlink
        || c.allow_spot
        || c.spot != 0;
    Ok(HistoryRecord {
        job_id: record.job_id.clone(),
        task_index: record.task_index,
        tenant: record.tenant.clone(),
        priority: record.job_priority,
        submitted_ms: ts_ms(record.job_submitted_at.as_ref()),
        started_ms: started,
        ended_ms: ended.max(started),
        gpus: record.gpu_count,
        share_milli: record.gpu_share_milli,
        mig: !record.mig_profile.is_empty(),
        tasks: record.job_tasks,
        models: c.models,
        generations,
        unmodelled_constraints: unmodelled,
        preemptible: record.job_preemptible,
    })
}

/// The finished records of a `gpufleet usage export` file (JSON Lines);
/// errors name the line.
pub fn read_history(path: &Path) -> anyhow::Result<Vec<HistoryRecord>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("--history: cannot read {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut records = Vec::new();
    let mut line = String::new();
    let mut number = 0usize;
    loop {
        line.clear();
        // Bounded: a line longer than the limit is an error, not a buffer.
        let read = (&mut reader)
            .take(MAX_HISTORY_LINE_BYTES as u64 + 1)
            .read_line(&mut line)
            .with_context(|| format!("--history {}: line {}", path.display(), number + 1))?;
        if read == 0 {
            break;
        }
        number += 1;
        if line.len() > MAX_HISTORY_LINE_BYTES {
            anyhow::bail!(
                "--history {}: line {number} is over {MAX_HISTORY_LINE_BYTES} bytes; one record per line, as `gpufleet usage export` writes",
                path.display()
            );
        }
        if line.trim().is_empty() {
            continue;
        }
        if records.len() == MAX_HISTORY_RECORDS {
            anyhow::bail!(
                "--history {}: over {MAX_HISTORY_RECORDS} records; export a shorter range (--since/--until)",
                path.display()
            );
        }
        let record: UsageRecord = output::from_json(line.trim()).with_context(|| {
            format!(
                "--history {}: line {number} is not a usage record as `gpufleet usage export` writes",
                path.display()
            )
        })?;
        if record.running {
            continue;
        }
        records.push(
            history_record(&record)
                .with_context(|| format!("--history {}: line {number}", path.display()))?,
        );
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::{GpuInfo, GpuStatus, Node, NodeIdentity};
    use prost_types::Timestamp;

    /// A file is believed only up to the limit, whatever size it reports.
    #[test]
    fn files_are_read_up_to_their_limit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f");
        std::fs::write(&path, "0123456789!").expect("write");
        let err = read_bounded("--prices", &path, 10, "export less").unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("--prices")
                && text.contains("over the 10-byte limit")
                && text.contains("export less"),
            "{text}"
        );
        assert_eq!(
            read_bounded("--prices", &path, 11, "-").expect("fits"),
            "0123456789!"
        );
        let err = read_bounded("--fleet", &dir.path().join("missing"), 10, "-").unwrap_err();
        assert!(
            format!("{err:#}").contains("--fleet: cannot read"),
            "{err:#}"
        );
    }

    fn node(id: &str, models: &[&str]) -> Node {
        Node {
            identity: Some(NodeIdentity {
                node_id: id.into(),
                provider: "aws".into(),
                region: "us-east-1".into(),
                price_per_gpu_hour_micro_usd: 3_930_000,
                spot: id == "c",
                ..Default::default()
            }),
            gpus: models
                .iter()
                .enumerate()
                .map(|(i, m)| GpuStatus {
                    info: Some(GpuInfo {
                        index: i as u32,
                        model: m.to_string(),
                        generation: GpuGeneration::Hopper as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_node_list_becomes_the_fleet() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.json");
        let list = ListNodesResponse {
            nodes: vec![
                node("a", &["H100-SXM-80GB"; 4]),
                node("b", &[]),
                node("c", &["H100-SXM-80GB", "H100-SXM-80GB", "H100-PCIE-80GB"]),
            ],
            next_page_token: String::new(),
        };
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&output::to_json(&list).unwrap()).unwrap(),
        )
        .unwrap();
        let (nodes, notes) = read_fleet(&path).unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(
            (
                nodes[0].id.as_str(),
                nodes[0].gpus,
                nodes[0].provider.as_str(),
                nodes[0].price_per_gpu_hour_micro_usd
            ),
            ("a", 4, "aws", 3_930_000)
        );
        assert_eq!(
            (nodes[1].model.as_str(), nodes[1].gpus),
            ("H100-SXM-80GB", 3)
        );
        assert_eq!(nodes[1].generation, Generation::Hopper);
        assert_eq!(
            notes,
            [
                "1 nodes without GPUs left out of the fleet",
                "1 nodes of mixed GPU models counted as their most common model",
                "1 spot nodes replayed as on-demand capacity (any job may use them)"
            ]
        );
        std::fs::write(&path, "{\"nodez\": []}").unwrap();
        let err = format!("{:#}", read_fleet(&path).unwrap_err());
        assert!(
            err.contains("not the output of `gpufleet -o json nodes list`"),
            "{err}"
        );
    }

    #[test]
    fn an_export_becomes_history_records() {
        let record = UsageRecord {
            job_id: "job-1".into(),
            task_index: 1,
            tenant: "ml".into(),
            gpu_count: 2,
            started_at: Some(Timestamp {
                seconds: 100,
                nanos: 500_000_000,
            }),
            ended_at: Some(Timestamp {
                seconds: 200,
                nanos: 0,
            }),
            job_submitted_at: Some(Timestamp {
                seconds: 90,
                nanos: 0,
            }),
            job_tasks: 2,
            job_priority: 5,
            job_constraints: Some(JobConstraints {
                models: vec!["H100-SXM-80GB".into()],
                min_generation: GpuGeneration::Hopper as i32,
                regions: vec!["eu-north1".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let running = UsageRecord {
            running: true,
            ..record.clone()
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        let text = format!(
            "{}\n\n{}\n",
            output::json_line(&record).unwrap(),
            output::json_line(&running).unwrap()
        );
        std::fs::write(&path, text).unwrap();
        let records = read_history(&path).unwrap();
        assert_eq!(
            records,
            [HistoryRecord {
                job_id: "job-1".into(),
                task_index: 1,
                tenant: "ml".into(),
                priority: 5,
                submitted_ms: Some(90_000),
                started_ms: 100_500,
                ended_ms: 200_000,
                gpus: 2,
                share_milli: 0,
                mig: false,
                tasks: 2,
                models: vec!["H100-SXM-80GB".into()],
                generations: vec![Generation::Hopper, Generation::Blackwell],
                unmodelled_constraints: true,
                preemptible: false,
            }]
        );
        std::fs::write(&path, "{\"jobId\": \"x\"}\nnot json\n").unwrap();
        let err = format!("{:#}", read_history(&path).unwrap_err());
        assert!(err.contains("line 1"), "{err}");
        assert!(err.contains("no started_at"), "{err}");
        std::fs::write(&path, "not json\n").unwrap();
        let err = format!("{:#}", read_history(&path).unwrap_err());
        assert!(err.contains("line 1 is not a usage record"), "{err}");
        std::fs::write(&path, "x".repeat(MAX_HISTORY_LINE_BYTES + 10)).unwrap();
        let err = format!("{:#}", read_history(&path).unwrap_err());
        assert!(err.contains("line 1 is over 1048576 bytes"), "{err}");
    }
}
