"""TAEHV decoder (``taew2_1`` layout, random init): streamed decode equals TAEHV's one-shot parallel decode."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from encoder.taehv import MemBlock, TAEHVDecoder, TAEHVDecoderError, TGrow, load_taehv_decoder
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
