"""Ingest's liveness watch over real NATS (docs/recovery.md, Liveness): a T2V stream (no publisher needed) whose
chunks a fake decoder answers with ``StreamOutput``. While output flows nothing is repaired and the record says
live; when it stops, a new warm-up segment follows within the bound and the record says recovering, with why;
output back makes it live again; the first stage's ``unprepared`` request cuts a new segment at once."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest_asyncio

from ingest.service import IngestService
from proto import SLO, Error, LatentChunk, StreamOutput, StreamSpec, Subjects
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.streams import StreamTable, new_stream_id
from support.sync import running

FLOOR_S = 2.0


@pytest_asyncio.fixture(loop_scope="session")
async def ingest(nats_settings: NatsSettings, tmp_path) -> AsyncIterator[IngestService]:
    settings = Settings(nats=nats_settings, telemetry={"metrics_port": 0},
                        lifecycle={"http_host": "127.0.0.1", "heartbeat_interval_s": 0.2},
                        ingest={"rtmp_host": "127.0.0.1", "rtmp_port": 0, "status_interval_s": 0.5,
                                "liveness_floor_s": FLOOR_S, "admission_without_controller": "admit"})
    async with running(IngestService(settings, member_id="ingest-liveness")) as service:
        yield service


class FakeDecoder:
    """Answers every chunk with a ``StreamOutput`` while ``on`` (what the decoder reports)."""

    def __init__(self, bus: Bus, sid: str) -> None:
        self.bus, self.sid, self.on, self.decoded = bus, sid, True, 0
        self.chunks: list[LatentChunk] = []

    async def attach(self) -> None:
        async def on_chunk(chunk: LatentChunk, _raw) -> None:
            self.chunks.append(chunk)
            if self.on:
                self.decoded += 1
                await self.bus.publish(Subjects.stream_output(self.sid), StreamOutput(
                    stream_id=self.sid, seq=chunk.seq, segment=chunk.segment, decoded=self.decoded, at=time.time()))

        await self.bus.subscribe(Subjects.stream_latent(self.sid), on_chunk, expected=LatentChunk, credit=True)
        await self.bus.nc.flush()

    def segments(self) -> list[int]:
        return sorted({c.segment for c in self.chunks})


async def test_a_stream_whose_output_stops_is_repaired_and_says_so(ingest: IngestService, bus: Bus,
                                                                   eventually) -> None:
    table = await StreamTable.open(bus)
    # 0.5 s SLO, 0.25 s chunks: the bound is max(2 s floor, 0.5 + 4 x 0.25) = 2 s
    spec = StreamSpec(stream_id=new_stream_id(), width=64, height=64, fps=16.0, steps=2, prompt="p", t2v=True,
                      slo=SLO(max_latency_ms=500))
    sid = spec.stream_id
    decoder = FakeDecoder(bus, sid)
    await decoder.attach()
    await table.create(spec)
    try:
        await eventually(lambda: len(decoder.chunks) >= 4, timeout=20)
        state = lambda: ingest.live[sid].liveness.state  # noqa: E731
        # output flows for twice the bound: no repair, one segment
        t0 = time.monotonic()
        await eventually(lambda: time.monotonic() - t0 > 2 * FLOOR_S, timeout=10)
        assert len(decoder.segments()) == 1 and state() == "live"
        # output stops: a new segment within the bound (+ a tick and a chunk period), the record says why
        decoder.on = False
        stopped, n = time.monotonic(), len(decoder.chunks)
        await eventually(lambda: len(decoder.segments()) == 2, timeout=3 * FLOOR_S + 5)
        took = time.monotonic() - stopped
        assert FLOOR_S <= took <= FLOOR_S + 2.5, took
        first_new = next(c for c in decoder.chunks[n:] if c.segment == decoder.segments()[-1])
        assert first_new.latent_start == 0  # a prepare chunk
        record = await table.get(sid)
        await eventually(lambda: state() == "recovering", timeout=5)
        record = await table.get(sid)
        assert record.state == "recovering" and "styled output stopped" in record.state_reason, record
        # output back: live again
        decoder.on = True
        await eventually(lambda: state() == "live", timeout=10)
        # the first stage asks for a new segment: one comes at once
        segments = len(decoder.segments())
        await bus.publish(Subjects.stream_error(sid), Error(code="unprepared", stream_id=sid, message="no state"))
        await eventually(lambda: len(decoder.segments()) == segments + 1, timeout=5)
        record = await table.get(sid)
        assert record.state in ("recovering", "live")
    finally:
        await table.delete(sid)
