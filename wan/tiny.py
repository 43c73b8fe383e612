"""Tiny random Wan VAE, umT5 and tokenizer built in-process: the ``preset="tiny"`` models of ingest, the decoder
and the pipeline, and the test suites' models (the tiny DiT is ``dit_stage.model.make_tiny_dit``).

Deterministic from a seed, no downloads, CPU-friendly. Shapes fit together: the tiny DiT
(``WanDiTConfig.tiny``: 4 latent channels, 32-d text, 16 text tokens) reads the tiny VAE's 4-channel latents
and the tiny umT5's 32-d embeddings (truncated/padded to 16 tokens). The output is noise-like restyling;
it exercises every code path, nothing more.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLWan
from transformers import T5Tokenizer, UMT5Config, UMT5EncoderModel

__all__ = [
    "TINY_T5_CONFIG",
    "TINY_VAE_CONFIG",
    "TINY_WORDS",
    "make_tiny_t5",
    "make_tiny_tokenizer",
    "make_tiny_vae",
]

# A tiny Wan2.1-shaped VAE: 4 stages (8× spatial), temporal downsample [False, True, True] (4× temporal).
TINY_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 2, 2, 2],
    "num_res_blocks": 1,
    "latents_mean": [0.3, -0.7, 0.1, 1.2],
    "latents_std": [1.9, 0.6, 2.4, 1.3],
}

TINY_T5_CONFIG: dict[str, Any] = {
    "vocab_size": 128,
    "d_model": 32,
    "d_kv": 8,
    "num_heads": 4,
    "d_ff": 64,
    "num_layers": 2,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
    "tie_word_embeddings": False,
}

TINY_WORDS = ["a", "cat", "dog", "on", "the", "mat", "red", "blue", "sky", "in", "fish", "and", '"', "'", "&"]


def make_tiny_vae(seed: int = 0, dtype: torch.dtype = torch.float32) -> AutoencoderKLWan:
    """A tiny VAE with every weight perturbed (so no parameter is at a trivial init value).

    Seeds the global RNG inside a fork, so callers' random state is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**TINY_VAE_CONFIG).eval()
        with torch.no_grad():
            for p in vae.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return vae if dtype == torch.float32 else vae.to(dtype)


def make_tiny_tokenizer() -> T5Tokenizer:
    """A Unigram tokenizer over a handful of words plus single letters (any lower-case text tokenizes)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -3.0) for w in TINY_WORDS] + [(c, -6.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def make_tiny_t5(seed: int = 0) -> UMT5EncoderModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UMT5EncoderModel(UMT5Config(**TINY_T5_CONFIG)).eval()


