"""Online rebalancing through the stage services: over a real nats-server and real tensor links, the controller's
new block maps move KV shards between live stages and no chunk changes or goes missing (docs/rebalance.md)."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import generate_latest

from dit_stage.service import DitStageService
from proto import CHANNELS, BlockMap, Buckets, PromptUpdate, StageAssignment, StageStats, Subjects, blockmap_key

from .helpers import chunk_message, latents, prompt, reference
from .test_service import _close, _Collector, _ids, _open_stream, _Stages
from .test_service import shared_state as shared_state  # the fixture

BLOCKS = 5
CHUNKS = 10
SPLITS = [[(0, 2), (2, 4), (4, 5)],  # epoch 0
          [(0, 1), (1, 2), (2, 5)],  # epoch 1: blocks move to the next stage (and the next but one)
          [(0, 3), (3, 4), (4, 5)]]  # epoch 2: blocks move back, one of them two stages upstream
MAP_AT = {4: 1, 7: 2}  # chunk seq → the epoch written just before it is fed


def _map(ids: list[str], epoch: int) -> BlockMap:
    return BlockMap(epoch=epoch, num_blocks=BLOCKS, created_at=time.time(),
                    reason="initial" if epoch == 0 else "rebalance", stages=[
                        StageAssignment(stage_id=s, block_start=a, block_end=b)
                        for s, (a, b) in zip(ids, SPLITS[epoch], strict=True)])


async def test_online_rebalance_across_live_stages_keeps_every_chunk_and_its_value(nats_settings, bus, eventually,
                                                                                    shared_state):
    tag = next(_ids)
    streams = {f"ra{tag}": (51, prompt(51), latents(51, CHUNKS, (4, 6))),
               f"rb{tag}": (52, prompt(52), latents(52, CHUNKS, (4, 6)))}
    want = {s: reference({s: v}, num_blocks=BLOCKS)[s] for s, v in streams.items()}
    out = _Collector()
    await out.start(bus, list(streams))
    stats: list[StageStats] = []

    async def on_stats(s: StageStats, _raw) -> None:
        stats.append(s)

    await bus.subscribe(CHANNELS["ctl_stats"].wildcard(), on_stats, expected=StageStats)
    kv = await bus.kv(Buckets.BLOCKMAP)
    async with _Stages(nats_settings, 3) as stages:
        for s, (seed, _, zs) in streams.items():
            await _open_stream(bus, shared_state, s, seed, tuple(zs[0].shape[-2:]))
        await kv.put(blockmap_key("0"), _map(stages.ids, 0))
        await eventually(lambda: stages.ready, timeout=30)
        for s, (_, ctx, _) in streams.items():
            await bus.publish(Subjects.stream_prompt(s), PromptUpdate(stream_id=s, version=0, prompt="p",
                                                                      embedding=ctx))
        epoch = 0
        for c in range(CHUNKS):
            if c in MAP_AT:  # the controller rebalances while both streams run
                epoch = MAP_AT[c]
                await kv.put(blockmap_key("0"), _map(stages.ids, epoch))
            for s, (seed, _, zs) in streams.items():  # stamped with the epoch "ingest" has seen
                await bus.publish(Subjects.stream_latent(s), chunk_message(s, c, zs[c], epoch=epoch, seed=seed))
            await asyncio.sleep(0.15)
        await eventually(lambda: all(out.seqs(s) == list(range(CHUNKS)) for s in streams), timeout=60)
        await eventually(lambda: all(svc.epoch == 2 for svc in stages.services), timeout=10)
        await eventually(lambda: {x.stage_id for x in stats if x.epoch == 2 and x.micro_steps} == set(stages.ids),
                         timeout=10)
        services = stages.services
        assert [svc.worker.model.block_range for svc in services] == SPLITS[2]
        for svc in services:
            assert not sum(svc.worker.dropped.values()), (svc.stage_id, dict(svc.worker.dropped))
            assert all(st.shard_state.shard.blocks == svc.worker.model.block_ids
                       for st in svc.worker.streams.values())
        metrics = generate_latest().decode()
    for s in streams:
        for w, g in zip(want[s], out.chunks[s], strict=False):
            _close(g, w)
    for sid in stages.ids:
        assert f'rheo_dit_stage_epoch_switches_total{{kind="online",stage="{sid}"}} 2.0' in metrics
        assert f'rheo_dit_stage_epoch_switches_total{{kind="hard",stage="{sid}"}} 1.0' in metrics
    moved = [line for line in metrics.splitlines()
             if line.startswith("rheo_dit_stage_shard_move_bytes_total") and any(i in line for i in stages.ids)]
    assert moved and all(float(line.split()[-1]) > 0 for line in moved)
    # per-block telemetry: the stats subject and Prometheus name every owned block under the current epoch
    for sid, (a, b) in zip(stages.ids, SPLITS[2], strict=True):
        x = [x for x in stats if x.stage_id == sid and x.epoch == 2 and x.micro_steps][-1]
        assert (x.block_start, x.block_end) == (a, b) and len(x.block_ms) == b - a
        assert all(ms > 0 for ms in x.block_ms) and x.extra_ms > 0
        assert x.free_memory_bytes > 0 and set(x.kv_bytes) <= set(streams)
        for block in range(a, b):
            assert f'rheo_dit_stage_block_seconds_count{{block="{block}",stage="{sid}"}}' in metrics


JOIN_SPLITS = [[(0, 3), (3, 5)],  # epoch 0: two stages
               [(0, 2), (2, 3), (3, 5)],  # epoch 1: x joins between them
               [(0, 2), (2, 3), (3, 4), (4, 5)]]  # epoch 2: y joins after the last, which hands it the head
JOIN_AT = {3: 1, 6: 2}


async def test_stages_join_a_running_ring_online(nats_settings, bus, eventually, shared_state):
    from .test_service import _settings

    tag = next(_ids)
    streams = {f"ja{tag}": (61, prompt(61), latents(61, CHUNKS, (4, 6))),
               f"jb{tag}": (62, prompt(62), latents(62, CHUNKS, (4, 6)))}
    want = {s: reference({s: v}, num_blocks=BLOCKS)[s] for s, v in streams.items()}
    out = _Collector()
    await out.start(bus, list(streams))
    kv = await bus.kv(Buckets.BLOCKMAP)
    async with _Stages(nats_settings, 2) as stages:
        x, y = DitStageService(_settings(nats_settings, f"t{tag}-x")), DitStageService(_settings(nats_settings,
                                                                                               f"t{tag}-y"))
        joiners = [asyncio.create_task(x.run()), asyncio.create_task(y.run())]
        try:
            order = [[*stages.ids], [stages.ids[0], x.stage_id, stages.ids[1]],
                     [stages.ids[0], x.stage_id, stages.ids[1], y.stage_id]]

            def join_map(epoch: int) -> BlockMap:
                return BlockMap(epoch=epoch, num_blocks=BLOCKS, created_at=time.time(),
                                reason="initial" if epoch == 0 else "join", stages=[
                                    StageAssignment(stage_id=s, block_start=a, block_end=b)
                                    for s, (a, b) in zip(order[epoch], JOIN_SPLITS[epoch], strict=True)])

            for s, (seed, _, zs) in streams.items():
                await _open_stream(bus, shared_state, s, seed, tuple(zs[0].shape[-2:]))
            await kv.put(blockmap_key("0"), join_map(0))
            await eventually(lambda: stages.ready and x.endpoint and y.endpoint, timeout=30)
            for s, (_, ctx, _) in streams.items():
                await bus.publish(Subjects.stream_prompt(s), PromptUpdate(stream_id=s, version=0, prompt="p",
                                                                          embedding=ctx))
            epoch = 0
            for c in range(CHUNKS):
                if c in JOIN_AT:
                    epoch = JOIN_AT[c]
                    await kv.put(blockmap_key("0"), join_map(epoch))
                for s, (seed, _, zs) in streams.items():
                    await bus.publish(Subjects.stream_latent(s), chunk_message(s, c, zs[c], epoch=epoch,
                                                                              seed=seed))
                await asyncio.sleep(0.15)
            await eventually(lambda: all(out.seqs(s) == list(range(CHUNKS)) for s in streams), timeout=60)
            everyone = [*stages.services, x, y]
            await eventually(lambda: all(svc.epoch == 2 for svc in everyone), timeout=10)
            by_id = {svc.stage_id: svc for svc in everyone}
            assert [by_id[s].worker.model.block_range for s in order[2]] == JOIN_SPLITS[2]
            for svc in everyone:
                assert not sum(svc.worker.dropped.values()), (svc.stage_id, dict(svc.worker.dropped))
            assert set(y.worker.streams) == set(streams)  # the joiner holds every stream's KV of its blocks
        finally:
            x.stop()
            y.stop()
            assert await asyncio.wait_for(asyncio.gather(*joiners), 15) == [0, 0]
    for s in streams:
        for w, g in zip(want[s], out.chunks[s], strict=False):
            _close(g, w)
