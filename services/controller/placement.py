"""Placing streams on a ring, a decoder and an egress, and moving them off dead members (pure: no I/O).

Each kind of member is a bin with a capacity in the unit of its bottleneck (``UNITS``), measured by the controller:
a ring in DiT items per second, a decoder in megapixel-frames per second of VAE decode (both at the admission
headroom), an egress in streams (it only packages; unmeasured = unbounded). A stream's need per kind is its
``StreamNeed`` (services/controller/policy.py). ``place`` is best-fit bin-packing: of the bins the stream fits in,
the one left with the least room, so whole members stay free (for another stream's large need, or to scale in). A
ring's capacity depends on its streams (the batch they reach, the latency the tightest allows), so among rings the
stream goes where it raises the utilisation least: tight streams join tight ones, a grid joins its own, and loose
streams batch large together (best fit breaks ties). Unmeasured bins come after measured ones and among themselves
the one with the fewest streams (spread until measured). ``moves`` re-places the streams of members that are gone,
largest needs first (first-fit decreasing); a stream that fits nowhere still moves to the live member with the most
room (overcommitted: degraded beats lost). docs/scheduling.md (Placement) states the rules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from proto import Assignment
from services.controller.policy import StreamNeed

__all__ = ["KINDS", "UNITS", "Bin", "Move", "Pool", "moves", "need_of", "owner", "place"]

Kind = Literal["ring", "decoder", "egress"]
KINDS: tuple[Kind, ...] = ("ring", "decoder", "egress")
UNITS: dict[Kind, str] = {"ring": "items/s", "decoder": "megapixel-frames/s", "egress": "streams"}


@dataclass(frozen=True)
class Bin:
    """One member a stream can be placed on: a ring id or a decoder's/egress's member id, and what it sustains."""

    member: str
    capacity: float = math.inf
    """In ``UNITS[kind]``, already scaled by the headroom; ``inf``: not measured yet. A ring's with the stream being
    placed on it (its price falls or rises with the batch its streams reach)."""
    capacity_now: float | None = None
    """A ring's capacity at the streams on it now, without the one being placed (None: the same as ``capacity``);
    placement then takes the ring whose utilisation the stream raises least."""
    address: str = ""
    """An egress's HLS base URL (the gateway proxies playback there)."""


@dataclass(frozen=True)
class Pool:
    """The live members of each kind (a member silent past the controller's budget is not in it)."""

    rings: Sequence[Bin] = ()
    decoders: Sequence[Bin] = ()
    egresses: Sequence[Bin] = ()

    def bins(self, kind: Kind) -> Sequence[Bin]:
        return {"ring": self.rings, "decoder": self.decoders, "egress": self.egresses}[kind]


@dataclass(frozen=True)
class Move:
    """Stream ``stream_id`` leaves ``old`` for ``new``; ``overcommitted``: no live member had room for it."""

    stream_id: str
    old: Assignment
    new: Assignment
    overcommitted: tuple[Kind, ...] = ()


def need_of(kind: Kind, need: StreamNeed) -> float:
    """What a stream asks of a member of ``kind``, in ``UNITS[kind]``."""
    if kind == "ring":
        return need.items_per_s
    if kind == "decoder":
        return need.decode_mpx_per_s
    return 1.0


def owner(assignment: Assignment, kind: Kind) -> str:
    """The member of ``kind`` the assignment names ("": none assigned)."""
    return {"ring": assignment.ring_id, "decoder": assignment.decoder, "egress": assignment.egress}[kind]


def _loads(kind: Kind, assignments: Mapping[str, Assignment], needs: Mapping[str, StreamNeed],
           skip: str = "") -> tuple[dict[str, float], dict[str, int]]:
    load: dict[str, float] = {}
    count: dict[str, int] = {}
    for sid, a in assignments.items():
        if sid == skip or sid not in needs:
            continue
        m = owner(a, kind)
        load[m] = load.get(m, 0.0) + need_of(kind, needs[sid])
        count[m] = count.get(m, 0) + 1
    return load, count


