"""3D rotary position embedding of Wan2.1 with an absolute temporal offset.

head_dim is split over (t, h, w) as Wan does (44/42/42 for 128); each axis has its own frequency table
ω_j = 10000^(−2j/dim_axis) over ``max_pos`` positions. Rotation acts on interleaved pairs (x0,x1),(x2,x3)…
The temporal position of a chunk's frame i is ``rope_start + i`` (after the clock's refresh rule); h/w
positions restart at 0 in every frame. Keys are cached after rotation, so nothing is ever re-rotated.
"""

from __future__ import annotations

import torch


class RopeTable:
    """Per-axis cos/sin tables (computed in float64, stored in ``dtype``) on one device."""

    def __init__(
        self,
        axis_dims: tuple[int, int, int],
        max_pos: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        theta: float = 10000.0,
    ) -> None:
        self.axis_dims = axis_dims
        self.max_pos = max_pos
        self.dtype = dtype
        pos = torch.arange(max_pos, dtype=torch.float64)
        self.cos: list[torch.Tensor] = []
        self.sin: list[torch.Tensor] = []
        for dim in axis_dims:
            omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)
            angle = torch.outer(pos, omega)
            self.cos.append(angle.cos().to(device=device, dtype=dtype))
            self.sin.append(angle.sin().to(device=device, dtype=dtype))

    def cos_sin(
        self, rope_starts: torch.Tensor, frames: int, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [N, frames·height·width, 1, head_dim/2] for per-item temporal starts [N]."""
        n = rope_starts.shape[0]
        t_idx = rope_starts[:, None] + torch.arange(frames, device=rope_starts.device)
        parts_cos, parts_sin = [], []
        for table, out in ((self.cos, parts_cos), (self.sin, parts_sin)):
            t = table[0][t_idx].view(n, frames, 1, 1, -1).expand(n, frames, height, width, -1)
            h = table[1][:height].view(1, 1, height, 1, -1).expand(n, frames, height, width, -1)
            w = table[2][:width].view(1, 1, 1, width, -1).expand(n, frames, height, width, -1)
            out.append(torch.cat([t, h, w], dim=-1).reshape(n, frames * height * width, 1, -1))
        return parts_cos[0], parts_sin[0]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [N, L, H, D] by cos/sin [N, L, 1, D/2]; computed in the table dtype."""
    xf = x.to(cos.dtype).unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
