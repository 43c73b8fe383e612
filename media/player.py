"""A minimal hls.js preview page (operators' quick look, the browser test and the latency benchmark).

hls.js is not vendored: it is served from a local file (``scripts/fetch-hlsjs.sh``, run by ``make up``/``make test``
and the Dockerfile, puts it in ``.cache/hlsjs``); without it the gateway logs ``HLSJS_MISSING`` once at start and the
pages show it. The playback itself (hls.js setup, retries, latency) is ``play.js``, served at ``/player/play.js``
and shared with the gateway's console. The page exposes ``window.report`` (hls.js errors, with fatal ones prefixed
``FATAL``) and ``window.hls`` (for ``hls.latency``). A fatal network error is retried every second, not fatal: the
playlist may not exist yet, or its egress is being restarted (docs/supervision.md).

It plays only same-origin rheo playlists: ``src`` must be a signed ``/hls/<id>/<token>/(index|playlist).m3u8``
path (refused with 400 otherwise, and checked again by the page), and a Content-Security-Policy keeps the page from
loading or connecting anywhere else.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse, HTMLResponse

HLSJS_DEFAULT = Path(__file__).resolve().parent.parent / ".cache/hlsjs/node_modules/hls.js/dist/hls.min.js"
"""Where hls.js comes from: the one place (the player page, the console and the tests read it)."""
HLSJS_URL = "/player/hls.min.js"
"""Where the gateway serves it (the player page and the console load it from here)."""
HLSJS_MISSING = "hls.js is not installed: run scripts/fetch-hlsjs.sh"
"""What the console shows, the gateway logs at start and the 404 says when it is missing."""


def check_hlsjs(log: logging.Logger, hlsjs: Path = HLSJS_DEFAULT) -> bool:
    """Whether hls.js is there; if not, say so once in ``log`` (pages then show ``HLSJS_MISSING``, not a blank)."""
    if hlsjs.is_file():
        return True
    log.warning("%s (looked for %s): the console and /player show this message instead of video", HLSJS_MISSING,
                hlsjs)
    return False

SOURCE = re.compile(r"^/hls/[A-Za-z0-9_-]{1,64}/[A-Za-z0-9._-]{1,100}/(index|playlist)\.m3u8$")
"""What the player may play: a signed playlist path of this origin (no scheme, host or query)."""

PLAY_JS = Path(__file__).resolve().parent / "play.js"
"""The playback module (hls.js, retries, latency) the page and the gateway's console share."""

PLAYER_SCRIPT = """
import {HLSJS_MISSING, hlsjsMissing, play} from './play.js';
window.report = {errors: []};
const v = document.getElementById('v');
const src = new URLSearchParams(location.search).get('src');
if (hlsjsMissing()) {
  const p = document.createElement('p'); p.style.cssText = 'color:#fff;font:16px sans-serif;padding:1em';
  p.textContent = HLSJS_MISSING; v.replaceWith(p);
} else if (!/^\\/hls\\/[A-Za-z0-9_-]{1,64}\\/[A-Za-z0-9._-]{1,100}\\/(index|playlist)\\.m3u8$/.test(src || '')) {
  window.report.errors.push("FATAL the player plays only this server's signed /hls/ playlists");
} else {
  window.player = play(v, src, e => window.report.errors.push(e));
  window.hls = window.player.hls;
}
"""

PLAYER_HTML = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rheo preview</title></head>
<body style="margin:0;background:#000">
<video id="v" muted autoplay playsinline style="width:100%"></video>
<script src="hls.min.js"></script>
<script type="module">{PLAYER_SCRIPT}</script></body></html>
"""

_SCRIPT_HASH = base64.b64encode(hashlib.sha256(PLAYER_SCRIPT.encode()).digest()).decode()
CSP = ("default-src 'none'; script-src 'self' 'sha256-" + _SCRIPT_HASH + "'; connect-src 'self'; "
       "media-src 'self' blob:; worker-src 'self' blob:; style-src 'unsafe-inline'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
"""Only this origin's script (and the page's own inline one, by hash), requests and media."""


def make_player_router(hlsjs: Path = HLSJS_DEFAULT, prefix: str = "/player",
                       on_refusal: Callable[[], None] | None = None) -> APIRouter:
    """``{prefix}/index.html?src=/hls/<id>/<token>/index.m3u8`` and the hls.js it loads; ``on_refusal`` counts a
    refused ``src``."""
    router = APIRouter(prefix=prefix)

    @router.get("/index.html")
    async def page(src: str = Query("", max_length=300)) -> HTMLResponse:
        if not SOURCE.match(src):
            if on_refusal is not None:
                on_refusal()
            raise HTTPException(400, "src must be a signed playlist path of this server: /hls/<id>/<token>/index.m3u8")
        return HTMLResponse(PLAYER_HTML, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                                  "Referrer-Policy": "no-referrer"})

    @router.get("/play.js")
    async def module() -> FileResponse:
        return FileResponse(PLAY_JS, media_type="text/javascript")

    @router.get("/hls.min.js")
    async def script() -> FileResponse:
        if not hlsjs.is_file():
            raise HTTPException(404, HLSJS_MISSING)
        return FileResponse(hlsjs, media_type="application/javascript")

    return router
