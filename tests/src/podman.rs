//! Container tests need podman: [`podman_ready`] runs the project's own
//! idempotent setup script (tests/podman/setup.sh, which installs and
//! configures podman from Debian packages when missing and we are root,
//! and builds the local test image) once per test process. Where podman
//! still cannot run, a test prints how to enable it and returns early —
//! unless env `CI` is set, then it fails.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The local test image the setup script builds (busybox, no registry).
pub const TEST_IMAGE: &str = "localhost/gpufleet-test:1";

/// tests/podman/setup.sh.
pub fn setup_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("podman/setup.sh")
}

/// Whether podman can run the container tests here. `Ok(false)`: skip
/// (the reason was printed); an error under CI.
pub fn podman_ready(test: &str) -> anyhow::Result<bool> {
    static SETUP: OnceLock<Result<(), String>> = OnceLock::new();
    let setup = SETUP.get_or_init(|| run_setup(&[]));
    match setup {
        Ok(()) => Ok(true),
        Err(why) if std::env::var_os("CI").is_some() => {
            anyhow::bail!("{test}: podman is needed under CI and could not be set up: {why}")
        }
        Err(why) => {
            eprintln!(
                "SKIPPED {test}: podman cannot run here ({why}). Enable: run `sudo {}` once (Debian: installs podman, runc, catatonit, busybox-static), then rerun.",
                setup_script().display()
            );
            Ok(false)
        }
    }
}

/// Writes the test CDI spec `name` whose `nvidia.com/gpu=<UUID>` devices
/// are dummy device nodes, the `i`-th appearing in a container as
/// `/dev/nvidia<i>` (with `GPUFLEET_TEST_CDI_<i>=<UUID>` in its env).
pub fn write_test_cdi_spec(name: &str, uuids: &[String]) -> anyhow::Result<()> {
    let mut args = vec!["--cdi".to_string(), name.to_string()];
    args.extend(uuids.iter().cloned());
    run_setup(&args).map_err(anyhow::Error::msg)
}

/// Removes a test CDI spec (its devices are then unknown to podman).
pub fn remove_test_cdi_spec(name: &str) {
    let _ = std::fs::remove_file(format!("/etc/cdi/{name}.json"));
}

fn run_setup(args: &[String]) -> Result<(), String> {
    let script = setup_script();
    let output = Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if output.status.success() && stdout.contains("podman ready") {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output");
    Err(format!(
        "{} exited with {}: {last}",
        script.display(),
        output.status
    ))
}

/// Names of the containers (any state) whose allocation label is `id`.
pub fn containers_of(allocation_id: &str) -> anyhow::Result<Vec<String>> {
    let output = Command::new("podman")
        .args(["ps", "--all", "--format", "{{.Names}}", "--filter"])
        .arg(format!("label=io.gpufleet.allocation={allocation_id}"))
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "podman ps failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect())
}

/// Removes, when dropped, every container of the agent whose data
/// directory is `data_dir` (its owner label), so that a failed test
/// leaves nothing running.
#[derive(Debug)]
pub struct ContainerGuard {
    owner: String,
}

impl ContainerGuard {
    pub fn new(data_dir: &std::path::Path) -> Self {
        let owner = std::fs::canonicalize(data_dir)
            .unwrap_or_else(|_| data_dir.to_path_buf())
            .to_string_lossy()
            .into_owned();
        Self { owner }
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let Ok(output) = Command::new("podman")
            .args(["ps", "--all", "--quiet", "--filter"])
            .arg(format!("label=io.gpufleet.agent={}", self.owner))
            .output()
        else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect();
        if !ids.is_empty() {
            let _ = Command::new("podman")
                .args(["rm", "--force", "--time", "0"])
                .args(&ids)
                .output();
        }
    }
}
