"""The measurement mode (``model.passthrough``): the ring's output is its input, the VAE is a block-average codec;
so a frame's content reaches the HLS output, where ``bench/serve.py`` reads the publisher's marker."""

from __future__ import annotations

from unittest.mock import patch

import torch

from dit_stage.passthrough import PassthroughStageWorker
from dit_stage.ring import LocalRing
from encoder.passthrough import PassthroughVAE
from encoder.vae import StreamVAE
from wan.tiny import make_tiny_vae

from .helpers import CONFIG, as_chunk_latent, chunk_message, latents, prompt, stage_models


def test_the_ring_hands_back_each_chunk_s_input_latent():
    """Two stages, a prepare chunk and steady ones: every finished chunk is its input (the noise of every step
    inverted), though all blocks ran."""
    zs = latents(5, 6, (4, 6))
    ring = LocalRing([PassthroughStageWorker(m, window=CONFIG.kv_window, sink=CONFIG.sink, lockstep=True,
                                             adaptive_threshold=CONFIG.adaptive_threshold,
                                             cache_mode=CONFIG.cache_mode, context_noise=CONFIG.context_noise)
                      for m in stage_models(2)], wire=True)
    ring.add_prompt("a", 0, prompt(1))
    got = {}
    for c, z in enumerate(zs):
        ring.add_chunk(chunk_message("a", c, z, seed=3))
        got |= {chunk.seq: chunk.latent for chunk in ring.run()}
    assert len(got) >= 4
    for seq, latent in got.items():
        torch.testing.assert_close(latent, as_chunk_latent(zs[seq]), atol=1e-4, rtol=1e-4)


def test_the_vae_keeps_block_constant_frames_and_the_frame_count():
    """Frames made of 8×8 blocks come back exactly: 5 frames → 2 latents → 5 frames, then 4 → 1 → 4, each latent
    frame standing for the first frame of its group."""
    vae = PassthroughVAE(make_tiny_vae(0))
    enc, dec = vae.new_state(), vae.new_state()
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(1, 3, 9, 4, 4, generator=g) * 2 - 1
    frames = blocks.repeat_interleave(8, -1).repeat_interleave(8, -2)
    first, later = frames[:, :, :5], frames[:, :, 5:]
    out = torch.cat([vae.decode(dec, vae.encode(enc, first)), vae.decode(dec, vae.encode(enc, later))], dim=2)
    assert out.shape == frames.shape
    shown = [0, 1, 1, 1, 1, 5, 5, 5, 5]  # the source frame each output frame shows
    torch.testing.assert_close(out, frames[:, :, shown])


def test_the_vae_still_runs_around_the_codec():
    """``PassthroughVAE.around`` (what ingest and the decoder use) does the real VAE's work, caches and all, so the
    served timings pay for it, and returns the codec's frames: equal to the codec alone, streams batched or not.
    Negative control: the codec alone leaves the caches empty."""
    real = StreamVAE(make_tiny_vae(0))
    runs, alone = PassthroughVAE.around(real), PassthroughVAE(make_tiny_vae(0))
    g = torch.Generator().manual_seed(1)
    frames = torch.rand(2, 3, 9, 32, 32, generator=g) * 2 - 1
    calls = 0
    encode = StreamVAE.encode

    def counted(self, state, x):
        nonlocal calls
        calls += 1
        return encode(self, state, x)

    out: dict[str, list[torch.Tensor]] = {}
    states: dict[str, list] = {}
    with patch.object(StreamVAE, "encode", counted):
        for name, vae in (("runs", runs), ("alone", alone)):
            enc = [vae.new_state(), vae.new_state()]
            dec = [vae.new_state(), vae.new_state()]
            got = []
            for a, b in ((0, 5), (5, 9)):
                zs = vae.encode_batch(enc, [frames[i : i + 1, :, a:b] for i in range(2)])
                got += vae.decode_batch(dec, zs)
            out[name], states[name] = got, enc + dec
    for a, b in zip(out["runs"], out["alone"], strict=True):
        torch.testing.assert_close(a, b)
    assert calls > 0  # the real encode ran (in one batched call per chunk)
    assert all(s.encoder_cache or s.decoder_cache for s in states["runs"])
    assert not any(s.encoder_cache or s.decoder_cache for s in states["alone"])
