//! The `oci` runtime: a workload whose spec names a container image runs
//! as a rootful podman container (see [`podman`] for why its CLI).
//!
//! A launch pulls the image as the job's pull policy says (its progress is
//! the workload's `Pulling` status; a refusal ends the launch with the
//! registry's own reason), decides everything up front (name and labels
//! from the allocation, `--init` so pid 1 is catatonit, which forwards
//! SIGTERM, the GPUs by CDI name when a spec names them all, else
//! `NVIDIA_VISIBLE_DEVICES`, mounts only under the agent's allowed host
//! paths, `--log-driver passthrough`), then hands `podman run --rm
//! --replace …` to the process runtime's shim. That shim is what a process
//! workload runs under: it caps the log the container writes straight into
//! (no second copy in podman's storage), records how it ended, and
//! outlives an agent restart, so re-adoption is the process runtime's. The
//! attached `podman run` forwards the shim's SIGTERM to the container,
//! exits with its status and removes it. One podman call per start, the
//! same as a bare `podman run --rm` (an image found present is not looked
//! up again for a minute).
//!
//! What podman keeps is made to follow the allocation: the grace period's
//! SIGKILL goes to the container too (killing the client would not stop
//! it); a container whose client was killed or died is removed when the
//! wait ends; `forget` removes whatever is left; and after an agent restart
//! every container this agent labelled that no running workload owns is
//! removed ([`OciRuntime::reap`]).

pub mod cdi;
pub mod podman;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gpufleet_proto::v1::{Allocation, ContainerSpec, PullPolicy, RegistryAuth};
use tokio::sync::watch;
use tracing::{info, warn};

use super::process::ProcessRuntime;
use super::{
    BoxFuture, Ended, LaunchControl, LaunchError, LaunchRequest, Launched, OnStarted,
    RunningWorkload, WorkloadRuntime,
};
use podman::{Podman, PullError};

/// Label holding the allocation id a container runs.
pub const ALLOCATION_LABEL: &str = "io.gpufleet.allocation";
/// Label holding which agent (its data directory) owns a container, so
/// that agents sharing one podman never reap each other's.
pub const OWNER_LABEL: &str = "io.gpufleet.agent";
/// Label holding the job id, for operators' `podman ps`.
pub const JOB_LABEL: &str = "io.gpufleet.job";
/// Where a container sees its allocation's directory (read only): the
/// spot interruption file appears there.
pub const CONTAINER_ALLOCATION_DIR: &str = "/run/gpufleet";

/// How the `oci` runtime runs containers (the agent's `oci_*` settings).
#[derive(Debug, Clone, PartialEq)]
pub struct OciSettings {
    /// The podman executable.
    pub podman: PathBuf,
    /// Host directories a job may mount from (their subtrees).
    pub allowed_mounts: Vec<PathBuf>,
    /// Where CDI specs are read from.
    pub cdi_spec_dirs: Vec<PathBuf>,
    /// The pull policy of a job that names none.
    pub default_pull: PullPolicy,
    /// Longest one image pull may take.
    pub pull_timeout: Duration,
    /// Container network mode; `host` so gang ranks reach each other at
    /// their node's address, as process workloads do.
    pub network: String,
}

impl OciSettings {
    pub fn new(podman: PathBuf) -> Self {
        Self {
            podman,
            allowed_mounts: Vec::new(),
            cdi_spec_dirs: vec![PathBuf::from("/etc/cdi"), PathBuf::from("/var/run/cdi")],
            default_pull: PullPolicy::Missing,
            pull_timeout: Duration::from_secs(30 * 60),
            network: "host".into(),
        }
    }
}

