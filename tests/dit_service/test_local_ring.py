"""The one engine in one process: ``LocalRing`` (lockstep stage workers, the ring ``StreamPipeline`` runs) equals
the frozen oracle ``StreamBatchRunner`` bit-exactly, chunk by chunk, with 1, 2 and 3 stages."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from dit_stage.ring import LocalRing
from dit_stage.worker import StageWorker
from oracle.stream_batch import StreamBatchRunner

from .helpers import CONFIG, as_chunk_latent, chunk_message, full_model, latents, prompt, reference, stage_models

CHUNKS = 8


def _ring(stages: int, wire: bool = True, config=CONFIG) -> LocalRing:
    return LocalRing([StageWorker(m, window=config.kv_window, sink=config.sink,
                                  adaptive_threshold=config.adaptive_threshold, lockstep=True,
                                  cache_mode=config.cache_mode, context_noise=config.context_noise)
                      for m in stage_models(stages)], wire=wire)


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_lockstep_ring_equals_the_oracle_chunk_by_chunk(stages):
    """Two streams of different grids, one chunk each per round: the ring hands back exactly the oracle's finished
    chunks in the same rounds (B − 1 rounds after entering), and one forward per grid per round."""
    streams = {"a": (11, prompt(1), latents(3, CHUNKS, (4, 6))), "b": (12, prompt(2), latents(4, CHUNKS, (6, 8)))}
    want = {sid: reference({sid: v})[sid] for sid, v in streams.items()}  # the oracle batches one grid only
    ring = _ring(stages)
    for sid, (_, emb, _) in streams.items():
        ring.add_prompt(sid, 0, emb)
    got: dict[str, list[tuple[int, torch.Tensor]]] = {sid: [] for sid in streams}
    for c in range(CHUNKS):
        before = ring.micro_steps
        for sid, (seed, _, zs) in streams.items():
            ring.add_chunk(chunk_message(sid, c, zs[c], seed=seed))
        for chunk in ring.run():
            got[chunk.stream_id].append((c, chunk.latent))
        if c > 0:  # per grid: one forward per stage (the prepare chunk runs its B steps in sequence)
            assert ring.micro_steps - before == 2 * stages
    for sid in streams:
        rounds = [c for c, _ in got[sid]]
        assert rounds == [0, *range(CONFIG.steps, CHUNKS)]  # the warm-up: nothing for B − 1 rounds
        assert len(want[sid]) == len(got[sid])
        for w, (_, g) in zip(want[sid], got[sid], strict=True):
            assert torch.equal(as_chunk_latent(w), g), (sid, (as_chunk_latent(w) - g).abs().max())


def test_drain_finishes_the_chunks_in_the_slots_and_a_refusal_says_why():
    zs = latents(3, 4, (4, 6))
    ring = _ring(1, wire=False)
    ring.add_prompt("a", 0, prompt(1))
    done = []
    for c, z in enumerate(zs):
        ring.add_chunk(chunk_message("a", c, z, seed=11))
        done += ring.run()
    assert [c.seq for c in done] == [0, 1, 2]  # chunk 3 waits in slot 0 for the next chunk
    ring.first.drain("a")
    assert [c.seq for c in ring.run()] == [3]
    with pytest.raises(ValueError, match="out_of_order"):
        ring.add_chunk(chunk_message("a", 2, zs[2], seed=11))


@pytest.mark.parametrize(("stages", "steps"), [(1, 1), (2, 2), (3, 3)])
def test_self_forcing_through_the_ring_equals_the_oracle(stages, steps):
    """Self-Forcing cache mode: after each finished chunk a clean pass (its x0 at ``context_noise``) rewrites its
    K/V in every slot before the next wave, on every stage — bit-exact; and it differs from the sdv2 mode."""
    cfg = dataclasses.replace(CONFIG, steps=steps, cache_mode="self_forcing", context_noise=50.0)
    zs = latents(5, CHUNKS, (4, 6))
    want = reference({"a": (11, prompt(1), zs)}, config=cfg)["a"]
    sdv2 = reference({"a": (11, prompt(1), zs)}, config=dataclasses.replace(cfg, cache_mode="sdv2"))["a"]
    ring = _ring(stages, config=cfg)
    ring.add_prompt("a", 0, prompt(1))
    got = []
    for c, z in enumerate(zs):
        ring.add_chunk(chunk_message("a", c, z, config=cfg, seed=11))
        got += ring.run()
    assert [g.seq for g in got] == list(range(CHUNKS - steps + 1))
    for w, g in zip(want, got, strict=True):
        assert torch.equal(as_chunk_latent(w), g.latent), (g.seq, (as_chunk_latent(w) - g.latent).abs().max())
    assert torch.equal(as_chunk_latent(want[0]), as_chunk_latent(sdv2[0]))  # the prepare output precedes its clean pass
    assert (as_chunk_latent(want[-1]) - as_chunk_latent(sdv2[-1])).abs().max() > 1e-3  # negative control


def test_t2v_noise_only_chunks_equal_the_oracle():
    """T2V through the ring: chunks without input (zero latent, noise scale 1 — pure noise at the step list's first
    timestep), 2 latent frames each, Self-Forcing mode: equal to the oracle's T2V stream."""
    cfg = dataclasses.replace(CONFIG, cache_mode="self_forcing", kv_window=6)
    clock = cfg.clock(t2v_frames=2)
    runner = StreamBatchRunner([full_model()], cfg)
    runner.open_stream("t", 3, prompt(3)[None], (4, 6), clock=clock)
    want = [runner.prepare("t", None)] + [runner.step({"t": None})["t"] for _ in range(1, 6)]
    ring = _ring(1, config=cfg)
    ring.add_prompt("t", 0, prompt(3))
    got = []
    for c in range(6):
        chunk = chunk_message("t", c, torch.zeros(1, 4, 2, 4, 6), seed=3, config=cfg).model_copy(update={
            "latent_start": clock.latent_start(c), "rope_start": clock.rope_start(c), "noise_scale": 1.0,
            "timesteps": list(cfg.timesteps)})
        ring.add_chunk(chunk)
        got += ring.run()
    want = [w for w in want if w is not None]
    assert [g.seq for g in got] == list(range(len(want)))
    for w, g in zip(want, got, strict=True):
        assert torch.equal(as_chunk_latent(w), g.latent), (g.seq, (as_chunk_latent(w) - g.latent).abs().max())


