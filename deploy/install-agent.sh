#!/usr/bin/env bash
# Installs gpufleet-agent on a GPU host: the binary, /etc/gpufleet/agent.toml,
# the gpufleet service user and group, and the systemd unit, then enables and
# starts it. Safe to run again: only what differs is rewritten, and the agent
# is restarted only when something changed.
#
#   sudo ./install-agent.sh --controller https://controller.example:7070 \
#        --join-token-file /root/join-token --provider aws --region us-east-1 \
#        --price 3.93 --binary ./gpufleet-agent
#
# Run with --help for every flag. Exit codes: 0 done, 1 failed, 2 bad usage.
set -euo pipefail

readonly PROG=${0##*/}
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
readonly SCRIPT_DIR
readonly SERVICE_USER=gpufleet
readonly UNIT_NAME=gpufleet-agent.service

usage() {
    cat <<EOF
Usage: $PROG --controller URL --provider NAME --region NAME --price USD
             (--join-token TOKEN | --join-token-file FILE) [options]

Installs gpufleet-agent with its config and systemd unit, and enables it.

Required:
  --controller URL        controller gRPC URL, e.g. https://controller.example:7070
  --join-token TOKEN      token the controller expects (visible in ps; prefer
                          --join-token-file or GPUFLEET_JOIN_TOKEN in the environment)
  --join-token-file FILE  read the join token from FILE
  --provider NAME         cloud or owner: aws, gcp, azure, lambda, onprem, ...
  --region NAME           provider region, e.g. us-east-1
  --price USD             price of one GPU for one hour, e.g. 3.93 (0 for owned)

Options:
  --zone NAME             availability zone
  --instance-type NAME    instance type, e.g. p5.48xlarge
  --node-id ID            node id (default: /etc/machine-id, else the hostname)
  --spot                  spot / preemptible capacity
  --workload-user USER    run workloads as this existing unprivileged user (and its
                          primary group) instead of root; "$SERVICE_USER" is created
                          by this script
  --binary PATH           gpufleet-agent binary to install
                          (default: gpufleet-agent next to this script, else on PATH)
  --unit PATH             unit file to install (default: systemd/$UNIT_NAME next to this script)
  --simulated-gpus LIST   no GPU driver needed: simulate e.g. 8xH100-SXM-80GB or 2xL4,1xT4
  --driver-root DIR       where the NVIDIA driver is installed (default: /; e.g.
                          /run/nvidia/driver with the GPU operator)
  --root DIR              install under DIR instead of / (tests, image builds): no
                          root needed, systemctl is not called, what it would run is printed
  --dry-run               print what would change; change nothing
  -h, --help              this help
EOF
}

die_usage() {
    echo "$PROG: $*" >&2
    echo "Run '$PROG --help' for usage." >&2
    exit 2
}

die() {
    echo "$PROG: $*" >&2
    exit 1
}

controller="" token="" token_set=0 token_file="" provider="" region="" price=""
zone="" instance_type="" node_id="" spot=false binary="" unit="" workload_user=""
simulated="" driver_root=/ root="" dry_run=0

# A flag's value: present and not another flag.
value() {
    if [[ $# -lt 2 || $2 == --* ]]; then
        die_usage "$1 needs a value"
    fi
    printf '%s' "$2"
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --controller) controller=$(value "$@"); shift 2 ;;
        --join-token) token=$(value "$@"); token_set=1; shift 2 ;;
        --join-token-file) token_file=$(value "$@"); shift 2 ;;
        --provider) provider=$(value "$@"); shift 2 ;;
        --region) region=$(value "$@"); shift 2 ;;
        --price) price=$(value "$@"); shift 2 ;;
        --zone) zone=$(value "$@"); shift 2 ;;
        --instance-type) instance_type=$(value "$@"); shift 2 ;;
        --node-id) node_id=$(value "$@"); shift 2 ;;
        --spot) spot=true; shift ;;
        --workload-user) workload_user=$(value "$@"); shift 2 ;;
        --binary) binary=$(value "$@"); shift 2 ;;
        --unit) unit=$(value "$@"); shift 2 ;;
        --simulated-gpus) simulated=$(value "$@"); shift 2 ;;
        --driver-root) driver_root=$(value "$@"); shift 2 ;;
        --root) root=$(value "$@"); shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die_usage "unknown argument '$1'" ;;
    esac
