"""Which blocks change owner between two block maps, and whether a stage can switch online (docs/rebalance.md).

Shared by the controller (which epochs it may publish as online switches) and the DiT stages (which KV to move).
"""

from __future__ import annotations

from proto import BlockMap

__all__ = ["ONLINE_REASONS", "block_moves", "joins_online", "offline_reason", "stage_moves"]

ONLINE_REASONS = ("rebalance", "join")
"""Epochs whose old owners are all alive: KV moves between stages instead of being rebuilt."""


def _owners(bm: BlockMap) -> dict[int, str]:
    return {b: s.stage_id for s in bm.stages for b in range(s.block_start, s.block_end)}


def block_moves(old: BlockMap, new: BlockMap) -> dict[tuple[str, str], list[int]]:
    """(old owner, new owner) → the blocks moving between them, ascending (same block count)."""
    before, after = _owners(old), _owners(new)
    moves: dict[tuple[str, str], list[int]] = {}
    for b in sorted(after):
        if before[b] != after[b]:
            moves.setdefault((before[b], after[b]), []).append(b)
    return moves


def stage_moves(old: BlockMap, new: BlockMap, stage_id: str) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """For one stage: (new owner → blocks it hands over, old owner → blocks it takes over)."""
    send: dict[str, list[int]] = {}
    receive: dict[str, list[int]] = {}
    for (src, dst), blocks in block_moves(old, new).items():
        if src == stage_id:
            send[dst] = blocks
        if dst == stage_id:
            receive[src] = blocks
    return send, receive


def offline_reason(old: BlockMap | None, new: BlockMap) -> str:
    """Why ``old`` → ``new`` cannot be an online switch (empty: it can). Online needs every old stage alive and in
    its old ring order (the switch marker travels the old ring), the same first stage (it owns the ring's queues)
    and the same model; new stages may join anywhere after the first."""
    if old is None:
        return "no previous block map"
    if new.reason not in ONLINE_REASONS:
        return f"reason {new.reason!r}"
    if new.epoch <= old.epoch:
        return f"epoch {new.epoch} does not follow {old.epoch}"
    if new.num_blocks != old.num_blocks:
        return "the block count changed"
    before, after = [s.stage_id for s in old.stages], [s.stage_id for s in new.stages]
    if [s for s in after if s in before] != before:
        return "a stage left or the ring's order changed"
    if after[0] != before[0]:
        return "the first stage changed"
    return ""


def joins_online(new: BlockMap) -> bool:
    """Whether a stage without blocks that sees ``new`` joins a running ring (its blocks' KV arrives by move; the
    controller writes ``initial``, not ``join``, when nothing runs yet)."""
    return new.reason == "join"
