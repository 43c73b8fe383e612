"""Encoder tests: CPU, tiny random configs, fp32; keep them to the 2 cores CI has."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import AutoencoderKLWan

torch.set_num_threads(2)

# A tiny Wan2.1-shaped VAE: 4 stages (8× spatial), temporal downsample [False, True, True] (4× temporal).
TINY_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 2, 2, 2],
    "num_res_blocks": 1,
    "latents_mean": [0.3, -0.7, 0.1, 1.2],
    "latents_std": [1.9, 0.6, 2.4, 1.3],
}


def make_tiny_vae(seed: int = 0, dtype: torch.dtype = torch.float32) -> AutoencoderKLWan:
    """A tiny VAE with every weight perturbed (so no parameter is at a trivial init value)."""
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**TINY_VAE_CONFIG).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae if dtype == torch.float32 else vae.to(dtype)


def make_video(frames: int, seed: int, height: int = 16, width: int = 24) -> torch.Tensor:
    """Smooth-ish random video in [-1, 1], NCTHW."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, 1, height, width, generator=g) * 2 - 1
    drift = torch.randn(1, 3, frames, height, width, generator=g).cumsum(2) * 0.1
    return (base + drift).clamp(-1, 1)


@pytest.fixture(scope="session")
def tiny_vae() -> AutoencoderKLWan:
    return make_tiny_vae()


@pytest.fixture(scope="session")
def vae_factory():
    return make_tiny_vae


@pytest.fixture(scope="session")
def video():
    return make_video


@pytest.fixture(scope="session")
def tiny_vae_config() -> dict[str, Any]:
    return dict(TINY_VAE_CONFIG)
