"""The issue's rebalancing acceptance test, end to end in timed mode, with a stream flowing.

Three ``dit-stage`` processes in timed mode (the real tiny model, then a sleep to ``BLOCK_MS`` per block per
micro-step; ``dit-1`` slowed ``SLOW``x by the ``dit_stage.slowdown`` knob) start on the controller's even map. A
stream is fed on the bus as ingest feeds it (stream table entry, prompt update, latent chunks stamped with the epoch
current when sent) faster than the ring can go, so the ring runs saturated from a backlog; every chunk is kept
(deadlines far away, queue cap above the chunk count), so "zero dropped" is a property of the switch alone. Checked:

* the controller's ``rebalance`` epoch, to the DP optimum, arrives within 10 s of the stats showing the imbalance
  (every stage has reported a busy window of the first epoch: dit-1's blocks cost twice the others'), and every
  stage runs micro-steps under it within 10 s too. The two differ by the backlog: the switch marker follows the
  items already queued at the slow stage (FIFO, docs/rebalance.md), ~3 s of them here;
* every x0 chunk arrives, each equal to the single-process reference (StreamBatchRunner, fp32, atol 1e-5); no stage
  counts a drop (``rheo_dit_stage_dropped_total`` scraped from each process' /metrics);
* throughput, x0 chunks/s of the backlog, before the change (even split) and after every stage has switched.

Balanced level: the DP-optimal modelled capacity, from the latency model alone. The stream batch runs a chunk's
``steps`` denoising steps of consecutive chunks as one batch (with ``timed_item_ms`` 0 a batch costs what one item
costs), so the saturated ring finishes one chunk per micro-step of its slowest stage: capacity = 1000 / bottleneck
ms, the bottleneck of a split being max over stages of slowdown x BLOCK_MS x blocks. With 12 blocks and dit-1 at 2x
that is 1000 / 120 = 8.3 chunks/s for the even split and 1000 / 75 = 13.3 for the DP optimum (5/2/5). After the
change the measured rate must reach 90 % of the optimum's; before it, it must stay under that (the negative
control: the imbalance is real and the threshold tells the two apart; the slowed ring also batches worse, so it
measures ~half its modelled level). The model does not see the link and bus time per micro-step; the stages' own
CPU time is hidden in the sleep as long as it is below BLOCK_MS per block. "The same stages with no slowdown"
(4/4/4, bottleneck 4 blocks' time) is not a reachable target: a 2x stage removes capacity no split gives back,
which caps after / that level at 0.8 by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from pathlib import Path

import httpx
import torch
from dit_service.helpers import CONFIG, as_chunk_latent, chunk_message, latents, prompt, reference

from proto import CHANNELS, Heartbeat, LatentChunk, PromptUpdate, StageStats, StreamSpec, Subjects
from services.bus import Bus
from services.config import NatsSettings
from services.controller.partition import PartitionProblem, Stage, best_split
from services.stack import free_port
from services.streams import StreamTable

from .conftest import Controllers, controller_settings, current_map, ranges, stop_stages, timed_stage_process

BLOCK_MS = 15.0
SLOW = {"dit-1": 2.0}
IDS = ["dit-0", "dit-1", "dit-2"]
NUM_BLOCKS = 12
CHUNKS = 70
FEED_RATE = 40.0  # chunks/s: above what the rebalanced ring does


def _stage(nats_settings: NatsSettings, stage_id: str, metrics_port: int, logs: Path) -> subprocess.Popen[bytes]:
    return timed_stage_process(nats_settings, stage_id, logs, block_ms=BLOCK_MS, slowdown=SLOW.get(stage_id, 1.0),
                               metrics_port=metrics_port, adaptive_threshold=str(CONFIG.adaptive_threshold),
                               max_queued_chunks=str(2 * CHUNKS))


def _bottleneck(split: list[tuple[str, int, int]]) -> float:
    """Modelled ms of the slowest stage's micro-step under ``split``."""
    return max(BLOCK_MS * SLOW.get(s, 1.0) * (b - a) for s, a, b in split)


def _capacity(split: list[tuple[str, int, int]]) -> float:
    """Modelled x0 chunks/s of the saturated ring under ``split``: one chunk per micro-step of its bottleneck."""
    return 1000.0 / _bottleneck(split)


def _optimum() -> list[tuple[str, int, int]]:
    split = best_split(PartitionProblem([BLOCK_MS] * NUM_BLOCKS, [Stage(s, SLOW.get(s, 1.0)) for s in IDS]))
    assert split is not None
    return [(s, a, b) for s, (a, b) in zip(IDS, split.ranges, strict=True)]


def _rate(times: list[float], t0: float, t1: float) -> float:
    """x0 chunks/s between the first and last output inside [t0, t1) (the ring's pace, not the window's edges)."""
    inside = sorted(t for t in times if t0 <= t < t1)
    assert len(inside) >= 4, (len(inside), t0, t1)
    return (len(inside) - 1) / (inside[-1] - inside[0])


async def _dropped(ports: dict[str, int]) -> dict[str, float]:
    """Every stage's ``rheo_dit_stage_dropped_total`` samples (any reason), from its /metrics."""
    found: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=10) as http:
        for sid, port in ports.items():
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
            assert "rheo_dit_stage_" in text, sid
            for line in text.splitlines():
                if line.startswith("rheo_dit_stage_dropped_total"):
                    found[f"{sid}: {line.split()[0]}"] = float(line.split()[-1])
    return found


