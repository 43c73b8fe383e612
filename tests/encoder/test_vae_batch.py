"""Stream-VAE batched across streams (encoder/vae_batch.py): one call equals the per-stream calls, CPU fp32."""

from __future__ import annotations

import copy

import pytest
import torch

from encoder.taehv import TAEHVDecoder, TAEHVEncoder
from encoder.vae import StreamVAE, StreamVAEError

ATOL = 1e-6
DECODE_ATOL = 2e-6  # the decoder's 3-D convs round differently at another batch size (fp64: 1e-12)


def _tiny_taehv(seed: int) -> tuple[TAEHVEncoder, TAEHVDecoder]:
    torch.manual_seed(seed)
    enc = TAEHVEncoder(latent_channels=4, channels=8).eval()
    dec = TAEHVDecoder(latent_channels=4, channels=(16, 8, 8, 8)).eval()
    return enc, dec


def _histories(sv: StreamVAE, video) -> tuple[list, list[torch.Tensor]]:
    """Three streams with different histories (1, 2 and 3 chunks of different videos) and each one's next chunk."""
    states, nxt = [], []
    for k, chunks in enumerate((1, 2, 3)):
        x = video(5 + 4 * chunks, seed=10 + k, height=8, width=16)
        st = sv.new_state()
        sv.encode(st, x[:, :, :5])
        for c in range(1, chunks):
            sv.encode(st, x[:, :, 1 + 4 * c : 5 + 4 * c])
        states.append(st)
        nxt.append(x[:, :, 1 + 4 * chunks : 5 + 4 * chunks])
    return states, nxt


def test_encode_batch_equals_per_stream(tiny_vae, video):
    sv = StreamVAE(tiny_vae)
    states, chunks = _histories(sv, video)
    fresh = sv.new_state()  # a new stream: its first-call branch forms its own group
    states.append(fresh)
    chunks.append(video(5, seed=20, height=8, width=16))
    eager_states = copy.deepcopy(states)
    eager = [sv.encode(s, c) for s, c in zip(eager_states, chunks, strict=True)]
    batched = sv.encode_batch(states, chunks)
    for b, e in zip(batched, eager, strict=True):
        assert isinstance(b, torch.Tensor)
        torch.testing.assert_close(b, e, rtol=0, atol=ATOL)
    # the scattered caches continue each stream exactly: the next chunk too, batched again
    nxt = [video(4, seed=30 + i, height=8, width=16) for i in range(4)]
    eager = [sv.encode(s, c) for s, c in zip(eager_states, nxt, strict=True)]
    for b, e in zip(sv.encode_batch(states, nxt), eager, strict=True):
        torch.testing.assert_close(b, e, rtol=0, atol=ATOL)
    assert [s.frames_encoded for s in states] == [s.frames_encoded for s in eager_states]
    assert states[0].encoder_cache[0] is not None and states[0].encoder_cache[0].shape[0] == 1


def test_swapped_cache_differs(tiny_vae, video):
    """Negative control: a cache swapped between two streams is a different stream (the gather order matters)."""
    sv = StreamVAE(tiny_vae)
    states, chunks = _histories(sv, video)
    eager = [sv.encode(s, c) for s, c in zip(copy.deepcopy(states), chunks, strict=True)]
    states[0].encoder_cache, states[1].encoder_cache = states[1].encoder_cache, states[0].encoder_cache
    swapped = sv.encode_batch(states, chunks)
    assert (swapped[0] - eager[0]).abs().max() > 1e-3


def test_one_stream_twice_runs_in_order_and_errors_stay_per_stream(tiny_vae, video):
    sv = StreamVAE(tiny_vae)
    states, chunks = _histories(sv, video)
    eager_states = copy.deepcopy(states)
    x = video(8, seed=40, height=8, width=16)
    bad = video(3, seed=41, height=8, width=16)  # not a multiple of 4: that stream's own error, the others still encode
    order = [states[0], states[0], states[1], states[2]]
    out = sv.encode_batch(order, [x[:, :, :4], x[:, :, 4:], chunks[1], bad])
    e0 = torch.cat([sv.encode(eager_states[0], x[:, :, :4]), sv.encode(eager_states[0], x[:, :, 4:])], 2)
    torch.testing.assert_close(torch.cat([out[0], out[1]], 2), e0, rtol=0, atol=ATOL)
    torch.testing.assert_close(out[2], sv.encode(eager_states[1], chunks[1]), rtol=0, atol=ATOL)
    assert isinstance(out[3], StreamVAEError)
    assert states[2].frames_encoded == eager_states[2].frames_encoded  # the failed chunk changed nothing


