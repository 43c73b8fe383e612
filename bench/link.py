"""Tensor-link hop cost on loopback: one-way latency and throughput of hidden-state-sized frames.

Prints one JSON line per case and path: 0.2, 3, 4.8 and 16 MB frames, then throughput; each over TCP and over the
same-host shared-memory path (``--path``; services/link_shm.py).
Target (design): 4.8 MB one-way p50 <= 5 ms (NATS: ~15 ms, see bench/bus.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import torch
from common import git_commit, percentile

from proto import PromptUpdate
from services.link import LinkListener, LinkSender

SENT_AT = "t"


def _frame(nbytes: int) -> PromptUpdate:
    return PromptUpdate(stream_id="bench", version=0, prompt="",
                        embedding=torch.zeros(nbytes // 2, dtype=torch.bfloat16))



async def one_way(nbytes: int, count: int, rate_hz: float, shm: bool) -> dict:
    listener = LinkListener(shared_memory=shm).start()
    sender = LinkSender(listener.endpoint).start()
    msg = _frame(nbytes)
    lat: list[float] = []

    async def consume() -> None:
        while len(lat) < count:
            with await listener.recv(timeout=10) as f:
                lat.append((time.perf_counter_ns() - int(f.headers[SENT_AT])) / 1e6)

    warm = max(3, count // 10)
    for _ in range(warm):
        await sender.send(msg, headers={SENT_AT: str(time.perf_counter_ns())})
        (await listener.recv(timeout=10)).release()
    consumer = asyncio.create_task(consume())
    for _ in range(count):
        await sender.send(msg, headers={SENT_AT: str(time.perf_counter_ns())})
        await asyncio.sleep(1 / rate_hz)
    await asyncio.wait_for(consumer, 30)
    sender.close()
    listener.close()
    return {"bench": "link", "case": "one_way", "path": sender.path, "payload_bytes": nbytes, "count": count,
            "rate_hz": rate_hz,
            "p50_ms": round(statistics.median(lat), 3), "p99_ms": round(percentile(lat, 99), 3),
            "max_ms": round(max(lat), 3)}


async def throughput(nbytes: int, seconds: float, shm: bool) -> dict:
    listener = LinkListener(shared_memory=shm).start()
    sender = LinkSender(listener.endpoint).start()
    msg = _frame(nbytes)
    got = 0
    stop = False

    async def consume() -> None:
        nonlocal got
        while not stop:
            try:
                (await listener.recv(timeout=0.5)).release()
                got += 1
            except TimeoutError:
                continue

    consumer = asyncio.create_task(consume())
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        await sender.send(msg)
    await sender.flush()
    dt = time.perf_counter() - t0
    stop = True
    await consumer
    sender.close()
    listener.close()
    return {"bench": "link", "case": "throughput", "path": sender.path, "payload_bytes": nbytes,
            "frames_per_s": round(got / dt, 1),
            "mb_per_s": round(got * nbytes / dt / 1e6, 1)}



async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer frames (smoke run)")
    ap.add_argument("--path", choices=["tcp", "shm", "both"], default="both", help="link path(s) to measure")
    args = ap.parse_args()
    n = 30 if args.quick else 200
    cases = []
    for shm in {"tcp": [False], "shm": [True], "both": [False, True]}[args.path]:
        cases += [
            await one_way(200 * 1024, n, 100.0, shm),
            await one_way(3 * 1024 * 1024, n, 20.0, shm),
            await one_way(int(4.8 * 1024 * 1024), n, 20.0, shm),
            await one_way(16 * 1024 * 1024, max(10, n // 4), 10.0, shm),
            await throughput(int(4.8 * 1024 * 1024), 1.0 if args.quick else 3.0, shm),
        ]
    for c in cases:
        c["commit"] = git_commit()
        print(json.dumps(c), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
