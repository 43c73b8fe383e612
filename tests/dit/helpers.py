"""Shared helpers of the DiT tests: a tiny diffusers reference and the same weights in our model."""

from __future__ import annotations

import itertools
import math

import torch

from dit_stage.loading import diffusers_to_original
from dit_stage.model import CausalWanDiT
from wan.config import WanDiTConfig

LATENT_HW = (4, 6)  # → 2×3 tokens per latent frame
TOKENS = 6


def tiny_config(num_layers: int = 3) -> WanDiTConfig:
    return WanDiTConfig.tiny(num_layers)


def make_reference(num_layers: int = 3, seed: int = 0):
    """diffusers' WanTransformer3DModel with the tiny shape, all weights perturbed, in float64."""
    from diffusers import WanTransformer3DModel

    cfg = tiny_config(num_layers)
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        rope_max_seq_len=cfg.rope_max_seq_len,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    # diffusers computes the timestep sinusoid in fp32, the one op of its forward below fp64 here; Wan (and
    # our model) computes it in float64. Lift it so the comparison floor stays ~3e-7, not ~4e-6.
    ref.condition_embedder.timesteps_proj = _Float64Sinusoid(cfg.freq_dim)
    return ref.double().eval()


class _Float64Sinusoid(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.half = dim // 2

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        exponent = -math.log(10000.0) * torch.arange(self.half, dtype=torch.float64) / self.half
        angle = t.double()[:, None] * torch.exp(exponent)[None]
        return torch.cat([angle.cos(), angle.sin()], dim=-1)


def frame_mask(frames: int, nfb: int = 1, sink: int | None = None, window: int | None = None) -> torch.Tensor:
    """Block-causal [F, F] frame mask (query frame, key frame), optionally sink + rolling window (in frames,
    the current block included)."""
    q = torch.arange(frames)[:, None]
    k = torch.arange(frames)[None, :]
    end = (q // nfb + 1) * nfb
    mask = k < end
    if window is not None:
        mask &= (k < (sink or 0)) | (k >= end - window)
    return mask


def reference_forward(ref, latents: torch.Tensor, frame_t, ctx: torch.Tensor, mask) -> torch.Tensor:
    """diffusers forward with per-token timesteps and a frame-level self-attention mask (model.md §6.1);
    ``mask`` is one [F, F] mask or a list of one per block."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class MaskedProcessor(WanAttnProcessor):
        def __init__(self, token_mask: torch.Tensor) -> None:
            super().__init__()
            self.token_mask = token_mask

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            if encoder_hidden_states is None:
                attention_mask = self.token_mask
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

    masks = mask if isinstance(mask, list) else [mask] * len(ref.blocks)
    for blk, m in zip(ref.blocks, masks, strict=True):
        blk.attn1.set_processor(MaskedProcessor(m.repeat_interleave(TOKENS, 0).repeat_interleave(TOKENS, 1)))
    t = torch.as_tensor(frame_t, dtype=torch.float64).repeat_interleave(TOKENS)[None]
    with torch.no_grad():
        return ref(latents, t, ctx).sample


def ours_from(ref, block_range: tuple[int, int] | None = None, dtype=torch.float64) -> CausalWanDiT:
    cfg = tiny_config(len(ref.blocks))
    model = CausalWanDiT(cfg, block_range)
    sd = diffusers_to_original(ref.state_dict())
    keys = set(model.state_dict())
    model.load_state_dict({k: v for k, v in sd.items() if k in keys}, strict=True)
    return model.to(dtype).eval()


def random_model(num_layers: int = 3, seed: int = 0, dtype=torch.float64) -> CausalWanDiT:
    """Our model with random weights (no diffusers import: cheaper for the non-reference tests)."""
    from dit_stage.model import init_weights_

    model = CausalWanDiT(tiny_config(num_layers))
    init_weights_(model, std=0.2, generator=torch.Generator().manual_seed(seed))
    return model.to(dtype).eval()


def split_models(full: CausalWanDiT, cuts: list[int]) -> list[CausalWanDiT]:
    """Stage models over [0,c1), [c1,c2), … sharing ``full``'s weights values."""
    sd = full.state_dict()
    bounds = [0, *cuts, full.config.num_layers]
    stages = []
    for a, b in itertools.pairwise(bounds):
        m = CausalWanDiT(full.config, (a, b), fp32_modulation=full.fp32_modulation)
        keys = set(m.state_dict())
        m.load_state_dict({k: v for k, v in sd.items() if k in keys}, strict=True)
        stages.append(m.to(full.dtype).eval())
    return stages


def context(seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    cfg = tiny_config()
    return torch.randn(1, cfg.text_len, cfg.text_dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)
