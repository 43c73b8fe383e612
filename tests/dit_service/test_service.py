"""DiT stage services over a real nats-server and real tensor links equal the single-process reference."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import torch

from dit_stage.service import DitStageService
from proto import (
    CHANNELS,
    BlockMap,
    Buckets,
    LatentChunk,
    PromptUpdate,
    StageAssignment,
    StagePrompt,
    StageStats,
    StreamEvent,
    StreamSpec,
    Subjects,
    blockmap_key,
)
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.link import LinkSender
from services.streams import StreamTable

from .helpers import CONFIG, NUM_BLOCKS, SPLITS, as_chunk_latent, chunk_message, latents, prompt, reference

ROOT = Path(__file__).resolve().parents[2]
_ids = itertools.count()

STAGE_SETTINGS = {
    "link_host": "127.0.0.1",
    "link_port": 0,
    "advertise_host": "127.0.0.1",
    "kv_window": CONFIG.kv_window,
    "sink": CONFIG.sink,
    "adaptive_threshold": CONFIG.adaptive_threshold,
    "stats_interval_s": 0.2,
    "max_queued_chunks": 16,
}


def _settings(nats_settings: NatsSettings, stage_id: str, **stage: object) -> Settings:
    return Settings(
        nats=nats_settings,
        telemetry={"metrics_port": 0},
        lifecycle={"http_host": "127.0.0.1", "heartbeat_interval_s": 0.2, "drain_timeout_s": 5},
        model={"device": "cpu", "dtype": "float32"},
        dit_stage=STAGE_SETTINGS | {"stage_id": stage_id} | stage,
    )


def _block_map(stage_ids: list[str], epoch: int = 0) -> BlockMap:
    ranges = SPLITS[len(stage_ids)]
    return BlockMap(epoch=epoch, num_blocks=NUM_BLOCKS, created_at=time.time(), stages=[
        StageAssignment(stage_id=s, block_start=a, block_end=b) for s, (a, b) in zip(stage_ids, ranges, strict=True)
    ])


async def _write_block_map(bus: Bus, bm: BlockMap) -> None:
    kv = await bus.kv(Buckets.BLOCKMAP)
    await kv.put(blockmap_key("0"), bm)


@pytest.fixture
async def shared_state(bus: Bus) -> AsyncIterator[list[str]]:
    """Stream ids a test puts in the session's stream table; they, and the block map, are removed afterwards
    (other suites list the table and watch the map)."""
    streams: list[str] = []
    yield streams
    table = await StreamTable.open(bus)
    prompts = await bus.kv(Buckets.PROMPTS)
    for s in streams:
        with contextlib.suppress(Exception):
            await table.delete(s)
        with contextlib.suppress(Exception):
            await prompts.delete(f"{s}.0")
    with contextlib.suppress(Exception):
        await (await bus.kv(Buckets.BLOCKMAP)).delete(blockmap_key("0"))


async def _open_stream(bus: Bus, shared: list[str], stream_id: str, seed: int, hw: tuple[int, int]) -> None:
    table = await StreamTable.open(bus)
    await table.create(StreamSpec(stream_id=stream_id, width=8 * hw[1], height=8 * hw[0], fps=16.0,
                                  steps=CONFIG.steps, prompt="p", seed=seed))
    shared.append(stream_id)


class _Collector:
    """x0 chunks of some streams, as the decoder would receive them (credit returned)."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[LatentChunk]] = {}

    async def start(self, bus: Bus, stream_ids: list[str]) -> None:
        async def on_x0(chunk: LatentChunk, _raw) -> None:
            self.chunks.setdefault(chunk.stream_id, []).append(chunk)

        for s in stream_ids:
            await bus.subscribe(Subjects.stream_x0(s), on_x0, expected=LatentChunk, credit=True)
        await bus.nc.flush()

    def seqs(self, stream_id: str) -> list[int]:
        return [c.seq for c in self.chunks.get(stream_id, [])]


class _Stages:
    """N in-process stage services, each with its own bus connection and link."""

    def __init__(self, nats_settings: NatsSettings, n: int, **stage: object) -> None:
        tag = next(_ids)
        self.ids = [f"t{tag}-dit-{i}" for i in range(n)]
        self.services = [DitStageService(_settings(nats_settings, s, **stage)) for s in self.ids]
        self.tasks: list[asyncio.Task[int]] = []

    async def __aenter__(self) -> _Stages:
        self.tasks = [asyncio.create_task(s.run()) for s in self.services]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in self.services:
            s.stop()
        codes = await asyncio.wait_for(asyncio.gather(*self.tasks), 15)
        assert codes == [0] * len(codes)

    @property
    def ready(self) -> bool:
        return all(s.ready for s in self.services)


