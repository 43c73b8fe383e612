"""The chunk clock: the one definition of chunk arithmetic and of the deterministic noise seed.

A stream is a sequence of chunks c = 0, 1, 2, ... Chunk 0 (the *prepare* chunk) takes 5 input frames and
yields 2 latent frames; every later chunk takes 4 input frames and yields 1 latent frame (T2V: no input,
a configurable number of latent frames per chunk). Everything that needs "which frames, which latent
positions, which RoPE position" for chunk c asks this module; nothing else re-derives it.

Two frame coordinates exist:

* the **absolute latent frame index** (``latent_start``): grows without bound; the KV ring uses it to tell a
  new frame from a re-run of the same frame;
* the **RoPE start frame** (``rope_start``): the temporal RoPE position the DiT rotates the chunk to. It
  equals the absolute index until it reaches ``t_refresh``; then it is reset to ``kv_window -
  latent_frames_per_chunk`` and cycles, so positions stay inside the RoPE table for unbounded streams
  (StreamDiffusionV2's refresh rule, applied in every path, not just some).

Pure integer arithmetic, no torch, O(1) per query.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from proto.spec import KV_WINDOW, ROPE_MAX, T_REFRESH

__all__ = ["ChunkClock", "noise_seed", "segment_seed"]


@dataclass(frozen=True)
class ChunkClock:
    """Chunk → frames arithmetic for one stream. Frozen: a stream's clock never changes mid-stream."""

    first_input_frames: int = 5
    input_frames_per_chunk: int = 4
    first_latent_frames: int = 2
    latent_frames_per_chunk: int = 1
    kv_window: int = KV_WINDOW
    """Latent frames one chunk attends to (sinks and the chunk itself included)."""
    t_refresh: int | None = T_REFRESH
    """RoPE start frame at which positions are reset; None disables the refresh."""
    rope_max: int = ROPE_MAX
    """Positions per axis in the RoPE table."""
    temporal_compression: int = 4

    def __post_init__(self) -> None:
        n, f0 = self.latent_frames_per_chunk, self.first_latent_frames
        if n < 1 or f0 < 1:
            raise ValueError("chunks must have at least one latent frame")
        if self.first_input_frames < 0 or self.input_frames_per_chunk < 0:
            raise ValueError("input frame counts must be >= 0")
        if self.kv_window < max(n, f0):
            raise ValueError(f"kv_window={self.kv_window} must hold a whole chunk ({max(n, f0)} frames)")
        if self.t_refresh is not None:
            if self.t_refresh <= self.refresh_to:
                raise ValueError(f"t_refresh={self.t_refresh} must exceed the reset position {self.refresh_to}")
            if self.t_refresh - 1 + max(n, f0) > self.rope_max:
                raise ValueError(f"t_refresh={self.t_refresh} leaves positions outside the RoPE table")

    @classmethod
    def v2v(cls, **kw: int | None) -> ChunkClock:
        """Video-to-video (SDv2): 5 frames → 2 latents, then 4 frames → 1 latent."""
        return cls(**kw)  # type: ignore[arg-type]

    @classmethod
    def t2v(cls, latent_frames_per_chunk: int = 1, **kw: int | None) -> ChunkClock:
        """Text-to-video: no input frames; every chunk, the first included, has the same latent frames."""
        return cls(
            first_input_frames=0,
            input_frames_per_chunk=0,
            first_latent_frames=latent_frames_per_chunk,
            latent_frames_per_chunk=latent_frames_per_chunk,
            **kw,  # type: ignore[arg-type]
        )

    @property
    def refresh_to(self) -> int:
        """The RoPE start frame a chunk is reset to once ``t_refresh`` is reached."""
        return self.kv_window - self.latent_frames_per_chunk

    def input_frames(self, c: int) -> int:
        """Input (video) frames chunk c consumes."""
        self._check(c)
        return self.first_input_frames if c == 0 else self.input_frames_per_chunk

    def input_start(self, c: int) -> int:
        """Index of chunk c's first input frame in the stream's input frame sequence."""
        self._check(c)
        return 0 if c == 0 else self.first_input_frames + (c - 1) * self.input_frames_per_chunk

    def latent_frames(self, c: int) -> int:
        """Latent frames chunk c yields."""
        self._check(c)
        return self.first_latent_frames if c == 0 else self.latent_frames_per_chunk

    def output_frames(self, c: int) -> int:
        """Video frames decoding chunk c's latents yields (the first latent frame of a stream decodes to 1)."""
        n = self.latent_frames(c)
        return (1 + self.temporal_compression * (n - 1)) if c == 0 else self.temporal_compression * n

    def latent_start(self, c: int) -> int:
        """Absolute index of chunk c's first latent frame."""
        self._check(c)
        return 0 if c == 0 else self.first_latent_frames + (c - 1) * self.latent_frames_per_chunk

    def latent_end(self, c: int) -> int:
        return self.latent_start(c) + self.latent_frames(c)

    def rope_start(self, c: int) -> int:
        """Temporal RoPE start frame of chunk c after the refresh rule.

        The rule, stated recursively: p(0) = 0; p(c) = p(c-1) + frames(c-1), and if that is ≥ t_refresh it is
        replaced by ``refresh_to``. Closed form below, so any service can ask for any c in O(1).
        """
        self._check(c)
        a = self.latent_start(c)
        if self.t_refresh is None:
            if a + self.latent_frames(c) > self.rope_max:
                raise ValueError(f"chunk {c} exceeds the RoPE table ({self.rope_max}); enable t_refresh")
            return a
        n, f0 = self.latent_frames_per_chunk, self.first_latent_frames
        if c == 0 or a < self.t_refresh:
            return a
        first_reset = 1 + -(-max(0, self.t_refresh - f0) // n)
        period = -(-(self.t_refresh - self.refresh_to) // n)
        return self.refresh_to + ((c - first_reset) % period) * n

    def rope_end(self, c: int) -> int:
        return self.rope_start(c) + self.latent_frames(c)

    @staticmethod
    def _check(c: int) -> None:
        if c < 0:
            raise ValueError(f"chunk index must be >= 0, got {c}")


def noise_seed(stream_seed: int, chunk: int, step: int, purpose: str) -> int:
    """Seed of the random draw for (stream seed, chunk c, step k, purpose).

    Every random tensor of a stream is drawn from a generator seeded with this value, so the output is
    the same whether the pipeline runs in one process or in N stages, batched or not. ``purpose`` separates
    draws that share (c, k), e.g. ``"input"`` (the noise mixed into the encoded chunk), ``"renoise"`` (the
    fresh noise between denoising steps) and ``"context"`` (the Self-Forcing clean pass).
    """
    digest = hashlib.blake2b(f"{stream_seed}:{chunk}:{step}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def segment_seed(seed: int, segment: int) -> int:
    """Noise seed of a stream's ``segment``-th warm-up (a `cut` starts a new one): the stream seed itself for the
    first, then a pure function of (seed, segment), so a cut never replays the first segment's noise. Within a
    segment, draws are keyed by the chunk index counted from the segment's prepare chunk (0)."""
    return seed if segment == 0 else noise_seed(seed, segment, 0, "segment")
