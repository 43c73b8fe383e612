"""Placement (services/controller/placement.py): best-fit bin-packing, capacity refusal, moves off dead members."""

from __future__ import annotations

import math
import random

from proto import Assignment
from services.controller.placement import KINDS, Bin, Pool, moves, need_of, place
from services.controller.policy import StreamNeed, ring_capacity, ring_item_ms

SMALL = StreamNeed(items_per_s=10.0, decode_mpx_per_s=1.0)
BIG = StreamNeed(items_per_s=40.0, decode_mpx_per_s=4.0)


def pool(rings: dict[str, float], decoders: dict[str, float], egresses: tuple[str, ...] = ("e0", "e1")) -> Pool:
    return Pool([Bin(r, c) for r, c in rings.items()], [Bin(d, c) for d, c in decoders.items()],
                [Bin(e, address=f"http://{e}:8080") for e in egresses])


def test_best_fit_packs_into_the_fullest_member_that_fits() -> None:
    p = pool({"r0": 100.0, "r1": 100.0}, {"d0": 10.0, "d1": 10.0})
    assignments: dict[str, Assignment] = {}
    needs: dict[str, StreamNeed] = {}
    for i in range(4):
        a = place(f"s{i}", SMALL, p, assignments, needs)
        assert isinstance(a, Assignment)
        assignments[f"s{i}"], needs[f"s{i}"] = a, SMALL
    # best fit: every small stream goes where the room left is least, so r0 / d0 fill first
    assert {a.ring_id for a in assignments.values()} == {"r0"}
    assert {a.decoder for a in assignments.values()} == {"d0"}
    # r0 has 60 of 100 left: the big one (40) still fits there, the next one does not
    a = place("big", BIG, p, assignments, needs)
    assert isinstance(a, Assignment) and a.ring_id == "r0"
    assignments["big"], needs["big"] = a, BIG
    b = place("big2", BIG, p, assignments, needs)
    assert isinstance(b, Assignment) and b.ring_id == "r1" and b.decoder == "d1"
    # unmeasured egresses spread by stream count, and the assignment carries the chosen egress's address
    assert b.egress_url == f"http://{b.egress}:8080"


def test_unmeasured_members_spread_and_come_after_measured_ones() -> None:
    p = Pool([Bin("r0"), Bin("r1")], [Bin("d0"), Bin("d1", 5.0)], [Bin("e0")])
    assignments: dict[str, Assignment] = {}
    needs: dict[str, StreamNeed] = {}
    for i in range(4):
        a = place(f"s{i}", SMALL, p, assignments, needs)
        assert isinstance(a, Assignment)
        assignments[f"s{i}"], needs[f"s{i}"] = a, SMALL
    assert sorted(a.ring_id for a in assignments.values()) == ["r0", "r0", "r1", "r1"]
    assert [a.decoder for a in assignments.values()] == ["d1"] * 4  # measured with room: packed first


def test_refused_with_a_reason_when_no_member_of_a_kind_has_room() -> None:
    p = pool({"r0": 30.0}, {"d0": 10.0})
    a = place("s0", SMALL, p, {}, {})
    assert isinstance(a, Assignment)
    why = place("s1", BIG, p, {"s0": a}, {"s0": SMALL})
    assert isinstance(why, str) and why.startswith("no ring has room") and "r0" in why and "items/s" in why
    why = place("s1", StreamNeed(1.0, 20.0), p, {"s0": a}, {"s0": SMALL})
    assert isinstance(why, str) and why.startswith("no decoder has room")
    # a re-publish of a placed stream keeps its assignment while its members live; else it is placed anew,
    # not counting against itself
    assert place("s0", SMALL, pool({"r0": 30.0, "r1": 30.0}, {"d0": 10.0, "d1": 10.0}), {"s0": a}, {"s0": SMALL}) is a
    again = place("s0", SMALL, pool({"r1": 10.0}, {"d0": 1.0}), {"s0": a}, {"s0": SMALL})
    assert isinstance(again, Assignment) and again.ring_id == "r1" and again.decoder == "d0"


def test_a_kind_with_no_live_member_is_left_unassigned_then_assigned_by_moves() -> None:
    a = place("s0", SMALL, Pool([Bin("r0")], [], []), {}, {})
    assert isinstance(a, Assignment) and (a.ring_id, a.decoder, a.egress) == ("r0", "", "")
    [m] = moves({"s0": a}, {"s0": SMALL}, pool({"r0": math.inf}, {"d0": 10.0}, ("e0",)))
    assert (m.new.ring_id, m.new.decoder, m.new.egress, m.new.version) == ("r0", "d0", "e0", 2)


def test_moves_take_the_dead_members_streams_only_and_keep_live_parts() -> None:
    before = pool({"r0": 100.0}, {"d0": 10.0, "d1": 10.0})
    assignments: dict[str, Assignment] = {}
    needs = {"a": SMALL, "b": SMALL, "c": BIG}
    assignments["a"] = Assignment(ring_id="r0", decoder="d0", egress="e0")
    assignments["b"] = Assignment(ring_id="r0", decoder="d1", egress="e1")
    assignments["c"] = Assignment(ring_id="r0", decoder="d0", egress="e1")
    assert moves(assignments, needs, before) == []
    after = pool({"r0": 100.0}, {"d1": 10.0})  # d0 died
    out = moves(assignments, needs, after)
    assert [m.stream_id for m in out] == ["c", "a"]  # largest need first
    for m in out:
        assert m.new.decoder == "d1" and m.new.ring_id == "r0" and m.new.egress == m.old.egress
        assert m.new.version == m.old.version + 1 and m.overcommitted == ()