def test_decode_batch_equals_per_stream(tiny_vae):
    sv = StreamVAE(tiny_vae)
    g = torch.Generator().manual_seed(5)
    z = [torch.randn(1, 4, 4, 1, 2, generator=g) for _ in range(3)]
    states = [sv.new_state() for _ in range(3)]
    for st, zz, n in zip(states, z, (1, 2, 3), strict=True):
        sv.decode(st, zz[:, :, :n])
    eager_states = copy.deepcopy(states)
    nxt = [zz[:, :, n : n + 1] for zz, n in zip(z, (1, 2, 3), strict=True)]
    eager = [sv.decode(s, c) for s, c in zip(eager_states, nxt, strict=True)]
    for b, e in zip(sv.decode_batch(states, nxt), eager, strict=True):
        torch.testing.assert_close(b, e, rtol=0, atol=DECODE_ATOL)
    assert [s.latents_decoded for s in states] == [2, 3, 4]


def test_taehv_batch_both_ways(tiny_vae, video):
    enc, dec = _tiny_taehv(3)
    sv = StreamVAE(tiny_vae, taehv=dec, taehv_encoder=enc, latent_norm="normalized")
    states, chunks = _histories(sv, video)
    eager_states = copy.deepcopy(states)
    eager = [sv.encode(s, c) for s, c in zip(eager_states, chunks, strict=True)]
    batched = sv.encode_batch(states, chunks)
    for b, e in zip(batched, eager, strict=True):
        torch.testing.assert_close(b, e, rtol=0, atol=ATOL)
    z = torch.randn(1, 4, 3, 1, 2, generator=torch.Generator().manual_seed(6))
    dstates = [sv.new_state() for _ in range(2)]
    sv.decode(dstates[0], z[:, :, :2])
    sv.decode(dstates[1], z[:, :, 1:3])
    eager_d = copy.deepcopy(dstates)
    ed = [sv.decode(s, z[:, :, 2:3]) for s in eager_d]
    for b, e in zip(sv.decode_batch(dstates, [z[:, :, 2:3]] * 2), ed, strict=True):
        torch.testing.assert_close(b, e, rtol=0, atol=ATOL)
    assert [s.taehv.frames_out for s in dstates] == [s.taehv.frames_out for s in eager_d] == [12, 12]
    sv.decode(dstates[1], z[:, :, 2:3])  # a stream further on, batched with one behind: each keeps its own count
    sv.decode_batch(dstates, [z[:, :, :1]] * 2)
    assert [s.taehv.frames_out for s in dstates] == [16, 20]


def test_compile_is_a_no_op_on_cpu(tiny_vae):
    """``encoder.compile`` is CUDA-only: on CPU the modules stay as they are (the GPU check: test_gpu_paths.py)."""
    from encoder.vae_loading import compile_stream_vae

    sv = StreamVAE(tiny_vae)
    encoder = sv.vae.encoder
    assert compile_stream_vae(sv) is False and sv.vae.encoder is encoder


def test_channels_last_keeps_every_result_and_module_to_cannot_do_it(tiny_vae, video):
    """``encoder.compile``'s memory-format step, on CPU: the Wan VAE has 5-D and 4-D parameters, so
    ``Module.to(memory_format=channels_last_3d)`` raises on it (how the compiled VAE failed on the H200); the
    per-rank conversion runs, changes the layouts, and encodes and decodes as the contiguous VAE does."""
    from encoder.vae_loading import channels_last

    with pytest.raises(RuntimeError, match="rank 5"):
        copy.deepcopy(tiny_vae.encoder).to(memory_format=torch.channels_last_3d)
    sv, ref = StreamVAE(copy.deepcopy(tiny_vae)), StreamVAE(tiny_vae)
    channels_last(sv.vae.encoder)
    channels_last(sv.vae.decoder)
    conv = next(p for p in sv.vae.encoder.parameters() if p.dim() == 5)
    assert conv.is_contiguous(memory_format=torch.channels_last_3d) and not conv.is_contiguous()
    x = video(9, seed=4, height=16, width=16)
    s, r = sv.new_state(), ref.new_state()
    for a, b in ((0, 5), (5, 9)):
        z = sv.encode(s, x[:, :, a:b])
        torch.testing.assert_close(z, ref.encode(r, x[:, :, a:b]), rtol=0, atol=1e-5)
        torch.testing.assert_close(sv.decode(s, z), ref.decode(r, z), rtol=0, atol=1e-5)
