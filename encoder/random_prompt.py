"""The prompt encoder of ``model.random_weights`` (services/model_source.py): umT5-XXL's shape without umT5.

A random umT5-XXL would be 5.7 B parameters drawn at every start for noise; the DiT only needs embeddings of the
right shape. As in ``bench/pipeline_local.py``, a prompt's embedding is random: ``[1, max_length, dim]`` drawn from
the prompt's hash (the same prompt, the same embedding, in every process), rows past its token count zeroed as
umT5's padding is, so ``trim_padding`` and the message sizes behave as with the real encoder.
"""

from __future__ import annotations

import torch

from encoder.prompt import MAX_PROMPT_TOKENS, clean_prompt, prompt_hash

__all__ = ["RandomPromptEncoder"]


class RandomPromptEncoder:
    """``PromptEncoder``'s interface (encode, token_count, clear_cache, dim), embeddings drawn per prompt."""

    def __init__(self, dim: int = 4096, max_length: int = MAX_PROMPT_TOKENS, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.max_length = max_length
        self.seed = seed
        self.dtype = dtype
        self.device = torch.device(device)

    def token_count(self, prompt: str) -> int:
        """Words + EOS, at most ``max_length`` (a stand-in for the tokenizer's count)."""
        return min(self.max_length, len(clean_prompt(prompt).split()) + 1)

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.seed << 32) ^ int(prompt_hash(prompt)[:8], 16))
        emb = torch.zeros(1, self.max_length, self.dim)
        n = self.token_count(prompt)
        emb[0, :n] = torch.randn(n, self.dim, generator=gen) * 0.1
        return emb.to(device=self.device, dtype=self.dtype)

    def clear_cache(self) -> None:
        """Nothing is cached (drawing is as cheap as a lookup)."""
