"""Motion-aware noise controller (StreamDiffusionV2 ``compute_noise_scale_and_step``), per stream.

More motion → less noise (a more conservative edit). For each chunk of new frames, with the previous chunk's last
frame in front (pixels in [-1, 1], measured before the VAE):

    D_f   = sqrt(mean_{C,H,W} (x_f − x_{f−1})²)             for each new frame f
    d     = clamp(max_f D_f / sigma, 0, 1)
    s     = (s_init − motion_range · d) · (1 − prev_weight) + s_prev · prev_weight
    t0    = int(1000 · s) − 100                                (0.8 → 700, 0.7 → 600; wan.scheduler)

The first chunk of a stream uses ``s_init``. The constants are the official code's (streamdiffusionv2.md §5).
The batch dimension is averaged too, as in the official code, so pass one stream's frames per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from wan.scheduler import first_timestep


class MotionNoiseConfig(BaseModel):
    """Constants of the controller; the defaults are StreamDiffusionV2's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    s_init: float = Field(0.8, gt=0.0, le=1.0, description="noise scale for a still input (s_max)")
    motion_range: float = Field(0.1, ge=0.0, description="s_init − s_min: how far full motion lowers s")
    prev_weight: float = Field(0.1, ge=0.0, le=1.0, description="EMA weight of s_prev (the new target gets 1 − it)")
    sigma: float = Field(0.2, gt=0.0, description="RMS frame difference that counts as full motion")

    @property
    def s_min(self) -> float:
        return self.s_init - self.motion_range


@dataclass(frozen=True)
class NoiseLevel:
    """What the first denoising slot of a chunk uses: the noise mix ``s`` and its timestep label ``t0``."""

    scale: float
    timestep: int
    motion: float


@dataclass
class MotionNoiseState:
    """One stream's controller state: the EMA value and the last frame seen (``[B, C, 1, H, W]``)."""

    s_prev: float
    last_frame: torch.Tensor | None = None
    chunks: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"s_prev": self.s_prev, "last_frame": self.last_frame, "chunks": self.chunks}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MotionNoiseState:
        return cls(s_prev=float(data["s_prev"]), last_frame=data["last_frame"], chunks=int(data["chunks"]))


class MotionNoiseController:
    def __init__(self, config: MotionNoiseConfig | None = None) -> None:
        self.config = config or MotionNoiseConfig()

    def new_state(self) -> MotionNoiseState:
        return MotionNoiseState(s_prev=self.config.s_init)

    def timestep_for(self, scale: float) -> int:
        """The label the DiT gets for this noise scale: the runner's own rule, never a second copy of it."""
        return first_timestep(scale)

    def motion_of(self, frames: torch.Tensor) -> float:
        """Normalised motion d in [0, 1] of ``frames`` [B, C, T≥2, H, W], in the frames' dtype as upstream."""
        diff = (frames[:, :, 1:] - frames[:, :, :-1]) ** 2
        return float((diff.mean(dim=(0, 1, 3, 4)).sqrt().max() / self.config.sigma).clamp(0, 1))

    def update(self, state: MotionNoiseState, frames: torch.Tensor) -> NoiseLevel:
        """Feed a stream's next chunk (pixels [B, C, T, H, W] in [-1, 1]) and get its noise level."""
        if frames.ndim != 5 or frames.shape[2] == 0:
            raise ValueError(f"frames must be [B, C, T>=1, H, W], got {tuple(frames.shape)}")
        cfg = self.config
        first = state.last_frame is None
        if first or not cfg.enabled:
            scale, motion = cfg.s_init, 0.0
        else:
            window = torch.cat([state.last_frame.to(frames.device, frames.dtype), frames], dim=2)
            motion = self.motion_of(window)
            # Same operation order as upstream, so t0 = int(1000·s) − 100 truncates identically.
            scale = (cfg.s_init - cfg.motion_range * motion) * (1.0 - cfg.prev_weight) + state.s_prev * cfg.prev_weight
        state.s_prev = scale
        state.last_frame = frames[:, :, -1:].detach().clone()
        state.chunks += 1
        return NoiseLevel(scale=scale, timestep=self.timestep_for(scale), motion=motion)
