"""What egress measures per stream: time to first frame, glass-to-glass latency, output FPS, viewers, and the chunk
trace's last hop (``egress.package``); docs/observability.md.

The first three are taken when a part is out (``LlHlsStream.on_part``): the moment a viewer can load it; viewers
when a player fetches (``egress/viewers.py``). This is the one place they are computed: Prometheus gets them as
histograms without a stream label, the API gets them per stream from ``status`` (a ``StreamStatus`` on the bus).
Streams are keys of bounded per-stream state here, never metric labels.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import Span
from prometheus_client import Gauge

from egress.viewers import ViewerCounter
from media.llhls import LlHlsStream
from proto import EncodedVideo, StreamEvent, StreamStatus, Subjects, VideoUnit
from services import telemetry
from services.bus import Bus

__all__ = ["FPS_WINDOW_S", "LATENCY_WINDOW_S", "EgressObserver", "LatencyWindow"]

FPS_WINDOW_S = 5.0
"""One output-FPS sample per stream per this many seconds of parts."""
log = logging.getLogger("rheo.egress")

VIEWERS = Gauge("rheo_egress_viewers", "playback sessions that fetched from this egress within the viewer window, "
                "over all its streams")
STATUS_INTERVAL_S = 1.0
"""Each served stream's ``StreamStatus`` goes out this often."""
LATENCY_WINDOW_S = 10.0
"""The per-stream latency the API shows is the median over this many seconds of parts."""
_MAX_WAITING = 4096  # streams gone live whose first part has not come (a bound against a flood of 'live' events)


@dataclass
class _Rate:
    since: float
    frames: int = 0


@dataclass
class LatencyWindow:
    """One stream's glass-to-glass samples of the last ``window_s`` seconds (at most ``maxlen``), for its median."""

    window_s: float = LATENCY_WINDOW_S
    samples: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=1024))

    def add(self, now: float, latency_s: float) -> None:
        self.samples.append((now, latency_s))

    def median(self, now: float) -> tuple[float | None, int]:
        """(the median of the samples within the window, how many): (None, 0) when there are none."""
        while self.samples and self.samples[0][0] < now - self.window_s:
            self.samples.popleft()
        if not self.samples:
            return None, 0
        return statistics.median(v for _, v in self.samples), len(self.samples)


class EgressObserver:
    """Fed by the egress service: stream events, packagers opened, parts out, playback requests; observes the
    Prometheus histograms and answers each stream's ``StreamStatus``."""

    def __init__(self, viewer_window_s: float = 10.0) -> None:
        self._live_at: dict[str, float] = {}  # stream → when it went live, until its first part
        self._rates: dict[str, _Rate] = {}
        self.fps: dict[str, float] = {}  # stream → its last output-FPS sample
        self.latency: dict[str, LatencyWindow] = {}  # stream → its recent glass-to-glass samples
        self.viewers = ViewerCounter(viewer_window_s)

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
            latency = max(0.0, now - captured)
            self.latency.setdefault(stream_id, LatencyWindow()).add(now, latency)
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

    def status(self, stream_id: str, ended: bool = False, now: float | None = None,
               mono: float | None = None) -> StreamStatus:
        """The stream's numbers as the API shows them (``now``: wall clock of the samples; ``mono``: the viewer
        counter's clock)."""
        now = time.time() if now is None else now
        window = self.latency.get(stream_id)
        p50, samples = window.median(now) if window is not None else (None, 0)
        viewers, capped = self.viewers.count(stream_id, mono)
        fps = self.fps.get(stream_id)
        return StreamStatus(stream_id=stream_id, at=now, output_fps=None if fps is None else round(fps, 2),
                            latency_p50_s=None if p50 is None else round(p50, 3), latency_samples=samples,
                            viewers=viewers, viewers_capped=capped, ended=ended)

    async def report(self, bus: Bus, streams: Callable[[], Iterable[tuple[str, bool]]],
                     interval_s: float = STATUS_INTERVAL_S) -> None:
        """Publish every served stream's ``StreamStatus`` each ``interval_s`` (``streams``: (id, ended) pairs) until
        cancelled; a failed publish loses only that report (the next one follows)."""
        while True:
            await asyncio.sleep(interval_s)
            for stream_id, ended in list(streams()):
                try:
                    await bus.publish(Subjects.stream_status(stream_id), self.status(stream_id, ended))
                except Exception as e:
                    log.warning("stream %s: status not published: %s", stream_id, e)
            VIEWERS.set(self.viewers.total())

    def ended(self, stream_id: str) -> None:
        self._live_at.pop(stream_id, None)
        self._rates.pop(stream_id, None)
        self.fps.pop(stream_id, None)
        self.latency.pop(stream_id, None)
        self.viewers.forget(stream_id)

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
