"""The console's Jobs page in headless Chromium against the package's stack (its one jobs worker, tiny model):
upload a short clip, watch the progress bar reach done, see the preview play, download the MP4 and decode it.

Screenshots go to ``$RHEO_ARTEFACTS`` (default ``.artefacts/console/``), beside the stream journey's.
"""

from __future__ import annotations

import os
import urllib.request
from fractions import Fraction
from pathlib import Path

import av
import pytest

from services.stack import LocalStack
from support.browser import CHROMIUM, CHROMIUM_FLAGS, NO_CHROMIUM
from support.pipekit import write_clip

ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = Path(os.environ.get("RHEO_ARTEFACTS") or ROOT / ".artefacts") / "console"
FRAMES, FPS, SIZE = 21, 12, 64

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)

VIDEO_PLAYS = ("() => { const v = document.getElementById('job-video'); "
               f"return v && v.readyState >= 2 && v.currentTime > 0 && v.videoWidth === {SIZE}; }}")


@pytest.mark.slow
def test_console_job_upload_progress_preview_and_download(stack: LocalStack, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (PyPI) not installed")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    clip = write_clip(tmp_path / "clip.mp4", frames=FRAMES, fps=FPS)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error"
                    and not m.text.startswith("Failed to load resource") else None)
            page.goto(stack.gateway_url + "/console/")
            page.fill("#token", stack.api_token)
            page.click("#signin")
            page.wait_for_selector("#streams", state="attached")
            page.click("nav >> text=Jobs")
            page.wait_for_selector("#job-form")
            page.set_input_files("#job-file", str(clip))
            page.fill("#job-prompt", "the pattern as a mosaic")
            for sel, value in (("#job-width", str(SIZE)), ("#job-height", str(SIZE)), ("#job-steps", "1")):
                page.fill(sel, value)
            page.click("#job-submit")
            page.wait_for_selector("#job [data-id]")
            job_id = page.get_attribute("#job [data-id]", "data-id")
            ended = "#job [data-state='done'], #job [data-state='failed'], #job [data-state='cancelled']"
            page.wait_for_selector(ended, timeout=90000)  # the worker builds its model first
            assert page.get_attribute(ended, "data-state") == "done", page.inner_text("#job-status")
            assert page.evaluate("document.getElementById('job-progress').value") == 1
            assert "chunks 5/5" in page.inner_text("#job-status") and page.is_hidden("#job-cancel")
            page.wait_for_function(VIDEO_PLAYS, timeout=20000)  # the preview plays the result
            page.wait_for_selector(f"#jobs tr[data-id='{job_id}'] [data-state='done']", timeout=10000)
            page.screenshot(path=ARTEFACTS / "5-job-done.png", full_page=True)
            with page.expect_download() as download:
                page.click("#job-download")
            saved = tmp_path / "result.mp4"
            download.value.save_as(saved)
            assert download.value.suggested_filename == f"{job_id}.mp4"
        finally:
            browser.close()
    with av.open(str(saved)) as c:
        stream = c.streams.video[0]
        frames = list(c.decode(stream))
        assert Fraction(stream.average_rate) == FPS
    assert len(frames) == FRAMES and (frames[0].width, frames[0].height) == (SIZE, SIZE)
    assert not errors, errors
    for p in stack.procs:  # the job's whole path stayed within the gateway's and the worker's bus permissions
        if p.name in ("gateway", "jobs"):
            with urllib.request.urlopen(f"http://127.0.0.1:{p.health_port}/metrics", timeout=5) as r:
                refused = [line for line in r.read().decode().splitlines()
                           if line.startswith("rheo_bus_permission_denied_total{") and not line.endswith(" 0.0")]
            assert not refused, (p.name, refused)
