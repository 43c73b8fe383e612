"""The chunk source of a text-to-video stream: no publisher, one noise-only chunk per chunk of output time.

A T2V stream has no input, so what a chunk is made of is nothing but its slot in time: chunk c (counted in its
warm-up segment) is due ``output_frames(c) / fps`` seconds after the one before, so the decoder's output runs at
the spec's rate. Due times are absolute on the monotonic clock (an anchor plus the output frames emitted since it
over fps), so a late wake-up never accumulates drift. The chunks land in the same bounded ``ChunkQueue`` an RTMP
stream's chunks do; but a T2V chunk carries no input that could go stale, so when the queue is full (the model is
behind real time) the source waits for room and re-anchors instead of dropping: a generated stream stays the one
the single-process pipeline makes, only later.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from ingest.pacing import ChunkQueue, RawChunk
from proto.clock import ChunkClock

__all__ = ["T2VSource"]

log = logging.getLogger("rheo.ingest")


class T2VSource:
    """Emits a T2V stream's chunks (``RawChunk`` without frames) on its chunk clock at ``fps`` until closed."""

    def __init__(self, stream_id: str, clock: ChunkClock, fps: float, queue_depth: int,
                 latency_budget_s: float) -> None:
        self.stream_id, self.clock, self.fps = stream_id, clock, fps
        self.latency_budget_s = latency_budget_s
        self.queue = ChunkQueue(queue_depth)
        self.first = (0, 0)  # (seq, segment) of the session's first chunk: set by ``start``
        self.seq = 0
        self.segment = 0
        self.segment_start = 0
        self.waits = 0  # times the queue was full and the schedule was re-anchored
        self._task: asyncio.Task[None] | None = None

    def start(self, first: tuple[int, int] = (0, 0)) -> T2VSource:
        """Emit chunks from (seq, segment) ``first`` on: the stream record's reservation, once the stream is live."""
        self.first = first
        self.seq, self.segment = first
        self.segment_start = self.seq
        self._task = asyncio.create_task(self._run(), name=f"t2v-{self.stream_id}")
        return self

    def close(self) -> None:
        """No more chunks: the queue drains, then ends the stream's loop."""
        if self._task is not None:
            self._task.cancel()
        self.queue.close()

    def cut(self) -> int:
        """Start a new warm-up segment with the next chunk; returns its seq (as ``Chunker.cut``)."""
        if self.seq > self.segment_start:
            self.segment += 1
            self.segment_start = self.seq
        return self.seq

    def next_chunk(self, now: float) -> RawChunk:
        """The next chunk, begun at wall-clock ``now`` (its slot on the schedule, not the wake-up time): its output
        frames' times, no input frames."""
        n = self.clock.output_frames(self.seq - self.segment_start)
        times = [now + i / self.fps for i in range(n)]
        chunk = RawChunk(stream_id=self.stream_id, seq=self.seq, frames=np.empty((0, 0, 0, 3), np.uint8),
                         frame_times=times, capture_time=now, deadline=now + self.latency_budget_s,
                         segment=self.segment, segment_start=self.segment_start)
        self.seq += 1
        return chunk

    async def _run(self) -> None:
        anchor, wall, frames = time.monotonic(), time.time(), 0  # output frames emitted since the anchor
        while not self.queue.closed:
            delay = anchor + frames / self.fps - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(self.queue) >= self.queue.depth:
                self.waits += 1
                log.info("stream %s: the model is behind real time; T2V chunks wait for room", self.stream_id)
                while len(self.queue) >= self.queue.depth and not self.queue.closed:
                    await asyncio.sleep(1.0 / self.fps)
                anchor, wall, frames = time.monotonic(), max(time.time(), wall + frames / self.fps), 0
            chunk = self.next_chunk(wall + frames / self.fps)
            frames += len(chunk.frame_times)
            self.queue.put(chunk)
