"""One-GPU mode's memory budget: what ingest, one stage holding every block and the decoder need on one GPU.

``rheo up --device cuda`` checks it against ``torch.cuda.mem_get_info`` before starting anything, so a stack that
cannot fit says so in one line instead of failing with an out-of-memory error minutes later in one of its
processes. An estimate from the configuration (model sizes, stream size, steps, KV window, streams); the per-stream
VAE cache sizes are model.md §4.4's (measured at 512², bf16), scaled by pixels and element size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from proto.spec import latent_hw
from services.config import Settings
from wan.config import WanDiTConfig

GiB = 1024**3
WAN_VAE_PARAMS = 127_000_000
UMT5_XXL_PARAMS = 5_680_000_000
CUDA_CONTEXT_BYTES = GiB // 2
"""CUDA context + allocator reserve per process (ingest, the stage, the decoder)."""
# Per stream at 512×512 in bf16 (model.md §4.4): Wan encoder cache, Wan decoder cache, TAEHV memories.
VAE_ENC_CACHE_512 = int(0.74e9)
VAE_DEC_CACHE_512 = int(1.24e9)
TAEHV_CACHE_512 = int(0.04e9)
WORKSPACE_FRACTION = 0.10
"""Activations and allocator fragmentation, on top of everything counted."""


@dataclass(frozen=True)
class MemoryBudget:
    parts: dict[str, int]
    streams: int

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()) * (1 + WORKSPACE_FRACTION))

    def describe(self) -> str:
        items = ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.parts.items() if v)
        return f"≈ {self.total / GiB:.1f} GiB ({items}; +{WORKSPACE_FRACTION:.0%} workspace)"


def dit_params(cfg: WanDiTConfig) -> int:
    """Parameters of the Wan DiT: per block self- and cross-attention (8·dim²) and the FFN, plus the embeddings."""
    per_block = 8 * cfg.dim * cfg.dim + 2 * cfg.dim * cfg.ffn_dim
    return cfg.num_layers * per_block + cfg.text_dim * cfg.dim + cfg.dim * cfg.dim


def one_gpu_budget(settings: Settings, model_dir: Path | None, streams: int) -> MemoryBudget:
    """What one GPU holds in one-GPU mode for ``streams`` streams at the configured size and steps."""
    weights = model_dir is not None
    preset = settings.model.preset if settings.model.preset != "tiny" or not weights else "1.3b"
    # model.random_weights at a real preset: the real VAE's size, a random embedding in place of umT5
    real_vae = weights or (settings.model.random_weights and preset != "tiny")
    cfg = WanDiTConfig.named(preset)
    elem = 4 if settings.model.dtype == "float32" else 2
    s = settings.stream
    pixels = s.width * s.height / (512 * 512)
    tokens = cfg.tokens_per_frame(*latent_hw(s.height, s.width))
    ring = settings.dit_stage
    kv = cfg.num_layers * 2 * s.steps * ring.kv_window * tokens * cfg.dim * elem
    scale = pixels * elem / 2 * (1.0 if real_vae else 8 / 96)  # the tiny VAE: base_dim 8 instead of 96
    taehv = settings.encoder.vae == "taehv"
    enc_cache = TAEHV_CACHE_512 if taehv else VAE_ENC_CACHE_512
    dec_cache = TAEHV_CACHE_512 if taehv or settings.decoder.decoder == "taehv" else VAE_DEC_CACHE_512
    parts = {
        "DiT": dit_params(cfg) * elem,
        "VAE ×2": 2 * WAN_VAE_PARAMS * elem if real_vae else 0,  # ingest's and the decoder's
        "umT5": UMT5_XXL_PARAMS * elem if weights else 0,
        f"KV ×{streams}": streams * kv,
        f"VAE caches ×{streams}": int(streams * (enc_cache + dec_cache) * scale),
        "CUDA contexts ×3": 3 * CUDA_CONTEXT_BYTES,
    }
    return MemoryBudget(parts, streams)


def check_one_gpu(budget: MemoryBudget, free: int, total: int, device: str) -> str | None:
    """None when the budget fits the GPU's free memory; else the one-line reason (what to lower)."""
    if budget.total <= free:
        return None
    return (f"--device {device}: one-GPU mode needs {budget.describe()} for {budget.streams} streams, but {device} "
            f"has {free / GiB:.1f} of {total / GiB:.1f} GiB free; lower --streams, the stream size or steps, or use "
            "encoder.vae: taehv")
