"""Closed loop with real processes: three timed stand-in stages (one slowed 2x) → the controller rebalances to the DP
optimum; kill -9 a stage → a failure epoch over the survivors; start it again → a join epoch.

A stream runs through the ring the whole time. The rebalance is an online switch (KV shards move with their blocks,
docs/rebalance.md), so the stream goes on across it with no chunk lost: checked here by its x0 chunks coming out
contiguously up to one fed after the new epoch (their values against the reference, and throughput, are
tests/controller/test_rebalance_e2e.py's). The failure epoch is a hard switch that drops the streams' state; without
ingest's replay (docs/recovery.md, tests/faults) the stream does not come back, so after the kill this checks maps.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from pathlib import Path

from dit_service.helpers import chunk_message, latents, prompt

from proto import CHANNELS, Heartbeat, LatentChunk, PromptUpdate, Subjects
from services.bus import Bus
from services.config import NatsSettings
from services.controller.partition import PartitionProblem, Stage, best_split

from .conftest import Controllers, controller_settings, current_map, ranges, stop_stages, timed_stage_process

BLOCK_MS = 10.0
SLOW = {"dit-1": 2.0}


def _stage(nats_settings: NatsSettings, stage_id: str, logs: Path) -> subprocess.Popen[bytes]:
    return timed_stage_process(nats_settings, stage_id, logs, block_ms=BLOCK_MS, slowdown=SLOW.get(stage_id, 1.0),
                               max_queued_chunks="16")


def _optimum(stage_ids: list[str]) -> list[tuple[str, int, int]]:
    split = best_split(PartitionProblem([BLOCK_MS] * 12, [Stage(s, SLOW.get(s, 1.0)) for s in stage_ids]))
    assert split is not None
    return [(s, a, b) for s, (a, b) in zip(stage_ids, split.ranges, strict=True)]


async def test_timed_stages_rebalance_fail_and_rejoin(nats_settings: NatsSettings, bus: Bus,
                                                      controllers: Controllers, eventually, tmp_path: Path) -> None:
    ids = ["dit-0", "dit-1", "dit-2"]
    beats: dict[str, float] = {}
    fed: dict[int, float] = {}
    out: dict[int, float] = {}

    async def on_beat(hb: Heartbeat, _raw) -> None:
        if hb.ready:
            beats[hb.member_id] = time.monotonic()

    async def on_x0(chunk: LatentChunk, _raw) -> None:
        out.setdefault(chunk.seq, time.monotonic())

    sub = await bus.subscribe(CHANNELS["ctl_heartbeat"].wildcard(), on_beat, expected=Heartbeat)
    x0_sub = await bus.subscribe(Subjects.stream_x0("loop"), on_x0, expected=LatentChunk, credit=True)
    # three stage processes starting on a loaded 2-core machine may take long to start and stall for over 1.5 s
    settings = controller_settings(nats_settings, rebalance_sustain_s=1.0, rebalance_cooldown_s=2.0,
                                   heartbeat_miss_s=3.0, heartbeat_dead_s=3.0, startup_grace_s=300.0)
    settings.dit_stage.stats_interval_s = 0.25
    svc = await controllers.start(settings)
    await eventually(lambda: svc.block_map is not None)
    procs = {s: _stage(nats_settings, s, tmp_path) for s in ids}
    feeder: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: set(beats) >= set(ids), timeout=90)
        assert svc.block_map.reason == "initial", svc.decisions
        e0 = svc.block_map.epoch

        async def feed() -> None:  # one stream at ~3 chunks/s (under the slowed ring's ~5), under the current epoch
            emb = prompt(2)
            await bus.publish(Subjects.stream_prompt("loop"),
                              PromptUpdate(stream_id="loop", version=0, prompt="p", embedding=emb))
            zs = latents(3, 2, (4, 6))
            c = 0
            while True:
                await bus.publish(Subjects.stream_latent("loop"),
                                  chunk_message("loop", c, zs[0 if c == 0 else 1], epoch=svc.block_map.epoch))
                fed[c] = time.monotonic()
                c += 1
                await asyncio.sleep(0.33)

        feeder = asyncio.create_task(feed())
        # from the moment the controller has timing of every stage (the stream is running through the ring)
        await eventually(lambda: set(svc.cost.reports) >= set(ids) or svc.block_map.epoch != e0, timeout=60)
        t0 = time.monotonic()
        await eventually(lambda: svc.block_map.epoch == e0 + 1, timeout=30)
        took = time.monotonic() - t0
        bm = await current_map(bus)
        assert bm.reason == "rebalance" and ranges(bm) == _optimum(ids) == [
            ("dit-0", 0, 5), ("dit-1", 5, 7), ("dit-2", 7, 12)]
        assert took <= 10.0, took
        rebalanced = time.monotonic()  # the stream goes on across the online switch, nothing lost
        await eventually(lambda: any(fed.get(c, 0.0) > rebalanced + 1.0 for c in out), timeout=30)
        assert sorted(out) == list(range(len(out))), sorted(out)

        procs["dit-2"].send_signal(signal.SIGKILL)  # a stage dies: the survivors take its blocks
        procs["dit-2"].wait()
        t0 = time.monotonic()
        await eventually(lambda: svc.block_map.epoch == e0 + 2, timeout=15)
        detected = time.monotonic() - t0
        bm = await current_map(bus)
        assert bm.reason == "failure" and ranges(bm) == _optimum(["dit-0", "dit-1"]) == [
            ("dit-0", 0, 8), ("dit-1", 8, 12)]
        assert detected <= settings.controller.heartbeat_miss_s + 2.0, detected

        procs["dit-2"] = _stage(nats_settings, "dit-2", tmp_path)  # it comes back as a new member
        await eventually(lambda: svc.block_map.epoch == e0 + 3, timeout=90)
        bm = await current_map(bus)
        assert bm.reason == "join" and ranges(bm) == _optimum(ids)
        assert [d["kind"] for d in svc.decisions] == ["rebalance", "failure", "join"]
    finally:
        if feeder is not None:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
        await sub.unsubscribe()
        await x0_sub.unsubscribe()
        await stop_stages(bus, procs)
