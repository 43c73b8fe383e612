"""Recovery by replay, without transport: after a failure epoch, the stages rebuild a stream's KV from ingest's ring.

In-process ``StageWorker``s (every link message encoded and decoded) against ``StreamBatchRunner`` on the whole
stream. What is proved (docs/recovery.md): replaying the prepare chunk, the sink chunk and the last K chunks puts
every cache back exactly once ``K ≥ B·L·(R − 1)``; with the default K = R (the rolling window refilled), the first
``B·L·(R − 1) − K`` outputs differ and every later one is equal again; state and items of the old epoch are
dropped and counted, and replayed chunks are never published.
"""

from __future__ import annotations

import pytest
import torch

from dit_stage.worker import StageWorker
from ingest.replay import ReplayRing, exact_replay_chunks, sink_chunks, window_chunks
from oracle.stream_batch import StreamBatchConfig
from proto import LatentChunk, RingReturn, StageItems, decode
from tests.dit_service.helpers import (
    NUM_BLOCKS,
    as_chunk_latent,
    chunk_message,
    latents,
    prompt,
    reference,
    run_ring,
    workers,
)

# the service defaults (window 6, sink 3), adaptive sinks off: they make the sinks depend on the whole history
CONFIG = StreamBatchConfig(steps=2, noise_scale=0.7, kv_window=6, sink=3, adaptive_threshold=None)
SEED, CHUNKS, FAILED_AT = 11, 30, 16
EXACT = exact_replay_chunks(CONFIG.kv_window, CONFIG.sink, NUM_BLOCKS, CONFIG.steps)


@pytest.fixture(scope="module")
def stream() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The stream's encoded chunks and the reference outputs (the runner, uninterrupted)."""
    zs = latents(3, CHUNKS, (4, 6))
    return zs, reference({"a": (SEED, prompt(1), zs)}, CONFIG)["a"]


def _message(c: int, z: torch.Tensor, epoch: int = 0, seed: int = SEED) -> LatentChunk:
    return chunk_message("a", c, z, seed=seed, epoch=epoch, config=CONFIG)


def _run_with_failure(depth: int, zs: list[torch.Tensor]) -> tuple[list[StageWorker], list[LatentChunk]]:
    """Chunks 0..FAILED_AT−1 under epoch 0 (the last ones still in flight when the stage dies), then a failure
    epoch: every worker recovers, the ring (as ingest keeps it) is replayed, live chunks go on under epoch 1."""
    ring_workers = workers(3, CONFIG)
    first = ring_workers[0]
    first.add_prompt("a", 0, prompt(1))
    ring = ReplayRing(depth, sink_chunks(CONFIG.sink))
    for c in range(FAILED_AT):
        msg = _message(c, zs[c])
        assert first.add_chunk(msg)
        ring.add(msg)
    before = _run_rounds(ring_workers, FAILED_AT)  # the ring is mid-flight when it fails
    assert before and max(c.seq for c in before) < FAILED_AT - 1
    held = _one_link_message(ring_workers)  # an old-epoch frame still on a link
    for w in ring_workers:
        w.epoch = 1
        w.recover(1)
    for chunk in ring:
        assert first.add_chunk(chunk.model_copy(update={"replay": True, "epoch": 1}))
    for c in range(FAILED_AT, CHUNKS):
        assert first.add_chunk(_message(c, zs[c], epoch=1))
    _deliver(ring_workers, held)
    return ring_workers, run_ring(ring_workers)


def _run_rounds(ring: list[StageWorker], rounds: int) -> list[LatentChunk]:
    """``run_ring`` for a fixed number of rounds (one micro-step per worker per round), idle or not."""
    finished: list[LatentChunk] = []
    for _ in range(rounds):
        for i, w in enumerate(ring):
            step = w.take()
            if step is None:
                continue
            out = w.compute(step)
            finished.extend(decode(c.encode(), LatentChunk) for c in out.finished)
            for msg in out.link:
                _deliver(ring, ((i + 1) % len(ring), decode(msg.encode())))
    return finished


