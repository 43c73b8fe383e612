"""FastAPI routes for HLS and LL-HLS playback, including blocking playlist reloads and blocking part requests.

Paths are stable per stream id under its signed playback token (``services/playback_tokens.py``; checked here
too, so the egress port plays nothing without one): ``{prefix}/{stream_id}/{token}/index.m3u8`` (LL-HLS; plain HLS
clients ignore the part tags), ``playlist.m3u8`` (plain rolling HLS), ``init_{d}.mp4`` (the init segment of the
period after the d-th discontinuity; ``init.mp4`` is the newest one), ``seg_{msn}.m4s`` and ``part_{msn}_{i}.m4s``.
The playlists' URIs are relative, so they resolve under the token.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, HTTPException, Query, Response

from media.llhls import HlsRegistry, LlHlsStream
from services.httpguard import NEEDS_TOKEN, check_playback, refused
from services.playback_tokens import PlaybackKeys

PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
MEDIA_TYPE = "video/mp4"
_NO_CACHE = {"Cache-Control": "no-cache"}
_IMMUTABLE = {"Cache-Control": "max-age=60"}


def make_hls_router(registry: HlsRegistry, keys: PlaybackKeys, prefix: str = "/hls",
                    on_view: Callable[[str, str], None] | None = None) -> APIRouter:
    """``on_view(stream_id, token)``: every request with a valid token for a stream served here (viewers)."""

    async def signed(stream_id: str, token: str) -> None:
        check_playback(keys, stream_id, token)
        if on_view is not None and registry.get(stream_id) is not None:
            on_view(stream_id, token)

    router = APIRouter(prefix=prefix + "/{stream_id}/{token}", dependencies=[Depends(signed)])

    def stream_or_404(stream_id: str) -> LlHlsStream:
        stream = registry.get(stream_id)
        if stream is None:
            raise HTTPException(404, f"no stream {stream_id!r}")
        return stream

    def block_timeout(stream: LlHlsStream) -> float:
        return 3.0 * stream.target_duration

    @router.get("/index.m3u8")
    async def ll_playlist(
        stream_id: str,
        msn: int | None = Query(None, alias="_HLS_msn", ge=0),
        part: int | None = Query(None, alias="_HLS_part", ge=0),
    ) -> Response:
        stream = stream_or_404(stream_id)
        if part is not None and msn is None:
            raise HTTPException(400, "_HLS_part requires _HLS_msn")
        if msn is not None:
            last = stream.segments[-1].msn if stream.segments else stream.next_part[0]
            if msn > last + 2:
                raise HTTPException(400, f"_HLS_msn={msn} is too far ahead of the live edge ({last})")
            if not await stream.wait_for(msn, part, block_timeout(stream)):
                raise HTTPException(503, "the requested segment/part did not appear in time")
        return Response(stream.ll_playlist(), media_type=PLAYLIST_TYPE, headers=_NO_CACHE)

    @router.get("/playlist.m3u8")
    async def plain_playlist(stream_id: str) -> Response:
        stream = stream_or_404(stream_id)
        return Response(stream.plain_playlist(), media_type=PLAYLIST_TYPE, headers=_NO_CACHE)

    @router.get("/init.mp4")
    async def init(stream_id: str) -> Response:
        stream = stream_or_404(stream_id)
        if stream.init is None and not await stream.wait_for(*stream.next_part, block_timeout(stream)):
            raise HTTPException(404, "no init segment yet")
        if stream.init is None:
            raise HTTPException(404, "no init segment")
        return Response(stream.init, media_type=MEDIA_TYPE, headers=_NO_CACHE)  # the newest: changes on a restart

    @router.get("/init_{discontinuity:int}.mp4")
    async def period_init(stream_id: str, discontinuity: int) -> Response:
        found = stream_or_404(stream_id).inits.get(discontinuity)
        if found is None:
            raise HTTPException(404, f"no init segment {discontinuity}")
        return Response(found, media_type=MEDIA_TYPE, headers=_NO_CACHE)  # a successor may rewrite an unlisted one

    @router.get("/seg_{msn:int}.m4s")
    async def segment(stream_id: str, msn: int) -> Response:
        stream = stream_or_404(stream_id)
        seg = stream.segment(msn)
        if seg is None or not seg.complete:
            raise HTTPException(404, f"no segment {msn}")
        return Response(seg.data, media_type=MEDIA_TYPE, headers=_IMMUTABLE)

    @router.get("/part_{msn:int}_{index:int}.m4s")
    async def part(stream_id: str, msn: int, index: int) -> Response:
        stream = stream_or_404(stream_id)
        found = stream.part(msn, index)
        if found is None:
            hint_msn, hint_idx = stream.next_part
            if (msn, index) == (hint_msn, hint_idx) or (msn == hint_msn + 1 and index == 0):
                await stream.wait_for(msn, index, block_timeout(stream))
                found = stream.part(msn, index)
        if found is None:
            raise HTTPException(404, f"no part {msn}.{index}")
        return Response(found.data, media_type=MEDIA_TYPE, headers=_IMMUTABLE)

    outer = APIRouter()
    outer.include_router(router)

    @outer.get(prefix + "/{rest:path}", include_in_schema=False)
    async def unsigned(rest: str) -> Response:
        """Any other path under the prefix: 401, as unsigned (not 404: nothing tells what exists)."""
        refused("playback_token")
        raise HTTPException(401, NEEDS_TOKEN)

    return outer
