"""Headless Chromium for player tests: Debian's /usr/bin/chromium driven by PyPI playwright (no browser download)."""

from __future__ import annotations

import shutil

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--autoplay-policy=no-user-gesture-required",
]
NO_CHROMIUM = "chromium not installed (apt-get install chromium)"

# a page may render its <video> after the wait begins (the console draws a view on its hash change)
PLAYING = "() => { const v = document.getElementById('v'); return v !== null && v.readyState >= 3 && !v.paused }"
CURRENT_TIME = "document.getElementById('v').currentTime"
FRAME_HASH = """() => {
  const v = document.getElementById('v'), c = document.createElement('canvas');
  c.width = v.videoWidth; c.height = v.videoHeight;
  const g = c.getContext('2d'); g.drawImage(v, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let h = 0;
  for (let i = 0; i < d.length; i += 4) h = (h * 31 + d[i] + d[i + 1] + d[i + 2]) >>> 0;
  return h;
}"""
"""A hash of the picture the video element shows now (equal hashes: the same frame)."""
