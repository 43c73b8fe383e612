"""Applying the autoscaler's decisions: the ``scale`` subresource of each pool's workload, through the Kubernetes API.

A ring is ``per_replica`` pods of one workload (the StatefulSet ``dit`` runs rings x stages pods), so a ring is
added or removed as a whole gang, and a StatefulSet removes the highest ordinals: the last ring. Before a pool
shrinks, ``drain`` must say that the replicas about to go serve no stream (the controller moves their streams by
placement first); until it does, the scale-down waits and is reported as ``draining``. In advisory mode nothing is
read from or written to the cluster beyond the current replica counts, and every decision is logged the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prometheus_client import Counter, Gauge

from services.controller.autoscale import Pool, ScaleDecision

log = logging.getLogger("rheo.controller.scale")

SCALE_DECISIONS = Counter("rheo_controller_scale_decisions_total", "autoscaler decisions that change a pool",
                          ["pool", "loop", "result"])
DESIRED = Gauge("rheo_controller_desired_replicas", "replicas the autoscaler wants per pool", ["pool"])
SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

Drain = Callable[[Pool, int], Awaitable[bool]]
"""``drain(pool, keep)``: True once the replicas beyond the first ``keep`` serve no stream (moving them if needed)."""
Result = Literal["applied", "advisory", "draining", "failed", "unchanged"]


@dataclass(frozen=True)
class ScaleTarget:
    kind: Literal["StatefulSet", "Deployment"]
    name: str
    per_replica: int = 1
    """Pods per pool replica (``controller.stages`` for a ring)."""

    @classmethod
    def parse(cls, workload: str, per_replica: int = 1) -> ScaleTarget:
        kind, _, name = workload.partition("/")
        if kind not in ("StatefulSet", "Deployment") or not name:
            raise ValueError(f"workload {workload!r} is not StatefulSet/<name> or Deployment/<name>")
        return cls(kind, name, per_replica)  # type: ignore[arg-type]


def in_cluster_namespace() -> str:
    return SA_NAMESPACE.read_text().strip() if SA_NAMESPACE.is_file() else "default"


class KubeScaler:
    """Reads and writes the replicas of each pool's workload (blocking client calls run in a thread)."""

    def __init__(self, namespace: str, targets: dict[Pool, ScaleTarget], *, advisory: bool,
                 api_client: Any = None) -> None:
        from kubernetes import client

        self.namespace, self.targets, self.advisory = namespace, targets, advisory
        self.apps = client.AppsV1Api(api_client)

    @classmethod
    def in_cluster(cls, targets: dict[Pool, ScaleTarget], *, advisory: bool) -> KubeScaler:
        from kubernetes import config

        config.load_incluster_config()
        return cls(in_cluster_namespace(), targets, advisory=advisory)

    def scale_body(self, pool: Pool, replicas: int) -> dict[str, Any]:
        """The ``autoscaling/v1`` Scale this pool is patched with (pods, not rings)."""
        t = self.targets[pool]
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": t.name, "namespace": self.namespace},
                "spec": {"replicas": replicas * t.per_replica}}

    def _call(self, verb: str, pool: Pool, *args: Any) -> Any:
        t = self.targets[pool]
        kind = "stateful_set" if t.kind == "StatefulSet" else "deployment"
        return getattr(self.apps, f"{verb}_namespaced_{kind}_scale")(t.name, self.namespace, *args)

    async def replicas(self, pool: Pool) -> int:
        """Whole pool replicas the cluster asks for now (a partial ring counts as none)."""
        scale = await asyncio.to_thread(self._call, "read", pool)
        return int(scale.spec.replicas or 0) // self.targets[pool].per_replica

    async def apply(self, d: ScaleDecision, drain: Drain | None = None) -> Result:
        if d.change == 0:
            return "unchanged"
        DESIRED.labels(pool=d.pool).set(d.desired)
        result: Result
        if self.advisory:
            result = "advisory"
        elif d.change < 0 and (drain is None or not await drain(d.pool, d.desired)):
            result = "draining"
        else:
            try:
                await asyncio.to_thread(self._call, "patch", d.pool, self.scale_body(d.pool, d.desired))
                result = "applied"
            except Exception as e:  # the API refused or is unreachable: decided again next interval
                log.warning("scaling %s to %d failed: %s", d.pool, d.desired, str(e).splitlines()[0])
                result = "failed"
        SCALE_DECISIONS.labels(pool=d.pool, loop=d.loop, result=result).inc()
        log.info("scale %s %d -> %d (%s: %s): %s", d.pool, d.current, d.desired, d.loop, d.reason, result)
        return result
