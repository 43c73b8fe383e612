"""A stream's first chunk in the whole stack (``LocalStack``, real processes): nats-server paused (SIGSTOP) for 2.5 s
right after a publisher starts, then resumed (SIGCONT).

What used to happen (issue #12): ingest's authoriser and go-live wait for NATS while the publisher's frames pile up;
once NATS is back they arrive as a burst, the 4-chunk queue overflowed and dropped its oldest chunk, the 5-frame
prepare chunk, and every later chunk of the session failed downstream (no styled output, ever). Now the queue keeps
prepare chunks (and a prepare chunk lost any other way cuts a new warm-up segment): the stream plays, and its
drops are counted in ingest's checkpoint in the stream record (``GET /v1/streams/{id}``).

The controller's heartbeat budget is long here: a paused nats-server silences every heartbeat, and what the
controller makes of that is the failure-epoch suite's business (tests/controller), not this one's.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from faults.stackkit import decoded as _decoded
from faults.stackkit import wait as _wait
from faults.test_stack_faults import FPS, _create, _get, _hls_frames, _publisher
from ingest.drops import DROP_REASONS
from services.stack import LocalStack, Ports

PAUSE_S = 2.5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    work = tmp_path_factory.mktemp("first-chunk")
    s = LocalStack(work, stages=2, ports=Ports.ephemeral(), extra_env={
        "RHEO_INGEST__STREAM_LINGER_S": "1",
        "RHEO_INGEST__STATUS_INTERVAL_S": "0.5",
        "RHEO_INGEST__DEBUG_TAP_DIR": str(work / "tap-in"),
        "RHEO_DECODER__DEBUG_TAP_DIR": str(work / "tap-out"),
        "RHEO_LIFECYCLE__HEARTBEAT_INTERVAL_S": "0.2",
        "RHEO_EGRESS__SEGMENT_SECONDS": "1.0",
        "RHEO_CONTROLLER__MODE": "static",
        "RHEO_CONTROLLER__ADVISORY": "true",
        "RHEO_CONTROLLER__HEARTBEAT_MISS_S": "30",
        "RHEO_CONTROLLER__STARTUP_GRACE_S": "600",
        "OMP_NUM_THREADS": "1",
    })
    try:
        s.start(timeout=300)
        yield s
    finally:
        codes = s.stop(timeout=60)
        assert all(c == 0 for c in codes.values()), f"services did not exit cleanly: {codes}"


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