def test_a_move_that_fits_nowhere_still_moves_overcommitted() -> None:
    assignments = {"a": Assignment(ring_id="r0", decoder="d0", egress="e0"),
                   "b": Assignment(ring_id="r0", decoder="d1", egress="e0")}
    needs = {"a": BIG, "b": BIG}
    [m] = moves(assignments, needs, pool({"r0": 100.0}, {"d1": 5.0}, ("e0",)))
    assert m.stream_id == "a" and m.new.decoder == "d1" and m.overcommitted == ("decoder",)
    # no live decoder at all: nothing to move to, the assignment stays
    assert moves(assignments, needs, Pool([Bin("r0")], [], [Bin("e0")])) == []


def test_random_placements_never_exceed_capacity() -> None:
    rng = random.Random(7)
    for _ in range(50):
        p = Pool([Bin(f"r{i}", rng.uniform(20, 120)) for i in range(rng.randint(1, 3))],
                 [Bin(f"d{i}", rng.uniform(2, 12)) for i in range(rng.randint(1, 3))], [Bin("e0")])
        assignments: dict[str, Assignment] = {}
        needs: dict[str, StreamNeed] = {}
        for s in range(12):
            need = StreamNeed(rng.uniform(5, 40), rng.uniform(0.5, 4))
            a = place(f"s{s}", need, p, assignments, needs)
            if isinstance(a, Assignment):
                assignments[f"s{s}"], needs[f"s{s}"] = a, need
        for kind in KINDS:
            for b in p.bins(kind):
                used = sum(need_of(kind, needs[s]) for s, a in assignments.items()
                           if {"ring": a.ring_id, "decoder": a.decoder, "egress": a.egress}[kind] == b.member)
                assert used <= b.capacity + 1e-6


def test_a_service_serves_its_assigned_and_unassigned_streams_only() -> None:
    """services/assignments.py: what a decoder or egress reads from the stream table's records."""
    from proto import SLO, StreamRecord, StreamSpec
    from services.assignments import Assignments

    def record(sid: str, assignment: Assignment | None) -> bytes:
        spec = StreamSpec(stream_id=sid, width=64, height=64, fps=16.0, steps=2, prompt="p", slo=SLO())
        return StreamRecord(spec=spec, key_hash="0" * 64, created_at=0.0, updated_at=0.0,
                            assignment=assignment).encode()

    mine = Assignments("decoder", "d0")
    mine.on_record("s.a", record("a", Assignment(ring_id="0", decoder="d0", egress="e1")))
    mine.on_record("s.b", record("b", Assignment(ring_id="0", decoder="d1", egress="e0")))
    mine.on_record("s.c", record("c", None))
    mine.on_record("k." + "0" * 64, b"a")  # a key entry, not a record
    assert (mine.mine("a"), mine.mine("b"), mine.mine("c"), mine.mine("never-heard")) == (True, False, True, True)
    known = mine.known(lambda sid: sid == "served")
    assert (known("a"), known("b"), known("c"), known("served")) == (True, True, False, True)
    mine.on_record("s.b", record("b", Assignment(ring_id="0", decoder="d0", egress="e0", version=2)))  # moved here
    assert mine.mine("b")
    mine.on_record("s.a", None)  # deleted
    assert mine.owner_of("a") == ""
    egress = Assignments("egress", "e0")
    egress.on_record("s.a", record("a", Assignment(ring_id="0", decoder="d0", egress="e1")))
    assert not egress.mine("a")


def test_forced_placement_takes_the_member_with_the_most_room() -> None:
    """Advisory mode admits every stream; each still gets exactly one owner of each kind."""
    p = pool({"r0": 10.0}, {"d0": 1.0, "d1": 2.0})
    a = place("s0", BIG, p, {}, {}, force=True)
    assert isinstance(a, Assignment) and (a.ring_id, a.decoder) == ("r0", "d1")
    assert isinstance(place("s0", BIG, p, {}, {}), str)


def test_a_stream_joins_the_ring_its_price_rises_least_on():
    """A ring's capacity depends on its streams: a 500 ms, 4-step stream bounds its ring's batch (each of its
    traversals must fit 62.5 ms), a 2 s, 1-step stream does not (ten of them batch 10). A newcomer goes where it
    raises the utilisation least: tight with tight, loose with loose. Plain best fit (capacity only) sends the
    tight one onto the loose ring, whose capacity it cuts the most, and the loose one onto the tight ring."""
    fits = [[(40.0, 5.0, 100)]]  # a + b·n ms per micro-step, one grid: a tight stream bounds the batch at 4
    tight = StreamNeed(items_per_s=16.0, steps=4, slo_ms=500.0)
    loose = StreamNeed(items_per_s=4.0, steps=1, slo_ms=2000.0)
    on = {"rt": [tight, tight], "rl": [loose] * 10}
    assignments = {f"{r}-{i}": Assignment(ring_id=r, decoder="", egress="")
                   for r, ns in on.items() for i in range(len(ns))}
    needs = {f"{r}-{i}": n for r, ns in on.items() for i, n in enumerate(ns)}

    def ring_pool(newcomer: StreamNeed, *, marginal: bool) -> Pool:
        def capacity(streams: list[StreamNeed]) -> float:
            return ring_capacity(ring_item_ms(fits, streams, 16), 0.9)
        return Pool([Bin(r, capacity([*ns, newcomer]), capacity(ns) if marginal else None) for r, ns in on.items()])

    for newcomer, home, other in ((tight, "rt", "rl"), (loose, "rl", "rt")):
        a = place("new", newcomer, ring_pool(newcomer, marginal=True), assignments, needs)
        assert isinstance(a, Assignment) and a.ring_id == home
        b = place("new", newcomer, ring_pool(newcomer, marginal=False), assignments, needs)  # negative control
        assert isinstance(b, Assignment) and b.ring_id == other
