//! A library-free client of podman's documented command line: every call
//! is one `podman` process with a fixed argv (never a shell), its stdout
//! read as data and its stderr's last `Error:` line taken as the reason
//! when it fails.
//!
//! Why the CLI and not podman's REST API: the REST API of podman 4.3 needs
//! `podman system service` running as a daemon beside the agent (one more
//! process to start, supervise and secure), while the CLI is the interface
//! podman documents as stable, runs the same code, and is what the tests on
//! this machine can exercise end to end. A container's processes are
//! children of podman's `conmon`, not of the `podman` client, so they
//! outlive both the client and the agent either way.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest stderr kept from one podman call (its reason for failing).
const STDERR_MAX_BYTES: usize = 16 * 1024;
/// Longest stdout read from one podman call (listings, ids).
const STDOUT_MAX_BYTES: usize = 1024 * 1024;
/// How often a pull is checked for withdrawal and its deadline.
const PULL_POLL: Duration = Duration::from_millis(50);

/// Where podman is and how to call it.
#[derive(Debug, Clone)]
pub struct Podman {
    program: PathBuf,
}

/// What one finished podman call said.
#[derive(Debug)]
pub struct Output {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Podman's own reason: its last `Error: …` line, else the last line
    /// of stderr, else the exit status.
    pub fn reason(&self) -> String {
        error_line(&self.stderr).unwrap_or_else(|| match self.code {
            Some(code) => format!("podman exited with status {code}"),
            None => "podman was killed by a signal".to_string(),
        })
    }
}

/// The last `Error: …` line of `stderr` (without the prefix), else its
/// last non-empty line.
pub fn error_line(stderr: &str) -> Option<String> {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("Error: "))
        .or_else(|| lines.last().copied())
        .map(|l| gpufleet_core::limits::escape_unsafe(l).into_owned())
}

/// How a pull ended, when it did not succeed.
#[derive(Debug, PartialEq, Eq)]
pub enum PullError {
    /// Podman (the registry) refused: its reason.
    Failed(String),
    /// The launch was withdrawn while it pulled; the pull was killed.
    Withdrawn,
}

impl Podman {
    pub fn new(program: PathBuf) -> Self {
        Self { program }
    }

