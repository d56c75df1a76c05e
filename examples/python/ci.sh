#!/usr/bin/env bash
# Runs scheduler.py against a real controller and a simulated 2xL4 agent on
# loopback, and checks its output. Called by deploy/ci-checks.sh; runnable
# alone: examples/python/ci.sh [PYTHON]   (PYTHON needs grpcio, grpcio-tools)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${1:-python3}

cargo build --quiet --locked -p gpufleet-controller -p gpufleet-agent --bins
bin=${CARGO_TARGET_DIR:-target}/debug
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# Every port is 127.0.0.1:0; the controller's startup log line says which
# one it got (tests/bound-addr.sh), and the agent is told that one.
# shellcheck source=tests/bound-addr.sh
source tests/bound-addr.sh
join_token=python-ci-join-token
GPUFLEET_LOG=info "$bin/gpufleet-controller" --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --log-format json --data-dir "$work/controller" --join-token "$join_token" \
    >"$work/controller.log" 2>&1 &
pids+=($!)
addr=$(logged_field "${pids[0]}" "$work/controller.log" "controller serving" local_addr)
"$bin/gpufleet-agent" --controller "http://$addr" --join-token "$join_token" \
    --gpu-backend simulated \
    --simulated-gpus 2xL4 --node-id python-ci-node --data-dir "$work/agent" --listen 127.0.0.1:0 \
    --metrics-listen off >"$work/agent.log" 2>&1 &
pids+=($!)

# The controller writes its bootstrap admin token at its first start.
for _ in $(seq 100); do [[ -s $work/controller/admin.token ]] && break; sleep 0.1; done
[[ -s $work/controller/admin.token ]] || { echo "examples/python: no admin.token" >&2; exit 1; }
GPUFLEET_TOKEN=$(cat "$work/controller/admin.token")
export GPUFLEET_TOKEN

# scheduler.py waits for the controller itself, and a job submitted before
# the agent registers stays pending until it does.
status=0
# shellcheck disable=SC2016 # expanded by the workload's shell, not here
timeout 120 "$PYTHON" examples/python/scheduler.py --controller "$addr" --gpus 2 \
    --timeout 90 -- sh -c 'echo "gpus: $CUDA_VISIBLE_DEVICES"' >"$work/out.txt" 2>&1 || status=$?
cat "$work/out.txt"

fail() {
    echo "examples/python: $*" >&2
    echo "--- controller log" >&2; tail -n 20 "$work/controller.log" >&2
    echo "--- agent log" >&2; tail -n 20 "$work/agent.log" >&2
    exit 1
}
[[ $status -eq 0 ]] || fail "scheduler.py exited $status"
grep -q "finished: JOB_STATE_SUCCEEDED" "$work/out.txt" || fail "no SUCCEEDED in its output"
# The GPUs the controller allocated (task line) are the ones the workload saw (log line).
allocated=$(sed -n 's/^task 0: .* gpus \([^ ]*\) exit 0$/\1/p' "$work/out.txt")
seen=$(sed -n 's/^gpus: //p' "$work/out.txt")
[[ -n $allocated ]] || fail "no task line with exit 0"
[[ $(tr ',' '\n' <<<"$allocated" | grep -c '^GPU-') -eq 2 ]] || fail "expected two GPU UUIDs, got '$allocated'"
[[ $allocated == "$seen" ]] || fail "allocated GPUs '$allocated' differ from the workload's CUDA_VISIBLE_DEVICES '$seen'"
echo "examples/python: OK (job succeeded on $allocated)"

# --- Two controllers sharing etcd (docs/ha.md): the script is given only
# the standby and must follow its answer to the leader. etcd comes from the
# project's script (Debian's etcd-server), on unix sockets in a short path.
etcd_dir=$(mktemp -d /tmp/etcdXXXX)
eps=$(tests/etcd/setup.sh start "$etcd_dir" 1 $$)
pids+=("$(cat "$etcd_dir/m1/pid")")
ha_args=(--metrics-listen 127.0.0.1:0 --log-format json --join-token "$join_token"
    --store etcd --etcd-endpoints "$eps" --etcd-prefix /python-ci/)
GPUFLEET_LOG=info "$bin/gpufleet-controller" --listen 127.0.0.1:0 --data-dir "$work/leader" \
    "${ha_args[@]}" >"$work/leader.log" 2>&1 &
pids+=($!)
leader=$(logged_field "$!" "$work/leader.log" "controller serving" local_addr)
GPUFLEET_LOG=info "$bin/gpufleet-controller" --listen 127.0.0.1:0 --data-dir "$work/standby" \
    "${ha_args[@]}" >"$work/standby.log" 2>&1 &
pids+=($!)
standby=$(logged_field "$!" "$work/standby.log" "controller standing by" local_addr)
"$bin/gpufleet-agent" --controller "http://$standby,http://$leader" --join-token "$join_token" \
    --gpu-backend simulated --simulated-gpus 2xL4 --node-id python-ha-node --data-dir "$work/ha-agent" \
    --listen 127.0.0.1:0 --metrics-listen off >"$work/ha-agent.log" 2>&1 &
pids+=($!)
GPUFLEET_TOKEN=$(cat "$work/leader/admin.token")
status=0
timeout 120 "$PYTHON" examples/python/scheduler.py --controller "$standby" --gpus 1 \
    --timeout 90 -- true >"$work/ha-out.txt" 2>&1 || status=$?
cat "$work/ha-out.txt"
[[ $status -eq 0 ]] || fail "scheduler.py via the standby exited $status"
grep -q "is a standby; following the leader at http://$leader" "$work/ha-out.txt" \
    || fail "scheduler.py did not follow the standby to the leader"
grep -q "finished: JOB_STATE_SUCCEEDED" "$work/ha-out.txt" || fail "no SUCCEEDED via the standby"
rm -rf "$etcd_dir"
echo "examples/python: OK (followed the standby $standby to the leader $leader)"

# The grpcurl examples in docs/grpc.md name real methods and valid bodies.
"$PYTHON" examples/python/check_grpc_docs.py
