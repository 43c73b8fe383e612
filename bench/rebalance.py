"""Online rebalancing benchmark in the timed stand-in mode: one JSON line per run.

A private nats-server, the controller (adaptive), three ``dit-stage`` processes in timed mode (tiny model, each
micro-step sleeps to ``--block-ms`` per block; ``dit-1`` slowed by ``--slowdown``) and one stream fed at
``--chunk-rate`` chunks/s, above what the ring can do, so it runs saturated from a backlog. Deadlines are far and the
stages' queue cap is high (``--max-queued-chunks``): overload does not drop, so every missing chunk is one the
change lost. The map starts even; the controller sees the slow stage in its StageStats and moves blocks (KV shards
migrate, docs/rebalance.md). Feeding stops ``--measure-s`` after every stage runs the new map; the backlog drains.

* ``time_to_rebalance_s``: the stream's first finished chunk → the controller's ``rebalance`` epoch;
* ``time_to_switched_s``: the same → every stage has run a micro-step under it (after the items queued at the slow
  stage under the old map: the switch marker follows them);
* ``fps_before`` / ``fps_after``: output frames/s (4 per chunk) of the saturated ring before the epoch, and after
  every stage switched;
* ``frames_dropped``: frames of fed chunks that never came out (after the backlog drained).

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

from proto import CHANNELS, Heartbeat, LatentChunk, PromptUpdate, StageStats, Subjects  # noqa: E402
from proto.clock import ChunkClock  # noqa: E402
from proto.spec import chunk_timesteps  # noqa: E402
from services.bus import Bus  # noqa: E402
from services.config import NatsSettings, Settings  # noqa: E402
from services.controller.service import ControllerService  # noqa: E402
from services.natsd import NatsServer  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from common import git_commit  # noqa: E402

IDS = ["dit-0", "dit-1", "dit-2"]
FRAMES_PER_CHUNK = 4
STEPS, NOISE_SCALE = 2, 0.7


def _stage(url: str, stage_id: str, block_ms: float, slowdown: float, max_queued: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RHEO_NATS__URL": url,
           "RHEO_TELEMETRY__METRICS_PORT": "0", "RHEO_LIFECYCLE__HTTP_HOST": "127.0.0.1",
           "RHEO_LIFECYCLE__HEARTBEAT_INTERVAL_S": "0.2", "RHEO_MODEL__DEVICE": "cpu", "RHEO_MODEL__DTYPE": "float32",
           "RHEO_DIT_STAGE__STAGE_ID": stage_id, "RHEO_DIT_STAGE__LINK_HOST": "127.0.0.1",
           "RHEO_DIT_STAGE__LINK_PORT": "0", "RHEO_DIT_STAGE__ADVERTISE_HOST": "127.0.0.1",
           "RHEO_DIT_STAGE__STATS_INTERVAL_S": "0.5", "RHEO_DIT_STAGE__MAX_QUEUED_CHUNKS": str(max_queued),
           "RHEO_DIT_STAGE__TIMED_BLOCK_MS": str(block_ms), "RHEO_DIT_STAGE__SLOWDOWN": str(slowdown)}
    return subprocess.Popen([sys.executable, "-m", "dit_stage.service"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _chunk(stream_id: str, c: int, epoch: int, deadline_s: float) -> LatentChunk:
    clock = ChunkClock.v2v()
    g = torch.Generator().manual_seed(c)
    now = time.time()
    return LatentChunk(stream_id=stream_id, seed=0, fps=16.0, seq=c, epoch=epoch, latent_start=clock.latent_start(c),
                       rope_start=clock.rope_start(c), capture_time=now, deadline=now + deadline_s, prompt_version=0,
                       noise_scale=NOISE_SCALE,
                       timesteps=chunk_timesteps(STEPS, NOISE_SCALE),
                       latent=torch.randn(2 if c == 0 else 1, 4, 4, 6, generator=g))


class Stream:
    """One fed stream: when each chunk was sent and when it came out."""

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.fed: dict[int, float] = {}
        self.out: dict[int, float] = {}

    def fps(self, t0: float, t1: float) -> float:
        """Frames/s between the first and the last output inside [t0, t1)."""
        inside = sorted(t for t in self.out.values() if t0 <= t < t1)
        if len(inside) < 2:
            return 0.0
        return FRAMES_PER_CHUNK * (len(inside) - 1) / (inside[-1] - inside[0])


async def _feed(bus: Bus, stream: Stream, rate: float, epoch, deadline_s: float) -> None:
    await bus.publish(Subjects.stream_prompt(stream.stream_id), PromptUpdate(
        stream_id=stream.stream_id, version=0, prompt="p", embedding=torch.randn(12, 32)))
    c = 0
    while True:
        await bus.publish(Subjects.stream_latent(stream.stream_id), _chunk(stream.stream_id, c, epoch(), deadline_s))
        stream.fed[c] = time.monotonic()
        c += 1
        await asyncio.sleep(1.0 / rate)


async def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp), anonymous=True)
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
        procs = [_stage(server.url, s, args.block_ms, args.slowdown if s == "dit-1" else 1.0, args.max_queued_chunks)
                 for s in IDS]
        tasks: list[asyncio.Task[None]] = []
        ready: set[str] = set()
        busy: dict[int, set[str]] = {}
        switched_at: dict[int, float] = {}
        stream = Stream("rebalance")

        async def on_beat(hb: Heartbeat, _raw) -> None:
            if hb.ready:
                ready.add(hb.member_id)

        async def on_stats(st: StageStats, _raw) -> None:
            if st.micro_steps:
                busy.setdefault(st.epoch, set()).add(st.stage_id)
                if busy[st.epoch] >= set(IDS):
                    switched_at.setdefault(st.epoch, time.monotonic())

        async def on_x0(chunk: LatentChunk, _raw) -> None:
            stream.out.setdefault(chunk.seq, time.monotonic())

        async def until(cond, timeout: float, what: str) -> None:
            deadline = time.monotonic() + timeout
            while not cond():
                if time.monotonic() > deadline:
                    raise RuntimeError(what)
                await asyncio.sleep(0.05)

        try:
            await bus.subscribe(CHANNELS["ctl_heartbeat"].wildcard(), on_beat, expected=Heartbeat)
            await bus.subscribe(CHANNELS["ctl_stats"].wildcard(), on_stats, expected=StageStats)
            await bus.subscribe(Subjects.stream_x0(stream.stream_id), on_x0, expected=LatentChunk, credit=True)
            await until(lambda: ready >= set(IDS) and ctl.block_map is not None, 120,
                        "stages or controller never became ready")
            initial = ctl.block_map
            e0 = initial.epoch

            def epoch() -> int:
                return ctl.block_map.epoch if ctl.block_map is not None else 0

            feeder = asyncio.create_task(_feed(bus, stream, args.chunk_rate, epoch, args.deadline_s))
            tasks.append(feeder)
            await until(lambda: stream.out, args.timeout_s, "no output")
            first_out = min(stream.out.values())
            await until(lambda: ctl.block_map.epoch != e0, args.timeout_s, "no rebalance within the timeout")
            switch = time.monotonic()
            await until(lambda: e0 + 1 in switched_at, args.timeout_s, "the stages never ran the new map")
            moved = switched_at[e0 + 1]
            await asyncio.sleep(max(0.0, moved + 0.5 + args.measure_s - time.monotonic()))
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
            await until(lambda: set(stream.fed) <= set(stream.out), args.timeout_s, "backlog did not drain")
            return {
                "bench": "rebalance", "mode": "timed", "commit": git_commit(), "block_ms": args.block_ms,
                "slowdown": args.slowdown, "chunk_rate": args.chunk_rate,
                "map_before": [[s.stage_id, s.block_start, s.block_end] for s in initial.stages],
                "map_after": ctl.decisions[-1]["map"] if ctl.decisions else None,
                "predicted_gain": ctl.decisions[-1].get("gain") if ctl.decisions else None,
                "time_to_rebalance_s": round(switch - first_out, 3),
                "time_to_switched_s": round(moved - first_out, 3),
                "fps_before": round(stream.fps(first_out + 1.0, switch), 2),
                "fps_after": round(stream.fps(moved + 0.5, moved + 0.5 + args.measure_s), 2),
                "chunks_fed": len(stream.fed),
                "frames_dropped": FRAMES_PER_CHUNK * len(set(stream.fed) - set(stream.out)),
            }
        except RuntimeError as e:
            missing = sorted(set(stream.fed) - set(stream.out))
            raise RuntimeError(f"{e}: fed {len(stream.fed)}, out {len(stream.out)}, missing {missing[:20]}") from e
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
    ap.add_argument("--measure-s", type=float, default=4.0,
                    help="seconds of saturated output measured after every stage switched")
    ap.add_argument("--max-queued-chunks", type=int, default=1024, help="dit_stage.max_queued_chunks")
    ap.add_argument("--deadline-s", type=float, default=600.0, help="chunk deadline after it is fed")
    ap.add_argument("--timeout-s", type=float, default=60.0)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