def test_a_lost_return_never_freezes_a_lockstep_stream():
    """Self-Forcing streams run in lockstep in the services too: a wave waits for the previous wave's returns. A
    return lost in the ring (a dropped link frame) is given up at its deadline, counted, and the stream goes on;
    before that it waits (no wave may overtake a return still on its way)."""
    cfg = dataclasses.replace(CONFIG, cache_mode="self_forcing")
    offset = [0.0]
    worker = StageWorker(stage_models(1)[0], window=cfg.kv_window, sink=cfg.sink,
                         adaptive_threshold=cfg.adaptive_threshold, cache_mode="self_forcing",
                         clock=lambda: time.time() + offset[0])
    ring = LocalRing([worker])
    ring.add_prompt("a", 0, prompt(1))
    zs = latents(3, 4, (4, 6))
    ring.add_chunk(chunk_message("a", 0, zs[0], seed=1, config=cfg, deadline=time.time() + 60))
    assert [c.seq for c in ring.run()] == [0]
    ring.add_chunk(chunk_message("a", 1, zs[1], seed=1, config=cfg, deadline=time.time() + 60))
    step = worker.take()
    assert step is not None and [m.seq for m in step.items] == [1]
    worker.compute(step)  # its ring return is lost: never handed back
    ring.add_chunk(chunk_message("a", 2, zs[2], seed=1, config=cfg, deadline=time.time() + 600))
    assert worker.take() is None  # the wave waits for chunk 1's return while it may still come
    offset[0] = 120.0  # past chunk 1's deadline
    step = worker.take()
    assert step is not None and [(m.seq, m.step) for m in step.items] == [(2, 0)]
    assert worker.dropped["lost_in_ring"] == 1
