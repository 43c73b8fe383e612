"""Who may reach whom, read from the rendered NetworkPolicies with Kubernetes' own rules.

A small evaluator of NetworkPolicy semantics (a pod is isolated in a direction once any policy selecting it names
that direction; a connection needs the source's egress and the destination's ingress to allow it) answers
connectivity questions about pods of the release, a tenant pod in another namespace, the monitoring namespace and
an address on the internet. The matrix below is the security contract of docs/security.md.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

import pytest
from deploy.chartkit import NAMESPACE, RELEASE, Rendered, render


@dataclass(frozen=True)
class Endpoint:
    name: str
    namespace: str | None  # None: not a pod (an address outside the cluster)
    labels: dict[str, str] = field(default_factory=dict, hash=False)
    ip: str = "10.0.0.1"

    @property
    def ns_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace} if self.namespace else {}


def _matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    if set(selector) - {"matchLabels", "matchExpressions"}:
        raise NotImplementedError(f"selector {selector}")
    for e in selector.get("matchExpressions") or []:
        if e["operator"] != "In":
            raise NotImplementedError(f"operator {e['operator']}")  # extend the evaluator first
        if labels.get(e["key"]) not in e["values"]:
            return False
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def _peer_matches(peer: dict[str, Any], policy_ns: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        ip = ipaddress.ip_address(other.ip)
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(c) for c in block.get("except", []))
    if other.namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not _matches(peer["namespaceSelector"], other.ns_labels):
            return False
    elif other.namespace != policy_ns:
        return False
    return "podSelector" not in peer or _matches(peer["podSelector"], other.labels)


def _rule_allows(rule: dict[str, Any], key: str, policy_ns: str, other: Endpoint, port: int, proto: str) -> bool:
    peers = rule.get(key) or []
    ports = rule.get("ports") or []
    port_ok = not ports or any(p.get("port") in (None, port) and p.get("protocol", "TCP") == proto for p in ports)
    return port_ok and (not peers or any(_peer_matches(p, policy_ns, other) for p in peers))


class Policies:
    def __init__(self, rendered: Rendered) -> None:
        self.policies = rendered.kind("NetworkPolicy")

    def _selecting(self, pod: Endpoint, direction: str) -> list[dict[str, Any]]:
        return [p for p in self.policies
                if pod.namespace == NAMESPACE and _matches(p["spec"]["podSelector"], pod.labels)
                and direction in p["spec"].get("policyTypes", ["Ingress"])]

    def allowed(self, src: Endpoint, dst: Endpoint, port: int, proto: str = "TCP") -> bool:
        out = self._selecting(src, "Egress")
        if out and not any(_rule_allows(r, "to", NAMESPACE, dst, port, proto)
                           for p in out for r in p["spec"].get("egress") or []):
            return False
        into = self._selecting(dst, "Ingress")
        return not into or any(_rule_allows(r, "from", NAMESPACE, src, port, proto)
                               for p in into for r in p["spec"].get("ingress") or [])


def pod(component: str) -> Endpoint:
    return Endpoint(component, NAMESPACE, {"app.kubernetes.io/name": "rheo", "app.kubernetes.io/instance": RELEASE,
                                           "app.kubernetes.io/component": component})


COMPONENTS = ("gateway", "ingest", "decoder", "egress", "controller", "dit-stage")
INTERNET = Endpoint("internet", None, ip="203.0.113.7")
TENANT = Endpoint("tenant", "tenant-a", {"app": "anything"})
PROMETHEUS = Endpoint("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"})
DNS = Endpoint("coredns", "kube-system", {"k8s-app": "kube-dns"})
EXTERNAL_NATS = Endpoint("nats", "infra", {"app.kubernetes.io/name": "nats"})


@pytest.fixture(scope="module")
def default() -> tuple[Policies, dict[str, Any]]:
    rendered = render("default")
    return Policies(rendered), rendered.config_yaml()


def test_the_selectors_match_the_pods_they_govern() -> None:
    """Negative control for the evaluator: every component is governed by exactly one policy, in both directions."""
    policies = Policies(render("default"))
    for c in (*COMPONENTS, "nats"):
        assert len(policies._selecting(pod(c), "Ingress")) == 1, c
        assert len(policies._selecting(pod(c), "Egress")) == 1, c
    assert not policies._selecting(TENANT, "Ingress")


def test_what_the_world_reaches(default: tuple[Policies, dict[str, Any]]) -> None:
    policies, cfg = default
    assert policies.allowed(INTERNET, pod("gateway"), cfg["gateway"]["port"])
    assert policies.allowed(INTERNET, pod("ingest"), cfg["ingest"]["rtmp_port"])
    assert not policies.allowed(INTERNET, pod("egress"), cfg["egress"]["http_port"])  # playback via the gateway
    assert not policies.allowed(INTERNET, pod("dit-stage"), cfg["dit_stage"]["link_port"])
    assert not policies.allowed(TENANT, pod("dit-stage"), cfg["dit_stage"]["link_port"])
    assert not policies.allowed(INTERNET, pod("gateway"), cfg["telemetry"]["metrics_port"])


def test_metrics_only_from_the_monitoring_namespace(default: tuple[Policies, dict[str, Any]]) -> None:
    policies, cfg = default
    for c in COMPONENTS:
        assert policies.allowed(PROMETHEUS, pod(c), cfg["telemetry"]["metrics_port"]), c
        assert not policies.allowed(TENANT, pod(c), cfg["telemetry"]["metrics_port"]), c


def test_pods_reach_only_their_neighbours(default: tuple[Policies, dict[str, Any]]) -> None:
    policies, cfg = default
    link, http = cfg["dit_stage"]["link_port"], cfg["egress"]["http_port"]
    for c in COMPONENTS:
        assert policies.allowed(pod(c), DNS, 53, "UDP"), c
        assert policies.allowed(pod(c), pod("nats"), 4222), c  # the chart's NATS (nats.deploy)
        assert not policies.allowed(pod(c), EXTERNAL_NATS, 4222), c
        assert not policies.allowed(pod("nats"), pod(c), cfg["telemetry"]["metrics_port"]), c
        for other in COMPONENTS:
            assert policies.allowed(pod(c), pod(other), link) == (c == other == "dit-stage"), (c, other)
            assert policies.allowed(pod(c), pod(other), http) == (c == "gateway" and other == "egress"), (c, other)
        assert not policies.allowed(pod(c), TENANT, 8080), c
    assert not policies.allowed(TENANT, pod("nats"), 4222)  # only this release's components reach the bus
    assert not policies.allowed(pod("nats"), INTERNET, 443)
    assert policies.allowed(pod("controller"), INTERNET, 443)  # the Kubernetes API (leader Lease)
    assert policies.allowed(pod("egress"), INTERNET, 1935)  # restream
    for c in ("gateway", "ingest", "decoder", "dit-stage"):
        assert not policies.allowed(pod(c), INTERNET, 443), c
        assert not policies.allowed(pod(c), INTERNET, 1935), c


def test_the_world_narrows_by_value() -> None:
    narrowed = Rendered({
        "nats": {"deploy": False, "url": "tls://10.9.3.4:4222", "tls": {"caSecret": "corp-nats-ca"}},
        "networkPolicy": {"egress": {"nats": [{"ipBlock": {"cidr": "10.9.0.0/16"}}],
                                     "restream": {"to": [], "ports": [1935]},
                                     "kubeApi": {"to": [{"ipBlock": {"cidr": "10.96.0.1/32"}}], "ports": [443]}}},
        "gateway": {"service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["198.51.100.0/24"]}},
        "ingest": {"service": {"loadBalancerSourceRanges": ["198.51.100.0/24"]}},
    })
    policies = Policies(narrowed)
    assert not policies.allowed(pod("ingest"), EXTERNAL_NATS, 4222)
    assert policies.allowed(pod("ingest"), Endpoint("nats-vm", None, ip="10.9.3.4"), 4222)
    assert not policies.allowed(pod("egress"), INTERNET, 1935)
    assert not policies.allowed(pod("controller"), INTERNET, 443)
    assert policies.allowed(pod("controller"), Endpoint("apiserver", None, ip="10.96.0.1"), 443)
    for name in ("gateway", "rtmp"):
        assert narrowed.get("Service", f"{RELEASE}-{name}")["spec"]["loadBalancerSourceRanges"] == ["198.51.100.0/24"]


def test_every_stage_proves_a_link_key_from_a_secret() -> None:
    from deploy.chartkit import containers

    for value_set, values in (("generated", {}), ("existing", {"ditStage": {"linkKey": {"existingSecret": "corp"}}})):
        rendered = Rendered(values)
        env = {e["name"]: e for e in next(containers(rendered.get("StatefulSet", "dit")))["env"]}
        ref = env["RHEO_DIT_STAGE__LINK_KEY"]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == "link-key", value_set
        created = [s for s in rendered.kind("Secret") if s["metadata"]["name"] == ref["name"]]
        if value_set == "existing":
            assert ref["name"] == "corp" and not created
        else:
            assert len(created) == 1 and len(created[0]["data"]["link-key"]) >= 32
