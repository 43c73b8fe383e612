"""Per-stream restream destinations: ``GET/PUT /v1/streams/{id}/restream`` (docs/restream.md).

The list lives in the stream record (``StreamRecord.restream``); egress watches the table and starts or stops one
RTMP push per destination at once. An empty list means the operator's default (``egress.rtmp_push_url``, if set).
Destination URLs carry stream keys, which are secrets: they are stored, never shown back (GET and PUT answer with
the key part masked). A per-stream token may not point its stream at loopback, private or link-local addresses
(egress would connect there from inside the cluster); operators may.
"""

from __future__ import annotations

import ipaddress
import logging
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from media.rtmp_url import redact_rtmp_url, split_rtmp_url
from proto.messages import MAX_RESTREAM_DESTINATIONS, StreamRecord
from services.gateway.auth import Principal
from services.streams import StreamTable

log = logging.getLogger("rheo.gateway")

MAX_URL_CHARS = 1024


class RestreamBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    destinations: list[str] = Field(max_length=MAX_RESTREAM_DESTINATIONS, description=(
        f"rtmp:// or rtmps:// URLs with app and stream key (at most {MAX_RESTREAM_DESTINATIONS}); empty: the "
        "operator's default"))


class RestreamInfo(BaseModel):
    destinations: list[str] = Field(description="the stream's own destinations, stream keys masked")
    default: bool = Field(description="no own destinations: the operator's default applies (if configured)")


def _internal(host: str) -> bool:
    if host.lower().rstrip(".") in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not ip.is_global


def check_destination(url: str, may_be_internal: bool) -> str:
    """A destination as stored, or ValueError saying what is wrong (never echoing the key)."""
    if len(url) > MAX_URL_CHARS or any(c.isspace() or ord(c) < 32 for c in url):
        raise ValueError(f"a destination must be at most {MAX_URL_CHARS} characters, without spaces")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("rtmp", "rtmps"):
        raise ValueError("a destination must be an rtmp:// or rtmps:// URL")
    if "@" in parsed.netloc:
        raise ValueError("credentials in the host part are not supported: put the stream key in the path")
    host, _port, _app, _key = split_rtmp_url(url)
    if not may_be_internal and _internal(host):
        raise ValueError(f"{redact_rtmp_url(url)}: loopback, private and link-local addresses need an operator token")
    return url


def shown(record: StreamRecord) -> RestreamInfo:
    return RestreamInfo(destinations=[redact_rtmp_url(u) for u in record.restream], default=not record.restream)


def make_restream_router(table: StreamTable, of_stream: Callable[..., Awaitable[Principal]],
                         limited: Callable[[Principal], None],
                         record_or_404: Callable[[str], Awaitable[StreamRecord]]) -> APIRouter:
    """Mounted under ``/v1`` by ``services.gateway.api``; auth and rate limits are the API's own."""
    router = APIRouter()

    @router.get("/streams/{stream_id}/restream", response_model=RestreamInfo, dependencies=[Depends(of_stream)])
    async def get_restream(stream_id: str) -> RestreamInfo:
        return shown(await record_or_404(stream_id))

    @router.put("/streams/{stream_id}/restream", response_model=RestreamInfo)
    async def put_restream(stream_id: str, body: RestreamBody, who: Principal = Depends(of_stream)) -> RestreamInfo:
        """Replace the stream's destinations; egress follows within a moment (live streams too)."""
        limited(who)
        try:
            urls = [check_destination(u, who.operator) for u in body.destinations]
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        if len(set(urls)) != len(urls):
            raise HTTPException(422, "a destination is listed twice")
        await record_or_404(stream_id)
        change: Callable[[StreamRecord], Any] = lambda r: r.model_copy(update={"restream": urls})  # noqa: E731
        record = await table.update(stream_id, change)
        log.info("stream %s: %d restream destination(s) set", stream_id, len(urls))
        return shown(record)

    return router