/// Runs container workloads through podman; the process runtime's shims
/// run their `podman start --attach`.
#[derive(Debug)]
pub struct OciRuntime {
    podman: Podman,
    settings: OciSettings,
    /// The value of [`OWNER_LABEL`] on this agent's containers.
    owner: String,
    /// Where pull credentials live for the length of one pull.
    auth_dir: PathBuf,
    process: Arc<ProcessRuntime>,
    /// Images found or pulled recently, and when.
    images_seen: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Containers `podman run --rm` removed itself (their client ended on
    /// its own): forgetting them needs no `podman rm`, one podman process
    /// per job saved. Emptied as their allocations are forgotten.
    removed_by_podman: RemovedSet,
}

/// Names of containers known to be gone, shared with their handles.
type RemovedSet = Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

/// podman's own exit status when it failed (not the container's command):
/// the container may be left behind.
const PODMAN_FAILED: i32 = 125;

/// How long an image found present is trusted to stay (see
/// [`OciRuntime::recently_present`]).
const IMAGE_SEEN_FOR: Duration = Duration::from_secs(60);
/// Most images remembered as present.
const IMAGES_SEEN_MAX: usize = 1024;

impl OciRuntime {
    /// Checks that podman answers; an error says how to fix it.
    pub fn new(
        settings: OciSettings,
        data_dir: &Path,
        process: Arc<ProcessRuntime>,
    ) -> Result<Self, String> {
        let podman = Podman::new(settings.podman.clone());
        let version = podman.version().map_err(|why| {
            format!(
                "the oci runtime needs podman: {why} (install podman and runc, or set oci_podman to its path, or drop oci_enabled)"
            )
        })?;
        info!(podman = %settings.podman.display(), %version, "oci runtime ready");
        let owner = std::fs::canonicalize(data_dir)
            .unwrap_or_else(|_| data_dir.to_path_buf())
            .to_string_lossy()
            .into_owned();
        Ok(Self {
            podman,
            settings,
            owner,
            auth_dir: data_dir.join("oci"),
            process,
            images_seen: Default::default(),
            removed_by_podman: Default::default(),
        })
    }

    /// Launches `request`, whose workload has a container spec.
    pub fn launch(
        &self,
        request: &LaunchRequest,
        control: &dyn LaunchControl,
    ) -> Result<Launched, LaunchError> {
        let Some(spec) = request
            .allocation
            .workload
            .as_ref()
            .and_then(|w| w.container.as_ref())
        else {
            return Err(LaunchError::Failed(
                "the oci runtime got a workload without a container image".into(),
            ));
        };
        super::prepare_allocation_dir(request)?;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&request.log_path)
            .map_err(|e| {
                crate::store::name_full_disk(format!(
                    "cannot open the log file {}: {e}",
                    request.log_path.display()
                ))
            })?;
        let fail = |log: &mut std::fs::File, message: String| {
            let _ = writeln!(log, "gpufleet-agent: {message}");
            LaunchError::Failed(message)
        };
        let name = container_name(request.allocation_id());
        match self.pull_as_needed(spec, request.allocation.registry_auth.as_ref(), control) {
            Ok(()) => {}
            Err(PullError::Withdrawn) => return Err(LaunchError::Withdrawn),
            Err(PullError::Failed(why)) => return Err(fail(&mut log, why)),
        }
        let cdi_names = cdi::gpu_device_names(&self.settings.cdi_spec_dirs);
        let run = RunArgs {
            name: &name,
            owner: &self.owner,
            network: &self.settings.network,
            allowed_mounts: &self.settings.allowed_mounts,
            cdi: request.gpu_uuids.iter().all(|u| cdi_names.contains(u)),
        }
        .build(request, spec)
        .map_err(|why| fail(&mut log, why))?;
        control.progress("starting the container");
        // The shim runs the attached `podman run`; the container's output
        // goes straight into the shim's log pipe (passthrough).
        let mut inner = request.clone();
        inner.allocation.registry_auth = None;
        inner.argv = std::iter::once(self.podman.program().to_string_lossy().into_owned())
            .chain(run)
            .collect();
        // Podman itself runs as root; the container's user is set above.
        inner.run_as = None;
        inner.working_dir = None;
        inner.env = Vec::new();
        let launched = self.process.launch(&inner, control)?;
        Ok(Launched {
            workload: self.wrap(request.allocation_id(), launched.workload),
            pid: launched.pid,
            started_at: launched.started_at,
        })
    }

