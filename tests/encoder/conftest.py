"""Encoder tests: CPU, tiny random configs, fp32; keep them to the 2 cores CI has."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import AutoencoderKLWan

from wan.tiny import TINY_VAE_CONFIG, make_tiny_vae  # the tiny builders live with the tiny preset

torch.set_num_threads(2)

__all__ = ["TINY_VAE_CONFIG", "make_tiny_vae", "make_video"]

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
