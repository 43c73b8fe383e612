"""Assigning the DiT's blocks to stages: contiguous ranges, one per stage, covering every block once.

``even_split`` is the static map (a first start, or ``controller.mode: static``). ``best_split`` is the exact
minimiser of the slowest stage's time over every contiguous split (a dynamic programme over split points), for
blocks of unequal cost, stages of unequal speed and memory, and the extra work of the first stage (patch embed)
and the last (head). docs/controller.md states the objective and its tie-breaks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from proto import StageAssignment
from wan.config import WanDiTConfig

__all__ = ["PartitionProblem", "Split", "Stage", "best_split", "block_weight_bytes", "evaluate", "even_split",
           "stage_ms"]

_REL_TOL = 1e-9


def block_weight_bytes(cfg: WanDiTConfig, dtype_bytes: int) -> int:
    """Weights of one DiT block: self- and cross-attention (q, k, v, o), the FFN, norms and modulation (the memory
    a stage needs per block it takes, beside that block's KV)."""
    d = cfg.dim
    return dtype_bytes * (8 * (d * d + d) + 2 * d * cfg.ffn_dim + d + cfg.ffn_dim + 6 * d + 4 * d)


def even_split(num_blocks: int, stage_ids: list[str]) -> list[StageAssignment]:
    """Contiguous ranges as equal as possible; earlier stages take the remainder (they also run patch-embed).

    The contract every split keeps: contiguous, in stage order, covering [0, num_blocks), none empty.
    """
    n = len(stage_ids)
    if n == 0:
        raise ValueError("no stages to assign blocks to")
    if num_blocks < n:
        raise ValueError(f"{num_blocks} blocks cannot give each of {n} stages at least one")
    base, extra = divmod(num_blocks, n)
    out, start = [], 0
    for i, sid in enumerate(stage_ids):
        size = base + (1 if i < extra else 0)
        out.append(StageAssignment(stage_id=sid, block_start=start, block_end=start + size))
        start += size
    return out


@dataclass(frozen=True)
class Stage:
    """One stage as the partitioner sees it.

    ``speed``: time multiplier of this stage's GPU (1.0 nominal, 2.0 = takes twice as long for the same block).
    ``memory_bytes``: what the stage may hold for its blocks (weights + KV of its streams); ``inf`` = unknown.
    """

    stage_id: str
    speed: float = 1.0
    memory_bytes: float = math.inf


@dataclass(frozen=True)
class PartitionProblem:
    """Costs in ms per micro-step at speed 1: per block, and the first/last stages' extra work."""

    block_ms: Sequence[float]
    stages: Sequence[Stage]
    first_extra_ms: float = 0.0
    last_extra_ms: float = 0.0
    bytes_per_block: float = 0.0
    """Weights plus the KV of every admitted stream, per block (what a stage must hold per block it owns)."""

    @property
    def num_blocks(self) -> int:
        return len(self.block_ms)


@dataclass(frozen=True)
class Split:
    """A partition: ranges per stage (stage order), each stage's predicted ms, and the slowest one's."""

    ranges: tuple[tuple[int, int], ...]
    stage_ms: tuple[float, ...]

    @property
    def bottleneck_ms(self) -> float:
        return max(self.stage_ms)

    def assignments(self, stage_ids: Sequence[str]) -> list[StageAssignment]:
        return [StageAssignment(stage_id=sid, block_start=a, block_end=b)
                for sid, (a, b) in zip(stage_ids, self.ranges, strict=True)]


def stage_ms(problem: PartitionProblem, index: int, start: int, end: int) -> float:
    """Predicted time per micro-step of stage ``index`` owning blocks [start, end)."""
    n = len(problem.stages)
    t = math.fsum(problem.block_ms[start:end])
    if index == 0:
        t += problem.first_extra_ms
    if index == n - 1:
        t += problem.last_extra_ms
    return t * problem.stages[index].speed


def _fits(problem: PartitionProblem, index: int, start: int, end: int) -> bool:
    return (end - start) * problem.bytes_per_block <= problem.stages[index].memory_bytes


def evaluate(problem: PartitionProblem, ranges: Sequence[tuple[int, int]]) -> Split:
    """The predicted times of a given partition (the current map, for the policy's gain)."""
    return Split(tuple(ranges), tuple(stage_ms(problem, i, a, b) for i, (a, b) in enumerate(ranges)))


def best_split(problem: PartitionProblem, current: Mapping[str, tuple[int, int]] | None = None) -> Split | None:
    """The contiguous split minimising the slowest stage (None when memory allows no split).

    Exact: a DP over split points, O(stages · blocks²). Among optimal splits it takes the one moving the fewest
    blocks away from ``current`` (stage id → its range now; moves cost KV migration), then the one with the
    smallest sum of squared stage times (the most evenly loaded), then the first in split-point order, so the
    answer is deterministic.
    """
    n, nb = len(problem.stages), problem.num_blocks
    if n == 0:
        raise ValueError("no stages to assign blocks to")
    if nb < n:
        raise ValueError(f"{nb} blocks cannot give each of {n} stages at least one")
    # phase 1: the optimal bottleneck. best[i][j]: stages 0..i-1 own blocks [0, j)
    inf = math.inf
    best = [[inf] * (nb + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(i, nb - (n - i) + 1):
            for k in range(i - 1, j):
                if best[i - 1][k] == inf or not _fits(problem, i - 1, k, j):
                    continue
                v = max(best[i - 1][k], stage_ms(problem, i - 1, k, j))
                if v < best[i][j]:
                    best[i][j] = v
    optimum = best[n][nb]
    if optimum == inf:
        return None
    bound = optimum * (1 + _REL_TOL) + 1e-12
    # phase 2: among splits with every stage within the optimum, the fewest moved blocks, then the evenest
    owner = _owners(current, nb) if current is not None else None
    key: list[list[tuple[float, float] | None]] = [[None] * (nb + 1) for _ in range(n + 1)]
    back = [[-1] * (nb + 1) for _ in range(n + 1)]
    key[0][0] = (0.0, 0.0)
    for i in range(1, n + 1):
        for j in range(i, nb - (n - i) + 1):
            for k in range(i - 1, j):
                prev = key[i - 1][k]
                if prev is None or not _fits(problem, i - 1, k, j):
                    continue
                t = stage_ms(problem, i - 1, k, j)
                if t > bound:
                    continue
                sid = problem.stages[i - 1].stage_id
                moved = sum(1 for b in range(k, j) if owner[b] != sid) if owner is not None else 0
                cand = (prev[0] + moved, prev[1] + t * t)
                cur = key[i][j]
                if cur is None or cand[0] < cur[0] or (cand[0] == cur[0] and cand[1] < cur[1] * (1 - _REL_TOL)):
                    key[i][j] = cand
                    back[i][j] = k
    ranges: list[tuple[int, int]] = []
    j = nb
    for i in range(n, 0, -1):
        k = back[i][j]
        ranges.append((k, j))
        j = k
    ranges.reverse()
    return evaluate(problem, ranges)


def _owners(current: Mapping[str, tuple[int, int]], num_blocks: int) -> list[str]:
    """The stage id owning each block under ``current`` ("" where none does)."""
    owner = [""] * num_blocks
    for sid, (a, b) in current.items():
        for blk in range(max(a, 0), min(b, num_blocks)):
            owner[blk] = sid
    return owner
