"""Per-stream numbers measured once, where they are seen (docs/observability.md): egress's viewer counter and
latency window, its ``StreamStatus`` reports over a real NATS server, and the gateway's watch that shows them."""

from __future__ import annotations

import asyncio
import time

import pytest

from egress.observe import EgressObserver, LatencyWindow
from egress.viewers import UNTRACKED, ViewerCounter
from proto import VideoUnit
from services.bus import Bus
from services.gateway.stats import StreamWatch


def test_viewers_are_distinct_sessions_within_the_window_and_bounded() -> None:
    v = ViewerCounter(window_s=10.0, max_sessions=3)
    for t, token in [(0.0, "a"), (1.0, "b"), (2.0, "a"), (3.0, "a")]:  # one player polls many times: one viewer
        v.seen("s", token, now=t)
    assert v.count("s", now=3.0) == (2, False) and v.count("other", now=3.0) == (0, False)
    assert v.count("s", now=11.5) == (1, False)  # b's last fetch was 10.5 s ago; a's 8.5 s
    assert v.count("s", now=13.5) == (0, False)
    before = UNTRACKED._value.get()
    for i, token in enumerate("cdef"):
        v.seen("s", token, now=20.0 + i)
    assert v.count("s", now=23.0) == (3, True)  # the fourth is not tracked: counted, and the count says so
    assert UNTRACKED._value.get() == before + 1 and v.count("s", now=23.0) == (3, False)
    v.seen("s", "g", now=31.5)  # c and d lapsed: room again
    assert v.count("s", now=31.5) == (2, False) and v.total() == 2
    v.forget("s")
    assert v.count("s", now=31.5) == (0, False) and v.total() == 0


def test_the_latency_window_is_the_median_of_its_last_seconds() -> None:
    w = LatencyWindow(window_s=10.0)
    assert w.median(0.0) == (None, 0)
    for t, latency in [(0.0, 9.0), (5.0, 1.0), (6.0, 2.0), (7.0, 1.5)]:
        w.add(t, latency)
    assert w.median(7.0) == (1.75, 4)
    assert w.median(12.0) == (1.5, 3)  # the 9 s sample (12 s ago) is out of the window
    assert w.median(30.0) == (None, 0)


async def test_egress_reports_reach_the_gateways_watch(bus: Bus, bus2: Bus) -> None:
    """Parts out and two playback sessions at egress → ``StreamStatus`` on the bus → the gateway's numbers."""
    obs = EgressObserver(viewer_window_s=30.0)
    unit = VideoUnit(pts=0, keyframe=True, data=b"\0")
    wall = time.time()
    for i in range(3):
        obs.part("st-a", [unit.model_copy(update={"capture_time": wall - 1.0 - i})] * 4, now=wall)
    obs.viewers.seen("st-a", "token-1")
    obs.viewers.seen("st-a", "token-2")
    watch = StreamWatch()
    await watch.start(bus2)
    task = asyncio.create_task(obs.report(bus, lambda: [("st-a", False)], interval_s=0.05))
    try:
        async with asyncio.timeout(10):
            while watch.statuses.fresh("st-a", time.time()) is None:
                await asyncio.sleep(0.02)
    finally:
        task.cancel()
    status = watch.statuses.fresh("st-a", time.time())
    assert status is not None and (status.viewers, status.latency_samples) == (2, 3)
    assert status.latency_p50_s == pytest.approx(2.0, abs=0.01) and status.output_fps is None  # no FPS window yet
