"""A stream's first chunk in the whole stack (``LocalStack``, real processes): nats-server paused (SIGSTOP) for 2.5 s
right after a publisher starts, then resumed (SIGCONT).

What used to happen (issue #12): ingest's authoriser and go-live wait for NATS while the publisher's frames pile up;
once NATS is back they arrive as a burst, the 4-chunk queue overflowed and dropped its oldest chunk, the 5-frame
prepare chunk, and every later chunk of the session failed downstream (no styled output, ever). Now the queue keeps
prepare chunks (and a prepare chunk lost any other way cuts a new warm-up segment): the stream plays, and its
drops are counted in ingest's checkpoint in the stream record (``GET /v1/streams/{id}``).

The controller's heartbeat budget is long here: a paused nats-server silences every heartbeat, and what the
controller makes of that is the failure-epoch suite's business (tests/controller), not this one's.

The same quiet stack (starting it is most of the cost) then takes a flood (issue #13): 100k malformed frames at full
speed on the data and control subjects of other ids, beside a live stream (``test_a_flood_...``).
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from faults.stackkit import decoded as _decoded
from faults.stackkit import flood, metric, metric_lines, shown_at
from faults.stackkit import wait as _wait
from faults.test_stack_faults import FPS, _create, _get, _hls_frames, _publisher
from ingest.drops import DROP_REASONS
from services.stack import LocalStack
from support.stackkit import running_stack

PAUSE_S = 2.5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with running_stack(tmp_path_factory.mktemp("first-chunk"), stages=2,
                       env={"RHEO_INGEST__STATUS_INTERVAL_S": "0.5"}) as s:
        yield s


@pytest.mark.slow
@pytest.mark.parametrize("pause_after_s", [0.5, 1.5])
def test_a_nats_pause_right_after_publish_does_not_lose_the_stream(stack: LocalStack, pause_after_s: float) -> None:
    """``pause_after_s`` after the publisher process starts (its connect, the authoriser or the go-live then wait
    for NATS), nats-server stops for ``PAUSE_S``; afterwards the stream plays: styled chunks reach the decoder,
    HLS segments follow, the playlist ends when the publisher stops, and the API shows ingest's counts."""
    created = _create(stack, "bars after a pause", 11)
    sid = created["id"]
    assert stack.nats is not None and stack.nats.proc is not None
    nats_pid = stack.nats.proc.pid
    pubs = [_publisher(stack, created["stream_key"], seconds=120)]
    try:
        time.sleep(pause_after_s)
        os.kill(nats_pid, signal.SIGSTOP)
        try:
            time.sleep(PAUSE_S)
        finally:
            os.kill(nats_pid, signal.SIGCONT)

        def playing() -> bool:
            """8 styled chunks at the decoder. A publisher refused meanwhile (the authoriser's table lookup or
            admission answer timed out: a refusal with a reason) reconnects, as OBS does."""
            if pubs[-1].poll() is not None:
                pubs.append(_publisher(stack, created["stream_key"], seconds=120))
            return len(_decoded(stack, sid)) >= 8

        try:
            _wait(playing, 120, "8 styled chunks at the decoder")
        except AssertionError as e:
            logs = "\n".join(f"--- {p.name}\n{p.log_tail(3000)}" for p in stack.procs
                             if p.name in ("ingest", "dit-0", "decoder"))
            raise AssertionError(f"{e}; {len(pubs)} publishers; {stack.api('GET', f'/v1/streams/{sid}')}\n{logs}") \
                from None
        status = stack.api("GET", f"/v1/streams/{sid}")
        assert status["state"] == "live" and status["ingest"] is not None, status
    finally:
        for pub in pubs:
            pub.terminate()
            pub.wait(30)
    _wait(lambda: stack.api("GET", f"/v1/streams/{sid}")["state"] == "ended", 60, "the stream to end")
    _wait(lambda: b"#EXT-X-ENDLIST" in _get(stack, f"{stack.playback(sid)}/index.m3u8"), 60, "EXT-X-ENDLIST")
    times, segments = _hls_frames(stack, sid)
    assert segments >= 2 and len(times) >= 2 * FPS and times == sorted(times)  # >= 2 s of styled video
    assert abs(1 / FPS - (times[-1] - times[0]) / (len(times) - 1)) < 1e-3  # constant frame rate

    ingest = stack.api("GET", f"/v1/streams/{sid}")["ingest"]
    decoded = _decoded(stack, sid)
    # every chunk ingest did not publish has a reason; the decoder saw nothing ingest did not publish
    assert set(ingest["dropped"]) <= set(DROP_REASONS), ingest
    assert ingest["published"] >= len(decoded) and ingest["last_seq"] >= decoded[-1], (ingest, decoded[-10:])
    # the decoder started at a prepare chunk: the session's first, or (if that one was lost) a new segment's
    assert decoded[0] == 0 or ingest["segment"] > 0, (decoded[:5], ingest)


