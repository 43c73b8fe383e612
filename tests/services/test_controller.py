"""The controller: an even, contiguous block map under an epoch in KV, resumed on restart; membership; admission."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from proto import Ack, BlockMap, Buckets, Heartbeat, StreamSpec, Subjects, blockmap_key
from proto.spec import RingConfig
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.controller.partition import even_split
from services.controller.service import ControllerService


def test_even_split_is_contiguous_and_covers_every_block() -> None:
    for blocks, n in [(30, 1), (30, 2), (30, 4), (40, 3), (3, 3), (31, 4)]:
        stages = even_split(blocks, [f"dit-{i}" for i in range(n)])
        BlockMap(epoch=1, num_blocks=blocks, stages=stages).validate_cover()
        sizes = [s.block_end - s.block_start for s in stages]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="at least one"):
        even_split(2, ["a", "b", "c"])


def _settings(nats_settings: NatsSettings, stages: int, **dit_stage: object) -> Settings:
    return Settings(nats=nats_settings, telemetry={"metrics_port": 0}, controller={"stages": stages},
                    model={"preset": "tiny"}, dit_stage=dit_stage,
                    lifecycle={"http_host": "127.0.0.1", "heartbeat_interval_s": 0.05})


async def _run(settings: Settings, eventually) -> tuple[ControllerService, asyncio.Task[int]]:
    svc = ControllerService(settings)
    task = asyncio.create_task(svc.run())
    await eventually(lambda: svc.ready and svc.leader)  # ready once started; it writes the map once it leads
    return svc, task


async def test_block_map_epochs_and_restart(nats_settings: NatsSettings, bus: Bus, eventually) -> None:
    kv = await bus.kv(Buckets.BLOCKMAP, history=8)
    await kv.delete(blockmap_key("0"))
    svc, task = await _run(_settings(nats_settings, 3), eventually)
    stored = await kv.get_message(blockmap_key("0"), BlockMap)
    assert [(s.stage_id, s.block_start, s.block_end) for s in stored.stages] == \
        [("dit-0", 0, 1), ("dit-1", 1, 2), ("dit-2", 2, 3)]
    assert stored.ring == RingConfig()  # the configured ring (defaults here) travels in the map
    first_epoch = stored.epoch
    svc.stop()
    assert await task == 0

    svc, task = await _run(_settings(nats_settings, 3), eventually)  # same config: resume, same epoch
    assert (await kv.get_message(blockmap_key("0"), BlockMap)).epoch == first_epoch
    svc.stop()
    await task

    svc, task = await _run(_settings(nats_settings, 1), eventually)  # new config: next epoch
    stored = await kv.get_message(blockmap_key("0"), BlockMap)
    assert stored.epoch == first_epoch + 1 and len(stored.stages) == 1
    svc.stop()
    await task

    svc, task = await _run(_settings(nats_settings, 1, kv_window=8, t_refresh=40), eventually)  # a new ring
    stored = await kv.get_message(blockmap_key("0"), BlockMap)
    assert stored.epoch == first_epoch + 2 and (stored.ring.kv_window, stored.ring.t_refresh) == (8, 40)
    svc.stop()
    await task


async def test_membership_and_admission(nats_settings: NatsSettings, bus: Bus, eventually) -> None:
    svc, task = await _run(_settings(nats_settings, 2), eventually)
    try:
        # a heartbeat whose body claims a role its subject (the sender's bus identity) does not: refused, counted
        await bus.publish(Subjects.heartbeat("decoder", "dit-1"),
                          Heartbeat(member_id="dit-1", role="dit-stage", epoch=1, sent_at=0.0, ready=True))
        await bus.publish(Subjects.heartbeat("dit-stage", "dit-0"),
                          Heartbeat(member_id="dit-0", role="dit-stage", epoch=1, sent_at=0.0, ready=True))
        await eventually(lambda: [m.member_id for m in svc.live_members("dit-stage")] == ["dit-0"])
        assert "dit-1" not in svc.members  # same subscription, in order: the forgery came first
        assert (REGISTRY.get_sample_value("rheo_controller_heartbeats_refused_total") or 0) >= 1
        ok = await bus.request(Subjects.admission(),
                               StreamSpec(stream_id="s", width=512, height=512, fps=16.0, steps=2, prompt="p"),
                               timeout=10)
        assert isinstance(ok, Ack) and ok.ref == "s"
        with pytest.raises(ValidationError, match="multiple of 16"):  # a bad size never reaches admission
            StreamSpec(stream_id="s", width=500, height=512, fps=16.0, steps=2, prompt="p")
    finally:
        svc.stop()
        await task
