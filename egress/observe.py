"""What egress measures per stream: time to first frame, glass-to-glass latency, output FPS, and the chunk trace's
last hop (``egress.package``); docs/observability.md.

All three numbers are taken when a part is out (``LlHlsStream.on_part``): the moment a viewer can load it. Streams
are keys of bounded per-stream state here, never metric labels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import Span

from media.llhls import LlHlsStream
from proto import EncodedVideo, StreamEvent, VideoUnit
from services import telemetry

__all__ = ["FPS_WINDOW_S", "EgressObserver"]

FPS_WINDOW_S = 5.0
"""One output-FPS sample per stream per this many seconds of parts."""
_MAX_WAITING = 4096  # streams gone live whose first part has not come (a bound against a flood of 'live' events)


@dataclass
class _Rate:
    since: float
    frames: int = 0


class EgressObserver:
    """Fed by the egress service: stream events, packagers opened, parts out; observes the Prometheus histograms."""

    def __init__(self) -> None:
        self._live_at: dict[str, float] = {}  # stream → when it went live, until its first part
        self._rates: dict[str, _Rate] = {}
        self.fps: dict[str, float] = {}  # stream → its last output-FPS sample
        self.latency_s: dict[str, float] = {}  # stream → its last glass-to-glass sample (for the API, not a label)

    def event(self, event: StreamEvent) -> None:
        if event.kind == "live" and len(self._live_at) < _MAX_WAITING:
            self._live_at[event.stream_id] = event.at
        elif event.kind == "ended":  # no part before its end: no TTFF
            self._live_at.pop(event.stream_id, None)

    def opened(self, stream_id: str, hls: LlHlsStream) -> None:
        hls.on_part = lambda units: self.part(stream_id, units)

    def part(self, stream_id: str, units: list[VideoUnit], now: float | None = None) -> None:
        """A part of ``units`` is available: TTFF (the stream's first), glass-to-glass (its first frame's capture),
        frames towards the FPS sample."""
        now = time.time() if now is None else now
        live_at = self._live_at.pop(stream_id, None)
        if live_at is not None:
            telemetry.TTFF.observe(max(0.0, now - live_at))
        captured = units[0].capture_time if units else None
        if captured is not None:
            latency = self.latency_s[stream_id] = max(0.0, now - captured)
            telemetry.GLASS_TO_GLASS.observe(latency)
        rate = self._rates.get(stream_id)
        if rate is None:  # the first part's frames came before the window opens
            self._rates[stream_id] = _Rate(now)
            return
        rate.frames += len(units)
        if now - rate.since >= FPS_WINDOW_S:
            fps = self.fps[stream_id] = rate.frames / (now - rate.since)
            telemetry.OUTPUT_FPS.observe(fps)
            self._rates[stream_id] = _Rate(now)

    def ended(self, stream_id: str) -> None:
        self._live_at.pop(stream_id, None)
        self._rates.pop(stream_id, None)
        self.fps.pop(stream_id, None)
        self.latency_s.pop(stream_id, None)

    @staticmethod
    def package_span(msg: EncodedVideo, raw: Msg, hls: LlHlsStream) -> Span:
        """``egress.package`` for a message that carries a chunk's first frame (the decoder's ``rheo-chunk``
        header): a child of the receive span, so of the chunk's trace; a no-op span for any other message."""
        seq = (raw.headers or {}).get(telemetry.CHUNK_HEADER)
        if seq is None or not seq.isdigit():
            return trace.INVALID_SPAN
        msn, part = hls.next_part
        return telemetry.tracer().start_span("egress.package", attributes={
            "rheo.stream_id": msg.stream_id, "rheo.seq": int(seq), "rheo.hls.msn": msn, "rheo.hls.part": part})