def _one_link_message(ring: list[StageWorker]) -> tuple[int, StageItems | RingReturn]:
    """Run the first worker's next micro-step and keep what it sends instead of delivering it."""
    step = ring[0].take()
    assert step is not None
    out = ring[0].compute(step)
    msg = out.link[-1]
    assert isinstance(msg, StageItems)
    return 1, decode(msg.encode())


def _deliver(ring: list[StageWorker], held: tuple[int, object]) -> None:
    to, msg = held
    if isinstance(msg, StageItems):
        ring[to].add_items(msg)
    elif isinstance(msg, RingReturn):
        ring[to].add_return(msg)
    else:
        ring[to].add_prompt(msg.stream_id, msg.version, msg.embedding)


def _errors(got: list[LatentChunk], want: list[torch.Tensor]) -> dict[int, float]:
    return {g.seq: float((g.latent - as_chunk_latent(want[g.seq])).abs().max()) for g in got if g.seq < len(want)}


def test_replaying_enough_chunks_rebuilds_every_cache_exactly(stream) -> None:
    zs, want = stream
    assert EXACT == 2 * 3 * 2  # B·L·(R − 1): 2 steps, 3 blocks, 3 rolling frames
    ring, got = _run_with_failure(EXACT, zs)
    # only live chunks come out, every one of them, in order; the replayed ones ran and were counted
    assert [g.seq for g in got] == list(range(FAILED_AT, CHUNKS))
    assert ring[-1].replayed == 1 + sink_chunks(CONFIG.sink) + EXACT
    errors = _errors(got, want)
    assert max(errors.values()) <= 1e-5, errors
    # everything of the old epoch was dropped and counted: queued items, the held link frame, the stream state
    assert sum(w.dropped["stale_epoch"] for w in ring) >= 2
    assert all(w.recovered_streams == 1 for w in ring)


def test_refilling_the_window_is_exact_from_the_dependency_horizon_on(stream) -> None:
    """K = R: outputs before chunk r0 + B·L·(R − 1) (r0 = first replayed rolling chunk) still feel the lost history;
    from there on they are equal. Also the negative control: the first chunk after recovery does differ."""
    zs, want = stream
    depth = window_chunks(CONFIG.kv_window, CONFIG.sink)
    assert depth == 3
    _, got = _run_with_failure(depth, zs)
    errors = _errors(got, want)
    horizon = FAILED_AT - depth + EXACT
    assert errors[FAILED_AT] > 1e-4, errors  # history matters: a replay this short is not exact yet
    assert max(e for seq, e in errors.items() if seq >= horizon) <= 1e-5, errors


def test_a_live_chunk_without_replay_cannot_run_on_a_recovered_stage() -> None:
    """After recovery a stage has no state for the stream: live chunks wait for the replayed prepare chunk."""
    zs = latents(3, 4, (4, 6))
    w = workers(1, CONFIG)[0]
    w.add_prompt("a", 0, prompt(1))
    for c in range(3):
        assert w.add_chunk(_message(c, zs[c]))
    w.epoch = 1
    w.recover(1)
    assert w.dropped["stale_epoch"] == 3 and not w.streams
    assert not w.add_chunk(_message(3, zs[3], epoch=0))  # the old epoch: stale
    assert not w.add_chunk(_message(3, zs[3], epoch=1))  # no prepare chunk: unprepared
    assert w.dropped["stale_epoch"] == 4 and w.dropped["unprepared"] == 1


def test_replayed_chunks_pass_the_live_queue_cap_and_deadlines() -> None:
    zs = latents(3, 8, (4, 6))
    w = workers(1, CONFIG, max_queued_chunks=2)[0]
    w.add_prompt("a", 0, prompt(1))
    for c in range(8):
        assert w.add_chunk(_message(c, zs[c]).model_copy(update={"replay": True, "deadline": 0.0}))
    assert len(w.streams["a"].new) == 8 and not w.dropped
    assert not run_ring([w])  # all ran, none published
    assert w.replayed == 8
