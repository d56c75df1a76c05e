//! Loading the controller's config from file, environment and flags.

use std::ffi::OsString;
use std::path::Path;

use super::*;

/// Loads with `file` as `--config`, `env` as the environment and `flags`
/// after it on the command line.
#[cfg(test)]
fn load_with(
    file: Option<&Path>,
    env: &HashMap<String, String>,
    flags: &[&str],
) -> Result<ControllerConfig, ConfigError> {
    let mut argv = vec![OsString::from("gpufleet-controller")];
    if let Some(path) = file {
        argv.push("--config".into());
        argv.push(path.into());
    }
    argv.extend(flags.iter().map(OsString::from));
    ControllerConfig::load(argv, env)
}

mod loading {
    use super::*;

    #[test]
    fn precedence_flag_over_env_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:1\"\ndata_dir = \"/from/file\"\nnode_lost_after = \"5m\"\n",
        )
        .unwrap();
        let env = HashMap::from([("GPUFLEET_LISTEN".to_string(), "127.0.0.1:2".to_string())]);
        let c = load_with(Some(&path), &env, &["--data-dir", "/from/flag"]).unwrap();
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(c.node_lost_after, Duration::from_secs(300));
    }

    #[test]
    fn unknown_key_is_rejected_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listn = \"127.0.0.1:1\"\n").unwrap();
        let err = load_with(Some(&path), &HashMap::new(), &[]).unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let env = HashMap::from([("GPUFLEET_NODE_LOST_AFTER".to_string(), "1s".to_string())]);
        let err = load_with(None, &env, &[]).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid node_lost_after"),
            "{err}"
        );
        let env = HashMap::from([("GPUFLEET_LISTEN".to_string(), "nowhere".to_string())]);
        let err = load_with(None, &env, &[]).unwrap_err();
        assert!(err.to_string().starts_with("invalid listen"), "{err}");
        for bad in ["lots", "512KiB"] {
            let env = HashMap::from([("GPUFLEET_STORE_CACHE".to_string(), bad.to_string())]);
            let err = load_with(None, &env, &[]).unwrap_err();
            assert!(err.to_string().starts_with("invalid store_cache"), "{err}");
        }
        let env = HashMap::from([("GPUFLEET_STORE_CACHE".to_string(), "64MiB".to_string())]);
        let c = load_with(None, &env, &[]).unwrap();
        assert_eq!(c.store_cache_bytes, 64 << 20);
        let again: ControllerSettings = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(again.store_cache.as_deref(), Some("67108864"));
    }

    #[test]
    fn topology_block_label_defaults_may_be_turned_off_and_is_checked() {
        let c = load_with(None, &HashMap::new(), &[]).unwrap();
        assert_eq!(c.topology_block_label, "topology.block");
        let c = load_with(None, &HashMap::new(), &["--topology-block-label", ""]).unwrap();
        assert_eq!(c.topology_block_label, "", "empty: no block preference");
        let env = HashMap::from([(
            "GPUFLEET_TOPOLOGY_BLOCK_LABEL".to_string(),
            "rack\u{7}".to_string(),
        )]);
        let err = load_with(None, &env, &[]).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid topology_block_label"),
            "{err}"
        );
        let long = "k".repeat(129);
        let err = load_with(None, &HashMap::new(), &["--topology-block-label", &long]).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid topology_block_label"),
            "{err}"
        );
    }

    #[test]
    fn telemetry_keys_from_env_and_defaults() {
        let c = load_with(None, &HashMap::new(), &[]).unwrap();
        assert_eq!(c.telemetry_retention, Duration::from_secs(7 * 86_400));
        assert_eq!(c.metrics_listen.to_string(), "127.0.0.1:9401");
        let env = HashMap::from([
            ("GPUFLEET_TELEMETRY_RETENTION".to_string(), "2d".to_string()),
            (
                "GPUFLEET_METRICS_LISTEN".to_string(),
                "0.0.0.0:9999".to_string(),
            ),
        ]);
        let c = load_with(None, &env, &[]).unwrap();
        assert_eq!(c.telemetry_retention, Duration::from_secs(2 * 86_400));
        assert_eq!(c.metrics_listen.port(), 9999);
        let env = HashMap::from([(
            "GPUFLEET_TELEMETRY_RETENTION".to_string(),
            "30s".to_string(),
        )]);
        let err = load_with(None, &env, &[]).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid telemetry_retention"),
            "{err}"
        );
    }

    #[test]
    fn printed_config_round_trips() {
        let c = ControllerConfig::for_data_dir("/d");
        let again: ControllerSettings = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(again.data_dir, Some(PathBuf::from("/d")));
    }
}

