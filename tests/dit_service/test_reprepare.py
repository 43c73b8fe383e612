"""A stream the first stage can no longer prepare is never left to drop chunks silently for ever: a prepare chunk
lost in the ring frees its state (counted), and chunks refused for want of a prepare chunk ask ingest for a new
segment on the stream's error subject (issue #12 item 2: "a lost prepare item is re-sent, or the stream
re-prepared")."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from dit_stage import service as stage_service
from dit_stage.admission import PREPARE_LOST_GRACE_S
from dit_stage.service import REPREPARE_ASK_S, UNPREPARED, DitStageService
from proto import Error, Subjects
from services.bus import Bus
from services.config import NatsSettings, Settings

from .helpers import chunk_message, latents, prompt, run_ring, workers


def test_a_prepare_chunk_lost_in_the_ring_frees_the_stream_after_its_deadline():
    zs = latents(5, 4, (4, 6))
    now = [time.time()]
    ring = workers(1, clock=lambda: now[0])
    w = ring[0]
    w.add_prompt("a", 0, prompt(1))
    assert w.add_chunk(chunk_message("a", 0, zs[0], seed=1, deadline=now[0] + 5))
    step = w.take()
    assert step is not None and [(m.seq, m.step) for m in step.items] == [(0, 0)]
    w.compute(step)  # its ring return is lost (a link frame dropped; no failure epoch follows)
    assert w.add_chunk(chunk_message("a", 1, zs[1], seed=1))  # queued behind a prepare that never completes
    assert w.take() is None and "a" in w.streams  # still awaited: not before its deadline
    now[0] += 5 + PREPARE_LOST_GRACE_S / 2
    assert w.take() is None and "a" in w.streams  # past its deadline, within the grace: slow, maybe not lost
    now[0] += PREPARE_LOST_GRACE_S
    assert w.take() is None
    assert "a" not in w.streams and w.dropped["prepare_lost"] == 1 and w.dropped["unprepared"] == 1
    assert not w.add_chunk(chunk_message("a", 2, zs[2], seed=1))
    assert w.dropped["unprepared"] == 2  # refused: this is what asks ingest for a new segment
    # a new segment's prepare chunk (what ingest sends then) prepares the stream again
    assert w.add_chunk(chunk_message("a", 0, zs[3], seed=1).model_copy(update={"seq": 3, "segment": 1}))
    assert [g.seq for g in run_ring(ring)] == [3]


async def test_chunks_refused_unprepared_for_a_while_ask_for_a_new_segment(nats_settings: NatsSettings, bus: Bus,
                                                                           eventually, monkeypatch) -> None:
    svc = DitStageService(Settings(nats=nats_settings, telemetry={"metrics_port": 0},
                                   dit_stage={"stage_id": "rp-dit-0"}))
    svc.bus = bus
    asked: list[Error] = []

    async def on_error(err: Error, _raw: object) -> None:
        asked.append(err)

    sub = await bus.subscribe(Subjects.stream_error("rp-stream"), on_error, expected=Error)
    await bus.nc.flush()
    clock = [1000.0]
    monkeypatch.setattr(stage_service, "time", SimpleNamespace(monotonic=lambda: clock[0]))  # this module's only
    try:
        for _ in range(4):  # refusals for less than REPREPARE_ASK_S: transient (a live chunk ahead of a replay)
            svc._ask_reprepare("rp-stream")
            clock[0] += REPREPARE_ASK_S / 4
        await asyncio.sleep(0.3)
        assert asked == []
        svc._ask_reprepare("rp-stream")  # refused for REPREPARE_ASK_S now
        await eventually(lambda: len(asked) == 1, timeout=10)
        assert asked[0].code == UNPREPARED and asked[0].stream_id == "rp-stream"
        svc._ask_reprepare("rp-stream")  # at most one request per interval while it lasts
        clock[0] += 3 * REPREPARE_ASK_S  # ... and a refusal after a long quiet spell starts a new run
        svc._ask_reprepare("rp-stream")
        await asyncio.sleep(0.3)
        assert len(asked) == 1
    finally:
        await sub.unsubscribe()
        await svc._tasks.cancel()
