//! Which GPUs a CDI (Container Device Interface) spec on this host names,
//! so that the `oci` runtime can hand a container its GPUs as
//! `nvidia.com/gpu=<UUID>` (only those devices appear in it) and fall
//! back to `NVIDIA_VISIBLE_DEVICES` and the NVIDIA hook where no spec does.
//!
//! Specs are read from the configured directories (podman reads
//! `/etc/cdi` and `/var/run/cdi`) each time a container is created: they
//! are a few small files that `nvidia-ctk cdi generate` may rewrite at any
//! time. JSON specs are parsed; YAML specs (what `nvidia-ctk` writes by
//! default) are read line by line for their `kind:` and `name:` keys, the
//! only two this needs, so no YAML library is pulled in for them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The CDI kind of NVIDIA GPUs.
pub const GPU_KIND: &str = "nvidia.com/gpu";
/// Largest spec file read; bigger ones are skipped (a generated spec for a
/// 16-GPU host is tens of KiB).
const SPEC_MAX_BYTES: u64 = 4 * 1024 * 1024;
/// Most spec files read per directory.
const SPECS_PER_DIR: usize = 256;

/// The device names of kind [`GPU_KIND`] that the specs in `dirs` declare.
/// Unreadable files and directories are skipped: a GPU they would have
/// named falls back to `NVIDIA_VISIBLE_DEVICES`.
pub fn gpu_device_names(dirs: &[PathBuf]) -> HashSet<String> {
    let mut names = HashSet::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten().take(SPECS_PER_DIR) {
            let path = entry.path();
            if let Some(text) = read_spec(&path) {
                names.extend(spec_gpu_names(&path, &text));
            }
        }
    }
    names
}

fn read_spec(path: &Path) -> Option<String> {
    let ext = path.extension()?.to_str()?;
    if !matches!(ext, "json" | "yaml" | "yml") {
        return None;
    }
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.len() > SPEC_MAX_BYTES {
        return None;
    }
    std::fs::read_to_string(path).ok()
}

/// The GPU device names one spec declares (none when its kind is another).
fn spec_gpu_names(path: &Path, text: &str) -> Vec<String> {
    if path.extension().is_some_and(|e| e == "json") {
        let Ok(spec) = serde_json::from_str::<serde_json::Value>(text) else {
            return Vec::new();
        };
        if spec.get("kind").and_then(|k| k.as_str()) != Some(GPU_KIND) {
            return Vec::new();
        }
        return spec
            .get("devices")
            .and_then(|d| d.as_array())
            .map(|devices| {
                devices
                    .iter()
                    .filter_map(|d| d.get("name")?.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
    }
    yaml_gpu_names(text)
}

/// `kind:` at the top level and every `name:` (a device's) of a YAML spec.
fn yaml_gpu_names(text: &str) -> Vec<String> {
    let mut kind = None;
    let mut names = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start().trim_start_matches("- ");
        if let Some(value) = line.strip_prefix("kind:") {
            kind = Some(unquote(value));
        } else if let Some(value) = trimmed.strip_prefix("name:") {
            names.push(unquote(value));
        }
    }
    if kind.as_deref() == Some(GPU_KIND) {
        names
    } else {
        Vec::new()
    }
}

fn unquote(value: &str) -> String {
    let value = value.trim();
    let value = value.split(" #").next().unwrap_or(value).trim();
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
        .unwrap_or(value)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_yaml_specs_name_their_gpus() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("test.json"),
            r#"{"cdiVersion":"0.5.0","kind":"nvidia.com/gpu","devices":[
                {"name":"GPU-a","containerEdits":{}},{"name":"GPU-b","containerEdits":{}}]}"#,
        )
        .unwrap();
        // What nvidia-ctk cdi generate writes, abridged.
        std::fs::write(
            dir.path().join("nvidia.yaml"),
            "---\ncdiVersion: 0.5.0\ncontainerEdits:\n  env:\n  - NVIDIA_VISIBLE_DEVICES=void\n\
             devices:\n- containerEdits:\n    deviceNodes:\n    - path: /dev/nvidia0\n  name: \"0\"\n\
             - containerEdits:\n    deviceNodes:\n    - path: /dev/nvidia0\n  name: GPU-c\n\
             kind: nvidia.com/gpu\n",
        )
        .unwrap();
        // Another kind, a file that is no spec, a broken one: ignored.
        std::fs::write(
            dir.path().join("other.json"),
            r#"{"cdiVersion":"0.5.0","kind":"vendor.com/fpga","devices":[{"name":"GPU-z"}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("README"),
            "name: GPU-y\nkind: nvidia.com/gpu",
        )
        .unwrap();
        std::fs::write(dir.path().join("broken.json"), "{").unwrap();
        let names = gpu_device_names(&[dir.path().to_path_buf(), "/nonexistent".into()]);
        let mut names: Vec<_> = names.into_iter().collect();
        names.sort();
        assert_eq!(names, ["0", "GPU-a", "GPU-b", "GPU-c"]);
    }
}
