//! The `store` key and the etcd keys beside it: which backend holds the
//! controller's state, and how the etcd one is reached (docs/ha.md).

use std::path::PathBuf;
use std::time::Duration;

use super::settings::ControllerSettings;
use crate::store::etcd::{EtcdAuth, EtcdOptions, EtcdTls};
use gpufleet_core::layered::ConfigError;

pub const DEFAULT_ETCD_PREFIX: &str = "/gpufleet/";
pub const DEFAULT_LEADER_LEASE: Duration = Duration::from_secs(3);
/// Longest etcd_endpoints list.
const MAX_ENDPOINTS: usize = 16;

/// Where the state lives.
#[derive(Debug, Clone, Default)]
pub enum StoreConfig {
    /// Embedded, in the data dir: one controller.
    #[default]
    Sled,
    /// etcd, shared by several controllers with leader election.
    Etcd(Box<EtcdConfig>),
}

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub options: EtcdOptions,
    /// The password file, kept for `--print-config` (the password is not).
    pub password_file: Option<PathBuf>,
    pub leader_lease: Duration,
    /// None: `http(s)://` + the bound listen address.
    pub advertise_url: Option<String>,
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Checks the store keys of `file`.
pub(super) fn store_config(file: &ControllerSettings) -> Result<StoreConfig, ConfigError> {
    let etcd_keys_given = file.etcd_endpoints.is_some()
        || file.etcd_ca_file.is_some()
        || file.etcd_cert_file.is_some()
        || file.etcd_username.is_some()
        || file.leader_lease.is_some();
    match file.store.as_deref().unwrap_or("sled") {
        "sled" => {
            if etcd_keys_given {
                return Err(invalid(
                    "store",
                    "etcd_* keys are set but store is \"sled\": set store = \"etcd\" or remove them",
                ));
            }
            Ok(StoreConfig::Sled)
        }
        "etcd" => etcd_config(file).map(|etcd| StoreConfig::Etcd(Box::new(etcd))),
        other => Err(invalid(
            "store",
            format!("{other:?} is not a store; accepted: sled, etcd"),
        )),
    }
}

fn etcd_config(file: &ControllerSettings) -> Result<EtcdConfig, ConfigError> {
    let endpoints: Vec<String> = file
        .etcd_endpoints
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect();
    if endpoints.is_empty() {
        return Err(invalid(
            "etcd_endpoints",
            "store = \"etcd\" needs the etcd members' URLs, e.g. \"https://10.0.0.1:2379,https://10.0.0.2:2379\"",
        ));
    }
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(invalid(
            "etcd_endpoints",
            format!("at most {MAX_ENDPOINTS} members"),
        ));
    }
    for endpoint in &endpoints {
        if !["http://", "https://", "unix://"]
            .iter()
            .any(|scheme| endpoint.starts_with(scheme))
        {
            return Err(invalid(
                "etcd_endpoints",
                format!("{endpoint:?} is not an http://, https:// or unix:// URL"),
            ));
        }
    }
    let prefix = file
        .etcd_prefix
        .clone()
        .unwrap_or_else(|| DEFAULT_ETCD_PREFIX.to_string());
    if prefix.is_empty() || !prefix.ends_with('/') || prefix.len() > 256 {
        return Err(invalid(
            "etcd_prefix",
            format!("{prefix:?} must end in '/' and be at most 256 bytes, e.g. \"/gpufleet/\""),
        ));
    }
    let tls = match (
        &file.etcd_ca_file,
        &file.etcd_cert_file,
        &file.etcd_key_file,
    ) {
        (None, None, None) => None,
        (Some(ca), cert, key) => {
            if cert.is_some() != key.is_some() {
                return Err(invalid(
                    "etcd_cert_file",
                    "etcd_cert_file and etcd_key_file go together",
                ));
            }
            Some(EtcdTls {
                ca_file: ca.clone(),
                client_cert: cert.clone().zip(key.clone()),
            })
        }
        (None, _, _) => {
            return Err(invalid(
                "etcd_ca_file",
                "a client certificate for etcd needs etcd_ca_file (the CA of etcd's certificates)",
            ));
        }
    };
    let auth = match (&file.etcd_username, &file.etcd_password_file) {
        (None, None) => None,
        (Some(username), Some(path)) => {
            let password = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    "etcd_password_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            Some(EtcdAuth {
                username: username.clone(),
                password: password.trim_end_matches(['\n', '\r']).to_string(),
            })
        }
        _ => {
            return Err(invalid(
                "etcd_username",
                "etcd_username and etcd_password_file go together",
            ));
        }
    };
    let leader_lease = match &file.leader_lease {
        None => DEFAULT_LEADER_LEASE,
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| invalid("leader_lease", format!("{text:?} is not a duration: {e}")))?,
    };
    if leader_lease < Duration::from_secs(2) || leader_lease > Duration::from_secs(60) {
        return Err(invalid(
            "leader_lease",
            "must be between 2s and 60s (etcd leases have whole seconds)",
        ));
    }
    if let Some(url) = &file.advertise_url
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return Err(invalid(
            "advertise_url",
            format!("{url:?} is not an http:// or https:// URL"),
        ));
    }
    let mut options = EtcdOptions::new(endpoints, prefix);
    options.tls = tls;
    options.auth = auth;
    Ok(EtcdConfig {
        options,
        password_file: file.etcd_password_file.clone(),
        leader_lease,
        advertise_url: file.advertise_url.clone(),
    })
}