    /// Pulls the image when the policy says so; the error is the
    /// registry's reason.
    fn pull_as_needed(
        &self,
        spec: &ContainerSpec,
        auth: Option<&RegistryAuth>,
        control: &dyn LaunchControl,
    ) -> Result<(), PullError> {
        let image = spec.image.as_str();
        let policy = match PullPolicy::try_from(spec.pull).unwrap_or_default() {
            PullPolicy::Unspecified => self.settings.default_pull,
            other => other,
        };
        let present = || {
            if self.recently_present(image) {
                return Ok(true);
            }
            let present = self
                .podman
                .image_exists(image)
                .map_err(|why| PullError::Failed(format!("cannot look up image {image}: {why}")))?;
            if present {
                self.saw_present(image);
            }
            Ok(present)
        };
        match policy {
            PullPolicy::Never => {
                if present()? {
                    return Ok(());
                }
                return Err(PullError::Failed(format!(
                    "image {image} is not on this node and the job's pull policy is never: pull it on the node first, or submit with --pull missing"
                )));
            }
            PullPolicy::Missing | PullPolicy::Unspecified if present()? => return Ok(()),
            _ => {}
        }
        let authfile = match auth {
            Some(auth) => Some(self.write_authfile(auth).map_err(PullError::Failed)?),
            None => None,
        };
        control.pulling(&format!("pulling {image}"));
        let result = self.podman.pull(
            image,
            authfile.as_ref().map(|a| a.path()),
            self.settings.pull_timeout,
            &|line| control.pulling(&format!("pulling {image}: {line}")),
            &|| control.withdrawn(),
        );
        drop(authfile);
        if result.is_ok() {
            self.saw_present(image);
        }
        result.map_err(|e| match e {
            PullError::Failed(why) => {
                PullError::Failed(format!("cannot pull image {image}: {why}"))
            }
            other => other,
        })
    }

    /// Whether `image` was found or pulled here within
    /// [`IMAGE_SEEN_FOR`]: then it is not looked up again (a podman call
    /// per start would double the cost of a short container). An image
    /// removed meanwhile makes `podman run --pull never` fail with podman's
    /// reason in the log.
    fn recently_present(&self, image: &str) -> bool {
        let seen = self.images_seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(image)
            .is_some_and(|at| at.elapsed() < IMAGE_SEEN_FOR)
    }

    fn saw_present(&self, image: &str) {
        let mut seen = self.images_seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= IMAGES_SEEN_MAX {
            seen.retain(|_, at| at.elapsed() < IMAGE_SEEN_FOR);
            if seen.len() >= IMAGES_SEEN_MAX {
                seen.clear();
            }
        }
        seen.insert(image.to_string(), std::time::Instant::now());
    }

    /// A registry credential file for one pull (0600), removed on drop.
    fn write_authfile(&self, auth: &RegistryAuth) -> Result<AuthFile, String> {
        std::fs::create_dir_all(&self.auth_dir)
            .map_err(|e| format!("cannot create {}: {e}", self.auth_dir.display()))?;
        let path = self
            .auth_dir
            .join(format!("auth-{}.json", uuid::Uuid::new_v4()));
        let token = base64(format!("{}:{}", auth.username, auth.password).as_bytes());
        let text = serde_json::json!({ "auths": { auth.registry.as_str(): { "auth": token } } })
            .to_string();
        gpufleet_core::private_file::write_private_file(&path, &text)
            .map_err(|e| format!("cannot write the registry credential file: {e}"))?;
        Ok(AuthFile(path))
    }

    /// The container-aware handle of a workload whose client the process
    /// runtime runs (launched now, or re-adopted after a restart).
    pub fn wrap(
        &self,
        allocation_id: &str,
        inner: Arc<dyn RunningWorkload>,
    ) -> Arc<dyn RunningWorkload> {
        Arc::new(ContainerWorkload {
            name: container_name(allocation_id),
            podman: self.podman.clone(),
            inner,
            removed_by_podman: self.removed_by_podman.clone(),
        })
    }

    /// Removes the container of `allocation_id` without waiting (called
    /// under the supervisor's lock); a later [`OciRuntime::reap`] removes
    /// what this could not.
    pub fn remove(&self, allocation_id: &str) {
        let name = container_name(allocation_id);
        let gone = self
            .removed_by_podman
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&name);
        if gone {
            return;
        }
        let podman = self.podman.clone();
        std::thread::spawn(move || {
            if let Err(why) = podman.remove(&name) {
                warn!(container = %name, %why, "cannot remove a finished container");
            }
        });
    }

    /// Removes every container of this agent whose allocation `keep` does
    /// not name: what a crashed agent or a died shim left behind. Returns
    /// what it could not list or remove.
    pub fn reap(&self, keep: &dyn Fn(&str) -> bool) -> Vec<String> {
        let containers = match self
            .podman
            .list_labelled(OWNER_LABEL, &self.owner, ALLOCATION_LABEL)
        {
            Ok(containers) => containers,
            Err(why) => return vec![format!("cannot list this agent's containers: {why}")],
        };
        let mut problems = Vec::new();
        for (name, allocation_id) in containers {
            if keep(&allocation_id) {
                continue;
            }
            warn!(container = %name, %allocation_id, "removing a container no workload owns");
            if let Err(why) = self.podman.remove(&name) {
                problems.push(format!("cannot remove container {name}: {why}"));
            }
        }
        problems
    }
}

