"""Building a StreamPipeline: from a model directory (real weights) or the tiny random preset.

Model directory (the Wan2.1-T2V base folder, as StreamDiffusionV2 expects it; README "Model weights"):

    <model dir>/
      Wan2.1_VAE.pth                          (or vae/ in the diffusers layout)
      models_t5_umt5-xxl-enc-bf16.pth         (or text_encoder/ in the diffusers layout)
      google/umt5-xxl/                        tokenizer (or tokenizer/)
      config.json                             the DiT's shape (Wan keys: dim, num_heads, num_layers, ...)
      diffusion_pytorch_model*.safetensors    base (bidirectional) DiT weights, only used without a causal checkpoint
      causal/model.pt                         the causal checkpoint (SDv2 / CausVid / Self-Forcing), unless given

Nothing is ever downloaded; torch.load runs with weights_only=True.
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path

import torch

from dit_stage.forward import ForwardMode
from dit_stage.loading import (
    CAUSAL_CHECKPOINT_NAMES,
    find_causal_checkpoint,
    load_dit,
)
from dit_stage.model import make_tiny_dit
from encoder.prompt import PromptEncoder
from encoder.vae_loading import (
    DIFFUSERS_VAE_DIR,
    TAEHV_FILE,
    WAN_VAE_FILE,
    StreamVAEConfig,
    load_stream_vae,
    tiny_stream_vae,
)
from pipeline.pipeline import FixedEmbedding, PipelineConfig, StreamPipeline
from wan.config import WanDiTConfig
from wan.device import resolve_device, resolve_dtype
from wan.tiny import make_tiny_t5, make_tiny_tokenizer

__all__ = [
    "FixedEmbedding",
    "ModelDirError",
    "build_tiny_pipeline",
    "load_pipeline",
]

log = logging.getLogger(__name__)

_BASE_DIT_GLOBS = ("diffusion_pytorch_model*.safetensors.index.json", "diffusion_pytorch_model*.safetensors")
# Wan's config.json names → WanDiTConfig fields (diffusers names too, for a transformer/ folder's config).
_CONFIG_ALIASES = {"num_attention_heads": "num_heads", "in_channels": "in_dim", "out_channels": "out_dim"}


class ModelDirError(FileNotFoundError):
    """The model directory lacks something the pipeline needs (the message names the file)."""



def build_tiny_pipeline(
    config: PipelineConfig | None = None,
    *,
    seed: int = 0,
    num_layers: int = 3,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    forward: ForwardMode = "auto",
    vae_config: StreamVAEConfig | None = None,
) -> StreamPipeline:
    """The tiny random preset: tiny DiT + tiny VAE (``vae_config``: the tiny TAEHV either way) + tiny
    umT5/tokenizer, deterministic from ``seed`` (default size 64×64)."""
    config = config or PipelineConfig(width=64, height=64)
    device = torch.device(device)
    dit = make_tiny_dit(seed, num_layers, dtype).to(device)
    vae = tiny_stream_vae(vae_config, seed=seed, dtype=dtype, device=device)
    text = PromptEncoder(make_tiny_t5(seed).to(device), make_tiny_tokenizer(), max_length=dit.config.text_len)
    return StreamPipeline(dit, vae, text, config, forward=forward,
                          description="tiny random model (preset 'tiny', no weights)")



def _dit_config(model_dir: Path) -> WanDiTConfig | None:
    """The DiT shape from ``config.json`` (Wan or diffusers keys); None → inferred from the checkpoint's shapes."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    names = {f.name for f in fields(WanDiTConfig)}
    kw = {}
    for key, value in raw.items():
        key = _CONFIG_ALIASES.get(key, key)
        if key in names:
            kw[key] = tuple(value) if isinstance(value, list) else value
    if "attention_head_dim" in raw and "num_attention_heads" in raw and "dim" not in kw:
        kw["dim"] = raw["attention_head_dim"] * raw["num_attention_heads"]
    try:
        return WanDiTConfig(**kw)
    except TypeError as err:
        raise ModelDirError(f"{path}: not a Wan2.1 DiT config ({err})") from None


def _vae_source(model_dir: Path, vae_config: StreamVAEConfig | None) -> tuple[Path, StreamVAEConfig]:
    """The VAE inside a model dir (``vae/`` or ``Wan2.1_VAE.pth``), or an error naming both; unlike
    ``resolve_vae_path`` it never takes the model dir itself for a VAE folder."""
    cfg = vae_config or StreamVAEConfig()
    if "taehv" in (cfg.decoder, cfg.encoder) and cfg.taehv_path is None:
        cfg = cfg.model_copy(update={"taehv_path": model_dir / TAEHV_FILE})
    for candidate in (model_dir / DIFFUSERS_VAE_DIR, model_dir / WAN_VAE_FILE):
        if (candidate / "config.json").is_file() or candidate.is_file():
            return candidate, cfg
    raise ModelDirError(f"VAE missing: expected {model_dir / WAN_VAE_FILE} or {model_dir / DIFFUSERS_VAE_DIR}/")


def load_pipeline(
    model_dir: str | Path,
    config: PipelineConfig | None = None,
    *,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    vae_config: StreamVAEConfig | None = None,
    text_encoder: object | None = None,
    forward: ForwardMode = "auto",
) -> StreamPipeline:
    """A pipeline from a Wan2.1 model directory plus a causal DiT checkpoint (see the module docstring)."""
    config = config or PipelineConfig()
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {model_dir} does not exist")
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    dt = resolve_dtype(dtype, dev)
    ckpt = Path(checkpoint) if checkpoint is not None else find_causal_checkpoint(model_dir)
    if ckpt is None:
        base = [p for g in _BASE_DIT_GLOBS for p in sorted(model_dir.glob(g))]
        if not base:
            wanted = ", ".join(str(model_dir / n) for n in CAUSAL_CHECKPOINT_NAMES)
            raise ModelDirError(f"no DiT weights: expected a causal checkpoint ({wanted}) or --checkpoint")
        log.warning("no causal checkpoint in %s: running the base (bidirectional) DiT causally", model_dir)
        ckpt = base[0]
    elif not ckpt.is_file():
        raise ModelDirError(f"causal checkpoint {ckpt} does not exist")
    dit = load_dit(ckpt, _dit_config(model_dir), dtype=dt, device=dev).eval()
    vae = load_stream_vae(*_vae_source(model_dir, vae_config), dtype=dt, device=dev)
    if text_encoder is None:
        text_encoder = PromptEncoder.from_model_dir(model_dir, dtype=dt, device=dev, max_length=dit.config.text_len)
    return StreamPipeline(
        dit, vae, text_encoder, config, forward=forward, description=f"weights from {model_dir} ({ckpt.name})"
    )
