"""Ingest's drop accounting, lost-prepare recovery and seq reservation, on their own (no bus, no model).

Every chunk that is not published is counted with a reason (metric, stream, rate-limited log); a segment that lost
its prepare chunk, wherever it was lost, is abandoned for a new one; and a stream's (seq, segment) never go below
the reservation in its record, which a new session starts from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from ingest.drops import CHUNKS_DROPPED, DropLog, count_drop
from ingest.pacing import Chunker, ChunkQueue, RawChunk
from ingest.status import SEGMENTS_AHEAD, StatusWriter, reservation_ahead, start_session
from ingest.stream import IngestStream
from proto import StreamRecord, StreamSpec
from proto.clock import ChunkClock

SPEC = StreamSpec(stream_id="s1", width=64, height=64, fps=16.0, steps=2, prompt="p")


def _dropped(reason: str) -> float:
    return CHUNKS_DROPPED.labels(reason=reason)._value.get()


class Source:
    """A chunk source as the service sees one: a chunker feeding a bounded queue."""

    def __init__(self, depth: int, first: tuple[int, int] = (0, 0)) -> None:
        self.chunker = Chunker("s1", ChunkClock(), latency_budget_s=60.0, seq=first[0], segment=first[1])
        self.queue = ChunkQueue(depth)
        self.first = first
        self.frame = 0

    @property
    def segment(self) -> int:
        return self.chunker.segment

    @property
    def segment_start(self) -> int:
        return self.chunker.segment_start

    def cut(self) -> int:
        return self.chunker.cut()

    def feed(self, frames: int) -> None:
        for _ in range(frames):
            chunk = self.chunker.push(np.zeros((2, 2, 3), np.uint8), time.time() + self.frame / 16)
            self.frame += 1
            if chunk is not None:
                self.queue.put(chunk)


def _drain(queue: ChunkQueue) -> list[RawChunk]:
    out = []
    while len(queue):
        out.append(queue._items.popleft())
    return out


def test_queue_overflow_is_counted_for_the_stream_and_the_metric() -> None:
    stream = IngestStream.new(SPEC, prompt_version=0, replay_chunks=2)
    source = Source(depth=2)
    before = _dropped("queue_overflow")
    source.feed(5 + 4)  # two chunks before the stream takes the queue: no drop yet
    stream.attach(source)
    source.feed(4 * 3)  # three more: the queue (depth 2) keeps the prepare chunk and the newest
    assert stream.dropped == {"queue_overflow": 3} and _dropped("queue_overflow") - before == 3
    assert [c.seq for c in _drain(source.queue)] == [0, 4]

    early = Source(depth=1)
    early.feed(5 + 4 + 4)  # overflows before any stream took it: the metric counts at once, the stream on attach
    assert _dropped("queue_overflow") - before == 5
    late = IngestStream.new(SPEC, prompt_version=0, replay_chunks=2)
    late.attach(early)
    assert late.dropped == {"queue_overflow": 2} and _dropped("queue_overflow") - before == 5


def test_a_chunk_of_an_unknown_reason_is_refused() -> None:
    with pytest.raises(ValueError):
        count_drop("mystery")  # type: ignore[arg-type]


async def test_a_lost_prepare_chunk_costs_one_segment_whichever_way_it_was_lost() -> None:
    """The prepare chunk is lost at publish (past its deadline): the segment's later chunks cannot run, so they are
    dropped and the source cuts a new segment; its prepare chunk (5 frames, latent positions from 0) is taken."""
    stream = IngestStream.new(SPEC, prompt_version=0, replay_chunks=2, first=(40, 3))
    source = Source(depth=16, first=(40, 3))
    stream.attach(source)
    source.feed(5 + 4 + 4)
    chunks = _drain(source.queue)
    assert [(c.seq, c.segment, c.prepares) for c in chunks] == [(40, 3, True), (41, 3, False), (42, 3, False)]
    before = _dropped("segment_unprepared")
    assert stream.begin(chunks[0])
    assert stream.segment_start == 40 and not stream.prepared
    stream.window = object()  # type: ignore[assignment]  # never reached: the chunk is past its deadline
    lost = stream.chunk(chunks[0], torch.zeros(2, 4, 8, 8), 0.8, deadline=time.time() - 1, epoch=0,
                        clock=ChunkClock())
    await stream.publish(lost)
    assert stream.dropped["deadline"] == 1 and not stream.prepared
    assert not stream.begin(chunks[1]) and not stream.begin(chunks[2])
    assert stream.dropped["segment_unprepared"] == 2 and _dropped("segment_unprepared") - before == 2
    assert source.segment == 4  # cut once, not once per dropped chunk
    source.feed(5)
    (prepare,) = _drain(source.queue)
    assert (prepare.seq, prepare.segment, prepare.num_frames) == (43, 4, 5) and stream.begin(prepare)
    latent = stream.chunk(prepare, torch.zeros(2, 4, 8, 8), 0.8, deadline=time.time() + 60, epoch=0, clock=ChunkClock())
    assert (latent.latent_start, latent.rope_start, latent.segment) == (0, 0, 4)  # positions count from the segment


def test_drop_log_is_rate_limited_per_reason(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    drops = DropLog("stream s1", logger=logging.getLogger("rheo.ingest"), interval_s=10.0, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="rheo.ingest")
    drops.note("queue_overflow", "chunk 1")
    for seq in range(2, 39):
        now[0] += 0.1
        drops.note("queue_overflow", f"chunk {seq}")
    drops.note("deadline", "chunk 7")
    assert [r.getMessage() for r in caplog.records] == [
        "stream s1: a chunk dropped (queue_overflow): chunk 1", "stream s1: a chunk dropped (deadline): chunk 7"]
    drops.flush()
    assert len(caplog.records) == 2  # not due yet
    now[0] = 110.5
    drops.flush()
    assert caplog.records[-1].getMessage() == ("stream s1: 37 chunks dropped (queue_overflow) in the last 10 s "
                                               "(latest: chunk 38)")
    drops.note("queue_overflow", "chunk 40")
    drops.flush(force=True)
    assert caplog.records[-1].getMessage().startswith("stream s1: 1 chunks dropped (queue_overflow)")
    assert len(caplog.records) == 4


class Table:
    """``StreamTable.update`` over one in-memory record (compare-and-set is the real table's business)."""

    def __init__(self, record: StreamRecord) -> None:
        self.record, self.fail = record, False

    async def update(self, _sid: str, change: Callable[[StreamRecord], StreamRecord]) -> StreamRecord:
        if self.fail:
            raise TimeoutError("the table is unreachable")
        self.record = change(self.record)
        return self.record


def _record() -> StreamRecord:
    return StreamRecord(spec=SPEC, key_hash="0" * 64, created_at=1.0, updated_at=1.0)


async def test_chunks_are_published_only_below_the_reservation_and_a_new_session_starts_above() -> None:
    table = Table(_record())
    writer = StatusWriter(table, "ingest-a", interval_s=2.0)  # type: ignore[arg-type]
    ahead = reservation_ahead(SPEC, 2.0)
    assert ahead == 64  # 2 intervals at 16 chunks/s at most (a chunk has >= 1 frame)
    table.record, first = start_session(table.record, ahead)
    assert first == (0, 0) and (table.record.next_seq, table.record.next_segment) == (ahead, SEGMENTS_AHEAD)

    stream = IngestStream.new(SPEC, prompt_version=0, replay_chunks=2, first=first)
    stream.reserved_seq, stream.reserved_segment = table.record.next_seq, table.record.next_segment
    published = []
    for seq in range(3 * ahead):  # every chunk passes the check the service makes before publishing
        segment = seq // 50  # a cut every 50 chunks
        stream.next_seq, stream.segment = seq + 1, segment
        if await writer.reserve(stream, seq, segment):
            published.append((seq, segment))
            stream.last_seq = seq
        assert table.record.next_seq > published[-1][0] and table.record.next_segment > segment
    assert len(published) == 3 * ahead
    assert table.record.ingest is not None and table.record.ingest.member == "ingest-a"

    table.fail = True  # the table is gone: nothing past the reservation goes out
    beyond = table.record.next_seq
    assert await writer.reserve(stream, beyond - 1, stream.segment)
    assert not await writer.reserve(stream, beyond, stream.segment)

    table.fail = False  # ingest dies; a new session of the stream starts above all of it, at a new segment
    _, (seq, segment) = start_session(table.record, ahead)
    assert seq > max(s for s, _ in published) and segment > max(g for _, g in published)
