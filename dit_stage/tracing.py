"""What one micro-step adds to its chunks' traces and to ``rheo_stage_chunk_seconds`` (docs/observability.md).

A micro-step batches items of many chunks (and streams), so each item gets its own spans in its own chunk's trace: a
``dit.stage[<i>].forward`` span (the forward they shared), then a ``link.send`` span for the frame that carries it
on. The item's ``trace`` is moved to each new span, so the next hop (the next stage, the ring return, the decoder)
is its child; an item without a trace gets no-op spans (sampling was decided at ingest).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from opentelemetry.trace import Span, StatusCode

from dit_stage.micro_step import MicroStep
from proto import BlockMap, Message, RingItem
from services import telemetry

__all__ = ["StepTrace", "stage_index"]


def stage_index(block_map: BlockMap | None, stage_id: str) -> int:
    """This stage's position in the ring (0: first); -1 while it runs no map."""
    return -1 if block_map is None else block_map.position(stage_id)


class StepTrace:
    """Started before a micro-step's forward; ``forwarded`` after it, ``sending`` around each link frame, ``done``
    once everything it produced is handed on."""

    def __init__(self, stage: int, step: MicroStep) -> None:
        self.stage = stage
        self.items = list(step.items)
        self.queue_wait_s = step.queue_wait_s
        self.t0 = time.perf_counter()
        name = f"dit.stage[{stage}].forward"
        self.spans = [self._start(name, item) for item in self.items]

    def _start(self, name: str, item: RingItem) -> Span:
        span = telemetry.start_chunk_span(name, item.trace, {
            "rheo.stream_id": item.stream_id, "rheo.seq": item.seq, "rheo.step": item.step, "rheo.stage": self.stage,
            "rheo.batch_items": len(self.items), "rheo.replay": item.replay})
        item.trace = telemetry.traceparent(span) or item.trace
        return span

    def forwarded(self, error: BaseException | None = None) -> None:
        for span in self.spans:
            if error is not None:
                span.set_status(StatusCode.ERROR, type(error).__name__)
            span.end()

    @contextlib.contextmanager
    def sending(self, message: Message) -> Iterator[None]:
        """A ``link.send`` span for every item ``message`` carries (none for prompts and markers)."""
        items: list[RingItem] = getattr(message, "items", None) or []
        spans = [self._start("link.send", item) for item in items]
        try:
            yield
        finally:
            for span in spans:
                span.end()

    def done(self) -> None:
        """Each item's pass through this stage: its queue wait, the forward and the link hand-off."""
        if self.stage < 0:
            return
        seconds = self.queue_wait_s + time.perf_counter() - self.t0
        hist = telemetry.STAGE_CHUNK.labels(stage=telemetry.stage_label(self.stage))
        for _ in self.items:
            hist.observe(seconds)
