"""The timed batching benchmark: one ring of timed stand-in stages, the SLO batcher against greedy (JSON lines).

Issue #15's acceptance on a CPU: the stages are real ``DitStageService`` objects (in this process, each with its own
NATS connection and tensor link, over a private nats-server), so the first stage forms its micro-steps exactly as a
served one does (``ComputeLoop`` → ``FirstStage._take_first`` → ``batcher.select``, the ``LatencyModel`` fitted from
the micro-steps it measures). They are the *timed stand-in* (``dit_stage/timed.py``): the tiny model, then a sleep
so that a micro-step of n items takes ``a + b·n`` per stage (``--a-ms``, ``--b-ms``), the shape of a GPU forward
below its roofline knee. Chunks are fed as ingest sends them, each with ``deadline = capture time + SLO``; an output
chunk is on time when its x0 reaches the bus by its deadline; a chunk that never comes out (dropped, counted by the
stages with its reason) is a miss.

Scenarios (``--scenario``):

* ``one``: one stream fed faster than it can go (deadlines loose): the most frames/s one stream gets alone;
* ``four``: four streams at ``--fps`` each with a ``--slo-ms`` SLO: aggregate and per-stream frames/s, misses;
* ``mixed``: four loose streams (``--loose-slo-ms``) at a larger size whose chunks arrive in bursts (an ingest
  catching up) and two tight streams (``--slo-ms``) at a steady rate: the tight streams' misses.

Each runs with ``--batcher slo`` and ``greedy``. Acceptance (issue #15): ``four`` aggregate ≥ 1.6 × ``one``, every
stream at ≥ its fps; ``mixed``: tight misses ≤ 1 % (slo), against greedy's.

    python bench/ring_batching.py                       # all scenarios, both batchers
    python bench/ring_batching.py --scenario mixed --batcher greedy --duration-s 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dit_stage.service import DitStageService  # noqa: E402
from proto import BlockMap, Buckets, LatentChunk, PromptUpdate, StageAssignment, Subjects, blockmap_key  # noqa: E402
from proto.clock import ChunkClock  # noqa: E402
from proto.spec import chunk_timesteps  # noqa: E402
from services.bus import Bus  # noqa: E402
from services.config import NatsSettings, Settings  # noqa: E402
from wan.config import WanDiTConfig  # noqa: E402

__all__ = ["RingResult", "StreamPlan", "run_ring", "scenario"]

FRAMES_PER_CHUNK = 4  # video frames per steady latent frame
STEPS, NOISE_SCALE = 2, 0.7
_ids = itertools.count()


@dataclass(frozen=True)
class StreamPlan:
    """One fed stream: its latent size, its chunk rate, its SLO, and how its chunks arrive (``burst`` chunks at
    once every ``burst / rate`` seconds, captured evenly over that time: an ingest catching up)."""

    cls: str
    hw: tuple[int, int]
    rate: float  # chunks per second (fps / FRAMES_PER_CHUNK)
    slo_s: float
    burst: int = 1

    @property
    def fps(self) -> float:
        return self.rate * FRAMES_PER_CHUNK


@dataclass
class StreamRun:
    stream_id: str
    plan: StreamPlan
    deadlines: dict[int, float] = field(default_factory=dict)
    out: dict[int, float] = field(default_factory=dict)  # seq → when its x0 reached the bus (wall clock)

    def on_time(self, seqs: Iterable[int]) -> int:
        return sum(1 for s in seqs if s in self.out and self.out[s] <= self.deadlines[s])


@dataclass
class RingResult:
    batcher: str
    streams: list[dict]
    dropped: dict[str, int]
    mean_batch: float

    def by_cls(self, cls: str) -> list[dict]:
        return [s for s in self.streams if s["cls"] == cls]

    @property
    def aggregate_fps(self) -> float:
        return sum(s["fps"] for s in self.streams)

    def miss_ratio(self, cls: str) -> float:
        got = self.by_cls(cls)
        fed = sum(s["fed"] for s in got)
        return sum(s["missed"] for s in got) / fed if fed else 0.0


def _settings(nats: NatsSettings, stage_id: str, batcher: str, a_ms: float, b_ms: float,
              max_queued: int) -> Settings:
    return Settings(nats=nats, telemetry={"metrics_port": 0},
                    lifecycle={"http_host": "127.0.0.1", "heartbeat_interval_s": 0.5, "drain_timeout_s": 5},
                    model={"device": "cpu", "dtype": "float32"},
                    dit_stage={"stage_id": stage_id, "link_host": "127.0.0.1", "link_port": 0,
                               "advertise_host": "127.0.0.1", "stats_interval_s": 0.5, "batcher": batcher,
                               "timed_block_ms": a_ms, "timed_item_ms": b_ms, "max_queued_chunks": max_queued})


def _chunk(run: StreamRun, c: int, capture: float) -> LatentChunk:
    clock = ChunkClock.v2v()
    g = torch.Generator().manual_seed(c)
    deadline = capture + run.plan.slo_s
    run.deadlines[c] = deadline
    return LatentChunk(stream_id=run.stream_id, seed=0, fps=min(run.plan.fps, 60.0), seq=c, epoch=0,
                       latent_start=clock.latent_start(c), rope_start=clock.rope_start(c), capture_time=capture,
                       deadline=deadline, prompt_version=0, noise_scale=NOISE_SCALE,
                       timesteps=chunk_timesteps(STEPS, NOISE_SCALE),
                       latent=torch.randn(2 if c == 0 else 1, 4, *run.plan.hw, generator=g))


async def _feed(bus: Bus, run: StreamRun, t0: float, until: float) -> None:
    """Chunk c is captured at t0 + c / rate; a burst of k is sent when its last chunk is captured."""
    p = run.plan
    c = 0
    while True:
        send_at = t0 + (c + p.burst - 1) / p.rate
        if send_at >= until:
            return
        await asyncio.sleep(max(0.0, send_at - time.time()))
        for k in range(c, c + p.burst):
            await bus.publish(Subjects.stream_latent(run.stream_id), _chunk(run, k, t0 + k / p.rate))
        c += p.burst


async def run_ring(nats: NatsSettings, batcher: str, plans: list[StreamPlan], *, duration_s: float,
                   stages: int = 3, a_ms: float = 30.0, b_ms: float = 3.0, warmup_s: float = 1.0,
                   max_queued: int = 64) -> RingResult:
    """Run ``plans`` through a fresh ring of ``stages`` timed stages (one block each: a micro-step of n items takes
    ``a_ms + b_ms·n`` per stage) for ``duration_s`` after ``warmup_s``, then let the ring drain."""
    layers = WanDiTConfig.tiny().num_layers
    if layers % stages:
        raise ValueError(f"{stages} stages do not split the tiny model's {layers} blocks evenly")
    per = layers // stages
    tag = next(_ids)
    ids = [f"rb{tag}-dit-{i}" for i in range(stages)]
    services = [DitStageService(_settings(nats, s, batcher, a_ms / per, b_ms / per, max_queued)) for s in ids]
    tasks = [asyncio.create_task(s.run()) for s in services]
    bus = await Bus.connect(nats, name=f"ring-batching-{tag}")
    runs = [StreamRun(f"rb{tag}-{p.cls}-{i}", p) for i, p in enumerate(plans)]
    try:
        kv = await bus.kv(Buckets.BLOCKMAP)
        await kv.put(blockmap_key("0"), BlockMap(
            ring_id="0", epoch=0, num_blocks=layers, created_at=time.time(),
            stages=[StageAssignment(stage_id=s, block_start=i * per, block_end=(i + 1) * per)
                    for i, s in enumerate(ids)]))
        for r in runs:
            async def on_x0(chunk: LatentChunk, _raw: object, r: StreamRun = r) -> None:
                r.out.setdefault(chunk.seq, time.time())

            await bus.subscribe(Subjects.stream_x0(r.stream_id), on_x0, expected=LatentChunk, credit=True)
        end = time.monotonic() + 60
        while not all(s.ready for s in services):
            if time.monotonic() > end:
                raise RuntimeError("the stages never became ready")
            await asyncio.sleep(0.05)
        prompts = await bus.kv(Buckets.PROMPTS)
        for r in runs:  # what ingest does: the embedded prompt in its bucket and on the stream's subject
            update = PromptUpdate(stream_id=r.stream_id, version=0, prompt="p", embedding=torch.randn(16, 32))
            await prompts.put(f"{r.stream_id}.0", update)
            await bus.publish(Subjects.stream_prompt(r.stream_id), update)
        await bus.nc.flush()
        t0 = time.time() + 0.2
        until = t0 + warmup_s + duration_s
        await asyncio.gather(*(_feed(bus, r, t0, until) for r in runs))
        last = max(max(r.deadlines.values(), default=t0) for r in runs)
        while time.time() < last + 0.2 and any(len(r.out) < len(r.deadlines) for r in runs):
            await asyncio.sleep(0.05)  # the rest come out by their deadline, or never
        first = services[0].worker
        assert first is not None
        dropped = {k: v for k, v in first.dropped.items() if v}
        totals = services[0].telemetry.totals
        mean_batch = totals.items / totals.micro_steps if totals.micro_steps else 0.0
    finally:
        for s in services:
            s.stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        with contextlib.suppress(Exception):
            await (await bus.kv(Buckets.BLOCKMAP)).delete(blockmap_key("0"))
        await bus.close()
    out = []
    for r in runs:
        measured = [c for c, d in r.deadlines.items() if d - r.plan.slo_s >= t0 + warmup_s]  # captured after warm-up
        ok = r.on_time(measured)
        out.append({"stream": r.stream_id, "cls": r.plan.cls, "hw": list(r.plan.hw), "slo_ms": r.plan.slo_s * 1000,
                    "target_fps": r.plan.fps, "fed": len(measured), "on_time": ok, "missed": len(measured) - ok,
                    "fps": round(FRAMES_PER_CHUNK * ok / duration_s, 2)})
    return RingResult(batcher, out, dropped, round(mean_batch, 2))


def scenario(name: str, *, fps: float = 48.0, mixed_fps: float = 16.0, slo_ms: float = 400.0,
             loose_slo_ms: float = 3000.0, one_fps: float = 160.0) -> list[StreamPlan]:
    """The streams of a named scenario (see the module docstring)."""
    if name == "one":
        return [StreamPlan("one", (4, 6), one_fps / FRAMES_PER_CHUNK, 2.0)]
    if name == "four":
        return [StreamPlan("four", (4, 6), fps / FRAMES_PER_CHUNK, slo_ms / 1000) for _ in range(4)]
    if name == "mixed":
        rate = mixed_fps / FRAMES_PER_CHUNK
        loose = [StreamPlan("loose", (6, 8), rate, loose_slo_ms / 1000, burst=4) for _ in range(4)]
        tight = [StreamPlan("tight", (4, 6), rate, slo_ms / 1000) for _ in range(2)]
        return loose + tight
    raise ValueError(f"unknown scenario {name!r}")


async def _main(args: argparse.Namespace) -> None:
    from bench.common import git_commit
    from services.natsd import NatsServer

    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp), anonymous=True)
        server.start()
        try:
            nats = NatsSettings(url=server.url)
            for name in args.scenario:
                for batcher in args.batcher:
                    plans = scenario(name, fps=args.fps, mixed_fps=args.mixed_fps, slo_ms=args.slo_ms,
                                     loose_slo_ms=args.loose_slo_ms, one_fps=args.one_fps)
                    res = await run_ring(nats, batcher, plans,
                                         duration_s=args.duration_s, stages=args.stages, a_ms=args.a_ms,
                                         b_ms=args.b_ms)
                    line = {"bench": "ring_batching", "mode": "timed", "device": "cpu", "commit": git_commit(),
                            "date": time.strftime("%Y-%m-%d", time.gmtime()), "scenario": name,
                            "batcher": batcher, "stages": args.stages, "a_ms": args.a_ms, "b_ms": args.b_ms,
                            "duration_s": args.duration_s, "aggregate_fps": round(res.aggregate_fps, 2),
                            "tight_miss_ratio": round(res.miss_ratio("tight"), 4) if name == "mixed" else None,
                            "dropped": res.dropped, "mean_batch_items": res.mean_batch, "streams": res.streams}
                    print(json.dumps(line), flush=True)
        finally:
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", nargs="+", default=["one", "four", "mixed"], choices=["one", "four", "mixed"])
    ap.add_argument("--batcher", nargs="+", default=["slo", "greedy"], choices=["slo", "greedy"])
    ap.add_argument("--duration-s", type=float, default=10.0, help="measured seconds per run (after a 1 s warm-up)")
    ap.add_argument("--stages", type=int, default=3, help="timed stages in the ring (one block each by default)")
    ap.add_argument("--a-ms", type=float, default=30.0, help="timed stand-in: fixed ms per micro-step per stage")
    ap.add_argument("--b-ms", type=float, default=3.0, help="timed stand-in: ms per item per micro-step per stage")
    ap.add_argument("--fps", type=float, default=48.0, help="the four streams' frames/s (their SLO's target_fps)")
    ap.add_argument("--mixed-fps", type=float, default=16.0, help="the mixed scenario's streams' frames/s")
    ap.add_argument("--one-fps", type=float, default=160.0, help="the lone stream's feed (above what it can get)")
    ap.add_argument("--slo-ms", type=float, default=400.0, help="the four / tight streams' latency SLO")
    ap.add_argument("--loose-slo-ms", type=float, default=3000.0, help="the loose streams' latency SLO")
    args = ap.parse_args()
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
