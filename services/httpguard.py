"""What every rheo HTTP app (gateway, egress) puts in front of its routes: path and body checks before routing,
and errors mapped to short JSON answers (docs/security.md).

- ``PathGuard``: a raw path with ``..``/``.`` segments, encoded slashes, backslashes, dots or percent signs
  (double encoding), NUL or control characters is refused (400) before any route sees it: no id check downstream
  can be fooled by a decoded ``/``.
- ``BodyLimit``: a declared ``Content-Length`` over the limit is refused (413) without reading a byte; a chunked
  body is counted as it streams and refused once it passes the limit. A path may have its own limit (uploads).
- ``install_error_handlers``: NATS timeouts, no responders and a closed connection answer 503 with a reason; any
  other exception answers 500 ``internal error`` (logged with its traceback, never sent).
Every refusal is counted in ``rheo_http_refusals_total{reason}`` (a fixed set of reasons).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from typing import Any

import nats.errors
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.playback_tokens import PlaybackKeys

log = logging.getLogger("rheo.http")

REFUSAL_REASONS = ("bad_path", "body_too_large", "unauthorised", "forbidden", "playback_token", "rate_limited",
                   "client_busy", "bad_player_source", "bus_unavailable", "internal_error", "whip_unavailable")
REFUSALS = Counter("rheo_http_refusals_total", "HTTP requests refused, by reason", ["reason"])
for _r in REFUSAL_REASONS:
    REFUSALS.labels(_r)


def refused(reason: str) -> None:
    """Count one refusal (``reason`` must be one of ``REFUSAL_REASONS``: the label set stays bounded)."""
    assert reason in REFUSAL_REASONS, reason
    REFUSALS.labels(reason).inc()


NEEDS_TOKEN = "a signed playback URL is required (the API's hls_url/llhls_url, or POST /v1/streams/{id}/playback)"


def check_playback(keys: PlaybackKeys, stream_id: str, token: str) -> None:
    """401 without a token, 403 with a bad or expired one (gateway and egress both ask this)."""
    verdict = keys.verify(stream_id, token)
    if verdict == "ok":
        return
    refused("playback_token")
    if verdict in ("missing", "malformed"):
        raise HTTPException(401, NEEDS_TOKEN)
    raise HTTPException(403, f"playback token {verdict.replace('_', ' ')}")


_BAD_RAW = re.compile(rb"%(2f|5c|2e|25|00)|\\", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def path_problem(raw_path: bytes, path: str) -> str | None:
    """Why a request path is refused before routing, or None."""
    if _BAD_RAW.search(raw_path):
        return "encoded '/', '\\', '.', '%' or NUL in the path"
    if _CONTROL.search(path):
        return "control character in the path"
    if any(seg in (".", "..") for seg in path.split("/")):
        return "'.' or '..' path segment"
    return None


async def _send_json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           (b"connection", b"close")]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class PathGuard:
    """Refuse traversal, encoded separators and NUL on the raw path, before routing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = path_problem(scope.get("raw_path") or scope["path"].encode(), scope["path"])
            if problem is not None:
                refused("bad_path")
                await _send_json(send, 400, f"refused: {problem}")
                return
        await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for bodies over ``max_bytes``: by ``Content-Length`` at once, or counted while a chunked body streams."""

    def __init__(self, app: ASGIApp, max_bytes: int, paths: dict[str, tuple[int, str]] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths or {}
        """Exact path → (its limit, the setting that sets it: named in the 413)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, setting = self.paths.get(scope["path"], (self.max_bytes, ""))
        too_large = f"request body over {max_bytes} bytes" + (f" ({setting})" if setting else "")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            refused("body_too_large")
            await _send_json(send, 413, too_large)
            return
        seen = 0
        started = refusing = False

        async def counted() -> Message:
            nonlocal seen, started, refusing
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    if not refusing:
                        refused("body_too_large")
                    if not started:  # the app's own answer to the aborted read (a 400) is dropped below
                        refusing = started = True
                        await _send_json(send, 413, too_large)
                    raise _TooLarge
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if refusing:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, counted, tracked)


_BUS_DOWN = (nats.errors.Error, TimeoutError)  # timeouts, no responders, connection closed, JetStream errors


def install_error_handlers(app: FastAPI) -> None:
    """NATS trouble (any error of the client) → 503 JSON; anything unexpected → 500 without details (the
    traceback goes to the log)."""

    async def bus_down(request: Request, exc: Exception) -> JSONResponse:
        refused("bus_unavailable")
        log.warning("%s %s: the bus did not answer: %s", request.method, request.url.path, type(exc).__name__)
        return JSONResponse({"detail": f"the message bus did not answer ({type(exc).__name__}); retry"},
                            status_code=503, headers={"Retry-After": "1"})

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        refused("internal_error")
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    for exc in _BUS_DOWN:
        app.add_exception_handler(exc, bus_down)
    app.add_exception_handler(Exception, internal)


def guard(app: FastAPI, max_body_bytes: int, paths: dict[str, tuple[int, str]] | None = None) -> Any:
    """The app wrapped as served: path check outermost, then the body limit (``paths``: per-path limits)."""
    install_error_handlers(app)
    return PathGuard(BodyLimit(app, max_body_bytes, paths))
