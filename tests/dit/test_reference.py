"""Chunk-by-chunk streaming vs diffusers' full-sequence forward with a block-causal (+ sink/window) mask.

The reference is diffusers' WanTransformer3DModel (fp64, per-token timesteps, masked self-attention);
our model shares only its parameters. Tolerance 1e-5 (model.md §6.1); the negative controls miss by >1e-3.
"""

from __future__ import annotations

import pytest
import torch

from dit_stage.model import CausalWanDiT
from dit_stage.state import SlotItem

from .helpers import LATENT_HW, context, frame_mask, make_reference, ours_from, reference_forward

ATOL = 1e-5
C = 4


@pytest.fixture(scope="module")
def ref():
    return make_reference()


@pytest.fixture(scope="module")
def ours(ref) -> CausalWanDiT:
    return ours_from(ref)


def _latents(frames: int, seed: int) -> torch.Tensor:
    return torch.randn(1, C, frames, *LATENT_HW, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _teacher_forced(ours, ctx, x, t, nfb: int, sink: int, window: int, rope_zero: bool = False) -> torch.Tensor:
    """Each chunk once, at its own per-frame timesteps; outputs concatenated over frames."""
    frames = x.shape[2]
    state = ours.new_state("s", 1, LATENT_HW, window=window, sink=sink)
    ours.set_prompt(state, ctx)
    outs = []
    for a in range(0, frames, nfb):
        item = SlotItem(state, 0, a, 0 if rope_zero else a, tuple(t[a : a + nfb].tolist()))
        outs.append(ours(x[:, :, a : a + nfb], [item], ours.grid_of(nfb, *LATENT_HW)))
    return torch.cat(outs, dim=2)


def test_plain_chunks_match_block_causal_reference(ref, ours):
    """[1] 6 frames, 3 chunks of 2, random per-frame timesteps, cache large enough to hold everything."""
    ctx, x = context(), _latents(6, 1)
    t = torch.rand(6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1000
    want = reference_forward(ref, x, t, ctx, frame_mask(6, nfb=2))
    got = _teacher_forced(ours, ctx, x, t, nfb=2, sink=0, window=6)
    assert (got - want).abs().max() < ATOL


def test_rolling_window_with_sinks_matches_masked_reference(ref, ours):
    """[3] 10 frames one at a time, sink 1, ring of 4 frames: the ring equals the sink+window mask."""
    ctx, x = context(), _latents(10, 3)
    t = torch.rand(10, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 1000
    want = reference_forward(ref, x, t, ctx, frame_mask(10, nfb=1, sink=1, window=3))
    got = _teacher_forced(ours, ctx, x, t, nfb=1, sink=1, window=4)
    assert (got - want).abs().max() < ATOL


def test_negative_control_rope_offset_zero_fails(ref, ours):
    ctx, x = context(), _latents(10, 3)
    t = torch.rand(10, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 1000
    want = reference_forward(ref, x, t, ctx, frame_mask(10, nfb=1, sink=1, window=3))
    got = _teacher_forced(ours, ctx, x, t, nfb=1, sink=1, window=4, rope_zero=True)
    assert (got - want).abs().max() > 1e-3


def _self_forcing(ours, ref, ctx, append: bool) -> float:
    """[2] 3 chunks of 2 frames, 3 denoising steps each + a clean pass at t=0. Step k of chunk j must equal
    the reference on [clean prefix @ 0 ‖ noisy chunk @ t_k]. Returns the worst difference."""
    steps = (1000.0, 750.0, 500.0)
    nfb, chunks = 2, 3
    state = ours.new_state("s", 1, LATENT_HW, window=nfb * chunks + 2 * len(steps) * chunks, sink=0)
    ours.set_prompt(state, ctx)
    grid = ours.grid_of(nfb, *LATENT_HW)
    clean: list[torch.Tensor] = []
    worst = 0.0
    next_frame = 0  # where the "append" control writes
    for j in range(chunks):
        a = j * nfb
        for k, t in enumerate(steps):
            x = _latents(nfb, 100 + 10 * j + k)
            frame = a if not append else next_frame
            if append:
                next_frame += nfb
            elif k == 0:
                next_frame = a + nfb
            got = ours(x, [SlotItem(state, 0, frame, a, t)], grid)
            seq = torch.cat([*clean, x], dim=2)
            frame_t = [0.0] * a + [t] * nfb
            want = reference_forward(ref, seq, frame_t, ctx, frame_mask(a + nfb, nfb=nfb))[:, :, a:]
            worst = max(worst, float((got - want).abs().max()))
        x0 = _latents(nfb, 200 + j)
        frame = a if not append else next_frame
        if append:
            next_frame += nfb
            ours(x0, [SlotItem(state, 0, frame, a, 0.0)], grid)
        else:
            ours(x0, [SlotItem(state, 0, frame, a, 0.0, clean=True)], grid)
        clean.append(x0)
    return worst


def test_multi_step_with_clean_pass_matches_reference(ref, ours):
    assert _self_forcing(ours, ref, context(), append=False) < ATOL


def test_negative_control_append_instead_of_overwrite_fails(ref, ours):
    assert _self_forcing(ours, ref, context(), append=True) > 1e-3


def test_stream_batch_slots_each_match_their_own_reference(ref, ours):
    """SDv2 cache mode: slot k runs step k on the chunk that entered k forwards ago and attends to the K/V its
    own forwards wrote. So each slot's outputs equal the masked reference over that slot's own inputs."""
    ctx = context()
    frames, steps = 8, (700.0, 500.0)
    state = ours.new_state("s", 2, LATENT_HW, window=4, sink=1)
    ours.set_prompt(state, ctx)
    grid = ours.grid_of(1, *LATENT_HW)
    inputs = {k: _latents(frames, 20 + k) for k in range(2)}
    outs: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for i in range(frames + 1):
        rows = [(k, i - k) for k in range(2) if 0 <= i - k < frames]
        x = torch.cat([inputs[k][:, :, c : c + 1] for k, c in rows])
        y = ours(x, [SlotItem(state, k, c, c, steps[k]) for k, c in rows], grid)
        for row, (k, _) in enumerate(rows):
            outs[k].append(y[row : row + 1])
    for k in range(2):
        want = reference_forward(ref, inputs[k], [steps[k]] * frames, ctx, frame_mask(frames, 1, sink=1, window=3))
        assert (torch.cat(outs[k], dim=2) - want).abs().max() < ATOL


def test_prompt_sent_as_its_real_tokens_equals_the_zero_padded_reference(ref, ours):
    """A prompt travels as its L real tokens [L, D]; the DiT zero-pads it back to text_len, as Wan and diffusers'
    WanPipeline do before the transformer (the padded rows pass text_embedding and are attended to, unmasked).
    Equal to diffusers on the zero-padded context; diffusers on the L tokens alone differs (negative control)."""
    real = 5
    padded = context(7)
    padded[:, real:] = 0
    trimmed = padded[:, :real]
    x = _latents(4, 8)
    t = torch.rand(4, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 1000
    want = reference_forward(ref, x, t, padded, frame_mask(4, nfb=2))
    got = _teacher_forced(ours, trimmed, x, t, nfb=2, sink=0, window=4)
    assert (got - want).abs().max() < ATOL
    a, b = ours.new_state("a", 1, LATENT_HW, window=4, sink=0), ours.new_state("b", 1, LATENT_HW, window=4, sink=0)
    ours.set_prompt(a, padded)
    ours.set_prompt(b, trimmed)
    assert all(torch.equal(a.cross_k[i], b.cross_k[i]) and torch.equal(a.cross_v[i], b.cross_v[i]) for i in a.cross_k)
    unpadded = reference_forward(ref, x, t, trimmed, frame_mask(4, nfb=2))
    assert (unpadded - want).abs().max() > 1e-3
