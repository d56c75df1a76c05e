//! The node secret the controller issues at this node's first registration.
//! It binds the node id to this agent: presented in every hello, it keeps
//! another agent (even one with the join token) from taking the id over.
//! Kept in the data dir, readable by the agent's user only.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct NodeSecret {
    path: PathBuf,
    value: Arc<Mutex<String>>,
}

impl NodeSecret {
    /// Reads `node.secret` in `data_dir`; empty before the first
    /// registration.
    pub fn load(data_dir: &Path) -> std::io::Result<Self> {
        let path = data_dir.join("node.secret");
        let value = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            path,
            value: Arc::new(Mutex::new(value)),
        })
    }

    pub fn get(&self) -> String {
        self.value
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Stores a newly issued secret (mode 0600, via a temporary file).
    pub fn save(&self, secret: &str) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let tmp = self.path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(secret.as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        *self
            .value
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = secret.to_string();
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_secret_is_private_and_reloads() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let secret = NodeSecret::load(dir.path()).unwrap();
        assert_eq!(secret.get(), "");
        secret.save("gfn_abc").unwrap();
        let mode = std::fs::metadata(secret.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(NodeSecret::load(dir.path()).unwrap().get(), "gfn_abc");
    }
}
