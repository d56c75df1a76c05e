//! Loading the agent's config from file, environment and flags.

use std::collections::BTreeSet;
use std::path::Path;

use super::*;

/// Loads with `vars` as the environment and `flags` as the command line.
fn load_with(vars: &[(&str, &str)], flags: &[&str]) -> Result<AgentConfig, ConfigError> {
    let argv = std::iter::once("gpufleet-agent").chain(flags.iter().copied());
    AgentConfig::load(argv, &env(vars))
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn defaults_apply_without_any_source() {
    let c = load_with(&[], &[]).unwrap();
    assert_eq!(c.controller, DEFAULT_CONTROLLER);
    assert_eq!(c.node.provider, "onprem");
    assert_eq!(c.node.region, "local");
    assert_eq!(c.node.id, None);
    assert_eq!(c.gpu_backend, GpuBackendKind::Nvml);
    assert_eq!(c.sample_interval, Duration::from_secs(5));
    assert_eq!(c.stop_grace_period, Duration::from_secs(10));
    assert_eq!(c.listen, "127.0.0.1:7071".parse().unwrap());
    assert_eq!(c.outbox_max_bytes, 64 * 1024 * 1024);
}

#[test]
fn outbox_bound_takes_a_number_or_a_size_from_every_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "outbox_max_bytes = 1048576\n").unwrap();
    let from_file = |env: &[(&str, &str)]| {
        let mut pairs = vec![("GPUFLEET_CONFIG", file.to_str().unwrap())];
        pairs.extend_from_slice(env);
        load_with(&pairs, &[]).unwrap()
    };
    assert_eq!(from_file(&[]).outbox_max_bytes, 1 << 20);
    assert_eq!(
        from_file(&[("GPUFLEET_OUTBOX_MAX_BYTES", "2 MiB")]).outbox_max_bytes,
        2 << 20
    );
    std::fs::write(&file, "outbox_max_bytes = \"512KiB\"\n").unwrap();
    assert_eq!(from_file(&[]).outbox_max_bytes, 512 << 10);
    let c = load_with(
        &[("GPUFLEET_OUTBOX_MAX_BYTES", "5MiB")],
        &["--outbox-max-bytes", "1GB"],
    )
    .unwrap();
    assert_eq!(c.outbox_max_bytes, 1_000_000_000);
    std::fs::write(&file, "outbox_max_byte = 5\n").unwrap();
    let err = load_with(&[("GPUFLEET_CONFIG", file.to_str().unwrap())], &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("outbox_max_byte"), "{err}");
}

#[test]
fn flag_beats_env_beats_file() {
    let path = fixture("full.toml");
    let e = [
        ("GPUFLEET_CONFIG", path.to_str().unwrap()),
        ("GPUFLEET_REGION", "eu-west-1"),
        ("GPUFLEET_ZONE", "eu-west-1b"),
        ("GPUFLEET_LABELS", "team=ml, tier=gold"),
        ("GPUFLEET_SAMPLE_INTERVAL", "2s"),
    ];
    let c = load_with(&e, &["--zone", "eu-west-1c", "--spot", "false"]).unwrap();
    // File only.
    assert_eq!(c.node.provider, "aws");
    assert_eq!(c.node.id.as_deref(), Some("gpu-node-1"));
    assert_eq!(c.simulated_gpus, ["8xH100-SXM-80GB"]);
    assert_eq!(c.gpu_backend, GpuBackendKind::Simulated);
    assert!((c.node.price_per_gpu_hour_usd - 3.93).abs() < 1e-9);
    assert_eq!(c.price_micro_usd(), 3_930_000);
    assert_eq!(c.stop_grace_period, Duration::from_secs(30));
    assert_eq!(c.log_max_bytes, 16 << 20);
    assert_eq!(c.log_retention, Some(Duration::from_secs(3 * 24 * 3600)));
    assert_eq!(c.max_concurrent_starts, 4);
    // Env over file.
    assert_eq!(c.node.region, "eu-west-1");
    assert_eq!(c.sample_interval, Duration::from_secs(2));
    assert_eq!(
        c.node.labels,
        BTreeMap::from([("team".into(), "ml".into()), ("tier".into(), "gold".into())])
    );
    // Flag over env and file (the file says spot = true).
    assert_eq!(c.node.zone, "eu-west-1c");
    assert!(!c.node.spot);
}