FLOOD_N = 100_000
BASELINE_S, AFTER_S = 6.0, 3.0
SERVICES = ("controller", "dit-0", "dit-1", "decoder", "egress", "ingest", "gateway")
# which flood channels each service subscribes to (with wildcards): what it must account for, message by message
HEARS = {"controller": ("ctl_heartbeat", "stream_event"), "dit-0": ("stream_latent", "stream_prompt", "stream_event"),
         "dit-1": ("stream_event",), "decoder": ("stream_event",), "egress": ("stream_event",), "ingest": (),
         "gateway": ()}


def _bus_drops(stack: LocalStack, proc: str) -> float:
    return metric(stack, proc, "rheo_bus_malformed_messages_total") + metric(stack, proc,
                                                                              "rheo_bus_dropped_messages_total")


def _log_size(stack: LocalStack, proc: str) -> int:
    return next(p.log_path for p in stack.procs if p.name == proc).stat().st_size


def _log_since(stack: LocalStack, proc: str, offset: int) -> str:
    with open(next(p.log_path for p in stack.procs if p.name == proc), "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _max_gap(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(times)), default=float("inf"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_flood_of_bad_frames_does_not_stall_a_live_stream(stack: LocalStack) -> None:
    """The live stream's styled output (chunks decoded) never pauses longer than without the flood + 1 s (or half the
    flood's duration, on a machine slow enough to flood for longer: a stall would last all of it); the
    controller keeps its lock; every flood message is counted where it arrived; metric series and log lines stay
    bounded (no series per subject, one log line per reason and channel per interval)."""
    created = _create(stack, "bars under a flood", 12)
    sid = created["id"]
    pub = _publisher(stack, created["stream_key"], seconds=300)
    try:
        _wait(lambda: len(_decoded(stack, sid)) >= 4, 120, "the live stream's styled output")
        series = {p: metric_lines(stack, p) for p in SERVICES}
        drops = {p: _bus_drops(stack, p) for p in SERVICES}
        logs = {p: _log_size(stack, p) for p in SERVICES}
        assert metric(stack, "controller", "rheo_controller_leader") == 1
        base_start = time.time()
        time.sleep(BASELINE_S)

        flood_start = time.time()
        sent: Counter[str] = Counter()
        flooding = threading.Thread(target=lambda: sent.update(flood(stack, FLOOD_N)), name="flood")
        flooding.start()
        leader: list[float] = []
        while flooding.is_alive() or time.time() < flood_start + AFTER_S:
            leader.append(metric(stack, "controller", "rheo_controller_leader"))
            time.sleep(0.25)
        flooding.join()
        flood_end = time.time()
        time.sleep(AFTER_S)
        expected = {p: sum(sent[c] for c in HEARS[p]) for p in SERVICES}
        _wait(lambda: all(_bus_drops(stack, p) - drops[p] >= expected[p] for p in SERVICES), 60,
              "every flood message counted")
        end = time.time()
    finally:
        pub.terminate()
        pub.wait(30)

    assert sum(sent.values()) == FLOOD_N
    times = sorted(t for t in (shown_at(stack, sid, q) for q in _decoded(stack, sid)) if base_start <= t <= end)
    baseline = _max_gap([t for t in times if t <= flood_start])
    during = [t for t in times if t >= flood_start]
    flooded = _max_gap([max(t for t in times if t <= flood_start), *during])
    report = (f"flood of {FLOOD_N} over {flood_end - flood_start:.1f} s: longest pause of styled output "
              f"{flooded:.2f} s (baseline {baseline:.2f} s); {len(during)} chunks decoded meanwhile")
    # a stall lasts the whole flood; contention for the 2 cores grows with it (a slower machine floods longer)
    assert flooded <= baseline + max(1.0, (flood_end - flood_start) / 2), report
    assert all(v == 1 for v in leader), f"the controller lost its lock: {leader}"
    controller_log = _log_since(stack, "controller", logs["controller"])
    assert not re.search(r"stepping down| leads$|lock could not be renewed", controller_log, re.M), controller_log
    for p in SERVICES:  # every message counted once, where it arrived; nothing else dropped meanwhile
        assert _bus_drops(stack, p) - drops[p] == expected[p], (p, _bus_drops(stack, p) - drops[p], expected[p])
        grown = metric_lines(stack, p) - series[p]
        assert grown <= 20, f"{p}: {grown} more metric samples after the flood ({series[p]} before)"
        warnings = _log_since(stack, p, logs[p]).count(" WARNING ")
        assert warnings <= 20, f"{p}: {warnings} warning lines during the flood"
