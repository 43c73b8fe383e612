"""The console in headless Chromium against the package's stack (``LocalStack``, tiny model: conftest.py): sign in,
create a stream, publish to it with the key the page shows, watch it move, change its prompt, noise and seed and see
the seq, see it live in the list with its FPS, latency and viewers; then the API counts two playback clients as two
viewers, and none once their window lapsed.

Screenshots of each page go to ``$RHEO_ARTEFACTS`` (default ``.artefacts/console/``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from media.player import HLSJS_DEFAULT, HLSJS_MISSING, HLSJS_URL
from services.stack import LocalStack
from support.browser import CHROMIUM, CHROMIUM_FLAGS, CURRENT_TIME, FRAME_HASH, NO_CHROMIUM, PLAYING
from support.hls_equality import http_get, wait_for

ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = Path(os.environ.get("RHEO_ARTEFACTS") or ROOT / ".artefacts") / "console"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)


def _publish(server: str, key: str) -> subprocess.Popen[bytes]:
    """The test pattern, published as OBS would with the page's server and key (``localhost`` may be IPv6 first)."""
    url = f"{server.replace('localhost', '127.0.0.1')}/{key}"
    return subprocess.Popen([sys.executable, "-m", "ingest.testpattern", url, "--size", "96x64", "--fps", "8",
                             "--reconnect"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
@pytest.mark.skipif(not HLSJS_DEFAULT.is_file(), reason=f"hls.js missing at {HLSJS_DEFAULT} (fetch-hlsjs.sh)")
def test_console_create_publish_watch_steer_and_list(stack: LocalStack) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (PyPI) not installed")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    publisher: subprocess.Popen[bytes] | None = None
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            # answers the page expects (401 for a wrong token, 404 with no restream API, 503 before the first
            # segment) are logged by Chromium as resource errors: those are not the page's errors
            page.on("console", lambda m: errors.append(m.text) if m.type == "error"
                    and not m.text.startswith("Failed to load resource") else None)
            # without hls.js (the gateway's 404 is tests/console/test_console_units.py's): a banner names the fix
            page.route("**" + HLSJS_URL, lambda route: route.fulfill(status=404, body="missing"))
            page.goto(stack.gateway_url + "/")
            page.wait_for_selector("#banner:not([hidden])")
            assert page.inner_text("#banner").startswith(HLSJS_MISSING) and page.url.endswith("/console/")
            page.screenshot(path=ARTEFACTS / "0-no-hlsjs.png")
            page.unroute("**" + HLSJS_URL)
            page.reload()
            page.wait_for_selector("#token")
            assert page.is_hidden("#banner")
            page.fill("#token", "not-the-token")
            page.click("#signin")
            page.wait_for_selector("#signin-error:has-text('not valid')")
            page.fill("#token", stack.api_token)
            page.screenshot(path=ARTEFACTS / "1-signin.png")
            page.click("#signin")
            page.wait_for_selector("#streams", state="attached")

            page.click("text=New stream")
            page.fill("#new-prompt", "a test pattern in watercolour")
            for sel, value in (("#new-width", "64"), ("#new-height", "64"), ("#new-fps", "8")):
                page.fill(sel, value)
            page.click("#create-submit")
            page.wait_for_selector("#obs-key")
            server, key = page.input_value("#obs-server"), page.input_value("#obs-key")
            assert re.fullmatch(r"rtmp://[^/]+:\d+/live", server) and key in page.inner_text("#obs-ffmpeg")
            page.screenshot(path=ARTEFACTS / "2-created.png")
            sid = page.get_attribute("#obs [data-id]", "data-id")
            publisher = _publish(server, key)

            page.click("#open-stream")
            page.wait_for_function(PLAYING, timeout=60000)
            time.sleep(1.0)  # hls.js settles onto its live-sync position first
            t0, frame0, wall0 = page.evaluate(CURRENT_TIME), page.evaluate(FRAME_HASH), time.monotonic()
            page.wait_for_function("() => /latency \\d/.test(document.getElementById('latency').textContent)")
            page.fill("#prompt", "the same pattern in charcoal")
            page.select_option("#mode", "blend")
            page.click("#apply-prompt")
            page.wait_for_selector("#changes li[data-seq]:not([data-seq=''])", timeout=20000)
            seq = int(page.get_attribute("#changes li", "data-seq"))
            assert f"took effect at seq {seq}" in page.inner_text("#changes")
            page.fill("#noise", "0.7")  # live parameters: their seq is reported the same way
            page.fill("#seed", "9")
            page.click("#apply-params")
            page.wait_for_selector("#changes li:nth-child(2)[data-seq]:not([data-seq=''])", timeout=20000)
            assert "noise 0.7, seed 9: took effect at seq" in page.inner_text("#changes li:first-child")
            assert stack.api("GET", f"/v1/streams/{sid}")["spec"]["seed"] == 9
            time.sleep(max(0.0, 3.0 - (time.monotonic() - wall0)))
            t1, frame1, wall1 = page.evaluate(CURRENT_TIME), page.evaluate(FRAME_HASH), time.monotonic()
            page.wait_for_function("() => !/–/.test(document.querySelector('#facts dd:nth-of-type(2)').textContent)",
                                   timeout=20000)  # the gateway's stats see the decoder's output rate
            page.screenshot(path=ARTEFACTS / "3-stream.png")

            page.click("text=Streams")
            page.wait_for_selector(f"#streams tr[data-id='{sid}'] [data-state='live']", timeout=20000)
            row = f"#streams tr[data-id='{sid}']"
            page.wait_for_function(f"""() => /^\\d+\\.\\d$/.test(document.querySelector("{row} .fps").textContent)
                && /^\\d+\\.\\d\\d s$/.test(document.querySelector("{row} .latency").textContent)
                && /^\\d+$/.test(document.querySelector("{row} .viewers").textContent)""", timeout=20000)
            page.screenshot(path=ARTEFACTS / "4-list.png")
            _check_stats_and_viewers(stack, sid)
        finally:
            browser.close()
            if publisher is not None:
                publisher.terminate()
                publisher.wait(10)
    assert t1 - t0 >= 0.5 * (wall1 - wall0), (t0, t1, wall1 - wall0)
    assert frame1 != frame0, "the picture did not change"
    assert not errors, errors


def _check_stats_and_viewers(stack: LocalStack, sid: str) -> None:
    """The live stream's numbers in the API are sane; two playback sessions fetching its playlist are two viewers
    (the page's own player, stopped when it left the stream page, lapses first), none after the viewer window
    (``egress.viewer_window_s``: 3 s on this stack)."""
    stats = stack.api("GET", f"/v1/streams/{sid}")["stats"]
    assert 0 < stats["output_fps"] <= 8 * 1.5 and 0 < stats["latency_ms"] < 60000, stats
    listed = next(s for s in stack.api("GET", "/v1/streams") if s["id"] == sid)
    assert listed["stats"]["viewers"] is not None and stack.api("GET", f"/v1/streams/{sid}/stats")["id"] == sid

    def viewers() -> int:
        return stack.api("GET", f"/v1/streams/{sid}/stats")["viewers"]

    wait_for(lambda: viewers() == 0, 20, "the page's playback session to lapse")

    def mint() -> str:
        url = stack.api("POST", f"/v1/streams/{sid}/playback")["llhls_url"]
        return urllib.parse.urlsplit(url).path.rsplit("/", 1)[0]

    tokens = [mint()]  # a token carries its expiry second: two minted within one second are one session
    wait_for(lambda: tokens.append(mint()) or tokens[-1] != tokens[0], 5, "a second playback token")
    first, second = tokens[0], tokens[-1]

    def two_clients_fetch() -> bool:
        assert all(http_get(stack, f"{base}/playlist.m3u8")[0] == 200 for base in (first, second))
        return viewers() == 2

    wait_for(two_clients_fetch, 20, "two viewers")
    wait_for(lambda: viewers() == 0, 20, "no viewers once the window lapsed")
