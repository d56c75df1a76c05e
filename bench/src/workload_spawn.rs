//! `workload-spawn`: what the workload shim (what lets workloads outlive
//! the agent) costs. Runs N trivial workloads (`true`) one after another
//! through the agent's real supervisor, each under its shim, both ways the
//! supervisor can start one: a thread of the shim host (the default) and a
//! process executed per workload (`<shim program> __shim <records>`);
//! and, as the baseline in the same run, N times the same program spawned
//! directly the way the agent did before shims (own process group, cleared
//! environment, output to a file). Reports latency and the whole machine's
//! CPU time per workload (what bounds throughput), and the resident memory
//! of the shim host while one workload runs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use gpufleet_agent::supervisor::ShimLaunch;
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
    /// CPU time of the whole machine (every process, kernel included) over
    /// the run, per workload.
    cpu_per_workload: Duration,
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
        gang: None,
        allocation_id: id.to_string(),
        job_id: "job-bench".to_string(),
        task_index: 0,
        gpu_uuids: Vec::new(),
        workload: Some(WorkloadSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: HashMap::new(),
            ..WorkloadSpec::default()
        }),
        ..Allocation::default()
    }
}

async fn direct(count: usize, dir: &std::path::Path) -> anyhow::Result<Figures> {
    let mut figures = Figures {
        start: Vec::with_capacity(count),
        total: Vec::with_capacity(count),
        cpu_per_workload: Duration::ZERO,
    };
    let busy = crate::report::machine_busy()?;
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
    figures.cpu_per_workload =
        crate::report::machine_busy()?.saturating_sub(busy) / count.max(1) as u32;
    Ok(figures)
}

fn supervisor(
    dir: &std::path::Path,
    shim: Option<&std::path::Path>,
    launch: ShimLaunch,
) -> anyhow::Result<Supervisor> {
    let backend = Arc::new(SimulatedBackend::new("bench", &["1xT4".to_string()])?);
    let mut settings = SupervisorSettings::new(dir.to_path_buf());
    if let Some(shim) = shim {
        settings.shim_program = shim.to_path_buf();
    }
    settings.shim_launch = launch;
    Ok(Supervisor::new(backend, settings))
}

async fn shimmed(
    count: usize,
    dir: &std::path::Path,
    shim: Option<&std::path::Path>,
    launch: ShimLaunch,
) -> anyhow::Result<Figures> {
    let sup = supervisor(dir, shim, launch)?;
    // The shim host starts with the first workload: not measured.
    let warm = sup.run_local(allocation("warm", &["true"])).await?;
    anyhow::ensure!(
        matches!(
            warm.state(),
            WorkloadState::Running | WorkloadState::Succeeded
        ),
        "workload did not start: {}",
        warm.message
    );
    sup.wait("warm").await?;
    let mut figures = Figures {
        start: Vec::with_capacity(count),
        total: Vec::with_capacity(count),
        cpu_per_workload: Duration::ZERO,
    };
    let busy = crate::report::machine_busy()?;
    for i in 0..count {
        let id = format!("shim-{i}");
        let t0 = Instant::now();
        let started = sup.run_local(allocation(&id, &["true"])).await?;
        figures.start.push(t0.elapsed());
        // `true` may be over before its start is read back.
        anyhow::ensure!(
            matches!(
                started.state(),
                WorkloadState::Running | WorkloadState::Succeeded
            ),
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
    figures.cpu_per_workload =
        crate::report::machine_busy()?.saturating_sub(busy) / count.max(1) as u32;
    Ok(figures)
}

/// Field 4 of /proc/<pid>/stat: the parent's pid.
fn parent_of(pid: u32) -> anyhow::Result<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .context("malformed /proc stat")
}

/// (VmRSS, RssAnon) of process `pid`, in MiB. RssAnon is its own memory;
/// the rest of VmRSS is the executable's pages, shared with the agent and
/// every shim.
fn memory_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let mib = |field: &str| -> anyhow::Result<f64> {
        let kib: f64 = proc_status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
        Ok(kib / 1024.0)
    };
    Ok((mib("VmRSS:")?, mib("RssAnon:")?))
}

/// Memory of the shim host while it runs the shim of one `sleep`.
async fn host_rss_mib(
    dir: &std::path::Path,
    shim: Option<&std::path::Path>,
) -> anyhow::Result<(f64, f64)> {
    let sup = supervisor(dir, shim, ShimLaunch::Host)?;
    let status = sup.run_local(allocation("rss", &["sleep", "30"])).await?;
    let figures = memory_mib(parent_of(status.pid)?)?;
    sup.stop("rss", Some(Duration::from_secs(1))).await?;
    Ok(figures)
}

pub(crate) fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let dir = tempfile::tempdir()?;
    let (direct, executed, forked, rss) = runtime.block_on(async {
        // Warm the page cache for both executables first.
        let shim = args.shim.as_deref();
        direct(5, dir.path()).await?;
        shimmed(5, &dir.path().join("warm"), shim, ShimLaunch::Exec).await?;
        let d = direct(args.count, dir.path()).await?;
        let e = shimmed(args.count, &dir.path().join("exec"), shim, ShimLaunch::Exec).await?;
        let f = shimmed(args.count, &dir.path().join("host"), shim, ShimLaunch::Host).await?;
        let rss = host_rss_mib(&dir.path().join("rss"), shim).await?;
        anyhow::Ok((d, e, f, rss))
    })?;
    let summary = |f: &Figures| {
        let mut start = f.start.clone();
        let mut total = f.total.clone();
        start.sort();
        total.sort();
        let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len().max(1) as u32;
        [
            mean(&start),
            percentile(&start, 0.99),
            mean(&total),
            percentile(&total, 0.99),
            f.cpu_per_workload,
        ]
    };
    let (d, e, f) = (summary(&direct), summary(&executed), summary(&forked));
    println!(
        "workload-spawn: {} trivial workloads (`true`) per variant, one at a time",
        args.count
    );
    println!(
        "{:<34} {:>10} {:>12} {:>12}",
        "figure (ms)", "direct", "shim, exec", "shim host"
    );
    for (i, name) in [
        "start, mean",
        "start, p99",
        "start to end known, mean",
        "start to end known, p99",
        "machine CPU per workload",
    ]
    .into_iter()
    .enumerate()
    {
        println!(
            "{:<34} {:>10.3} {:>12.3} {:>12.3}",
            name,
            ms(d[i]),
            ms(e[i]),
            ms(f[i])
        );
    }
    println!("{:<34} {:>36.1}", "RSS of the shim host (MiB)", rss.0);
    println!(
        "{:<34} {:>36.1}",
        "  of which its own (RssAnon, MiB)", rss.1
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "workload-spawn",
            "count": args.count,
            "direct_start_mean_ms": ms(d[0]),
            "exec_shim_start_mean_ms": ms(e[0]),
            "host_shim_start_mean_ms": ms(f[0]),
            "direct_total_mean_ms": ms(d[2]),
            "exec_shim_total_mean_ms": ms(e[2]),
            "host_shim_total_mean_ms": ms(f[2]),
            "direct_cpu_ms": ms(d[4]),
            "exec_shim_cpu_ms": ms(e[4]),
            "host_shim_cpu_ms": ms(f[4]),
            "host_rss_mib": (rss.0 * 10.0).round() / 10.0,
            "host_rss_anon_mib": (rss.1 * 10.0).round() / 10.0,
        })
    );
    Ok(())
}
