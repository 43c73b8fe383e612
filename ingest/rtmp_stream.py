"""The publisher side of one stream: what the authoriser decides for a publisher, what a publisher is
(``Publisher``: an RTMP connection, a WHIP session), and the ``RtmpStream`` (pacer, chunker, chunk queue) that
outlives its publishers. Publishers hand it decoded frames (``RtmpStream.hand_off``); the service takes its chunks.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import av
import numpy as np

from ingest.audio import AudioPassthrough
from ingest.pacing import Chunker, ChunkQueue, FramePacer, RawChunk
from ingest.rtmp_limits import RefusalKind
from media.frames import shape_frame
from proto.clock import ChunkClock

__all__ = ["Decision", "Publisher", "RtmpStream", "StreamShape", "StreamStats"]


@dataclass(frozen=True)
class StreamShape:
    """What the model wants from a stream: frame size and rate."""

    width: int
    height: int
    fps: float


@dataclass(frozen=True)
class Decision:
    """An authoriser's answer; ``stream_id`` is stable for a key, so a reconnect resumes the same stream."""

    allowed: bool
    reason: str = ""
    stream_id: str = ""
    shape: StreamShape | None = None
    first: tuple[int, int] = (0, 0)
    """(seq, segment) of a new session's first chunk (the stream record's reservation); a resumed one ignores it."""
    bad_key: bool = False
    """Refused because the key (or application) is unknown: counts toward the address's key-guess limit."""
    key_hash: str = ""
    """The stream table's hash of the key that passed (``services.streams.hash_key``): while the table holds
    another, the publisher is ended (``RtmpServer.revoke``)."""


class Publisher(Protocol):
    """One publisher of a stream (an RTMP connection, a WHIP session): what ``RtmpServer`` needs to count it
    against the caps (``bucket``), to close it with a counted reason (``abort``/``evict``: replaced, key revoked,
    shutdown) and to know what it publishes (``stream``, set once its key passed)."""

    peer: str
    bucket: str
    stream: RtmpStream | None

    def abort(self, kind: RefusalKind, reason: str) -> None: ...

    def evict(self, kind: RefusalKind, reason: str) -> None: ...

    def buffered_bytes(self) -> int: ...


@dataclass
class StreamStats:
    video_messages: int = 0
    audio_messages: int = 0
    frames_decoded: int = 0
    decode_errors: int = 0
    reordered_frames: int = 0  # coded frames with a composition-time offset (B-frames)
    sessions: int = 0


class RtmpStream:
    """The RTMP side of one stream (pacer, chunker, chunk queue); it outlives a connection: a publisher
    reconnecting with the same key resumes it. ``first``: (seq, segment) of its first chunk."""

    def __init__(
        self, stream_id: str, key_hash: str, shape: StreamShape, queue_depth: int, latency_budget_s: float,
        first: tuple[int, int] = (0, 0),
    ) -> None:
        self.stream_id, self.shape = stream_id, shape
        self.key_hash = key_hash
        """``Decision.key_hash`` of its current (or last) publisher: the key it authenticated with, hashed."""
        self.first = first
        self.queue = ChunkQueue(queue_depth)
        self.pacer = FramePacer(shape.fps)
        self.chunker = Chunker(stream_id, ChunkClock(), latency_budget_s, *first)
        self.metadata: dict[str, Any] = {}
        self.audio = AudioPassthrough(stream_id)
        self.stats = StreamStats()
        self.publishing = False
        self.ended = False
        self.end_reason = ""
        """Why its last publisher's connection closed, when not cleanly (shown as the ended record's reason)."""
        self._last_frame: np.ndarray | None = None
        self._lock = threading.Lock()
        self._owner: object | None = None
        self._linger: asyncio.TimerHandle | None = None

    def process(self, frames: list[av.VideoFrame], owner: object) -> list[RawChunk]:
        """Pace, shape and chunk decoded frames (worker thread); frames of a replaced session are discarded."""
        out: list[RawChunk] = []
        with self._lock:
            if owner is not self._owner:
                return out
            for frame in frames:
                self.stats.frames_decoded += 1
                ts = float(frame.pts * frame.time_base) if frame.pts is not None else 0.0
                slot = self.pacer.place(ts, time.time())
                if not slot.keep:
                    continue
                for i in range(slot.repeat_previous):
                    held_slot = slot.index - slot.repeat_previous + i
                    self._emit(self._last_frame, held_slot, out)
                self._last_frame = shape_frame(frame, self.shape.width, self.shape.height)
                self._emit(self._last_frame, slot.index, out)
        return out

    async def hand_off(self, frames_of: Callable[[], list[av.VideoFrame]], owner: object) -> None:
        """The one way a publisher's frames reach the stream: ``frames_of`` (decode, if the publisher has to) and
        ``process`` run in a worker thread, the chunks are queued on the loop (the queue is not thread-safe)."""
        chunks = await asyncio.to_thread(lambda: self.process(frames_of(), owner))
        for chunk in chunks:
            self.queue.put(chunk)

    @property
    def audio_config(self) -> bytes | None:
        """The publisher's AAC AudioSpecificConfig, once its sequence header came."""
        return self.audio.config.asc if self.audio.config is not None else None

    def on_audio(self, payload: bytes, timestamp_ms: float | None) -> None:
        """An FLV audio tag: stamped on the video's capture clock (the pacer's anchor) and passed through.
        ``timestamp_ms``: on the video's source clock (RTMP's own; WHIP's once aligned, None before)."""
        with self._lock:
            captured = None if timestamp_ms is None else self.pacer.time_of(timestamp_ms / 1000.0)
            correction = self.pacer.correction_s
        self.audio.feed(payload, captured, correction)

    @property
    def segment(self) -> int:
        """The warm-up segment the chunker cuts chunks for now."""
        return self.chunker.segment

    @property
    def segment_start(self) -> int:
        """The seq of the current segment's prepare chunk (the next chunk's, while it is not cut yet)."""
        return self.chunker.segment_start

    def cut(self) -> int:
        """Start a new warm-up segment with the next chunk (``Chunker.cut``); returns that chunk's seq."""
        with self._lock:
            return self.chunker.cut()

    def _emit(self, frame: np.ndarray | None, slot: int, out: list[RawChunk]) -> None:
        if frame is None:
            return
        if not self.pacer.settled and self.chunker.completes_chunk():  # the stream's first chunk: correct once
            self.chunker.shift(self.pacer.settle())
        chunk = self.chunker.push(frame, self.pacer.capture_time(slot))
        if chunk is not None:
            out.append(chunk)
