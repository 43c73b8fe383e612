"""Attention backends: torch SDPA everywhere, flash-attn's ``flash_attn_with_kvcache`` on CUDA when installed.

Both take the [N, L, H, D] layout the KV cache uses. Valid keys are always a prefix of the cache
(``key_lengths`` per batch row, or None when every row is full), which is what flash-attn's
``cache_seqlens`` expresses; SDPA gets the equivalent boolean mask. No host syncs: lengths are device
tensors made from host-side ints by a pinned, non-blocking copy.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # optional gpu extra
    from flash_attn import flash_attn_with_kvcache as _flash_kvcache
except ImportError:  # pragma: no cover - depends on the environment
    _flash_kvcache = None

_BACKEND_ENV = "RHEO_ATTENTION"


def flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        _flash_kvcache is not None
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and os.environ.get(_BACKEND_ENV, "auto") != "sdpa"
    )


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal attention of q [N, Lq, H, D] over k, v [N, Lk, H, D]; returns [N, Lq, H, D].

    ``key_lengths`` [N] (int32) masks keys at positions ≥ length; k/v may have a stride-0 batch dim.
    """
    if flash_available(q.device, q.dtype) and k.stride(0) != 0:
        seqlens = key_lengths if key_lengths is not None else None
        return _flash_kvcache(q, k, v, cache_seqlens=seqlens, causal=False)
    mask = None
    if key_lengths is not None:
        positions = torch.arange(k.shape[1], device=k.device)
        mask = (positions[None, :] < key_lengths[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)
