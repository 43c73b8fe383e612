"""Why ingest drops a chunk: the fixed set of reasons, the metric, and the rate-limited log every drop goes through.

Every chunk ingest does not publish is counted in ``rheo_ingest_chunks_dropped_total{reason}`` (a fixed label set:
``DROP_REASONS``), in its stream's ``IngestStream.dropped`` and so in its stream record, and logged through one
``DropLog`` per stream: the first drop of a reason at once, with its detail, then at most one summary line per reason
every ``interval_s`` ("stream X: 37 chunks dropped (queue_overflow) in the last 10 s"), so a stream dropping every
chunk cannot flood the log (``services.droplog.DropLog``, the one rate-limited drop log of every service).
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

from prometheus_client import Counter

from services import telemetry
from services.droplog import DropLog

__all__ = ["CHUNKS_DROPPED", "DROP_REASONS", "DropLog", "DropReason", "count_drop", "stream_drop_log"]

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
    if reason == "deadline":
        telemetry.deadline_missed("ingest", n)


def stream_drop_log(stream_id: str) -> DropLog:
    """The drop log of one ingest stream ("stream <id>: a chunk dropped (reason): ...")."""
    return DropLog(f"stream {stream_id}", noun="chunk", logger=log)
