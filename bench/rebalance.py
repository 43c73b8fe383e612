"""Online rebalancing benchmark in the timed stand-in mode: one JSON line per run.

A private nats-server, the controller (adaptive), three ``dit-stage`` processes in timed mode (tiny model, each
micro-step sleeps to ``--block-ms`` per block; ``dit-1`` slowed by ``--slowdown``) and a stream fed at
``--chunk-rate`` chunks/s. The map starts even; the controller sees the slow stage in its StageStats and moves
blocks. Reported:

* ``time_to_rebalance_s``: the stream's first finished chunk → the ``rebalance`` epoch;
* ``fps_before`` / ``fps_after``: output frames/s (4 per chunk) before the change, and after it (of a stream started
  after the change, when the first one did not survive it);
* ``frames_dropped``: frames of chunks fed from 0.5 s before the change to 2 s after it that never came out.

Until stages migrate KV shards on a range change, they reload and drop every stream's state: the first stream
ends at the change (``frames_dropped`` counts the rest of its chunks in that window) and ``fps_after`` comes from a
new stream. With migration the first stream goes on and ``frames_dropped`` should be 0.

    python bench/rebalance.py                  # --slowdown 2 --block-ms 10 --chunk-rate 16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dit_stage.stream_batch import StreamBatchConfig  # noqa: E402
from proto import CHANNELS, Heartbeat, LatentChunk, PromptUpdate, Subjects  # noqa: E402
from services.bus import Bus  # noqa: E402
from services.config import NatsSettings, Settings  # noqa: E402
from services.controller.service import ControllerService  # noqa: E402
from services.natsd import NatsServer  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from common import git_commit  # noqa: E402

IDS = ["dit-0", "dit-1", "dit-2"]
FRAMES_PER_CHUNK = 4
CONFIG = StreamBatchConfig(steps=2, noise_scale=0.7)


def _stage(url: str, stage_id: str, block_ms: float, slowdown: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RHEO_NATS__URL": url,
           "RHEO_TELEMETRY__METRICS_PORT": "0", "RHEO_LIFECYCLE__HTTP_HOST": "127.0.0.1",
           "RHEO_LIFECYCLE__HEARTBEAT_INTERVAL_S": "0.2", "RHEO_MODEL__DEVICE": "cpu", "RHEO_MODEL__DTYPE": "float32",
           "RHEO_DIT_STAGE__STAGE_ID": stage_id, "RHEO_DIT_STAGE__LINK_HOST": "127.0.0.1",
           "RHEO_DIT_STAGE__LINK_PORT": "0", "RHEO_DIT_STAGE__ADVERTISE_HOST": "127.0.0.1",
           "RHEO_DIT_STAGE__STATS_INTERVAL_S": "0.5", "RHEO_DIT_STAGE__MAX_QUEUED_CHUNKS": "4",
           "RHEO_DIT_STAGE__TIMED_BLOCK_MS": str(block_ms), "RHEO_DIT_STAGE__SLOWDOWN": str(slowdown)}
    return subprocess.Popen([sys.executable, "-m", "dit_stage.service"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _chunk(stream_id: str, c: int, epoch: int) -> LatentChunk:
    clock = CONFIG.clock()
    g = torch.Generator().manual_seed(c)
    now = time.time()
    return LatentChunk(stream_id=stream_id, seq=c, epoch=epoch, latent_start=clock.latent_start(c),
                       rope_start=clock.rope_start(c), capture_time=now, deadline=now + 10.0, prompt_version=0,
                       noise_scale=CONFIG.noise_scale,
                       timesteps=[CONFIG.first_timestep(CONFIG.noise_scale), *CONFIG.timesteps[1:]],
                       latent=torch.randn(2 if c == 0 else 1, 4, 4, 6, generator=g))


class Stream:
    """One fed stream: when each chunk was sent and when it came out."""

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.fed: dict[int, float] = {}
        self.out: dict[int, float] = {}

    def fps(self, t0: float, t1: float) -> float:
        n = sum(1 for t in self.out.values() if t0 <= t < t1)
        return FRAMES_PER_CHUNK * n / max(t1 - t0, 1e-9)


async def _feed(bus: Bus, stream: Stream, rate: float, epoch) -> None:
    await bus.publish(Subjects.stream_prompt(stream.stream_id), PromptUpdate(
        stream_id=stream.stream_id, version=0, prompt="p", embedding=torch.randn(12, 32)))
    c = 0
    while True:
        await bus.publish(Subjects.stream_latent(stream.stream_id), _chunk(stream.stream_id, c, epoch()))
        stream.fed[c] = time.monotonic()
        c += 1
        await asyncio.sleep(1.0 / rate)


async def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp))
        server.start()
        nats = NatsSettings(url=server.url)
        bus = await Bus.connect(nats, name="bench")
        settings = Settings(nats=nats, telemetry={"metrics_port": 0}, lifecycle={"http_host": "127.0.0.1"},
                            dit_stage={"stats_interval_s": 0.5},
                            controller={"stages": 3, "num_blocks": 12, "rebalance_sustain_s": args.sustain_s,
                                        "rebalance_cooldown_s": 5.0, "heartbeat_miss_s": 3.0,
                                        "startup_grace_s": 300.0})
        ctl = ControllerService(settings, "bench-controller")
        ctl_task = asyncio.create_task(ctl.run())
        procs = [_stage(server.url, s, args.block_ms, args.slowdown if s == "dit-1" else 1.0) for s in IDS]
        tasks: list[asyncio.Task[None]] = []
        ready: set[str] = set()
        streams = {s: Stream(s) for s in ("before", "after")}

        async def on_beat(hb: Heartbeat, _raw) -> None:
            if hb.ready:
                ready.add(hb.member_id)

        async def on_x0(chunk: LatentChunk, _raw) -> None:
            streams[chunk.stream_id].out.setdefault(chunk.seq, time.monotonic())

        try:
            await bus.subscribe(CHANNELS["ctl_heartbeat"].wildcard(), on_beat, expected=Heartbeat)
            for s in streams:
                await bus.subscribe(Subjects.stream_x0(s), on_x0, expected=LatentChunk, credit=True)
            deadline = time.monotonic() + 120
            while not (ready >= set(IDS) and ctl.block_map is not None):
                if time.monotonic() > deadline:
                    raise RuntimeError("stages or controller never became ready")
                await asyncio.sleep(0.1)
            initial = ctl.block_map
            e0 = initial.epoch

            def epoch() -> int:
                return ctl.block_map.epoch if ctl.block_map is not None else 0

            a, b = streams["before"], streams["after"]
            tasks.append(asyncio.create_task(_feed(bus, a, args.chunk_rate, epoch)))
            while not a.out:
                await asyncio.sleep(0.05)
            first_out = min(a.out.values())
            while ctl.block_map.epoch == e0:
                if time.monotonic() - first_out > args.timeout_s:
                    raise RuntimeError("no rebalance within the timeout")
                await asyncio.sleep(0.05)
            switch = time.monotonic()
            await asyncio.sleep(2.0)
            tasks.append(asyncio.create_task(_feed(bus, b, args.chunk_rate, epoch)))
            t_b = time.monotonic()
            while not b.out and time.monotonic() - t_b < 30:
                await asyncio.sleep(0.05)
            b0 = min(b.out.values()) if b.out else time.monotonic()
            await asyncio.sleep(1.0 + args.measure_s)
            a_after = a.fps(switch + 2.0, switch + 2.0 + args.measure_s)
            window = [c for c, t in a.fed.items() if switch - 0.5 <= t <= switch + 2.0]
            return {
                "bench": "rebalance", "mode": "timed", "commit": git_commit(), "block_ms": args.block_ms,
                "slowdown": args.slowdown, "chunk_rate": args.chunk_rate,
                "map_before": [[s.stage_id, s.block_start, s.block_end] for s in initial.stages],
                "map_after": ctl.decisions[-1]["map"] if ctl.decisions else None,
                "predicted_gain": ctl.decisions[-1].get("gain") if ctl.decisions else None,
                "time_to_rebalance_s": round(switch - first_out, 3),
                "fps_before": round(a.fps(first_out + 1.0, switch), 2),
                "fps_after": round(max(a_after, b.fps(b0 + 1.0, b0 + 1.0 + args.measure_s)), 2),
                "first_stream_survived": a_after > 0,
                "frames_dropped": FRAMES_PER_CHUNK * sum(1 for c in window if c not in a.out),
            }
        finally:
            for t in tasks:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            ctl.stop()
            await ctl_task
            await bus.close()
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block-ms", type=float, default=10.0, help="modelled ms per block per micro-step")
    ap.add_argument("--slowdown", type=float, default=2.0, help="time multiplier of the slowed stage dit-1")
    ap.add_argument("--chunk-rate", type=float, default=16.0, help="chunks per second fed (4 frames each)")
    ap.add_argument("--sustain-s", type=float, default=3.0, help="controller.rebalance_sustain_s")
    ap.add_argument("--measure-s", type=float, default=4.0, help="seconds of output measured after the change")
    ap.add_argument("--timeout-s", type=float, default=60.0)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
