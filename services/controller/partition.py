"""Assigning the DiT's blocks to stages: contiguous ranges, one per stage, covering every block once."""

from __future__ import annotations

from proto import StageAssignment


def even_split(num_blocks: int, stage_ids: list[str]) -> list[StageAssignment]:
    """Contiguous ranges as equal as possible; earlier stages take the remainder (they also run patch-embed).

    The rebalancing controller replaces this with a cost-aware split; the contract (contiguous, in stage order,
    covering [0, num_blocks), none empty) stays.
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
