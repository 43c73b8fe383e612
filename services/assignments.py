"""Which streams this decoder or egress serves: the controller's placements, watched in the stream table.

The controller records each admitted stream's ``Assignment`` in its ``StreamRecord`` before it answers the
admission, so the record is here before the stream's first chunk. A service serves a stream assigned to it, and
a stream with no assignment for its kind (no controller, or no member of that kind was heard when it was placed:
then every member serves it, as before placement). Messages of a stream assigned to another member are dropped
by the caller, counted with the reason ``unassigned``. When a stream moves here (its member died), its next
message simply opens it, as after a restart (docs/scheduling.md, Placement).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Literal

from proto import Buckets, ProtocolError, StreamRecord, decode
from services.bus import KV, Bus
from services.runtime import watch_keys

log = logging.getLogger("rheo.assignments")

Kind = Literal["decoder", "egress"]


class Assignments:
    """The owner of each stream for one kind of member, from a watch of ``rheo-streams`` records."""

    def __init__(self, kind: Kind, member_id: str,
                 on_record: Callable[[str, StreamRecord | None], None] | None = None) -> None:
        self.kind = kind
        self.member_id = member_id
        self.listener = on_record
        """Also told every record (None: deleted), so a service needing more of it has no watch of its own."""
        self.owner: dict[str, str] = {}
        """stream id → the member of ``kind`` assigned ("" or absent: none, every member serves it)."""
        self._task: asyncio.Task[None] | None = None

    def mine(self, stream_id: str) -> bool:
        return self.owner.get(stream_id, "") in ("", self.member_id)

    def owner_of(self, stream_id: str) -> str:
        return self.owner.get(stream_id, "")

    def known(self, serves: Callable[[str], bool]) -> Callable[[str], bool]:
        """The bus lanes' ``known`` (services/dispatch.py): the streams served here and every placed (admitted) one
        get their own lane, so another member's streams never crowd this one's newcomers out of the shared lane."""
        return lambda stream_id: serves(stream_id) or bool(self.owner.get(stream_id))

    def on_record(self, key: str, value: bytes | None) -> None:
        """One entry of the stream table (only ``s.<stream id>`` keys are records)."""
        if not key.startswith("s."):
            return
        stream_id = key[2:]
        if value is None:
            self.owner.pop(stream_id, None)
            if self.listener is not None:
                self.listener(stream_id, None)
            return
        try:
            record = decode(value, StreamRecord)
        except ProtocolError as e:
            log.warning("stream %s: unreadable record ignored: %s", stream_id, e)
            return
        if self.listener is not None:
            self.listener(stream_id, record)
        a = record.assignment
        member = "" if a is None else (a.decoder if self.kind == "decoder" else a.egress)
        if self.owner.get(stream_id, "") != member:
            log.info("stream %s: %s %s", stream_id, self.kind,
                     "assigned here" if member == self.member_id else f"assigned to {member or 'anyone'}")
        self.owner[stream_id] = member

    async def start(self, bus: Bus) -> None:
        """Read the table's records now (so a restart knows its streams before the first message) and watch them."""
        kv = await bus.kv(Buckets.STREAMS, history=1)
        for key in await kv.keys():
            if key.startswith("s."):
                entry = await kv.get(key)
                self.on_record(key, entry.value if entry is not None else None)

        async def open_kv() -> KV:
            return kv

        async def on_entry(key: str, value: bytes | None, _revision: int) -> None:
            self.on_record(key, value)

        self._task = asyncio.create_task(watch_keys(open_kv, "s.*", on_entry, what=f"{self.kind}: assignments"),
                                         name=f"{self.kind}-assignments")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


__all__ = ["Assignments"]