#[test]
fn unknown_key_is_named() {
    let path = fixture("unknown_key.toml");
    let err = load_with(&[], &["--config", path.to_str().unwrap()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("sample_intervall"), "{err}");
    assert!(!err.contains('\n'), "{err}");
}

#[test]
fn bad_values_are_rejected() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "GPUFLEET_PRICE_PER_GPU_HOUR",
            "-1",
            "price_per_gpu_hour_usd",
        ),
        (
            "GPUFLEET_PRICE_PER_GPU_HOUR",
            "NaN",
            "price_per_gpu_hour_usd",
        ),
        (
            "GPUFLEET_PRICE_PER_GPU_HOUR",
            "cheap",
            "price_per_gpu_hour_usd",
        ),
        ("GPUFLEET_SAMPLE_INTERVAL", "0s", "sample_interval"),
        ("GPUFLEET_SAMPLE_INTERVAL", "soon", "sample_interval"),
        ("GPUFLEET_PROVIDER", " ", "provider"),
        ("GPUFLEET_REGION", "", "region"),
        ("GPUFLEET_GPU_BACKEND", "cuda", "gpu_backend"),
        ("GPUFLEET_LISTEN", "localhost", "listen"),
        ("GPUFLEET_CONTROLLER", "controller:7070", "controller"),
        ("GPUFLEET_LABELS", "novalue", "labels"),
        ("GPUFLEET_SPOT", "maybe", "spot"),
        ("GPUFLEET_OUTBOX_MAX_BYTES", "0", "outbox_max_bytes"),
        ("GPUFLEET_OUTBOX_MAX_BYTES", "lots", "outbox_max_bytes"),
        ("GPUFLEET_OUTBOX_MAX_BYTES", "64PiB", "outbox_max_bytes"),
        (
            "GPUFLEET_OUTBOX_MAX_BYTES",
            "99999999999GiB",
            "outbox_max_bytes",
        ),
        ("GPUFLEET_LOG_MAX_BYTES", "lots", "log_max_bytes"),
        ("GPUFLEET_LOG_MAX_BYTES", "64TiB", "log_max_bytes"),
        ("GPUFLEET_LOG_MAX_BYTES", "0", "log_max_bytes"),
        (
            "GPUFLEET_MAX_CONCURRENT_STARTS",
            "0",
            "max_concurrent_starts",
        ),
        (
            "GPUFLEET_MAX_CONCURRENT_STARTS",
            "-1",
            "max_concurrent_starts",
        ),
        (
            "GPUFLEET_MAX_CONCURRENT_STARTS",
            "many",
            "max_concurrent_starts",
        ),
        (
            "GPUFLEET_MAX_CONCURRENT_STARTS",
            "99999999999999999999",
            "max_concurrent_starts",
        ),
        (
            "GPUFLEET_MAX_CONCURRENT_STARTS",
            "1025",
            "max_concurrent_starts",
        ),
    ];
    for (var, value, key) in cases {
        let err = load_with(&[(var, value)], &[]).unwrap_err().to_string();
        assert!(err.contains(key), "{var}={value}: {err}");
    }
    let err = load_with(
        &[
            ("GPUFLEET_GPU_BACKEND", "simulated"),
            ("GPUFLEET_SIMULATED_GPUS", "2xH101"),
        ],
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("H100-SXM-80GB"), "{err}");
}

#[test]
fn monitoring_keys_parse_and_are_checked() {
    let c = load_with(
        &[
            ("GPUFLEET_METRICS_LISTEN", "off"),
            ("GPUFLEET_CRITICAL_XIDS", "79, 48"),
            ("GPUFLEET_EXPECTED_GPU_COUNT", "8"),
            ("GPUFLEET_HEALTH_CLEAN_PERIOD", "2m"),
            ("GPUFLEET_NVML_LIBRARY_PATH", "/opt/libnvidia-ml.so.1"),
        ],
        &[],
    )
    .unwrap();
    let m = &c.monitoring;
    assert_eq!(m.metrics_listen, None);
    assert_eq!(m.health.critical_xids, BTreeSet::from([48, 79]));
    assert_eq!(m.health.expected_gpu_count, Some(8));
    assert_eq!(m.health.clean_period, Duration::from_secs(120));
    assert_eq!(
        m.nvml_library_path.as_deref(),
        Some(Path::new("/opt/libnvidia-ml.so.1"))
    );
    let d = load_with(&[], &[]).unwrap();
    assert_eq!(
        d.monitoring.metrics_listen,
        Some("127.0.0.1:9400".parse().unwrap())
    );
    assert!(d.monitoring.read_kmsg);
    for (var, value, key) in [
        ("GPUFLEET_METRICS_LISTEN", "9400", "metrics_listen"),
        ("GPUFLEET_CRITICAL_XIDS", "79,x", "health.critical_xids"),
        ("GPUFLEET_CRITICAL_XIDS", "13", "health.critical_xids"),
        ("GPUFLEET_HEALTH_CLEAN_PERIOD", "0s", "health.clean_period"),
        (
            "GPUFLEET_EXPECTED_GPU_COUNT",
            "-1",
            "health.expected_gpu_count",
        ),
    ] {
        let err = load_with(&[(var, value)], &[]).unwrap_err().to_string();
        assert!(err.contains(key), "{var}={value}: {err}");
    }
}

