//! A real etcd cluster on unix sockets in a temporary directory, for the
//! store's conformance tests, the end-to-end tests and the benchmarks. It
//! runs the project's script `tests/etcd/setup.sh` (which installs etcd
//! from Debian's packages when it is missing and we are root) and kills
//! the members it started when dropped.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// What a caller does when etcd cannot run here: print how to enable it
/// and skip, unless `CI` is set, where the caller fails.
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "etcd is not available ({}); enable it with `tests/etcd/setup.sh install` as root",
            self.0
        )
    }
}

/// The setup script of this checkout.
pub fn setup_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/etcd/setup.sh")
}

/// Runs `setup.sh install` once per process.
pub fn ensure_installed() -> Result<(), Unavailable> {
    static INSTALLED: OnceLock<Result<(), Unavailable>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let output = std::process::Command::new("bash")
                .arg(setup_script())
                .arg("install")
                .output()
                .map_err(|e| Unavailable(format!("cannot run the setup script: {e}")))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(Unavailable(
                    String::from_utf8_lossy(&output.stderr).trim().to_string(),
                ))
            }
        })
        .clone()
}

/// Whether a test that needs etcd may skip: outside CI yes (it prints why),
/// in CI never (the error is raised).
pub fn skip_or_fail(unavailable: &Unavailable) -> bool {
    if std::env::var_os("CI").is_some() {
        panic!("{unavailable} (CI is set, so this test fails instead of skipping)");
    }
    eprintln!("skipping: {unavailable}");
    true
}

/// A running cluster; members are killed when it is dropped.
#[derive(Debug)]
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    endpoints: Vec<String>,
    pids: Vec<i32>,
}

impl EtcdCluster {
    /// Starts `members` members and waits until they answer.
    pub fn start(members: usize) -> Result<Self, Unavailable> {
        ensure_installed()?;
        // $TMPDIR (the benchmarks put it on tmpfs) when its path is short:
        // unix socket paths are limited to 107 bytes.
        let tmp = std::env::temp_dir();
        let parent = if tmp.as_os_str().len() <= 40 {
            tmp
        } else {
            std::path::PathBuf::from("/tmp")
        };
        let dir = tempfile::Builder::new()
            .prefix("etcd")
            .tempdir_in(parent)
            .map_err(|e| Unavailable(format!("cannot create a directory in /tmp: {e}")))?;
        let output = std::process::Command::new("bash")
            .arg(setup_script())
            .arg("start")
            .arg(dir.path())
            .arg(members.to_string())
            .arg(std::process::id().to_string())
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .output()
            .map_err(|e| Unavailable(format!("cannot run the setup script: {e}")))?;
        let mut pids = Vec::new();
        for member in 1..=members {
            let pid = std::fs::read_to_string(dir.path().join(format!("m{member}/pid")))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            pids.extend(pid);
        }
        let cluster = Self {
            endpoints: String::from_utf8_lossy(&output.stdout)
                .trim()
                .split(',')
                .filter(|e| !e.is_empty())
                .map(str::to_string)
                .collect(),
            dir,
            pids,
        };
        if !output.status.success() || cluster.endpoints.len() != members {
            return Err(Unavailable(format!(
                "the cluster did not start: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(cluster)
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Member `index`'s (0-based) process id.
    pub fn pid(&self, index: usize) -> Option<i32> {
        self.pids.get(index).copied()
    }

    /// SIGKILLs member `index` (0-based).
    pub fn kill_member(&self, index: usize) {
        if let Some(pid) = self.pid(index) {
            kill(pid);
        }
    }
}

fn kill(pid: i32) {
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status();
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for pid in &self.pids {
            kill(*pid);
        }
    }
}

/// An etcd store under a prefix of its own on a cluster shared by the
/// process (started on first use), for the conformance tests. None when
/// etcd cannot run here and we are not in CI.
pub fn fresh_store() -> Option<super::EtcdStore> {
    static SHARED: OnceLock<Result<EtcdCluster, Unavailable>> = OnceLock::new();
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let cluster = match SHARED.get_or_init(|| EtcdCluster::start(3)) {
        Ok(cluster) => cluster,
        Err(unavailable) => {
            skip_or_fail(unavailable);
            return None;
        }
    };
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let prefix = format!("conformance-{}-{n}/", std::process::id());
    let options = super::EtcdOptions::new(cluster.endpoints().to_vec(), prefix);
    match super::EtcdClient::connect(options) {
        Ok(client) => Some(super::EtcdStore::new(client)),
        Err(e) => panic!("cannot connect to the test cluster: {e}"),
    }
}