done

# --- validate everything before touching anything ---------------------------

if [[ -n $root ]]; then
    [[ -d $root ]] || die_usage "--root '$root' is not a directory"
    root=$(cd "$root" && pwd)
elif [[ $(id -u) -ne 0 ]]; then
    die "must run as root to install into / (use sudo), or pass --root DIR to install elsewhere"
fi

[[ -n $controller ]] || die_usage "--controller is required, e.g. --controller https://controller.example:7070"
url_re='^https?://[][A-Za-z0-9.:_-]+/?$'
[[ $controller =~ $url_re ]] ||
    die_usage "--controller '$controller' is not a URL like https://controller.example:7070"

if [[ -n $token_file ]]; then
    [[ $token_set -eq 0 ]] || die_usage "give --join-token or --join-token-file, not both"
    [[ -r $token_file ]] || die_usage "--join-token-file '$token_file' cannot be read"
    token=$(<"$token_file")
    token=${token%$'\n'}
elif [[ $token_set -eq 0 ]]; then
    if [[ -n ${GPUFLEET_JOIN_TOKEN:-} ]]; then
        token=$GPUFLEET_JOIN_TOKEN
    else
        die_usage "a join token is required: --join-token-file FILE, --join-token TOKEN or GPUFLEET_JOIN_TOKEN"
    fi
fi
[[ -n $token ]] || die_usage "the join token is empty"
# Written into a TOML string: keep it to characters that need no escaping.
[[ $token =~ ^[A-Za-z0-9._~+/=:-]+$ ]] ||
    die_usage "the join token may only contain letters, digits and ._~+/=:-"

