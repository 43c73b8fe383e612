"""Acknowledged epochs (``services/epochs.py``) over a real nats-server: the waiters see an epoch only once every
stage of its map announced it, and ingest's replay of a failure epoch waits for that (issue #12 item 2)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import torch

from ingest.stream import IngestStream
from proto import BlockMap, Buckets, LatentChunk, StageAssignment, StreamSpec, Subjects, stage_prepared_key
from proto.spec import chunk_timesteps
from services.bus import Bus
from services.epochs import announced, wait_prepared

STAGES = ["ep-a", "ep-b"]


def _map(epoch: int) -> BlockMap:
    return BlockMap(epoch=epoch, num_blocks=2, reason="failure",
                    stages=[StageAssignment(stage_id=s, block_start=i, block_end=i + 1) for i, s in enumerate(STAGES)])


async def _announce(bus: Bus, stage: str, epoch: int) -> None:
    await (await bus.kv(Buckets.BLOCKMAP)).put(stage_prepared_key(stage), str(epoch).encode())


async def _forget(bus: Bus) -> None:
    kv = await bus.kv(Buckets.BLOCKMAP)
    for s in STAGES:
        with contextlib.suppress(Exception):
            await kv.delete(stage_prepared_key(s))


async def test_an_epoch_is_acknowledged_once_every_stage_announced_it(bus: Bus) -> None:
    kv = await bus.kv(Buckets.BLOCKMAP)
    try:
        await _announce(bus, "ep-a", 7)
        await _announce(bus, "ep-b", 6)  # still on the epoch before
        assert await announced(kv, "ep-a", 7) and not await announced(kv, "ep-b", 7)
        t0 = time.monotonic()
        assert await wait_prepared(kv, _map(7), timeout_s=0.3) == ["ep-b"]
        assert time.monotonic() - t0 >= 0.3
        assert await wait_prepared(kv, _map(7), still=lambda: False) == ["ep-b"]  # superseded: stop at once

        waiter = asyncio.create_task(wait_prepared(kv, _map(7), timeout_s=30))
        await asyncio.sleep(0.3)
        assert not waiter.done()
        await _announce(bus, "ep-b", 8)  # a later epoch counts too
        assert await asyncio.wait_for(waiter, 10) == []
    finally:
        await _forget(bus)


async def test_a_replay_waits_for_the_acknowledgement(bus: Bus, eventually) -> None:
    """Replayed chunks reach the first stage only after every stage of the failure map announced it."""
    spec = StreamSpec(stream_id="ep-replay", width=64, height=64, fps=16.0, steps=2, prompt="p")
    stream = IngestStream.new(spec, prompt_version=0, replay_chunks=3)
    for seq in range(3):
        stream.replay.add(LatentChunk(stream_id=spec.stream_id, seed=0, fps=16.0, seq=seq, epoch=1, latent_start=seq,
                                      rope_start=seq, capture_time=1.0, deadline=2.0, prompt_version=0,
                                      noise_scale=0.8, timesteps=chunk_timesteps(2, 0.8),
                                      latent=torch.randn(1, 4, 8, 8)))
    got: list[tuple[float, LatentChunk]] = []

    async def on_chunk(chunk: LatentChunk, _raw: object) -> None:
        got.append((time.monotonic(), chunk))

    sub = await bus.subscribe(Subjects.stream_latent(spec.stream_id), on_chunk, expected=LatentChunk, credit=True)
    stream.window = await bus.credit_window(Subjects.stream_latent(spec.stream_id)).start()
    kv = await bus.kv(Buckets.BLOCKMAP)
    try:
        await _announce(bus, "ep-a", 2)
        await _announce(bus, "ep-b", 1)  # still loading its blocks for epoch 2

        async def acknowledged() -> None:
            await wait_prepared(kv, _map(2), timeout_s=30)

        ready = asyncio.create_task(acknowledged())
        replay = asyncio.create_task(stream.replay_under(2, lambda: 2, ready=ready))
        await asyncio.sleep(0.5)
        assert got == [] and not replay.done()  # nothing replayed while a stage has not announced the epoch
        acked_at = time.monotonic()
        await _announce(bus, "ep-b", 2)
        await asyncio.wait_for(replay, 10)
        await eventually(lambda: len(got) == 3, timeout=10)
        assert all(at >= acked_at for at, _ in got)
        assert [(c.seq, c.epoch, c.replay) for _, c in got] == [(0, 2, True), (1, 2, True), (2, 2, True)]
    finally:
        await sub.unsubscribe()
        await _forget(bus)
