"""This stage's model: blocks [a, b) of the DiT, from the configured checkpoint, the tiny random model, or random
weights at a real preset (``model.random_weights``: services/model_source.py)."""

from __future__ import annotations

from dit_stage.loading import find_causal_checkpoint, load_dit
from dit_stage.model import CausalWanDiT, make_tiny_dit
from dit_stage.random_weights import random_dit
from services.config import Settings
from services.model_source import model_source
from services.runtime import ServiceStartError
from wan.config import WanDiTConfig
from wan.device import resolve_device, resolve_dtype

__all__ = ["load_stage_model", "slice_stage"]


def slice_stage(full: CausalWanDiT, block_range: tuple[int, int]) -> CausalWanDiT:
    """Blocks [a, b) of ``full`` as a stage model with identical weights (embeddings/head as the range needs)."""
    stage = CausalWanDiT(full.config, block_range, fp32_modulation=full.fp32_modulation)
    keys = set(stage.state_dict())
    stage.load_state_dict({k: v for k, v in full.state_dict().items() if k in keys}, strict=True)
    return stage.to(full.dtype).eval()


def load_stage_model(settings: Settings, block_range: tuple[int, int], num_blocks: int) -> CausalWanDiT:
    """This stage's blocks: from ``model.model_dir`` (causal checkpoint), the tiny random DiT when unset, or (a
    real preset, ``model.random_weights``) random weights drawn for these blocks only.

    The tiny model is built whole from ``dit_stage.tiny_seed`` and sliced; random weights are drawn per block from
    the same seed (``random_dit``): either way blocks [a, b) equal those of the single-process model whatever the
    split.
    """
    device = resolve_device(settings.model.device)
    dtype = resolve_dtype(settings.model.dtype, device)
    model_dir = settings.model.model_dir
    source = model_source(settings.model, "dit stage")
    if source == "tiny":
        full = make_tiny_dit(settings.dit_stage.tiny_seed, num_blocks, dtype)
        return slice_stage(full, block_range).to(device)
    if source == "random":
        config = WanDiTConfig.named(settings.model.preset)
        if config.num_layers != num_blocks:
            raise ServiceStartError(f"block map has {num_blocks} blocks, preset {settings.model.preset} has "
                                    f"{config.num_layers}")
        return random_dit(config, block_range, settings.dit_stage.tiny_seed, dtype, device)
    assert model_dir is not None
    ckpt = settings.model.checkpoint or find_causal_checkpoint(model_dir)
    if ckpt is None or not ckpt.is_file():
        raise ServiceStartError(f"no causal DiT checkpoint in {model_dir} (set model.checkpoint)")
    model = load_dit(ckpt, None, block_range, dtype=dtype, device=device).eval()
    if model.config.num_layers != num_blocks:
        raise ServiceStartError(f"block map has {num_blocks} blocks, checkpoint {ckpt} has {model.config.num_layers}")
    return model
