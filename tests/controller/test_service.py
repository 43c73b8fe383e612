"""The controller over a real nats-server: failure and join epochs, restart, leader takeover, rebalancing on real
StageStats with hysteresis and cool-down, advisory mode."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time

from proto import Ack, Buckets, StreamSpec, Subjects, blockmap_key
from services.bus import Bus
from services.config import NatsSettings

from .conftest import Controllers, Members, controller_process, controller_settings, current_map, ranges, stats_for

IDS = ["dit-0", "dit-1", "dit-2"]
EVEN = [("dit-0", 0, 4), ("dit-1", 4, 8), ("dit-2", 8, 12)]


async def test_failure_join_and_restart_epochs(nats_settings: NatsSettings, bus: Bus, controllers: Controllers,
                                               members: Members, eventually) -> None:
    for s in IDS:
        members.beat(s)
    settings = controller_settings(nats_settings, mode="static")
    svc = await controllers.start(settings)
    await eventually(lambda: svc.block_map is not None)
    bm = await current_map(bus)
    assert ranges(bm) == EVEN and bm.reason == "initial"
    e0 = bm.epoch

    await eventually(lambda: set(svc.members) >= set(IDS))  # heard once (never heard: startup_grace_s applies)
    members.pause("dit-1")  # dit-1 stops heartbeating: suspected after heartbeat_miss_s, dead after heartbeat_dead_s
    t0 = time.monotonic()
    await eventually(lambda: svc.block_map.epoch == e0 + 1, timeout=15)
    detected = time.monotonic() - t0
    bm = await current_map(bus)
    assert bm.reason == "failure" and ranges(bm) == [("dit-0", 0, 6), ("dit-2", 6, 12)]
    assert detected <= settings.controller.heartbeat_dead_s + 2.0, detected  # ~ dead budget + 1 s (loaded CI)

    await controllers.stop(svc)  # a restarted controller resumes the failure epoch: nothing changed
    rev = (await (await bus.kv(Buckets.BLOCKMAP, history=8)).get(blockmap_key("0"))).revision
    svc = await controllers.start(settings)
    await eventually(lambda: svc.block_map is not None)
    await asyncio.sleep(0.5)
    assert svc.block_map.epoch == e0 + 1
    assert (await (await bus.kv(Buckets.BLOCKMAP, history=8)).get(blockmap_key("0"))).revision == rev

    members.beat("dit-1")  # it comes back: a join epoch includes it again, in configured order
    await eventually(lambda: svc.block_map.epoch == e0 + 2, timeout=15)
    bm = await current_map(bus)
    assert bm.reason == "join" and ranges(bm) == EVEN
    assert [d["kind"] for d in svc.decisions] == ["join"]


async def test_leader_takeover_after_kill_and_after_stop(nats_settings: NatsSettings, bus: Bus,
                                                         controllers: Controllers, eventually) -> None:
    settings = controller_settings(nats_settings)
    ttl = settings.controller.lease_ttl_s
    lock_kv = await bus.kv(Buckets.CONTROLLER)

    async def holder() -> str:
        e = await lock_kv.get("leader")
        return json.loads(e.value)["holder"] if e is not None and e.value else ""

    proc = controller_process(nats_settings, RHEO_CONTROLLER__STAGES="3", RHEO_CONTROLLER__NUM_BLOCKS="12",
                              RHEO_CONTROLLER__LEASE_TTL_S=str(ttl))
    try:
        deadline = time.monotonic() + 60
        while not (await holder()).endswith(f"-{proc.pid}"):
            assert proc.poll() is None and time.monotonic() < deadline, "the controller process never led"
            await asyncio.sleep(0.1)
        while (first := await current_map(bus)) is None:  # the leader writes its map just after taking the lock
            assert proc.poll() is None and time.monotonic() < deadline, "the leader never wrote a block map"
            await asyncio.sleep(0.1)
        epoch = first.epoch
        b = await controllers.start(settings, "ctl-b")
        for _ in range(2):  # a standby follows the leader's map and the stages' stats: it takes over warm
            for st in stats_for(await current_map(bus), {}):
                await bus.publish(Subjects.stats(st.stage_id), st)
        await eventually(lambda: set(b.cost.reports) == set(IDS))
        await asyncio.sleep(2 * ttl)
        assert not b.leader, "a standby must not lead while the leader renews"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        await eventually(lambda: b.leader, timeout=15)
        took = time.monotonic() - t0
        assert ttl * 0.5 <= took <= ttl + 2.0, took  # it waited for the lock to expire, then took it
        assert await holder() == "ctl-b"
        await eventually(lambda: b.block_map is not None)
        assert b.block_map.epoch == epoch  # a new leader resumes the map: no epoch bump
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    c = await controllers.start(settings, "ctl-c")
    await asyncio.sleep(0.3)
    assert not c.leader
    t0 = time.monotonic()
    await controllers.stop(b)  # a clean stop releases the lock: no wait for the expiry
    await eventually(lambda: c.leader, timeout=10)
    assert time.monotonic() - t0 < ttl + 1.0
    reply = await bus.request(Subjects.admission(), StreamSpec(stream_id="lead", width=64, height=64, fps=16.0,
                                                               steps=2, prompt="p"), timeout=10)
    assert isinstance(reply, Ack)
    await eventually(lambda: c.block_map is not None)
    assert c.block_map.epoch == epoch


@contextlib.asynccontextmanager
async def _stats_feed(bus: Bus, svc, slow: dict[str, float]):
    """Publish each stage's StageStats for the controller's current map every 0.2 s; ``slow`` may change."""

    async def loop() -> None:
        while True:
            if svc.block_map is not None:
                for s in stats_for(svc.block_map, slow):
                    await bus.publish(Subjects.stats(s.stage_id), s)
            await asyncio.sleep(0.2)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_rebalance_hysteresis_and_cool_down(nats_settings: NatsSettings, bus: Bus, controllers: Controllers,
                                                  members: Members, eventually) -> None:
    for s in IDS:
        members.beat(s)
    settings = controller_settings(nats_settings, rebalance_sustain_s=1.0, rebalance_cooldown_s=2.5,
                                   rebalance_gain_threshold=0.1)
    svc = await controllers.start(settings)
    await eventually(lambda: svc.block_map is not None)
    e0 = svc.block_map.epoch
    slow = {"dit-1": 1.05}  # 5 % slower: no split gains 10 %
    async with _stats_feed(bus, svc, slow):
        await asyncio.sleep(1.5)
        assert svc.block_map.epoch == e0 and not svc.decisions
        slow["dit-1"] = 2.0
        t0 = time.monotonic()
        await eventually(lambda: svc.block_map.epoch == e0 + 1, timeout=15)
        assert time.monotonic() - t0 >= settings.controller.rebalance_sustain_s
        t_change = time.monotonic()
        bm = await current_map(bus)
        assert bm.reason == "rebalance" and ranges(bm) == [("dit-0", 0, 5), ("dit-1", 5, 7), ("dit-2", 7, 12)]
        d = svc.decisions[-1]
        assert d["kind"] == "rebalance" and d["applied"] and abs(d["gain"] - 0.375) < 0.05
        # the new map is balanced: nothing more to do
        await asyncio.sleep(1.5)
        assert svc.block_map.epoch == e0 + 1
        # dit-0 slows down right after the change: the cool-down holds the next change back
        slow.update({"dit-1": 2.0, "dit-0": 2.0})
        await eventually(lambda: svc.block_map.epoch == e0 + 2, timeout=15)
        assert time.monotonic() - t_change >= settings.controller.rebalance_cooldown_s
        bm = await current_map(bus)
        assert bm.reason == "rebalance" and bm.stages[2].block_end - bm.stages[2].block_start > 5


async def test_advisory_mode_decides_the_same_without_applying(nats_settings: NatsSettings, bus: Bus,
                                                             controllers: Controllers, members: Members,
                                                             eventually) -> None:
    for s in IDS:
        members.beat(s)
    decisions = {}
    for advisory in (False, True):
        settings = controller_settings(nats_settings, advisory=advisory, rebalance_sustain_s=0.5)
        svc = await controllers.start(settings)
        await eventually(lambda svc=svc: svc.block_map is not None)
        e0 = svc.block_map.epoch
        async with _stats_feed(bus, svc, {"dit-2": 3.0}):
            await eventually(lambda svc=svc: any(d["kind"] == "rebalance" for d in svc.decisions), timeout=15)
        decision = next(d for d in svc.decisions if d["kind"] == "rebalance")
        decisions[advisory] = {k: decision[k] for k in ("map", "now_ms", "best_ms", "gain")}
        assert decision["applied"] is not advisory
        if not advisory:
            await eventually(lambda svc=svc, e0=e0: svc.block_map.epoch == e0 + 1)  # decided, then written
        await asyncio.sleep(0.3)
        assert svc.block_map.epoch == (e0 if advisory else e0 + 1)
        await controllers.stop(svc)
        await (await bus.kv(Buckets.BLOCKMAP, history=8)).delete(blockmap_key("0"))
        await (await bus.kv(Buckets.CONTROLLER)).delete("state")
    assert decisions[True] == decisions[False]
