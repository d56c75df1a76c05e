//! `workload-spawn`: what the workload shim (the extra process that lets
//! workloads outlive the agent) costs. Runs N trivial workloads (`true`)
//! one after another through the agent's real supervisor, each under its
//! shim (this very executable, started as `gpufleet-bench __shim <dir>`),
//! and, as the baseline in the same run, N times the same program spawned
//! directly the way the agent did before shims (own process group, cleared
//! environment, output to a file). Also reports the resident memory of one
//! shim while its workload runs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use gpufleet_agent::{SimulatedBackend, Supervisor, SupervisorSettings};
use gpufleet_proto::v1::{Allocation, WorkloadSpec, WorkloadState};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Workloads per variant.
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// Executable that runs the shims, e.g. target/release/gpufleet-agent
    /// [default: this one].
    #[arg(long)]
    shim: Option<std::path::PathBuf>,
}

struct Figures {
    /// Until the workload runs (spawn returned / supervisor reported Running).
    start: Vec<Duration>,
    /// Until its end is known (wait returned).
    total: Vec<Duration>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn allocation(id: &str, argv: &[&str]) -> Allocation {
    Allocation {
        allocation_id: id.to_string(),
        job_id: "job-bench".to_string(),
        task_index: 0,
        gpu_uuids: Vec::new(),
        workload: Some(WorkloadSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: HashMap::new(),
            working_dir: String::new(),
            stop_grace_period_seconds: 0,
        }),
    }
}

async fn direct(count: usize, dir: &std::path::Path) -> anyhow::Result<Figures> {
    let mut figures = Figures {
        start: Vec::with_capacity(count),
        total: Vec::with_capacity(count),
    };
    for i in 0..count {
        let log = std::fs::File::create(dir.join(format!("direct-{i}.log")))?;
        let t0 = Instant::now();
        let mut child = tokio::process::Command::new("true")
            .process_group(0)
            .env_clear()
            .env("PATH", gpufleet_agent::supervisor::WORKLOAD_PATH)
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot spawn true")?;
        figures.start.push(t0.elapsed());
        let status = child.wait().await?;
        figures.total.push(t0.elapsed());
        anyhow::ensure!(status.success(), "true failed: {status}");
    }
    Ok(figures)
}

fn supervisor(dir: &std::path::Path, shim: Option<&std::path::Path>) -> anyhow::Result<Supervisor> {
    let backend = Arc::new(SimulatedBackend::new("bench", &["1xT4".to_string()])?);
    let mut settings = SupervisorSettings::new(dir.to_path_buf());
    if let Some(shim) = shim {
        settings.shim_program = shim.to_path_buf();
    }
    Ok(Supervisor::new(backend, settings))
}

async fn shimmed(
    count: usize,
    dir: &std::path::Path,
    shim: Option<&std::path::Path>,
) -> anyhow::Result<Figures> {
    let sup = supervisor(dir, shim)?;
    let mut figures = Figures {
        start: Vec::with_capacity(count),
        total: Vec::with_capacity(count),
    };
    for i in 0..count {
        let id = format!("shim-{i}");
        let t0 = Instant::now();
        let started = sup.run_local(allocation(&id, &["true"])).await?;
        figures.start.push(t0.elapsed());
        anyhow::ensure!(
            started.state() == WorkloadState::Running,
            "workload did not start: {}",
            started.message
        );
        let done = sup.wait(&id).await?;
        figures.total.push(t0.elapsed());
        anyhow::ensure!(
            done.state() == WorkloadState::Succeeded,
            "workload failed: {}",
            done.message
        );
    }
    Ok(figures)
}

/// (VmRSS, RssAnon) of the shim of a running `sleep`, in MiB. RssAnon is
/// its own memory; the rest of VmRSS is the executable's pages, shared
/// with the agent and every other shim.
async fn shim_rss_mib(
    dir: &std::path::Path,
    shim: Option<&std::path::Path>,
) -> anyhow::Result<(f64, f64)> {
    let sup = supervisor(dir, shim)?;
    let status = sup.run_local(allocation("rss", &["sleep", "30"])).await?;
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", status.pid))?;
    let ppid: u32 = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .context("malformed /proc stat")?;
    let proc_status = std::fs::read_to_string(format!("/proc/{ppid}/status"))?;
    let mib = |field: &str| -> anyhow::Result<f64> {
        let kib: f64 = proc_status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {field} in /proc/{ppid}/status"))?;
        Ok(kib / 1024.0)
    };
    let figures = (mib("VmRSS:")?, mib("RssAnon:")?);
    sup.stop("rss", Some(Duration::from_secs(1))).await?;
    Ok(figures)
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let dir = tempfile::tempdir()?;
    let (direct, shimmed, rss) = runtime.block_on(async {
        // Warm the page cache for both executables first.
        let shim = args.shim.as_deref();
        direct(5, dir.path()).await?;
        shimmed(5, &dir.path().join("warm"), shim).await?;
        let d = direct(args.count, dir.path()).await?;
        let s = shimmed(args.count, &dir.path().join("measured"), shim).await?;
        let rss = shim_rss_mib(&dir.path().join("rss"), shim).await?;
        anyhow::Ok((d, s, rss))
    })?;
    let summary = |f: &Figures| {
        let mut start = f.start.clone();
        let mut total = f.total.clone();
        start.sort();
        total.sort();
        let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len().max(1) as u32;
        (
            mean(&start),
            percentile(&start, 0.99),
            mean(&total),
            percentile(&total, 0.99),
        )
    };
    let d = summary(&direct);
    let s = summary(&shimmed);
    println!(
        "workload-spawn: {} trivial workloads (`true`) per variant, one at a time",
        args.count
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "figure (ms)", "direct", "shim", "extra"
    );
    for (name, a, b) in [
        ("start, mean", d.0, s.0),
        ("start, p99", d.1, s.1),
        ("start to end known, mean", d.2, s.2),
        ("start to end known, p99", d.3, s.3),
    ] {
        println!(
            "{:<34} {:>10.3} {:>10.3} {:>10.3}",
            name,
            ms(a),
            ms(b),
            ms(b.saturating_sub(a))
        );
    }
    println!("{:<34} {:>21.1}", "RSS of one shim (MiB)", rss.0);
    println!(
        "{:<34} {:>21.1}",
        "  of which its own (RssAnon, MiB)", rss.1
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "workload-spawn",
            "count": args.count,
            "direct_start_mean_ms": ms(d.0),
            "shim_start_mean_ms": ms(s.0),
            "direct_total_mean_ms": ms(d.2),
            "shim_total_mean_ms": ms(s.2),
            "extra_start_mean_ms": ms(s.0.saturating_sub(d.0)),
            "extra_total_mean_ms": ms(s.2.saturating_sub(d.2)),
            "shim_rss_mib": (rss.0 * 10.0).round() / 10.0,
            "shim_rss_anon_mib": (rss.1 * 10.0).round() / 10.0,
        })
    );
    Ok(())
}