name_ok() { [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; }
[[ -n $provider ]] || die_usage "--provider is required, e.g. --provider aws"
name_ok "$provider" || die_usage "--provider '$provider' may only contain letters, digits and ._-"
[[ -n $region ]] || die_usage "--region is required, e.g. --region us-east-1"
name_ok "$region" || die_usage "--region '$region' may only contain letters, digits and ._-"
for pair in "zone:$zone" "instance-type:$instance_type" "node-id:$node_id"; do
    if [[ -n ${pair#*:} ]] && ! name_ok "${pair#*:}"; then
        die_usage "--${pair%%:*} '${pair#*:}' may only contain letters, digits and ._-"
    fi
done
[[ -n $price ]] || die_usage "--price is required: USD per GPU-hour, e.g. --price 3.93 (0 for owned hardware)"
[[ $price =~ ^[0-9]+(\.[0-9]{1,6})?$ ]] ||
    die_usage "--price '$price' is not a non-negative amount of USD like 3.93"

if [[ -n $workload_user ]]; then
    [[ $workload_user =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] ||
        die_usage "--workload-user '$workload_user' is not a user name (lowercase letters, digits, _ and -)"
    [[ $workload_user != root ]] ||
        die_usage "--workload-user root gains nothing: omit the flag to run workloads as root"
    # The service user is created below; any other must exist already.
    if [[ $workload_user != "$SERVICE_USER" ]]; then
        if [[ -n $root ]]; then
            grep -q "^$workload_user:" "$root/etc/passwd" 2>/dev/null ||
                die_usage "--workload-user '$workload_user' does not exist in $root/etc/passwd; create it first"
        else
            getent passwd "$workload_user" >/dev/null ||
                die_usage "--workload-user '$workload_user' does not exist; create it first (useradd --system --user-group $workload_user)"
        fi
    fi
fi

if [[ -n $simulated ]]; then
    [[ $simulated =~ ^[1-9][0-9]*x[A-Za-z0-9-]+(,[1-9][0-9]*x[A-Za-z0-9-]+)*$ ]] ||
        die_usage "--simulated-gpus '$simulated' is not a list like 8xH100-SXM-80GB or 2xL4,1xT4"
fi

if [[ -z $binary ]]; then
    if [[ -x $SCRIPT_DIR/gpufleet-agent ]]; then
        binary=$SCRIPT_DIR/gpufleet-agent
    elif command -v gpufleet-agent >/dev/null 2>&1; then
        binary=$(command -v gpufleet-agent)
    else
        die_usage "no gpufleet-agent binary next to this script or on PATH: pass --binary PATH"
    fi
fi
[[ -f $binary && -x $binary ]] || die_usage "--binary '$binary' is not an executable file"
unit=${unit:-$SCRIPT_DIR/systemd/$UNIT_NAME}
[[ -f $unit ]] || die_usage "unit file '$unit' not found: pass --unit PATH"


# The agent's NVML backend needs the driver's library and control device.
if [[ -z $simulated ]]; then
    driver_root=${driver_root%/}
    lib=""
    for dir in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib /usr/local/nvidia/lib64; do
        if [[ -e $driver_root$dir/libnvidia-ml.so.1 ]]; then
            lib=$driver_root$dir/libnvidia-ml.so.1
            break
        fi
    done
    if [[ -z $lib && -z $driver_root ]] && command -v ldconfig >/dev/null 2>&1; then
        lib=$(ldconfig -p 2>/dev/null | awk '/libnvidia-ml\.so\.1 /{print $NF; exit}')
    fi
    [[ -n $lib ]] || die "no NVIDIA driver: libnvidia-ml.so.1 not found under ${driver_root:-/}. Install the NVIDIA driver, pass --driver-root DIR where it lives, or pass --simulated-gpus 8xH100-SXM-80GB to run without GPUs"
    [[ -e $driver_root/dev/nvidiactl ]] || die "no NVIDIA driver: ${driver_root}/dev/nvidiactl does not exist (is the nvidia kernel module loaded? try nvidia-smi). Pass --simulated-gpus 8xH100-SXM-80GB to run without GPUs"
fi

# --- plan and apply -----------------------------------------------------------

changed=0
say() { printf '%s\n' "$*"; }
if [[ $dry_run -eq 1 ]]; then
    say "dry run: nothing is changed"
fi

# Installs $1 (a file) at $2 with mode $3 unless identical content and mode
# are already there.
install_file() {
    local src=$1 dest=$2 mode=$3
    if [[ -f $dest ]] && cmp -s "$src" "$dest" && [[ $(stat -c %a "$dest") == "$mode" ]]; then
        say "unchanged  ${dest}"
        return
    fi
    changed=1
    if [[ $dry_run -eq 1 ]]; then
        say "would write ${dest} (mode $mode)"
        return
    fi
    mkdir -p "$(dirname "$dest")"
    # Write beside and rename, so a running agent never sees half a file.
    local tmp
    tmp=$(mktemp "$dest.XXXXXX")
    cat "$src" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dest"
    say "wrote      ${dest} (mode $mode)"
}

ensure_dir() {
    local dir=$1 mode=$2
    if [[ -d $dir && $(stat -c %a "$dir") == "$mode" ]]; then
        return
    fi
    changed=1
    if [[ $dry_run -eq 1 ]]; then
        say "would create ${dir}/ (mode $mode)"
        return
    fi
    mkdir -p "$dir"
    chmod "$mode" "$dir"
    say "created    ${dir}/ (mode $mode)"
}

# The service user: owns nothing the agent writes (the agent runs as root),
# but its group may read the config, and it is the unprivileged account that
# the controller and tooling on this host run as.
ensure_user() {
    if [[ -z $root ]]; then
        if getent passwd "$SERVICE_USER" >/dev/null; then
            say "unchanged  user $SERVICE_USER"
            return
        fi
        changed=1
        if [[ $dry_run -eq 1 ]]; then
            say "would create system user $SERVICE_USER"
            return
        fi
        useradd --system --user-group --no-create-home --home-dir /var/lib/gpufleet \
            --shell /usr/sbin/nologin --comment "gpufleet service user" "$SERVICE_USER"
        say "created    system user $SERVICE_USER"
        return
    fi
    # Under --root: write the entries the way useradd would, with the next
    # free system id of that root, so that no privileges are needed.
    local passwd=$root/etc/passwd group=$root/etc/group
    if [[ -f $passwd ]] && grep -q "^$SERVICE_USER:" "$passwd"; then
        say "unchanged  user $SERVICE_USER (in $passwd)"
        return
    fi
    changed=1
    if [[ $dry_run -eq 1 ]]; then
        say "would add system user $SERVICE_USER to $passwd and $group"
        return
    fi
    mkdir -p "$root/etc"
    touch "$passwd" "$group"
    local id=999
    while cut -d: -f3 "$passwd" "$group" | grep -qx "$id"; do
        id=$((id - 1))
        [[ $id -ge 100 ]] || die "no free system id in $passwd"
    done
    printf '%s:x:%d:%d:gpufleet service user:/var/lib/gpufleet:/usr/sbin/nologin\n' \
        "$SERVICE_USER" "$id" "$id" >>"$passwd"
    grep -q "^$SERVICE_USER:" "$group" || printf '%s:x:%d:\n' "$SERVICE_USER" "$id" >>"$group"
    say "created    system user $SERVICE_USER (uid $id, in $passwd)"
}

workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT

# The agent's config; every key is documented in docs/configuration.md.
{
    echo "# Written by install-agent.sh; rerun it to change these values."
    echo "# Every key: docs/configuration.md. Local changes are overwritten."
    echo "controller = \"$controller\""
    echo "join_token = \"$token\""
    if [[ -n $simulated ]]; then
        echo 'gpu_backend = "simulated"'
        printf 'simulated_gpus = ['
        IFS=, read -ra decls <<<"$simulated"
        sep=""
        for d in "${decls[@]}"; do
            printf '%s"%s"' "$sep" "$d"
            sep=", "
        done
        printf ']\n'
    else
        echo 'gpu_backend = "nvml"'
    fi
    echo 'data_dir = "/var/lib/gpufleet-agent"'
    if [[ -n $workload_user ]]; then echo "workload_user = \"$workload_user\""; fi
    echo
    echo "[node]"
    if [[ -n $node_id ]]; then echo "id = \"$node_id\""; fi
    echo "provider = \"$provider\""
    echo "region = \"$region\""
    echo "zone = \"$zone\""
    echo "instance_type = \"$instance_type\""
    # TOML floats need a fractional part.
    if [[ $price == *.* ]]; then echo "price_per_gpu_hour_usd = $price"; else echo "price_per_gpu_hour_usd = $price.0"; fi
    echo "spot = $spot"
} >"$workdir/agent.toml"

ensure_user
install_file "$binary" "$root/usr/local/bin/gpufleet-agent" 755
ensure_dir "$root/etc/gpufleet" 755
install_file "$workdir/agent.toml" "$root/etc/gpufleet/agent.toml" 640
install_file "$unit" "$root/etc/systemd/system/$UNIT_NAME" 644

# The config holds the join token: root writes it, the gpufleet group reads it.
config=$root/etc/gpufleet/agent.toml
if [[ $dry_run -eq 0 && $(id -u) -eq 0 ]]; then
    gid=$(awk -F: -v u="$SERVICE_USER" '$1 == u {print $3}' "${root:-}/etc/group")
    if [[ -n $gid && $(stat -c %u:%g "$config") != "0:$gid" ]]; then
        chown "0:$gid" "$config"
        changed=1
        say "chowned    $config to root:$SERVICE_USER"
    fi
fi

# --- enable -------------------------------------------------------------------

if [[ -n $root ]]; then
    say "not calling systemctl under --root; on the target system run:"
    say "  systemctl daemon-reload && systemctl enable --now $UNIT_NAME"
elif [[ $dry_run -eq 1 ]]; then
    say "would run: systemctl daemon-reload && systemctl enable --now $UNIT_NAME"
    if [[ $changed -eq 1 ]]; then say "would run: systemctl try-restart $UNIT_NAME"; fi
else
    command -v systemctl >/dev/null 2>&1 || die "systemctl not found: this script installs a systemd unit"
    if [[ $changed -eq 1 ]]; then
        systemctl daemon-reload
    fi
    if ! systemctl is-enabled --quiet "$UNIT_NAME"; then
        systemctl enable --now "$UNIT_NAME"
        say "enabled    $UNIT_NAME"
    elif [[ $changed -eq 1 ]]; then
        # Running workloads survive the restart (keep_workloads_on_exit,
        # the default): the new agent re-adopts them.
        systemctl try-restart "$UNIT_NAME"
        say "restarted  $UNIT_NAME"
    else
        say "unchanged  $UNIT_NAME (enabled)"
    fi
fi

if [[ $changed -eq 0 ]]; then
    say "nothing to do: already installed"
elif [[ $dry_run -eq 1 ]]; then
    say "dry run: rerun without --dry-run to apply"
else
    say "done"
fi
