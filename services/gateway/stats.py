"""Per-stream live numbers for the console and operators: ``GET /v1/stats`` and ``GET /v1/streams/{id}/stats``.

Everything comes from what the gateway already has: the stream record (state, ingest's checkpoint: chunks
published, drops by reason, last seq) and the decoders' ``StreamOutput`` reports (``rheo.stream.*.output``, a few
per second per live stream), of which ``OutputWatch`` keeps the last seconds per stream. From those: the styled
output rate (chunks/s, and frames/s through the stream's chunk clock) and how many chunks the pipeline holds
between ingest's last published seq and the decoder's last decoded one. Glass-to-glass latency is measured where it
is seen: the console reads it from the player (now − the playing frame's PROGRAM-DATE-TIME, which is capture time).
The watch is bounded (``MAX_TRACKED`` streams, oldest forgotten first; stream ids are only ever the decoders'
subjects) and stateless across restarts: a fresh gateway knows the rate again after two reports.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from proto import CHANNELS, StreamOutput, StreamRecord
from proto.spec import RingConfig
from services.bus import Bus
from services.streams import session_state

MAX_TRACKED = 4096
"""Streams whose output reports are kept (a few hundred bytes each)."""
WINDOW_S = 4.0
"""The output rate is measured over the reports of the last this many seconds."""
STALE_S = 5.0
"""No report for this long: the output rate is unknown (the stream's output stopped or it ended)."""


class OutputWatch:
    """The decoders' last ``StreamOutput`` reports per stream, for the styled output rate."""

    def __init__(self, max_streams: int = MAX_TRACKED) -> None:
        self.max_streams = max_streams
        self._reports: OrderedDict[str, deque[StreamOutput]] = OrderedDict()

    async def start(self, bus: Bus) -> None:
        await bus.subscribe(CHANNELS["stream_output"].wildcard(), self._on_output, expected=StreamOutput)

    async def _on_output(self, out: StreamOutput, _raw: object) -> None:
        self.note(out)

    def note(self, out: StreamOutput) -> None:
        reports = self._reports.pop(out.stream_id, None) or deque(maxlen=32)
        if reports and out.decoded < reports[-1].decoded:  # another decoder took the stream over: count anew
            reports.clear()
        reports.append(out)
        while reports and reports[0].at < out.at - WINDOW_S and len(reports) > 2:
            reports.popleft()
        self._reports[out.stream_id] = reports
        while len(self._reports) > self.max_streams:
            self._reports.popitem(last=False)

    def last(self, stream_id: str) -> StreamOutput | None:
        reports = self._reports.get(stream_id)
        return reports[-1] if reports else None

    def chunk_rate(self, stream_id: str, now: float) -> float | None:
        """Chunks decoded per second over the window; None while unknown (fewer than two reports, or stale)."""
        reports = self._reports.get(stream_id)
        if not reports or len(reports) < 2 or now - reports[-1].at > STALE_S:
            return None
        first, last = reports[0], reports[-1]
        span = last.at - first.at
        return (last.decoded - first.decoded) / span if span > 0 else None


class StreamStats(BaseModel):
    id: str
    state: str
    state_reason: str = ""
    target_fps: float = Field(description="the stream's frame rate (the output is constant-rate at it)")
    output_chunks_per_s: float | None = Field(None, description="styled chunks decoded per second (null: unknown, "
                                                                "or no output for a few seconds)")
    output_fps: float | None = Field(None, description="styled frames per second (chunks/s × frames per chunk)")
    last_output_seq: int | None = Field(None, description="the last chunk the decoder decoded")
    last_output_age_s: float | None = Field(None, description="seconds since the decoder last reported output")
    chunks_in_flight: int | None = Field(None, description="ingest's last published seq − the last decoded one")
    published: int = Field(0, description="chunks ingest published in this session")
    dropped: dict[str, int] = Field(default_factory=dict, description="chunks ingest dropped, by reason")
    dropped_total: int = 0
    prompt_version: int = 0
    steps: int
    noise_scale: float
    seed: int


def stream_stats(record: StreamRecord, watch: OutputWatch, ring: RingConfig, interval_s: float,
                 now: float) -> StreamStats:
    """One stream's numbers (the one definition: list and single answers both come from here)."""
    spec = record.spec
    sid = spec.stream_id
    state, reason = session_state(record, interval_s, now)
    ingest = record.ingest
    last = watch.last(sid)
    rate = watch.chunk_rate(sid, now)
    clock = spec.clock(ring)
    frames_per_chunk = clock.latent_frames_per_chunk * clock.temporal_compression
    in_flight = None
    if last is not None and ingest is not None and ingest.last_seq is not None:
        in_flight = max(0, ingest.last_seq - last.seq)
    return StreamStats(
        id=sid, state=state, state_reason=reason, target_fps=spec.fps,
        output_chunks_per_s=None if rate is None else round(rate, 3),
        output_fps=None if rate is None else round(rate * frames_per_chunk, 2),
        last_output_seq=last.seq if last is not None else None,
        last_output_age_s=round(max(0.0, now - last.at), 2) if last is not None else None,
        chunks_in_flight=in_flight,
        published=ingest.published if ingest is not None else 0,
        dropped=dict(ingest.dropped) if ingest is not None else {},
        dropped_total=sum(ingest.dropped.values()) if ingest is not None else 0,
        prompt_version=record.prompt_version, steps=spec.steps, noise_scale=spec.noise.noise_scale, seed=spec.seed)


Dependency = Callable[..., Coroutine[Any, Any, Any]]


def make_stats_router(watch: OutputWatch, records: Callable[[], Coroutine[Any, Any, list[StreamRecord]]],
                      record: Callable[[str], Coroutine[Any, Any, StreamRecord]], ring: RingConfig,
                      interval_s: float, operator: Dependency, of_stream: Dependency) -> APIRouter:
    """The two stats routes, behind the API's own authorisation (``operator``: all streams; ``of_stream``: one)."""
    router = APIRouter(prefix="/v1")

    @router.get("/stats", response_model=list[StreamStats], dependencies=[Depends(operator)])
    async def all_stats() -> list[StreamStats]:
        now = time.time()
        return [stream_stats(r, watch, ring, interval_s, now) for r in await records()]

    @router.get("/streams/{stream_id}/stats", response_model=StreamStats, dependencies=[Depends(of_stream)])
    async def one_stats(stream_id: str) -> StreamStats:
        return stream_stats(await record(stream_id), watch, ring, interval_s, time.time())

    return router
