"""One ring's state in the controller: its block map under its own epochs, and what judges and splits it.

A ring (pipeline) is a gang of stages holding every block between them (proto/rings.py names its stages). The
controller keeps one ``RingState`` per ring it knows, from ``controller.rings`` at start and from stage heartbeats
(a stage reporting another ring adds it): the map stored under ``blockmap.<ring>`` in ``rheo-blockmap`` (with its
KV revision, so a deposed leader cannot overwrite its successor's), the cost model fed by the ring's stage stats,
the rebalance policy, the suspected stages, and the measured capacity that placement and admission read.
docs/scheduling.md (Many rings) and docs/controller.md state the rules.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from proto import BlockMap, StageAssignment, blockmap_key, ring_stage_ids
from services.controller.costmodel import CostModel
from services.controller.partition import PartitionProblem, Stage, best_split, even_split
from services.controller.policy import Fit, RebalancePolicy

__all__ = ["RingState"]

log = logging.getLogger("rheo.controller")


@dataclass
class RingState:
    ring_id: str
    stage_ids: list[str]
    """The configured stages of this ring, in ring order (the only ones its map may hold)."""
    cost: CostModel
    policy: RebalancePolicy
    block_map: BlockMap | None = None
    """The map this leader wrote or resumed (None: not leading, or not written yet)."""
    revision: int | None = None
    """KV revision of ``block_map`` (compare-and-set)."""
    seen_map: BlockMap | None = None
    """The latest map of this ring published by whoever leads (a standby keeps its cost model warm with it)."""
    suspected: dict[str, float] = field(default_factory=dict)
    """Stages of the map silent past the miss budget → when the suspicion began (not failed yet)."""
    item_ms: float | None = None
    """The slowest stage's measured ms per item in the current epoch (None: not every stage reported)."""
    bottleneck: str = ""
    fits: tuple[tuple[Fit, ...], ...] = ()
    """Each stage's fitted micro-step times per grid, once every stage of the map reported one (else none)."""
    store_checked: float = 0.0

    @classmethod
    def new(cls, ring_id: str, stages: int, num_blocks: int, policy: RebalancePolicy) -> RingState:
        return cls(ring_id, ring_stage_ids(ring_id, stages), CostModel(num_blocks), policy)

    @property
    def key(self) -> str:
        return blockmap_key(self.ring_id)

    def current(self, leading: bool) -> BlockMap | None:
        """The map stats are judged against: the leader's own, a standby's last seen."""
        return self.block_map if leading else self.seen_map

    def holds(self, stage_id: str) -> bool:
        return stage_id in self.stage_ids

    def refresh_capacity(self) -> None:
        """The slowest stage's measured ms per item (and every stage's latency fit), once every stage of the map
        reported in this epoch."""
        assert self.block_map is not None
        reports = [self.cost.reports.get(s.stage_id) for s in self.block_map.stages]
        if not all(r is not None and r.epoch == self.block_map.epoch for r in reports):
            return
        per_item = {r.stage_id: r.step_ms / max(r.batch_items, 1.0) for r in reports if r is not None}
        self.bottleneck = max(per_item, key=per_item.__getitem__)
        self.item_ms = per_item[self.bottleneck]
        fits = [r.fits for r in reports if r is not None]
        self.fits = tuple(fits) if all(fits) else ()

    def problem(self, members: list[str], weight_bytes_per_block: int, memory_headroom: float) \
            -> PartitionProblem | None:
        """The split problem over ``members`` from the cost model's estimate (None: no estimate yet): each stage's
        speed, and its memory for blocks (what it has free plus what its blocks hold now, less the headroom)."""
        bm = self.block_map or self.seen_map
        est = self.cost.estimate(bm.epoch) if bm is not None else None
        if bm is None or est is None:
            return None
        reports = [r for r in self.cost.reports.values() if r.epoch == bm.epoch]
        kv_per_block = max((r.kv_bytes / (r.block_end - r.block_start) for r in reports), default=0.0)
        per_block = weight_bytes_per_block + kv_per_block
        stages = []
        for sid in members:
            r = self.cost.reports.get(sid)
            memory = math.inf
            if r is not None and r.free_memory_bytes > 0:
                memory = (r.free_memory_bytes + (r.block_end - r.block_start) * per_block) * (1 - memory_headroom)
            stages.append(Stage(sid, est.speed.get(sid, 1.0), memory))
        return PartitionProblem(est.block_ms, stages, est.first_extra_ms, est.last_extra_ms, per_block)

    def split(self, members: list[str], problem: PartitionProblem | None) -> list[StageAssignment]:
        """Blocks over ``members``: the optimum of ``problem`` (moving as few blocks as ties allow), else even."""
        assert self.block_map is not None
        if problem is not None:
            best = best_split(problem, self.block_map.ranges())
            if best is not None:
                return best.assignments(members)
            log.error("ring %s: no split of %d blocks over %s fits their memory; splitting evenly", self.ring_id,
                      self.block_map.num_blocks, members)
        return even_split(self.block_map.num_blocks, members)
