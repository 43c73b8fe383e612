"""Stream-VAE against diffusers' one-shot ``AutoencoderKLWan.encode()/decode()`` (the independent reference)."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from encoder.vae import StreamVAE, StreamVAEError, StreamVAEState

ATOL = 1e-5  # model.md §6.2: different chunking in fp32


def one_shot_encode(vae, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.encode(x).latent_dist.mode()


def one_shot_decode(vae, z_raw: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z_raw).sample


def stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    return torch.tensor(vae.config.latents_mean).view(shape), torch.tensor(vae.config.latents_std).view(shape)


def stream_encode(sv: StreamVAE, x: torch.Tensor, sizes: list[int], state: StreamVAEState | None = None):
    state = state or sv.new_state()
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    assert bounds[-1] == x.shape[2]
    return torch.cat([sv.encode(state, x[:, :, a:b]) for a, b in itertools.pairwise(bounds)], dim=2)


def stream_decode(sv: StreamVAE, z: torch.Tensor, sizes: list[int], state: StreamVAEState | None = None):
    state = state or sv.new_state()
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    assert bounds[-1] == z.shape[2]
    return torch.cat([sv.decode(state, z[:, :, a:b]) for a, b in itertools.pairwise(bounds)], dim=2)


def test_encode_in_one_call_is_bit_identical_to_one_shot(tiny_vae, video):
    x = video(13, seed=1)
    ref = one_shot_encode(tiny_vae, x)
    out = stream_encode(StreamVAE(tiny_vae), x, [13])
    assert out.shape == (1, 4, 4, 2, 3)
    assert torch.equal(out, ref)


def test_decode_in_one_call_is_bit_identical_to_one_shot(tiny_vae, video):
    z = torch.randn(1, 4, 4, 2, 3, generator=torch.Generator().manual_seed(2))
    mean, std = stats(tiny_vae)
    ref = one_shot_decode(tiny_vae, z * std + mean)
    out = stream_decode(StreamVAE(tiny_vae), z, [4])
    assert out.shape == (1, 3, 13, 16, 24)
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    ("sizes", "per_pass"),
    [([5, 4, 4, 4], 4), ([1, 4, 4, 4, 4], 4), ([9, 8], 8), ([1, 16], 8), ([5, 12], 4)],
    ids=["sdv2-5-then-4", "1-then-4", "passes-of-8", "1-then-16-in-8s", "5-then-12"],
)
def test_streamed_encode_matches_one_shot(tiny_vae, video, sizes, per_pass):
    x = video(17, seed=3)
    ref = one_shot_encode(tiny_vae, x)
    out = stream_encode(StreamVAE(tiny_vae, encode_frames_per_pass=per_pass), x, sizes)
    assert out.shape == ref.shape == (1, 4, 5, 2, 3)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    ("sizes", "per_pass"),
    [([2, 1, 1, 1], 1), ([1, 1, 1, 1, 1], 1), ([1, 2, 1, 1], 2), ([3, 2], 2), ([5], 3)],
    ids=["sdv2-2-then-1", "1-each", "passes-of-2", "3-then-2", "all-in-3s"],
)
def test_streamed_decode_matches_one_shot(tiny_vae, sizes, per_pass):
    z = torch.randn(1, 4, 5, 2, 3, generator=torch.Generator().manual_seed(4))
    mean, std = stats(tiny_vae)
    ref = one_shot_decode(tiny_vae, z * std + mean)
    out = stream_decode(StreamVAE(tiny_vae, decode_latents_per_pass=per_pass), z, sizes)
    assert out.shape == ref.shape == (1, 3, 17, 16, 24)
    torch.testing.assert_close(out, ref, rtol=0, atol=ATOL)


def test_same_passes_in_fp64_agree_to_rounding(vae_factory, video):
    """With the same encoder/decoder passes, streaming differs only in how the 1×1×1 quant convs are grouped."""
    vae = vae_factory(dtype=torch.float64)
    x = video(13, seed=5).double()
    out = stream_encode(StreamVAE(vae), x, [5, 4, 4])
    torch.testing.assert_close(out, one_shot_encode(vae, x), rtol=0, atol=1e-12)


def _zeroed(cache: list) -> list:
    return [torch.zeros_like(c) if isinstance(c, torch.Tensor) else c for c in cache]


def test_dropping_the_cache_between_calls_breaks_equality(tiny_vae, video):
    """Negative control: the persistent feat_cache is what makes streaming equal to one-shot."""
    x = video(13, seed=6)
    ref = one_shot_encode(tiny_vae, x)
    sv = StreamVAE(tiny_vae)
    # Dropped: each later chunk hits the first-call branches again and emits 4 latents instead of 1.
    state = sv.new_state()
    sv.encode(state, x[:, :, :5])
    state.encoder_cache = []
    assert sv.encode(state, x[:, :, 5:9]).shape[2] == 4
    # Zeroed (same shapes, content lost): the chunk sees zeros instead of the past frames.
    state = sv.new_state()
    outs = [sv.encode(state, x[:, :, :5])]
    for a in (5, 9):
        state.encoder_cache = _zeroed(state.encoder_cache)
        outs.append(sv.encode(state, x[:, :, a : a + 4]))
    assert (torch.cat(outs, 2) - ref).abs().max() > 1e-2

    z = torch.randn(1, 4, 4, 2, 3, generator=torch.Generator().manual_seed(7))
    mean, std = stats(tiny_vae)
    dref = one_shot_decode(tiny_vae, z * std + mean)
    dstate = sv.new_state()
    sv.decode(dstate, z[:, :, :2])
    dstate.decoder_cache = []
    assert sv.decode(dstate, z[:, :, 2:3]).shape[2] != 4
    dstate = sv.new_state()
    douts = [sv.decode(dstate, z[:, :, :2])]
    for a in (2, 3):
        dstate.decoder_cache = _zeroed(dstate.decoder_cache)
        douts.append(sv.decode(dstate, z[:, :, a : a + 1]))
    assert (torch.cat(douts, 2) - dref).abs().max() > 1e-2


def test_first_chunk_rules_raise_clear_errors(tiny_vae, video):
    sv = StreamVAE(tiny_vae)
    x = video(9, seed=8)
    with pytest.raises(StreamVAEError, match=r"first chunk of a stream must have 1 \+ 4k frames.*got 4"):
        sv.encode(sv.new_state(), x[:, :, :4])
    with pytest.raises(StreamVAEError, match=r"first encoder pass of a stream must be exactly 1 frame, got 5"):
        sv.encoder_pass(sv.new_state(), x[:, :, :5])
    state = sv.new_state()
    sv.encode(state, x[:, :, :5])
    with pytest.raises(StreamVAEError, match=r"positive multiple of 4 frames, got 3"):
        sv.encode(state, x[:, :, 5:8])
    with pytest.raises(StreamVAEError, match=r"positive multiple of 4 frames, got 1"):
        sv.encoder_pass(state, x[:, :, 5:6])
    z = torch.zeros(1, 4, 2, 2, 3)
    with pytest.raises(StreamVAEError, match=r"first decoder pass of a stream must be exactly 1 latent, got 2"):
        sv.decoder_pass(sv.new_state(), z)
    with pytest.raises(StreamVAEError, match=r"latents must be \[B, 4, N>=1, h, w\]"):
        sv.decode(sv.new_state(), torch.zeros(1, 3, 1, 2, 3))
    with pytest.raises(StreamVAEError, match=r"not a multiple of 8"):
        sv.encode(sv.new_state(), torch.zeros(1, 3, 1, 12, 24))
    with pytest.raises(StreamVAEError, match=r"frames must be \[B, 3, T, H, W\]"):
        sv.encode(sv.new_state(), torch.zeros(3, 1, 16, 24))


def test_the_first_call_rule_is_real(tiny_vae, video):
    """Why the rule exists: a 5-frame first encoder pass emits 5 latents, a 2-latent first decoder pass 2 frames."""
    x = video(5, seed=9)
    with torch.no_grad():
        latents = tiny_vae.encoder(x, feat_cache=[None] * tiny_vae._cached_conv_counts["encoder"], feat_idx=[0])
        frames = tiny_vae.decoder(
            torch.zeros(1, 4, 2, 2, 3), feat_cache=[None] * tiny_vae._cached_conv_counts["decoder"], feat_idx=[0]
        )
    assert latents.shape[2] == 5
    assert frames.shape[2] == 2
    sv = StreamVAE(tiny_vae)
    assert sv.encode(sv.new_state(), x).shape[2] == 2
    assert sv.decode(sv.new_state(), torch.zeros(1, 4, 2, 2, 3)).shape[2] == 5


def test_reset_starts_a_new_stream(tiny_vae, video):
    sv = StreamVAE(tiny_vae)
    x, y = video(9, seed=10), video(9, seed=11)
    state = sv.new_state()
    sv.encode(state, x[:, :, :5])
    sv.encode(state, x[:, :, 5:9])
    sv.decode(state, torch.zeros(1, 4, 2, 2, 3))
    assert state.nbytes() > 0
    state.reset()
    assert state.nbytes() == 0 and state.frames_encoded == 0 and state.latents_decoded == 0
    again = torch.cat([sv.encode(state, y[:, :, :5]), sv.encode(state, y[:, :, 5:9])], 2)
    assert torch.equal(again, stream_encode(sv, y, [5, 4]))


def test_two_streams_interleaved_are_independent(tiny_vae, video):
    sv = StreamVAE(tiny_vae)
    xa, xb = video(13, seed=12), video(13, seed=13)
    alone_a, alone_b = stream_encode(sv, xa, [5, 4, 4]), stream_encode(sv, xb, [5, 4, 4])
    sa, sb = sv.new_state(), sv.new_state()
    outs_a, outs_b = [], []
    for a, b in ((0, 5), (5, 9), (9, 13)):
        outs_a.append(sv.encode(sa, xa[:, :, a:b]))
        outs_b.append(sv.encode(sb, xb[:, :, a:b]))
    assert torch.equal(torch.cat(outs_a, 2), alone_a)
    assert torch.equal(torch.cat(outs_b, 2), alone_b)

    za, zb = alone_a, alone_b
    da, db = stream_decode(sv, za, [2, 1, 1]), stream_decode(sv, zb, [2, 1, 1])
    ta, tb = sv.new_state(), sv.new_state()
    mixed_a, mixed_b = [], []
    for a, b in ((0, 2), (2, 3), (3, 4)):
        mixed_a.append(sv.decode(ta, za[:, :, a:b]))
        mixed_b.append(sv.decode(tb, zb[:, :, a:b]))
    assert torch.equal(torch.cat(mixed_a, 2), da)
    assert torch.equal(torch.cat(mixed_b, 2), db)


def test_state_survives_serialisation_mid_stream(tiny_vae, video):
    sv = StreamVAE(tiny_vae)
    x = video(13, seed=14)
    straight = stream_encode(sv, x, [5, 4, 4])
    state = sv.new_state()
    first = sv.encode(state, x[:, :, :5])
    buf = io.BytesIO()
    torch.save(state.to_dict(), buf)
    buf.seek(0)
    moved = StreamVAEState.from_dict(torch.load(buf, weights_only=True))
    rest = [sv.encode(moved, x[:, :, 5:9]), sv.encode(moved, x[:, :, 9:13])]
    assert torch.equal(torch.cat([first, *rest], 2), straight)

    z = straight
    dstraight = stream_decode(sv, z, [2, 1, 1])
    dstate = sv.new_state()
    head = sv.decode(dstate, z[:, :, :2])
    buf = io.BytesIO()
    torch.save(dstate.to_dict(), buf)
    buf.seek(0)
    dmoved = StreamVAEState.from_dict(torch.load(buf, weights_only=True))
    tail = [sv.decode(dmoved, z[:, :, 2:3]), sv.decode(dmoved, z[:, :, 3:4])]
    assert torch.equal(torch.cat([head, *tail], 2), dstraight)


def test_latent_norm_modes(tiny_vae, video):
    """``reference``: encode gives raw μ (as the official code); ``normalized``: (μ − mean)/std. Decode always
    de-normalises, which is exactly the official code's asymmetry in ``reference`` mode."""
    x = video(5, seed=15)
    mu = one_shot_encode(tiny_vae, x)
    mean, std = stats(tiny_vae)
    ref_sv, norm_sv = StreamVAE(tiny_vae, latent_norm="reference"), StreamVAE(tiny_vae, latent_norm="normalized")
    z_ref = ref_sv.encode(ref_sv.new_state(), x)
    z_norm = norm_sv.encode(norm_sv.new_state(), x)
    assert torch.equal(z_ref, mu)
    torch.testing.assert_close(z_norm, (mu - mean) / std, rtol=0, atol=1e-6)
    for sv, z in ((ref_sv, z_ref), (norm_sv, z_norm)):
        torch.testing.assert_close(
            sv.decode(sv.new_state(), z), one_shot_decode(tiny_vae, z * std + mean), rtol=0, atol=1e-6
        )
    # The asymmetry: in reference mode a round trip decodes μ·std + mean, not μ.
    roundtrip = ref_sv.decode(ref_sv.new_state(), z_ref)
    assert (roundtrip - one_shot_decode(tiny_vae, mu)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="latent_norm"):
        StreamVAE(tiny_vae, latent_norm="scaled")  # type: ignore[arg-type]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    groups=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=4),
    first_groups=st.integers(min_value=0, max_value=2),
    latent_sizes=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=5),
)
def test_any_valid_chunking_matches_one_shot(tiny_vae, video, groups, first_groups, latent_sizes):
    """Any split into a 1 + 4k first chunk and 4k later chunks (and any latent split) agrees with one-shot."""
    sizes = [1 + 4 * first_groups] + [4 * g for g in groups]
    x = video(sum(sizes), seed=16)
    out = stream_encode(StreamVAE(tiny_vae), x, sizes)
    torch.testing.assert_close(out, one_shot_encode(tiny_vae, x), rtol=0, atol=ATOL)
    z = torch.randn(1, 4, sum(latent_sizes), 2, 3, generator=torch.Generator().manual_seed(17))
    mean, std = stats(tiny_vae)
    decoded = stream_decode(StreamVAE(tiny_vae), z, latent_sizes)
    torch.testing.assert_close(decoded, one_shot_decode(tiny_vae, z * std + mean), rtol=0, atol=ATOL)
