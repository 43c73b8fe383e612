"""What the first stage looks up about a stream: the embedding of a prompt version it has not received live.

It comes from ingest's ``rheo-prompts`` bucket (``<stream>.<version>``), so a first stage that starts, restarts or
takes over mid-stream needs no replay of the live subjects. Everything else it needs (seed, fps, size) travels in
the chunks themselves (``proto.ChunkHeader``).
"""

from __future__ import annotations

import logging

import torch

from proto import Buckets, PromptUpdate
from services.bus import KV, Bus
from services.config import Settings

__all__ = ["StreamLookups"]

log = logging.getLogger("rheo.dit_stage")


class StreamLookups:
    def __init__(self, bus: Bus, settings: Settings) -> None:
        self.bus = bus
        self.settings = settings
        self._prompts: KV | None = None

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