/// The store keys of `config`, for `--print-config`.
pub(super) fn store_settings(config: &StoreConfig, file: &mut ControllerSettings) {
    match config {
        StoreConfig::Sled => file.store = Some("sled".into()),
        StoreConfig::Etcd(etcd) => {
            file.store = Some("etcd".into());
            file.etcd_endpoints = Some(etcd.options.endpoints.join(","));
            file.etcd_prefix = Some(etcd.options.prefix.clone());
            if let Some(tls) = &etcd.options.tls {
                file.etcd_ca_file = Some(tls.ca_file.clone());
                if let Some((cert, key)) = &tls.client_cert {
                    file.etcd_cert_file = Some(cert.clone());
                    file.etcd_key_file = Some(key.clone());
                }
            }
            if let Some(auth) = &etcd.options.auth {
                file.etcd_username = Some(auth.username.clone());
                file.etcd_password_file = etcd.password_file.clone();
            }
            file.leader_lease = Some(humantime::format_duration(etcd.leader_lease).to_string());
            file.advertise_url = etcd.advertise_url.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(store: &str, endpoints: Option<&str>) -> ControllerSettings {
        ControllerSettings {
            store: Some(store.into()),
            etcd_endpoints: endpoints.map(str::to_string),
            ..ControllerSettings::default()
        }
    }

    fn error(file: &ControllerSettings) -> String {
        match store_config(file) {
            Err(e) => e.to_string(),
            Ok(config) => panic!("accepted: {config:?}"),
        }
    }

    #[test]
    fn etcd_needs_endpoints_and_every_mistake_names_its_key() {
        assert!(error(&settings("etcd", None)).contains("etcd_endpoints"));
        assert!(error(&settings("etcd", Some("10.0.0.1:2379"))).contains("etcd_endpoints"));
        assert!(error(&settings("zookeeper", None)).contains("store"));
        assert!(error(&settings("sled", Some("http://a:2379"))).contains("store"));
        let mut file = settings("etcd", Some("http://a:2379"));
        file.leader_lease = Some("1s".into());
        assert!(error(&file).contains("leader_lease"));
        file.leader_lease = None;
        file.etcd_prefix = Some("gpufleet".into());
        assert!(error(&file).contains("etcd_prefix"));
        file.etcd_prefix = None;
        file.etcd_username = Some("root".into());
        assert!(error(&file).contains("etcd_username"));
    }

    #[test]
    fn etcd_settings_survive_print_config() {
        let file = settings("etcd", Some("https://a:2379, https://b:2379"));
        let config = store_config(&file).unwrap();
        let StoreConfig::Etcd(etcd) = &config else {
            panic!("not etcd: {config:?}");
        };
        assert_eq!(etcd.options.endpoints, ["https://a:2379", "https://b:2379"]);
        assert_eq!(etcd.options.prefix, DEFAULT_ETCD_PREFIX);
        assert_eq!(etcd.leader_lease, DEFAULT_LEADER_LEASE);
        let mut printed = ControllerSettings::default();
        store_settings(&config, &mut printed);
        let again = store_config(&printed).unwrap();
        let StoreConfig::Etcd(again) = again else {
            panic!("not etcd");
        };
        assert_eq!(again.options.endpoints, etcd.options.endpoints);
        assert_eq!(again.leader_lease, etcd.leader_lease);
    }
}
