"""Flow-matching scheduler (the DiffSynth ``FlowMatchScheduler`` that CausVid, Self-Forcing and SDv2 use)
and the deterministic noise draws.

Sigma table: ``linspace(1, 0, 1001)[:-1]`` (``extra_one_step``, sigma_min 0), warped by
``shift·σ / (1 + (shift−1)·σ)``, timesteps = 1000·σ. σ(t) is the table sigma at the *nearest* table
timestep. All of this is host-side Python (timesteps are host values), so no device sync is needed.
x0 = x_t − σ(t)·v; moving to the next step re-noises with fresh noise: x = (1−σ)·x0 + σ·ε.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from proto.spec import SDV2_STEPS, first_timestep  # defined with the stream's other limits
from wan.device import host_tensor

__all__ = ["SDV2_STEPS", "FlowMatchScheduler", "draw_noise", "first_timestep"]


class FlowMatchScheduler:
    def __init__(self, shift: float = 8.0, num_train_timesteps: int = 1000) -> None:
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        base = torch.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]  # float32, as in the reference
        sigmas = shift * base / (1 + (shift - 1) * base)
        self.sigmas: list[float] = sigmas.tolist()
        self.timesteps: list[float] = (sigmas * num_train_timesteps).tolist()
        self._ascending = self.timesteps[::-1]

    def sigma(self, t: float) -> float:
        """σ at the table timestep nearest to t (ties go to the earlier, i.e. larger, table entry)."""
        asc = self._ascending
        j = bisect.bisect_left(asc, t)
        best = None
        for cand in (j - 1, j):
            if 0 <= cand < len(asc) and (best is None or abs(asc[cand] - t) <= abs(asc[best] - t)):
                best = cand
        assert best is not None
        return self.sigmas[len(asc) - 1 - best]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: float | Sequence[float]) -> torch.Tensor:
        """(1−σ)·x0 + σ·ε with σ = σ(t); t is one value or one per batch row."""
        if isinstance(t, (int, float)):
            s = self.sigma(t)
            return (1 - s) * x0 + s * noise
        sig = host_tensor([self.sigma(v) for v in t], x0.dtype, x0.device)
        sig = sig.view(-1, *([1] * (x0.dim() - 1)))
        return (1 - sig) * x0 + sig * noise


def draw_noise(
    shape: Sequence[int],
    stream_seed: int,
    chunk: int,
    step: int,
    purpose: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise that is a pure function of (stream seed, chunk, step, purpose).

    Drawn on the CPU so that the same stream gives the same noise on any device and in any process layout;
    moved with a pinned, non-blocking copy on CUDA.
    """
    from proto.clock import noise_seed  # imported here: proto's package init pulls in the wire codec

    gen = torch.Generator().manual_seed(noise_seed(stream_seed, chunk, step, purpose))
    noise = torch.randn(tuple(shape), generator=gen, dtype=torch.float32).to(dtype)
    device = torch.device(device)
    if device.type == "cuda":
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)
