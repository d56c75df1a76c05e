//! What a container spec (an image job, docs/workloads.md "Containers")
//! may hold: its limits and its shape, checked the same way by the
//! controller when a job is submitted and by the agent's local API. The
//! agent checks where a mount source may come from itself (that depends
//! on its own `oci_allowed_mounts`).

use gpufleet_proto::v1::{ContainerSpec, PullPolicy};

use crate::limits::{ARG_BYTES, Violation, check_bytes, check_count};

/// An image reference: a registry host, a path and a tag or digest fit
/// easily (Docker's own limit on a repository name is 255).
pub const IMAGE_BYTES: usize = 512;
/// Mounts one container may have.
pub const MOUNTS: usize = 32;
/// One mount path (source or target), and the container's workdir:
/// Linux's `PATH_MAX`.
pub const PATH_BYTES: usize = 4096;
/// Arguments of an entrypoint override.
pub const ENTRYPOINT_COUNT: usize = 64;
/// A container user: `uid[:gid]` or a name.
pub const USER_BYTES: usize = 64;
/// The name of a registry secret.
pub const SECRET_NAME_BYTES: usize = 128;
/// The largest `/dev/shm` a job may ask for (it is memory).
pub const SHM_MAX_BYTES: u64 = 512 * 1024 * 1024 * 1024;

/// Checks `spec` (found at `prefix`, e.g. `spec.workload.container`).
pub fn check_container(prefix: &str, spec: &ContainerSpec) -> Result<(), Violation> {
    let field = |name: &str| format!("{prefix}.{name}");
    check_image(&field("image"), &spec.image)?;
    if PullPolicy::try_from(spec.pull).is_err() {
        return Err(Violation::new(
            field("pull"),
            format!(
                "{} is not a pull policy: always, missing or never",
                spec.pull
            ),
        ));
    }
    check_count(&field("mounts"), spec.mounts.len(), MOUNTS)?;
    for (i, mount) in spec.mounts.iter().enumerate() {
        check_path(&format!("{prefix}.mounts[{i}].source"), &mount.source)?;
        check_path(&format!("{prefix}.mounts[{i}].target"), &mount.target)?;
        if mount.target == "/" {
            return Err(Violation::new(
                format!("{prefix}.mounts[{i}].target"),
                "cannot be / (it would hide the image)",
            ));
        }
    }
    if spec.shm_size_bytes > SHM_MAX_BYTES {
        return Err(Violation::new(
            field("shm_size_bytes"),
            format!(
                "{} bytes; at most {SHM_MAX_BYTES} (512 GiB)",
                spec.shm_size_bytes
            ),
        ));
    }
    if !spec.workdir.is_empty() {
        check_path(&field("workdir"), &spec.workdir)?;
    }
    check_bytes(&field("user"), &spec.user, USER_BYTES)?;
    if !spec
        .user
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':'))
        || spec.user.starts_with('-')
    {
        return Err(Violation::new(
            field("user"),
            "must be uid, uid:gid or a user name (letters, digits, _ . - :)",
        ));
    }
    check_count(
        &field("entrypoint"),
        spec.entrypoint.len(),
        ENTRYPOINT_COUNT,
    )?;
    for (i, arg) in spec.entrypoint.iter().enumerate() {
        let name = format!("{prefix}.entrypoint[{i}]");
        check_bytes(&name, arg, ARG_BYTES)?;
        if arg.contains('\0') {
            return Err(Violation::new(name, "contains a NUL byte"));
        }
    }
    check_bytes(
        &field("registry_secret"),
        &spec.registry_secret,
        SECRET_NAME_BYTES,
    )?;
    if !spec.registry_secret.is_empty() {
        check_secret_name(&field("registry_secret"), &spec.registry_secret)?;
    }
    Ok(())
}

/// A secret's name: letters, digits, `_ . -`, not starting with `-` or `.`.
pub fn check_secret_name(field: &str, name: &str) -> Result<(), Violation> {
    check_bytes(field, name, SECRET_NAME_BYTES)?;
    let ok = !name.is_empty()
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Violation::new(
            field,
            "must be 1 or more letters, digits, _ . - (not starting with - or .)",
        ))
    }
}

