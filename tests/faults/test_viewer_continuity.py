"""A viewer's playlist never goes backwards (issue #12 item 4): the whole stack as real processes (``LocalStack``,
one DiT stage), a real RTMP publisher, and a viewer polling the playlist through the gateway while the decoder and
then the egress are SIGKILLed and started again.

What must hold (docs/media.md "Continuity across restarts"): in every playlist the viewer loaded, media sequence
numbers are contiguous and never go back from one load to the next; each segment keeps its discontinuity sequence
number across loads (RFC 8216); a restart of the decoder and one of the egress each add a discontinuity; the
output keeps advancing after each, within a bound relative to the measured pre-failure segment period; and the
ended playlist decodes, period by period, on a monotonic timeline.
"""

from __future__ import annotations

import io
import itertools
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import av
import m3u8
import pytest

from services.stack import LocalStack, Ports

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SIZE, FPS = 64, 8
CONFIG_YAML = """
stream: {slo_latency_ms: 120000}
dit_stage: {max_queued_chunks: 64}
ingest: {chunk_queue_depth: 64}
decoder: {max_queued_chunks: 64, ended_grace_s: 15, publish_timeout_s: 1.0}
egress: {ended_grace_s: 15, playlist_segments: 60}
controller: {mode: static, advisory: true, heartbeat_miss_s: 3.0}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    work = tmp_path_factory.mktemp("viewer")
    (work / "rheo.yaml").write_text(CONFIG_YAML)
    s = LocalStack(work, stages=1, ports=Ports.ephemeral(), extra_env={
        "RHEO_CONFIG": str(work / "rheo.yaml"),
        "RHEO_LIFECYCLE__HEARTBEAT_INTERVAL_S": "0.2",
        "RHEO_INGEST__STREAM_LINGER_S": "1",  # the publisher's end ends the stream (no reconnect is tested here)
        "RHEO_EGRESS__SEGMENT_SECONDS": "1.0",
        "OMP_NUM_THREADS": "1",
    })
    try:
        s.start(timeout=300)
        yield s
    finally:
        s.stop(timeout=60)


def _get(stack: LocalStack, path: str) -> bytes:
    with urllib.request.urlopen(stack.gateway_url + path, timeout=10) as r:
        return r.read()


@dataclass
class View:
    at: float
    playlist: m3u8.M3U8
    segments: list[tuple[int, int]]  # (msn, discontinuity sequence number) of each complete segment


class Viewer(threading.Thread):
    """Polls the LL-HLS playlist as a player would and records every load; failed loads are only counted."""

    def __init__(self, stack: LocalStack, sid: str) -> None:
        super().__init__(daemon=True)
        self.stack, self.sid = stack, sid
        self.views: list[View] = []
        self.failed_loads = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                pl = m3u8.loads(_get(self.stack, f"{self.stack.playback(self.sid)}/index.m3u8").decode())
            except Exception:
                self.failed_loads += 1
            else:
                self.views.append(View(time.monotonic(), pl, _numbered(pl)))
                if pl.is_endlist:
                    return
            self.done.wait(0.25)

    def _latest(self) -> View | None:
        return next((v for v in reversed(self.views) if v.segments), None)

    def last_msn(self) -> int:
        """The newest segment of the latest load (a playlist that started over shows here at once)."""
        latest = self._latest()
        return -1 if latest is None else latest.segments[-1][0]

    def discontinuities(self) -> int:
        latest = self._latest()
        return 0 if latest is None else latest.segments[-1][1]


def _numbered(pl: m3u8.M3U8) -> list[tuple[int, int]]:
    """(msn, discontinuity sequence number) of each complete segment, as RFC 8216 §6.3.2 numbers them; checks that
    the names agree with the media sequence (contiguous, none skipped)."""
    out, disc = [], pl.discontinuity_sequence or 0
    for i, seg in enumerate(s for s in pl.segments if s.uri):
        disc += bool(seg.discontinuity) and i > 0
        msn = (pl.media_sequence or 0) + i
        assert seg.uri == f"seg_{msn}.m4s", (seg.uri, msn, pl.dumps())
        out.append((msn, disc))
    return out


def _wait(predicate, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - t0


def _segment_period(viewer: Viewer) -> float:
    """The measured time between new segments (median of the first appearances of each msn)."""
    first_seen: dict[int, float] = {}
    for v in viewer.views:
        for msn, _ in v.segments:
            first_seen.setdefault(msn, v.at)
    times = sorted(first_seen.values())
    return statistics.median(b - a for a, b in itertools.pairwise(times) if b > a)


def _check_never_backwards(viewer: Viewer) -> None:
    numbers: dict[int, int] = {}
    last_first, last_last = -1, -1
    for v in viewer.views:
        if not v.segments:
            continue
        first, last = v.segments[0][0], v.segments[-1][0]
        assert first >= last_first and last >= last_last, "a playlist reload went backwards"
        last_first, last_last = first, last
        for msn, disc in v.segments:
            assert numbers.setdefault(msn, disc) == disc, f"segment {msn} changed its discontinuity sequence"


def test_decoder_and_egress_restarts_keep_the_playlist_monotonic(stack: LocalStack) -> None:
    created = stack.api("POST", "/v1/streams", {"prompt": "bars that survive", "width": SIZE, "height": SIZE,
                                                "fps": FPS, "steps": 1, "seed": 3, "slo_latency_ms": 120000})
    sid = created["id"]
    pub = subprocess.Popen([sys.executable, "-m", "ingest.testpattern",
                            f"rtmp://127.0.0.1:{stack.ports.rtmp}/live/{created['stream_key']}", "--size", "96x64",
                            "--fps", str(FPS), "--seconds", "600"], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    viewer = Viewer(stack, sid)
    try:
        _wait(lambda: _playable(stack, sid), 120, "the stream's playlist")
        viewer.start()
        _wait(lambda: viewer.last_msn() >= 5, 120, "6 segments before any failure")
        period = _segment_period(viewer)
        bound = 30 * period  # generous: the restarted process reconnects, subscribes, joins mid-stream

        for name in ("decoder", "egress"):
            before_msn, before_disc = viewer.last_msn(), viewer.discontinuities()
            restart_s = stack.restart(name)  # SIGKILL, then the same command again
            back = _wait(lambda b=before_msn: viewer.last_msn() >= b + 3, restart_s + bound,
                         f"the output to advance after the {name} restart")
            assert viewer.discontinuities() >= before_disc + 1, f"no discontinuity after the {name} restart"
            _check_never_backwards(viewer)
            print(f"{name}: ready {restart_s:.1f}s after SIGKILL, 3 new segments {back:.1f}s later "
                  f"(segment period {period:.2f}s)")
    finally:
        pub.terminate()
        pub.wait(30)
    _wait(lambda: not viewer.is_alive(), 90, "EXT-X-ENDLIST")
    viewer.done.set()
    _check_never_backwards(viewer)
    assert viewer.discontinuities() == 2, [v.segments for v in viewer.views[-1:]]

    final = viewer.views[-1].playlist
    assert final.is_endlist
    times: list[float] = []
    periods = 0
    data = b""
    for seg in final.segments:
        if seg.discontinuity or not data:
            times += _times(data)
            data = _get(stack, f"{stack.playback(sid)}/{seg.init_section.uri}")
            periods += 1
        data += _get(stack, f"{stack.playback(sid)}/{seg.uri}")
    times += _times(data)
    assert periods == 3 - (final.discontinuity_sequence or 0)  # (the window may have slid past the first period)
    assert times == sorted(times) and len(set(times)) == len(times), "output timestamps went backwards"


def _playable(stack: LocalStack, sid: str) -> bool:
    try:
        return b"seg_0.m4s" in _get(stack, f"{stack.playback(sid)}/index.m3u8")
    except Exception:
        return False


def _times(data: bytes) -> list[float]:
    if not data:
        return []
    with av.open(io.BytesIO(data)) as c:
        return [float(f.time) for f in c.decode(video=0)]
