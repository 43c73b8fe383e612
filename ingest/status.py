"""Ingest's per-stream checkpoint in the stream table, and the reservation that keeps seq and segment monotonic.

Every ``ingest.status_interval_s`` (and when a session starts or ends) ingest writes, per live stream, an
``IngestStatus`` into the stream's ``StreamRecord`` (compare-and-set, ``StreamTable.update``): chunks published,
drops by reason, last seq, current segment. What the checkpoint holds is ``status_of``, the one place to add a field.

The same write moves the record's **reservation** (``next_seq``, ``next_segment``): every chunk ever published has a
lower seq and a lower segment. Ingest never publishes a chunk at or above it without first writing a larger one
(``IngestStream.reserved``, checked before each publish), and reserves ahead (``reservation_ahead``) so that the
periodic write is normally the only one. A new session of the stream (ingest restart, publisher reconnect after the
linger, T2V restart) starts at the reservation (``start_session``): a new segment, above every seq published before,
with a prepare chunk. So a stream's (seq, segment) never go backwards over its whole life, whoever served it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

from ingest.stream import IngestStream
from proto import ACTIVE_STATES, IngestStatus, StreamRecord, StreamSpec
from services.streams import StreamNotFound, StreamTable

__all__ = ["SEGMENTS_AHEAD", "StatusWriter", "reservation_ahead", "start_session", "status_of"]

log = logging.getLogger("rheo.ingest")

SEGMENTS_AHEAD = 2
"""Segments reserved: the one being encoded and one cut more (cuts are rare: prompt `cut`, steps, a lost prepare)."""


def reservation_ahead(spec: StreamSpec, interval_s: float) -> int:
    """Seqs reserved past the next chunk: two status intervals' worth. Every chunk has at least one frame, so a
    stream makes at most ``fps`` chunks a second."""
    return max(8, math.ceil(2 * interval_s * spec.fps))


def start_session(record: StreamRecord, ahead: int) -> tuple[StreamRecord, tuple[int, int]]:
    """A new session's first (seq, segment), the record's reservation, and the record reserving ``ahead`` seqs and
    ``SEGMENTS_AHEAD`` segments from there."""
    first = (record.next_seq, record.next_segment)
    return record.model_copy(update={"next_seq": first[0] + ahead, "next_segment": first[1] + SEGMENTS_AHEAD}), first


def status_of(stream: IngestStream, member: str) -> IngestStatus:
    """The checkpoint of ``stream`` written into its record (one line per field)."""
    return IngestStatus(
        member=member,
        published=stream.published,
        dropped=dict(stream.dropped),
        last_seq=stream.last_seq,
        segment=stream.segment,
        at=time.time(),
    )


class StatusWriter:
    """Writes live streams' checkpoints and reservations into the stream table (``run``: periodically; ``write``:
    at once, e.g. on a state change, with more record fields)."""

    def __init__(self, table: StreamTable, member: str, interval_s: float) -> None:
        self.table, self.member, self.interval_s = table, member, interval_s
        self._failing: set[str] = set()  # streams whose last periodic write failed (logged once per streak)

    def checkpoint(self, record: StreamRecord, stream: IngestStream, **update: Any) -> StreamRecord:
        """``record`` with ``stream``'s status and a reservation covering ``reservation_ahead`` seqs past the next
        chunk and ``SEGMENTS_AHEAD`` segments past the current one (never lower than it was)."""
        if record.state not in ACTIVE_STATES and "state" in update:
            update = {k: v for k, v in update.items() if k not in ("state", "state_reason")}  # it ended meanwhile
        upcoming = max(stream.next_seq, (stream.last_seq if stream.last_seq is not None else -1) + 1)
        segment = max(stream.segment, stream.source.segment if stream.source is not None else 0)
        return record.model_copy(update={
            "ingest": status_of(stream, self.member),
            "next_seq": max(record.next_seq, upcoming + reservation_ahead(stream.spec, self.interval_s)),
            "next_segment": max(record.next_segment, segment + SEGMENTS_AHEAD),
            **update,
        })

    async def write(self, stream: IngestStream, **update: Any) -> StreamRecord:
        """Compare-and-set ``stream``'s checkpoint (and ``update``'s record fields) into its record; the stream
        then knows the reservation written."""
        record = await self.table.update(stream.stream_id, lambda r: self.checkpoint(r, stream, **update))
        stream.reserved_seq, stream.reserved_segment = record.next_seq, record.next_segment
        stream.record = record
        return record

    async def reserve(self, stream: IngestStream, seq: int, segment: int) -> bool:
        """Make chunk (``seq``, ``segment``) publishable: a larger reservation is written first if needed. False: it
        could not be (the table is unreachable), and the chunk must not be published."""
        if stream.reserved(seq, segment):
            return True
        try:
            await self.write(stream)
        except Exception as e:
            log.warning("stream %s: seq reservation not written: %s: %s", stream.stream_id, type(e).__name__, e)
            return False
        return stream.reserved(seq, segment)

    async def run(self, streams: Callable[[], Iterable[IngestStream]]) -> None:
        """Every ``interval_s``: each live stream's checkpoint, and its due drop-log summaries."""
        while True:
            await asyncio.sleep(self.interval_s)
            live = list(streams())
            for stream in live:
                stream.drop_log.flush()
            await asyncio.gather(*(self._periodic(stream) for stream in live))

    async def _restore(self, stream: IngestStream) -> bool:
        """The record is gone: when the whole table went with it (a lost NATS store: the bucket is a new one), write
        the record back (and its key, so the publisher can reconnect) and go on; False: it was deleted."""
        kv = self.table.kv
        now = await kv.incarnation()
        if stream.record is None or now == stream.table_born:
            return False
        log.warning("stream %s: the stream table lost its record (NATS store lost?): writing it back",
                    stream.stream_id)
        await self.table.restore(self.checkpoint(stream.record, stream))
        stream.table_born = await kv.incarnation()
        await self.write(stream)
        return True

    async def _periodic(self, stream: IngestStream) -> None:
        sid = stream.stream_id
        try:
            try:
                await self.write(stream)
            except StreamNotFound:
                if not await self._restore(stream):
                    return  # deleted: the stream ends
        except Exception as e:
            if sid not in self._failing:
                log.warning("stream %s: status not written to the stream table: %s: %s", sid, type(e).__name__, e)
            self._failing.add(sid)
            return
        if sid in self._failing:
            self._failing.discard(sid)
            log.info("stream %s: status written again", sid)
