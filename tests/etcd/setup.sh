#!/usr/bin/env bash
# The etcd the tests and benchmarks run against (docs/ha.md).
#
#   tests/etcd/setup.sh install
#       Idempotent: makes sure `etcd` and `etcdctl` are on PATH, installing
#       Debian's etcd-server and etcd-client packages (3.4) when they are
#       missing and we are root. Exit 2 with how to enable it otherwise.
#
#   tests/etcd/setup.sh start DIR [MEMBERS] [WATCH_PID]
#       Installs (as above), then starts a MEMBERS-member cluster (default 3)
#       in DIR and waits until every member answers. Prints one line: the
#       members' client URLs, comma-separated. DIR/mN/pid holds member N's
#       pid, DIR/mN/log its log. With WATCH_PID, a watchdog kills the
#       members and removes DIR once that process is gone, so a crashed
#       test leaves no etcd behind.
#
# Members talk over unix sockets in DIR, for clients and for peers
# (`unix://DIR/mN.client`): etcd must know every peer's URL before any
# member starts, so TCP would need ports chosen in advance, and a guessed
# port can be taken by then. A socket path cannot be taken by anyone else.
# etcd names a unix listener by the URL's host part, relative to its
# working directory, so members start in DIR and advertise relative names;
# clients are given the absolute paths.
set -euo pipefail

install() {
    if command -v etcd >/dev/null && command -v etcdctl >/dev/null; then
        return 0
    fi
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "installing etcd-server and etcd-client from Debian" >&2
        if ! apt-get install -y -qq etcd-server etcd-client >/dev/null 2>&1; then
            apt-get update -qq >/dev/null
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client >/dev/null
        fi
        # The package enables a system etcd on 2379; the tests need none.
        if command -v systemctl >/dev/null; then
            systemctl disable --now etcd >/dev/null 2>&1 || true
        fi
        command -v etcd >/dev/null && return 0
    fi
    echo "etcd is not installed: run 'apt-get install etcd-server etcd-client' as root" \
        "(or put etcd 3.4+ and etcdctl on PATH)" >&2
    exit 2
}

start() {
    local dir=$1 members=${2:-3} watch=${3:-}
    [[ -d $dir ]] || { echo "no such directory: $dir" >&2; exit 1; }
    dir=$(cd "$dir" && pwd)
    local cluster="" endpoints="" i
    for i in $(seq 1 "$members"); do
        cluster+="${cluster:+,}m$i=unix://m$i.peer:0"
        endpoints+="${endpoints:+,}unix://$dir/m$i.client:0"
    done
    local pids=()
    for i in $(seq 1 "$members"); do
        mkdir -p "$dir/m$i"
        # --max-txn-ops / --max-request-bytes: one group-commit round of the
        # controller is one transaction (docs/ha.md, "etcd settings").
        (cd "$dir" && exec setsid etcd --name "m$i" --data-dir "m$i/data" \
            --listen-peer-urls "unix://m$i.peer:0" \
            --initial-advertise-peer-urls "unix://m$i.peer:0" \
            --listen-client-urls "unix://m$i.client:0" \
            --advertise-client-urls "unix://m$i.client:0" \
            --initial-cluster "$cluster" --initial-cluster-state new \
            --initial-cluster-token "gpufleet-test" \
            --max-txn-ops 20000 --max-request-bytes 16777216 \
            --auto-compaction-mode periodic --auto-compaction-retention 5m \
            --heartbeat-interval 50 --election-timeout 500 \
            --logger zap --log-outputs stderr \
            >"m$i/log" 2>&1 </dev/null) &
        echo $! >"$dir/m$i/pid"
        pids+=($!)
    done
    if [[ -n $watch ]]; then
        (
            while kill -0 "$watch" 2>/dev/null; do sleep 1; done
            kill -9 "${pids[@]}" 2>/dev/null || true
            rm -rf "$dir"
        ) </dev/null >/dev/null 2>&1 &
    fi
    # Ready when every member answers a health check (a quorum exists).
    local deadline=$((SECONDS + 30))
    until ETCDCTL_API=3 etcdctl --endpoints "$endpoints" --command-timeout 2s \
        endpoint health >/dev/null 2>&1; do
        for i in $(seq 1 "$members"); do
            if ! kill -0 "${pids[$((i - 1))]}" 2>/dev/null; then
                echo "etcd member m$i exited:" >&2
                tail -n 20 "$dir/m$i/log" >&2
                exit 1
            fi
        done
        if ((SECONDS > deadline)); then
            echo "etcd cluster in $dir not healthy after 30 s" >&2
            tail -n 20 "$dir/m1/log" >&2
            exit 1
        fi
        sleep 0.1
    done
    printf '%s\n' "$endpoints"
}

case ${1:-} in
install) install ;;
start)
    install
    shift
    start "$@"
    ;;
*)
    echo "usage: $0 install | start DIR [MEMBERS] [WATCH_PID]" >&2
    exit 1
    ;;
esac
