"""The controller service (v1: static even block map, membership, admission).

Subscribes: ``rheo.ctl.heartbeat.*`` (membership), ``rheo.ctl.admission`` (may a stream start?).
Publishes: the block map under an epoch, in the ``rheo-blockmap`` KV bucket (key ``current``) and on
``rheo.ctl.blockmap``. Its state lives in KV, so a restarted controller resumes the same map and epoch without
disturbing running stages.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

from prometheus_client import Gauge

from dit_stage.config import WanDiTConfig
from proto import CHANNELS, Ack, BlockMap, Buckets, Error, Heartbeat, StreamSpec, Subjects
from services.bus import KV
from services.controller.partition import even_split
from services.runtime import Service, main

log = logging.getLogger("rheo.controller")

MEMBERS = Gauge("rheo_controller_members", "members heard from within the miss budget", ["role"])
BLOCKMAP_KEY = "current"


@dataclass
class Member:
    member_id: str
    role: str
    ready: bool
    last_seen: float


class ControllerService(Service):
    role = "controller"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.members: dict[str, Member] = {}
        self.block_map: BlockMap | None = None
        self._kv: KV | None = None

    def num_blocks(self) -> int:
        return WanDiTConfig.named(self.settings.model.preset).num_layers

    def stage_ids(self) -> list[str]:
        return [f"dit-{i}" for i in range(self.settings.controller.stages)]

    async def start(self) -> None:
        assert self.bus is not None
        self._kv = await self.bus.kv(Buckets.BLOCKMAP, history=8)
        self.block_map = await self._ensure_block_map()
        self.epoch = self.block_map.epoch
        await self.bus.publish(Subjects.blockmap(), self.block_map)
        await self.bus.subscribe(CHANNELS["ctl_heartbeat"].wildcard(), self._on_heartbeat, expected=Heartbeat)
        await self.bus.subscribe(Subjects.admission(), self._on_admission, expected=StreamSpec)

    async def _ensure_block_map(self) -> BlockMap:
        """Keep the stored map when it still fits the configuration (a restart); else publish epoch + 1."""
        assert self._kv is not None
        current = await self._kv.get_message(BLOCKMAP_KEY, BlockMap)
        ids = self.stage_ids()
        if current is not None and current.num_blocks == self.num_blocks() and \
                [s.stage_id for s in current.stages] == ids:
            log.info("resuming block map epoch %d", current.epoch)
            return current
        new = BlockMap(epoch=(current.epoch + 1) if current else 1, num_blocks=self.num_blocks(),
                       stages=even_split(self.num_blocks(), ids), created_at=time.time())
        new.validate_cover()
        await self._kv.put(BLOCKMAP_KEY, new)
        log.info("block map epoch %d: %s", new.epoch,
                 ", ".join(f"{s.stage_id}=[{s.block_start},{s.block_end})" for s in new.stages))
        return new

    async def _on_heartbeat(self, hb: Heartbeat, _raw) -> None:
        self.members[hb.member_id] = Member(hb.member_id, hb.role, hb.ready, time.monotonic())
        budget = self.settings.controller.heartbeat_miss_s
        now = time.monotonic()
        for role in {m.role for m in self.members.values()}:
            MEMBERS.labels(role=role).set(sum(1 for m in self.members.values()
                                              if m.role == role and now - m.last_seen <= budget))

    def live_members(self, role: str | None = None) -> list[Member]:
        budget = self.settings.controller.heartbeat_miss_s
        now = time.monotonic()
        return [m for m in self.members.values()
                if now - m.last_seen <= budget and (role is None or m.role == role)]

    async def _on_admission(self, spec: StreamSpec, raw) -> None:
        assert self.bus is not None
        if spec.width % 16 or spec.height % 16:
            reply = Error(code="bad_size", message=f"{spec.width}x{spec.height} is not a multiple of 16",
                          stream_id=spec.stream_id)
        else:
            reply = Ack(ref=spec.stream_id, detail=f"epoch {self.epoch}")
        await self.bus.respond(raw, reply)


if __name__ == "__main__":
    sys.exit(main(ControllerService))
