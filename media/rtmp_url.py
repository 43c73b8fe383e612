"""RTMP URLs: the one parser (``rtmp[s]://host[:port]/app/key``) and the one redaction (stream keys are secrets),
shared by the RTMP push (egress) and the restream API (gateway)."""

from __future__ import annotations

import urllib.parse

DEFAULT_PORTS = {"rtmp": 1935, "rtmps": 443}
MASK = "***"


def split_rtmp_url(url: str) -> tuple[str, int, str, str]:
    """``rtmp[s]://host[:port]/app/key`` → (host, port, app, key); rtmps defaults to port 443."""
    parsed = urllib.parse.urlsplit(url)
    try:
        port = parsed.port
    except ValueError as e:
        raise ValueError("RTMP URL has a bad port") from e
    if parsed.scheme not in DEFAULT_PORTS or not parsed.hostname:
        raise ValueError(f"not an rtmp:// or rtmps:// URL: {redact_rtmp_url(url)!r}")
    path = parsed.path.lstrip("/")
    app, _, key = path.partition("/")
    if parsed.query:
        key += "?" + parsed.query
    if not app or not key:
        raise ValueError(f"RTMP URL needs /app/key: {redact_rtmp_url(url)!r}")
    return parsed.hostname, port or DEFAULT_PORTS[parsed.scheme], app, key


def redact_rtmp_url(url: str) -> str:
    """The URL without what may be secret: user info and the stream key (everything after the app)."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.netloc.rpartition("@")[2]
    app = parsed.path.lstrip("/").partition("/")[0]
    return f"{parsed.scheme}://{host}/{app}/{MASK}" if app else f"{parsed.scheme}://{host}/{MASK}"