/// An image reference as podman takes it: `[registry/]path[:tag][@digest]`
/// in the characters references use; never an option (`-…`).
fn check_image(field: &str, image: &str) -> Result<(), Violation> {
    if image.is_empty() {
        return Err(Violation::new(field, "is required for a container job"));
    }
    check_bytes(field, image, IMAGE_BYTES)?;
    let ok = !image.starts_with(['-', '/', ':', '@', '.'])
        && image
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '@'));
    if ok {
        Ok(())
    } else {
        Err(Violation::new(
            field,
            format!(
                "{:?} is not an image reference like ghcr.io/org/name:tag or localhost/name:1",
                crate::limits::escape_unsafe(image)
            ),
        ))
    }
}

/// An absolute path podman's `--mount` can carry: no `,` (its separator),
/// no `:`, no NUL, no `..` component.
fn check_path(field: &str, path: &str) -> Result<(), Violation> {
    check_bytes(field, path, PATH_BYTES)?;
    if !path.starts_with('/') {
        return Err(Violation::new(field, "must be an absolute path"));
    }
    if path.contains([',', ':', '\0']) {
        return Err(Violation::new(field, "must not contain , : or NUL"));
    }
    if path.split('/').any(|part| part == "..") {
        return Err(Violation::new(field, "must not contain .. components"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_proto::v1::Mount;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            image: "ghcr.io/org/train:1.4".into(),
            mounts: vec![Mount {
                source: "/data/set".into(),
                target: "/data".into(),
                read_only: true,
            }],
            user: "1000:1000".into(),
            workdir: "/work".into(),
            registry_secret: "ghcr-token".into(),
            ..Default::default()
        }
    }

    fn field_of(spec: &ContainerSpec) -> String {
        check_container("c", spec).unwrap_err().field
    }

    #[test]
    fn a_reasonable_spec_passes() {
        check_container("c", &spec()).unwrap();
        let digest = ContainerSpec {
            image: "localhost/test@sha256:abcdef0123".into(),
            ..Default::default()
        };
        check_container("c", &digest).unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut s = spec();
        s.image = String::new();
        assert_eq!(field_of(&s), "c.image");
        s.image = "--privileged".into();
        assert_eq!(field_of(&s), "c.image");
        s.image = "a b".into();
        assert_eq!(field_of(&s), "c.image");
        s.image = "x".repeat(IMAGE_BYTES + 1);
        assert_eq!(field_of(&s), "c.image");
        let mut s = spec();
        s.pull = 99;
        assert_eq!(field_of(&s), "c.pull");
        let mut s = spec();
        s.mounts[0].source = "relative".into();
        assert_eq!(field_of(&s), "c.mounts[0].source");
        s.mounts[0].source = "/data/../etc".into();
        assert_eq!(field_of(&s), "c.mounts[0].source");
        s.mounts[0].source = "/data,readonly=false".into();
        assert_eq!(field_of(&s), "c.mounts[0].source");
        let mut s = spec();
        s.mounts[0].target = "/".into();
        assert_eq!(field_of(&s), "c.mounts[0].target");
        let mut s = spec();
        s.mounts = vec![s.mounts[0].clone(); MOUNTS + 1];
        assert_eq!(field_of(&s), "c.mounts");
        let mut s = spec();
        s.shm_size_bytes = SHM_MAX_BYTES + 1;
        assert_eq!(field_of(&s), "c.shm_size_bytes");
        let mut s = spec();
        s.workdir = "work".into();
        assert_eq!(field_of(&s), "c.workdir");
        let mut s = spec();
        s.user = "root --privileged".into();
        assert_eq!(field_of(&s), "c.user");
        let mut s = spec();
        s.entrypoint = vec!["x".into(); ENTRYPOINT_COUNT + 1];
        assert_eq!(field_of(&s), "c.entrypoint");
        let mut s = spec();
        s.registry_secret = "../other".into();
        assert_eq!(field_of(&s), "c.registry_secret");
    }
}
