"""Ingest over real RTMP and a real nats-server: drops show in the stream record, and a stream's seq and segment
never go backwards when its ingest dies and another takes the publisher back (docs/ingest-service.md)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from media_io.mediakit import free_port, publish_pyav

from ingest.drops import CHUNKS_DROPPED
from ingest.service import IngestService
from proto import CHANNELS, SLO, Heartbeat, LatentChunk, StreamEvent, StreamSpec, Subjects
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.streams import StreamNotFound, StreamTable, new_stream_id
from support.sync import running

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
LATENCY_MS = 60000.0  # no deadline drops on a loaded CI machine: the drops here are the ones each test makes
STATUS_S = 0.3
DEPTH = 4


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ingest(nats_settings: NatsSettings) -> AsyncIterator[IngestService]:
    settings = Settings(
        nats=nats_settings, telemetry={"metrics_port": 0},
        lifecycle={"http_host": "127.0.0.1", "heartbeat_interval_s": 0.2},
        ingest={"rtmp_host": "127.0.0.1", "rtmp_port": 0, "chunk_queue_depth": DEPTH, "stream_linger_s": 0.3,
                "status_interval_s": STATUS_S, "admission_without_controller": "admit"},  # no controller here
    )
    async with running(IngestService(settings, member_id="ingest-continuity")) as service:
        yield service


@pytest.fixture
async def table(bus: Bus) -> AsyncIterator[StreamTable]:
    t = await StreamTable.open(bus)
    created = len(await t.list())
    yield t
    for record in (await t.list())[created:]:  # leave the session's shared table as it was
        with contextlib.suppress(StreamNotFound):
            await t.delete(record.spec.stream_id)


async def new_stream(table: StreamTable, prompt: str) -> tuple[StreamSpec, str]:
    spec = StreamSpec(stream_id=new_stream_id(), width=SIZE, height=SIZE, fps=16.0, steps=2, prompt=prompt,
                      slo=SLO(max_latency_ms=LATENCY_MS))
    _, key = await table.create(spec)
    return spec, key


class Recorder:
    def __init__(self) -> None:
        self.chunks: list[LatentChunk] = []
        self.events: list[StreamEvent] = []

    async def attach(self, bus: Bus, sid: str) -> Recorder:
        async def on_chunk(m: LatentChunk, _raw) -> None:
            self.chunks.append(m)

        async def on_event(m: StreamEvent, _raw) -> None:
            self.events.append(m)

        await bus.subscribe(Subjects.stream_latent(sid), on_chunk, expected=LatentChunk, credit=True)
        await bus.subscribe(Subjects.stream_event(sid), on_event, expected=StreamEvent)
        await bus.nc.flush()
        return self

    def ended(self) -> bool:
        return any(e.kind == "ended" for e in self.events)


async def test_queue_overflow_shows_in_the_record_and_spares_the_prepare_chunk(
        ingest: IngestService, table: StreamTable, bus: Bus, eventually) -> None:
    """The model thread is busy while 11 chunks arrive: the queue (depth 4) drops the oldest chunks but the prepare
    chunk; the drops are counted (metric, record) while the stream is live, and the stream plays from chunk 0."""
    spec, key = await new_stream(table, "a crowded queue")
    sid = spec.stream_id
    rec = await Recorder().attach(bus, sid)
    before = CHUNKS_DROPPED.labels(reason="queue_overflow")._value.get()
    busy = threading.Event()
    ingest._compute.submit(busy.wait, 60)
    try:
        result = await publish_pyav(f"rtmp://127.0.0.1:{ingest.rtmp.port}/live/{key}", 45, 16, "64x64",
                                    "--realtime")
        assert result.report.get("ok"), result.report

        async def dropped_while_live() -> int:
            record = await table.get(sid)
            return record.ingest.dropped.get("queue_overflow", 0) if record.ingest and record.state == "live" else 0

        deadline = time.monotonic() + 20
        while await dropped_while_live() != 11 - DEPTH:  # the periodic checkpoint shows them while live
            assert time.monotonic() < deadline, (await table.get(sid)).ingest
            await asyncio.sleep(0.05)
    finally:
        busy.set()
    await eventually(rec.ended, timeout=30)
    seqs = [c.seq for c in rec.chunks]
    assert seqs == [0, 8, 9, 10]  # the prepare chunk, then the newest (45 frames: 5 + 4·10)
    assert rec.chunks[0].latent.shape[0] == 2 and all(c.segment == 0 for c in rec.chunks)
    assert CHUNKS_DROPPED.labels(reason="queue_overflow")._value.get() - before == 11 - DEPTH
    record = await table.get(sid)
    assert record.state == "ended" and record.ingest is not None
    assert (record.ingest.published, record.ingest.dropped, record.ingest.last_seq) == (4, {"queue_overflow": 7}, 10)
    assert record.next_seq > 10 and record.next_segment > 0


async def _ready_subprocess(bus: Bus, port: int, nats_url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RHEO_NATS__URL": nats_url, "RHEO_TELEMETRY__METRICS_PORT": "0",
           "RHEO_LIFECYCLE__HTTP_HOST": "127.0.0.1", "RHEO_LIFECYCLE__HEARTBEAT_INTERVAL_S": "0.2",
           "RHEO_INGEST__RTMP_HOST": "127.0.0.1", "RHEO_INGEST__RTMP_PORT": str(port),
           "RHEO_INGEST__STATUS_INTERVAL_S": str(STATUS_S), "RHEO_INGEST__ADMISSION_WITHOUT_CONTROLLER": "admit"}
    proc = subprocess.Popen([sys.executable, "-m", "ingest.service"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, text=True)
    beats: list[Heartbeat] = []

    async def on_beat(hb: Heartbeat, _raw) -> None:
        beats.append(hb)

    sub = await bus.subscribe(CHANNELS["ctl_heartbeat"].wildcard(), on_beat, expected=Heartbeat)
    try:
        deadline = time.monotonic() + 120
        while not any(b.ready and b.member_id.endswith(f"-{proc.pid}") for b in beats):
            assert time.monotonic() < deadline and proc.poll() is None, "ingest never became ready"
            await asyncio.sleep(0.05)
    finally:
        await sub.unsubscribe()
    return proc


async def test_a_killed_ingest_is_continued_above_every_seq_at_a_new_segment(
        ingest: IngestService, table: StreamTable, bus: Bus, nats_settings: NatsSettings, eventually) -> None:
    """Ingest A is SIGKILLed mid-stream (its record still says `live`); the publisher comes back to ingest B, which
    accepts it at once and continues the stream at the record's reservation: seq above every chunk A published, a new
    segment, beginning with a prepare chunk."""
    port = free_port()
    a = await _ready_subprocess(bus, port, nats_settings.url)
    try:
        spec, key = await new_stream(table, "a stream that outlives its ingest")
        sid = spec.stream_id
        rec = await Recorder().attach(bus, sid)
        publisher = asyncio.create_task(publish_pyav(f"rtmp://127.0.0.1:{port}/live/{key}", 320, 16, "64x64",
                                                     "--realtime"))
        await eventually(lambda: len(rec.chunks) >= 6, timeout=60)
        await asyncio.sleep(2 * STATUS_S)  # at least one periodic checkpoint after the first chunks
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        await asyncio.wait_for(publisher, 60)  # the publisher sees its connection go
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    old = list(rec.chunks)
    died = await table.get(sid)
    assert died.state == "live" and died.ingest is not None and died.ingest.member.endswith(f"-{a.pid}")
    assert died.ingest.published > 0 and died.next_seq > old[-1].seq
    assert old[0].seq == 0 and [c.seq for c in old] == sorted({c.seq for c in old}) and {c.segment for c in old} == {0}

    started = time.monotonic()
    result = await publish_pyav(f"rtmp://127.0.0.1:{ingest.rtmp.port}/live/{key}", 21, 16, "64x64", "--realtime")
    assert result.report.get("ok"), result.report  # accepted by B although the record said `live`
    await eventually(rec.ended, timeout=30)
    assert time.monotonic() - started < 30
    new = rec.chunks[len(old):]
    first = new[0]
    assert (first.seq, first.segment) == (died.next_seq, died.next_segment)  # the reservation: above all of A's
    assert first.seq > old[-1].seq and first.segment > 0
    assert (first.latent_start, first.rope_start, first.latent.shape[0]) == (0, 0, 2)  # a prepare chunk
    assert [c.seq for c in new] == list(range(first.seq, first.seq + 5))  # 21 frames: 5 + 4·4
    assert {c.segment for c in new} == {first.segment}
    assert [(c.latent_start, c.rope_start) for c in new[1:]] == [(c + 1, c + 1) for c in range(1, 5)]
    assert [e.kind for e in rec.events] == ["live", "live", "ended"] and rec.events[-1].seq == new[-1].seq
    after = await table.get(sid)
    assert after.state == "ended" and after.ingest is not None and after.ingest.member == "ingest-continuity"
    assert (after.ingest.published, after.ingest.last_seq) == (5, new[-1].seq)
    assert after.next_seq > new[-1].seq and after.next_segment > first.segment
