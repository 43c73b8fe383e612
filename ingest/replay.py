"""The replay ring: what ingest keeps per stream to rebuild the DiT's KV caches after a stage dies (docs/recovery.md).

A stage's KV cache of one stream, per block and slot, holds ``sink`` sink frames (the first frames of the segment,
never rolled out) and ``kv_window − sink`` rolling frames (the latest chunks). Replaying, in order and from empty
caches, the segment's prepare chunk, the chunks whose frames went into the sinks, then the last K chunks, puts the
same frames in the same roles back into every cache. How *exact* their contents are depends on K:

* each block's attention at chunk j reads the rolling frames of the ``R − 1`` chunks before it (R = rolling
  frames, one latent frame per chunk), so a block's output at j depends on chunks back to ``j − (R − 1)``; through
  L blocks and B denoising steps (slot k's input is slot k − 1's output), the finished x0 of chunk j depends on
  chunks back to ``j − B·L·(R − 1)``;
* so with ``K ≥ B·L·(R − 1)`` (``exact_replay_chunks``) every output after recovery equals the uninterrupted
  stream's; with fewer, the first ``B·L·(R − 1) − K`` live chunks after the replay differ, by an error that decays
  geometrically chunk by chunk, and from then on outputs are equal again.

The default K is ``R`` (``window_chunks``): the rolling window refilled — cheap to replay, approximate for a few
chunks. Adaptive sinks (``dit_stage.adaptive_threshold``) replace sink frames with later, data-dependent ones
that this ring does not keep: with them on, the sinks after a replay are the segment's first frames again.

Memory: ``1 + sink_chunks + K`` latent chunks per stream (fp32): for the Wan VAE at 832×480 (16×60×104 latents,
400 KB per latent frame) and the defaults (window 6, sink 3), 2 + 1 + 3 latent frames = 2.4 MB per stream.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

from proto import LatentChunk
from proto.clock import ChunkClock

__all__ = ["ReplayRing", "exact_replay_chunks", "sink_chunks", "window_chunks"]


def sink_chunks(sink: int, clock: ChunkClock | None = None) -> int:
    """Chunks after the prepare chunk whose frames land in the sink slots (the prepare chunk fills the first)."""
    clock = clock or ChunkClock()
    return -(-max(0, sink - clock.first_latent_frames) // clock.latent_frames_per_chunk)


def window_chunks(kv_window: int, sink: int, clock: ChunkClock | None = None) -> int:
    """Chunks that refill the rolling part of the KV window (the default replay depth)."""
    clock = clock or ChunkClock()
    return -(-(kv_window - sink) // clock.latent_frames_per_chunk)


def exact_replay_chunks(kv_window: int, sink: int, blocks: int, steps: int) -> int:
    """Replayed chunks after which every output equals the uninterrupted stream's (one latent frame per chunk)."""
    return steps * blocks * max(0, kv_window - sink - 1)


class ReplayRing:
    """The segment's head (prepare chunk + sink chunks) and the last ``depth`` chunks of one stream, bounded."""

    def __init__(self, depth: int, head_chunks: int) -> None:
        self.head_chunks = head_chunks
        self.segment: int | None = None  # segment of the last chunk added
        self.head: list[LatentChunk] = []
        self.tail: collections.deque[LatentChunk] = collections.deque(maxlen=depth)

    @property
    def depth(self) -> int:
        return self.tail.maxlen or 0

    def add(self, chunk: LatentChunk) -> None:
        """A published chunk, in order. A segment's first chunk (its prepare chunk: latent positions from 0; a
        session may begin at any seq) starts the ring afresh."""
        new_segment = chunk.segment != self.segment
        self.segment = chunk.segment
        if chunk.latent_start == 0:
            self.head.clear()
            self.tail.clear()
        elif new_segment or not self.head:
            self.head.clear()
            self.tail.clear()
            return  # the segment's prepare chunk never went out: the stages cannot run this segment anyway
        if len(self.head) < 1 + self.head_chunks:
            self.head.append(chunk)
        else:
            self.tail.append(chunk)

    def __iter__(self) -> Iterator[LatentChunk]:
        """The chunks to replay, in order: the head, then the tail."""
        yield from self.head
        yield from self.tail

    def __len__(self) -> int:
        return len(self.head) + len(self.tail)

    def nbytes(self) -> int:
        return sum(c.latent.numel() * c.latent.element_size() for c in self)
