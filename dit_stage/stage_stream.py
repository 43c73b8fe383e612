"""What one DiT stage keeps for one stream, and the items queued for it: one object, movable in one format.

``StageStream`` holds a stream's KV shard (all slots, ring state included), its cross-attention K/V per prompt
version (and mid-blend views), its warm-up segment and, on the first stage, the queued items and the slot counters
of the ring (docs/dit-ring.md). Its KV travels in one format (``kv_tensors`` / ``merge_kv``): an online rebalance
moves some blocks of it in ``ShardMove``s (``dit_stage/switching.py``), ``StageWorker.export_stream`` /
``import_stream`` all of them (a pipeline's ``save_stream``), and both arrive through the same merge.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from dit_stage.kv_cache import KVCacheShard
from dit_stage.micro_step import MicroStep
from dit_stage.state import StreamDiTState
from proto import RingItem

__all__ = ["PROMPT_VERSIONS_KEPT", "Pending", "StageStream", "is_clean", "kv_tensors", "merge_kv", "signature",
           "step_signature", "stream_from_layout", "versions_kept", "view_order"]

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
    seed: int = 0  # the segment's seed (``segment_seed``) of the last chunk admitted (a live change: from it on)
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
    """The grid an item runs on: items of one signature can share a forward."""
    return (p.meta.frames, *p.latent.shape[-2:])


def step_signature(step: MicroStep) -> tuple[int, int, int]:
    """A formed micro-step's signature (all its items share it)."""
    return (step.items[0].frames, *step.noisy.shape[-2:])


def is_clean(meta: RingItem) -> bool:
    """A Self-Forcing clean pass: the finished chunk once more at ``context_noise``, rewriting its K/V."""
    return meta.step == meta.steps


def kv_tensors(shard: KVCacheShard, views: dict[int, StreamDiTState], blocks: Iterable[int], *,
               take: bool) -> dict[str, torch.Tensor]:
    """The moving format of a stream's KV for ``blocks``: ``shard``'s tensors (it holds exactly those blocks, ring
    state included) and each prompt version's cross-attention K/V as ``cross_k.<version>.<block>`` /
    ``cross_v.<version>.<block>``, on the CPU. ``take`` removes the cross K/V from ``views`` (a move)."""
    tensors = {key: t.detach().cpu() for key, t in shard.state_dict().items()}
    for version, view in views.items():
        for b in blocks:
            if b in view.cross_k:
                k, v = (view.cross_k.pop(b), view.cross_v.pop(b)) if take else (view.cross_k[b], view.cross_v[b])
                tensors[f"cross_k.{version}.{b}"] = k.detach().cpu()
                tensors[f"cross_v.{version}.{b}"] = v.detach().cpu()
    return tensors


def stream_from_layout(stream_id: str, layout: dict, latent_hw: tuple[int, int], segment: int, segment_start: int,
                       tensors: Iterable[str], device: torch.device) -> StageStream:
    """A stage's state for a stream whose KV is about to arrive (``merge_kv``): an empty shard of ``layout``'s
    slots and ring counters, and a view per prompt version whose cross K/V the tensors carry (the newest kept)."""
    shard = KVCacheShard.from_state(layout | {"blocks": []}, {}, device)
    slots = int(layout["num_slots"])
    st = StageStream(stream_id, slots, latent_hw, StreamDiTState(stream_id, shard), slot_next=[0] * slots,
                     segment=segment, segment_start=segment_start)
    versions = {int(k.split(".")[1]) for k in tensors if k.startswith("cross_k.")}
    for v in sorted(versions)[-versions_kept(st):]:
        st.views[v] = StreamDiTState(stream_id, shard, prompt_version=v)
    return st


def merge_kv(st: StageStream, blocks: list[int], layout: dict, tensors: dict[str, torch.Tensor],
             device: torch.device) -> list[int]:
    """Take over ``blocks``' KV (``kv_tensors``' format) into ``st``; returns the prompt versions of ``st`` whose
    cross K/V the tensors lack (the caller rebuilds them from the embedding, or drops them)."""
    shard = {k: t for k, t in tensors.items() if not k.startswith("cross_")}
    st.shard_state.shard.merge(KVCacheShard.from_state(layout | {"blocks": list(blocks)}, shard, device))
    missing = []
    for version, view in st.views.items():
        keys = [(f"cross_k.{version}.{b}", f"cross_v.{version}.{b}") for b in blocks]
        if not all(k in tensors and v in tensors for k, v in keys):
            missing.append(version)
            continue
        for b, (k, v) in zip(blocks, keys, strict=True):
            view.cross_k[b] = tensors[k].to(device)
            view.cross_v[b] = tensors[v].to(device)
    return missing
