"""What one DiT stage keeps for one stream, and the items queued for it: one object, movable in one format.

``StageStream`` holds a stream's KV shard (all slots, ring state included), its cross-attention K/V per prompt
version (and mid-blend views), its warm-up segment and, on the first stage, the queued items and the slot counters
of the ring (docs/dit-ring.md). ``StageWorker.export_stream`` / ``import_stream`` move it whole (a pipeline's
``save_stream``); an online rebalance moves the KV of some blocks of it (``dit_stage/switching.py``).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

from dit_stage.state import StreamDiTState
from proto import RingItem

__all__ = ["PROMPT_VERSIONS_KEPT", "Pending", "StageStream", "is_clean", "signature", "versions_kept", "view_order"]

PROMPT_VERSIONS_KEPT = 2
"""Prompt versions whose cross-attention K/V a stage keeps per stream at least (the newest ones). A stream keeps
one more than its step count: during a `blend` every chunk enters under its own version, and the B chunks in the
slots plus the one entering may all differ."""


@dataclass
class Pending:
    """An item waiting at the first stage: its header and its noisy latent [1, C, f, H, W] at ``meta.step``."""

    meta: RingItem
    latent: torch.Tensor
    queued_at: float


@dataclass
class StageStream:
    """What one stage keeps for one stream."""

    stream_id: str
    steps: int
    latent_hw: tuple[int, int]
    shard_state: StreamDiTState
    views: dict[int, StreamDiTState] = field(default_factory=dict)  # prompt version → state sharing the shard
    blends: dict[tuple[int, int, float], StreamDiTState] = field(default_factory=dict)
    """Mid-blend views, (to, from, alpha) → state sharing the shard; rebuilt from the embeddings after a move."""
    segment: int = 0
    segment_start: int = 0  # seq of the segment's prepare chunk: noise draws count chunks from it
    # first stage only
    seed: int = 0  # the segment's seed (``segment_seed``)
    new: collections.deque[Pending] = field(default_factory=collections.deque)
    returns: dict[int, collections.deque[Pending]] = field(default_factory=dict)
    slot_next: list[int] = field(default_factory=list)  # next cache frame per slot
    last_seq: int = -1
    prepared: bool = False
    in_flight: dict[tuple[int, int], float] = field(default_factory=dict)  # returns to come: (seq, step) → deadline
    epoch: int = 0  # the block-map epoch this state was built under (a failure epoch discards older ones)
    draining: bool = False  # lockstep: the returns may run without a new chunk (the input ended)


def versions_kept(st: StageStream | None) -> int:
    """Prompt versions (and mid-blend views) a stage keeps for a stream: one more than its step count."""
    return max(PROMPT_VERSIONS_KEPT, 1 + (st.steps if st is not None else 0))


def view_order(key: int | tuple[int, int, float]) -> tuple[int, float]:
    """Older views first: by prompt version, then (mid-blend) by how far the blend has come."""
    return (key, 1.0) if isinstance(key, int) else (key[0], key[2])


def signature(p: Pending) -> tuple[int, int, int]:
    return (p.meta.frames, *p.latent.shape[-2:])


def is_clean(meta: RingItem) -> bool:
    """A Self-Forcing clean pass: the finished chunk once more at ``context_noise``, rewriting its K/V."""
    return meta.step == meta.steps
