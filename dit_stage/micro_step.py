"""What a stage runs and what running it produces: the units ``StageWorker.take`` hands out and ``compute`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dit_stage.timing import BlockTimes
from proto import LatentChunk, Message, RingItem, ShardMove, ShardMoveEnd

__all__ = ["MicroStep", "StageOutput", "SwitchStep"]


@dataclass
class MicroStep:
    """Items of one forward, in batch order, with their input (latents on the first stage, else hidden)."""

    epoch: int
    items: list[RingItem]
    x: torch.Tensor
    noisy: torch.Tensor
    queue_wait_s: float = 0.0


@dataclass
class SwitchStep:
    """The epoch switch point of this stage: everything before ran under the old epoch (docs/rebalance.md)."""

    epoch: int
    items: tuple[()] = ()
    queue_wait_s: float = 0.0


@dataclass
class StageOutput:
    """What a micro-step produced: messages for the next stage's link (in order), finished chunks, and on an epoch
    switch the KV moves to other stages (``ShardMove``s, then a ``ShardMoveEnd`` per target)."""

    link: list[Message] = field(default_factory=list)
    finished: list[LatentChunk] = field(default_factory=list)
    moves: list[ShardMove | ShardMoveEnd] = field(default_factory=list)
    items: int = 0
    compute_s: float = 0.0
    warmup: bool = False  # the forward captured a graph or compiled first: compute_s is not what this step costs
    times: BlockTimes | None = None
    replayed: int = 0  # replayed chunks finished (last stage): they rebuilt KV, nothing to publish
