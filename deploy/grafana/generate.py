#!/usr/bin/env python3
"""Writes the Grafana dashboards in dashboards/*.json.

The JSON files are what admins import (Dashboards > Import, or file
provisioning); this script is their source, so that four dashboards share
one style. After editing it, run `python3 deploy/grafana/generate.py`;
deploy/ci-checks.sh fails when the JSON and this script disagree.
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}


class Board:
    def __init__(self, uid, title, description, tags, variables):
        self.uid, self.title, self.description = uid, title, description
        self.tags, self.variables = tags, variables
        self.panels, self.y, self.next_id = [], 0, 1

    def row(self, title):
        self.panels.append({
            "id": self._id(), "type": "row", "title": title, "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": [],
        })
        self.y += 1

    def line(self, *panels, height=8):
        """Lays panels out side by side on one line of the 24-column grid."""
        width = 24 // len(panels)
        for i, p in enumerate(panels):
            p["id"] = self._id()
            p["gridPos"] = {"h": height, "w": width, "x": i * width, "y": self.y}
            self.panels.append(p)
        self.y += height

    def _id(self):
        self.next_id += 1
        return self.next_id - 1

    def json(self):
        return {
            "__inputs": [{
                "name": "DS_PROMETHEUS", "label": "Prometheus",
                "description": "The Prometheus that scrapes gpufleet (deploy/prometheus)",
                "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus",
            }],
            "__requires": [
                {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
                {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            ],
            "uid": self.uid, "title": self.title, "description": self.description,
            "tags": ["gpufleet"] + self.tags, "editable": True, "graphTooltip": 1,
            "schemaVersion": 39, "version": 1, "refresh": "30s", "timezone": "",
            "time": {"from": "now-6h", "to": "now"},
            "annotations": {"list": []},
            "links": [{"title": "gpufleet", "type": "dashboards", "tags": ["gpufleet"], "asDropdown": True}],
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


def query_var(name, label, metric, label_name, multi=True, filters=""):
    query = f"label_values({metric}{filters}, {label_name})"
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": f"{name}-values"}, "definition": query,
        "refresh": 2, "sort": 1, "multi": multi, "includeAll": multi,
        "allValue": ".*" if multi else None, "current": {}, "hide": 0,
    }


def target(expr, legend="", ref="A", instant=False):
    t = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}
    if instant:
        t.update({"instant": True, "range": False, "format": "table"})
    return t


def timeseries(title, targets, unit="short", description="", stack=False):
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DS,
        "targets": targets,
        "fieldConfig": {"defaults": {
            "unit": unit,
            "custom": {"stacking": {"mode": "normal" if stack else "none"},
                       "fillOpacity": 20 if stack else 0, "lineWidth": 1},
        }, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom",
                               "calcs": ["lastNotNull", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def stat(title, expr, unit="short", description="", thresholds=None):
    steps = thresholds or [{"color": "green", "value": None}]
    return {
        "type": "stat", "title": title, "description": description, "datasource": DS,
        "targets": [target(expr)],
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto"},
    }


def table(title, expr, description=""):
    return {
        "type": "table", "title": title, "description": description, "datasource": DS,
        "targets": [target(expr, instant=True)],
        "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True}}}],
        "fieldConfig": {"defaults": {}, "overrides": []}, "options": {"showHeader": True},
    }


def bargauge(title, targets, unit="short", description="", max_value=None):
    defaults = {"unit": unit, "min": 0}
    if max_value is not None:
        defaults["max"] = max_value
    return {
        "type": "bargauge", "title": title, "description": description, "datasource": DS,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"orientation": "horizontal", "displayMode": "gradient",
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
    }


RED = [{"color": "green", "value": None}, {"color": "red", "value": 1}]
FLEET = 'provider=~"$provider", region=~"$region", generation=~"$generation"'
PENDING_5 = "Needs the usage and market metrics (issue 5); empty until they land."


def fleet_overview():
    b = Board("gpufleet-fleet", "gpufleet / Fleet overview",
              "GPU capacity and health across providers, regions and generations.",
              ["fleet"], [
                  query_var("provider", "Provider", "gpufleet_fleet_gpus", "provider"),
                  query_var("region", "Region", "gpufleet_fleet_gpus", "region",
                            filters='{provider=~"$provider"}'),
                  query_var("generation", "Generation", "gpufleet_fleet_gpus", "generation"),
              ])
    b.row("Capacity")
    b.line(*[stat(f"{s.capitalize()} GPUs", f'sum(gpufleet_fleet_gpus{{{FLEET}, state="{s}"}})')
             for s in ("total", "healthy", "allocated", "free")], height=4)
    b.line(
        timeseries("GPUs by provider / region / generation",
                   [target(f'sum by (provider, region, generation) (gpufleet_fleet_gpus{{{FLEET}, state="total"}})',
                           "{{provider}} {{region}} {{generation}}")], stack=True),
        timeseries("Allocated share",
                   [target(f'sum by (generation) (gpufleet_fleet_gpus{{{FLEET}, state="allocated"}}) '
                           f'/ sum by (generation) (gpufleet_fleet_gpus{{{FLEET}, state="healthy"}})',
                           "{{generation}}")], unit="percentunit"),
    )
    b.line(table("Free GPUs by region and generation",
                 f'sum by (provider, region, generation) (gpufleet_fleet_gpus{{{FLEET}, state="free"}})'),
           bargauge("Unhealthy GPUs by region",
                    [target(f'sum by (region) (gpufleet_fleet_gpus{{{FLEET}, state="total"}}) '
                            f'- sum by (region) (gpufleet_fleet_gpus{{{FLEET}, state="healthy"}})',
                            "{{region}}")]))
    b.row("Nodes and jobs")
    b.line(
        timeseries("Nodes by state", [target("sum by (state) (gpufleet_nodes)", "{{state}}")], stack=True),
        timeseries("Jobs by state", [target("sum by (state) (gpufleet_jobs)", "{{state}}")]),
        timeseries("Telemetry samples dropped by the controller",
                   [target("sum by (node) (rate(gpufleet_telemetry_samples_dropped_total[$__rate_interval]))",
                           "{{node}}")], unit="ops"),
    )
    b.line(stat("Lost nodes", 'sum(gpufleet_nodes{state="lost"}) or vector(0)', thresholds=RED),
           stat("Agents not scraped", 'count(up{job=~"gpufleet-agent.*"} == 0) or vector(0)', thresholds=RED),
           stat("Unhealthy GPUs (agent view)", 'sum(gpufleet_gpu_health{state="unhealthy"}) or vector(0)',
                thresholds=RED),
           height=4)
    return b


def gpu_detail():
    sel = 'Hostname=~"$Hostname", gpu=~"$gpu"'
    b = Board("gpufleet-gpu", "gpufleet / GPU detail",
              "Per-GPU telemetry from the agents' /metrics (dcgm-exporter names).",
              ["gpu", "dcgm"], [
                  query_var("Hostname", "Host", "DCGM_FI_DEV_GPU_UTIL", "Hostname"),
                  query_var("gpu", "GPU", "DCGM_FI_DEV_GPU_UTIL", "gpu", filters='{Hostname=~"$Hostname"}'),
              ])
    legend = "{{Hostname}} GPU {{gpu}}"
    b.row("Load")
    b.line(timeseries("GPU utilisation", [target(f"DCGM_FI_DEV_GPU_UTIL{{{sel}}}", legend)], unit="percent"),
           timeseries("Framebuffer used", [target(f"DCGM_FI_DEV_FB_USED{{{sel}}} * 1024 * 1024", legend)],
                      unit="bytes"),
           timeseries("Framebuffer used share",
                      [target(f"DCGM_FI_DEV_FB_USED{{{sel}}} / (DCGM_FI_DEV_FB_USED{{{sel}}} + DCGM_FI_DEV_FB_FREE{{{sel}}})",
                              legend)], unit="percentunit"))
    b.row("Thermals and power")
    b.line(timeseries("Temperature", [target(f"DCGM_FI_DEV_GPU_TEMP{{{sel}}}", legend)], unit="celsius"),
           timeseries("Power", [target(f"DCGM_FI_DEV_POWER_USAGE{{{sel}}}", legend)], unit="watt"),
           timeseries("SM / memory clock",
                      [target(f"DCGM_FI_DEV_SM_CLOCK{{{sel}}}", legend + " SM"),
                       target(f"DCGM_FI_DEV_MEM_CLOCK{{{sel}}}", legend + " mem", ref="B")],
                      unit="MHz"))
    b.row("Errors and health")
    b.line(timeseries("XID errors", [target(f"increase(DCGM_FI_DEV_XID_ERRORS{{{sel}}}[$__rate_interval])", legend)]),
           timeseries("Double-bit ECC errors",
                      [target(f"increase(DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{{{sel}}}[$__rate_interval])", legend)]),
           table("Health", f'gpufleet_gpu_health{{{sel}}} == 1',
                 description="The state each GPU is in now (healthy, degraded, unhealthy)."))
    return b


def usage_cost():
    b = Board("gpufleet-usage", "gpufleet / Usage and cost",
              "Who uses which GPUs and what it costs.",
              ["usage", "cost"], [
                  query_var("provider", "Provider", "gpufleet_fleet_gpus", "provider"),
                  query_var("region", "Region", "gpufleet_fleet_gpus", "region"),
                  query_var("generation", "Generation", "gpufleet_fleet_gpus", "generation"),
              ])
    b.row("Allocation (from the fleet gauges)")
    b.line(timeseries("Allocated GPUs by generation",
                      [target(f'sum by (generation) (gpufleet_fleet_gpus{{{FLEET}, state="allocated"}})',
                              "{{generation}}")], stack=True),
           timeseries("Mean utilisation of the fleet's GPUs by model",
                      [target('avg by (model_name) (DCGM_FI_DEV_GPU_UTIL{provider=~"$provider", region=~"$region"})',
                              "{{model_name}}")], unit="percent"))
    b.row("Usage records (issue 5)")
    b.line(timeseries("GPUs in use by tenant (GPU-seconds per second)",
                      [target(f"sum by (tenant) (rate(gpufleet_usage_gpu_seconds_total{{{FLEET}}}[$__rate_interval]))",
                              "{{tenant}}")], description=PENDING_5, stack=True),
           timeseries("Spend per hour by provider",
                      [target(f"sum by (provider) (rate(gpufleet_usage_cost_usd_total{{{FLEET}}}[$__rate_interval])) * 3600",
                              "{{provider}}")], unit="currencyUSD", description=PENDING_5, stack=True))
    b.line(stat("Spend in range", f"sum(increase(gpufleet_usage_cost_usd_total{{{FLEET}}}[$__range]))",
                unit="currencyUSD", description=PENDING_5),
           stat("GPU-hours in range", f"sum(increase(gpufleet_usage_gpu_seconds_total{{{FLEET}}}[$__range])) / 3600",
                description=PENDING_5),
           table("Spend by tenant and generation",
                 f"sum by (tenant, generation) (increase(gpufleet_usage_cost_usd_total{{{FLEET}}}[$__range]))",
                 description=PENDING_5))
    return b


def market():
    sel = 'region=~"$region", generation=~"$generation"'
    b = Board("gpufleet-market", "gpufleet / Market",
              "Which regions are tight, which generation is in demand, and how demand answers price.",
              ["market"], [
                  query_var("region", "Region", "gpufleet_fleet_gpus", "region"),
                  query_var("generation", "Generation", "gpufleet_fleet_gpus", "generation"),
              ])
    b.row("Tightness and demand (issue 5)")
    b.line(timeseries("Tightness by region and generation",
                      [target(f"gpufleet_region_tightness{{{sel}}}", "{{region}} {{generation}}")],
                      unit="percentunit", description=PENDING_5),
           timeseries("Pending demand (GPUs) vs free supply",
                      [target(f"sum by (generation) (gpufleet_pending_gpus{{{sel}}})", "{{generation}} pending"),
                       target(f'sum by (generation) (gpufleet_fleet_gpus{{{sel}, state="free"}})',
                              "{{generation}} free", ref="B")], description=PENDING_5))
    b.line(timeseries("Queue wait (p50, p90)",
                      [target("histogram_quantile(0.5, sum by (le) (rate(gpufleet_queue_wait_seconds_bucket[$__rate_interval])))", "p50"),
                       target("histogram_quantile(0.9, sum by (le) (rate(gpufleet_queue_wait_seconds_bucket[$__rate_interval])))", "p90", ref="B")],
                      unit="s", description=PENDING_5),
           timeseries("Price per GPU-hour by generation",
                      [target(f"avg by (generation) (gpufleet_price_per_gpu_hour_usd{{{sel}}})", "{{generation}}")],
                      unit="currencyUSD", description=PENDING_5),
           bargauge("Tightest now",
                    [target(f"topk(10, gpufleet_region_tightness{{{sel}}})", "{{region}} {{generation}}")],
                    unit="percentunit", max_value=1, description=PENDING_5))
    return b


def boards():
    return {"fleet-overview.json": fleet_overview(), "gpu-detail.json": gpu_detail(),
            "usage-cost.json": usage_cost(), "market.json": market()}


def render(board):
    return json.dumps(board.json(), indent=2, sort_keys=False) + "\n"


def main():
    check = "--check" in sys.argv
    stale = []
    for name, board in boards().items():
        path = OUT / name
        text = render(board)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print("out of date (run python3 deploy/grafana/generate.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
