"""Timed stand-in stage for controller and scale tests: the real model, then a sleep to a modelled latency.

``TimedStageWorker`` runs the real (tiny) blocks, so every output stays exactly what the normal worker computes,
then sleeps until the micro-step has taken what the latency model says a real GPU stage would:

    per block ms = slowdown · (timed_block_ms + timed_item_ms · items)

summed over the stage's blocks (config ``dit_stage.timed_block_ms`` turns the mode on; ``dit_stage.slowdown``
slows one stage). It reports the modelled per-block times as the micro-step's ``BlockTimes``, which the service
puts in its ``StageStats`` like measured ones, so the controller sees a heterogeneous cluster on a CPU. This is not
a performance mode: it only makes time behave like a larger deployment's.
"""

from __future__ import annotations

import time
from typing import Any

from dit_stage.forward import make_forward
from dit_stage.micro_step import MicroStep, StageOutput, SwitchStep
from dit_stage.model import CausalWanDiT
from dit_stage.timing import BlockTimes
from dit_stage.worker import StageWorker
from services.config import DitStageSettings

__all__ = ["TimedStageWorker", "make_stage_worker"]


class TimedStageWorker(StageWorker):
    def __init__(self, model: CausalWanDiT, *, block_ms: float, item_ms: float = 0.0, slowdown: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.timed_block_ms, self.timed_item_ms, self.slowdown = block_ms, item_ms, slowdown
        self.micro_steps = 0

    @property
    def num_blocks(self) -> int:
        a, b = self.model.block_range
        return b - a

    def modelled_block_ms(self, items: int) -> float:
        return self.slowdown * (self.timed_block_ms + self.timed_item_ms * items)

    def compute(self, step: MicroStep | SwitchStep) -> StageOutput:
        if isinstance(step, SwitchStep):  # an epoch switch is bookkeeping, not a forward
            return super().compute(step)
        t0 = time.perf_counter()
        out = super().compute(step)
        per_block = self.modelled_block_ms(len(step.items))
        remaining = per_block * self.num_blocks / 1000.0 - (time.perf_counter() - t0)
        if remaining > 0:
            time.sleep(remaining)
        out.compute_s = time.perf_counter() - t0
        out.times = BlockTimes({b: per_block / 1000.0 for b in self.model.block_ids}, 0.0)
        self.micro_steps += 1
        return out


def make_stage_worker(cfg: DitStageSettings, model: CausalWanDiT, passthrough: bool = False,
                      **kwargs: Any) -> StageWorker:
    """The stage's worker: the pass-through one in the measurement mode (``model.passthrough``), the timed
    stand-in when ``dit_stage.timed_block_ms`` is set, else the normal one; its forward in the
    ``dit_stage.forward`` mode."""
    kwargs.setdefault("forward", make_forward(model, cfg.forward, cfg.capture_budget))
    kwargs.setdefault("cache_mode", cfg.cache_mode)
    kwargs.setdefault("context_noise", cfg.context_noise)
    if passthrough:
        from dit_stage.passthrough import PassthroughStageWorker

        return PassthroughStageWorker(model, **kwargs)
    if cfg.timed_block_ms is None:
        return StageWorker(model, **kwargs)
    return TimedStageWorker(model, block_ms=cfg.timed_block_ms, item_ms=cfg.timed_item_ms, slowdown=cfg.slowdown,
                            **kwargs)
