//! `store-growth`: what the controller's store keeps in memory for each
//! finished job it retains, once its page cache is full, and whether that
//! memory stays level once retention deletes as much as is written.
//!
//! Phase 1 writes `--jobs` finished jobs through the controller's own store
//! layout (the job record, one usage record and its end index entry: three
//! keys per job; time-ordered job ids need no job indexes) into a `SledStore`
//! with the controller's cache, one flushed batch at a time like the
//! controller, and samples this process's live heap and RSS (after the
//! trim the controller also does). Past the cache the heap still grows with
//! every key: sled keeps bookkeeping in memory for every page, cached or
//! not, and a leaf page holds at most 16 keys. Phase 2 writes as many jobs
//! again while the controller's expiry code (`history::finished_before`,
//! `Ledger::prune`) deletes what ended before a window of `--jobs` jobs, as
//! retention does: the heap should then stay level.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use gpufleet_controller::store::{Keyspace, SledStore, Store, WriteBatch};
use gpufleet_controller::{history, usage};
use gpufleet_proto::v1::{Job, JobSpec, JobState, TaskStatus, WorkloadSpec, WorkloadState};
use serde_json::json;

use crate::report;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Finished jobs to write (1 GPU, one task each).
    #[arg(long, default_value_t = 300_000)]
    jobs: u64,
    /// The store's page cache, e.g. 16MiB [default: the controller's
    /// `store_cache` default].
    #[arg(long)]
    store_cache: Option<String>,
    /// Samples (table rows) over the run.
    #[arg(long, default_value_t = 6)]
    samples: u64,
    /// Jobs per written batch (the controller groups a burst's changes).
    #[arg(long, default_value_t = 100)]
    batch: u64,
}

/// Keys one finished, one-task job leaves in the store.
const KEYS_PER_JOB: u64 = 3;
/// Submissions per (virtual) second, as in `load`.
const JOBS_PER_SEC: u64 = 100;
/// How long each job ran.
const JOB_SECS: u64 = 2;