mod shipped_config {
    use super::*;

    /// The example in deploy/ must load and match the defaults it documents.
    #[test]
    fn deploy_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/controller.toml");
        let loaded = load_with(Some(&path), &HashMap::new(), &[]).unwrap();
        let defaults = load_with(None, &HashMap::new(), &[]).unwrap();
        assert_eq!(loaded.listen, defaults.listen);
        assert_eq!(loaded.data_dir, defaults.data_dir);
        assert_eq!(loaded.node_not_ready_after, defaults.node_not_ready_after);
        assert_eq!(loaded.node_lost_after, defaults.node_lost_after);
        assert_eq!(loaded.telemetry_retention, defaults.telemetry_retention);
        assert_eq!(loaded.metrics_listen, defaults.metrics_listen);
        assert_eq!(loaded.store_cache_bytes, defaults.store_cache_bytes);
    }
}

mod tls_keys {
    use super::*;

    #[test]
    fn tls_keys_are_checked_together() {
        let env = HashMap::from([("GPUFLEET_TLS_CERT".to_string(), "/c.pem".to_string())]);
        let err = load_with(None, &env, &[]).unwrap_err();
        assert!(err.to_string().starts_with("invalid tls_cert"), "{err}");
        let env = HashMap::from([("GPUFLEET_TLS_CLIENT_CA".to_string(), "/ca.pem".to_string())]);
        let err = load_with(None, &env, &[]).unwrap_err();
        assert!(
            err.to_string().starts_with("invalid tls_client_ca"),
            "{err}"
        );
        let flags = ["--tls-cert", "/c.pem", "--tls-key", "/k.pem"];
        let c = load_with(None, &HashMap::new(), &flags).unwrap();
        assert_eq!(c.tls.key, Some(PathBuf::from("/k.pem")));
    }
}
mod docs {
    use clap::{Args, CommandFactory};

    use super::*;

    /// docs/configuration.md documents every key once, with its flag and
    /// variable, and nothing else.
    #[test]
    fn configuration_doc_matches_the_keys() {
        let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
        let doc = std::fs::read_to_string(&doc_path).unwrap();
        let settings = ControllerSettings::augment_args(clap::Command::new("settings"));
        let flagged: Vec<String> = gpufleet_core::layered::keys(&settings)
            .into_iter()
            .map(|k| k.name)
            .collect();
        let file_only: Vec<&str> = gpufleet_core::layered::file_keys::<ControllerSettings>()
            .iter()
            .copied()
            .filter(|k| !flagged.iter().any(|f| f == k))
            .collect();
        assert_eq!(file_only, ["queues", "generation_factors", "tenants"]);
        let problems = gpufleet_core::layered::check_docs(
            &doc,
            "controller",
            &ControllerCli::command(),
            &settings,
            &file_only,
        );
        assert!(
            problems.is_empty(),
            "docs/configuration.md is out of step with controller/src/config/settings.rs:\n{}",
            problems.join("\n")
        );
    }

    #[test]
    fn flags_and_env_layer_and_bad_values_name_the_key() {
        let env = HashMap::from([(
            "GPUFLEET_RATE_LIMIT_PER_TOKEN".to_string(),
            " 7 ".to_string(),
        )]);
        let c = load_with(None, &env, &[]).unwrap();
        assert_eq!(c.rate_limit.map(|r| r.per_second), Some(7.0));
        let c = load_with(None, &env, &["--rate-limit-per-token", "0"]).unwrap();
        assert!(c.rate_limit.is_none());
        let env = HashMap::from([("GPUFLEET_RATE_LIMIT_BURST".to_string(), "lots".to_string())]);
        let err = load_with(None, &env, &[]).unwrap_err().to_string();
        assert!(
            err.starts_with("invalid rate_limit_burst")
                && err.contains("GPUFLEET_RATE_LIMIT_BURST"),
            "{err}"
        );
        let loaded = load(
            ["gpufleet-controller", "--print-config"],
            &HashMap::from([("GPUFLEET_LOG_FORMAT".to_string(), "json".to_string())]),
        )
        .unwrap();
        assert!(loaded.print_config);
        assert_eq!(loaded.log_format, "json");
    }
}
