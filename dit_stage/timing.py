"""Per-block compute time of one forward (the controller balances block ranges on it, docs/rebalance.md).

``CausalWanDiT.run`` calls ``mark(label)`` after the patch embedding, after each block and after the head. On CUDA
each mark records an event on the current stream, so timing adds no host sync inside the forward; ``collect``
waits for the last event once, after the forward (the caller moves the result to the host right after anyway).
On CPU kernels run synchronously, so a wall-clock read per mark is the block's time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["BlockTimer", "BlockTimes"]


@dataclass
class BlockTimes:
    """Seconds per owned block, and the rest of the forward (patch embed, time embeddings, head, x0)."""

    blocks: dict[int, float] = field(default_factory=dict)
    extra: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.blocks.values()) + self.extra


class BlockTimer:
    """Marks taken during one forward; ``collect`` turns them into ``BlockTimes``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list[tuple[int | str | tuple[int, ...], object]] = []
        self.start()

    def _now(self) -> object:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self) -> None:
        self._marks = [("start", self._now())]

    def mark(self, label: int | str) -> None:
        """``label``: a block index after that block, else a name for the non-block work just done."""
        self._marks.append((label, self._now()))

    def mark_blocks(self, blocks: Sequence[int]) -> None:
        """One mark after several blocks run as one unit (a CUDA-graph replay): their time is split evenly."""
        self._marks.append((tuple(blocks), self._now()))

    def collect(self) -> BlockTimes:
        out = BlockTimes()
        if len(self._marks) < 2:
            return out
        if self.cuda:
            last = self._marks[-1][1]
            assert isinstance(last, torch.cuda.Event)
            last.synchronize()
        for (_, t0), (label, t1) in zip(self._marks, self._marks[1:], strict=False):
            if self.cuda:
                assert isinstance(t0, torch.cuda.Event) and isinstance(t1, torch.cuda.Event)
                dt = t0.elapsed_time(t1) / 1000.0
            else:
                assert isinstance(t0, float) and isinstance(t1, float)
                dt = t1 - t0
            if isinstance(label, int):
                out.blocks[label] = out.blocks.get(label, 0.0) + dt
            elif isinstance(label, tuple) and label:
                for b in label:
                    out.blocks[b] = out.blocks.get(b, 0.0) + dt / len(label)
            else:
                out.extra += dt
        return out