async def test_slowed_stage_is_rebalanced_with_the_stream_intact_and_throughput_recovered(
        nats_settings: NatsSettings, bus: Bus, controllers: Controllers, eventually, tmp_path: Path) -> None:
    stream = f"e2e{os.getpid()}"
    seed, emb, zs = 71, prompt(71), latents(71, CHUNKS, (4, 6))
    want = reference({stream: (seed, emb, zs)}, num_blocks=NUM_BLOCKS)[stream]
    beats: set[str] = set()
    busy: dict[int, dict[str, float]] = {}  # epoch → stage → when its first busy stats window arrived
    out: dict[int, tuple[float, LatentChunk]] = {}

    async def on_beat(hb: Heartbeat, _raw) -> None:
        if hb.ready:
            beats.add(hb.member_id)

    async def on_x0(chunk: LatentChunk, _raw) -> None:
        out.setdefault(chunk.seq, (time.monotonic(), chunk))

    settings = controller_settings(nats_settings, rebalance_sustain_s=2.0, rebalance_cooldown_s=600.0,
                                   heartbeat_miss_s=5.0, startup_grace_s=300.0)
    settings.dit_stage.stats_interval_s = 0.25
    subs = [await bus.subscribe(CHANNELS["ctl_heartbeat"].wildcard(), on_beat, expected=Heartbeat),
            await bus.subscribe(Subjects.stream_x0(stream), on_x0, expected=LatentChunk, credit=True)]
    table = await StreamTable.open(bus)
    await table.create(StreamSpec(stream_id=stream, width=8 * 6, height=8 * 4, fps=16.0, steps=CONFIG.steps,
                                  prompt="p", seed=seed))
    svc = await controllers.start(settings)
    await eventually(lambda: svc.block_map is not None)
    e0 = svc.block_map.epoch

    async def on_stats(st: StageStats, _raw) -> None:
        if st.micro_steps:
            busy.setdefault(st.epoch, {}).setdefault(st.stage_id, time.monotonic())

    subs.append(await bus.subscribe(CHANNELS["ctl_stats"].wildcard(), on_stats, expected=StageStats))
    ports = {s: free_port() for s in IDS}
    procs = {s: _stage(nats_settings, s, ports[s], tmp_path) for s in IDS}
    feeder: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: beats >= set(IDS), timeout=90)
        before_map = ranges(await current_map(bus))
        assert svc.block_map.reason == "initial" and svc.block_map.epoch == e0
        assert before_map == [("dit-0", 0, 4), ("dit-1", 4, 8), ("dit-2", 8, 12)]

        async def feed() -> None:  # what ingest sends: the embedded prompt, then chunks under the current epoch
            await bus.publish(Subjects.stream_prompt(stream),
                              PromptUpdate(stream_id=stream, version=0, prompt="p", embedding=emb))
            for c in range(CHUNKS):
                await bus.publish(Subjects.stream_latent(stream),
                                  chunk_message(stream, c, zs[c], epoch=svc.block_map.epoch, seed=seed))
                await asyncio.sleep(1.0 / FEED_RATE)

        feeder = asyncio.create_task(feed())
        await eventually(lambda: set(busy.get(e0, ())) >= set(IDS) or svc.block_map.epoch != e0, timeout=60)
        imbalance_seen = max(busy.get(e0, {}).values(), default=time.monotonic())
        await eventually(lambda: svc.block_map.epoch != e0, timeout=30)
        switched = time.monotonic()
        took = switched - imbalance_seen
        after_map = ranges(await current_map(bus))
        assert svc.block_map.reason == "rebalance" and svc.block_map.epoch == e0 + 1, svc.decisions
        assert after_map == _optimum() == [("dit-0", 0, 5), ("dit-1", 5, 7), ("dit-2", 7, 12)]

        await eventually(lambda: set(busy.get(e0 + 1, ())) >= set(IDS), timeout=60)
        moved = max(busy[e0 + 1].values())  # every stage runs micro-steps under the new map
        await eventually(lambda: len(out) == CHUNKS, timeout=120)
        await feeder
        assert sorted(out) == list(range(CHUNKS))  # zero dropped
        for c, w in enumerate(want):
            torch.testing.assert_close(out[c][1].latent, as_chunk_latent(w), atol=1e-5, rtol=0,
                                       msg=lambda m, c=c: f"chunk {c}: {m}")
        dropped = await _dropped(ports)
        assert not any(dropped.values()), dropped

        times = [t for t, _ in out.values()]
        first = min(times)
        before = _rate(times, first + 0.5, switched)
        after = _rate(times, moved + 0.5, max(times) + 1.0)
        balanced = _capacity(after_map)
        print(f"\nrebalance epoch {took:.2f} s after the imbalance showed, every stage on it "
              f"{moved - imbalance_seen:.2f} s after; x0 chunks/s before {before:.2f} (modelled "
              f"{_capacity(before_map):.2f}), after {after:.2f}, balanced (modelled DP optimum) {balanced:.2f}: "
              f"{after / balanced:.0%}")
        assert took <= 10.0, took
        assert moved - imbalance_seen <= 10.0, moved - imbalance_seen
        assert before < 0.9 * balanced <= after, (before, after, balanced)
    finally:
        if feeder is not None:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
        for sub in subs:
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await table.delete(stream)
        await stop_stages(bus, procs)
