//! deploy/install-agent.sh, run for real against temporary root directories:
//! the files and modes it writes, that a second run changes nothing, that
//! `--dry-run` writes nothing, and that bad input is refused with a message
//! naming the flag. The config it writes must load in the real agent.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::SystemTime;

use gpufleet_agent::{AgentConfig, GpuBackendKind};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/install-agent.sh")
}

/// A stand-in agent binary (the script only copies it).
fn fake_binary(dir: &Path) -> PathBuf {
    let path = dir.join("gpufleet-agent");
    std::fs::write(&path, "#!/bin/sh\necho fake agent\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    binary: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let binary = fake_binary(dir.path());
    Setup {
        _dir: dir,
        root,
        binary,
    }
}

fn base_args(s: &Setup) -> Vec<String> {
    [
        "--root",
        s.root.to_str().unwrap(),
        "--binary",
        s.binary.to_str().unwrap(),
        "--controller",
        "https://controller.example:7070",
        "--join-token",
        "s3cret-token",
        "--provider",
        "aws",
        "--region",
        "us-east-1",
        "--zone",
        "us-east-1a",
        "--instance-type",
        "p5.48xlarge",
        "--price",
        "3.93",
        "--simulated-gpus",
        "8xH100-SXM-80GB",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(args: &[String]) -> Output {
    Command::new("bash")
        .arg(script())
        .args(args)
        .env_remove("GPUFLEET_JOIN_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("bash runs the install script")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every path under `root` with its mode, contents and mtime.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let contents = if meta.is_file() {
                std::fs::read(&path).unwrap()
            } else {
                Vec::new()
            };
            if meta.is_dir() {
                stack.push(path.clone());
            }
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            out.insert(
                rel,
                (
                    meta.permissions().mode() & 0o7777,
                    contents,
                    meta.modified().unwrap(),
                ),
            );
        }
    }
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn load_config(path: &Path) -> AgentConfig {
    AgentConfig::load(
        [
            OsStr::new("gpufleet-agent"),
            OsStr::new("--config"),
            path.as_os_str(),
        ],
        &HashMap::new(),
    )
    .unwrap_or_else(|e| panic!("the agent rejects the installed config: {e}"))
}

#[test]
fn installs_into_a_temporary_root_and_a_second_run_changes_nothing() {
    let s = setup();
    let first = run(&base_args(&s));
    assert!(first.status.success(), "{}", text(&first.stderr));
    let stdout = text(&first.stdout);
    assert!(
        stdout.contains("systemctl daemon-reload && systemctl enable --now gpufleet-agent.service"),
        "--root prints what it would enable: {stdout}"
    );

    let bin = s.root.join("usr/local/bin/gpufleet-agent");
    let config = s.root.join("etc/gpufleet/agent.toml");
    let unit = s.root.join("etc/systemd/system/gpufleet-agent.service");
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(&s.binary).unwrap()
    );
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(mode(&config), 0o640, "the config holds the join token");
    assert_eq!(mode(&unit), 0o644);
    assert_eq!(
        std::fs::read_to_string(&unit).unwrap(),
        std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/gpufleet-agent.service")
        )
        .unwrap()
    );
    let passwd = std::fs::read_to_string(s.root.join("etc/passwd")).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("gpufleet:") && l.ends_with(":/usr/sbin/nologin")),
        "{passwd}"
    );
    let group = std::fs::read_to_string(s.root.join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("gpufleet:")), "{group}");

    // The real agent accepts what was written, with every value given.
    let c = load_config(&config);
    assert_eq!(c.controller, "https://controller.example:7070");
    assert_eq!(c.join_token, "s3cret-token");
    assert_eq!(c.node.provider, "aws");
    assert_eq!(c.node.region, "us-east-1");
    assert_eq!(c.node.zone, "us-east-1a");
    assert_eq!(c.node.instance_type, "p5.48xlarge");
    assert_eq!(c.price_micro_usd(), 3_930_000);
    assert!(!c.node.spot);
    assert_eq!(c.gpu_backend, GpuBackendKind::Simulated);
    assert_eq!(c.simulated_gpus, ["8xH100-SXM-80GB"]);

    let before = snapshot(&s.root);
    let second = run(&base_args(&s));
    assert!(second.status.success(), "{}", text(&second.stderr));
    assert!(
        text(&second.stdout).contains("nothing to do: already installed"),
        "{}",
        text(&second.stdout)
    );
    assert_eq!(before, snapshot(&s.root), "a second run changed files");

    // A changed value is rewritten, and only the config changes.
    let mut args = base_args(&s);
    let price = args.iter().position(|a| a == "3.93").unwrap();
    args[price] = "2".into();
    args.push("--spot".into());
    let third = run(&args);
    assert!(third.status.success(), "{}", text(&third.stderr));
    let c = load_config(&config);
    assert_eq!(c.price_micro_usd(), 2_000_000);
    assert!(c.node.spot);
    let after = snapshot(&s.root);
    let differing: Vec<_> = before
        .iter()
        .filter(|(path, value)| after.get(*path) != Some(*value))
        .map(|(path, _)| path.clone())
        .collect();
    // The directory holding the config changes too (a file was renamed into it).
    assert!(
        differing.contains(&PathBuf::from("etc/gpufleet/agent.toml")),
        "{differing:?}"
    );
    assert!(
        differing.iter().all(|p| p.starts_with("etc/gpufleet")),
        "{differing:?}"
    );
}

