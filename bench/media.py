"""Media edge benchmarks; one JSON line per result.

* ``ingest_demux_decode``: RTMP chunk-stream demux + FLV parse + H.264 decode of an 832×480 ~2.6 Mbit/s stream
  per core (process CPU time; the decoder runs one thread), and the same plus pacing to 16 fps and shaping to
  512×512 RGB (``ingest_full``; fps counts input frames).
* ``egress_encode``: libx264 frames per second at 832×480, one thread, RGB in (presets veryfast/ultrafast).
* ``llhls_latency``: ``hls.latency`` reported by hls.js in Chromium playing our live LL-HLS stream (target ≤ 1.2 s).

Run: ``.venv/bin/python bench/media.py [--seconds 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from egress.rtmp_push import FlvTagMuxer  # noqa: E402
from ingest.pacing import FramePacer  # noqa: E402
from media.chunkstream import (  # noqa: E402
    SET_CHUNK_SIZE,
    VIDEO,
    ChunkStreamParser,
    control_message,
    encode_message,
)
from media.flv import AvcDecoder, TagKind, parse_video_tag  # noqa: E402
from media.frames import shape_frame  # noqa: E402
from media.h264 import H264Encoder, PartLayout  # noqa: E402

W, H, FPS = 832, 480, 30


def emit(name: str, **fields: object) -> None:
    print(json.dumps({"bench": f"media.{name}", **fields}), flush=True)


def moving_frames(n: int, width: int, height: int) -> list[np.ndarray]:
    """A gradient under a panning texture plus a moving box: bitrate and motion like a camera stream."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))], -1).astype(np.uint8)
    texture = np.random.default_rng(0).integers(0, 64, (height, width + 4 * n, 1), dtype=np.uint8)
    out = []
    for i in range(n):
        f = base + texture[:, 4 * i : 4 * i + width]  # panning texture: real motion estimation work
        x0 = (i * 7) % (width - 120)
        f[100:220, x0 : x0 + 120] = (255 - i % 255, i % 255, 128)
        out.append(f)
    return out


def rtmp_bytes(frames: list[np.ndarray]) -> bytes:
    """The chunk stream a publisher would send: Set Chunk Size 4096, then FLV video tags as RTMP messages."""
    layout = PartLayout.for_rate(FPS, 2.0, 0.2)
    enc = H264Encoder(W, H, FPS, layout.gop_frames, "veryfast", 2500)
    muxer = FlvTagMuxer(enc.config, silent_audio=False)
    tags = []
    for i, frame in enumerate(frames):
        for unit in enc.encode(frame, i):
            tags += muxer.push(unit)
    for unit in enc.flush():
        tags += muxer.push(unit)
    tags += muxer.close()
    body = b"".join(encode_message(6, t.type_id, 1, t.timestamp, t.data, 4096) for t in tags if t.type_id == VIDEO)
    return control_message(SET_CHUNK_SIZE, 4096) + body


def bench_ingest(n: int) -> None:
    data = rtmp_bytes(moving_frames(n, W, H))
    for shaped in (False, True):
        parser, decoder, pacer = ChunkStreamParser(), AvcDecoder(1920, 1080), FramePacer(16)
        frames = 0
        t0 = time.process_time()
        for off in range(0, len(data), 65536):
            for msg in parser.feed(data[off : off + 65536]):
                if msg.type_id != VIDEO:
                    continue
                tag = parse_video_tag(msg.payload)
                if tag.kind is TagKind.CONFIG:
                    decoder.configure(tag.data)
                elif tag.kind is TagKind.FRAME:
                    for frame in decoder.decode(tag, msg.timestamp):
                        frames += 1
                        if shaped and pacer.place(float(frame.pts * frame.time_base), 0.0).keep:
                            shape_frame(frame, 512, 512)
        cpu = time.process_time() - t0
        emit(
            "ingest_full" if shaped else "ingest_demux_decode",
            width=W,
            height=H,
            frames=frames,
            mbit=round(len(data) * 8 / 1e6, 2),
            cpu_s=round(cpu, 3),
            fps_per_core=round(frames / cpu, 1),
            note="+ pace to 16 fps + shape to 512x512 RGB" if shaped else "chunk demux + FLV parse + h264 decode",
        )