def _close(got: LatentChunk, want: torch.Tensor) -> None:
    """fp32, atol 1e-5: bit-exact when the ring groups items into micro-steps as the runner does (the worker tests);
    here the grouping follows arrival times, and a different batch size may change GEMM rounding (~5e-7)."""
    torch.testing.assert_close(got.latent, as_chunk_latent(want), atol=1e-5, rtol=0, msg=lambda m: f"{got.seq}: {m}")


async def _feed(bus: Bus, stream_id: str, zs: list[torch.Tensor], emb: torch.Tensor, live_prompt: bool = True,
                **kw) -> None:
    """What ingest sends: the prompt request (no embedding: ignored), its embedded republish, then the chunks."""
    await bus.publish(Subjects.stream_prompt(stream_id), PromptUpdate(stream_id=stream_id, version=0, prompt="p"))
    if live_prompt:
        await bus.publish(Subjects.stream_prompt(stream_id),
                          PromptUpdate(stream_id=stream_id, version=0, prompt="p", embedding=emb))
    for c, z in enumerate(zs):
        await bus.publish(Subjects.stream_latent(stream_id), chunk_message(stream_id, c, z, **kw))


@pytest.mark.parametrize(("n", "link_path"), [(1, "local"), (2, "shm"), (3, "shm"), (3, "tcp")])
async def test_stages_equal_the_single_process_reference(nats_settings, bus, eventually, shared_state, n, link_path):
    """Through either link path (same host: shared memory unless dit_stage.link_shared_memory is off); one stage
    returns its items to itself in process (services/link_local.py)."""
    stream = f"eq{n}-{next(_ids)}"
    zs = latents(8, 7, (4, 6))
    want = reference({stream: (21, prompt(2), zs)})[stream]
    out = _Collector()
    await out.start(bus, [stream])
    await _open_stream(bus, shared_state, stream, 21, (4, 6))
    async with _Stages(nats_settings, n, link_shared_memory="auto" if link_path == "shm" else "off") as stages:
        if n == 1:  # no block map yet: up, but not ready, and saying why
            await eventually(lambda: stages.services[0].http_port != 0 and stages.services[0].checks["bus"])
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stages.services[0].http_port}") as http:
                ready = await http.get("/readyz")
            assert ready.status_code == 503 and {"weights", "link"} <= set(ready.json()["failing"])
        await _write_block_map(bus, _block_map(stages.ids))
        await eventually(lambda: stages.ready, timeout=30)
        assert [s.worker.model.block_range for s in stages.services] == SPLITS[n]
        await _feed(bus, stream, zs, prompt(2), seed=21)
        await eventually(lambda: out.seqs(stream) == list(range(len(zs))), timeout=30)
        assert {s.link.sender.path for s in stages.services if s.link.sender is not None} == {link_path}
        assert sum(s.listener.stats.shm_frames for s in stages.services) == (0 if link_path in ("tcp", "local") else
                                                                              sum(s.listener.stats.frames
                                                                                  for s in stages.services))
    got = out.chunks[stream]
    for w, g in zip(want, got, strict=False):
        _close(g, w)
        assert g.latent_start == CONFIG.clock().latent_start(g.seq) and g.epoch == 0


async def test_two_streams_at_once_equal_each_alone_and_stats_flow(nats_settings, bus, eventually, shared_state):
    tag = next(_ids)
    streams = {f"a{tag}": (31, prompt(31), latents(31, 5, (4, 6))),
               f"b{tag}": (32, prompt(32), latents(32, 5, (6, 8)))}
    want = {s: reference({s: v})[s] for s, v in streams.items()}
    out = _Collector()
    await out.start(bus, list(streams))
    stats: list[StageStats] = []

    async def on_stats(s: StageStats, _raw) -> None:
        stats.append(s)

    await bus.subscribe(CHANNELS["ctl_stats"].wildcard(), on_stats, expected=StageStats)
    async with _Stages(nats_settings, 2) as stages:
        for s, (seed, _, zs) in streams.items():
            await _open_stream(bus, shared_state, s, seed, tuple(zs[0].shape[-2:]))
        await _write_block_map(bus, _block_map(stages.ids))
        await eventually(lambda: stages.ready, timeout=30)
        late = f"b{tag}"  # joins late: its prompt is only in ingest's prompts bucket, not on the subject
        prompts = await bus.kv(Buckets.PROMPTS)
        await prompts.put(f"{late}.0", PromptUpdate(stream_id=late, version=0, prompt="p",
                                                    embedding=streams[late][1]))
        await asyncio.gather(*(_feed(bus, s, zs, ctx, live_prompt=s != late, seed=seed)
                               for s, (seed, ctx, zs) in streams.items()))
        await eventually(lambda: all(out.seqs(s) == list(range(5)) for s in streams), timeout=30)
        await eventually(lambda: {s.stage_id for s in stats if s.micro_steps} >= set(stages.ids), timeout=5)
        # the stream ends: every stage frees its state
        for s in streams:
            await bus.publish(Subjects.stream_event(s), StreamEvent(stream_id=s, kind="ended", seq=4, at=time.time()))
        await eventually(lambda: all(not svc.worker.streams for svc in stages.services), timeout=5)
    for s in streams:
        for w, g in zip(want[s], out.chunks[s], strict=False):
            _close(g, w)
    first = next(x for x in stats if x.stage_id == stages.ids[0] and x.micro_steps)
    assert (first.block_start, first.block_end) == SPLITS[2][0] and len(first.block_ms) == 2
    assert first.batch_items >= 1


