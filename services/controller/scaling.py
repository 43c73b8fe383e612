"""The leader's autoscaling loop: measured demand per pool → ``PoolScaler`` decisions → ``KubeScaler``.

Demand comes from what admission already knows: the admitted streams' needs (``StreamNeed``) priced by the
measured costs (each ring's price at the streams placed on it, ``PathCosts`` for encode and decode), plus the backlog
of streams refused for capacity in the last window (each counted once, however often its publisher retries).
The fast loop's miss ratio is the share of items the stages dropped for their deadline (``StageStats.late_items``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from proto import StageStats, StreamSpec
from services.config import AutoscaleSettings, ControllerSettings
from services.controller.autoscale import POOLS, Pool, PoolScaler, PoolSignals, ScaleDecision, ScaleLimits
from services.controller.kube_scale import Drain, KubeScaler, Result, ScaleTarget
from services.controller.policy import PathCosts, StreamNeed, stream_need

__all__ = ["Autoscaler", "Demand", "pool_demand", "ring_work"]


@dataclass(frozen=True)
class Demand:
    """Prices of one unit of need in replica units (None: not measured yet)."""

    item_ms: float | None
    costs: PathCosts
    prior_streams: int
    rings_placed: float | None = None
    """The admitted streams' ring work as placed (``ring_work``), replacing ``item_ms`` for them: each ring runs the
    batch its own streams reach, so one price over all streams (the slowest ring at their sum) misjudges many rings
    (None: not priced yet; the refused backlog is priced at ``item_ms`` either way)."""

    def of(self, pool: Pool, needs: list[StreamNeed]) -> float:
        if pool == "rings":
            if self.item_ms is None:  # before any timing: the admission prior is one ring's worth of streams
                return len(needs) / max(self.prior_streams, 1)
            return _ring_units(needs, self.item_ms)
        ms = self.costs.decode_ms_per_mpx if pool == "decoders" else self.costs.encode_ms_per_mpx
        mpx = sum(n.decode_mpx_per_s if pool == "decoders" else n.encode_mpx_per_s for n in needs)
        return mpx * (ms or 0.0) / 1000.0


def pool_demand(demand: Demand, admitted: list[StreamNeed], refused: list[StreamNeed]) -> dict[Pool, tuple[float,
                                                                                                          float]]:
    """(demand, backlog) of every pool."""
    out = {pool: (demand.of(pool, admitted), demand.of(pool, refused)) for pool in POOLS}
    if demand.rings_placed is not None:
        out["rings"] = (demand.rings_placed, out["rings"][1])
    return out


def ring_work(placed: Iterable[tuple[Sequence[StreamNeed], float | None]]) -> float | None:
    """Replica units of ring work as the streams are placed: for each ring (its streams, its ms per item at them),
    their items per second × that price (None: a ring holding streams has no price yet)."""
    total = 0.0
    for needs, item_ms in placed:
        if not needs:
            continue
        if item_ms is None:
            return None
        total += _ring_units(needs, item_ms)
    return total


def _ring_units(needs: Iterable[StreamNeed], item_ms: float) -> float:
    """Fully busy rings these streams' items keep at ``item_ms`` per item."""
    return sum(n.items_per_s for n in needs) * item_ms / 1000.0


def limits(cfg: AutoscaleSettings, pool: Pool) -> ScaleLimits:
    lo, hi = cfg.bounds(pool)
    return ScaleLimits(lo, hi, cfg.target_utilisation, cfg.scale_down_below, cfg.miss_ratio_up, cfg.up_cooldown_s,
                       cfg.down_cooldown_s)


@dataclass
class Autoscaler:
    cfg: AutoscaleSettings
    kube: KubeScaler
    scalers: dict[Pool, PoolScaler] = field(default_factory=dict)
    refused: dict[str, tuple[float, StreamNeed]] = field(default_factory=dict)
    """Streams refused for capacity → (when, need); forgotten after one window."""
    items: int = 0
    late: int = 0
    last_run: float = -1e18
    history: list[tuple[ScaleDecision, Result]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scalers = {pool: PoolScaler(pool, limits(self.cfg, pool)) for pool in POOLS}

    @classmethod
    def from_settings(cls, controller: ControllerSettings, kube: KubeScaler | None = None) -> Autoscaler:
        cfg = controller.autoscale
        if kube is None:
            targets = {pool: ScaleTarget.parse(cfg.workload(pool), controller.stages if pool == "rings" else 1)
                       for pool in POOLS}
            kube = KubeScaler.in_cluster(targets, advisory=cfg.mode == "advisory")
        return cls(cfg, kube)

    def note_refused(self, spec: StreamSpec, now: float) -> None:
        self.refused[spec.stream_id] = (now, stream_need(spec))

    def note_stats(self, stats: StageStats) -> None:
        self.items += stats.items
        self.late += stats.late_items

    async def tick(self, now: float, admitted: list[StreamNeed], demand: Demand, drain: Drain | None) -> None:
        if now - self.last_run < self.cfg.interval_s:
            return
        self.last_run = now
        self.refused = {k: v for k, v in self.refused.items() if now - v[0] <= self.cfg.interval_s}
        per_pool = pool_demand(demand, admitted, [need for _, need in self.refused.values()])
        done = self.items + self.late
        miss = self.late / done if done else None
        self.items = self.late = 0
        for pool, scaler in self.scalers.items():
            current = await self.kube.replicas(pool)
            d = scaler.decide(PoolSignals(current, *per_pool[pool], miss if pool == "rings" else None), now)
            result = await self.kube.apply(d, drain)
            if result in ("applied", "advisory"):
                scaler.note_applied(d, now)
            if d.change:
                self.history.append((d, result))
                del self.history[:-64]
