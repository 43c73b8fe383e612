"""The last stage's finished chunks, published per stream on ``rheo.stream.<id>.x0`` through a credit window.

Each stream has its own bounded queue and publisher task, so a consumer that returns no credit delays only its own
stream, and publishing never blocks the micro-step loop (docs/dit-ring.md, "Never stuck on one stream").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field

from dit_stage.telemetry import StageTelemetry
from proto import LatentChunk, Subjects
from services import telemetry
from services.bus import Bus, CreditTimeout, CreditWindow

__all__ = ["OUTPUT_QUEUE", "Outputs"]

log = logging.getLogger("rheo.dit_stage")

OUTPUT_QUEUE = 8
"""Finished chunks queued per stream for publishing before the oldest is dropped."""


@dataclass
class _Output:
    """Publisher of one stream's finished chunks: a bounded queue drained by its own task."""

    window: CreditWindow
    queue: collections.deque[LatentChunk] = field(default_factory=collections.deque)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Outputs:
    """Every stream's x0 publisher at this stage, created on the stream's first finished chunk."""

    def __init__(self, bus: Bus, window_bytes: int, telemetry: StageTelemetry) -> None:
        self.bus = bus
        self.window_bytes = window_bytes
        self.telemetry = telemetry
        self._outputs: dict[str, _Output] = {}

    def publish(self, chunk: LatentChunk) -> None:
        """Queue a finished chunk (the stream's oldest queued one is dropped beyond ``OUTPUT_QUEUE``)."""
        out = self._outputs.get(chunk.stream_id)
        if out is None:
            window = CreditWindow(self.bus, Subjects.stream_x0(chunk.stream_id), self.window_bytes)
            out = self._outputs[chunk.stream_id] = _Output(window)
            out.task = asyncio.create_task(self._drain(out), name=f"x0-{chunk.stream_id}")
        out.queue.append(chunk)
        while len(out.queue) > OUTPUT_QUEUE:
            out.queue.popleft()
            self.telemetry.drop("output_full")
        out.ready.set()

    def end(self, stream_id: str) -> None:
        """The stream ended: stop its publisher (what it still queued is not shown)."""
        out = self._outputs.pop(stream_id, None)
        if out is not None and out.task is not None:
            out.task.cancel()

    async def close(self) -> None:
        tasks = [o.task for o in self._outputs.values() if o.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for out in self._outputs.values():
            with contextlib.suppress(Exception):
                await out.window.close()

    async def _drain(self, out: _Output) -> None:
        await out.window.start()
        while True:
            if not out.queue:
                out.ready.clear()
                await out.ready.wait()
                continue
            chunk = out.queue.popleft()
            try:
                with telemetry.in_chunk_trace(chunk.trace):  # the bus's spans and headers continue the chunk's
                    await out.window.publish(chunk, timeout=max(0.05, chunk.deadline - time.time()))
                self.telemetry.finished()
            except CreditTimeout:
                self.telemetry.drop("no_credit")
                telemetry.deadline_missed("dit")
                log.warning("x0 %s/%d dropped: the consumer returned no credit in time", chunk.stream_id, chunk.seq)
            except Exception as e:
                self.telemetry.drop("publish_error")
                log.warning("x0 %s/%d not published: %s", chunk.stream_id, chunk.seq, e)
