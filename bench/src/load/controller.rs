//! The controller under load: the real binary as a child process, its
//! addresses read back from its log.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::*;

/// The controller process; killed when dropped, so no error path leaves it
/// behind. `abuse` starts its controller the same way.
pub(crate) struct ControllerProcess {
    pub(super) child: Child,
    pub(crate) endpoint: String,
    pub(super) metrics_port: u16,
    pub(super) log: PathBuf,
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ControllerProcess {
    pub(crate) fn start(
        binary: &std::path::Path,
        dir: &std::path::Path,
        extra_args: &[String],
    ) -> anyhow::Result<Self> {
        let log = dir.join("controller.log");
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(binary);
        command.args(extra_args);
        // Ports the kernel picks, read back from the log: a port guessed
        // free here could be taken before the controller binds it.
        let mut child = command
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(["--log-format", "json"])
            .arg("--data-dir")
            .arg(dir.join("controller"))
            .arg("--join-token")
            .arg(crate::sim_agent::BENCH_JOIN_TOKEN)
            // Auth stays on; one admin token drives every client here, so
            // the per-token rate limit is off.
            .arg("--rate-limit-per-token")
            .arg("0")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file.try_clone()?))
            .stderr(Stdio::from(log_file))
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (build it: cargo build --release -p gpufleet-controller, or pass --controller)",
                    binary.display()
                )
            })?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let (addr, metrics) = loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the controller exited ({status}) before serving; see {}",
                    log.display()
                );
            }
            if let Some(addrs) = logged_addresses(&log) {
                break addrs;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the controller did not log its address within 30 s (an info line: check GPUFLEET_LOG); see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Ok(Self {
            child,
            endpoint: format!("http://{addr}"),
            metrics_port: metrics.port(),
            log,
        })
    }

    /// VmRSS of the controller, bytes.
    pub(crate) fn rss_bytes(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.child.id());
        let status =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .with_context(|| format!("no VmRSS in {path}"))
    }

    /// Waits until the gRPC API answers, failing early if the process died.
    pub(crate) async fn wait_serving(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "the controller exited ({status}) before serving; see {}",
                    self.log.display()
                );
            }
            if let Ok(mut fleet) = clients::fleet_client(&self.endpoint).await
                && fleet
                    .list_nodes(gpufleet_proto::v1::ListNodesRequest::default())
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the controller did not serve within {within:?}; see {}",
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The gRPC and /metrics addresses from the controller's "controller
/// serving" log line (`--log-format json`), once it has written it.
fn logged_addresses(log: &std::path::Path) -> Option<(SocketAddr, SocketAddr)> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|line| {
        let entry: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = &entry["fields"];
        if fields["message"] != "controller serving" {
            return None;
        }
        let addr = fields["local_addr"].as_str()?.parse().ok()?;
        let metrics = fields["metrics"]
            .as_str()?
            .trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .parse()
            .ok()?;
        Some((addr, metrics))
    })
}
