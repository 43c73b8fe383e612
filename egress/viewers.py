"""Viewers of a stream: distinct playback sessions that fetched a playlist or part in the last few seconds.

A playback session is a signed playback token (``services/playback_tokens.py``): every player plays under the one
it was given, and a console renews its own before it expires. Egress sees the token on every request (the gateway
proxies the path as is), after checking it, so only sessions of streams it serves are counted. Tokens are kept
as an 8-byte hash, never in clear. Memory is bounded: at most ``MAX_SESSIONS`` per stream (a stream with more
reports its count as a lower bound, and each session not tracked is counted in
``rheo_egress_viewer_sessions_untracked_total``), and streams are those egress serves (``forget`` on removal).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict

from prometheus_client import Counter

__all__ = ["MAX_SESSIONS", "ViewerCounter"]

MAX_SESSIONS = 4096
"""Sessions tracked per stream (≈ 100 B each)."""

UNTRACKED = Counter("rheo_egress_viewer_sessions_untracked_total",
                    "playback sessions not tracked because their stream already tracks MAX_SESSIONS (its viewer "
                    "count is then a lower bound)")


class ViewerCounter:
    """Per stream, each session's last fetch, oldest first; a session's count lapses ``window_s`` after it."""

    def __init__(self, window_s: float, max_sessions: int = MAX_SESSIONS) -> None:
        self.window_s = window_s
        self.max_sessions = max_sessions
        self._seen: dict[str, OrderedDict[bytes, float]] = {}
        self._capped: set[str] = set()

    def seen(self, stream_id: str, token: str, now: float | None = None) -> None:
        """A request of ``stream_id`` under the (checked) playback ``token``."""
        now = time.monotonic() if now is None else now
        key = hashlib.blake2b(token.encode(), digest_size=8).digest()
        sessions = self._seen.setdefault(stream_id, OrderedDict())
        if key in sessions:
            sessions.move_to_end(key)
        else:
            self._expire(sessions, now)
            if len(sessions) >= self.max_sessions:
                UNTRACKED.inc()
                self._capped.add(stream_id)
                return
        sessions[key] = now

    def count(self, stream_id: str, now: float | None = None) -> tuple[int, bool]:
        """(sessions seen within the window, whether some went untracked since the last count)."""
        sessions = self._seen.get(stream_id)
        capped = stream_id in self._capped
        self._capped.discard(stream_id)
        if sessions is None:
            return 0, capped
        self._expire(sessions, time.monotonic() if now is None else now)
        return len(sessions), capped

    def total(self) -> int:
        """Sessions tracked over every stream (as of the last counts)."""
        return sum(len(s) for s in self._seen.values())

    def forget(self, stream_id: str) -> None:
        self._seen.pop(stream_id, None)
        self._capped.discard(stream_id)

    def _expire(self, sessions: OrderedDict[bytes, float], now: float) -> None:
        while sessions and next(iter(sessions.values())) < now - self.window_s:
            sessions.popitem(last=False)
