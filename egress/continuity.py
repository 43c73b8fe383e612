"""Per-stream playlist continuity in JetStream KV (``Buckets.EGRESS``, key = stream id, value ``HlsState``).

An egress that restarts (or a successor replica) reads a stream's state when the stream's video arrives again, so
its playlist goes on: media sequence and discontinuity sequence numbers continue, timestamps too (docs/media.md
"Continuity across restarts"). Writes happen once per closed segment; a slow store never blocks packaging: at most
one write per stream is in flight and only the newest state waits behind it.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter

from proto import Buckets, HlsState, ProtocolError
from services.bus import KV, Bus

log = logging.getLogger("rheo.egress")

WRITES = Counter("rheo_egress_state_writes_total", "HlsState KV operations by outcome", ["op", "result"])

STATE_TTL_S = 24 * 3600.0  # a key no egress wrote for a day belongs to a stream gone for good
LOAD_TIMEOUT_S = 2.0  # a stream's first video waits this long at most (the video subscription is shared)


class ContinuityStore:
    """Load, save (coalesced, in the background) and delete streams' ``HlsState``."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self._pending: dict[str, HlsState | None] = {}  # the newest state to write (None: delete)
        self._writers: dict[str, asyncio.Task[None]] = {}

    @classmethod
    async def open(cls, bus: Bus, replicas: int = 1) -> ContinuityStore:
        return cls(await bus.kv(Buckets.EGRESS, ttl=STATE_TTL_S, replicas=replicas))

    async def load(self, stream_id: str) -> HlsState | None:
        """The state a previous life of this stream left (None: none, or unreadable — then it starts afresh)."""
        if stream_id in self._pending:  # not written yet: the newest is here
            return self._pending[stream_id]
        try:
            state = await asyncio.wait_for(self.kv.get_message(stream_id, HlsState), LOAD_TIMEOUT_S)
        except ProtocolError as e:
            WRITES.labels(op="load", result="malformed").inc()
            log.warning("stream %s: unreadable state in %s, its playlist starts afresh: %s", stream_id,
                        Buckets.EGRESS, e)
            return None
        except Exception as e:
            WRITES.labels(op="load", result="error").inc()
            log.warning("stream %s: %s unreachable, its playlist starts afresh: %s", stream_id, Buckets.EGRESS, e)
            return None
        if state is not None and state.stream_id != stream_id:
            WRITES.labels(op="load", result="malformed").inc()
            log.warning("stream %s: state in %s names stream %s; ignored", stream_id, Buckets.EGRESS, state.stream_id)
            return None
        return state

    def save(self, state: HlsState) -> None:
        self._queue(state.stream_id, state)

    def delete(self, stream_id: str) -> None:
        self._queue(stream_id, None)

    def _queue(self, stream_id: str, state: HlsState | None) -> None:
        self._pending[stream_id] = state
        if stream_id not in self._writers:
            self._writers[stream_id] = asyncio.create_task(self._write(stream_id), name=f"hls-state-{stream_id}")

    async def _write(self, stream_id: str) -> None:
        try:
            while stream_id in self._pending:
                state = self._pending.pop(stream_id)
                op = "delete" if state is None else "put"
                try:
                    if state is None:
                        await self.kv.delete(stream_id)
                    else:
                        await self.kv.put(stream_id, state)
                    WRITES.labels(op=op, result="ok").inc()
                except Exception as e:  # the next segment writes again; a restart before then resumes older state
                    WRITES.labels(op=op, result="error").inc()
                    log.warning("stream %s: %s %s failed: %s", stream_id, Buckets.EGRESS, op, e)
        finally:
            del self._writers[stream_id]

    async def flush(self, timeout: float = 2.0) -> None:
        """Wait for the writes in flight (service drain)."""
        writers = list(self._writers.values())
        if writers:
            await asyncio.wait(writers, timeout=timeout)