struct Sample {
    /// Written so far.
    jobs: u64,
    /// Expired so far (phase 2).
    expired: u64,
    heap: u64,
    rss: u64,
    disk: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.jobs > 0, "--jobs must be at least 1");
    anyhow::ensure!(
        args.samples >= 2 && args.samples <= args.jobs,
        "--samples must be between 2 and --jobs"
    );
    anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
    let cache = match &args.store_cache {
        Some(text) => {
            gpufleet_core::parse_size(text).map_err(|e| anyhow::anyhow!("--store-cache: {e}"))?
        }
        None => gpufleet_controller::store::DEFAULT_CACHE_BYTES,
    };
    let dir = tempfile::tempdir()?;
    let store = SledStore::open_with_cache(dir.path(), cache).context("opening the store")?;
    println!(
        "store-growth: {} finished 1-GPU jobs ({KEYS_PER_JOB} keys each) into a sled store with a {:.1} MiB cache, batches of {}, then as many again under retention",
        args.jobs,
        mib(cache),
        args.batch
    );

    let started = Instant::now();
    let base = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1_800_000_000, |d| d.as_secs());
    let every = args.jobs.div_ceil(args.samples);
    // Phase 2 keeps `--jobs` retained: the controller's own expiry code
    // deletes what ended before the window, as retention does.
    let window_secs = args.jobs / JOBS_PER_SEC;
    let mut ledger = usage::Ledger::new(usage::Retention {
        records: window_secs,
        ..usage::Retention::default()
    });
    let node = usage::NodeFacts {
        zone: "us-east-1a".into(),
        spot: false,
        ..Default::default()
    };
    let mut samples = vec![sample(0, 0, dir.path())];
    let mut written = 0u64;
    let mut expired = 0u64;
    let mut expiry = history::ExpiryCursor::default();
    while written < 2 * args.jobs {
        let mut batch = WriteBatch::default();
        let end = (written + args.batch).min(2 * args.jobs);
        for n in written..end {
            let (job, task) = finished_job(base + n / JOBS_PER_SEC, n);
            batch.put(Keyspace::Jobs, &job.id, &job);
            history::index(&mut batch, None, &job);
            let record = usage::build_record(&job, &task, &node, None, 0)
                .context("a started task has a usage record")?;
            usage::put_record(&mut batch, &record);
        }
        if end > args.jobs {
            let now_secs = base + end / JOBS_PER_SEC + JOB_SECS;
            let cutoff = now_secs - window_secs;
            let limit = 10 * args.batch as usize;
            for entry in history::finished_before(&store, cutoff, limit, &|_| false, &mut expiry)? {
                history::delete(&mut batch, &entry);
                expired += 1;
            }
            ledger.prune(&store, &mut batch, now_secs, limit)?;
        }
        store.apply(batch)?;
        let crossed = end / every > written / every;
        written = end;
        if crossed || written == 2 * args.jobs {
            samples.push(sample(written, expired, dir.path()));
        }
    }
    let elapsed = started.elapsed();

    // Phase 1's growth per job from its first sample with more on disk than
    // twice the cache: by then every page written since is beyond it.
    let growing_end = samples
        .iter()
        .rposition(|s| s.jobs <= args.jobs)
        .unwrap_or(0);
    let full = samples[..=growing_end]
        .iter()
        .position(|s| s.disk > 2 * cache && s.jobs > 0)
        .filter(|&i| i < growing_end);
    let per_job = |field: fn(&Sample) -> u64, from: usize, to: usize| {
        let (a, b) = (&samples[from], &samples[to]);
        (field(b) as f64 - field(a) as f64) / (b.jobs - a.jobs) as f64
    };

    let mut rows = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let delta = |field: fn(&Sample) -> u64| {
            if i == 0 {
                "-".to_string()
            } else {
                format!("{:.0}", per_job(field, i - 1, i))
            }
        };
        rows.push(vec![
            s.jobs.to_string(),
            s.expired.to_string(),
            (s.jobs - s.expired).to_string(),
            format!("{:.1}", mib(s.disk)),
            format!("{:.1}", mib(s.heap)),
            format!("{:.1}", mib(s.rss)),
            delta(|s| s.heap),
            delta(|s| s.rss),
        ]);
    }
    report::table(
        &[
            "jobs written",
            "expired",
            "stored",
            "on disk (MiB)",
            "live heap (MiB)",
            "RSS after trim (MiB)",
            "heap B/job written",
            "RSS B/job written",
        ],
        &rows,
    );
    println!();
    let (heap_per_job, rss_per_job) = match full {
        Some(from) => {
            let heap = per_job(|s| s.heap, from, growing_end);
            let rss = per_job(|s| s.rss, from, growing_end);
            println!(
                "growing store, past the cache (from {} to {} jobs): the live heap grows {heap:.0} B per stored job ({:.1} B per key), RSS {rss:.0} B",
                samples[from].jobs,
                samples[growing_end].jobs,
                heap / KEYS_PER_JOB as f64
            );
            (Some(heap), Some(rss))
        }
        None => {
            println!(
                "the store never held twice its cache: write more jobs (--jobs) or use a smaller --store-cache"
            );
            (None, None)
        }
    };
    let last = samples.len() - 1;
    let steady_heap = samples[last].heap as f64 - samples[growing_end].heap as f64;
    let steady_rss = samples[last].rss as f64 - samples[growing_end].rss as f64;
    println!(
        "{} jobs retained while {} more were written and as many expired: live heap {:+.1} MiB, RSS {:+.1} MiB",
        args.jobs,
        args.jobs,
        steady_heap / (1 << 20) as f64,
        steady_rss / (1 << 20) as f64,
    );
    println!(
        "{} jobs written in {:.1} s ({:.0} jobs/s, each batch flushed)",
        2 * args.jobs,
        elapsed.as_secs_f64(),
        (2 * args.jobs) as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    let round = |v: Option<f64>| v.map(|v| v.round());
    let mib1 = |bytes: f64| (bytes / (1 << 20) as f64 * 10.0).round() / 10.0;
    println!(
        "{}",
        json!({
            "bench": "store-growth",
            "jobs": args.jobs,
            "keys_per_job": KEYS_PER_JOB,
            "store_cache_bytes": cache,
            "heap_bytes_per_stored_job": round(heap_per_job),
            "heap_bytes_per_key": heap_per_job.map(|v| (v / KEYS_PER_JOB as f64 * 10.0).round() / 10.0),
            "rss_bytes_per_stored_job": round(rss_per_job),
            "heap_mib_at_retention": mib1(samples[growing_end].heap as f64),
            "heap_mib_change_under_retention": mib1(steady_heap),
            "rss_mib_change_under_retention": mib1(steady_rss),
            "seconds": (elapsed.as_secs_f64() * 10.0).round() / 10.0,
        })
    );
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn sample(jobs: u64, expired: u64, dir: &std::path::Path) -> Sample {
    // What the controller's periodic trim would leave resident.
    gpufleet_controller::memory::release_free_memory();
    Sample {
        jobs,
        expired,
        heap: crate::heap_bytes() as u64,
        rss: report::rss_bytes(),
        disk: dir_bytes(dir),
    }
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A finished one-task job as the controller stores it, and its task.
fn finished_job(submitted_secs: u64, n: u64) -> (Job, TaskStatus) {
    let submitted = UNIX_EPOCH + Duration::from_secs(submitted_secs);
    let id = history::new_job_id(submitted, (n as u32).wrapping_mul(2_654_435_761));
    let ts = |secs: u64| prost_types::Timestamp {
        seconds: secs as i64,
        nanos: ((n % 100) * 10_000_000) as i32,
    };
    let task = TaskStatus {
        index: 0,
        allocation_id: format!("{id}.0"),
        node_id: format!("node-{:04}", n % 1000),
        gpu_uuids: vec![format!(
            "GPU-{:08x}-0000-0000-0000-{:012x}",
            n % 1000,
            n % 8
        )],
        state: WorkloadState::Succeeded as i32,
        started_at: Some(ts(submitted_secs)),
        finished_at: Some(ts(submitted_secs + JOB_SECS)),
        provider: ["aws", "azure", "coreweave", "lambda", "nebius"][(n % 5) as usize].into(),
        region: format!("region-{}", n % 12),
        generation: 6,
        model: "H100-SXM-80GB".into(),
        price_per_gpu_hour_micro_usd: 2_500_000,
        exit_code: Some(0),
        ..Default::default()
    };
    let job = Job {
        id,
        spec: Some(JobSpec {
            tenant: format!("tenant-{:02}", n % 20),
            tasks: 1,
            gpus_per_task: 1,
            workload: Some(WorkloadSpec {
                argv: vec!["true".into()],
                ..Default::default()
            }),
            workload_class: "batch".into(),
            ..Default::default()
        }),
        state: JobState::Succeeded as i32,
        created_at: Some(ts(submitted_secs)),
        finished_at: Some(ts(submitted_secs + JOB_SECS)),
        tasks: vec![task.clone()],
        ..Default::default()
    };
    (job, task)
}
