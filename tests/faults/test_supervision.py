"""``rheo up``'s supervision on the real stack: the egress is SIGKILLed while the demo stream plays; the supervisor
restarts it, it becomes ready again, the stream's HLS output goes on (new segments through the gateway), and the
demo's player URL plays in headless Chromium before and after (where Chromium and hls.js are installed): a page kept
open through the restart plays on (the playlist continues its numbering with a discontinuity, docs/media.md), and a
page opened after it plays too.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import m3u8
import pytest

from media.player import HLSJS_DEFAULT
from services.stack import LocalStack, open_demo_stream, start_testpattern
from support.browser import CHROMIUM, CHROMIUM_FLAGS, CURRENT_TIME, PLAYING
from support.stackkit import running_stack


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.2)
    return time.monotonic() - t0


def _get(stack: LocalStack, path: str) -> bytes | None:
    try:
        with urllib.request.urlopen(stack.gateway_url + path, timeout=10) as r:
            return r.read()
    except (urllib.error.URLError, OSError):  # the egress is down: the gateway answers 502/503
        return None


def _segments(stack: LocalStack, sid: str) -> set[str]:
    """Digests of the segments the stream's playlist lists now, fetched as a viewer does (through the gateway)."""
    text = _get(stack, f"{stack.playback(sid)}/playlist.m3u8")
    if text is None:
        return set()
    found = set()
    for seg in m3u8.loads(text.decode()).segments:
        body = _get(stack, f"{stack.playback(sid)}/{seg.uri}")
        if body:
            found.add(hashlib.sha256(body).hexdigest())
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, list[str]]]:
    work: Path = tmp_path_factory.mktemp("supervision")
    lines: list[str] = []

    def report(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    with running_stack(work, stages=1, report=report, restarts_expected=True, taps=False) as s:
        yield s, lines


def _plays(page, seconds: float = 4.0) -> None:
    """The page's video plays: its currentTime advances at least half as fast as the wall clock, no fatal error."""
    page.wait_for_function(PLAYING, timeout=60000)
    t0, wall0 = page.evaluate(CURRENT_TIME), time.monotonic()
    time.sleep(seconds)
    t1, wall1 = page.evaluate(CURRENT_TIME), time.monotonic()
    errors = page.evaluate("window.report.errors")
    assert t1 - t0 >= 0.5 * (wall1 - wall0), (t0, t1, errors)
    assert not [e for e in errors if e.startswith("FATAL")], errors


@pytest.mark.slow
@pytest.mark.timeout(600)  # a stack start on a loaded 2-core machine can take minutes
def test_a_killed_egress_is_restarted_and_the_demo_keeps_playing(stack: tuple[LocalStack, list[str]]) -> None:
    s, lines = stack
    created = open_demo_stream(s, "a test pattern in watercolour", weights=False)
    sid = created["id"]
    publisher = start_testpattern(created["publish_url"])
    browser = pw = None
    try:
        # the baseline: how long this machine takes to show the first two segments
        baseline = _wait(lambda: len(_segments(s, sid)) >= 2, 180, "two segments before the kill")
        if CHROMIUM is not None and HLSJS_DEFAULT.is_file():
            sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (PyPI) not installed")
            pw = sync_api.sync_playwright().start()
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            kept_open = browser.new_page()
            kept_open.goto(s.gateway_url + created["player_path"])
            _plays(kept_open)
        before = _segments(s, sid)
        egress = next(p for p in s.procs if p.name == "egress")
        assert egress.popen is not None
        old_pid = egress.popen.pid
        os.killpg(old_pid, signal.SIGKILL)
        _wait(lambda: s.restarts["egress"] == 1, 30, "the egress to be restarted")
        assert egress.popen.pid != old_pid
        _wait(lambda: egress.ready(), 120, "the restarted egress to be ready")
        assert any(line.startswith("rheo up: egress killed by SIGKILL; restart #1 in 0.5s") for line in lines), lines
        _wait(lambda: any("egress is ready again (restart #1)" in line for line in lines), 30, "the ready line")
        s.check_alive()  # one restart is no crash loop
        # the stream goes on: new segments (bytes never served before the kill), within a bound relative to how
        # long the first two took on this machine
        _wait(lambda: len(_segments(s, sid) - before) >= 2, max(60.0, 3 * baseline), "new segments after it")
        if browser is not None:
            # the page open through the restart plays on; the demo's player URL plays in a new page too
            _plays(kept_open)
            after = browser.new_page()
            after.goto(s.gateway_url + created["player_path"])
            _plays(after)
        assert s.restarts == {p.name: int(p.name == "egress") for p in s.procs}  # nothing else had to restart
    finally:
        if browser is not None:
            browser.close()
        if pw is not None:
            pw.stop()
        publisher.terminate()
        publisher.wait(10)
