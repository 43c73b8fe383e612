"""A minimal hls.js preview page (operators' quick look, the browser test and the latency benchmark).

hls.js is not vendored: it is served from a local file (``scripts/fetch-hlsjs.sh`` puts it in
``.cache/hlsjs``). The page exposes ``window.report`` (hls.js errors, with fatal ones prefixed ``FATAL``) and
``window.hls`` (for ``hls.latency``). A fatal network error is retried every second, not fatal: the playlist may not
exist yet, or its egress is being restarted (docs/supervision.md).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse

HLSJS_DEFAULT = Path(__file__).resolve().parent.parent / ".cache/hlsjs/node_modules/hls.js/dist/hls.min.js"

PLAYER_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>rheo preview</title></head>
<body style="margin:0;background:#000">
<video id="v" muted autoplay playsinline style="width:100%"></video>
<script src="hls.min.js"></script>
<script>
window.report = {errors: []};
const v = document.getElementById('v');
const src = new URLSearchParams(location.search).get('src');
const hls = new Hls({lowLatencyMode: true});
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
</script></body></html>
"""


def make_player_router(hlsjs: Path = HLSJS_DEFAULT, prefix: str = "/player") -> APIRouter:
    """``{prefix}/index.html?src=<playlist URL>`` and the hls.js it loads."""
    router = APIRouter(prefix=prefix)

    @router.get("/index.html")
    async def page() -> HTMLResponse:
        return HTMLResponse(PLAYER_HTML)

    @router.get("/hls.min.js")
    async def script() -> FileResponse:
        if not hlsjs.is_file():
            raise HTTPException(404, "hls.js not installed (run scripts/fetch-hlsjs.sh)")
        return FileResponse(hlsjs, media_type="application/javascript")

    return router
