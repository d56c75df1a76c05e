//! Registry credentials per tenant: what an image job's
//! `registry_secret` names. Stored in the store's settings under
//! `registry-secret/<tenant>/<name>` (write first, then the in-memory copy),
//! served without their passwords, and resolved into a `RegistryAuth`
//! only when a desired state goes to the agent that pulls
//! (`state/sessions.rs`), so no job record, allocation record or log line
//! ever holds one.

use std::collections::BTreeMap;
use std::sync::RwLock;

use gpufleet_proto::v1::{RegistryAuth, RegistrySecret, StoredRegistrySecret};

use crate::error::{ControllerError, Result};
use crate::store::{self, IdRange, Keyspace, Store, WriteBatch};

/// Key prefix in [`Keyspace::Settings`].
const PREFIX: &str = "registry-secret/";
/// Secrets one tenant may keep.
pub const SECRETS_PER_TENANT: usize = 64;
/// A registry host name.
pub const REGISTRY_BYTES: usize = 255;
/// A user name, and a password or access token (registry tokens are JWTs
/// of a few KiB at most).
pub const USERNAME_BYTES: usize = 256;
pub const PASSWORD_BYTES: usize = 8 * 1024;

/// Every tenant's registry secrets, by (tenant, name).
#[derive(Debug, Default)]
pub struct RegistrySecrets {
    secrets: RwLock<BTreeMap<(String, String), StoredRegistrySecret>>,
}

fn key(tenant: &str, name: &str) -> String {
    format!("{PREFIX}{tenant}/{name}")
}

