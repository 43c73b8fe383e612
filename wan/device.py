"""Where and in what precision the Wan models run: ``model.device`` / ``model.dtype`` resolution, and small
host-value tensors moved to the device without a host sync.

Every process that builds a model (ingest's VAE encoder and umT5, the DiT stages, the decoder, ``rheo run``)
resolves ``auto`` the same way here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["host_tensor", "resolve_device", "resolve_dtype"]


def resolve_device(device: str = "auto") -> torch.device:
    """``model.device``: ``auto`` is CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``model.dtype``: ``auto`` is bf16 on CUDA, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def host_tensor(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor from host values without a host sync (pinned, non-blocking copy on CUDA)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