    pub fn program(&self) -> &Path {
        &self.program
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// Runs podman with `args` and waits for it. An error only when it
    /// could not be started at all.
    pub fn run(&self, args: &[&str]) -> Result<Output, String> {
        let child = self
            .command(args)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.program.display()))?;
        collect(child, &self.program)
    }

    /// Like [`Podman::run`], but a failure is an error carrying podman's
    /// reason; the success's stdout is returned.
    pub fn check(&self, args: &[&str]) -> Result<String, String> {
        let output = self.run(args)?;
        if output.success {
            Ok(output.stdout)
        } else {
            Err(output.reason())
        }
    }

    /// `podman version`: whether podman answers, and which it is.
    pub fn version(&self) -> Result<String, String> {
        self.check(&["version", "--format", "{{.Client.Version}}"])
            .map(|v| v.trim().to_string())
    }

    /// Whether the image is in the node's local storage.
    pub fn image_exists(&self, image: &str) -> Result<bool, String> {
        let output = self.run(&["image", "exists", "--", image])?;
        match output.code {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(output.reason()),
        }
    }

    /// Pulls `image`, handing every line podman prints (its progress) to
    /// `progress`, killing the pull when `withdrawn` turns true or after
    /// `timeout`. `authfile`: a registry credential file for this pull.
    pub fn pull(
        &self,
        image: &str,
        authfile: Option<&Path>,
        timeout: Duration,
        progress: &dyn Fn(&str),
        withdrawn: &dyn Fn() -> bool,
    ) -> Result<(), PullError> {
        let mut args: Vec<&str> = vec!["pull"];
        let authfile_arg;
        if let Some(path) = authfile {
            authfile_arg = path.to_string_lossy().into_owned();
            args.extend(["--authfile", &authfile_arg]);
        }
        args.extend(["--", image]);
        let mut child = self.command(&args).spawn().map_err(|e| {
            PullError::Failed(format!("cannot run {}: {e}", self.program.display()))
        })?;
        // Podman prints its steps ("Copying blob …") on stderr; a thread
        // turns them into progress while this one watches the clock.
        let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
        let reader = child.stderr.take().map(|stderr| {
            std::thread::spawn(move || {
                let mut kept = String::new();
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if kept.len() < STDERR_MAX_BYTES {
                        kept.push_str(&line);
                        kept.push('\n');
                    }
                    let _ = lines_tx.send(line);
                }
                kept
            })
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            while let Ok(line) = lines_rx.try_recv() {
                let line = line.trim();
                if !line.is_empty() && !line.starts_with("time=") {
                    progress(line);
                }
            }
            match child.try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) => {}
                Err(e) => break Err(format!("cannot wait for podman pull: {e}")),
            }
            if withdrawn() {
                let _ = child.kill();
                let _ = child.wait();
                return Err(PullError::Withdrawn);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "the pull took longer than {} (the agent's oci_pull_timeout)",
                    humantime::format_duration(timeout)
                ));
            }
            std::thread::sleep(PULL_POLL);
        };
        let stderr = reader.and_then(|r| r.join().ok()).unwrap_or_default();
        match status {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(PullError::Failed(
                error_line(&stderr).unwrap_or_else(|| format!("podman pull exited with {status}")),
            )),
            Err(why) => Err(PullError::Failed(why)),
        }
    }

    /// Removes the container `name` whatever its state; gone already is
    /// fine.
    pub fn remove(&self, name: &str) -> Result<(), String> {
        self.check(&["rm", "--force", "--ignore", "--time", "0", "--", name])
            .map(drop)
    }

    /// Sends `signal` to the container `name`'s main process; a container
    /// that is not running is fine.
    pub fn kill(&self, name: &str, signal: &str) -> Result<(), String> {
        let output = self.run(&["kill", "--signal", signal, "--", name])?;
        if output.success || is_not_running(&output.stderr) {
            Ok(())
        } else {
            Err(output.reason())
        }
    }

    /// Names and allocation ids of every container (any state) that
    /// carries `label=value`, read from `allocation_label`.
    pub fn list_labelled(
        &self,
        label: &str,
        value: &str,
        allocation_label: &str,
    ) -> Result<Vec<(String, String)>, String> {
        let filter = format!("label={label}={value}");
        let format = format!("{{{{.Names}}}}\t{{{{index .Labels \"{allocation_label}\"}}}}");
        let out = self.check(&["ps", "--all", "--filter", &filter, "--format", &format])?;
        Ok(out
            .lines()
            .filter_map(|line| {
                let (name, id) = line.split_once('\t')?;
                Some((name.trim().to_string(), id.trim().to_string()))
            })
            .collect())
    }
}

/// Whether podman's stderr says the container was not running (or is gone).
fn is_not_running(stderr: &str) -> bool {
    stderr.contains("is not running")
        || stderr.contains("no container with name or ID")
        || stderr.contains("no such container")
}

/// Reads a child's stdout and stderr (each bounded) and waits for it.
fn collect(mut child: std::process::Child, program: &Path) -> Result<Output, String> {
    let stderr = child.stderr.take();
    // Stderr on a thread so that neither pipe fills while the other is read.
    let err_reader = stderr.map(|s| std::thread::spawn(move || read_bounded(s, STDERR_MAX_BYTES)));
    let stdout = child
        .stdout
        .take()
        .map(|s| read_bounded(s, STDOUT_MAX_BYTES))
        .unwrap_or_default();
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for {}: {e}", program.display()))?;
    let stderr = err_reader.and_then(|r| r.join().ok()).unwrap_or_default();
    Ok(Output {
        success: status.success(),
        code: status.code(),
        stdout,
        stderr,
    })
}

/// Up to `max` bytes of `from` as text; the rest is read and dropped so the
/// writer never blocks.
fn read_bounded(from: impl Read, max: usize) -> String {
    let mut kept = Vec::new();
    let mut reader = BufReader::new(from);
    let mut chunk = [0u8; 8192];
    loop {
        match reader.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = max.saturating_sub(kept.len());
                kept.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_is_podmans_last_error_line() {
        let stderr = "Trying to pull localhost/nope:1...\n\
            time=\"x\" level=warning msg=\"Failed, retrying\"\n\
            Error: initializing source docker://localhost/nope:1: manifest unknown\n";
        assert_eq!(
            error_line(stderr).as_deref(),
            Some("initializing source docker://localhost/nope:1: manifest unknown")
        );
        assert_eq!(error_line("just this\n\n").as_deref(), Some("just this"));
        assert_eq!(error_line(""), None);
        // Control characters from the registry are escaped, not passed on.
        assert_eq!(
            error_line("Error: bad\u{1b}[2J").as_deref(),
            Some("bad\\x1b[2J")
        );
    }
}
