"""The autoscaler: decisions on demand traces, advisory == applied, the real Kubernetes client against a recording
API server (payloads validated against the API schema), and the RBAC the chart renders for it."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from services.config import Settings
from services.controller.autoscale import PoolScaler, PoolSignals, ScaleDecision, ScaleLimits
from services.controller.kube_scale import KubeScaler, ScaleTarget
from services.controller.policy import PathCosts, StreamNeed
from services.controller.scaling import Autoscaler, Demand, pool_demand

LIMITS = ScaleLimits(min_replicas=1, max_replicas=6, target_utilisation=0.75, scale_down_below=0.5,
                     miss_ratio_up=0.01, up_cooldown_s=60, down_cooldown_s=300)


def diurnal(t: float) -> float:
    """Demand in replica units over a day (seconds): a trough of 0.5 and a peak of 3.5 in the evening."""
    return 2.0 - 1.5 * math.cos(2 * math.pi * (t - 3 * 3600) / 86400)


def run_trace(demand: Any, seconds: float, step: float = 15.0, miss: Any = None,
              scaler: PoolScaler | None = None) -> tuple[list[ScaleDecision], list[tuple[float, int, float]]]:
    """A simulated cluster whose replicas follow every decision one step later."""
    scaler = scaler or PoolScaler("rings", LIMITS)
    replicas, changes, samples = 1, [], []
    t = 0.0
    while t <= seconds:
        d = scaler.decide(PoolSignals(replicas, demand(t), 0.0, miss(t) if miss else None), t)
        if d.change:
            changes.append(d)
            scaler.note_applied(d, t)
            replicas = d.desired
        samples.append((t, replicas, demand(t)))
        t += step
    return changes, samples


def test_a_diurnal_trace_is_followed_with_headroom_and_no_flapping() -> None:
    changes, samples = run_trace(diurnal, 86400)
    # capacity is never short by more than one cool-down: utilisation ≤ 1 except within 60 s of a rise
    short = [(t, r, d) for t, r, d in samples if d / r > 1.0]
    assert len(short) * 15 <= 60 * len([c for c in changes if c.change > 0]), short[:5]
    # it scales down in the night, never below the floor, never above the cap
    assert min(r for _, r, _ in samples) == 1 and max(r for _, r, _ in samples) == math.ceil(3.5 / 0.75)
    # no flapping: each direction change is separated by at least the down cool-down
    downs = [c for c in changes if c.change < 0]
    assert downs and all(c.change == -1 for c in downs)
    assert len(changes) <= 2 * math.ceil(3.5 / 0.75) + 2, [(c.current, c.desired, c.loop) for c in changes]
    # GPU-time used vs a static fleet sized for the peak
    used = sum(r for _, r, _ in samples)
    assert used < 0.75 * len(samples) * math.ceil(3.5 / 0.75)


def test_the_fast_loop_adds_one_replica_on_deadline_misses_and_respects_its_cool_down() -> None:
    changes, _ = run_trace(lambda t: 0.6, 300, miss=lambda t: 0.05 if t < 200 else 0.0)
    fast = [c for c in changes if c.loop == "fast"]
    assert [(c.current, c.desired) for c in fast] == [(1, 2), (2, 3), (3, 4), (4, 5)][:len(fast)]
    assert len(fast) == 4  # t=0, 60, 120, 180: one per up cool-down, none once the misses stop
    # a miss ratio at the threshold is not a miss
    changes, _ = run_trace(lambda t: 0.6, 300, miss=lambda t: 0.01)
    assert changes == []


def test_bounds_and_backlog() -> None:
    s = PoolScaler("decoders", LIMITS)
    assert s.decide(PoolSignals(9, 0.0), 0).desired == 6  # above max: back to max at once
    s = PoolScaler("decoders", LIMITS)
    d = s.decide(PoolSignals(2, 1.0, backlog=1.2), 0)  # refused streams count as demand
    assert (d.desired, d.loop) == (3, "capacity") and "backlog 1.20" in d.reason
    s = PoolScaler("decoders", LIMITS)
    assert s.decide(PoolSignals(2, 100.0), 0).desired == 6  # never above max
    with pytest.raises(ValueError):
        ScaleLimits(min_replicas=3, max_replicas=2)


def test_demand_is_priced_by_the_measured_costs() -> None:
    needs = [StreamNeed(items_per_s=8.0, decode_mpx_per_s=4.0), StreamNeed(items_per_s=8.0, decode_mpx_per_s=4.0,
                                                                          t2v=True)]
    d = Demand(item_ms=50.0, costs=PathCosts(encode_ms_per_mpx=100.0, decode_ms_per_mpx=150.0), prior_streams=4)
    per_pool = pool_demand(d, needs, needs[:1])
    assert per_pool["rings"] == pytest.approx((0.8, 0.4))  # 16 items/s x 50 ms
    assert per_pool["decoders"] == pytest.approx((1.2, 0.6))  # 8 Mpx/s x 150 ms
    assert per_pool["ingests"] == pytest.approx((0.4, 0.4))  # T2V encodes nothing
    unmeasured = Demand(item_ms=None, costs=PathCosts(), prior_streams=4)
    assert pool_demand(unmeasured, needs, [])["rings"] == (0.5, 0.0)  # the admission prior: 4 streams per ring


# -- the apply step: the real kubernetes client against a recording API server --------------------------------


class FakeApi(ThreadingHTTPServer):
    def __init__(self) -> None:
        self.replicas = {"statefulsets/dit": 2, "deployments/rheo-decoder": 1, "deployments/rheo-ingest": 1}
        self.requests: list[tuple[str, str, Any]] = []
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: FakeApi

    def log_message(self, *args: Any) -> None:
        pass

    def _key(self) -> str:
        parts = self.path.split("?")[0].strip("/").split("/")
        # /apis/apps/v1/namespaces/<ns>/<kind>/<name>/scale
        assert parts[:4] == ["apis", "apps", "v1", "namespaces"] and parts[-1] == "scale", self.path
        return f"{parts[5]}/{parts[6]}"

    def _reply(self, key: str) -> None:
        name = key.split("/")[1]
        body = json.dumps({"apiVersion": "autoscaling/v1", "kind": "Scale",
                           "metadata": {"name": name, "namespace": "rheo"},
                           "spec": {"replicas": self.server.replicas[key]}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        key = self._key()
        self.server.requests.append(("GET", self.path, None))
        self._reply(key)

    def do_PATCH(self) -> None:
        key = self._key()
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(("PATCH", self.path, (self.headers["Content-Type"], body)))
        self.server.replicas[key] = body["spec"]["replicas"]
        self._reply(key)


@pytest.fixture
def api() -> Any:
    server = FakeApi()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def kube(api: FakeApi, advisory: bool) -> KubeScaler:
    from kubernetes import client

    conf = client.Configuration()
    conf.host = f"http://127.0.0.1:{api.server_address[1]}"
    targets = {"rings": ScaleTarget("StatefulSet", "dit", per_replica=2),
               "decoders": ScaleTarget("Deployment", "rheo-decoder"),
               "ingests": ScaleTarget("Deployment", "rheo-ingest")}
    return KubeScaler("rheo", targets, advisory=advisory, api_client=client.ApiClient(conf))


def test_the_apply_step_patches_the_scale_subresource_with_valid_payloads(api: FakeApi) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    scaler = kube(api, advisory=False)

    async def go() -> list[str]:
        assert await scaler.replicas("rings") == 1  # 2 pods = one ring of 2 stages
        up = ScaleDecision("rings", 1, 3, "capacity", "test")
        down = ScaleDecision("decoders", 1, 0, "capacity", "test")

        async def not_drained(pool: str, keep: int) -> bool:
            return False

        return [await scaler.apply(up), await scaler.apply(down, not_drained),
                await scaler.apply(ScaleDecision("ingests", 1, 2, "fast", "test"))]

    assert asyncio.run(go()) == ["applied", "draining", "applied"]
    patches = [r for r in api.requests if r[0] == "PATCH"]
    assert [p[1] for p in patches] == ["/apis/apps/v1/namespaces/rheo/statefulsets/dit/scale",
                                       "/apis/apps/v1/namespaces/rheo/deployments/rheo-ingest/scale"]
    assert api.replicas["statefulsets/dit"] == 6  # 3 rings x 2 stages: whole gangs
    assert api.replicas["deployments/rheo-decoder"] == 1  # not drained: not scaled down
    for (content_type, body), kube_version in zip([p[2] for p in patches], ("1.28.0", "1.37.0"), strict=True):
        assert "json" in content_type
        kubernetes_validate.validate(body, kube_version, strict=True)


def test_advisory_mode_makes_the_same_decisions_and_writes_nothing(api: FakeApi) -> None:
    settings = Settings(controller={"autoscale": {"mode": "advisory", "interval_s": 1, "up_cooldown_s": 0}})
    for advisory in (True, False):
        api.requests.clear()
        api.replicas.update({"statefulsets/dit": 2, "deployments/rheo-decoder": 1, "deployments/rheo-ingest": 1})
        scaler = Autoscaler(settings.controller.autoscale, kube(api, advisory=advisory))
        needs = [StreamNeed(items_per_s=16.0, decode_mpx_per_s=4.0)] * 4
        demand = Demand(item_ms=25.0, costs=PathCosts(encode_ms_per_mpx=30.0, decode_ms_per_mpx=60.0),
                        prior_streams=4)

        asyncio.run(scaler.tick(0.0, needs, demand, None))
        decided = [(d.pool, d.current, d.desired, d.loop) for d, _ in scaler.history]
        assert decided == [("rings", 1, 3, "capacity"), ("decoders", 1, 2, "capacity")]
        writes = [r for r in api.requests if r[0] != "GET"]
        assert [result for _, result in scaler.history] == (["advisory"] * 2 if advisory else ["applied"] * 2)
        assert (writes == []) == advisory


def test_the_chart_grants_exactly_the_scale_it_needs() -> None:
    chartkit = pytest.importorskip("deploy.chartkit")
    rendered = chartkit.render("nats-cert-manager")  # autoscale.mode apply
    role = rendered.get("Role", "rheo-controller-scale")
    rules = {tuple(r["resources"]): (r["resourceNames"], r["verbs"]) for r in role["rules"]}
    assert rules == {("statefulsets/scale",): (["dit"], ["get", "patch"]),
                     ("deployments/scale",): (["rheo-decoder", "rheo-ingest"], ["get", "patch"])}
    autoscale = rendered.config_yaml()["controller"]["autoscale"]
    workloads = {w["metadata"]["name"]: w["kind"] for w in rendered.workloads()}
    for key in ("ring_workload", "decoder_workload", "ingest_workload"):
        kind, name = autoscale[key].split("/")
        assert workloads[name] == kind
    controller = rendered.get("Deployment", "rheo-controller")
    assert controller["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert not [r for r in chartkit.render("default").kind("Role") if r["metadata"]["name"].endswith("-scale")]
