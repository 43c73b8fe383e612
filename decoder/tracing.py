"""A chunk's hop through the decoder in its trace, and which ``EncodedVideo`` message carries it on to egress.

``decoder.decode`` is a child of the last DiT stage's span (the chunk's ``trace``). The CFR pacer decouples chunks
from messages, so the message holding a chunk's first frame (matched by its capture time, which the pacer and the
encoder keep) is published in the decode span's context, with ``telemetry.CHUNK_HEADER``: egress's
``egress.package`` span continues it (docs/observability.md).
"""

from __future__ import annotations

import collections
import time

from opentelemetry.trace import Span, StatusCode

from proto import LatentChunk, VideoUnit
from services import telemetry

__all__ = ["OutputTraces"]

KEEP = 64
"""Decoded chunks remembered per stream until their first frame is sent (a frame the pacer drops never is)."""


class OutputTraces:
    """One stream's decoded chunks whose first frame has not been sent yet: capture time → (seq, traceparent)."""

    def __init__(self) -> None:
        self._waiting: collections.OrderedDict[int, tuple[int, str]] = collections.OrderedDict()
        self.late = 0  # chunks of the stream decoded after their deadline (its StreamOutput reports them)

    @staticmethod
    def start(chunk: LatentChunk) -> Span:
        return telemetry.start_chunk_span("decoder.decode", chunk.trace, {
            "rheo.stream_id": chunk.stream_id, "rheo.seq": chunk.seq, "rheo.segment": chunk.segment})

    @staticmethod
    def failed(span: Span, error: BaseException) -> None:
        span.set_status(StatusCode.ERROR, type(error).__name__)
        span.end()

    def decoded(self, chunk: LatentChunk, span: Span) -> None:
        """The chunk's frames are in the pacer: its span ends, its first frame is watched for."""
        span.end()
        if time.time() > chunk.deadline:
            self.late += 1
            telemetry.deadline_missed("decoder")
        parent = telemetry.traceparent(span)
        if parent is None:
            return
        self._waiting[_key(chunk.capture_time)] = (chunk.seq, parent)
        while len(self._waiting) > KEEP:
            self._waiting.popitem(last=False)

    def carried(self, units: list[VideoUnit]) -> tuple[str | None, dict[str, str] | None]:
        """The trace a message of ``units`` continues (its first chunk's), and the header that says so."""
        for unit in units:
            if unit.capture_time is None:
                continue
            found = self._waiting.pop(_key(unit.capture_time), None)
            if found is not None:
                return found[1], {telemetry.CHUNK_HEADER: str(found[0])}
        return None, None


def _key(capture_time: float) -> int:
    return round(capture_time * 1e6)
