"""A new stream on an ended stream's storage (``StatePool``): exactly a fresh stream's results, and the same batch
signatures as the stream before it, so on CUDA it replays that stream's graphs instead of capturing its own."""

from __future__ import annotations

import pytest
import torch

from dit_stage.forward import Forward
from dit_stage.kv_cache import KVCacheShard
from dit_stage.state_pool import StatePool

from .helpers import as_chunk_latent, chunk_message, latents, prompt, reference, run_ring, workers

CHUNKS = 5


class _SignatureForward(Forward):
    """The eager forward, noting each call's batch signature (what graph mode keys its graphs by)."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.signatures: list[tuple] = []

    def __call__(self, x, items, grid, noisy=None, sigmas=None, timer=None):
        self.signatures.append(self.model.prepare_batch(items, grid, sigmas).signature())
        return super().__call__(x, items, grid, noisy, sigmas, timer)


def _ring(pooled: bool):
    ring = workers(2)
    for w in ring:
        w.storage = StatePool(enabled=pooled)  # on in the graph modes (CUDA); forced here, on the CPU
        w.forward = _SignatureForward(w.model)
    return ring


def _run(ring, sid: str, seed: int, zs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    for w in ring:
        w.forward.signatures.clear()
    ring[0].add_prompt(sid, 0, prompt(seed))
    for c, z in enumerate(zs):
        assert ring[0].add_chunk(chunk_message(sid, c, z, seed=seed))
    got = run_ring(ring)
    assert [g.seq for g in got] == list(range(CHUNKS))
    return [g.latent for g in got], [list(w.forward.signatures) for w in ring]


def _second_stream(ring) -> tuple[list[torch.Tensor], list[list[tuple]], list[list[tuple]]]:
    """Stream "a" runs and ends; stream "b" (other input, prompt and seed) runs after it."""
    _, first = _run(ring, "a", 3, latents(1, CHUNKS, (4, 6)))
    for w in ring:
        w.end_stream("a")
    got, second = _run(ring, "b", 7, latents(2, CHUNKS, (4, 6)))
    return got, first, second


def test_a_stream_on_an_ended_streams_storage_equals_a_fresh_one_and_keys_its_graphs_alike():
    """Stream b, run after stream a ended, on a's shards and cross K/V: its chunks equal the single-process
    reference bit for bit, and every stage's batch signatures are a's, in order. Negative control: without the
    pool b's signatures share none of a's (each stream captured its own graphs)."""
    ring = _ring(pooled=True)
    got, first, second = _second_stream(ring)
    want = reference({"b": (7, prompt(7), latents(2, CHUNKS, (4, 6)))})["b"]
    for w, g in zip(want, got, strict=False):
        assert torch.equal(as_chunk_latent(w), g)
    assert all(w.storage.reused == 1 for w in ring)
    assert second == first

    _, first, second = _second_stream(_ring(pooled=False))
    assert all(not set(a) & set(b) for a, b in zip(first, second, strict=True))


def test_a_reused_shard_is_reset_to_a_fresh_ones_contents(monkeypatch):
    """Negative control of the equality above: a shard reused with only its counters reset (stream a's keys,
    values and frame positions left in its tensors) changes stream b's chunks."""

    def counters_only(self: KVCacheShard) -> None:
        self.frames_end = [0] * self.num_slots

    monkeypatch.setattr(KVCacheShard, "reset", counters_only)
    got, _, _ = _second_stream(_ring(pooled=True))
    want = reference({"b": (7, prompt(7), latents(2, CHUNKS, (4, 6)))})["b"]
    assert any(not torch.equal(as_chunk_latent(w), g) for w, g in zip(want, got, strict=False))


@pytest.mark.parametrize("limit", [0, 1])
def test_the_pool_keeps_its_limit_over_all_layouts_newest_first(limit):
    """Three ended streams' shards offered (two of one layout, the newest of another), ``limit`` kept, the newest:
    a stage holds a few recent streams' storage, whatever their sizes."""
    model = workers(1)[0].model
    pool = StatePool(limit=limit)
    old = [model.new_state(s, 2, (4, 6), 5, 2) for s in "xy"]
    other = model.new_state("w", 2, (6, 6), 5, 2)
    pool.retire(old)
    pool.retire([other])
    again = [model.new_state("z", 2, hw, 5, 2, pool=pool).shard for hw in ((4, 6), (6, 6))]
    assert [a is s.shard for a, s in zip(again, (old[1], other), strict=True)] == [False, limit == 1]
    assert pool.reused == limit and pool.nbytes() == 0


def test_out_of_device_memory_frees_the_pool_and_tries_again():
    """An allocation that runs out of memory while storage is pooled is made again after the pool is freed; with
    nothing pooled, the error stands (control)."""
    model = workers(1)[0].model
    pool = StatePool()
    pool.retire([model.new_state("x", 2, (4, 6), 5, 2)])
    assert pool.nbytes() > 0
    calls = []

    def make(fail: int) -> str:
        calls.append(pool.nbytes())
        if len(calls) <= fail:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return "made"

    assert pool.allocate(lambda: make(1)) == "made" and calls == [calls[0], 0] and calls[0] > 0
    calls.clear()
    with pytest.raises(torch.OutOfMemoryError):
        pool.allocate(lambda: make(1))  # nothing pooled any more


def _segments(pooled: bool, n: int = 3, chunks: int = 4) -> tuple[list[torch.Tensor], list[list[list[tuple]]]]:
    """Stream "a" cut into ``n`` segments, each run until it has left the ring: the chunks, and per segment each
    stage's batch signatures."""
    ring = _ring(pooled)
    ring[0].add_prompt("a", 0, prompt(5))
    out, signatures = [], []
    for k in range(n):
        for w in ring:
            w.forward.signatures.clear()
        for j, z in enumerate(latents(10 + k, chunks, (4, 6))):
            msg = chunk_message("a", j, z, seed=5).model_copy(update={"seq": k * chunks + j, "segment": k})
            assert ring[0].add_chunk(msg)
        got = run_ring(ring)
        assert [(g.seq, g.segment) for g in got] == [(k * chunks + j, k) for j in range(chunks)]
        out += [g.latent for g in got]
        signatures.append([list(w.forward.signatures) for w in ring])
    return out, signatures


def test_segments_alternate_between_two_storages_and_replay_each_others_graphs():
    """A `cut` starts a new segment while the old one may still run, so its state is new; the old one's storage is
    retired once it has left the ring (first stage) or after the forward that starts the new one (the others).
    So segments alternate between two storages: segment 2 runs on segment 0's, with segment 0's signatures at every
    stage, and every chunk equals the ring's without the pool. Negative control: without the pool segment 2 shares
    no signature with segment 0."""
    want, plain = _segments(pooled=False)
    got, pooled = _segments(pooled=True)
    assert all(torch.equal(w, g) for w, g in zip(want, got, strict=True))
    assert pooled[2] == pooled[0] and pooled[1] != pooled[0]
    assert all(not set(a) & set(b) for a, b in zip(plain[0], plain[2], strict=True))

