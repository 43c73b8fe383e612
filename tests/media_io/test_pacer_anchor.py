"""Ingest's one pacer-anchor correction: wire capture times equal the publisher's real capture times (read back from
``ingest.testpattern --marker`` frames) within the transport delay, although the session's first frame waited, and
they stay uniform (the decoder stamps frames at ``capture_time + i / fps``)."""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np
import pytest

from ingest.pacing import FramePacer
from ingest.rtmp_stream import RtmpStream
from ingest.testpattern import read_marker
from media_io.mediakit import ingest_server, run_process

FPS = 8
WAIT_S = 0.35
"""The session's first-frame wait (the stack's is 0.2–0.4 s); shorter than the first chunk's 5 frames at 8 fps, so
the burst behind the first frame shows all of it."""
BOUND_S = 0.2
"""Wire − real capture after the correction: the transport delay (RTMP, decode; 0.08 s measured on a loaded 2-core
machine), well under the uncorrected WAIT_S + transport (0.53 s measured)."""


async def test_wire_capture_times_are_the_publishers_after_a_first_frame_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    real_process = RtmpStream.process
    waited: list[bool] = []

    def process(self, frames, owner):  # the first frame waits, as it does while the session goes live
        if not waited:
            waited.append(True)
            time.sleep(WAIT_S)
        return real_process(self, frames, owner)

    monkeypatch.setattr(RtmpStream, "process", process)
    async with ingest_server(width=128, height=128, fps=FPS) as (server, col):
        result = await run_process(sys.executable, "-m", "ingest.testpattern", "--marker", "--size", "128x128",
                                   "--fps", str(FPS), "--seconds", "3", f"rtmp://127.0.0.1:{server.port}/live/key-a")
        assert result.returncode == 0, result.stderr
        chunks = await col.finished("stream-a")
    t0 = json.loads(result.stdout.splitlines()[0])["t0"]
    errors = []
    for chunk in chunks:
        for frame, wire in zip(chunk.frames, chunk.frame_times, strict=True):
            k = read_marker(frame)
            assert k is not None
            errors.append(wire - (t0 + k / FPS))
    times = [t for c in chunks for t in c.frame_times]
    assert len(times) >= 20 and np.allclose(np.diff(times), 1 / FPS)  # uniform: one correction, before chunk 0
    pacer = col.streams["stream-a"].pacer
    assert pacer.settled and pacer.correction_s < -WAIT_S / 2  # the wait was seen and corrected
    assert min(errors) >= -0.005, min(errors)  # never before the real capture
    assert statistics.median(errors) <= BOUND_S, (statistics.median(errors), pacer.correction_s)


def test_the_correction_is_one_uniform_shift_by_the_least_lag_and_never_later() -> None:
    pacer = FramePacer(8)
    arrivals = [1.0, 1.0, 1.0, 1.0, 1.1]  # captured at 0.6 + k/8: frame 0 waited 0.4 s, frames 1–3 in its burst
    slots = [pacer.place(k / 8, a) for k, a in enumerate(arrivals)]
    assert pacer.settle() == pytest.approx(-0.4)
    assert [pacer.capture_time(s.index) for s in slots] == pytest.approx([0.6 + k / 8 for k in range(5)])
    assert pacer.settle() == 0.0 and pacer.correction_s == pytest.approx(-0.4)  # once
    on_time = FramePacer(8)
    for k in range(5):
        on_time.place(k / 8, 1.0 + k / 8 + 0.01)
    assert on_time.settle() == 0.0  # frames later than their anchored times: nothing moves later