#[test]
fn max_concurrent_starts_comes_from_the_file_env_or_flag() {
    let load = |vars: &[(&str, &str)], flag: Option<&str>| {
        let flags: Vec<&str> = flag
            .map(|f| vec!["--max-concurrent-starts", f])
            .unwrap_or_default();
        load_with(vars, &flags).unwrap().max_concurrent_starts
    };
    assert_eq!(load(&[], None), 16);
    assert_eq!(load(&[("GPUFLEET_MAX_CONCURRENT_STARTS", " 2 ")], None), 2);
    assert_eq!(
        load(&[("GPUFLEET_MAX_CONCURRENT_STARTS", "2")], Some("1024")),
        1024
    );
    let err = load_with(&[], &["--max-concurrent-starts", "0"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("max_concurrent_starts") && err.contains("from 1 to 1024"),
        "{err}"
    );
}

#[test]
fn log_max_bytes_takes_sizes_with_units() {
    let load = |value: &str| {
        load_with(&[("GPUFLEET_LOG_MAX_BYTES", value)], &[])
            .unwrap()
            .log_max_bytes
    };
    assert_eq!(load("1000"), 1000);
    assert_eq!(load("64MiB"), 64 << 20);
    assert_eq!(load(" 2 G "), 2 << 30);
    assert_eq!(load("512k"), 512 << 10);
    let d = load_with(&[], &[]).unwrap();
    assert_eq!(d.log_max_bytes, 64 << 20);
    assert_eq!(d.shim_program, None);
    assert!(
        d.keep_workloads_on_exit,
        "agent restarts keep jobs by default"
    );
    let stop = load_with(&[("GPUFLEET_KEEP_WORKLOADS_ON_EXIT", "false")], &[]).unwrap();
    assert!(!stop.keep_workloads_on_exit);
}

#[test]
fn log_retention_takes_a_duration_or_off_from_every_source() {
    let load = |env_value: Option<&str>, flag: Option<&str>| {
        let vars: Vec<(&str, &str)> = env_value
            .map(|v| ("GPUFLEET_LOG_RETENTION", v))
            .into_iter()
            .collect();
        let flags: Vec<&str> = flag.map(|f| vec!["--log-retention", f]).unwrap_or_default();
        load_with(&vars, &flags).map(|c| c.log_retention)
    };
    assert_eq!(load(None, None).unwrap(), Some(DEFAULT_LOG_RETENTION));
    assert_eq!(
        load(Some("12h"), None).unwrap(),
        Some(Duration::from_secs(12 * 3600))
    );
    assert_eq!(load(Some("12h"), Some(" OFF ")).unwrap(), None);
    assert_eq!(load(None, Some("1m")).unwrap(), Some(MIN_LOG_RETENTION));
    for bad in ["30s", "0s", "soon", ""] {
        let err = load(Some(bad), None).unwrap_err().to_string();
        assert!(err.contains("log_retention"), "{bad:?}: {err}");
    }
    let err = load(Some("30s"), None).unwrap_err().to_string();
    assert!(err.contains("at least 1m") && err.contains("off"), "{err}");
    let err = load(Some("soon"), None).unwrap_err().to_string();
    assert!(err.contains("\"7d\""), "{err}");
}

#[test]
fn missing_file_is_an_error() {
    let path = fixture("does-not-exist.toml");
    let err = load_with(&[], &["--config", path.to_str().unwrap()]).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
}

#[test]
fn example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
    load_with(&[], &["--config", path.to_str().unwrap()]).unwrap();
}

