"""The stream table: every stream's record in JetStream KV, shared by the gateway (writes) and ingest (key checks).

Keys of the bucket ``rheo-streams``: ``s.<stream id>`` → ``StreamRecord``; ``k.<sha256 of stream key>`` → stream
id; ``t.<token id>`` → ``ApiToken`` (a per-stream API token, stored hashed like the keys). Stream keys and
tokens are 192-bit random tokens, so a plain sha256 is enough to make a leaked table useless; the key itself is
shown once, at creation or rotation (``rotate_key``), and never stored. Updates are compare-and-set on the record's
revision, so two writers never lose each other's change.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

import nats.js.errors

from proto import ACTIVE_STATES, ApiToken, Buckets, StreamRecord, StreamSpec, decode
from proto.subjects import token
from services.bus import KV, Bus

INGEST_SILENT_CHECKPOINTS = 3
"""A live session whose ingest missed this many checkpoints (``ingest.status_interval_s`` each) is not live."""
INGEST_GONE_S = 60.0
"""… and after this long without one, its ingest is gone and the publisher has not come back."""


def ingest_silent(record: StreamRecord, interval_s: float, now: float) -> float | None:
    """Seconds since the ingest serving the record's session last wrote its checkpoint, when that is longer than
    it ever should be (it died: nobody else would ever say so); None while it writes, or when no session runs."""
    status = record.ingest
    if record.state not in ACTIVE_STATES or status is None or status.at <= 0:
        return None
    silent = now - status.at
    return silent if silent > INGEST_SILENT_CHECKPOINTS * interval_s + 2.0 else None


def session_state(record: StreamRecord, interval_s: float, now: float) -> tuple[str, str]:
    """The state the API shows: the record's, unless the ingest serving the session is silent. The session
    continues when the publisher reconnects (a T2V stream: when an ingest takes it over)."""
    silent = ingest_silent(record, interval_s, now)
    if silent is None:
        return record.state, record.state_reason
    member = record.ingest.member if record.ingest is not None else "?"
    if silent > INGEST_GONE_S:
        return "failed", (f"no word from ingest {member} for {silent:.0f} s: it is gone and the stream has not been "
                          "taken up again (a publisher reconnecting resumes it)")
    return "recovering", (f"no word from ingest {member} for {silent:.0f} s (lost?): the stream continues when "
                          "its publisher reconnects")


class StreamNotFound(KeyError):
    """No stream with that id."""


def hash_key(stream_key: str) -> str:
    return hashlib.sha256(stream_key.encode()).hexdigest()


def new_stream_id() -> str:
    return "st-" + secrets.token_hex(6)


def new_stream_key() -> str:
    return secrets.token_urlsafe(24)


STREAM_TOKEN_PREFIX = "rst_"
"""Per-stream API tokens read ``rst_<token id>.<secret>``: the id finds the stored hash, the secret is checked."""


class StreamTable:
    """CRUD over the ``rheo-streams`` KV bucket."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, bus: Bus) -> StreamTable:
        return cls(await bus.kv(Buckets.STREAMS, history=1))

    @staticmethod
    def _record_key(stream_id: str) -> str:
        return "s." + token(stream_id, "stream id")

    @staticmethod
    def _key_key(key_hash: str) -> str:
        return "k." + key_hash

    async def create(self, spec: StreamSpec) -> tuple[StreamRecord, str]:
        """Store a new stream; returns its record and its stream key (the only time the key is seen)."""
        key = new_stream_key()
        now = time.time()
        record = StreamRecord(spec=spec, key_hash=hash_key(key), created_at=now, updated_at=now)
        await self.kv.create(self._record_key(spec.stream_id), record)
        await self.kv.put(self._key_key(record.key_hash), spec.stream_id.encode())
        return record, key

    async def restore(self, record: StreamRecord) -> None:
        """Write a record (and its key's entry) back after the table was lost with a NATS store."""
        await self.kv.put(self._record_key(record.spec.stream_id), record)
        await self.kv.put(self._key_key(record.key_hash), record.spec.stream_id.encode())

    async def get(self, stream_id: str) -> StreamRecord:
        record = await self.kv.get_message(self._record_key(stream_id), StreamRecord)
        if record is None:
            raise StreamNotFound(stream_id)
        return record

    async def list(self) -> list[StreamRecord]:
        out = []
        for k in sorted(await self.kv.keys()):
            if k.startswith("s."):
                record = await self.kv.get_message(k, StreamRecord)
                if record is not None:
                    out.append(record)
        return out

    async def update(self, stream_id: str, change: Callable[[StreamRecord], StreamRecord],
                     attempts: int = 8) -> StreamRecord:
        """Apply ``change`` to the current record with compare-and-set, retrying on a concurrent write."""
        key = self._record_key(stream_id)
        for _ in range(attempts):
            entry = await self.kv.get(key)
            if entry is None or entry.value is None:
                raise StreamNotFound(stream_id)
            current = decode(entry.value, StreamRecord, self.kv.limits)
            new = change(current).model_copy(update={"updated_at": time.time()})
            try:
                await self.kv.update(key, new, last=entry.revision)
                return new
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        raise RuntimeError(f"stream {stream_id}: too many concurrent updates")

    async def delete(self, stream_id: str) -> StreamRecord:
        record = await self.get(stream_id)
        for t in await self.tokens(stream_id):  # a deleted stream's tokens open nothing, not even a successor
            await self.kv.delete(self._token_key(t.token_id))
        await self.kv.delete(self._key_key(record.key_hash))
        await self.kv.delete(self._record_key(stream_id))
        return record

    async def rotate_key(self, stream_id: str) -> tuple[StreamRecord, str]:
        """A new stream key for the stream (the old one stops opening it); returns the record and the key, seen
        only now. The new index entry is written first (it opens nothing until the record carries its hash), the
        record's hash is then swapped by compare-and-set (from then on ``lookup_key`` refuses the old key, whose
        entry still names the stream, and accepts the new one), and the replaced entry is deleted last."""
        await self.get(stream_id)  # an unknown (or malformed) id leaves no index entry behind
        key = new_stream_key()
        digest = hash_key(key)
        replaced: list[str] = []

        def swap(r: StreamRecord) -> StreamRecord:
            replaced[:] = [r.key_hash]
            return r.model_copy(update={"key_hash": digest})

        await self.kv.put(self._key_key(digest), stream_id.encode())
        try:
            record = await self.update(stream_id, swap)
        except StreamNotFound:
            await self.kv.delete(self._key_key(digest))
            raise
        await self.kv.delete(self._key_key(replaced[0]))
        return record, key

    async def lookup_key(self, stream_key: str) -> StreamRecord | None:
        """The stream a presented key opens, or None (what the ingest authoriser asks)."""
        digest = hash_key(stream_key)
        entry = await self.kv.get(self._key_key(digest))
        if entry is None or entry.value is None:
            return None
        try:
            record = await self.get(entry.value.decode())
        except StreamNotFound:
            return None
        return record if hmac.compare_digest(record.key_hash, digest) else None

    # -- per-stream API tokens ----------------------------------------------------------------------------------

    @staticmethod
    def _token_key(token_id: str) -> str:
        return "t." + token(token_id, "token id")

    async def create_token(self, stream_id: str, label: str = "") -> tuple[ApiToken, str]:
        """Mint a token that may read and PATCH ``stream_id``; returns it and the secret (the only time seen)."""
        await self.get(stream_id)
        token_id = secrets.token_hex(8)
        presented = f"{STREAM_TOKEN_PREFIX}{token_id}.{secrets.token_urlsafe(24)}"
        entry = ApiToken(token_id=token_id, stream_id=stream_id, secret_hash=hash_key(presented), label=label,
                         created_at=time.time())
        await self.kv.create(self._token_key(token_id), entry)
        return entry, presented

    async def tokens(self, stream_id: str) -> list[ApiToken]:
        out = []
        for k in sorted(await self.kv.keys()):
            if k.startswith("t."):
                entry = await self.kv.get_message(k, ApiToken)
                if entry is not None and entry.stream_id == stream_id:
                    out.append(entry)
        return out

    async def revoke_token(self, stream_id: str, token_id: str) -> bool:
        """Delete one of the stream's tokens; False when it has none with that id."""
        try:
            entry = await self.kv.get_message(self._token_key(token_id), ApiToken)
        except ValueError:
            return False
        if entry is None or entry.stream_id != stream_id:
            return False
        await self.kv.delete(self._token_key(token_id))
        return True

    async def lookup_token(self, presented: str) -> ApiToken | None:
        """The per-stream token a bearer credential is, or None."""
        if not presented.startswith(STREAM_TOKEN_PREFIX) or "." not in presented:
            return None
        token_id = presented[len(STREAM_TOKEN_PREFIX):].split(".", 1)[0]
        try:
            entry = await self.kv.get_message(self._token_key(token_id), ApiToken)
        except ValueError:
            return None
        if entry is None or not hmac.compare_digest(entry.secret_hash, hash_key(presented)):
            return None
        return entry