/// Whether `allocation` runs as a container.
pub fn is_container(allocation: &Allocation) -> bool {
    allocation
        .workload
        .as_ref()
        .is_some_and(|w| w.container.is_some())
}

/// The container name of an allocation: `gpufleet-<id>` when the id is a
/// valid name, else a name from its hash (the label keeps the id).
pub fn container_name(allocation_id: &str) -> String {
    let valid = !allocation_id.is_empty()
        && allocation_id.len() <= 200
        && allocation_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        format!("gpufleet-{allocation_id}")
    } else {
        // FNV-1a: stable across agent runs, which a std hasher is not.
        let hash = allocation_id
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        format!("gpufleet-x{hash:016x}")
    }
}

/// Deleted when dropped: a credential lives on disk only during its pull.
struct AuthFile(PathBuf);

impl AuthFile {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for AuthFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The facts `podman run` needs beyond the request.
struct RunArgs<'a> {
    name: &'a str,
    owner: &'a str,
    network: &'a str,
    allowed_mounts: &'a [PathBuf],
    /// Every GPU has a CDI device of its UUID.
    cdi: bool,
}

impl RunArgs<'_> {
    /// The `podman run` argv (without the program), or why the request
    /// cannot run here. `--replace`: a container of the same name left by
    /// an earlier attempt goes; `--rm`: podman removes it when it ends.
    fn build(&self, request: &LaunchRequest, spec: &ContainerSpec) -> Result<Vec<String>, String> {
        let id = request.allocation_id();
        let mut args: Vec<String> = [
            "run",
            "--replace",
            "--rm",
            "--name",
            self.name,
            "--init",
            "--pull",
            "never",
            "--log-driver",
            "passthrough",
            "--network",
            self.network,
        ]
        .map(String::from)
        .to_vec();
        for (label, value) in [
            (ALLOCATION_LABEL, id),
            (OWNER_LABEL, self.owner),
            (JOB_LABEL, request.allocation.job_id.as_str()),
        ] {
            args.push("--label".into());
            args.push(format!("{label}={value}"));
        }
        if let Some(user) = container_user(spec, request.run_as)? {
            args.extend(["--user".into(), user]);
        }
        if !spec.workdir.is_empty() {
            args.extend(["--workdir".into(), spec.workdir.clone()]);
        }
        if spec.shm_size_bytes > 0 {
            args.extend(["--shm-size".into(), format!("{}b", spec.shm_size_bytes)]);
        }
        if !spec.entrypoint.is_empty() {
            let json = serde_json::to_string(&spec.entrypoint)
                .map_err(|e| format!("cannot encode the entrypoint: {e}"))?;
            args.extend(["--entrypoint".into(), json]);
        }
        for mount in &spec.mounts {
            let source = allowed_source(&mount.source, self.allowed_mounts)?;
            let mut value = format!(
                "type=bind,source={},target={}",
                source.display(),
                mount.target
            );
            if mount.read_only {
                value.push_str(",readonly=true");
            }
            args.extend(["--mount".into(), value]);
        }
        args.extend([
            "--mount".into(),
            format!(
                "type=bind,source={},target={CONTAINER_ALLOCATION_DIR},readonly=true",
                request.allocation_dir.display()
            ),
        ]);
        let gpus = request.gpu_uuids.join(",");
        if self.cdi && !request.gpu_uuids.is_empty() {
            for uuid in &request.gpu_uuids {
                args.extend(["--device".into(), format!("{}={uuid}", cdi::GPU_KIND)]);
            }
        }
        let mut env = request.env.clone();
        // After the job's env (podman keeps the last), so a job cannot
        // escape its GPUs or its identity.
        env.push(("CUDA_VISIBLE_DEVICES".into(), gpus.clone()));
        env.push((
            "NVIDIA_VISIBLE_DEVICES".into(),
            if gpus.is_empty() { "void".into() } else { gpus },
        ));
        // A share's MPS limits, as the process runtime sets them.
        env.extend(request.gpu_env.iter().cloned());
        env.extend(request.identity_env());
        // The allocation's directory is the container's /run/gpufleet (read
        // only), so a spot interruption's file reaches it there.
        env.push((
            "GPUFLEET_INTERRUPT_FILE".into(),
            format!(
                "{CONTAINER_ALLOCATION_DIR}/{}",
                crate::supervisor::INTERRUPT_FILE
            ),
        ));
        for (key, value) in env {
            args.extend(["--env".into(), format!("{key}={value}")]);
        }
        args.extend(["--".into(), spec.image.clone()]);
        args.extend(request.argv.iter().cloned());
        Ok(args)
    }
}

