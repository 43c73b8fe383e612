"""TAEHV decoder (``taew2_1`` layout, random init): streamed decode equals TAEHV's one-shot parallel decode."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from encoder.taehv import (
    MemBlock,
    TAEHVDecoder,
    TAEHVDecoderError,
    TAEHVEncoder,
    TGrow,
    load_taehv_decoder,
    load_taehv_encoder,
    make_tiny_taehv,
)
from encoder.vae import StreamVAE, StreamVAEError, StreamVAEState


def make_taehv(seed: int = 0) -> TAEHVDecoder:
    torch.manual_seed(seed)
    model = TAEHVDecoder(latent_channels=4, channels=(32, 16, 8, 8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.decoder[-1].bias.add_(0.5)  # centre the output in [0, 1] so little of it is clamped
    return model


def one_shot_taehv(model: TAEHVDecoder, latents_ncthw: torch.Tensor) -> torch.Tensor:
    """TAEHV's ``apply_model_with_memblocks_parallel`` + ``decode_video`` trim, restated from madebyollin/taehv."""
    x = latents_ncthw.permute(0, 2, 1, 3, 4)
    n, t, c, h, w = x.shape
    x = x.reshape(n * t, c, h, w)
    with torch.no_grad():
        for block in model.decoder:
            if isinstance(block, MemBlock):
                nt, c, h, w = x.shape
                seq = x.reshape(n, nt // n, c, h, w)
                memory = F.pad(seq, (0, 0, 0, 0, 0, 0, 1, 0), value=0)[:, : nt // n].reshape(x.shape)
                x = block(x, memory)
            else:
                x = block(x)
    nt, c, h, w = x.shape
    out = x.view(n, nt // n, c, h, w).clamp(0, 1)[:, model.frames_to_trim :]
    return out.permute(0, 2, 1, 3, 4)


def test_taehv_layout_matches_taew2_1_indices():
    model = TAEHVDecoder()
    kinds = {i: type(b).__name__ for i, b in enumerate(model.decoder)}
    assert [i for i, k in kinds.items() if k == "MemBlock"] == [3, 4, 5, 9, 10, 11, 15, 16, 17]
    assert [i for i, k in kinds.items() if k == "TGrow"] == [7, 13, 19]
    assert [model.decoder[i].stride for i in (7, 13, 19)] == [1, 2, 2]
    assert model.frames_to_trim == 3
    assert model.state_dict()["decoder.1.weight"].shape == (256, 16, 3, 3)


@pytest.mark.parametrize("sizes", [[1, 1, 1, 1], [2, 1, 1], [1, 3], [4]])
def test_streamed_taehv_equals_one_shot(sizes):
    model = make_taehv()
    z = torch.randn(1, 4, 4, 2, 3, generator=torch.Generator().manual_seed(1))
    ref = one_shot_taehv(model, z)
    assert ref.shape == (1, 3, 13, 16, 24)
    state = model.new_state()
    outs, start = [], 0
    for s in sizes:
        out = model.decode(state, z[:, :, start : start + s])
        assert out.shape[2] == (1 + 4 * (s - 1) if start == 0 else 4 * s)
        outs.append(out)
        start += s
    torch.testing.assert_close(torch.cat(outs, 2), ref, rtol=0, atol=1e-6)


def test_taehv_without_memory_differs():
    """Negative control: a fresh memory per call is not the same stream."""
    model = make_taehv()
    z = torch.randn(1, 4, 3, 2, 3, generator=torch.Generator().manual_seed(2))
    ref = one_shot_taehv(model, z)
    state = model.new_state()
    first = model.decode(state, z[:, :, :1])
    rest = []
    for i in (1, 2):
        state.memory = {k: torch.zeros_like(v) for k, v in state.memory.items()}
        rest.append(model.decode(state, z[:, :, i : i + 1]))
    assert (torch.cat([first, *rest], 2) - ref).abs().max() > 1e-3


def test_stream_vae_with_taehv_decoder(tiny_vae, video):
    taehv = make_taehv()
    sv = StreamVAE(tiny_vae, taehv=taehv)
    x = video(9, seed=3)
    state = sv.new_state()
    z = torch.cat([sv.encode(state, x[:, :, :5]), sv.encode(state, x[:, :, 5:9])], 2)
    frames = torch.cat([sv.decode(state, z[:, :, :2]), sv.decode(state, z[:, :, 2:3])], 2)
    assert frames.shape == (1, 3, 9, 16, 24)
    torch.testing.assert_close(frames, one_shot_taehv(taehv, z) * 2 - 1, rtol=0, atol=1e-6)
    assert state.taehv is not None and state.nbytes() > 0

    buf = io.BytesIO()
    torch.save(state.to_dict(), buf)
    buf.seek(0)
    moved = StreamVAEState.from_dict(torch.load(buf, weights_only=True))
    assert torch.equal(sv.decode(moved, z[:, :, 2:3]), sv.decode(state, z[:, :, 2:3]))
    state.reset()
    assert state.taehv is None and state.nbytes() == 0
    with pytest.raises(StreamVAEError, match="TAEHV"):
        sv.decoder_pass(sv.new_state(), z[:, :, :1])
    with pytest.raises(ValueError, match="latent channels"):
        StreamVAE(tiny_vae, taehv=TAEHVDecoder(latent_channels=16, channels=(8, 8, 8, 8)))


def test_load_taew2_1_checkpoint(tmp_path):
    model = make_taehv()
    sd = {f"encoder.0.{k}": torch.zeros(1) for k in ("weight", "bias")}  # encoder keys are ignored
    sd |= model.state_dict()
    # taew2_1 ships decoder.7 (a stride-1 TGrow for Wan2.1) with 2× channels; the last rows are the ones used.
    w7 = sd["decoder.7.conv.weight"]
    sd["decoder.7.conv.weight"] = torch.cat([torch.randn_like(w7), w7], 0)
    torch.save(sd, tmp_path / "taew2_1.pth")
    loaded = load_taehv_decoder(tmp_path / "taew2_1.pth", latent_channels=4, channels=(32, 16, 8, 8))
    z = torch.randn(1, 4, 2, 2, 3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(one_shot_taehv(loaded, z), one_shot_taehv(model, z))
    assert isinstance(loaded.decoder[7], TGrow)

    del sd["decoder.22.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(TAEHVDecoderError, match=r"decoder\.22\.weight"):
        load_taehv_decoder(tmp_path / "broken.pth", latent_channels=4, channels=(32, 16, 8, 8))
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        load_taehv_decoder(tmp_path / "missing.pth")


# -- TAEHV encoder ----------------------------------------------------------------------------------------------


def test_taehv_encoder_layout_matches_taew2_1():
    enc = TAEHVEncoder()
    kinds = {i: type(b).__name__ for i, b in enumerate(enc.encoder)}
    assert [i for i, k in kinds.items() if k == "TPool"] == [2, 7, 12]
    assert [enc.encoder[i].stride for i in (2, 7, 12)] == [2, 2, 1]
    assert [i for i, k in kinds.items() if k == "MemBlock"] == [4, 5, 6, 9, 10, 11, 14, 15, 16]
    sd = enc.state_dict()
    assert sd["encoder.0.weight"].shape == (64, 3, 3, 3) and sd["encoder.17.weight"].shape == (16, 64, 3, 3)
    assert sd["encoder.2.conv.weight"].shape == (64, 128, 1, 1) and "encoder.3.bias" not in sd
    assert sum(p.numel() for p in enc.parameters()) == 1_470_928  # model.md §4: 1.47 M


def test_taehv_encoder_chunked_equals_whole_clip_and_is_causal():
    enc, _ = make_tiny_taehv(4, seed=1)
    x = torch.rand(1, 3, 13, 16, 24, generator=torch.Generator().manual_seed(7))
    whole = enc.encode(enc.new_state(), x)
    assert whole.shape == (1, 4, 4, 2, 3)  # 1 + 4k frames → 1 + k latents, 8× space
    state = enc.new_state()
    parts = [enc.encode(state, x[:, :, a:b]) for a, b in ((0, 5), (5, 9), (9, 13))]
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=1e-6)
    later = x.clone()
    later[:, :, 9:] = torch.rand(1, 3, 4, 16, 24)  # a different future leaves the past latents alone
    changed = enc.encode(enc.new_state(), later)
    torch.testing.assert_close(changed[:, :, :3], whole[:, :, :3], rtol=0, atol=1e-6)
    assert (changed[:, :, 3] - whole[:, :, 3]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        enc.encode(enc.new_state(), x[:, :, :4])


def test_stream_vae_with_taehv_both_ways(tiny_vae, video, tmp_path):
    enc, dec = make_tiny_taehv(4, seed=2)
    sv = StreamVAE(tiny_vae, taehv=dec, taehv_encoder=enc, latent_norm="normalized")
    x = video(9, seed=8)
    state = sv.new_state()
    z = torch.cat([sv.encode(state, x[:, :, :5]), sv.encode(state, x[:, :, 5:9])], 2)
    assert z.shape == (1, 4, 3, 2, 3) and state.taehv_encoder is not None
    torch.testing.assert_close(z, enc.encode(enc.new_state(), (x + 1) / 2), rtol=0, atol=1e-6)
    frames = sv.decode(state, z)
    assert frames.shape == x.shape and frames.abs().max() <= 1.0  # round trip: shapes and range (random weights)
    ref = StreamVAE(tiny_vae, taehv_encoder=enc)  # reference space: z·std + mean
    mean = torch.tensor([0.3, -0.7, 0.1, 1.2]).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.9, 0.6, 2.4, 1.3]).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(ref.encode(ref.new_state(), x[:, :, :5]), z[:, :, :2] * std + mean)
    with pytest.raises(StreamVAEError, match="TAEHV"):
        sv.encoder_pass(sv.new_state(), x[:, :, :1])
    moved = StreamVAEState.from_dict(state.to_dict())
    assert moved.taehv_encoder is not None and moved.taehv_encoder.frames_out == 9

    sd = {**TAEHVEncoder(latent_channels=4).state_dict(), **dec.state_dict()}  # taew2_1: both in one file
    torch.save(sd, tmp_path / "taew2_1.pth")
    loaded = load_taehv_encoder(tmp_path / "taew2_1.pth", latent_channels=4)
    assert loaded.encoder[17].weight.shape == (4, 64, 3, 3)
    del sd["encoder.17.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(TAEHVDecoderError, match=r"encoder\.17\.weight"):
        load_taehv_encoder(tmp_path / "broken.pth", latent_channels=4)
