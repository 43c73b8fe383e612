"""The chart rendered offline (helm-python-sdk, Helm v4 SDK) once per value set, as objects."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "rheo"
RELEASE = "rheo"
NAMESPACE = "rheo"

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install -e '.[dev]')")

# The value sets every render-based test runs over. Each is a user's values file (merged over values.yaml by Helm).
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu-4-stages": {
        "ditStage": {"stages": 4, "gpus": 1},
        "ingest": {"gpus": 1},
        "decoder": {"gpus": 1},
        "model": {"source": "pvc", "pvc": {"claimName": "rheo-weights"}, "subPath": "Wan2.1-T2V-1.3B"},
        "config": {"model": {"preset": "1.3b", "device": "cuda"},
                   "telemetry": {"otlp_endpoint": "http://otel-collector.observability:4318/v1/traces"}},
        "serviceMonitor": {"enabled": True},
        "grafana": {"dashboards": True},
    },
    "existing-secrets": {
        # Also moves every listener off its default port: the chart must follow the config, not hard-code ports.
        "nats": {"deploy": False, "url": "tls://nats-a.infra:4222,tls://nats-b.infra:4222",
                 "tls": {"caSecret": "corp-nats-ca"}, "auth": {"type": "creds", "existingSecret": "corp-nats"}},
        "api": {"existingSecret": "corp-rheo-api"},
        "ditStage": {"linkKey": {"existingSecret": "corp-link"}},
        "playback": {"existingSecret": "corp-rheo-playback"},
        "config": {"gateway": {"port": 8081}, "ingest": {"rtmp_port": 1936, "rtmps_port": 1937},
                   "egress": {"http_port": 8091},
                   "dit_stage": {"link_port": 7101}, "telemetry": {"metrics_port": 9465}},
        "model": {"source": "hostPath", "hostPath": {"path": "/srv/models"}},
        "ingest": {"tls": {"secretName": "corp-rtmps-tls"}},  # the RTMPS listener, on
    },
    "nats-cert-manager": {
        "nats": {"tls": {"certManager": {"issuer": "corp-ca", "kind": "ClusterIssuer"}},
                 "jetstream": {"storageSize": "20Gi", "storageClassName": "fast", "maxFileStore": "16G"}},
        "api": {"tokens": ["0123456789abcdef0123456789abcdef"]},
        "ingest": {"service": {"type": "NodePort", "nodePort": 31935}},
        "gateway": {"service": {"type": "LoadBalancer"}},
        "ditStage": {"stages": 2, "rings": 2, "gpus": 0},
        # the autoscaler applying (RBAC for the scale of exactly its workloads, the token mounted)
        "config": {"controller": {"autoscale": {"mode": "apply", "max_rings": 3}}},
    },
}
# Value sets valid only on newer Kubernetes (image volumes: 1.31+), validated against the newest version only.
NEW_ONLY_VALUE_SETS: dict[str, dict[str, Any]] = {
    "image-weights": {"model": {"source": "image", "image": {"reference": "registry.example/wan21-weights:1.3b"}}},
}
ALL_VALUE_SETS = {**VALUE_SETS, **NEW_ONLY_VALUE_SETS}


class Rendered:
    """One render of the chart: the user values, the merged values and every object by kind and name."""

    def __init__(self, values: dict[str, Any]) -> None:
        chart = helm.Chart.load(str(CHART))
        self.values = values
        self.merged = deep_merge(yaml.safe_load((CHART / "values.yaml").read_text()), values)
        self.files = chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE, is_install=True)
        self.notes = self.files.get(f"{CHART.name}/templates/NOTES.txt", "")
        self.objects: list[dict[str, Any]] = []
        for path, text in sorted(self.files.items()):
            if path.endswith(".txt"):
                continue
            self.objects.extend(doc for doc in yaml.safe_load_all(text) if doc)

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.kind(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
        return found[0]

    def workloads(self) -> list[dict[str, Any]]:
        """rheo's services (the chart's NATS server aside: ``nats()``)."""
        return [w for w in self.kind("Deployment") + self.kind("StatefulSet") if component(w) != "nats"]

    def nats(self) -> dict[str, Any] | None:
        """The chart's own NATS StatefulSet (None with nats.deploy false)."""
        found = [w for w in self.kind("StatefulSet") if component(w) == "nats"]
        return found[0] if found else None

    def config_yaml(self) -> dict[str, Any]:
        return yaml.safe_load(self.get("ConfigMap", f"{RELEASE}-config")["data"]["config.yaml"])


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def component(obj: dict[str, Any]) -> str:
    return obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from obj["spec"]["template"]["spec"]["containers"]


_CACHE: dict[str, Rendered] = {}


def render(name: str) -> Rendered:
    """The render of value set ``name``, computed once per session."""
    if name not in _CACHE:
        _CACHE[name] = Rendered(ALL_VALUE_SETS[name])
    return _CACHE[name]
