"""Who is calling the API: an operator (everything) or a per-stream token (read and PATCH one stream).

Operator tokens come from ``gateway.api_tokens`` and from ``gateway.api_tokens_file`` (a JSON list or one token
per line), whose content is re-read when its modification time or size changes: a mounted Kubernetes Secret
rotates them without a restart. Per-stream tokens (``rst_…``) are minted by the API and stored hashed in the
stream table (``StreamTable.create_token``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from services.streams import STREAM_TOKEN_PREFIX, StreamTable

log = logging.getLogger("rheo.gateway.auth")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``stream_id`` is None for an operator; ``key`` names it for rate limits (a hash,
    never the token)."""

    key: str
    stream_id: str | None = None

    @property
    def operator(self) -> bool:
        return self.stream_id is None

    def may_use(self, stream_id: str) -> bool:
        return self.operator or self.stream_id == stream_id


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def parse_tokens_file(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        return [str(t) for t in json.loads(text) if str(t)]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


class OperatorTokens:
    """The operator tokens of config plus those of the tokens file, as of its last change."""

    def __init__(self, configured: list[SecretStr], path: Path | None) -> None:
        self.configured = [t.get_secret_value() for t in configured]
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._from_file: list[str] = []
        self.reload()

    def reload(self) -> None:
        """Re-read the file if it changed (cheap when it did not: one stat)."""
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
        except OSError as e:
            if self._stamp is not None:
                log.warning("operator tokens file %s unreadable (%s): keeping its last tokens", self.path, e)
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            tokens = parse_tokens_file(self.path.read_text())
        except (OSError, ValueError) as e:
            log.warning("operator tokens file %s unreadable (%s): keeping its last tokens", self.path, e)
            return
        self._stamp, self._from_file = stamp, tokens
        log.info("operator tokens file %s read: %d token(s)", self.path, len(tokens))

    def any(self) -> bool:
        return bool(self.configured or self._from_file)

    def match(self, presented: str) -> bool:
        self.reload()
        return any(hmac.compare_digest(presented.encode(), t.encode()) for t in [*self.configured, *self._from_file])


async def authenticate(presented: str, operators: OperatorTokens, table: StreamTable) -> Principal | None:
    """The principal a bearer token is, or None."""
    if not presented:
        return None
    if presented.startswith(STREAM_TOKEN_PREFIX):
        entry = await table.lookup_token(presented)
        return Principal(key="stream:" + entry.token_id, stream_id=entry.stream_id) if entry is not None else None
    return Principal(key="operator:" + _digest(presented)) if operators.match(presented) else None
