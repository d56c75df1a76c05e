#!/usr/bin/env bash
# Scrapes a real gpufleet-agent (simulated GPUs, one in MIG mode), then a
# real controller with an agent connected, and lints both scrapes with
# `promtool check metrics`. Evaluates every query of NVIDIA's dcgm-exporter
# Grafana dashboard (tests/dcgm-exporter-dashboard-queries.txt) with
# Prometheus's engine (`promtool test rules`) over the agent's scrape and
# fails unless each returns data. Installs Debian's prometheus package
# (promtool) when missing; CI runs this as root.
# Usage: tests/promtool.sh [agent-binary]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null; then
    echo "promtool missing; installing Debian's prometheus package"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

bin=${CARGO_TARGET_DIR:-target}/debug
agent=${1:-$bin/gpufleet-agent}
controller=$bin/gpufleet-controller
if [[ ! -x $agent || ! -x $controller ]]; then
    cargo build --locked -p gpufleet-agent -p gpufleet-controller
fi

work=$(mktemp -d)
cleanup() {
    for p in ${pid:-} ${cpid:-} ${apid:-}; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# Every port is 127.0.0.1:0; each binary's startup log line says which
# port it got (tests/bound-addr.sh).
# shellcheck source=tests/bound-addr.sh
source tests/bound-addr.sh

# The controller address is unreachable on purpose: the agent keeps
# retrying and serves /metrics all the same.
GPUFLEET_LOG=info "$agent" --log-format json \
    --gpu-backend simulated \
    --simulated-gpus 7xH100-SXM-80GB,1xH100-SXM-80GB:mig=3g.40gb+2g.20gb+1g.10gb+1g.10gb,1xL4 \
    --controller http://127.0.0.1:9 \
    --data-dir "$work/data" --listen 127.0.0.1:0 \
    --metrics-listen 127.0.0.1:0 --sample-interval 200ms \
    --provider aws --region us-east-1 >"$work/agent.log" 2>&1 &
pid=$!
metrics=$(bare_addr "$(logged_field "$pid" "$work/agent.log" "agent started" metrics)")
# Wait until a scrape contains samples (the first sample takes one interval).
scraped=
for _ in $(seq 1 100); do
    if curl -sf "http://$metrics/metrics" -o "$work/scrape" \
        && grep -q '^DCGM_FI_DEV_GPU_UTIL{' "$work/scrape"; then
        scraped=1
        break
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
if [[ -z $scraped ]]; then
    echo "FAIL: the agent served no GPU samples on $metrics/metrics" >&2
    cat "$work/agent.log" >&2
    exit 1
fi
echo "$(grep -c '^[A-Za-z]' "$work/scrape") series scraped; running promtool check metrics"
promtool check metrics <"$work/scrape"
echo "promtool: OK"

# The dashboard's queries over the scrape: each must return at least one
# series. Its template variables ($Hostname, $gpu) select everything, as
# "All" does; label_values(M, L) (a Grafana variable query) becomes the
# number of distinct non-empty L on M.
rules=$work/dashboard-test.yml
{
    echo "tests:"
    echo "  - interval: 1m"
    echo "    input_series:"
    grep '^DCGM_FI_' "$work/scrape" | while IFS= read -r line; do
        series=${line% *}
        echo "      - series: '${series//\'/\'\'}'"
        echo "        values: '${line##* }'"
    done
    echo "    promql_expr_test:"
    grep -v '^#' tests/dcgm-exporter-dashboard-queries.txt | while IFS= read -r line; do
        [[ -n $line ]] || continue
        query=${line#* | }
        query=${query//\$Hostname/.+}
        query=${query//\$gpu/.+}
        if [[ $query =~ ^label_values\((.*),\ *([A-Za-z_]+)\)$ ]]; then
            m=${BASH_REMATCH[1]} l=${BASH_REMATCH[2]}
            query="count by ($l) ($m) unless on($l) count by ($l) ({__name__=\"${m%%\{*}\",$l=\"\"})"
        fi
        echo "      - expr: 'count(${query//\'/\'\'}) > bool 0'"
        echo "        eval_time: 0m"
        echo "        exp_samples:"
        echo "          - labels: '{}'"
        echo "            value: 1"
    done
} >"$rules"
echo "$(grep -c 'expr:' "$rules") dashboard queries; running promtool test rules"
if ! promtool test rules "$rules"; then
    echo "FAIL: a query of the dcgm-exporter dashboard returned nothing on the agent's scrape" >&2
    exit 1
fi
echo "dcgm-exporter dashboard queries: OK"

# The controller's fleet /metrics, with one agent connected so that the
# capacity, telemetry and market families carry samples.
kill "$pid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true
pid=
GPUFLEET_LOG=info "$controller" --log-format json --data-dir "$work/controller" \
    --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 \
    --join-token promtool-join-token >"$work/controller.log" 2>&1 &
cpid=$!
grpc=$(logged_field "$cpid" "$work/controller.log" "controller serving" local_addr)
cmetrics=$(bare_addr "$(logged_field "$cpid" "$work/controller.log" "controller serving" metrics)")
GPUFLEET_LOG=warn "$agent" \
    --gpu-backend simulated --simulated-gpus 4xA100-SXM-80GB \
    --controller "http://$grpc" --join-token promtool-join-token --node-id promtool-node \
    --data-dir "$work/agent2" --listen 127.0.0.1:0 --metrics-listen off --sample-interval 200ms \
    --provider lambda --region us-west-1 --price-per-gpu-hour 1.79 >"$work/agent2.log" 2>&1 &
apid=$!
for _ in $(seq 1 150); do
    if curl -sf "http://$cmetrics/metrics" -o "$work/cscrape" \
        && grep -q '^gpufleet_gpus_reporting{.*} [1-9]' "$work/cscrape"; then
        break
    fi
    sleep 0.1
done
if ! grep -q '^gpufleet_fleet_gpus{' "$work/cscrape" 2>/dev/null; then
    echo "FAIL: the controller did not serve fleet metrics" >&2
    cat "$work/controller.log" "$work/agent2.log" >&2
    exit 1
fi
echo "$(grep -c '^[A-Za-z]' "$work/cscrape") controller series scraped; running promtool check metrics"
promtool check metrics <"$work/cscrape"
echo "promtool (controller): OK"
