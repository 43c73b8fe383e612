"""Playback through the gateway: ``/hls/{id}/{token}/...`` forwarded to the stream's egress, and the player page.

The signed token (``services/playback_tokens.py``) is checked before anything else (no stream-table read for an
anonymous request); egress checks it again. One client address may have at most
``gateway.max_playback_requests_per_client`` requests in flight (LL-HLS blocking reloads hold theirs up to 3
target durations): beyond, 429 at once, so one client can neither slow other viewers nor exhaust the proxy's
connection pool (``gateway.proxy_max_connections``). CORS headers are sent only on answers to a valid token and only
to ``playback.allowed_origins``.
"""

from __future__ import annotations

import httpx
from fastapi import APIRouter, HTTPException, Request, Response, status

from media.player import make_player_router
from proto import StreamRecord
from services.config import Settings
from services.gateway.limits import ClientSlots
from services.httpguard import NEEDS_TOKEN, check_playback, refused
from services.playback_tokens import PlaybackKeys
from services.streams import StreamNotFound, StreamTable


def client_key(request: Request, header: str | None) -> str:
    """The client a request counts against: its address, or the trusted proxy's header naming it."""
    if header:
        forwarded = request.headers.get(header, "")
        if forwarded:
            return forwarded.split(",")[0].strip()[:64]
    return request.client.host if request.client else "?"


def cors_headers(request: Request, allowed: list[str]) -> dict[str, str]:
    origin = request.headers.get("origin")
    if not origin or not allowed:
        return {}
    if "*" in allowed:
        return {"Access-Control-Allow-Origin": "*"}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin in allowed else {}


def egress_url(record: StreamRecord) -> str:
    """Where the stream plays: its assigned egress (placement: the controller moves it when that one dies), else
    the egress that last recorded serving it (no controller placed it)."""
    if record.assignment is not None and record.assignment.egress_url:
        return record.assignment.egress_url
    return record.egress_url


def make_playback_router(settings: Settings, table: StreamTable, proxy: httpx.AsyncClient,
                         keys: PlaybackKeys) -> APIRouter:
    gw = settings.gateway
    router = APIRouter()
    slots = ClientSlots(gw.max_playback_requests_per_client)
    # /player/index.html?src=/hls/<id>/<token>/index.m3u8
    router.include_router(make_player_router(on_refusal=lambda: refused("bad_player_source")))

    @router.get("/hls/{stream_id}/{token}/{path:path}", include_in_schema=False)
    async def hls(stream_id: str, token: str, path: str, request: Request) -> Response:
        check_playback(keys, stream_id, token)
        with slots.hold(client_key(request, gw.client_address_header)) as free:
            if not free:
                refused("client_busy")
                raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, "too many playback requests in flight from "
                                    "this client", headers={"Retry-After": "1"})
            try:
                record = await table.get(stream_id)
            except (StreamNotFound, ValueError):
                raise HTTPException(status.HTTP_404_NOT_FOUND, f"no stream {stream_id!r}") from None
            base = egress_url(record)
            if not base:
                raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"stream {stream_id} is not playing yet")
            url = f"{base.rstrip('/')}/hls/{stream_id}/{token}/{path}"
            try:
                upstream = await proxy.get(url, params=request.query_params)
            except httpx.HTTPError as e:
                raise HTTPException(status.HTTP_502_BAD_GATEWAY, f"egress unreachable: {type(e).__name__}") from e
        keep = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "cache-control")}
        return Response(upstream.content, status_code=upstream.status_code,
                        headers={**keep, **cors_headers(request, settings.playback.allowed_origins)})

    @router.get("/hls/{rest:path}", include_in_schema=False)
    async def unsigned(rest: str) -> Response:
        refused("playback_token")
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, NEEDS_TOKEN)

    return router
