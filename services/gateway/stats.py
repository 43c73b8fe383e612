"""Per-stream live numbers for the console, ``rheo top`` and operators: ``GET /v1/stats``,
``GET /v1/streams/{id}/stats``, and the ``stats`` of every ``GET /v1/streams[/{id}]`` answer.

Each number is computed once, where it is observed, and only shown here (docs/observability.md): output FPS,
glass-to-glass latency (median over egress's window) and viewers come from egress's ``StreamStatus``
(``rheo.stream.*.status``, about once a second per served stream); the last decoded seq and the decoder's late
chunks from its ``StreamOutput`` (``rheo.stream.*.output``); state, chunks published and drops by reason from
ingest's checkpoint in the stream record. ``StreamWatch`` keeps the last report of each kind per stream, bounded
(``MAX_TRACKED`` streams, oldest forgotten first; stream ids are only ever those of the subjects the services
publish on) and stateless across restarts: a fresh gateway knows the numbers again after one report.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from proto import CHANNELS, StreamOutput, StreamRecord, StreamStatus
from services.bus import Bus
from services.streams import session_state

MAX_TRACKED = 4096
"""Streams whose last reports are kept (a few hundred bytes each)."""
STALE_S = 5.0
"""No report for this long: its numbers are unknown (the stream's output stopped, or no egress serves it)."""


R = TypeVar("R", StreamOutput, StreamStatus)


class _Last(Generic[R]):
    """The last report of one kind per stream, the least recently reported forgotten first."""

    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        self.reports: OrderedDict[str, R] = OrderedDict()

    def note(self, report: R) -> None:
        self.reports.pop(report.stream_id, None)
        self.reports[report.stream_id] = report
        while len(self.reports) > self.max_streams:
            self.reports.popitem(last=False)

    def fresh(self, stream_id: str, now: float) -> R | None:
        report = self.reports.get(stream_id)
        return report if report is not None and now - report.at <= STALE_S else None


class StreamWatch:
    """The decoders' last ``StreamOutput`` and the egresses' last ``StreamStatus`` per stream."""

    def __init__(self, max_streams: int = MAX_TRACKED) -> None:
        self.outputs: _Last[StreamOutput] = _Last(max_streams)
        self.statuses: _Last[StreamStatus] = _Last(max_streams)

    async def start(self, bus: Bus) -> None:
        await bus.subscribe(CHANNELS["stream_output"].wildcard(), self._on_output, expected=StreamOutput)
        await bus.subscribe(CHANNELS["stream_status"].wildcard(), self._on_status, expected=StreamStatus)

    async def _on_output(self, out: StreamOutput, _raw: object) -> None:
        self.outputs.note(out)

    async def _on_status(self, status: StreamStatus, _raw: object) -> None:
        self.statuses.note(status)

    def last_output(self, stream_id: str) -> StreamOutput | None:
        return self.outputs.reports.get(stream_id)


class StreamStats(BaseModel):
    id: str
    state: str
    state_reason: str = ""
    target_fps: float = Field(description="the stream's frame rate (the output is constant-rate at it)")
    output_fps: float | None = Field(None, description="frames per second egress made available to viewers (null: "
                                                       "not measured yet, or no report for a few seconds)")
    latency_ms: float | None = Field(None, description="median glass-to-glass latency over egress's last seconds: "
                                                       "a part's first frame's capture → the part available")
    viewers: int | None = Field(None, description="distinct playback sessions that fetched a playlist or part "
                                                  "within egress.viewer_window_s (null: no egress report)")
    viewers_capped: bool = Field(False, description="more sessions than egress tracks: viewers is a lower bound")
    last_output_seq: int | None = Field(None, description="the last chunk the decoder decoded")
    last_output_age_s: float | None = Field(None, description="seconds since the decoder last reported output")
    chunks_in_flight: int | None = Field(None, description="ingest's last published seq − the last decoded one")
    published: int = Field(0, description="chunks ingest published in this session")
    dropped: dict[str, int] = Field(default_factory=dict, description="chunks ingest dropped, by reason")
    dropped_total: int = 0
    late_chunks: int = Field(0, description="chunks the decoder decoded after their deadline (still shown)")
    deadline_misses: int = Field(0, description="chunks past their deadline: ingest's 'deadline' drops + the "
                                                "decoder's late chunks")
    prompt_version: int = 0
    steps: int
    noise_scale: float
    seed: int


def stream_stats(record: StreamRecord, watch: StreamWatch, interval_s: float, now: float) -> StreamStats:
    """One stream's numbers (the one definition: every answer that carries them comes from here)."""
    spec = record.spec
    sid = spec.stream_id
    state, reason = session_state(record, interval_s, now)
    ingest = record.ingest
    last = watch.last_output(sid)
    status = watch.statuses.fresh(sid, now)
    in_flight = None
    if last is not None and ingest is not None and ingest.last_seq is not None:
        in_flight = max(0, ingest.last_seq - last.seq)
    dropped = dict(ingest.dropped) if ingest is not None else {}
    late = last.late if last is not None else 0
    latency = status.latency_p50_s if status is not None else None
    return StreamStats(
        id=sid, state=state, state_reason=reason, target_fps=spec.fps,
        output_fps=status.output_fps if status is not None else None,
        latency_ms=None if latency is None else round(latency * 1000, 1),
        viewers=status.viewers if status is not None else None,
        viewers_capped=status.viewers_capped if status is not None else False,
        last_output_seq=last.seq if last is not None else None,
        last_output_age_s=round(max(0.0, now - last.at), 2) if last is not None else None,
        chunks_in_flight=in_flight,
        published=ingest.published if ingest is not None else 0,
        dropped=dropped, dropped_total=sum(dropped.values()), late_chunks=late,
        deadline_misses=dropped.get("deadline", 0) + late,
        prompt_version=record.prompt_version, steps=spec.steps, noise_scale=spec.noise.noise_scale, seed=spec.seed)


Dependency = Callable[..., Coroutine[Any, Any, Any]]


def make_stats_router(watch: StreamWatch, records: Callable[[], Coroutine[Any, Any, list[StreamRecord]]],
                      record: Callable[[str], Coroutine[Any, Any, StreamRecord]], interval_s: float,
                      operator: Dependency, of_stream: Dependency) -> APIRouter:
    """The two stats routes, behind the API's own authorisation (``operator``: all streams; ``of_stream``: one)."""
    router = APIRouter(prefix="/v1")

    @router.get("/stats", response_model=list[StreamStats], dependencies=[Depends(operator)])
    async def all_stats() -> list[StreamStats]:
        now = time.time()
        return [stream_stats(r, watch, interval_s, now) for r in await records()]

    @router.get("/streams/{stream_id}/stats", response_model=StreamStats, dependencies=[Depends(of_stream)])
    async def one_stats(stream_id: str) -> StreamStats:
        return stream_stats(await record(stream_id), watch, interval_s, time.time())

    return router