async def test_stale_late_and_malformed_inputs_are_counted_and_dropped(nats_settings, bus, eventually, shared_state):
    stream = f"bad{next(_ids)}"
    zs = latents(9, 4, (4, 6))
    out = _Collector()
    await out.start(bus, [stream])
    await _open_stream(bus, shared_state, stream, 9, (4, 6))
    async with _Stages(nats_settings, 2) as stages:
        await _write_block_map(bus, _block_map(stages.ids, epoch=2))
        await eventually(lambda: stages.ready and stages.services[0].worker.epoch == 2, timeout=30)
        first = stages.services[0]
        malformed0 = first.bus.stats.malformed
        for subject in (Subjects.stream_latent(stream), Subjects.stream_prompt(stream), Subjects.stream_event(stream)):
            await bus.nc.publish(subject, b"RH\x01\x00garbage")
        await bus.publish(Subjects.stream_latent(stream), chunk_message(stream, 0, zs[0], epoch=1))
        await bus.publish(Subjects.stream_latent(stream), chunk_message(stream, 0, zs[0], epoch=2, deadline=1.0))
        # a peer speaking nonsense on the first stage's tensor link loses only its frame
        rogue = LinkSender(first.endpoint).start()
        await rogue.send(StagePrompt(stream_id=stream, version=0, embedding=prompt(0)))
        await eventually(lambda: first.malformed_link == 1 and first.bus.stats.malformed - malformed0 == 3)
        rogue.close()
        await eventually(lambda: first.worker.dropped["stale_epoch"] == 1 and first.worker.dropped["deadline"] == 1)
        # the stage goes on: a good stream still comes out
        await _feed(bus, stream, zs, prompt(9), epoch=2, seed=9)
        await eventually(lambda: out.seqs(stream) == [0, 1, 2, 3], timeout=30)
        assert all(c.epoch == 2 for c in out.chunks[stream])
        metrics = _metric_lines(first, "rheo_dit_stage_dropped_total")
        assert any('reason="stale_epoch"' in line for line in metrics)


def _metric_lines(service: DitStageService, name: str) -> list[str]:
    from prometheus_client import generate_latest

    return [ln for ln in generate_latest().decode().splitlines()
            if ln.startswith(name) and f'stage="{service.stage_id}"' in ln]


def _stage_process(nats_settings: NatsSettings, stage_id: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RHEO_NATS__URL": nats_settings.url,
           "RHEO_TELEMETRY__METRICS_PORT": "0", "RHEO_LIFECYCLE__HTTP_HOST": "127.0.0.1",
           "RHEO_LIFECYCLE__HEARTBEAT_INTERVAL_S": "0.2", "RHEO_MODEL__DEVICE": "cpu",
           "RHEO_MODEL__DTYPE": "float32", "RHEO_DIT_STAGE__STAGE_ID": stage_id}
    for key, value in STAGE_SETTINGS.items():
        env[f"RHEO_DIT_STAGE__{key.upper()}"] = str(value)
    return subprocess.Popen([sys.executable, "-m", "dit_stage.service"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def test_stage_processes_equal_the_reference_and_exit_on_sigterm(nats_settings, bus, eventually, shared_state):
    from proto import Heartbeat

    tag = next(_ids)
    ids = [f"p{tag}-dit-0", f"p{tag}-dit-1"]
    stream = f"proc{tag}"
    zs = latents(12, 5, (4, 6))
    want = reference({stream: (41, prompt(4), zs)})[stream]
    ready: set[str] = set()

    async def on_beat(hb: Heartbeat, _raw) -> None:
        if hb.ready:
            ready.add(hb.member_id)

    await bus.subscribe(CHANNELS["ctl_heartbeat"].wildcard(), on_beat, expected=Heartbeat)
    out = _Collector()
    await out.start(bus, [stream])
    await _open_stream(bus, shared_state, stream, 41, (4, 6))
    await _write_block_map(bus, _block_map(ids))
    procs = [_stage_process(nats_settings, s) for s in ids]
    try:
        await eventually(lambda: ready >= set(ids), timeout=60)
        await _feed(bus, stream, zs, prompt(4), seed=41)
        await eventually(lambda: out.seqs(stream) == list(range(len(zs))), timeout=30)
        for w, g in zip(want, out.chunks[stream], strict=False):
            _close(g, w)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        for p in procs:
            code = await asyncio.to_thread(p.wait, 5.0)
            assert code == 0, p.stdout.read().decode()[-3000:] if p.stdout else ""
        assert time.monotonic() - t0 < 5.0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
