"""What the whole-stack fault tests read and do: streams through the API, publishers, the debug taps, metrics."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from proto import BlockMap, Buckets
from services.bus import Bus
from services.stack import LocalStack

ROOT = Path(__file__).resolve().parents[2]


def wait(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.1) -> float:
    """Poll until ``predicate()``; returns the seconds it took."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(poll)
    return time.monotonic() - t0


def create_stream(stack: LocalStack, size: int, fps: int, steps: int, prompt: str, seed: int,
                  slo_ms: float = 120000) -> dict:
    return stack.api("POST", "/v1/streams", {"prompt": prompt, "width": size, "height": size, "fps": fps,
                                             "steps": steps, "seed": seed, "slo_latency_ms": slo_ms})


def publisher(stack: LocalStack, key: str, fps: int, seconds: float, reconnect: bool = False) -> subprocess.Popen:
    """The test pattern published in real time (``reconnect``: it connects again after a lost connection, as OBS)."""
    url = f"rtmp://127.0.0.1:{stack.ports.rtmp}/live/{key}"
    return subprocess.Popen([sys.executable, "-m", "ingest.testpattern", url, "--size", "96x64", "--fps", str(fps),
                             "--seconds", str(seconds), *(["--reconnect"] if reconnect else [])], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def decoded(stack: LocalStack, sid: str) -> list[int]:
    """Seqs of the chunks the decoder decoded (its debug tap), in order."""
    names = (p.name for p in (stack.workdir / "tap-out" / sid).glob("*.npy"))
    return sorted(int(n[:-4]) for n in names if n[:-4].isdigit())  # not the writer's temporary files


def encoded(stack: LocalStack, sid: str) -> list[int]:
    """Seqs of the chunks ingest encoded (its debug tap), in order."""
    return sorted(int(p.stem.removeprefix("chunk_")) for p in (stack.workdir / "tap-in" / sid).glob("chunk_*.npy")
                  if p.stem.removeprefix("chunk_").isdigit())


def encoded_at(stack: LocalStack, sid: str, seq: int) -> float:
    return (stack.workdir / "tap-in" / sid / f"chunk_{seq:06d}.npy").stat().st_mtime


def shown_at(stack: LocalStack, sid: str, seq: int) -> float:
    return (stack.workdir / "tap-out" / sid / f"{seq}.npy").stat().st_mtime


def metric(stack: LocalStack, proc: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples (with these labels) on one service's /metrics."""
    port = next(p.health_port for p in stack.procs if p.name == proc)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def current_map(stack: LocalStack) -> BlockMap:
    """The block map the controller keeps in KV."""
    async def read() -> BlockMap:
        assert stack.nats is not None
        bus = await Bus.connect(stack.nats_settings("ingest"), name="test-reader")  # a reader of the map
        try:
            current = await (await bus.kv(Buckets.BLOCKMAP)).get_message("current", BlockMap)
            assert current is not None
            return current
        finally:
            await bus.close()

    return asyncio.run(read())
