"""Going live from the console's stream page (golive.js → gateway → ingest/whip.py) in headless Chromium with its
fake camera and microphone, on the package's stack (conftest.py): the page's own preview of the styled stream plays
and moves, with the microphone's audio, and Stop ends the WHIP session.
Screenshot: ``$RHEO_ARTEFACTS/console/5-golive.png``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from media.player import HLSJS_DEFAULT
from services.stack import LocalStack
from support.browser import CHROMIUM, CHROMIUM_FLAGS, FRAME_HASH, NO_CHROMIUM, PLAYING

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
ARTEFACTS = Path(os.environ.get("RHEO_ARTEFACTS") or Path(__file__).resolve().parents[2] / ".artefacts") / "console"
FAKE_MEDIA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


@pytest.mark.slow
@pytest.mark.skipif(not HLSJS_DEFAULT.is_file(), reason=f"hls.js missing at {HLSJS_DEFAULT} (fetch-hlsjs.sh)")
def test_console_goes_live_from_the_browser_camera(stack: LocalStack) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (PyPI) not installed")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    created = stack.api("POST", "/v1/streams", {"prompt": "a webcam in pastel", "width": 64, "height": 64, "fps": 8})
    sid, key = created["id"], created["stream_key"]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS + FAKE_MEDIA)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 980})
            # signed in from the first paint: one navigation, straight to the stream page
            page.add_init_script(f"sessionStorage.setItem('rheo.token', {json.dumps(stack.api_token)})")
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{stack.gateway_url}/console/#/s/{sid}")
            page.wait_for_selector("#golive-start")
            page.click("#golive-start")  # no key yet (this tab did not create the stream): said so, nothing sent
            page.wait_for_selector("#golive-status[data-state='error']")
            page.fill("#golive-key", key)
            page.click("#golive-start")
            page.wait_for_selector("#golive-status[data-state='live']", timeout=30000)
            page.wait_for_function(PLAYING, timeout=60000)  # the styled stream, through egress, in the preview
            frame0 = page.evaluate(FRAME_HASH)
            page.wait_for_function(f"h => ({FRAME_HASH})() !== h", arg=frame0, timeout=20000)  # it moves
            # the fake microphone's Opus, transcoded to AAC at ingest, is decoded by the preview
            page.wait_for_function("() => document.getElementById('v').webkitAudioDecodedByteCount > 0",
                                   timeout=20000)
            page.screenshot(path=ARTEFACTS / "5-golive.png", full_page=True)
            info = stack.api("GET", f"/v1/streams/{sid}")
            assert info["state"] == "live" and (info["ingest"] or {}).get("published", 0) > 0, info
            page.click("#golive-stop")
            page.wait_for_selector("#golive-status[data-state='idle']")
            assert page.inner_text("#golive-status") == "Stopped."
        finally:
            browser.close()
    assert not errors, errors
