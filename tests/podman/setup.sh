#!/usr/bin/env bash
# Makes this machine able to run gpufleet's container tests (the `oci`
# runtime), idempotently:
#   1. installs Debian's podman, runc, catatonit and busybox-static when
#      missing (root);
#   2. writes /etc/containers/containers.conf.d/gpufleet-test.conf with what
#      podman 4.3 needs on this kind of VM (see below);
#   3. builds the local test image localhost/gpufleet-test:1 from a busybox
#      rootfs through `podman import` (no registry involved);
#   4. with `--cdi NAME UUID...`: writes the CDI spec /etc/cdi/NAME.json whose
#      devices nvidia.com/gpu=<UUID> are dummy device nodes, so a container
#      sees exactly the GPUs it was given (/dev/nvidia<index>, plus
#      GPUFLEET_TEST_CDI_<index>=<UUID> in its environment).
# Prints `podman ready` last on success. Usage:
#   tests/podman/setup.sh [--cdi NAME UUID...]
set -euo pipefail

image=localhost/gpufleet-test:1
conf_dir=/etc/containers/containers.conf.d
conf=$conf_dir/gpufleet-test.conf
cdi_dir=/etc/cdi
dev_dir=/var/lib/gpufleet-test/dev

need_root() {
    if [[ $(id -u) != 0 ]]; then
        echo "tests/podman/setup.sh: $1 needs root (run it once as root)" >&2
        exit 2
    fi
}

# 1. Packages. runc, not crun: crun 1.8 refuses hybrid cgroup hierarchies.
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
[[ -x /bin/busybox ]] || missing+=(busybox-static)
# `podman run --init` runs catatonit as pid 1 (a Recommends of podman).
[[ -x /usr/libexec/podman/catatonit ]] || missing+=(catatonit)
if ((${#missing[@]})); then
    need_root "installing ${missing[*]}"
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

# 2. Configuration (measured on the CI VM): it lacks CAP_SYS_RESOURCE, so the
# default nofile/nproc ulimits cannot be set (default_ulimits = []); it mixes
# cgroup v1 with a v2 hugetlb tree, which crun refuses (runtime = runc) and
# systemd cannot manage (cgroupfs); there is no journald (events to a file).
want_conf='# Written by gpufleet tests/podman/setup.sh.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"'
if [[ ! -f $conf || $(cat "$conf") != "$want_conf" ]]; then
    need_root "writing $conf"
    mkdir -p "$conf_dir"
    printf '%s\n' "$want_conf" >"$conf"
fi

# 3. The test image: a busybox rootfs (the static binary and its applet
# links), imported as a local image.
if ! podman image exists "$image" 2>/dev/null; then
    need_root "building $image"
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    mkdir -p "$rootfs"/{bin,dev,etc,proc,sys,tmp,root,work}
    cp /bin/busybox "$rootfs/bin/busybox"
    for applet in $("$rootfs/bin/busybox" --list); do
        [[ $applet == busybox ]] || ln -sf busybox "$rootfs/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' >"$rootfs/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV PATH=/bin' --change 'CMD ["/bin/sh"]' - "$image" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
fi

# 4. A test CDI spec: one dummy character device (a /dev/null twin) per GPU.
if [[ ${1:-} == --cdi ]]; then
    shift
    name=${1:?--cdi needs a spec name}
    shift
    [[ $name =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "bad CDI spec name: $name" >&2; exit 2; }
    spec=$cdi_dir/$name.json
    devices=
    index=0
    for uuid in "$@"; do
        [[ $uuid =~ ^[A-Za-z0-9-]+$ ]] || { echo "bad GPU UUID: $uuid" >&2; exit 2; }
        node=$dev_dir/$uuid
        [[ -c $node ]] || { need_root "creating $node"; mkdir -p "$dev_dir"; mknod -m 666 "$node" c 1 3; }
        devices+="${devices:+,}
    {\"name\": \"$uuid\", \"containerEdits\": {
      \"deviceNodes\": [{\"path\": \"/dev/nvidia$index\", \"hostPath\": \"$node\"}],
      \"env\": [\"GPUFLEET_TEST_CDI_$index=$uuid\"]}}"
        index=$((index + 1))
    done
    want_spec="{
  \"cdiVersion\": \"0.5.0\",
  \"kind\": \"nvidia.com/gpu\",
  \"devices\": [$devices
  ]
}"
    if [[ ! -f $spec || $(cat "$spec") != "$want_spec" ]]; then
        need_root "writing $spec"
        mkdir -p "$cdi_dir"
        printf '%s\n' "$want_spec" >"$spec.tmp"
        mv "$spec.tmp" "$spec"
    fi
fi

echo "podman ready"
