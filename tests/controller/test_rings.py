"""Many rings in the controller (real NATS, an in-process controller, fake members' heartbeats): one block map per
ring under its own key, a ring discovered from a stage's heartbeat, streams spread over the rings, a ring drained
before a scale-down (its streams moved to the ring that stays), and a lost ring's streams moved to a live one
without touching the other ring's epoch."""

from __future__ import annotations

import contextlib

from proto import SLO, Ack, BlockMap, Buckets, StreamSpec, Subjects, blockmap_key
from proto.rings import resolve_ring, ring_of_stage, ring_stage_ids
from services.bus import Bus
from services.config import NatsSettings
from services.streams import StreamTable, new_stream_id

from .conftest import Controllers, Members, controller_settings


async def test_a_map_per_ring_spread_drain_and_a_lost_rings_streams_move(
        nats_settings: NatsSettings, bus: Bus, controllers: Controllers, members: Members, eventually) -> None:
    table = await StreamTable.open(bus)
    kv = await bus.kv(Buckets.BLOCKMAP, history=8)
    specs = [StreamSpec(stream_id=new_stream_id(), width=64, height=64, fps=16.0, steps=1, prompt="p",
                        slo=SLO(target_fps=16.0, max_latency_ms=60000)) for _ in range(6)]
    for spec in specs:
        await table.create(spec)

    async def ring_of(sid: str) -> str:
        a = (await table.get(sid)).assignment
        return a.ring_id if a is not None else ""

    async def admit(batch: list[StreamSpec]) -> None:
        for spec in batch:
            reply = await bus.request(Subjects.admission(), spec, timeout=10)
            assert isinstance(reply, Ack), reply

    try:
        members.beat("dit-0", ring_id="0")
        members.beat("dit-1", ring_id="1")
        members.beat("dec", "decoder")
        members.beat("egr", "egress", address="http://egr:8080")
        svc = await controllers.start(controller_settings(nats_settings, stages=1, rings=2, heartbeat_miss_s=0.4,
                                                          heartbeat_dead_s=0.8, admission_prior_streams=10))
        await eventually(lambda: svc.leader and {b.member for b in svc.placement_pool().rings} == {"0", "1"})
        maps = {r: await kv.get_message(blockmap_key(r), BlockMap) for r in ("0", "1")}
        assert {r: (bm.ring_id, [s.stage_id for s in bm.stages]) for r, bm in maps.items() if bm} == \
            {"0": ("0", ["dit-0"]), "1": ("1", ["dit-1"])}
        # a stage heartbeating a ring beyond controller.rings adds it, with a map of its own
        members.beat("dit-2", ring_id="2")
        await eventually(lambda: "2" in svc.rings and svc.rings["2"].block_map is not None)
        assert [s.stage_id for s in (await kv.get_message(blockmap_key("2"), BlockMap)).stages] == ["dit-2"]
        members.pause("dit-2")  # and leaves the pool once silent
        await eventually(lambda: {b.member for b in svc.placement_pool().rings} == {"0", "1"})

        await admit(specs[:4])  # unmeasured rings: spread by count
        assert sorted([await ring_of(s.stream_id) for s in specs[:4]]) == ["0", "0", "1", "1"]
        # the autoscaler bills each ring its own streams (none left over): not yet priced, so the pooled price
        assert [len(needs) for needs, _ in svc._placed_rings(None)] == [2, 2, 0]
        epochs = {r: svc.rings[r].block_map.epoch for r in ("0", "1")}

        # scale-down to one ring: ring 1 is drained first (its streams move to ring 0), then it may go
        assert not await svc._drain("rings", 1)
        assert [await ring_of(s.stream_id) for s in specs[:4]] == ["0"] * 4
        assert await svc._drain("rings", 1)
        assert sum(1 for d in svc.decisions if d["kind"] == "move" and d.get("why") == "drain") == 2

        # ring 1 serves again; its only stage dies: its streams move to ring 0, whose map stays as it was
        await admit(specs[4:])
        assert [await ring_of(s.stream_id) for s in specs[4:]] == ["1", "1"]
        members.pause("dit-1")
        await eventually(lambda: all(a.ring_id == "0" for a in svc.assigner.assignments.values()), timeout=15)
        assert [await ring_of(s.stream_id) for s in specs] == ["0"] * 6
        assert sum(1 for d in svc.decisions if d["kind"] == "move" and d.get("why") == "dead") == 2
        assert svc.rings["0"].block_map.epoch == epochs["0"]
    finally:
        for spec in specs:
            with contextlib.suppress(Exception):
                await table.delete(spec.stream_id)


def test_ring_names_are_one_rule() -> None:
    """Ring r's stages are dit-<r·stages> …: what the chart's StatefulSet ordinals and LocalStack name; a stage
    finds its ring from its ordinal (``auto``), and only plain numbers are rings."""
    assert ring_stage_ids("0", 2) == ["dit-0", "dit-1"] and ring_stage_ids("1", 2) == ["dit-2", "dit-3"]
    assert [ring_of_stage(f"dit-{k}", 2) for k in range(5)] == ["0", "0", "1", "1", "2"]
    assert ring_stage_ids("01", 2) == ring_stage_ids("x", 2) == []
    assert resolve_ring("auto", "dit-3", 2) == "1" and resolve_ring("7", "dit-3", 2) == "7"
    assert resolve_ring("auto", "stage-a", 2) == "0"  # not an ordinal name: the default ring
