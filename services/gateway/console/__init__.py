"""The web console (``/console/``), served by the gateway on the API's own origin; ``/`` leads to it.

Plain HTML, CSS and JavaScript modules in ``static/`` (no framework, no build step); hls.js comes from the one
place the player page also uses (``media.player.HLSJS_DEFAULT``, served at ``HLSJS_URL``). The console signs in
with an API token kept in the tab's ``sessionStorage`` and sent as ``Authorization: Bearer``: it has no session or
cookie of its own, so it can do exactly what its token may. Its Content-Security-Policy allows this origin only and
no inline script: nothing from a CDN, nothing injected runs. docs/console.md.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

STATIC = Path(__file__).resolve().parent / "static"
PREFIX = "/console"
ASSET = re.compile(r"^[a-z][a-z0-9-]{0,40}\.(js|css|html|svg)$")
"""What may be asked for: a flat file name of the folder (no path, nothing hidden)."""
TYPES = {"js": "text/javascript", "css": "text/css", "html": "text/html", "svg": "image/svg+xml"}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "media-src 'self' blob:; worker-src 'self' blob:; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
"""This origin only (hls.js runs its transmuxer in a blob: worker and plays through a blob: MediaSource URL)."""
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}


def make_console_router() -> APIRouter:
    """``/`` (a redirect to the console), ``/console/`` and its assets."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def front() -> RedirectResponse:
        return RedirectResponse(f"{PREFIX}/", status_code=307)

    @router.get(f"{PREFIX}/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type=TYPES["html"], headers=HEADERS)

    @router.get(PREFIX + "/{name}")
    async def asset(name: str) -> FileResponse:
        path = STATIC / name
        if not ASSET.match(name) or not path.is_file():
            raise HTTPException(404, f"no console asset {name[:60]!r}")
        return FileResponse(path, media_type=TYPES[name.rsplit(".", 1)[1]], headers=HEADERS)

    return router
