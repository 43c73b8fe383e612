"""skaffold.yaml parses, names existing paths and profiles, and its chart values pass the chart's schema."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from deploy.chartkit import CHART, ROOT, helm

SKAFFOLD = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
SCHEMA = ROOT.parent / "shared" / "schemas" / "skaffold-v4beta14.json"


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _releases(profile: str | None) -> list[dict[str, Any]]:
    deploy = SKAFFOLD["deploy"]
    if profile:
        deploy = next(p for p in SKAFFOLD["profiles"] if p["name"] == profile).get("deploy", deploy)
    return deploy["helm"]["releases"]


def test_skaffold_config_shape() -> None:
    assert SKAFFOLD["apiVersion"].startswith("skaffold/v4") and SKAFFOLD["kind"] == "Config"
    (artifact,) = SKAFFOLD["build"]["artifacts"]
    assert (ROOT / artifact["context"] / artifact["docker"]["dockerfile"]).is_file()
    assert artifact["docker"]["buildArgs"]["VARIANT"] == "gpu"
    assert {p["name"] for p in SKAFFOLD["profiles"]} == {"cpu-tiny", "gpu"}
    cpu = next(p for p in SKAFFOLD["profiles"] if p["name"] == "cpu-tiny")
    assert {"op": "replace", "path": "/build/artifacts/0/docker/buildArgs/VARIANT", "value": "cpu"} in cpu["patches"]


@pytest.mark.parametrize("profile", [None, "cpu-tiny", "gpu"])
def test_every_release_names_an_existing_chart_and_valid_values(profile: str | None) -> None:
    image = SKAFFOLD["build"]["artifacts"][0]["image"]
    ours = [r for r in _releases(profile) if "chartPath" in r]
    assert len(ours) == 1
    (rel,) = ours
    assert (ROOT / rel["chartPath"]).resolve() == CHART
    assert set(rel["setValueTemplates"]) == {"image.repository", "image.tag"}
    assert f"IMAGE_REPO_{image}" in rel["setValueTemplates"]["image.repository"]
    values = _nest(rel.get("setValues", {}))
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema(values)
    rendered = chart.render(values, name=rel["name"], namespace=rel["namespace"])
    assert rendered, "the profile's values render"
    if profile == "gpu":
        assert values["ditStage"]["stages"] == 4 and values["ditStage"]["gpus"] >= 1
        assert values["model"]["source"] != "none"
    if profile == "cpu-tiny":
        assert values["ditStage"]["gpus"] == 0 and values["config"]["model"]["preset"] == "tiny"


def test_every_profile_uses_the_charts_own_nats() -> None:
    """One release per profile: the chart runs NATS itself (TLS, per-component users), no second NATS release."""
    for profile in (None, "cpu-tiny", "gpu"):
        releases = _releases(profile)
        assert [r["name"] for r in releases] == ["rheo"], profile
        assert not any(k.startswith("nats.") for k in releases[0].get("setValues", {})), profile


def test_skaffold_json_schema() -> None:
    if not SCHEMA.is_file():
        pytest.skip(f"skaffold JSON schema not provided at {SCHEMA} (no skaffold binary here either)")
    jsonschema = pytest.importorskip("jsonschema")
    import json

    jsonschema.validate(SKAFFOLD, json.loads(SCHEMA.read_text()))
