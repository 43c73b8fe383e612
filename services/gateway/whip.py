"""Browser publishing through the gateway: ``/v1/streams/{id}/whip`` forwarded to the ingest's WHIP listener.

The console's page publishes same-origin (no CORS, no second address to reach); OBS and other WHIP clients may use
it too. The bearer is the stream key, checked by ingest exactly as an RTMP ``publish`` (ingest/whip.py): the
gateway only forwards, naming the client in ``X-Forwarded-For`` so ingest's per-address limits (key-guess backoff,
connection caps) count the publisher and not the gateway. The session's ``Location`` is rewritten to this API's
path, so the publisher's ``DELETE`` comes here too. Media (ICE/DTLS/SRTP over UDP) goes to ingest directly.
"""

from __future__ import annotations

import re

import httpx
from fastapi import APIRouter, HTTPException, Request, Response, status

from services.config import Settings
from services.gateway.playback import client_key
from services.httpguard import refused

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PASSED = ("content-type", "etag", "www-authenticate", "retry-after", "accept-post", "link")


def make_whip_router(settings: Settings, proxy: httpx.AsyncClient) -> APIRouter:
    gw = settings.gateway
    router = APIRouter(prefix="/v1/streams/{stream_id}/whip", tags=["publish"])

    def upstream(request: Request, *parts: str) -> str:
        if not all(_ID.fullmatch(p) for p in parts):
            refused("bad_path")
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no such stream or WHIP session")
        if not gw.whip_url:
            refused("whip_unavailable")
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "browser publishing is off (gateway.whip_url "
                                "unset; publish over RTMP)")
        return "/".join([gw.whip_url.rstrip("/"), "whip", *parts])

    async def forward(request: Request, method: str, url: str, body: bytes = b"") -> httpx.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        headers["X-Forwarded-For"] = client_key(request, gw.client_address_header)
        try:
            return await proxy.request(method, url, content=body, headers=headers)
        except httpx.HTTPError as e:
            refused("whip_unavailable")
            raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"ingest unreachable: {type(e).__name__}") from e

    def answer(r: httpx.Response, stream_id: str) -> Response:
        headers = {k: v for k, v in r.headers.items() if k.lower() in _PASSED}
        location = r.headers.get("location", "")
        if location.startswith(f"/whip/{stream_id}/"):
            headers["Location"] = f"/v1/streams/{stream_id}/whip/{location.rsplit('/', 1)[1]}"
        return Response(r.content, status_code=r.status_code, headers=headers)

    @router.post("", status_code=status.HTTP_201_CREATED, response_class=Response, responses={
        201: {"description": "the SDP answer (application/sdp); Location: the session, to DELETE"},
        400: {"description": "a bad offer"}, 401: {"description": "a bad stream key"}})
    async def offer(stream_id: str, request: Request) -> Response:
        """WHIP (RFC 9725): POST an SDP offer (``application/sdp``) with ``Authorization: Bearer <stream key>``."""
        url = upstream(request, stream_id)
        return answer(await forward(request, "POST", url, await request.body()), stream_id)

    @router.delete("/{session_id}", response_class=Response)
    async def end(stream_id: str, session_id: str, request: Request) -> Response:
        """End a WHIP session (the bearer: the same stream key)."""
        return answer(await forward(request, "DELETE", upstream(request, stream_id, session_id)), stream_id)

    @router.options("", include_in_schema=False)
    async def options(stream_id: str) -> Response:
        return Response(status_code=status.HTTP_204_NO_CONTENT, headers={"Accept-Post": "application/sdp"})

    return router
