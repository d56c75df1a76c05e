//! `agent-overhead`: starts the real `gpufleet-agent` binary as a child
//! with 8 GPUs served by the fake NVML library (tests/fake-nvml), sampled
//! every second and streamed to an in-process controller, then measures
//! the child's CPU time (utime + stime from /proc/<pid>/stat) over a
//! window and its resident memory (VmRSS, VmHWM from /proc/<pid>/status).
//!
//! Build first: `cargo build --release -p gpufleet-agent -p gpufleet-fake-nvml -p gpufleet-bench`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Targets from the issue.
const CPU_TARGET_PERCENT: f64 = 0.5;
const RSS_TARGET_MIB: f64 = 15.0;
/// /proc reports CPU times in USER_HZ, which is 100 on Linux.
const USER_HZ: f64 = 100.0;

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// gpufleet-agent binary [default: next to this one].
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Fake NVML library [default: libgpufleet_fake_nvml.so next to this binary].
    #[arg(long)]
    fake_nvml: Option<PathBuf>,
    /// GPUs the fake library serves.
    #[arg(long, default_value_t = 8)]
    gpus: u32,
    /// Sampling interval of the agent.
    #[arg(long, default_value = "1s")]
    sample_interval: String,
    /// Time before measuring (start-up, first connection).
    #[arg(long, default_value_t = 10)]
    warmup_seconds: u64,
    /// Measured window.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Hopper profiling too: every GPU serves GPM metrics, and every other
    /// GPU is in MIG mode with seven 1g.10gb instances (GPM per instance).
    #[arg(long)]
    profiling: bool,
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    Ok(exe
        .parent()
        .context("executable has no directory")?
        .join(name))
}

fn fake_machine(gpus: u32, profiling: bool) -> String {
    let gpm = serde_json::json!({
        "graphics_util": 93.0, "sm_util": 88.0, "sm_occupancy": 41.0, "any_tensor_util": 62.0,
        "dram_bw_util": 55.0, "fp16_util": 40.0, "fp32_util": 9.0, "fp64_util": 0.0,
        "pcie_tx_mib_per_sec": 1100.0, "pcie_rx_mib_per_sec": 1300.0,
        "nvlink_total_tx_mib_per_sec": 90_000.0, "nvlink_total_rx_mib_per_sec": 90_000.0
    });
    let gpus: Vec<serde_json::Value> = (0..gpus)
        .map(|i| {
            let mut gpu = serde_json::json!({
                "uuid": format!("GPU-00000000-0000-0000-0000-{i:012}"),
                "name": "NVIDIA H100 80GB HBM3",
                "pci_bus_id": format!("00000000:{:02X}:00.0", 0x18 + i * 0x10),
                "serial": format!("16509230{i:05}"),
                "values": {
                    "gpu_util": 93, "mem_util": 55, "enc_util": 0, "dec_util": 0,
                    "memory_total": 85_899_345_920u64, "memory_used": 64_424_509_440u64,
                    "temperature": 66, "memory_temp": 72, "power_usage_mw": 612_000,
                    "power_limit_mw": 700_000, "energy_mj": 987_654_321u64,
                    "sm_clock": 1980, "mem_clock": 2619, "throttle_reasons": 4,
                    "pcie_tx": 1_200_000, "pcie_rx": 1_400_000, "pcie_replay": 0,
                    "ecc_sbe_volatile": 0, "ecc_dbe_volatile": 0,
                    "ecc_sbe_aggregate": 0, "ecc_dbe_aggregate": 0,
                    "retired_sbe": 0, "retired_dbe": 0, "retired_pending": 0,
                    "remapped_correctable": 0, "remapped_uncorrectable": 0,
                    "remap_pending": 0, "remap_failure": 0,
                    "nvlink_crc_flit_errors": 0, "nvlink_replay_errors": 0,
                    "nvlink_recovery_errors": 0, "mig_mode": 0, "persistence_mode": 1,
                    "numa_node": 0, "cc_major": 9, "cc_minor": 0
                },
                "processes": [ { "pid": 100_000 + i, "used_memory": 64_424_509_440u64 } ]
            });
            if profiling {
                gpu["gpm"] = gpm.clone();
                gpu["values"]["sm_count"] = 132.into();
                if i % 2 == 1 {
                    gpu["values"]["mig_mode"] = 1.into();
                    gpu["mig_instances"] = (0..7u32)
                        .map(|m| {
                            serde_json::json!({
                                "uuid": format!("MIG-{i:08}-0000-0000-0000-{m:012}"),
                                "profile": "1g.10gb", "gpu_instance_id": 7 + m,
                                "memory_total": 10_737_418_240u64, "memory_used": 5_368_709_120u64,
                                "sm_count": 16, "gpm": gpm
                            })
                        })
                        .collect();
                }
            }
            gpu
        })
        .collect();
    serde_json::json!({ "driver_version": "550.54.15", "cuda_driver_version": 12040, "gpus": gpus })
        .to_string()
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat (did the agent exit?)"))?;
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 overall, 12 and 13 after ") ".
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc stat")?
            .parse::<u64>()
            .context("bad /proc stat number")? as f64)
    };
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

