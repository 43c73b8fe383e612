"""How many replicas each pool should run: the autoscaler's decisions, free of I/O.

Two loops per pool, as platform autoscalers do (capacity planning plus a fast reaction):

- **capacity floor** (slow): run enough replicas that the measured demand (admitted streams' work plus the backlog
  of streams refused for capacity) sits at ``target_utilisation``; scale up to that floor at once, scale down one
  replica at a time only after utilisation has stayed below ``scale_down_below`` for ``down_cooldown_s`` and only
  if the remaining replicas would still sit at or below the target;
- **fast** (+1): when the share of late or dropped chunks in the last window exceeds ``miss_ratio_up``, one more
  replica at once (the latency model under-predicted, or load arrived faster than the capacity loop measures it).

Both respect ``[min_replicas, max_replicas]`` and an up cool-down (a new replica needs time to start and take
load before its effect is measurable). Demand is in replica units: 2.4 means the work of 2.4 fully busy replicas.
``advisory`` mode (services/controller/kube_scale.py) makes exactly these decisions and only logs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["POOLS", "Pool", "PoolScaler", "PoolSignals", "ScaleDecision", "ScaleLimits"]

Pool = Literal["rings", "decoders", "ingests"]
POOLS: tuple[Pool, ...] = ("rings", "decoders", "ingests")
Loop = Literal["capacity", "fast", "bounds", "hold"]


@dataclass(frozen=True)
class PoolSignals:
    """What the controller measured of one pool over the last window."""

    replicas: int
    """Replicas the cluster runs now (for rings: whole rings)."""
    demand: float
    """Work of the admitted streams in replica units (None measured yet: 0, and the pool stays where it is)."""
    backlog: float = 0.0
    """Work of streams refused or queued for capacity in the window, in replica units."""
    miss_ratio: float | None = None
    """Share of chunks late or dropped for their deadline in the window (None: no chunks)."""


@dataclass(frozen=True)
class ScaleLimits:
    min_replicas: int = 1
    max_replicas: int = 8
    target_utilisation: float = 0.75
    scale_down_below: float = 0.5
    miss_ratio_up: float = 0.01
    up_cooldown_s: float = 60.0
    down_cooldown_s: float = 300.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas ({self.min_replicas}) <= max_replicas ({self.max_replicas})")
        if not 0 < self.scale_down_below < self.target_utilisation <= 1:
            raise ValueError("need 0 < scale_down_below < target_utilisation <= 1")


@dataclass(frozen=True)
class ScaleDecision:
    pool: Pool
    current: int
    desired: int
    loop: Loop
    reason: str

    @property
    def change(self) -> int:
        return self.desired - self.current


class PoolScaler:
    """One pool's two loops and their cool-downs. ``decide`` is called every interval; ``note_applied`` after a
    change was applied (or, in advisory mode, would have been: the same decisions follow either way)."""

    def __init__(self, pool: Pool, limits: ScaleLimits) -> None:
        self.pool, self.limits = pool, limits
        self.last_up = -math.inf
        self.last_down = -math.inf
        self.low_since: float | None = None

    def decide(self, s: PoolSignals, now: float) -> ScaleDecision:
        lim, cur = self.limits, s.replicas
        need = s.demand + s.backlog
        utilisation = need / cur if cur > 0 else math.inf
        self.low_since = (self.low_since if self.low_since is not None else now) \
            if utilisation < lim.scale_down_below and not self._missing(s) else None

        def decision(desired: int, loop: Loop, reason: str) -> ScaleDecision:
            return ScaleDecision(self.pool, cur, desired, loop, reason)

        if cur < lim.min_replicas or cur > lim.max_replicas:
            target = min(max(cur, lim.min_replicas), lim.max_replicas)
            return decision(target, "bounds", f"{cur} replicas outside [{lim.min_replicas}, {lim.max_replicas}]")
        floor = min(max(math.ceil(need / lim.target_utilisation - 1e-9), lim.min_replicas), lim.max_replicas)
        up_ready = now - self.last_up >= lim.up_cooldown_s
        if floor > cur:
            why = (f"demand {s.demand:.2f} + backlog {s.backlog:.2f} replicas needs {floor} at "
                   f"{lim.target_utilisation:.0%}")
            if up_ready:
                return decision(floor, "capacity", why)
            return decision(cur, "hold", f"{why}; up cool-down {lim.up_cooldown_s - (now - self.last_up):.0f}s")
        if self._missing(s) and cur < lim.max_replicas:
            assert s.miss_ratio is not None
            why = f"{s.miss_ratio:.1%} of chunks missed their deadline (> {lim.miss_ratio_up:.1%})"
            if up_ready:
                return decision(cur + 1, "fast", why)
            return decision(cur, "hold", f"{why}; up cool-down {lim.up_cooldown_s - (now - self.last_up):.0f}s")
        if cur > lim.min_replicas and self.low_since is not None:
            after = need / (cur - 1)
            held = now - self.low_since
            since_change = now - max(self.last_up, self.last_down)
            if after <= lim.target_utilisation and held >= lim.down_cooldown_s and since_change >= lim.down_cooldown_s:
                return decision(cur - 1, "capacity", f"utilisation {utilisation:.0%} below "
                                f"{lim.scale_down_below:.0%} for {held:.0f}s; {cur - 1} replicas would run at "
                                f"{after:.0%}")
        return decision(cur, "hold", f"utilisation {utilisation:.0%} with {cur} replicas")

    def note_applied(self, d: ScaleDecision, now: float) -> None:
        if d.change > 0:
            self.last_up = now
        elif d.change < 0:
            self.last_down = now
        if d.change:
            self.low_since = None

    def _missing(self, s: PoolSignals) -> bool:
        return s.miss_ratio is not None and s.miss_ratio > self.limits.miss_ratio_up
