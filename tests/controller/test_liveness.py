"""Suspected vs dead (issue #12 item 2): a stage silent past the miss budget is only suspected; it fails after the
dead budget, or at once when it is positively gone (its endpoint withdrawn, or written again by a new process)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from proto import Buckets
from services.bus import Bus
from services.config import NatsSettings

from .conftest import Controllers, Members, controller_settings, current_map, ranges

IDS = ["dit-0", "dit-1", "dit-2"]
EVEN = [("dit-0", 0, 4), ("dit-1", 4, 8), ("dit-2", 8, 12)]


async def test_a_silent_stage_is_suspected_first_and_failed_only_after_the_dead_budget(
        nats_settings: NatsSettings, bus: Bus, controllers: Controllers, members: Members, eventually) -> None:
    for s in IDS:
        members.beat(s)
    settings = controller_settings(nats_settings, mode="static", heartbeat_miss_s=0.5, heartbeat_dead_s=3.0)
    miss, dead = settings.controller.heartbeat_miss_s, settings.controller.heartbeat_dead_s
    svc = await controllers.start(settings)
    await eventually(lambda: svc.leader and svc.block_map is not None and set(svc.members) >= set(IDS))
    e0 = svc.block_map.epoch

    # paused for 2× the miss budget (the false failure under CPU load): suspected, then cleared, no epoch
    members.pause("dit-1")
    await eventually(lambda: "dit-1" in svc.suspected, timeout=10)
    await asyncio.sleep(2 * miss)
    members.beat("dit-1")
    await eventually(lambda: "dit-1" not in svc.suspected, timeout=10)
    assert svc.block_map.epoch == e0 and (await current_map(bus)).epoch == e0

    # silent past the dead budget: failed, never before it
    members.pause("dit-1")
    t0 = time.monotonic()
    await eventually(lambda: svc.block_map.epoch == e0 + 1, timeout=dead + 15)
    detected = time.monotonic() - t0
    assert detected >= dead - 0.2, detected  # heartbeats in flight at the pause count as alive: a little slack
    bm = await current_map(bus)
    assert bm.reason == "failure" and [s.stage_id for s in bm.stages] == ["dit-0", "dit-2"]
    assert not svc.suspected


async def test_a_restarted_or_withdrawn_stage_fails_at_once(nats_settings: NatsSettings, bus: Bus,
                                                            controllers: Controllers, members: Members,
                                                            eventually) -> None:
    endpoints = await bus.kv(Buckets.ENDPOINTS)
    for i, s in enumerate(IDS):
        await endpoints.put(s, f"127.0.0.1:{7500 + i}".encode())
        members.beat(s)
    # a dead budget longer than the test: only the endpoint can make these epochs
    settings = controller_settings(nats_settings, mode="static", heartbeat_miss_s=0.5, heartbeat_dead_s=60.0)
    svc = await controllers.start(settings)
    try:
        await eventually(lambda: svc.leader and svc.block_map is not None and set(svc.members) >= set(IDS)
                         and set(svc._endpoint_revs) >= set(IDS))
        e0 = svc.block_map.epoch
        assert ranges(await current_map(bus)) == EVEN
        # heard from for a while: a write now is a new process (a write right after the first heartbeats is the
        # first start's, which the watch may deliver after them)
        await asyncio.sleep(5 * settings.lifecycle.heartbeat_interval_s + 0.2)

        await endpoints.put("dit-2", b"127.0.0.1:7502")  # a new process of dit-2 (same port): its KV is gone
        await eventually(lambda: svc.block_map.epoch == e0 + 1, timeout=10)
        bm = await current_map(bus)
        assert bm.reason == "failure" and ranges(bm) == EVEN  # it keeps its place; the replay rebuilds its KV
        assert svc.decisions[-1]["restarted"] == ["dit-2"]

        # killed and back: the new process's first heartbeat is handled before the watch delivers its endpoint
        # write (a new run of heartbeats, after a silence past the miss budget): still a restart
        members.pause("dit-2")
        await eventually(lambda: "dit-2" in svc.suspected, timeout=10)
        members.beat("dit-2")
        await eventually(lambda: "dit-2" not in svc.suspected, timeout=10)
        await endpoints.put("dit-2", b"127.0.0.1:7502")
        await eventually(lambda: svc.block_map.epoch == e0 + 2, timeout=10)
        assert svc.decisions[-1]["restarted"] == ["dit-2"]

        members.paused.add("dit-1")  # drained: it stops beating and withdraws its endpoint
        await endpoints.delete("dit-1")
        await eventually(lambda: svc.block_map.epoch == e0 + 3, timeout=10)
        bm = await current_map(bus)
        assert bm.reason == "failure" and [s.stage_id for s in bm.stages] == ["dit-0", "dit-2"]
        await asyncio.sleep(0.5)
        assert svc.block_map.epoch == e0 + 3  # each event makes one epoch
    finally:
        for s in IDS:
            with contextlib.suppress(Exception):
                await endpoints.delete(s)
