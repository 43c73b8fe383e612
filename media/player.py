"""A minimal hls.js preview page (operators' quick look, the browser test and the latency benchmark).

hls.js is not vendored: it is served from a local file (``scripts/fetch-hlsjs.sh`` puts it in
``.cache/hlsjs``). The page exposes ``window.report`` (hls.js errors, with fatal ones prefixed ``FATAL``) and
``window.hls`` (for ``hls.latency``). A fatal network error is retried every second, not fatal: the playlist may not
exist yet, or its egress is being restarted (docs/supervision.md).

It plays only same-origin rheo playlists: ``src`` must be a signed ``/hls/<id>/<token>/(index|playlist).m3u8``
path (refused with 400 otherwise, and checked again by the page), and a Content-Security-Policy keeps the page from
loading or connecting anywhere else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse, HTMLResponse

HLSJS_DEFAULT = Path(__file__).resolve().parent.parent / ".cache/hlsjs/node_modules/hls.js/dist/hls.min.js"

SOURCE = re.compile(r"^/hls/[A-Za-z0-9_-]{1,64}/[A-Za-z0-9._-]{1,100}/(index|playlist)\.m3u8$")
"""What the player may play: a signed playlist path of this origin (no scheme, host or query)."""

HLSJS_CONFIG = {"lowLatencyMode": True, "maxLiveSyncPlaybackRate": 1.5, "liveSyncOnStallIncrease": 0.1}
"""hls.js settings of the page: the live-sync target is the playlist's PART-HOLD-BACK (3 part durations), a player
behind it catches up at up to 1.5× speed (hls.js' default 1 never does), and a stall raises the target by 0.1 s
rather than hls.js' 1 s, which left it 1.2–1.4 s behind the edge for good after a stall (docs/latency.md)."""

PLAYER_SCRIPT = """
window.report = {errors: []};
const v = document.getElementById('v');
const src = new URLSearchParams(location.search).get('src');
if (!/^\\/hls\\/[A-Za-z0-9_-]{1,64}\\/[A-Za-z0-9._-]{1,100}\\/(index|playlist)\\.m3u8$/.test(src || '')) {
  throw new Error("the player plays only this server's signed /hls/ playlists");
}
const hls = new Hls(""" + json.dumps(HLSJS_CONFIG) + """);
window.hls = hls;
let parsed = false;
hls.on(Hls.Events.ERROR, (e, d) => {
  if (d.fatal && d.type === Hls.ErrorTypes.NETWORK_ERROR) {
    // no playlist yet (opened before its first segment), or its server is restarting: keep asking
    window.report.errors.push((parsed ? 'retrying ' : 'waiting ') + d.details);
    setTimeout(() => parsed ? hls.startLoad() : hls.loadSource(src), 1000);
    return;
  }
  window.report.errors.push((d.fatal ? 'FATAL ' : '') + d.type + ' ' + d.details);
});
hls.on(Hls.Events.MANIFEST_PARSED, () => {
  parsed = true;
  v.play().catch(err => window.report.errors.push('play ' + err));
});
hls.loadSource(src);
hls.attachMedia(v);
"""

PLAYER_HTML = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>rheo preview</title></head>
<body style="margin:0;background:#000">
<video id="v" muted autoplay playsinline style="width:100%"></video>
<script src="hls.min.js"></script>
<script>{PLAYER_SCRIPT}</script></body></html>
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

    @router.get("/hls.min.js")
    async def script() -> FileResponse:
        if not hlsjs.is_file():
            raise HTTPException(404, "hls.js not installed (run scripts/fetch-hlsjs.sh)")
        return FileResponse(hlsjs, media_type="application/javascript")

    return router