def bench_encode(n: int) -> None:
    frames = moving_frames(n, W, H)
    for preset in ("veryfast", "ultrafast"):
        enc = H264Encoder(W, H, 16, 15, preset, 2500, threads=1)
        t0 = time.perf_counter()
        c0 = time.process_time()
        for i, f in enumerate(frames):
            enc.encode(f, i)
        enc.flush()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        emit("egress_encode", width=W, height=H, preset=preset, threads=1, frames=n, fps=round(n / wall, 1),
             fps_per_core=round(n / cpu, 1))  # fmt: skip


async def bench_latency(seconds: float) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    from media.player import HLSJS_DEFAULT

    if chromium is None or not HLSJS_DEFAULT.is_file():
        emit("llhls_latency", skipped="chromium or hls.js (scripts/fetch-hlsjs.sh) missing")
        return
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        emit("llhls_latency", skipped="playwright (PyPI) not installed")
        return
    from fastapi import FastAPI
    from media_io.mediakit import LiveSource, serve_app

    from egress.http import make_hls_router
    from media.llhls import HlsRegistry
    from media.player import make_player_router
    from services.playback_tokens import PlaybackKeys

    keys = PlaybackKeys.of([secrets.token_urlsafe(32)])
    with tempfile.TemporaryDirectory() as tmp:
        registry = HlsRegistry(Path(tmp))
        app = FastAPI()
        app.include_router(make_hls_router(registry, keys))
        app.include_router(make_player_router())
        holder: dict = {}
        source = LiveSource(lambda u: holder["s"].push(u), width=W, height=H, fps=16, preset="veryfast")
        holder["s"] = registry.open("bench", source.encoder.config, source.layout)
        async with serve_app(app) as port:
            live = asyncio.create_task(source.run(seconds + 8))
            try:
                async with async_playwright() as pw:
                    browser = await pw.chromium.launch(
                        executable_path=chromium,
                        headless=True,
                        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                              "--disable-component-update", "--autoplay-policy=no-user-gesture-required"],
                    )  # fmt: skip
                    page = await browser.new_page()
                    src = f"{keys.path('bench', 600)}/index.m3u8"
                    await page.goto(f"http://127.0.0.1:{port}/player/index.html?src={src}")
                    await page.wait_for_function(
                        "() => { const v = document.getElementById('v'); return v.readyState >= 3 && !v.paused }",
                        timeout=20000,
                    )
                    await asyncio.sleep(2.0)  # let hls.js settle onto its live-sync target
                    samples = []
                    t0 = await page.evaluate("document.getElementById('v').currentTime")
                    w0 = time.monotonic()
                    while time.monotonic() - w0 < seconds:
                        samples.append(await page.evaluate("window.hls.latency"))
                        await asyncio.sleep(0.5)
                    advanced = await page.evaluate("document.getElementById('v').currentTime") - t0
                    wall = time.monotonic() - w0
                    errors = await page.evaluate("window.report.errors")
                    await browser.close()
            finally:
                live.cancel()
    emit(
        "llhls_latency",
        width=W,
        height=H,
        fps=16,
        part_s=round(source.layout.part_seconds, 4),
        latency_s_mean=round(float(np.mean(samples)), 3),
        latency_s_max=round(float(np.max(samples)), 3),
        target_s=1.2,
        playback_rate=round(advanced / wall, 3),
        errors=len(errors),
        chromium=chromium,
        note="playlist latency (hls.latency): live edge to playhead; capture→encode not included",
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--skip-browser", action="store_true")
    args = ap.parse_args()
    emit("env", pyav=av.__version__, ffmpeg=av.library_versions.get("libavcodec"), cpus=_cpus())
    bench_ingest(args.frames)
    bench_encode(args.frames // 2)
    if not args.skip_browser:
        asyncio.run(bench_latency(args.seconds))


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
