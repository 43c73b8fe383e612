"""NATS hop costs on loopback: one-way latency of latent-sized and hidden-state-sized payloads, bulk throughput.

Prints one JSON line per case. Starts a private nats-server unless ``--url`` names one.
Target (design): 0.2 MB one-way p50 <= 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import torch
from common import git_commit, percentile

from proto import LatentChunk, Subjects
from services.bus import Bus
from services.config import NatsSettings
from services.natsd import NatsServer

SENT_AT = "Rheo-Bench-Sent"


def _payload(nbytes: int) -> LatentChunk:
    n = nbytes // 2
    return LatentChunk(stream_id="bench", seed=0, fps=16.0, seq=0, epoch=0, latent_start=0, rope_start=0,
                       capture_time=0.0,
                       deadline=0.0, prompt_version=0, noise_scale=0.8, timesteps=[700],
                       latent=torch.zeros(n, dtype=torch.bfloat16))



async def one_way(url: str, nbytes: int, count: int, rate_hz: float, raw_nats: bool = False) -> dict:
    """Paced one-way latency; ``raw_nats`` measures nats-py alone (no decode, spans or checks) as a baseline."""
    pub = await Bus.connect(NatsSettings(url=url), name="bench-pub")
    sub = await Bus.connect(NatsSettings(url=url), name="bench-sub")
    lat_ms: list[float] = []
    done = asyncio.Event()

    def record(headers: dict[str, str]) -> None:
        lat_ms.append((time.perf_counter_ns() - int(headers[SENT_AT])) / 1e6)
        if len(lat_ms) >= count:
            done.set()

    async def on_msg(_msg: LatentChunk, raw) -> None:
        record(raw.headers)

    async def on_raw(raw) -> None:
        record(raw.headers)

    subject = Subjects.stream_latent("bench")
    if raw_nats:
        await sub.nc.subscribe(subject, cb=on_raw)
    else:
        await sub.subscribe(subject, on_msg, expected=LatentChunk)
    await sub.nc.flush()
    data = _payload(nbytes).encode()
    warm = max(3, count // 10)
    for i in range(count + warm):
        if i == warm:
            lat_ms.clear()
        headers = {SENT_AT: str(time.perf_counter_ns())}
        if raw_nats:
            await pub.nc.publish(subject, data, headers=headers)
        else:
            await pub.publish(subject, data, headers=headers)
        await asyncio.sleep(1 / rate_hz)
    await asyncio.wait_for(done.wait(), 30)
    await pub.close()
    await sub.close()
    return {"bench": "bus", "case": "one_way_nats_py" if raw_nats else "one_way", "payload_bytes": len(data),
            "count": len(lat_ms), "rate_hz": rate_hz, "p50_ms": round(statistics.median(lat_ms), 3),
            "p99_ms": round(percentile(lat_ms, 99), 3), "max_ms": round(max(lat_ms), 3)}


async def throughput(url: str, nbytes: int, seconds: float, window_bytes: int) -> dict:
    pub = await Bus.connect(NatsSettings(url=url), name="bench-pub")
    sub = await Bus.connect(NatsSettings(url=url), name="bench-sub")
    got = 0

    async def on_msg(_msg: LatentChunk, _raw) -> None:
        nonlocal got
        got += 1

    subject = Subjects.stream_x0("bench")
    await sub.subscribe(subject, on_msg, expected=LatentChunk, credit=True)
    await sub.nc.flush()
    window = await pub.credit_window(subject, window_bytes).start()
    data = _payload(nbytes).encode()
    t0 = time.perf_counter()
    sent = 0
    while time.perf_counter() - t0 < seconds:
        await window.publish(data)
        sent += 1
    while got < sent and time.perf_counter() - t0 < seconds + 10:
        await asyncio.sleep(0.001)
    dt = time.perf_counter() - t0
    await window.close()
    await pub.close()
    await sub.close()
    return {"bench": "bus", "case": "credit_window_throughput", "payload_bytes": len(data),
            "window_bytes": window_bytes, "msgs_per_s": round(got / dt, 1),
            "mb_per_s": round(got * len(data) / dt / 1e6, 1)}



async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", help="an existing NATS server (default: start a private one)")
    ap.add_argument("--quick", action="store_true", help="fewer messages (smoke run)")
    args = ap.parse_args()
    server = None if args.url else NatsServer(anonymous=True).start()  # a private benchmark server
    url = args.url or server.url
    n = 50 if args.quick else 500
    try:
        cases = [
            await one_way(url, 200 * 1024, n, 100.0, raw_nats=True),
            await one_way(url, 200 * 1024, n, 100.0),
            await one_way(url, int(4.8 * 1024 * 1024), max(20, n // 5), 20.0),
            await throughput(url, 200 * 1024, 1.0 if args.quick else 3.0, 32 * 1024 * 1024),
        ]
    finally:
        if server:
            server.stop()
    for c in cases:
        c["commit"] = git_commit()
        print(json.dumps(c), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
