"""What the whole-stack fault tests read and do: streams through the API, publishers, the debug taps, metrics."""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from proto import CHANNELS, DEFAULT_RING, BlockMap, Buckets, blockmap_key
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


def stored_map(stack: LocalStack) -> BlockMap | None:
    """The block map the controller keeps in KV (None: not there)."""
    async def read() -> BlockMap | None:
        assert stack.nats is not None
        bus = await Bus.connect(stack.nats_settings("ingest"), name="test-reader")  # a reader of the map
        try:
            return await (await bus.kv(Buckets.BLOCKMAP)).get_message(blockmap_key("0"), BlockMap)
        finally:
            await bus.close()

    return asyncio.run(read())


def current_map(stack: LocalStack) -> BlockMap:
    """The block map the controller keeps in KV, which must be there."""
    current = stored_map(stack)
    assert current is not None
    return current


FLOOD_CHANNELS = ("stream_latent", "stream_prompt", "stream_event", "ctl_heartbeat")
"""What ``flood`` sends on: what the flooding identity (ingest's) may publish — the first stage's data plane, every
stage's prompts, every service's stream events and the controller's heartbeats. The server refuses it the rest."""
FLOOD_FRAME = b"RH\x01\x00\xff\xff\xff\x7fnot a message, a flood"


async def flood_connection(stack: LocalStack) -> Bus:
    """The flooding client's connection: the one place that says who floods. With bus authorization it is an
    identity allowed to publish on ``FLOOD_CHANNELS`` (ingest's: a compromised or buggy service)."""
    return await Bus.connect(stack.nats_settings("ingest"), name="flood")


def flood(stack: LocalStack, n: int) -> collections.Counter[str]:
    """``n`` malformed frames at full speed, round robin over ``FLOOD_CHANNELS``, each on an id of its own (a new
    subject per message); returns how many went to each channel.

    Sent from a child process at low CPU priority: a real attacker's CPU is not the stack's, and on this one 2-core
    machine the publishing loop would otherwise take a core from the services it floods (what they must do with
    every message they receive, they still do)."""
    ctx = multiprocessing.get_context("fork")  # the child has the stack object as it is
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_flood_child, args=(stack, n, send), name="flood")
    child.start()
    send.close()
    try:
        return receive.recv()
    finally:
        child.join(60)


def _flood_child(stack: LocalStack, n: int, out: Connection) -> None:
    os.nice(10)

    async def run() -> collections.Counter[str]:
        bus = await flood_connection(stack)
        sent: collections.Counter[str] = collections.Counter()
        try:
            for i in range(n):
                name = FLOOD_CHANNELS[i % len(FLOOD_CHANNELS)]
                channel = CHANNELS[name]
                # a new stream per message, into the stack's one ring (ring 0: its first stage hears it)
                params = {p: {"role": "ingest", "ring_id": DEFAULT_RING}.get(p, f"flood{i}") for p in channel.params}
                await bus.nc.publish(channel.subject(**params), FLOOD_FRAME)
                sent[name] += 1
            await bus.nc.flush(timeout=120)
        finally:
            await bus.close()
        return sent

    out.send(asyncio.run(run()))


def metric_lines(stack: LocalStack, proc: str) -> int:
    """How many samples one service's /metrics holds (its series, counting each counter's ``_created``)."""
    port = next(p.health_port for p in stack.procs if p.name == proc)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return sum(1 for line in r.read().decode().splitlines() if line and not line.startswith("#"))