impl RegistrySecrets {
    /// Reads them back from the store.
    pub fn load(store: &dyn Store) -> Result<Self> {
        let mut secrets = BTreeMap::new();
        store::visit::<StoredRegistrySecret>(
            store,
            Keyspace::Settings,
            IdRange::prefixed(PREFIX),
            |id, record| {
                if !id.starts_with(PREFIX) {
                    return Ok(false);
                }
                if let Some(info) = &record.info {
                    secrets.insert((info.tenant.clone(), info.name.clone()), record);
                }
                Ok(true)
            },
        )?;
        Ok(Self {
            secrets: RwLock::new(secrets),
        })
    }

    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, BTreeMap<(String, String), StoredRegistrySecret>> {
        self.secrets.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates or replaces `secret` (its tenant, name, registry and user
    /// name) with `password`; `now_unix` stamps it.
    pub fn put(
        &self,
        store: &dyn Store,
        secret: RegistrySecret,
        password: &str,
        now_unix: u64,
    ) -> Result<RegistrySecret> {
        let (tenant, name) = (secret.tenant.as_str(), secret.name.as_str());
        let (registry, username) = (secret.registry.as_str(), secret.username.as_str());
        crate::validate::tenant_name(tenant)?;
        gpufleet_core::container::check_secret_name("name", name)
            .map_err(|v| ControllerError::invalid(v.field, v.message))?;
        check_text("registry", registry, REGISTRY_BYTES)?;
        if registry.is_empty()
            || !registry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
        {
            return Err(ControllerError::invalid(
                "registry",
                "must be a registry host such as ghcr.io or registry.example.com:5000",
            ));
        }
        check_text("username", username, USERNAME_BYTES)?;
        check_text("password", password, PASSWORD_BYTES)?;
        if password.is_empty() {
            return Err(ControllerError::invalid("password", "is required"));
        }
        let mut secrets = self.secrets.write().unwrap_or_else(|e| e.into_inner());
        let exists = secrets.contains_key(&(tenant.to_string(), name.to_string()));
        let count = secrets.keys().filter(|(t, _)| t == tenant).count();
        if !exists && count >= SECRETS_PER_TENANT {
            return Err(ControllerError::ResourceExhausted(format!(
                "tenant {tenant:?} already has {SECRETS_PER_TENANT} registry secrets; delete one first"
            )));
        }
        let info = RegistrySecret {
            updated_at: Some(prost_types::Timestamp {
                seconds: i64::try_from(now_unix).unwrap_or(i64::MAX),
                nanos: 0,
            }),
            ..secret.clone()
        };
        let record = StoredRegistrySecret {
            info: Some(info.clone()),
            password: password.to_string(),
        };
        let mut batch = WriteBatch::default();
        batch.put(Keyspace::Settings, &key(tenant, name), &record);
        store.apply(batch)?;
        secrets.insert((tenant.to_string(), name.to_string()), record);
        Ok(info)
    }

    /// Deletes one; gone already is NotFound.
    pub fn delete(&self, store: &dyn Store, tenant: &str, name: &str) -> Result<RegistrySecret> {
        let mut secrets = self.secrets.write().unwrap_or_else(|e| e.into_inner());
        let id = (tenant.to_string(), name.to_string());
        let Some(record) = secrets.get(&id) else {
            return Err(ControllerError::NotFound(format!(
                "tenant {tenant:?} has no registry secret {name:?}"
            )));
        };
        let info = record.info.clone().unwrap_or_default();
        let mut batch = WriteBatch::default();
        batch.delete(Keyspace::Settings, &key(tenant, name));
        store.apply(batch)?;
        secrets.remove(&id);
        Ok(info)
    }

    /// A tenant's secrets (every tenant's with `None`), without passwords.
    pub fn list(&self, tenant: Option<&str>) -> Vec<RegistrySecret> {
        self.read()
            .iter()
            .filter(|((t, _), _)| tenant.is_none_or(|want| want == t))
            .filter_map(|(_, record)| record.info.clone())
            .collect()
    }

    /// Whether the tenant has a secret of that name.
    pub fn exists(&self, tenant: &str, name: &str) -> bool {
        self.read()
            .contains_key(&(tenant.to_string(), name.to_string()))
    }

    /// The credential an agent pulls with.
    pub fn resolve(&self, tenant: &str, name: &str) -> Option<RegistryAuth> {
        self.read()
            .get(&(tenant.to_string(), name.to_string()))
            .map(|record| {
                let info = record.info.clone().unwrap_or_default();
                RegistryAuth {
                    registry: info.registry,
                    username: info.username,
                    password: record.password.clone(),
                }
            })
    }
}

fn check_text(field: &str, value: &str, max: usize) -> Result<()> {
    gpufleet_core::limits::check_bytes(field, value, max)
        .map_err(|v| ControllerError::invalid(v.field, v.message))?;
    if value.chars().any(char::is_control) {
        return Err(ControllerError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn secret(tenant: &str, name: &str, registry: &str, username: &str) -> RegistrySecret {
        RegistrySecret {
            tenant: tenant.into(),
            name: name.into(),
            registry: registry.into(),
            username: username.into(),
            updated_at: None,
        }
    }

    #[test]
    fn secrets_are_kept_per_tenant_served_without_passwords_and_survive_a_restart() {
        let store = MemoryStore::default();
        let secrets = RegistrySecrets::load(&store).unwrap();
        let info = secrets
            .put(
                &store,
                secret("team-a", "ghcr", "ghcr.io", "bot"),
                "s3cret",
                100,
            )
            .unwrap();
        assert_eq!(info.registry, "ghcr.io");
        secrets
            .put(
                &store,
                secret("team-b", "ghcr", "ghcr.io", "other"),
                "x",
                100,
            )
            .unwrap();
        let listed = secrets.list(Some("team-a"));
        assert_eq!(listed.len(), 1);
        assert!(!format!("{listed:?}").contains("s3cret"));
        let again = RegistrySecrets::load(&store).unwrap();
        let auth = again.resolve("team-a", "ghcr").unwrap();
        assert_eq!(
            (auth.username.as_str(), auth.password.as_str()),
            ("bot", "s3cret")
        );
        assert!(again.resolve("team-c", "ghcr").is_none());
        again.delete(&store, "team-a", "ghcr").unwrap();
        assert!(
            !RegistrySecrets::load(&store)
                .unwrap()
                .exists("team-a", "ghcr")
        );
        assert!(matches!(
            again.delete(&store, "team-a", "ghcr"),
            Err(ControllerError::NotFound(_))
        ));
    }

    #[test]
    fn bad_input_names_the_field() {
        let store = MemoryStore::default();
        let secrets = RegistrySecrets::default();
        let field = |r: Result<RegistrySecret>| match r {
            Err(ControllerError::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(secrets.put(&store, secret("t", "../x", "ghcr.io", "u"), "p", 0)),
            "name"
        );
        assert_eq!(
            field(secrets.put(&store, secret("t", "x", "https://ghcr.io", "u"), "p", 0)),
            "registry"
        );
        assert_eq!(
            field(secrets.put(&store, secret("t", "x", "ghcr.io", "u"), "", 0)),
            "password"
        );
        let long = "p".repeat(PASSWORD_BYTES + 1);
        assert_eq!(
            field(secrets.put(&store, secret("t", "x", "ghcr.io", "u"), &long, 0)),
            "password"
        );
    }
}
