#!/usr/bin/env python3
"""Structural checks of deploy/ that no off-the-shelf linter does.

    checks.py grafana DASHBOARD_DIR METRICS_YAML PROMQL_RULES_OUT
    checks.py rules ALERTS_YML METRICS_YAML
    checks.py manifests RENDERED_YAML...
    checks.py dockerfiles WORKSPACE_METADATA_JSON DOCKERFILE...

Each prints one line per problem and exits 1 if there was any. `grafana`
also writes every dashboard query, with Grafana's variables replaced, as a
Prometheus recording-rule file so that `promtool check rules` parses each
query with Prometheus' own PromQL parser.
"""

import json
import re
import sys
from pathlib import Path

import yaml

problems = []


def problem(where, message):
    problems.append(f"{where}: {message}")


# --- PromQL metric names ------------------------------------------------------

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "atan2", "start", "end",
    # Aggregations may put their grouping clause before the parenthesis.
    "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk",
    "bottomk", "quantile", "count_values", "limitk", "limit_ratio",
}


def metric_names(expr):
    """Metric names an expression selects: identifiers that are neither
    functions (followed by '('), keywords, label names in matchers or
    grouping clauses, nor Grafana variables."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # strings
    e = re.sub(r"\$\{?\w+\}?", "", e)                     # Grafana variables
    e = re.sub(r"\{[^}]*\}", "", e)                       # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                      # ranges
    e = re.sub(r"(?<![A-Za-z0-9_:])\d[\d.e+]*(?:ms|[smhdwy])*", "", e)  # numbers, durations
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word, rest = m.group(0), e[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in KEYWORDS:
            continue
        names.add(word)
    return names


def known_metrics(catalogue_path):
    catalogue = yaml.safe_load(Path(catalogue_path).read_text())
    known, pending = set(), {}
    for source in catalogue.values():
        for name, info in source["metrics"].items():
            names = {name}
            if info.get("type") == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            known |= names
            if info.get("pending"):
                for n in names:
                    pending[n] = info["pending"]
    return known, pending


def check_names(where, expr, known, used):
    for name in metric_names(expr):
        used.add(name)
        if name not in known:
            problem(where, f"metric {name} is neither exported nor listed in deploy/metrics.yaml")


# --- Grafana ------------------------------------------------------------------

def grafana_exprs(panel):
    for t in panel.get("targets", []):
        if "expr" in t:
            yield t["refId"], t["expr"], t.get("datasource")


def check_grafana(dashboard_dir, catalogue_path, rules_out):
    known, pending = known_metrics(catalogue_path)
    used, rules = set(), []
    files = sorted(Path(dashboard_dir).glob("*.json"))
    if not files:
        problem(dashboard_dir, "no dashboards")
    uids = set()
    for path in files:
        try:
            board = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            problem(path, f"not JSON: {e}")
            continue
        for key in ("uid", "title", "schemaVersion", "panels", "templating", "__inputs"):
            if key not in board:
                problem(path, f"missing top-level key {key!r}")
        if not isinstance(board.get("schemaVersion"), int) or board.get("schemaVersion", 0) < 36:
            problem(path, "schemaVersion must be an integer >= 36 (Grafana 9+)")
        if board.get("uid") in uids:
            problem(path, f"uid {board.get('uid')!r} is used by another dashboard")
        uids.add(board.get("uid"))
        inputs = {i.get("name") for i in board.get("__inputs", [])}
        if "DS_PROMETHEUS" not in inputs:
            problem(path, "no DS_PROMETHEUS datasource input: importing would not ask for a Prometheus")
        variables = {v["name"] for v in board.get("templating", {}).get("list", [])}
        for v in board.get("templating", {}).get("list", []):
            q = v.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            if v.get("type") == "query":
                m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q or "")
                if not m:
                    problem(path, f"variable {v['name']}: query {q!r} is not label_values(selector, label)")
                else:
                    check_names(f"{path} variable {v['name']}", m.group(1), known, used)
        ids, panels = set(), list(board.get("panels", []))
        for p in board.get("panels", []):
            panels.extend(p.get("panels", []))
        for p in panels:
            where = f"{path} panel {p.get('id')} {p.get('title')!r}"
            if not isinstance(p.get("id"), int):
                problem(where, "panel id must be an integer")
            elif p["id"] in ids:
                problem(where, f"duplicate panel id {p['id']}")
            ids.add(p.get("id"))
            if "gridPos" not in p:
                problem(where, "no gridPos")
            if p.get("type") == "row":
                continue
            if not p.get("targets"):
                problem(where, "no queries")
            for ref, expr, ds in grafana_exprs(p):
                if (ds or p.get("datasource", {})).get("uid") != "${DS_PROMETHEUS}":
                    problem(where, f"query {ref} does not use the ${{DS_PROMETHEUS}} datasource")
                for var in re.findall(r"\$(\w+)", expr):
                    if not var.startswith("__") and var not in variables:
                        problem(where, f"query {ref} uses ${var}, which is not a dashboard variable")
                check_names(f"{where} query {ref}", expr, known, used)
                # Grafana substitutes these before Prometheus sees the query.
                promql = expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
                promql = re.sub(r"\$\w+", ".*", promql)
                rules.append({"record": f"dashboard:{path.stem.replace('-', '_')}:p{p['id']}_{ref}",
                              "expr": promql})
    Path(rules_out).write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}))
    waiting = sorted({pending[n] for n in used if n in pending})
    print(f"grafana: {len(files)} dashboards, {len(rules)} queries; metrics used: {len(used)}, "
          f"of which pending on: {'; '.join(waiting) or 'nothing'}")


# --- alert rules --------------------------------------------------------------

def check_rules(alerts_path, catalogue_path):
    known, pending = known_metrics(catalogue_path)
    used = set()
    doc = yaml.safe_load(Path(alerts_path).read_text())
    count = 0
    for group in doc["groups"]:
        for rule in group["rules"]:
            count += 1
            name = rule.get("alert") or rule.get("record")
            check_names(f"{alerts_path} {name}", rule["expr"], known, used)
            if "alert" in rule:
                if rule.get("labels", {}).get("severity") not in ("warning", "critical"):
                    problem(f"{alerts_path} {name}", "severity label must be warning or critical")
                if not rule.get("annotations", {}).get("summary"):
                    problem(f"{alerts_path} {name}", "no summary annotation")
    waiting = sorted({f"{n} ({pending[n]})" for n in used if n in pending and not n.endswith(("_sum", "_count"))})
    print(f"rules: {count} rules; metrics pending: {', '.join(waiting) or 'none'}")


# --- Kubernetes ---------------------------------------------------------------

def check_manifests(paths):
    for path in paths:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
        by_kind = {}
        for d in docs:
            for key in ("apiVersion", "kind", "metadata"):
                if key not in d:
                    problem(path, f"a document has no {key}")
            by_kind.setdefault(d.get("kind"), {})[d["metadata"]["name"]] = d
        config_maps = by_kind.get("ConfigMap", {})
        secrets = by_kind.get("Secret", {})
        pvcs = by_kind.get("PersistentVolumeClaim", {})
        workloads = {**by_kind.get("Deployment", {}), **by_kind.get("DaemonSet", {}),
                     **by_kind.get("StatefulSet", {})}
        for name, w in workloads.items():
            where = f"{path} {w['kind']}/{name}"
            pod = w["spec"]["template"]
            selector = w["spec"]["selector"]["matchLabels"]
            if any(pod["metadata"].get("labels", {}).get(k) != v for k, v in selector.items()):
                problem(where, "selector does not match the pod template's labels")
            spec = pod["spec"]
            containers = spec.get("containers", []) + spec.get("initContainers", [])
            for c in containers:
                cw = f"{where} container {c['name']}"
                image = c.get("image", "")
                if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                    problem(cw, f"image {image!r} has no pinned tag")
                if "memory" not in c.get("resources", {}).get("limits", {}):
                    problem(cw, "no memory limit")
                if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
                    problem(cw, "allowPrivilegeEscalation must be false")
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {})
                    if "secretKeyRef" in ref:
                        s = secrets.get(ref["secretKeyRef"]["name"])
                        if s is None:
                            problem(cw, f"env {env['name']}: Secret {ref['secretKeyRef']['name']} is not rendered")
                        elif ref["secretKeyRef"]["key"] not in {**s.get("data", {}), **s.get("stringData", {})}:
                            problem(cw, f"env {env['name']}: Secret has no key {ref['secretKeyRef']['key']}")
                    if "configMapKeyRef" in ref:
                        cm = config_maps.get(ref["configMapKeyRef"]["name"])
                        if cm is None or ref["configMapKeyRef"]["key"] not in cm.get("data", {}):
                            problem(cw, f"env {env['name']}: ConfigMap key {ref['configMapKeyRef']} is not rendered")
                mounts = {m["name"] for m in c.get("volumeMounts", [])}
                volumes = {v["name"] for v in spec.get("volumes", [])}
                volumes |= {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
                for m in mounts - volumes:
                    problem(cw, f"mounts volume {m}, which the pod does not define")
            for v in spec.get("volumes", []):
                if "configMap" in v and v["configMap"]["name"] not in config_maps:
                    problem(where, f"volume {v['name']}: ConfigMap {v['configMap']['name']} is not rendered")
                if "persistentVolumeClaim" in v and v["persistentVolumeClaim"]["claimName"] not in pvcs:
                    problem(where, f"volume {v['name']}: PVC is not rendered")
        ctrl = workloads.get("gpufleet-controller")
        if ctrl is None:
            problem(path, "no gpufleet-controller Deployment")
        else:
            c = ctrl["spec"]["template"]["spec"]["containers"][0]
            for probe in ("livenessProbe", "readinessProbe"):
                if c.get(probe, {}).get("grpc", {}).get("port") != 7070:
                    problem(path, f"controller {probe} must be a gRPC probe on port 7070")
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            if env.get("GPUFLEET_STORE") == "etcd":
                # Several controllers share etcd; one leads (docs/ha.md).
                if ctrl["spec"].get("replicas", 1) < 2:
                    problem(path, "an etcd-mode controller needs 2 or more replicas (standbys)")
                if c.get("livenessProbe", {}).get("grpc", {}).get("service") != "gpufleet.live":
                    problem(path, "an etcd-mode controller's liveness must ask for gpufleet.live (standbys are not SERVING)")
            elif ctrl["spec"].get("strategy", {}).get("type") != "Recreate" or ctrl["spec"].get("replicas") != 1:
                problem(path, "controller must be 1 replica with strategy Recreate (one writer on its store)")
        agent = workloads.get("gpufleet-agent")
        if agent is None:
            problem(path, "no gpufleet-agent DaemonSet")
        else:
            spec = agent["spec"]["template"]["spec"]
            if spec.get("runtimeClassName") != "nvidia":
                problem(path, "agent needs runtimeClassName: nvidia")
            if spec.get("nodeSelector", {}).get("nvidia.com/gpu.present") != "true":
                problem(path, "agent must select nodes with nvidia.com/gpu.present=true")
            if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])):
                problem(path, "agent must tolerate the nvidia.com/gpu taint")
            if spec.get("hostPID", False):
                problem(path, "agent must not use hostPID")
        services = by_kind.get("Service", {})
        for name, svc in services.items():
            sel = svc["spec"].get("selector", {})
            targets = [w for w in workloads.values()
                       if all(w["spec"]["template"]["metadata"].get("labels", {}).get(k) == v for k, v in sel.items())]
            if not targets:
                problem(f"{path} Service/{name}", "selects no workload")
            for port in svc["spec"]["ports"]:
                tp = port.get("targetPort")
                if isinstance(tp, str) and not any(
                        tp == p.get("name") for w in targets
                        for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])):
                    problem(f"{path} Service/{name}", f"targetPort {tp} is no container port name")
        print(f"manifests: {path}: {len(docs)} objects checked")


# --- Dockerfiles --------------------------------------------------------------

def check_dockerfiles(metadata_path, dockerfiles):
    metadata = json.loads(Path(metadata_path).read_text())
    bins = {(p["name"], t["name"]) for p in metadata["packages"] for t in p["targets"] if "bin" in t["kind"]}
    for path in dockerfiles:
        text = Path(path).read_text()
        builds = re.findall(r"cargo build --release --locked -p (\S+) --bin (\S+)", text)
        if not builds:
            problem(path, "no `cargo build --release --locked -p PACKAGE --bin BIN`")
        for package, binary in builds:
            if (package, binary) not in bins:
                problem(path, f"package {package} has no binary {binary}")
            if f"target/release/{binary}" not in text:
                problem(path, f"does not copy target/release/{binary} out of the build stage")
        if not re.search(r"^ENTRYPOINT \[", text, re.M):
            problem(path, "no exec-form ENTRYPOINT")
    print(f"dockerfiles: {len(dockerfiles)} checked against the workspace's binaries")


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "grafana":
        check_grafana(*args)
    elif command == "rules":
        check_rules(*args)
    elif command == "manifests":
        check_manifests(args)
    elif command == "dockerfiles":
        check_dockerfiles(args[0], args[1:])
    else:
        sys.exit(f"unknown check {command!r}")
    for p in problems:
        print(f"  PROBLEM {p}")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
