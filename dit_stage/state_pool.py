"""Ended streams' device storage, handed to new streams of the same layout, so their CUDA graphs replay at once.

A CUDA graph bakes in the addresses of the stream states it reads and writes (``BatchInputs.signature`` names the
KV shard's and the cross-attention K/V's tensors). A stream on new storage therefore captures its graphs again
(about a second each at 1.3B, rationed by ``CapturePolicy``) and runs eagerly meanwhile; a stream on the storage
of one that ended replays that stream's graphs from its first micro-step. Each stream, and each cut to a new
segment (a prompt change's default mode), used to pay for its captures. A cut's segment starts while the old one
still runs, so segments alternate between two storages, each replaying the graphs of the segment before last.

Only storage nothing else holds is taken in (``StageWorker._retire``): a stream that ended, a segment that has left
the ring (first stage), both between forwards; an old segment on a later stage after the forward that started the new
one. A reused shard is ``reset`` to exactly a new one's contents (tested against a new one, tests/dit_service); cross
K/V are overwritten whole by ``set_prompt``. The pool is on in the graph modes only, so on CUDA only: otherwise there
are no graphs to keep, and on the CPU an exported stream's tensors are the state's own (``.cpu()`` does not copy),
which reuse would overwrite.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from dit_stage.kv_cache import KVCacheShard
from dit_stage.state import StreamDiTState

__all__ = ["StatePool"]

CrossKV = tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]
T = TypeVar("T")
V = TypeVar("V")


class StatePool:
    """Retired KV shards and cross-attention K/V, newest last, at most ``limit`` shards and ``2 · limit`` cross K/V
    sets over all layouts (the oldest are freed first): a stage keeps the storage of a few recent streams, no more.
    Should an allocation run out of device memory, ``allocate`` frees the pool and tries once more."""

    def __init__(self, enabled: bool = True, limit: int = 4) -> None:
        self.enabled = enabled
        self.limit = limit
        self._shards: list[tuple[tuple, KVCacheShard]] = []
        self._cross: list[tuple[tuple, CrossKV]] = []
        self._lock = threading.Lock()  # taken from the event loop (admission), given back between forwards
        self.reused = 0  # shards handed out again (a stream that could replay its predecessor's graphs)

    @staticmethod
    def shard_key(shard: KVCacheShard) -> tuple:
        layout = dict(shard.meta())
        del layout["frames_end"]
        return (str(shard.device), *((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(layout.items())))

    @staticmethod
    def cross_key(cross_k: dict[int, torch.Tensor]) -> tuple:
        return tuple((b, tuple(t.shape), t.dtype, str(t.device)) for b, t in sorted(cross_k.items()))

    def shard(self, layout: KVCacheShard) -> KVCacheShard | None:
        """A retired shard of ``layout``'s (an unallocated shard), reset to a new one's contents; else None."""
        if not self.enabled:
            return None
        with self._lock:
            shard = _take(self._shards, self.shard_key(layout))
        if shard is not None:
            shard.reset()
            self.reused += 1
        return shard

    def cross(self, blocks: Iterable[int], shape: tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> CrossKV | None:
        """Retired cross K/V dicts for ``blocks`` of ``shape``, to be overwritten whole; else None."""
        if not self.enabled:
            return None
        with self._lock:
            return _take(self._cross, tuple((b, shape, dtype, str(device)) for b in sorted(blocks)))

    def retire(self, states: Iterable[StreamDiTState]) -> None:
        """Take in the storage of an ended stream's states (its shard, shared by its views, once)."""
        if not self.enabled:
            return
        with self._lock:
            shards: dict[int, KVCacheShard] = {}
            for state in states:
                shards[id(state.shard)] = state.shard
                if state.cross_k:
                    _keep(self._cross, (self.cross_key(state.cross_k), (state.cross_k, state.cross_v)),
                          2 * self.limit)
            for shard in shards.values():
                _keep(self._shards, (self.shard_key(shard), shard), self.limit)

    def allocate(self, make: Callable[[], T]) -> T:
        """``make()``; out of device memory with storage pooled, again after freeing the pool."""
        try:
            return make()
        except torch.OutOfMemoryError:
            with self._lock:
                if not (self._shards or self._cross):
                    raise
                self._shards.clear()
                self._cross.clear()
            torch.cuda.empty_cache()
            return make()

    def nbytes(self) -> int:
        with self._lock:
            shards = sum(shard.nbytes() for _, shard in self._shards)
            cross = sum(t.numel() * t.element_size() for _, kv in self._cross for d in kv for t in d.values())
        return shards + cross

    def clear(self) -> None:
        with self._lock:
            self._shards.clear()
            self._cross.clear()


def _take(pooled: list[tuple[tuple, V]], key: tuple) -> V | None:
    for i in range(len(pooled) - 1, -1, -1):  # the newest first
        if pooled[i][0] == key:
            return pooled.pop(i)[1]
    return None


def _keep(pooled: list[tuple[tuple, V]], entry: tuple[tuple, V], limit: int) -> None:
    pooled.append(entry)
    del pooled[: max(0, len(pooled) - limit)]