/// (VmRSS, VmHWM) of `pid`, in MiB.
fn memory_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/{pid}/status"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .context("empty status line")?
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn check_file(path: &Path, what: &str) -> anyhow::Result<()> {
    if !path.exists() {
        bail!(
            "{what} not found at {}; build it with cargo build --release -p gpufleet-agent -p gpufleet-fake-nvml, or pass its path",
            path.display()
        );
    }
    Ok(())
}

pub(crate) fn run(o: Options) -> anyhow::Result<()> {
    let agent = match o.agent {
        Some(p) => p,
        None => sibling("gpufleet-agent")?,
    };
    let fake = match o.fake_nvml {
        Some(p) => p,
        None => sibling("libgpufleet_fake_nvml.so")?,
    };
    check_file(&agent, "gpufleet-agent")?;
    check_file(&fake, "the fake NVML library")?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("fake-nvml.json");
    std::fs::write(&config, fake_machine(o.gpus, o.profiling))?;

    let runtime = tokio::runtime::Runtime::new()?;
    let controller = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let mut config =
            gpufleet_controller::ControllerConfig::for_data_dir(dir.path().join("controller"));
        config.listen = listener.local_addr()?;
        config.join_token = crate::sim_agent::BENCH_JOIN_TOKEN.to_string();
        gpufleet_controller::start(config, Some(listener)).await
    })?;
    let controller_url = format!("http://{}", controller.local_addr());

    let child = Command::new(&agent)
        .args(["--gpu-backend", "nvml", "--nvml-library-path"])
        .arg(&fake)
        .args(["--controller", &controller_url, "--node-id", "bench-node"])
        .args(["--join-token", crate::sim_agent::BENCH_JOIN_TOKEN])
        .args(["--sample-interval", &o.sample_interval])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args(["--read-kmsg", "false", "--data-dir"])
        .arg(dir.path().join("agent"))
        .env("GPUFLEET_FAKE_NVML_CONFIG", &config)
        .env("GPUFLEET_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", agent.display()))?;
    let mut child = KillOnDrop(child);
    let pid = child.0.id();

    std::thread::sleep(Duration::from_secs(o.warmup_seconds));
    if let Some(status) = child.0.try_wait()? {
        bail!("the agent exited during warm-up: {status}");
    }
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(o.seconds));
    let cpu1 = cpu_seconds(pid)?;
    let wall = t0.elapsed().as_secs_f64();
    let (rss, hwm) = memory_mib(pid)?;
    drop(child);
    runtime.block_on(controller.shutdown())?;

    let cpu_percent = (cpu1 - cpu0) / wall * 100.0;
    let verdict = |ok: bool| if ok { "ok" } else { "OVER" };
    println!(
        "agent-overhead: {} GPUs via fake NVML, sample interval {}, {:.0} s window{}",
        o.gpus,
        o.sample_interval,
        wall,
        if o.profiling {
            ", GPM on every GPU, every other GPU in MIG mode (7 instances)"
        } else {
            ""
        }
    );
    println!(
        "{:<28} {:>10} {:>10} {:>6}",
        "figure", "measured", "target", ""
    );
    println!(
        "{:<28} {:>10.3} {:>10.1} {:>6}",
        "CPU (% of one core)",
        cpu_percent,
        CPU_TARGET_PERCENT,
        verdict(cpu_percent <= CPU_TARGET_PERCENT)
    );
    println!(
        "{:<28} {:>10.1} {:>10.1} {:>6}",
        "RSS at end (MiB)",
        rss,
        RSS_TARGET_MIB,
        verdict(rss <= RSS_TARGET_MIB)
    );
    println!(
        "{:<28} {:>10.1} {:>10} {:>6}",
        "peak RSS (MiB)", hwm, "", ""
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "agent-overhead",
            "gpus": o.gpus,
            "profiling": o.profiling,
            "sample_interval": o.sample_interval,
            "window_s": (wall * 10.0).round() / 10.0,
            "cpu_percent_of_core": (cpu_percent * 1000.0).round() / 1000.0,
            "rss_mib": (rss * 10.0).round() / 10.0,
            "peak_rss_mib": (hwm * 10.0).round() / 10.0,
            "cpu_target_percent": CPU_TARGET_PERCENT,
            "rss_target_mib": RSS_TARGET_MIB,
        })
    );
    Ok(())
}
