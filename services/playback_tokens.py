"""Signed, expiring playback URLs: the one definition of the token the gateway mints and gateway and egress check.

A token grants ``/hls/<stream id>/<token>/…`` (the path prefix it is bound to) until its expiry:
``<expiry unix s>.<base64url HMAC-SHA256(key, "rheo-playback-v1|/hls/<id>/|<expiry>")[:16 B]>``.
It is a path segment, so every relative URI of a playlist (parts, segments, init, blocking reloads with their
``_HLS_msn``/``_HLS_part`` query) resolves under it and carries it without any rewriting. Keys are a list
(``playback.signing_keys``): the first signs, every one verifies, so a key rotates by prepending the new one and
removing the old one after the longest TTL (docs/security.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Literal

from pydantic import SecretStr

_VERSION = "rheo-playback-v1"
_SIG_BYTES = 16
_TOKEN = re.compile(r"^(\d{1,12})\.([A-Za-z0-9_-]{22})$")
MIN_KEY_CHARS = 32

Verdict = Literal["ok", "missing", "malformed", "expired", "bad_signature"]
"""Why a token is (not) accepted; the refusal reasons are a bounded metric label."""


def playback_prefix(stream_id: str) -> str:
    """The path prefix a stream's tokens are bound to."""
    return f"/hls/{stream_id}/"


@dataclass(frozen=True)
class PlaybackKeys:
    """The signing key list: ``keys[0]`` signs, all verify."""

    keys: tuple[bytes, ...]

    @classmethod
    def of(cls, keys: list[SecretStr] | list[str]) -> PlaybackKeys:
        raw = tuple((k.get_secret_value() if isinstance(k, SecretStr) else k).encode() for k in keys)
        if not raw:
            raise ValueError("no playback signing key configured (playback.signing_keys)")
        short = [i for i, k in enumerate(raw) if len(k) < MIN_KEY_CHARS]
        if short:
            raise ValueError(f"playback.signing_keys[{short[0]}] is shorter than {MIN_KEY_CHARS} characters")
        return cls(raw)

    @staticmethod
    def _mac(key: bytes, stream_id: str, expiry: int) -> bytes:
        msg = f"{_VERSION}|{playback_prefix(stream_id)}|{expiry}".encode()
        return hmac.new(key, msg, hashlib.sha256).digest()[:_SIG_BYTES]

    def sign(self, stream_id: str, ttl_s: float, now: float | None = None) -> str:
        expiry = int((time.time() if now is None else now) + ttl_s)
        sig = base64.urlsafe_b64encode(self._mac(self.keys[0], stream_id, expiry)).rstrip(b"=").decode()
        return f"{expiry}.{sig}"

    def verify(self, stream_id: str, token: str, now: float | None = None) -> Verdict:
        if not token:
            return "missing"
        m = _TOKEN.match(token)
        if m is None:
            return "malformed"
        expiry = int(m.group(1))
        try:
            presented = base64.urlsafe_b64decode(m.group(2) + "==")
        except ValueError:
            return "malformed"
        good = any(hmac.compare_digest(presented, self._mac(k, stream_id, expiry)) for k in self.keys)
        if not good:
            return "bad_signature"
        return "ok" if expiry > (time.time() if now is None else now) else "expired"

    def path(self, stream_id: str, ttl_s: float, now: float | None = None) -> str:
        """``/hls/<id>/<token>``: the base path of a stream's playlists for ``ttl_s`` seconds."""
        return playback_prefix(stream_id) + self.sign(stream_id, ttl_s, now)
