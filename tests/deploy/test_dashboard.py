"""The Grafana dashboard the chart ships: a ConfigMap Grafana's sidecar loads (only when asked for), and every query
names a metric rheo defines (a renamed metric must not leave a blank panel behind)."""

from __future__ import annotations

import json
import re

from deploy.chartkit import CHART, RELEASE, ROOT, render

DASHBOARD = CHART / "dashboards" / "rheo.json"
_DEFINED = re.compile(r"""(?:Counter|Gauge|Histogram|Summary)\(\s*["'](rheo_\w+)["']""")
_USED = re.compile(r"\brheo_\w+")
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def defined_metrics() -> set[str]:
    """Every metric name the code defines (prometheus_client's ``_total`` left off counters)."""
    names: set[str] = set()
    for path in ROOT.glob("*/**/*.py"):
        if path.parts[len(ROOT.parts)] in ("tests", ".venv", "build"):
            continue
        names.update(n.removesuffix("_total") for n in _DEFINED.findall(path.read_text(errors="replace")))
    return names


def unknown_metrics(exprs: list[str], defined: set[str]) -> set[str]:
    unknown = set()
    for name in (n for e in exprs for n in _USED.findall(e)):
        base = next((name.removesuffix(s) for s in _SUFFIXES if name.endswith(s)), name)
        if name not in defined and base not in defined:
            unknown.add(name)
    return unknown


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_the_dashboard_configmap_is_rendered_for_grafanas_sidecar_only_when_enabled() -> None:
    cm = render("gpu-4-stages").get("ConfigMap", f"{RELEASE}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["rheo.json"]) == json.loads(DASHBOARD.read_text())
    assert all(c["metadata"]["name"] != f"{RELEASE}-dashboard" for c in render("default").kind("ConfigMap"))


def test_every_dashboard_query_names_a_metric_rheo_defines() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = _exprs(dashboard)
    defined = defined_metrics()
    assert {"rheo_ttff_seconds", "rheo_glass_to_glass_seconds", "rheo_stage_chunk_seconds",
            "rheo_deadline_misses", "rheo_stream_output_fps"} <= defined
    assert len(exprs) >= 15 and unknown_metrics(exprs, defined) == set()
    assert unknown_metrics(["rate(rheo_no_such_thing_total[5m])"], defined) == {"rheo_no_such_thing_total"}
    for name in ("rheo_ttff_seconds", "rheo_glass_to_glass_seconds", "rheo_stage_chunk_seconds",
                 "rheo_deadline_misses_total", "rheo_stream_output_fps"):
        assert any(name in e for e in exprs), name
