"""Why ingest drops a chunk: the fixed set of reasons, the metric, and the rate-limited log every drop goes through.

Every chunk ingest does not publish is counted in ``rheo_ingest_chunks_dropped_total{reason}`` (a fixed label set:
``DROP_REASONS``), in its stream's ``IngestStream.dropped`` and so in its stream record, and logged through one
``DropLog`` per stream: the first drop of a reason at once, with its detail, then at most one summary line per reason
every ``interval_s`` ("stream X: 37 chunks dropped (queue_overflow) in the last 10 s"), so a stream dropping every
chunk cannot flood the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from prometheus_client import Counter

__all__ = ["CHUNKS_DROPPED", "DROP_REASONS", "DropLog", "DropReason", "count_drop"]

log = logging.getLogger("rheo.ingest")

DropReason = Literal[
    "queue_overflow",  # the stream's chunk queue was full (the model or the bus is behind): its oldest non-prepare
    "segment_unprepared",  # the chunk's warm-up segment lost its prepare chunk: a new segment is cut instead
    "deadline",  # could not be published before its deadline (late encode, no credit from the first DiT stage)
    "encode_error",  # the VAE encode raised
    "publish_error",  # the bus refused it (too large, connection error)
    "unreserved",  # its seq could not be reserved in the stream record first (docs/ingest-service.md, continuity)
    "not_live",  # the stream could not go live (its media has nowhere to go)
    "replay_error",  # a replayed chunk (after a stage failure) could not be republished
]
DROP_REASONS: tuple[str, ...] = get_args(DropReason)

CHUNKS_DROPPED = Counter("rheo_ingest_chunks_dropped_total", "chunks dropped by ingest, by reason", ["reason"])
for _reason in DROP_REASONS:  # every reason is exported from the start (0 until it happens)
    CHUNKS_DROPPED.labels(reason=_reason)


def count_drop(reason: DropReason, n: int = 1) -> None:
    """The metric alone (a chunk of no stream yet); a live stream's drops go through ``IngestStream.drop``."""
    if reason not in DROP_REASONS:
        raise ValueError(f"unknown drop reason {reason!r}")
    CHUNKS_DROPPED.labels(reason=reason).inc(n)


@dataclass
class _Pending:
    count: int = 0
    since: float = 0.0
    latest: str = ""


class DropLog:
    """Rate-limited drop logging for one stream: the first drop of a reason is logged with its detail; later ones are
    summed and logged as one line per reason at most every ``interval_s`` (by ``note`` or ``flush``)."""

    def __init__(self, stream_id: str, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream_id, self.interval_s, self.clock = stream_id, interval_s, clock
        self._logged: dict[str, float] = {}  # reason → when its last line was written
        self._pending: dict[str, _Pending] = {}

    def note(self, reason: str, detail: str, n: int = 1) -> None:
        now = self.clock()
        last = self._logged.get(reason)
        if last is None:
            self._logged[reason] = now
            log.warning("stream %s: %s dropped (%s): %s", self.stream_id,
                        "a chunk" if n == 1 else f"{n} chunks", reason, detail)
            return
        pending = self._pending.setdefault(reason, _Pending(since=last))
        pending.count += n
        pending.latest = detail
        if now - last >= self.interval_s:
            self._summary(reason, now)

    def flush(self, force: bool = False) -> None:
        """Log the summaries that are due (all of them with ``force``: the stream ends)."""
        now = self.clock()
        for reason in list(self._pending):
            if force or now - self._logged[reason] >= self.interval_s:
                self._summary(reason, now)

    def _summary(self, reason: str, now: float) -> None:
        pending = self._pending.pop(reason)
        self._logged[reason] = now
        log.warning("stream %s: %d chunks dropped (%s) in the last %.0f s (latest: %s)", self.stream_id,
                    pending.count, reason, now - pending.since, pending.latest)
