"""Stream and ring parameters: their limits, defaults and derived facts, defined once.

Two levels of parameters exist. *Stream* parameters (size, rate, steps, noise, seed, mode) are per stream and live
in the ``StreamSpec`` wire message (``proto.messages``), which validates them with the limits below. *Ring*
parameters (KV window, sinks, adaptive sink threshold, RoPE refresh) are the same for every stream of a pipeline:
they are configured once (``dit_stage.*``), carried in every ``BlockMap`` as its ``RingConfig``, and every service
that needs them (ingest's chunk clock and replay depth, the stages' KV caches) derives them from that one model.
Everything here is pure Python: no torch, no service imports (docs/stream-spec.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from proto.clock import ChunkClock

__all__ = [
    "ADAPTIVE_THRESHOLD",
    "KV_WINDOW",
    "MAX_FPS",
    "MAX_MODEL_HEIGHT",
    "MAX_MODEL_WIDTH",
    "MAX_STEPS",
    "MAX_T2V_FRAMES",
    "ROPE_MAX",
    "SDV2_STEPS",
    "SINK",
    "SIZE_MULTIPLE",
    "T_REFRESH",
    "RingConfig",
    "chunk_timesteps",
    "first_timestep",
    "latent_hw",
]

VAE_SPATIAL_FACTOR = 8
"""Pixels per latent cell along each side: the Wan2.1 VAE's (and TAEHV's) spatial downsampling."""
SIZE_MULTIPLE = 2 * VAE_SPATIAL_FACTOR
"""Model width and height are multiples of this: VAE spatial factor 8 × DiT patch 2."""
MAX_MODEL_WIDTH = 1920
MAX_MODEL_HEIGHT = 1088
"""Largest model size by default (1080p rounded up to the size multiple); ingest sizes its largest message by it."""
MAX_FPS = 60.0
SDV2_STEPS = (700, 500, 400, 200)
"""SDv2's denoising timesteps for slots 1..B−1 (slot 0 is labelled by the noise scale, ``first_timestep``)."""
MAX_STEPS = len(SDV2_STEPS)
"""Denoising steps (= stream-batch slots) a stream may ask for."""
MAX_T2V_FRAMES = 8
"""Latent frames per text-to-video chunk."""

KV_WINDOW = 6
"""Latent frames one chunk attends to, sinks and the chunk itself included (SDv2)."""
SINK = 3
ADAPTIVE_THRESHOLD = 0.2
T_REFRESH = 50
"""RoPE start frame at which positions are reset (SDv2's refresh rule, ``proto.clock``)."""
ROPE_MAX = 1024
"""Temporal positions in the DiT's RoPE table (Wan2.1)."""


def first_timestep(noise_scale: float) -> int:
    """The timestep slot 0 is labelled with for an input mixed at ``noise_scale`` (SDv2: int(1000·s) − 100).

    The one definition: the stream-batch runner, the motion controller and ingest's chunk headers all use it.
    """
    return int(1000 * noise_scale) - 100


def latent_hw(height: int, width: int) -> tuple[int, int]:
    """The latent grid (h, w) of a frame of ``height`` × ``width`` model pixels."""
    return height // VAE_SPATIAL_FACTOR, width // VAE_SPATIAL_FACTOR


def chunk_timesteps(steps: int, noise_scale: float | None) -> list[int]:
    """Timesteps of a chunk, slot 0 first: ``first_timestep(s)``, then the fixed step list. ``None``: a T2V chunk
    (no input to keep: pure noise at the step list's own first timestep)."""
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {steps}")
    if noise_scale is None:
        return list(SDV2_STEPS[:steps])
    return [first_timestep(noise_scale), *SDV2_STEPS[1:steps]]


class RingConfig(BaseModel):
    """The KV ring of every stream in a pipeline: configured once, carried by the block map."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    kv_window: int = Field(KV_WINDOW, ge=2, le=ROPE_MAX,
                           description="latent frames one chunk attends to (sinks included)")
    sink: int = Field(SINK, ge=0, le=ROPE_MAX, description="sink frames of the KV ring (never rolled out)")
    adaptive_threshold: float | None = Field(
        ADAPTIVE_THRESHOLD, description="adaptive sink replacement below this similarity (null disables)")
    t_refresh: int | None = Field(T_REFRESH, ge=1, le=ROPE_MAX, description="RoPE start frame at which positions "
                                  "are reset (null disables the refresh)")
    cache_mode: Literal["sdv2", "self_forcing"] = Field(
        "sdv2", description="sdv2: a slot's cache holds its own denoising steps' K/V; self_forcing: a clean pass at "
        "context_noise rewrites each finished chunk's K/V in every slot (Self-Forcing / CausVid)")
    context_noise: float = Field(0.0, ge=0, le=1000, description="self_forcing: the clean pass's timestep")

    @model_validator(mode="after")
    def _consistent(self) -> RingConfig:
        if self.sink >= self.kv_window:
            raise ValueError(f"sink={self.sink} must leave rolling frames in kv_window={self.kv_window}")
        self.clock()  # the v2v clock must exist under these values (it raises with the reason)
        return self

    def clock(self, t2v_frames: int | None = None) -> ChunkClock:
        """The chunk clock of a stream on this ring: v2v, or t2v with ``t2v_frames`` latent frames per chunk."""
        from proto.clock import ChunkClock  # proto.clock takes its defaults from here

        kw = {"kv_window": self.kv_window, "t_refresh": self.t_refresh}
        return ChunkClock.v2v(**kw) if t2v_frames is None else ChunkClock.t2v(t2v_frames, **kw)
