"""charts/rheo/values-one-gpu.yaml: one ring of one stage, ingest and decoder co-scheduled with it on one GPU node."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from deploy.chartkit import CHART, Rendered, component, containers, helm

kubernetes_validate = pytest.importorskip("kubernetes_validate")

PROFILE = yaml.safe_load((CHART / "values-one-gpu.yaml").read_text())
GPU = "nvidia.com/gpu"


@pytest.fixture(scope="module")
def rendered() -> Rendered:
    helm.Chart.load(str(CHART)).validate_schema(PROFILE)  # the profile passes values.schema.json
    return Rendered(PROFILE)


def _workload(r: Rendered, name: str) -> dict[str, Any]:
    (found,) = [w for w in r.workloads() if component(w) == name]
    return found


def test_one_stage_and_every_model_pod_on_the_gpu(rendered: Rendered) -> None:
    dit = _workload(rendered, "dit-stage")
    assert dit["spec"]["replicas"] == 1
    assert rendered.config_yaml()["controller"]["stages"] == 1  # the block map: one stage holding every block
    assert rendered.config_yaml()["model"]["device"] == "cuda"
    for name in ("dit-stage", "ingest", "decoder"):
        res = next(containers(_workload(rendered, name)))["resources"]
        assert res["requests"][GPU] == 1 and res["limits"][GPU] == 1, name
        assert "memory" in res["requests"] and "memory" in res["limits"], name
    for name in ("egress", "gateway", "controller"):
        assert all(GPU not in c.get("resources", {}).get("limits", {}) for c in containers(_workload(rendered, name)))


def test_ingest_and_decoder_are_co_scheduled_with_the_stage(rendered: Rendered) -> None:
    dit_labels = _workload(rendered, "dit-stage")["spec"]["template"]["metadata"]["labels"]
    dit_node = _workload(rendered, "dit-stage")["spec"]["template"]["spec"]["nodeSelector"]
    for name in ("ingest", "decoder"):
        spec = _workload(rendered, name)["spec"]["template"]["spec"]
        (term,) = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"].items() <= dit_labels.items()  # selects the stage's pod
        assert spec["nodeSelector"] == dit_node  # the GPU-sharing node


def test_profile_manifests_pass_kubernetes_validate(rendered: Rendered) -> None:
    for obj in rendered.objects:
        if obj["kind"] in {"ServiceMonitor", "Certificate"}:
            continue
        kubernetes_validate.validate(obj, "1.28.0", strict=True)