/// The `--user` of a container: the job's, else the agent's
/// `workload_user`. With a `workload_user` set, a job may pick only a
/// numeric, non-root uid (a name could mean root inside the image).
fn container_user(
    spec: &ContainerSpec,
    run_as: Option<(u32, u32)>,
) -> Result<Option<String>, String> {
    if spec.user.is_empty() {
        return Ok(run_as.map(|(uid, gid)| format!("{uid}:{gid}")));
    }
    if run_as.is_some() {
        let numeric_non_root = spec
            .user
            .split(':')
            .all(|part| part.parse::<u32>().is_ok_and(|n| n != 0));
        if !numeric_non_root {
            return Err(format!(
                "container user {:?} refused: this agent runs workloads as an unprivileged workload_user, so a job may only name a numeric non-root uid[:gid]",
                spec.user
            ));
        }
    }
    Ok(Some(spec.user.clone()))
}

/// `source` resolved (symlinks too), when it lies under an allowed path.
fn allowed_source(source: &str, allowed: &[PathBuf]) -> Result<PathBuf, String> {
    let resolved = std::fs::canonicalize(source)
        .map_err(|e| format!("mount source {source:?} cannot be used: {e}"))?;
    let under = allowed
        .iter()
        .any(|root| std::fs::canonicalize(root).is_ok_and(|root| resolved.starts_with(root)));
    if !under {
        let list: Vec<String> = allowed.iter().map(|p| p.display().to_string()).collect();
        return Err(format!(
            "mount source {source:?} is not under a path this agent allows (oci_allowed_mounts: [{}])",
            list.join(", ")
        ));
    }
    // Podman's --mount is comma-separated.
    if resolved.to_string_lossy().contains(',') {
        return Err(format!(
            "mount source {source:?} resolves to a path with a comma, which podman cannot mount"
        ));
    }
    Ok(resolved)
}

/// Standard base64 with padding (a registry `auth` entry).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A container's handle: the process runtime's handle of its attached
/// client, plus what reaches the container itself.
#[derive(Debug)]
struct ContainerWorkload {
    name: String,
    podman: Podman,
    inner: Arc<dyn RunningWorkload>,
    removed_by_podman: RemovedSet,
}

impl ContainerWorkload {
    /// SIGKILL to the container, on a thread of its own (never blocks the
    /// caller).
    fn kill_container(&self) {
        let (podman, name) = (self.podman.clone(), self.name.clone());
        std::thread::spawn(move || {
            if let Err(why) = podman.kill(&name, "KILL") {
                warn!(container = %name, %why, "cannot kill the container");
            }
        });
    }
}

impl RunningWorkload for ContainerWorkload {
    /// SIGTERM reaches the container through its attached client (its
    /// init forwards it to the command); after the grace period the
    /// container is killed along with the client.
    fn stop(&self, grace: Duration, ended: watch::Receiver<bool>) {
        let mut waiting = ended.clone();
        self.inner.stop(grace, ended);
        let (podman, name) = (self.podman.clone(), self.name.clone());
        tokio::spawn(async move {
            if tokio::time::timeout(grace, waiting.wait_for(|d| *d))
                .await
                .is_err()
            {
                info!(container = %name, "grace period over; killing the container");
                let _ = tokio::task::spawn_blocking(move || podman.kill(&name, "KILL")).await;
            }
        });
    }

    fn kill(&self) {
        self.inner.kill();
        self.kill_container();
    }

    /// Waits for the attached client. Its exit status is in the shim's
    /// record and the output in the log, so the container is not needed
    /// any more: `podman run --rm` removed it, and where the client was
    /// killed first it is removed (killed) here, so that once the end is
    /// reported no container of the allocation is left.
    fn wait(self: Arc<Self>, on_started: OnStarted) -> BoxFuture<Ended> {
        Box::pin(async move {
            let ended = self.inner.clone().wait(on_started).await;
            // `podman run --rm` removed it when it ended normally; a client
            // that was killed (or is gone) may have left it running.
            let client_killed = matches!(&ended, Ended::Exited(e) if e.signal.is_some())
                || matches!(ended, Ended::Lost(_));
            let podman_failed =
                matches!(&ended, Ended::Exited(e) if e.exit_code == Some(PODMAN_FAILED));
            if !client_killed && !podman_failed {
                self.removed_by_podman
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(self.name.clone());
            }
            if client_killed {
                let (podman, name) = (self.podman.clone(), self.name.clone());
                let removed = tokio::task::spawn_blocking(move || podman.remove(&name)).await;
                if let Ok(Err(why)) = removed {
                    warn!(container = %self.name, %why, "cannot remove the ended container; the next agent start reaps it");
                }
            }
            container_ending(ended)
        })
    }
}

