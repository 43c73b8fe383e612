"""The leader's placements: the pool of live members, a placement at admission, moves off dead members, and the
record of each in the stream table (``StreamRecord.assignment``), which decoders, egresses and the gateway watch.

The rules are services/controller/placement.py's (pure); this module is the controller's state around them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import nats.errors
from prometheus_client import Counter, Gauge

from proto import Assignment, StreamRecord
from services.controller.placement import KINDS, Bin, Move, Pool, moves, owner, place
from services.controller.policy import StreamNeed, ring_capacity
from services.streams import StreamNotFound, StreamTable

log = logging.getLogger("rheo.controller")

MOVES = Counter("rheo_controller_stream_moves_total", "streams moved off a dead member, by the kind of member "
                "(ring, decoder, egress) and whether the new one had room", ["kind", "result"])
PLACED = Gauge("rheo_controller_placed_streams", "admitted streams with a placement, per kind of member assigned",
               ["kind"])
RECORD_WRITES = Counter("rheo_controller_assignment_writes_total", "assignments written into the stream table, by "
                        "outcome (written; no_record: the stream is not in the table; failed: NATS error)",
                        ["outcome"])


@dataclass(frozen=True)
class MemberView:
    """What placement needs to know of one member heard by the controller."""

    member_id: str
    role: str
    ring_id: str = ""
    address: str = ""
    decode_ms_per_mpx: float | None = None


class Assigner:
    """Assignments of the admitted streams (stream id → where it runs), kept by the leader and in its state."""

    def __init__(self, headroom: float) -> None:
        self.headroom = headroom
        self.assignments: dict[str, Assignment] = {}
        self.table: StreamTable | None = None

    def pool(self, members: Iterable[MemberView], item_ms: Mapping[str, float | None]) -> Pool:
        """Bins of the given (live) members: each ring with a block map (``item_ms``: ring → its slowest stage's
        measured ms per item, the figure admission uses) and a live stage, decoders by their measured VAE decode
        cost, egresses unbounded."""
        members = list(members)
        live = {m.ring_id for m in members if m.role == "dit-stage"}
        rings = [Bin(r, ring_capacity(ms, self.headroom)) for r, ms in item_ms.items() if r in live]
        decoders = [Bin(m.member_id, self.headroom * 1000.0 / m.decode_ms_per_mpx
                        if m.decode_ms_per_mpx else math.inf) for m in members if m.role == "decoder"]
        egresses = [Bin(m.member_id, address=m.address) for m in members if m.role == "egress"]
        return Pool(sorted(rings, key=_member), sorted(decoders, key=_member), sorted(egresses, key=_member))

    def place(self, stream_id: str, need: StreamNeed, pool: Pool, needs: dict[str, StreamNeed], *,
              force: bool = False) -> Assignment | str:
        return place(stream_id, need, pool, self.assignments, needs, force=force)

    def moves(self, needs: dict[str, StreamNeed], pool: Pool) -> list[Move]:
        out = moves({k: v for k, v in self.assignments.items() if k in needs}, needs, pool)
        for m in out:
            for kind in KINDS:
                if owner(m.old, kind) != owner(m.new, kind):
                    MOVES.labels(kind=kind, result="overcommitted" if kind in m.overcommitted else "fits").inc()
            log.warning("stream %s moves: %s → %s%s", m.stream_id, _short(m.old), _short(m.new),
                        f" (overcommitted: no live {', '.join(m.overcommitted)} had room)" if m.overcommitted else "")
        return out

    def set(self, stream_id: str, assignment: Assignment) -> None:
        self.assignments[stream_id] = assignment
        self._gauge()

    def release(self, stream_id: str) -> bool:
        gone = self.assignments.pop(stream_id, None) is not None
        self._gauge()
        return gone

    def _gauge(self) -> None:
        for kind in KINDS:
            PLACED.labels(kind=kind).set(sum(1 for a in self.assignments.values() if owner(a, kind)))

    async def record(self, stream_id: str, assignment: Assignment) -> None:
        """Write the assignment into the stream's record (compare-and-set); a stream not in the table is counted."""
        if self.table is None:
            return

        def change(record: StreamRecord) -> StreamRecord:
            return record.model_copy(update={"assignment": assignment})

        try:
            await self.table.update(stream_id, change)
            RECORD_WRITES.labels(outcome="written").inc()
        except StreamNotFound:
            RECORD_WRITES.labels(outcome="no_record").inc()
        except (nats.errors.Error, TimeoutError, RuntimeError) as e:
            RECORD_WRITES.labels(outcome="failed").inc()
            log.warning("stream %s: assignment not recorded: %s", stream_id, e)

    # -- state --------------------------------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        return {k: v.model_dump() for k, v in self.assignments.items()}

    def load(self, stored: object) -> None:
        if not isinstance(stored, dict):
            return
        for k, v in stored.items():
            try:
                self.assignments[str(k)] = Assignment.model_validate(v)
            except ValueError as e:
                log.warning("ignored unreadable assignment of %s: %s", k, e)
        self._gauge()


def _member(b: Bin) -> str:
    return b.member


def _short(a: Assignment) -> str:
    return f"ring {a.ring_id or '-'}, decoder {a.decoder or '-'}, egress {a.egress or '-'}"


__all__ = ["Assigner", "MemberView"]