#[test]
fn workload_user_is_written_when_it_exists() {
    let s = setup();
    std::fs::create_dir_all(s.root.join("etc")).unwrap();
    std::fs::write(
        s.root.join("etc/passwd"),
        "trainer:x:1234:1234:ML jobs:/home/trainer:/bin/sh\n",
    )
    .unwrap();
    let config = s.root.join("etc/gpufleet/agent.toml");
    let mut args = base_args(&s);
    args.extend(["--workload-user".to_string(), "trainer".to_string()]);
    let out = run(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        load_config(&config).workload_user.as_deref(),
        Some("trainer")
    );

    // The service user the script creates is accepted before it exists
    // elsewhere; without the flag the key is gone again.
    let mut args = base_args(&s);
    args.extend(["--workload-user".to_string(), "gpufleet".to_string()]);
    let out = run(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        load_config(&config).workload_user.as_deref(),
        Some("gpufleet")
    );
    let out = run(&base_args(&s));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(load_config(&config).workload_user, None);
}

#[test]
fn dry_run_writes_nothing() {
    let s = setup();
    let mut args = base_args(&s);
    args.push("--dry-run".into());
    let out = run(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("would write") && stdout.contains("etc/gpufleet/agent.toml"),
        "{stdout}"
    );
    assert!(
        snapshot(&s.root).is_empty(),
        "dry run wrote {:?}",
        snapshot(&s.root).keys()
    );
}

#[test]
fn bad_flags_are_rejected_before_anything_is_written() {
    let s = setup();
    let replace = |flag: &str, value: &str| {
        let mut args = base_args(&s);
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1] = value.to_string();
        args
    };
    let without = |flag: &str| {
        let mut args = base_args(&s);
        let i = args.iter().position(|a| a == flag).unwrap();
        args.drain(i..i + 2);
        args
    };
    let with = |extra: &[&str]| {
        let mut args = base_args(&s);
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (with(&["--colour", "blue"]), "unknown argument '--colour'"),
        (without("--controller"), "--controller is required"),
        (replace("--controller", "controller:7070"), "--controller"),
        (without("--join-token"), "a join token is required"),
        (replace("--join-token", "has\"quote"), "join token"),
        (with(&["--join-token-file", "/etc/hostname"]), "not both"),
        (without("--provider"), "--provider is required"),
        (replace("--region", "us east"), "--region"),
        (without("--price"), "--price is required"),
        (replace("--price", "-1"), "--price '-1'"),
        (replace("--price", "cheap"), "--price 'cheap'"),
        (replace("--simulated-gpus", "8xH101 "), "--simulated-gpus"),
        (replace("--binary", "/nonexistent/agent"), "--binary"),
        (replace("--root", "/nonexistent/root"), "--root"),
        (with(&["--zone"]), "--zone needs a value"),
        (with(&["--workload-user", "Bad User"]), "--workload-user"),
        (with(&["--workload-user", "root"]), "--workload-user root"),
        (
            with(&["--workload-user", "nosuchuser"]),
            "--workload-user 'nosuchuser' does not exist",
        ),
    ];
    for (args, expected) in cases {
        let out = run(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    assert!(snapshot(&s.root).is_empty());
}

#[test]
fn refuses_without_a_gpu_driver_unless_gpus_are_simulated() {
    let s = setup();
    let mut args = base_args(&s);
    let i = args.iter().position(|a| a == "--simulated-gpus").unwrap();
    args.drain(i..i + 2);
    let driver = s.root.parent().unwrap().join("driver");
    std::fs::create_dir_all(driver.join("usr/lib64")).unwrap();
    std::fs::create_dir_all(driver.join("dev")).unwrap();
    args.extend(["--driver-root".to_string(), driver.display().to_string()]);

    let out = run(&args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("libnvidia-ml.so.1") && stderr.contains("--simulated-gpus"),
        "{stderr}"
    );

    std::fs::write(driver.join("usr/lib64/libnvidia-ml.so.1"), "").unwrap();
    let out = run(&args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/dev/nvidiactl"), "{stderr}");
    assert!(snapshot(&s.root).is_empty());

    // With the library and the control device the NVML backend is configured.
    std::fs::write(driver.join("dev/nvidiactl"), "").unwrap();
    let out = run(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let c = load_config(&s.root.join("etc/gpufleet/agent.toml"));
    assert_eq!(c.gpu_backend, GpuBackendKind::Nvml);
    assert!(c.simulated_gpus.is_empty());
}

#[test]
fn refuses_to_install_into_slash_without_root() {
    let s = setup();
    let mut args = base_args(&s);
    args.drain(0..2); // no --root
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| text(&o.stdout).trim() == "0")
        .unwrap_or(false);
    // As root (CI), drop to nobody; the script comes on stdin so that
    // nobody needs no access to this checkout.
    let mut command = if is_root {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "bash",
            "-s",
            "--",
        ]);
        c
    } else {
        let mut c = Command::new("bash");
        c.args(["-s", "--"]);
        c
    };
    let script = std::fs::File::open(script()).unwrap();
    let out = command
        .args(&args)
        .current_dir("/")
        .stdin(script)
        .output()
        .expect("setpriv (util-linux) and bash are installed");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("must run as root") && stderr.contains("--root DIR"),
        "{stderr}"
    );
}
