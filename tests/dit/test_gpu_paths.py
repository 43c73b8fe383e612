"""GPU-only checks (skipped without CUDA) of the served path's GPU branches: the link's staged copies (pinned,
reused buffers on a copy stream), the batched Stream-VAE in bf16, ``encoder.compile`` and the one-GPU budget.

The functions take no fixtures so they can also be run directly on a lent GPU machine without pytest.
"""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from encoder.vae import StreamVAE
from encoder.vae_loading import compile_stream_vae
from proto.codec import tensor_bytes
from services.link_staging import LinkStaging
from wan.tiny import make_tiny_vae

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BF16_ATOL = 3e-2
"""Batched vs per-stream in bf16: the same math with other GEMM/conv tilings (fp32 on CPU agrees to 2e-6)."""


def test_link_staging_copies_asynchronously_into_reused_pinned_buffers() -> None:
    dev = torch.device("cuda")
    staging = LinkStaging.for_device(dev)
    assert staging is not None and staging is LinkStaging.for_device(torch.device("cuda", 0))
    before = staging.pool.allocations
    held = []
    for step in range(6):
        y = torch.full((4, 256, 64), float(step), device=dev, dtype=torch.bfloat16) * 2  # work on the compute stream
        out, done = staging.to_host_start([y])
        done.synchronize()
        (host,) = out
        assert host.is_pinned() and host.device.type == "cpu" and torch.equal(host, y.cpu())
        held.append(tensor_bytes(host))  # the link holds the bytes until acknowledged ...
        if len(held) > 2:
            held.pop(0)  # ... then lets go
    assert staging.pool.allocations - before == 3 and staging.pool.reuses >= 3
    (back,) = staging.to_device([host])
    assert back.device.type == "cuda" and torch.equal(back.cpu(), host)
    (awaited,) = asyncio.run(staging.to_host([back]))
    assert torch.equal(awaited, host)


def test_batched_vae_matches_per_stream_in_bf16() -> None:
    sv = StreamVAE(make_tiny_vae(0, torch.bfloat16).cuda())
    g = torch.Generator().manual_seed(0)
    states, chunks = [], []
    for k in range(3):
        st = sv.new_state()
        for _ in range(k + 1):
            sv.encode(st, (torch.rand(1, 3, 5 if st.frames_encoded == 0 else 4, 64, 64, generator=g) * 2 - 1)
                      .to("cuda", torch.bfloat16))
        states.append(st)
        chunks.append((torch.rand(1, 3, 4, 64, 64, generator=g) * 2 - 1).to("cuda", torch.bfloat16))
    eager = [sv.encode(s, c) for s, c in zip(copy.deepcopy(states), chunks, strict=True)]
    for b, e in zip(sv.encode_batch(states, chunks), eager, strict=True):
        assert isinstance(b, torch.Tensor)
        torch.testing.assert_close(b.float(), e.float(), rtol=0, atol=BF16_ATOL)


@pytest.mark.slow
def test_compiled_vae_matches_eager() -> None:
    vae = make_tiny_vae(0).cuda()
    eager, compiled = StreamVAE(vae), StreamVAE(copy.deepcopy(vae))
    assert compile_stream_vae(compiled)
    x = torch.rand(1, 3, 9, 64, 64, device="cuda") * 2 - 1
    se, sc = eager.new_state(), compiled.new_state()
    for a, b in ((0, 5), (5, 9)):
        torch.testing.assert_close(compiled.encode(sc, x[:, :, a:b]), eager.encode(se, x[:, :, a:b]),
                                   rtol=1e-3, atol=1e-3)


def test_one_gpu_budget_of_the_tiny_stack_fits() -> None:
    from services.config import Settings
    from services.up import one_gpu_problem

    assert one_gpu_problem("cuda", Settings(), None, 1) is None
    big = one_gpu_problem("cuda", Settings(), __import__("pathlib").Path("/models"), 10_000)
    assert big is not None and "one-GPU mode needs" in big


def test_random_weights_on_cuda_agree_between_stages() -> None:
    """``model.random_weights`` on a GPU: two stages drawing an overlapping block get it bit for bit (CUDA
    generators, per-block seeds; the CPU twin is tests/dit/test_random_weights.py)."""
    from dit_stage.random_weights import random_dit
    from wan.config import WanDiTConfig

    cfg = WanDiTConfig.named("1.3b")
    a = random_dit(cfg, (0, 2), dtype=torch.bfloat16, device="cuda")
    b = random_dit(cfg, (1, 3), dtype=torch.bfloat16, device="cuda")
    sa, sb = a.blocks["1"].state_dict(), b.blocks["1"].state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(a.blocks["0"].ffn[0].weight, a.blocks["1"].ffn[0].weight)
