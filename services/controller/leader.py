"""One controller leads; standbys wait: a lock with a holder, a version and a time to live.

Two stores, one rule (``decide``): a JetStream KV key (``rheo-controller`` / ``leader``) when not in a cluster, a
Kubernetes ``coordination.k8s.io/v1`` Lease when ``KUBERNETES_SERVICE_HOST`` is set. Both are compare-and-set on a
version (KV revision, Lease ``resourceVersion``), so two candidates can never both win the same round.

Expiry is judged on the candidate's own monotonic clock, as client-go's leader election does: a standby notes
when it first saw the current version and takes over once that version has not changed for ``ttl_s``. No clocks
are compared across machines. The leader renews every ``ttl_s / 3`` and steps down as soon as a renewal fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import nats.errors
import nats.js.errors

from services.bus import KV

__all__ = ["KVLeaderLock", "KubernetesLease", "LeaderLock", "Observation", "decide", "in_cluster"]

log = logging.getLogger("rheo.controller.leader")

LEADER_KEY = "leader"
Action = Literal["acquire", "renew", "takeover", "wait"]


@dataclass(frozen=True)
class Observation:
    """A version of the lock and when (candidate's monotonic clock) this candidate first saw it."""

    version: str
    seen_at: float


def decide(holder: str | None, version: str | None, me: str, observed: Observation | None,
           now: float, ttl_s: float) -> tuple[Action, Observation | None]:
    """What a candidate does next, given the lock as read (``holder`` None: free) and what it saw before."""
    if not holder or version is None:
        return "acquire", None
    if holder == me:
        return "renew", None
    if observed is None or observed.version != version:
        return "wait", Observation(version, now)
    if now - observed.seen_at >= ttl_s:
        return "takeover", observed
    return "wait", observed


class LeaderLock(Protocol):
    holder: str
    ttl_s: float

    async def try_acquire(self) -> bool: ...

    async def renew(self) -> bool: ...

    async def release(self) -> None: ...


class KVLeaderLock:
    """The lock as a KV key whose value names the holder; every write is revision-checked."""

    def __init__(self, kv: KV, holder: str, ttl_s: float, clock: Any = time.monotonic) -> None:
        self.kv, self.holder, self.ttl_s, self.clock = kv, holder, ttl_s, clock
        self.revision: int | None = None
        self._observed: Observation | None = None

    def _value(self) -> bytes:
        return json.dumps({"holder": self.holder, "ttl_s": self.ttl_s, "at": time.time()}).encode()

    async def try_acquire(self) -> bool:
        entry = await self.kv.get(LEADER_KEY)
        holder = None
        if entry is not None and entry.value:
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                holder = json.loads(entry.value).get("holder")
            holder = holder or "?"  # unreadable: someone else's; it expires like any other
        action, self._observed = decide(holder, str(entry.revision) if holder else None, self.holder,
                                        self._observed, self.clock(), self.ttl_s)
        try:
            if action == "acquire":
                self.revision = await self.kv.create(LEADER_KEY, self._value())
            elif action in ("renew", "takeover"):
                assert entry is not None
                self.revision = await self.kv.update(LEADER_KEY, self._value(), last=entry.revision)
            else:
                return False
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError):
            return False  # another candidate won this round
        if action == "takeover":
            log.warning("%s: took over the controller lock from %s (silent for %.1fs)", self.holder, holder,
                        self.ttl_s)
        return True

    async def renew(self) -> bool:
        if self.revision is None:
            return False
        try:
            self.revision = await self.kv.update(LEADER_KEY, self._value(), last=self.revision)
            return True
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError):
            log.error("%s: the controller lock was taken (revision moved on); stepping down", self.holder)
        except (nats.errors.Error, TimeoutError) as e:
            log.error("%s: could not renew the controller lock (%s); stepping down", self.holder, e)
        self.revision = None
        return False

    async def release(self) -> None:
        """Free the lock for a standby at once (clean shutdown); only if it is still ours."""
        if self.revision is None:
            return
        with contextlib.suppress(Exception):
            await self.kv.store.delete(LEADER_KEY, last=self.revision)
        self.revision = None


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


class KubernetesLease:
    """The lock as a Kubernetes Lease (the in-cluster choice). The client is synchronous: calls run in a thread."""

    NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    TOKEN_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")

    def __init__(self, name: str, holder: str, ttl_s: float, namespace: str | None = None, api: Any = None,
                 clock: Any = time.monotonic) -> None:
        self.name, self.holder, self.ttl_s, self.clock = name, holder, ttl_s, clock
        self.namespace = namespace or os.environ.get("POD_NAMESPACE") or self._namespace_from_file()
        self._api = api
        self._lease: Any = None
        self._observed: Observation | None = None

    def _namespace_from_file(self) -> str:
        try:
            return self.NAMESPACE_FILE.read_text().strip()
        except OSError:
            return "default"

    def api(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            config.load_incluster_config()
            self._api = client.CoordinationV1Api()
        return self._api

    def lease_body(self, previous: Any = None, now: dt.datetime | None = None) -> Any:
        """The Lease this candidate writes: itself as holder, renewed now (transitions count holder changes)."""
        from kubernetes import client

        now = now or dt.datetime.now(dt.UTC)
        spec = previous.spec if previous is not None and previous.spec is not None else client.V1LeaseSpec()
        changed = spec.holder_identity != self.holder
        meta = previous.metadata if previous is not None else client.V1ObjectMeta(name=self.name,
                                                                                 namespace=self.namespace)
        return client.V1Lease(metadata=meta, spec=client.V1LeaseSpec(
            holder_identity=self.holder,
            lease_duration_seconds=max(1, round(self.ttl_s)),
            acquire_time=now if changed else spec.acquire_time,
            renew_time=now,
            lease_transitions=(spec.lease_transitions or 0) + (1 if changed and spec.holder_identity else 0),
        ))

    def _read(self) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api().read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _try_acquire(self) -> bool:
        from kubernetes.client.exceptions import ApiException

        lease = self._read()
        holder = lease.spec.holder_identity if lease is not None and lease.spec is not None else None
        version = lease.metadata.resource_version if lease is not None else None
        action, self._observed = decide(holder, version, self.holder, self._observed, self.clock(), self.ttl_s)
        try:
            if action == "wait":
                return False
            if lease is None:
                self._lease = self.api().create_namespaced_lease(self.namespace, self.lease_body())
            else:  # replace carries resourceVersion: a concurrent writer makes it fail with 409
                self._lease = self.api().replace_namespaced_lease(self.name, self.namespace, self.lease_body(lease))
        except ApiException as e:
            if e.status in (409, 422):
                return False
            raise
        return True

    def _renew(self) -> bool:
        from kubernetes.client.exceptions import ApiException

        if self._lease is None:
            return False
        try:
            self._lease = self.api().replace_namespaced_lease(self.name, self.namespace, self.lease_body(self._lease))
            return True
        except ApiException as e:
            log.error("%s: could not renew Lease %s (%s); stepping down", self.holder, self.name, e.status)
            self._lease = None
            return False

    def _release(self) -> None:
        if self._lease is None:
            return
        self._lease.spec.holder_identity = None
        with contextlib.suppress(Exception):
            self.api().replace_namespaced_lease(self.name, self.namespace, self._lease)
        self._lease = None

    async def try_acquire(self) -> bool:
        return await asyncio.to_thread(self._try_acquire)

    async def renew(self) -> bool:
        return await asyncio.to_thread(self._renew)

    async def release(self) -> None:
        await asyncio.to_thread(self._release)
