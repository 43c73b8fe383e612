"""A step-count change at a segment boundary: the next segment's stream state has the new number of slots."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from oracle.stream_batch import StreamBatchConfig, StreamBatchRunner
from proto.clock import segment_seed

from .helpers import CONFIG, NOISE_SCALE, as_chunk_latent, chunk_message, full_model, latents, prompt, run_ring, workers


def _runner(config: StreamBatchConfig, seed: int, emb: torch.Tensor, zs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One segment through StreamBatchRunner, drained by stand-in chunks that push the last ones out."""
    runner = StreamBatchRunner([full_model()], config)
    runner.open_stream("a", seed, emb[None], tuple(zs[0].shape[-2:]))
    out = [runner.prepare("a", zs[0], NOISE_SCALE)]
    for z in [*zs[1:], *[zs[-1]] * (config.steps - 1)]:
        x0 = runner.step({"a": (z, NOISE_SCALE)})["a"]
        if x0 is not None and len(out) < len(zs):
            out.append(x0)
    return out


@pytest.mark.parametrize("stages", [1, 2])
def test_a_new_segment_may_change_the_step_count(stages: int) -> None:
    """Segment 0 runs 2 steps, segment 1 (a prepare chunk at seq 4, 3 timesteps) runs 3: the first stage builds
    the next segment's state with the chunk's own step count instead of refusing it as a bad shape, and each
    segment equals the single-process runner at its own step count."""
    seed, cut, hw, emb = 5, 4, (4, 6), prompt(1)
    three = dataclasses.replace(CONFIG, steps=3)
    zs0, zs1 = latents(3, cut, hw), latents(4, 3, hw)
    ring = workers(stages)
    ring[0].add_prompt("a", 0, emb)
    for c, z in enumerate(zs0):
        assert ring[0].add_chunk(chunk_message("a", c, z, seed=seed))
    for j, z in enumerate(zs1):
        msg = chunk_message("a", j, z, config=three, seed=seed).model_copy(update={"seq": cut + j, "segment": 1})
        assert len(msg.timesteps) == 3
        assert ring[0].add_chunk(msg), ring[0].dropped
    got = run_ring(ring)
    assert not ring[0].dropped
    assert [(g.seq, g.segment) for g in got] == [(c, 0) for c in range(cut)] + [(cut + j, 1) for j in range(3)]
    want = _runner(CONFIG, seed, emb, zs0) + _runner(three, segment_seed(seed, 1), emb, zs1)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g.latent, as_chunk_latent(w), atol=1e-5, rtol=0)
    assert ring[0].streams["a"].steps == 3