/// `podman start --attach` exits 128+N when the container's command died of
/// signal N (as a shell reports it): turned back into the signal, so a
/// stopped container reads as stopped.
fn container_ending(ended: Ended) -> Ended {
    match ended {
        Ended::Exited(mut exit) => {
            if exit.signal.is_none()
                && let Some(code) = exit.exit_code
                && (129..=128 + 64).contains(&code)
            {
                exit.exit_code = None;
                exit.signal = Some(code - 128);
            }
            Ended::Exited(exit)
        }
        lost => lost,
    }
}

/// What the supervisor drives: the process runtime for argv workloads and,
/// when configured, the `oci` runtime for image workloads. Both run under
/// the same shims and records, so one adoption finds both.
#[derive(Debug)]
pub struct Runtimes {
    process: Arc<ProcessRuntime>,
    oci: Option<OciRuntime>,
    /// Allocations that run (or ran) as containers and are not forgotten.
    containers: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Runtimes {
    pub fn new(process: Arc<ProcessRuntime>, oci: Option<OciRuntime>) -> Self {
        Self {
            process,
            oci,
            containers: Default::default(),
        }
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The runtime names this agent advertises.
    pub fn names(&self) -> Vec<String> {
        let mut names = vec!["process".to_string()];
        if self.oci.is_some() {
            names.push("oci".into());
        }
        names
    }
}

impl WorkloadRuntime for Runtimes {
    fn name(&self) -> &'static str {
        if self.oci.is_some() {
            "process+oci"
        } else {
            "process"
        }
    }

    fn runtimes(&self) -> Vec<String> {
        self.names()
    }

    fn launch(
        &self,
        request: &LaunchRequest,
        control: &dyn LaunchControl,
    ) -> Result<Launched, LaunchError> {
        if !is_container(&request.allocation) {
            return self.process.launch(request, control);
        }
        match &self.oci {
            Some(oci) => {
                let launched = oci.launch(request, control)?;
                self.containers()
                    .insert(request.allocation_id().to_string());
                Ok(launched)
            }
            None => Err(LaunchError::Failed(
                "this agent has no oci runtime (set oci_enabled = true, with podman installed) and cannot run a container image".into(),
            )),
        }
    }

    fn adopt(&self, known: &dyn Fn(&str) -> bool) -> super::Adoption {
        let mut adoption = self.process.adopt(known);
        let Some(oci) = &self.oci else {
            return adoption;
        };
        for found in &mut adoption.found {
            if !is_container(&found.allocation) {
                continue;
            }
            let id = found.allocation.allocation_id.clone();
            self.containers().insert(id.clone());
            match &mut found.state {
                super::FoundState::Running(inner) => *inner = oci.wrap(&id, inner.clone()),
                super::FoundState::Ended(exit) => {
                    if let Ended::Exited(mapped) = container_ending(Ended::Exited(exit.clone())) {
                        *exit = mapped;
                    }
                }
                super::FoundState::Lost(_) => {}
            }
        }
        // A running one keeps its container (its wait removes it); one that
        // ended while the agent was away has its status in its records and
        // its output in its log, so its container goes now with the rest.
        let owned: std::collections::HashSet<String> = adoption
            .found
            .iter()
            .filter(|f| matches!(f.state, super::FoundState::Running(_)))
            .map(|f| f.allocation.allocation_id.clone())
            .collect();
        let problems = oci.reap(&|id| owned.contains(id) || known(id));
        adoption.unreadable.extend(problems);
        adoption
    }

    fn forget(&self, allocation_id: &str) -> std::io::Result<()> {
        self.process.forget(allocation_id)?;
        if let Some(oci) = &self.oci
            && self.containers().remove(allocation_id)
        {
            oci.remove(allocation_id);
        }
        Ok(())
    }

    fn detach(&self) {
        self.process.detach();
    }
}

#[cfg(test)]
mod tests;
