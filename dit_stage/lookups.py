"""What the first stage looks up about a stream it has not seen: its seed and the embedding of a prompt version.

Both come from buckets other services write (the stream table; ingest's ``rheo-prompts``, ``<stream>.<version>``),
so a first stage that starts, restarts or takes over mid-stream needs no replay of the live subjects.
"""

from __future__ import annotations

import logging

import torch

from proto import Buckets, PromptUpdate, ProtocolError
from services.bus import KV, Bus
from services.config import Settings

__all__ = ["StreamLookups"]

log = logging.getLogger("rheo.dit_stage")


class StreamLookups:
    def __init__(self, bus: Bus, settings: Settings) -> None:
        self.bus = bus
        self.settings = settings
        self._prompts: KV | None = None
        self._seeds: dict[str, int] = {}

    async def seed(self, stream_id: str, refresh: bool = False) -> int:
        """The stream's seed (every random draw derives from it): looked up once per stream, again on ``refresh``
        (a stream's first chunk: the stream may be new under an old id)."""
        if refresh or stream_id not in self._seeds:
            self._seeds[stream_id] = await self._lookup_seed(stream_id)
        return self._seeds[stream_id]

    def forget(self, stream_id: str) -> None:
        self._seeds.pop(stream_id, None)

    async def _lookup_seed(self, stream_id: str) -> int:
        from services.streams import StreamNotFound, StreamTable

        try:
            table = await StreamTable.open(self.bus)
            return (await table.get(stream_id)).spec.seed
        except (StreamNotFound, ProtocolError) as e:
            log.warning("stream %s: no usable stream record (%s); using the default seed %d", stream_id, e,
                        self.settings.stream.seed)
            return self.settings.stream.seed

    async def prompt(self, stream_id: str, version: int) -> torch.Tensor | None:
        """A prompt version's embedding, or None when the bucket lacks it too (the chunk then waits in its queue
        for the live update, or its deadline)."""
        try:
            if self._prompts is None:
                self._prompts = await self.bus.kv(Buckets.PROMPTS, replicas=self.settings.nats.kv_replicas)
            update = await self._prompts.get_message(f"{stream_id}.{version}", PromptUpdate)
        except Exception as e:
            log.warning("stream %s: prompt v%d not in %s: %s", stream_id, version, Buckets.PROMPTS, e)
            return None
        return update.embedding if update is not None else None