#[test]
fn a_bad_flag_value_is_one_line_naming_the_key_and_its_source() {
    let err = load_with(&[], &["--spot", "maybe"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("node.spot") && err.contains("--spot"), "{err}");
    assert!(!err.contains('\n'), "{err}");
    let err = load_with(&[("GPUFLEET_SPOT", "maybe")], &[])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("node.spot") && err.contains("GPUFLEET_SPOT"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
    // A flag that does not exist is clap's (usage, exit code 2).
    let err = load_with(&[], &["--no-such-flag"]).unwrap_err();
    assert!(matches!(err, ConfigError::Usage(_)), "{err}");
}

#[test]
fn bare_spot_flag_means_true_and_log_format_layers() {
    assert!(load_with(&[], &["--spot"]).unwrap().node.spot);
    let loaded = load(["gpufleet-agent"], &env(&[("GPUFLEET_LOG_FORMAT", "json")])).unwrap();
    assert_eq!(loaded.log_format, LogFormat::Json);
    let loaded = load(
        ["gpufleet-agent", "--log-format", "text"],
        &env(&[("GPUFLEET_LOG_FORMAT", "json")]),
    )
    .unwrap();
    assert_eq!(loaded.log_format, LogFormat::Text);
}

/// docs/configuration.md documents every key once, with its flag and
/// variable, and nothing else.
#[test]
fn configuration_doc_matches_the_keys() {
    use clap::Args;
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
    let doc = std::fs::read_to_string(&doc_path).unwrap();
    let settings = AgentSettings::augment_args(clap::Command::new("settings"));
    let problems =
        gpufleet_core::layered::check_docs(&doc, "agent", &AgentCli::command(), &settings, &[]);
    assert!(
        problems.is_empty(),
        "docs/configuration.md is out of step with agent/src/config/settings.rs:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_file_key_is_a_flag_and_a_variable() {
    for key in gpufleet_core::layered::keys(&AgentCli::command()) {
        assert!(key.flag.is_some() && key.env.is_some(), "{key:?}");
        assert!(
            key.env
                .as_deref()
                .is_some_and(|e| e.starts_with("GPUFLEET_")),
            "{key:?}"
        );
    }
}

#[test]
fn the_default_advertised_address_is_a_private_one() {
    use std::net::IpAddr;
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let ifs = |list: &[(&str, &str)]| -> Vec<(String, IpAddr)> {
        list.iter().map(|(n, a)| (n.to_string(), ip(a))).collect()
    };
    // A host with a public and a private interface; the default route's
    // source is the public one: the private one is advertised.
    let host = ifs(&[
        ("lo", "127.0.0.1"),
        ("eth0", "203.0.113.7"),
        ("eth1", "10.1.2.3"),
        ("eth1", "fd00::3"),
    ]);
    assert_eq!(
        choose_advertise_address(Some(ip("203.0.113.7")), &host),
        Ok("10.1.2.3".into())
    );
    // The default route's own source wins when it is private.
    let two_private = ifs(&[("eth0", "192.168.1.5"), ("eth1", "172.20.0.9")]);
    assert_eq!(
        choose_advertise_address(Some(ip("172.20.0.9")), &two_private),
        Ok("172.20.0.9".into())
    );
    // IPv4 before IPv6; an IPv6 ULA when it is all there is.
    assert_eq!(
        choose_advertise_address(None, &ifs(&[("eth0", "fd12::1"), ("eth1", "192.168.7.7")])),
        Ok("192.168.7.7".into())
    );
    assert_eq!(
        choose_advertise_address(None, &ifs(&[("eth0", "2001:db8::1"), ("eth0", "fd12::1")])),
        Ok("fd12::1".into())
    );
    // Not private: 172.32/12's neighbour, link-local, CGNAT, loopback.
    let public_only = ifs(&[
        ("lo", "127.0.0.1"),
        ("eth0", "172.32.0.1"),
        ("eth0", "169.254.1.1"),
        ("eth0", "fe80::1"),
        ("tailscale0", "100.64.0.1"),
    ]);
    let (address, why) = choose_advertise_address(Some(ip("172.32.0.1")), &public_only)
        .expect_err("no private address");
    assert_eq!(
        address, "172.32.0.1",
        "the public route source, with a warning"
    );
    assert!(why.contains("not private"), "{why}");
    let (address, why) = choose_advertise_address(None, &public_only).expect_err("nothing");
    assert_eq!(address, "127.0.0.1");
    assert!(why.contains("no default route"), "{why}");
    let (address, _) =
        choose_advertise_address(Some(ip("127.0.0.1")), &[]).expect_err("loopback only");
    assert_eq!(address, "127.0.0.1");
}