def _choose(kind: Kind, bins: Sequence[Bin], load: Mapping[str, float], count: Mapping[str, int], need: float,
            *, force: bool = False) -> Bin | None:
    """Best fit among the bins ``need`` fits in (None: none); ``force``: else the one with the most room."""
    def room(b: Bin) -> float:
        return b.capacity - load.get(b.member, 0.0)

    def grows(b: Bin) -> float:
        """How much the stream raises the bin's utilisation (0 where its capacity does not depend on it)."""
        if b.capacity_now is None or math.isinf(b.capacity):
            return 0.0
        now = load.get(b.member, 0.0)
        return round((now + need) / b.capacity - now / b.capacity_now, 6)

    fits = [b for b in bins if need <= room(b) + 1e-9]
    if fits:
        return min(fits, key=lambda b: (math.isinf(b.capacity), grows(b), room(b) - need, count.get(b.member, 0),
                                        b.member))
    if force and bins:
        return max(bins, key=lambda b: (room(b) / max(b.capacity, 1e-9), -count.get(b.member, 0), b.member))
    return None


def place(stream_id: str, need: StreamNeed, pool: Pool, assignments: Mapping[str, Assignment],
          needs: Mapping[str, StreamNeed], *, force: bool = False) -> Assignment | str:
    """An assignment for ``stream_id``, or why there is none. A stream placed before (a re-publish, or asked again
    at start after the API's creation) keeps its assignment while every member of it is live; else it is placed
    anew, its own earlier need not counted.

    A kind with no live member at all is left unassigned (``""``: every member of it serves the stream, as
    without placement); the controller assigns it when one appears (``moves``). ``force`` (advisory mode, which
    admits everything): where no member has room, the one with the most (each stream still has one owner)."""
    earlier = assignments.get(stream_id)
    if earlier is not None and all(owner(earlier, k) in {b.member for b in pool.bins(k)} or not pool.bins(k)
                                   for k in KINDS):
        return earlier
    chosen: dict[Kind, Bin | None] = {}
    for kind in KINDS:
        bins = pool.bins(kind)
        if not bins:
            chosen[kind] = None
            continue
        load, count = _loads(kind, assignments, needs, skip=stream_id)
        n = need_of(kind, need)
        b = _choose(kind, bins, load, count, n, force=force)
        if b is None:
            most = max(bins, key=lambda x: x.capacity - load.get(x.member, 0.0))
            return (f"no {kind} has room: the stream needs {n:.2f} {UNITS[kind]}, the most any of the "
                    f"{len(bins)} live has left is {max(most.capacity - load.get(most.member, 0.0), 0.0):.2f} "
                    f"({kind} {most.member})")
        chosen[kind] = b
    return _assignment(chosen, 1)


def _assignment(chosen: Mapping[Kind, Bin | None], version: int) -> Assignment:
    def member(kind: Kind) -> str:
        b = chosen.get(kind)
        return b.member if b is not None else ""

    egress = chosen.get("egress")
    return Assignment(ring_id=member("ring"), decoder=member("decoder"), egress=member("egress"),
                      egress_url=egress.address if egress is not None else "", version=version)


def moves(assignments: Mapping[str, Assignment], needs: Mapping[str, StreamNeed], pool: Pool) -> list[Move]:
    """New assignments for the streams whose ring, decoder or egress is not live (or was never assigned while one
    is), largest needs first; the parts that are live stay. A kind with no live member keeps its assignment (nothing
    could serve it anyway; its member may come back)."""
    live = {kind: {b.member: b for b in pool.bins(kind)} for kind in KINDS}
    current = dict(assignments)
    out: list[Move] = []

    def size(sid: str) -> tuple[float, float, str]:
        n = needs.get(sid, StreamNeed(0.0))
        return (-n.items_per_s, -n.decode_mpx_per_s, sid)

    for sid in sorted(current, key=size):
        a = current[sid]
        gone = [k for k in KINDS if live[k] and owner(a, k) not in live[k]]
        if not gone:
            continue
        need = needs.get(sid, StreamNeed(0.0))
        chosen: dict[Kind, Bin | None] = {}
        over: list[Kind] = []
        for kind in KINDS:
            if kind not in gone:
                m = owner(a, kind)
                chosen[kind] = live[kind].get(m) or (Bin(m, address=a.egress_url) if m else None)
                continue
            others = {k: v for k, v in current.items() if k != sid}
            load, count = _loads(kind, others, needs)
            b = _choose(kind, pool.bins(kind), load, count, need_of(kind, need))
            if b is None:
                b = _choose(kind, pool.bins(kind), load, count, need_of(kind, need), force=True)
                over.append(kind)
            chosen[kind] = b
        new = _assignment(chosen, a.version + 1)
        current[sid] = new
        out.append(Move(sid, a, new, tuple(over)))
    return out
