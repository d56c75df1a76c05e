//! The image flags of `gpufleet jobs submit` (`--image`, `--pull`,
//! `--mount`, `--shm-size`, `--workdir`, `--user`, `--entrypoint`,
//! `--registry-secret`) and the container spec they make.

use anyhow::{Context, bail};
use clap::Args;
use gpufleet_proto::v1::{ContainerSpec, Mount, PullPolicy};

/// Run the job as a container of an image (docs/workloads.md, "Containers").
#[derive(Debug, Default, Args)]
pub struct ImageArgs {
    /// Run the command in a container of this image, e.g. ghcr.io/org/train:1.4; the command after `--` is the container's (none: the image's own).
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    /// When the node pulls the image: always, missing or never [default: the agent's, missing].
    #[arg(long, value_name = "POLICY", value_parser = ["always", "missing", "never"], requires = "image")]
    pub pull: Option<String>,
    /// Bind a host directory into the container, SRC:DST or SRC:DST:ro (repeatable); SRC must lie under a path the agent allows.
    #[arg(long = "mount", value_name = "SRC:DST[:ro]", requires = "image")]
    pub mounts: Vec<String>,
    /// Size of the container's /dev/shm, e.g. 8GiB [default: 64MiB].
    #[arg(long, value_name = "SIZE", requires = "image")]
    pub shm_size: Option<String>,
    /// Working directory inside the container [default: the image's].
    #[arg(long, value_name = "DIR", requires = "image")]
    pub workdir: Option<String>,
    /// User inside the container: uid, uid:gid or a name [default: the agent's workload user, else the image's].
    #[arg(long, value_name = "USER", requires = "image")]
    pub user: Option<String>,
    /// Replace the image's entrypoint with this program (its arguments are the command after `--`).
    #[arg(long, value_name = "PROGRAM", requires = "image")]
    pub entrypoint: Option<String>,
    /// Pull with this tenant's registry credential (`gpufleet secrets put`); only its name is in the job.
    #[arg(long, value_name = "NAME", requires = "image")]
    pub registry_secret: Option<String>,
}

impl ImageArgs {
    /// The container spec, or `None` without `--image`. The controller
    /// checks it fully; this catches what only the flags' syntax can say.
    pub fn container(self) -> anyhow::Result<Option<ContainerSpec>> {
        let Some(image) = self.image else {
            return Ok(None);
        };
        let pull = match self.pull.as_deref() {
            None => PullPolicy::Unspecified,
            Some("always") => PullPolicy::Always,
            Some("missing") => PullPolicy::Missing,
            Some("never") => PullPolicy::Never,
            Some(other) => bail!("--pull {other:?}: use always, missing or never"),
        };
        let mounts = self
            .mounts
            .iter()
            .map(|m| parse_mount(m))
            .collect::<anyhow::Result<_>>()?;
        let shm_size_bytes = match &self.shm_size {
            Some(size) => gpufleet_core::parse_size(size)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("--shm-size {size:?}: give a size such as 8GiB"))?,
            None => 0,
        };
        Ok(Some(ContainerSpec {
            image,
            pull: pull as i32,
            mounts,
            shm_size_bytes,
            workdir: self.workdir.unwrap_or_default(),
            user: self.user.unwrap_or_default(),
            entrypoint: self.entrypoint.into_iter().collect(),
            registry_secret: self.registry_secret.unwrap_or_default(),
        }))
    }
}

/// `SRC:DST` or `SRC:DST:ro` (or `:rw`).
fn parse_mount(text: &str) -> anyhow::Result<Mount> {
    let parts: Vec<&str> = text.split(':').collect();
    let (source, target, read_only) = match parts.as_slice() {
        [source, target] => (source, target, false),
        [source, target, "ro"] => (source, target, true),
        [source, target, "rw"] => (source, target, false),
        _ => bail!("--mount {text:?}: use SRC:DST or SRC:DST:ro, with absolute paths"),
    };
    if source.is_empty() || target.is_empty() {
        bail!("--mount {text:?}: both SRC and DST are needed");
    }
    Ok(Mount {
        source: source.to_string(),
        target: target.to_string(),
        read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_make_the_container_spec() {
        let args = ImageArgs {
            image: Some("localhost/test:1".into()),
            pull: Some("never".into()),
            mounts: vec!["/data:/data:ro".into(), "/scratch:/scratch".into()],
            shm_size: Some("1GiB".into()),
            workdir: Some("/work".into()),
            user: Some("1000".into()),
            entrypoint: Some("/bin/sh".into()),
            registry_secret: Some("ghcr".into()),
        };
        let spec = args.container().unwrap().unwrap();
        assert_eq!(spec.pull(), PullPolicy::Never);
        assert_eq!(spec.mounts.len(), 2);
        assert!(spec.mounts[0].read_only && !spec.mounts[1].read_only);
        assert_eq!(spec.shm_size_bytes, 1 << 30);
        assert_eq!(spec.entrypoint, ["/bin/sh"]);
        assert_eq!(spec.registry_secret, "ghcr");
        assert!(ImageArgs::default().container().unwrap().is_none());
    }

    #[test]
    fn bad_mounts_and_sizes_are_refused_with_the_flag() {
        for bad in ["/data", "/a:/b:rx", ":/b", "/a:/b:ro:x"] {
            let err = parse_mount(bad).unwrap_err().to_string();
            assert!(err.contains("--mount"), "{err}");
        }
        let args = ImageArgs {
            image: Some("x".into()),
            shm_size: Some("lots".into()),
            ..Default::default()
        };
        assert!(format!("{:#}", args.container().unwrap_err()).contains("--shm-size"));
    }
}
