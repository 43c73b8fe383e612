"""The one engine in one process: ``LocalRing`` (lockstep stage workers, the ring ``StreamPipeline`` runs) equals
the frozen oracle ``StreamBatchRunner`` bit-exactly, chunk by chunk, with 1, 2 and 3 stages."""

from __future__ import annotations

import pytest
import torch

from dit_stage.ring import LocalRing
from dit_stage.worker import StageWorker

from .helpers import CONFIG, as_chunk_latent, chunk_message, latents, prompt, reference, stage_models

CHUNKS = 8


def _ring(stages: int, wire: bool = True) -> LocalRing:
    return LocalRing([StageWorker(m, window=CONFIG.kv_window, sink=CONFIG.sink,
                                  adaptive_threshold=CONFIG.adaptive_threshold, lockstep=True)
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
            ring.add_chunk(chunk_message(sid, c, zs[c]), seed)
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
        ring.add_chunk(chunk_message("a", c, z), 11)
        done += ring.run()
    assert [c.seq for c in done] == [0, 1, 2]  # chunk 3 waits in slot 0 for the next chunk
    ring.first.drain("a")
    assert [c.seq for c in ring.run()] == [3]
    with pytest.raises(ValueError, match="out_of_order"):
        ring.add_chunk(chunk_message("a", 2, zs[2]), 11)
