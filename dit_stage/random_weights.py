"""Random DiT weights for any preset, built block by block: a stage of a ring builds only its own blocks and gets
exactly what a single process building the whole model gets (``model.random_weights``, benchmarks only).

The tiny preset's model (``make_tiny_dit``) is drawn whole and sliced: cheap at that size, wasteful at 1.3B/14B
(a stage would allocate and draw every block of the model). Here each module draws from its own generator, seeded
from (seed, module name): ``blocks.{i}`` for block i (the global index), the embeddings and the head by name. The
draws run on the target device, so stages on the same device type agree bit for bit (a CUDA and a CPU generator
draw different numbers).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from dit_stage.model import CausalWanDiT, init_weights_
from wan.config import WanDiTConfig

__all__ = ["RANDOM_STD", "module_seed", "random_dit"]

RANDOM_STD = 0.02
"""Weight std of the random presets (``init_weights_``' default, as ``bench/dit.py`` draws them)."""


def module_seed(seed: int, name: str) -> int:
    """The seed of one module's draws: the same in every process whatever else it builds."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(), "little") >> 1


def random_dit(config: WanDiTConfig, block_range: tuple[int, int] | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> CausalWanDiT:
    """Blocks [a, b) (default: all) of a random DiT of ``config``, drawn per module (module docstring)."""
    device = torch.device(device)
    with torch.device(device):
        model = CausalWanDiT(config, block_range)
    model = model.to(dtype)
    modules: list[tuple[str, nn.Module]] = [(f"blocks.{i}", blk) for i, blk in model.blocks.items()]
    modules += [(name, m) for name, m in model.named_children() if name != "blocks" and m is not None]
    for name, module in modules:
        gen = torch.Generator(device=device).manual_seed(module_seed(seed, name))
        init_weights_(module, std=RANDOM_STD, generator=gen)
    return model.eval()
