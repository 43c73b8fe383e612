"""Controller test kit: a clean controller state in the session's KV, controllers to run, members to fake."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proto import BLOCKMAP_KEYS, BlockMap, Buckets, Heartbeat, StageStats, Subjects, blockmap_key
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.controller.service import ControllerService

ROOT = Path(__file__).resolve().parents[2]


async def _wipe(bus: Bus) -> None:
    blockmap = await bus.kv(Buckets.BLOCKMAP, history=8)
    ctl = await bus.kv(Buckets.CONTROLLER)
    for key in {blockmap_key("0"), *await blockmap.keys()}:  # every ring's map
        if key.startswith(BLOCKMAP_KEYS[:-1]):
            with contextlib.suppress(Exception):
                await blockmap.delete(key)
    for key in await ctl.keys():
        with contextlib.suppress(Exception):
            await ctl.delete(key)


@pytest.fixture
async def clean_state(bus: Bus) -> AsyncIterator[None]:
    """No block map, lock, state or admission records before and after (other suites watch the map)."""
    await _wipe(bus)
    yield
    await _wipe(bus)


def controller_settings(nats_settings: NatsSettings, **controller: Any) -> Settings:
    return Settings(nats=nats_settings, telemetry={"metrics_port": 0}, model={"preset": "tiny"},
                    lifecycle={"http_host": "127.0.0.1", "heartbeat_interval_s": 0.1},
                    dit_stage={"stats_interval_s": 0.2},
                    controller={"stages": 3, "num_blocks": 12, "lease_ttl_s": 1.0} | controller)


class Controllers:
    """In-process controller services, stopped at the end."""

    def __init__(self) -> None:
        self.running: list[tuple[ControllerService, asyncio.Task[int]]] = []

    async def start(self, settings: Settings, member_id: str | None = None) -> ControllerService:
        svc = ControllerService(settings, member_id)
        task = asyncio.create_task(svc.run())
        self.running.append((svc, task))
        deadline = time.monotonic() + 30
        while not svc.ready:
            assert not task.done() and time.monotonic() < deadline, "controller never became ready"
            await asyncio.sleep(0.02)
        return svc

    async def stop(self, svc: ControllerService) -> None:
        for s, task in list(self.running):
            if s is svc:
                s.stop()
                assert await asyncio.wait_for(task, 15) == 0
                self.running.remove((s, task))

    async def stop_all(self) -> None:
        for s, _ in list(self.running):
            await self.stop(s)


@pytest.fixture
async def controllers(clean_state: None) -> AsyncIterator[Controllers]:
    c = Controllers()
    yield c
    await c.stop_all()


class Members:
    """Fake cluster members: each heartbeats every 0.1 s until paused (what a dead process looks like)."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.paused: set[str] = set()
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def beat(self, member_id: str, role: str = "dit-stage", **fields: Any) -> None:
        """``fields``: more of the ``Heartbeat`` (``work``, ``ring_id``, ``address``)."""
        self.paused.discard(member_id)
        if member_id in self.tasks:
            return

        async def loop() -> None:
            while True:
                if member_id not in self.paused:
                    await self.bus.publish(Subjects.heartbeat(role, member_id), Heartbeat(
                        member_id=member_id, role=role, epoch=0, sent_at=time.time(), ready=True, **fields))
                await asyncio.sleep(0.1)

        self.tasks[member_id] = asyncio.create_task(loop())

    def pause(self, member_id: str) -> None:
        self.paused.add(member_id)

    def close(self) -> None:
        for t in self.tasks.values():
            t.cancel()


@pytest.fixture
async def members(bus: Bus) -> AsyncIterator[Members]:
    m = Members(bus)
    yield m
    m.close()


def stats_for(bm: BlockMap, slow: dict[str, float], *, block_ms: float = 10.0, items: float = 2.0) -> list[StageStats]:
    """What each stage of ``bm`` would report with per-block ``block_ms`` times its slowness factor."""
    return [StageStats(stage_id=s.stage_id, epoch=bm.epoch, block_start=s.block_start, block_end=s.block_end,
                       window_s=0.2, micro_steps=10, block_ms=[block_ms * slow.get(s.stage_id, 1.0)]
                       * (s.block_end - s.block_start), batch_items=items) for s in bm.stages]


async def current_map(bus: Bus) -> BlockMap | None:
    return await (await bus.kv(Buckets.BLOCKMAP, history=8)).get_message(blockmap_key("0"), BlockMap)


def ranges(bm: BlockMap | None) -> list[tuple[str, int, int]]:
    return [] if bm is None else [(s.stage_id, s.block_start, s.block_end) for s in bm.stages]


def controller_process(nats_settings: NatsSettings, **env: str) -> subprocess.Popen[bytes]:
    """A controller as its own process (``python -m services.controller.service``)."""
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RHEO_NATS__URL": nats_settings.url,
            "RHEO_TELEMETRY__METRICS_PORT": "0", "RHEO_LIFECYCLE__HTTP_HOST": "127.0.0.1",
            **env}
    return subprocess.Popen([sys.executable, "-m", "services.controller.service"], cwd=ROOT, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def timed_stage_process(nats_settings: NatsSettings, stage_id: str, logs: Path, *, block_ms: float,
                        slowdown: float = 1.0, metrics_port: int = 0, **dit_stage: str) -> subprocess.Popen[bytes]:
    """A DiT stage process in the timed stand-in mode (``dit_stage/timed.py``) with the test ring's cache config;
    ``dit_stage`` adds or overrides ``RHEO_DIT_STAGE__<KEY>`` settings."""
    from dit_service.helpers import CONFIG

    stage = {"STAGE_ID": stage_id, "LINK_HOST": "127.0.0.1", "LINK_PORT": "0", "ADVERTISE_HOST": "127.0.0.1",
             "KV_WINDOW": str(CONFIG.kv_window), "SINK": str(CONFIG.sink), "STATS_INTERVAL_S": "0.25",
             "TIMED_BLOCK_MS": str(block_ms), "SLOWDOWN": str(slowdown)} | {k.upper(): v for k, v in dit_stage.items()}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RHEO_NATS__URL": nats_settings.url,
           "RHEO_TELEMETRY__METRICS_PORT": str(metrics_port), "RHEO_LIFECYCLE__HTTP_HOST": "127.0.0.1",
           "RHEO_LIFECYCLE__HEARTBEAT_INTERVAL_S": "0.2", "RHEO_MODEL__DEVICE": "cpu", "RHEO_MODEL__DTYPE": "float32",
           **{f"RHEO_DIT_STAGE__{k}": v for k, v in stage.items()}}
    with open(logs / f"{stage_id}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "dit_stage.service"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)


async def stop_stages(bus: Bus, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM every stage process (kill after 10 s) and withdraw their link endpoints from KV."""
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            await asyncio.to_thread(p.wait, 10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    endpoints = await bus.kv(Buckets.ENDPOINTS)
    for s in procs:
        with contextlib.suppress(Exception):
            await endpoints.delete(s)
