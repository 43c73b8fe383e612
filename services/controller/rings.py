"""One ring's state in the controller: its block map under its own epochs, and what judges and splits it.

A ring (pipeline) is a gang of stages holding every block between them (proto/rings.py names its stages). The
controller keeps one ``RingState`` per ring it knows, from ``controller.rings`` at start and from stage heartbeats
(a stage reporting another ring adds it): the map stored under ``blockmap.<ring>`` in ``rheo-blockmap`` (with its
KV revision, so a deposed leader cannot overwrite its successor's), the cost model fed by the ring's stage stats,
the rebalance policy, the suspected stages, and the measured capacity that placement and admission read.
docs/scheduling.md (Many rings) and docs/controller.md state the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proto import BlockMap, blockmap_key, ring_stage_ids
from services.controller.costmodel import CostModel
from services.controller.policy import Fit, RebalancePolicy

__all__ = ["RingState"]


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
