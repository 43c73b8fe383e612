"""Helpers shared by the media tests: barcoded frames, real publisher processes, raw RTMP clients, servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from media import amf0
from media.chunkstream import COMMAND_AMF0, HANDSHAKE_SIZE, encode_message

HERE = Path(__file__).resolve().parent
PUBLISH_SCRIPT = HERE / "publish.py"
LISTEN_SCRIPT = HERE / "listen.py"
BITS = 8


def barcode_frame(index: int, width: int, height: int) -> np.ndarray:
    """RGB frame whose 8 vertical stripes spell ``index % 256`` in binary (survives scaling and x264)."""
    img = np.zeros((height, width, 3), np.uint8)
    for b in range(BITS):
        if (index >> b) & 1:
            img[:, b * width // BITS : (b + 1) * width // BITS] = 255
    return img


def read_barcode(rgb: np.ndarray) -> int:
    h, w = rgb.shape[:2]
    value = 0
    for b in range(BITS):
        x = (2 * b + 1) * w // (2 * BITS)
        if rgb[h // 4 : 3 * h // 4, x].mean() > 128:
            value |= 1 << b
    return value


@dataclass
class PublishResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def report(self) -> dict:
        try:
            return json.loads(self.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {}


async def run_process(*argv: str, timeout: float = 60.0, stdin: bytes | None = None) -> PublishResult:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
    return PublishResult(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))


async def publish_pyav(url: str, frames: int = 45, fps: int = 16, size: str = "320x240", *extra: str) -> PublishResult:
    """Publish barcoded frames with PyAV's flv muxer in a child process (PyAV's RTMP I/O holds the GIL)."""
    return await run_process(
        sys.executable, str(PUBLISH_SCRIPT), url, "--frames", str(frames), "--fps", str(fps), "--size", size, *extra
    )


FFMPEG = shutil.which("ffmpeg")


async def publish_ffmpeg(url: str, frames: int = 45, fps: int = 16, size: str = "320x240",
                         audio: str = "sine=frequency=440:sample_rate=44100") -> PublishResult:
    """Debian's ffmpeg CLI: barcoded raw frames on stdin → libx264 with its defaults (so B-frames and composition
    times) + ``audio`` (a lavfi source) as AAC, to ``url``."""
    assert FFMPEG is not None
    width, height = (int(v) for v in size.split("x"))
    raw = b"".join(barcode_frame(i, width, height).tobytes() for i in range(frames))
    return await run_process(
        FFMPEG, "-hide_banner", "-loglevel", "info", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", size, "-r", str(fps), "-i", "pipe:0",
        "-f", "lavfi", "-i", audio,
        "-shortest", "-c:v", "libx264", "-preset", "veryfast", "-g", str(fps), "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-f", "flv", url,
        stdin=raw,
    )  # fmt: skip


def free_port() -> int:
    """A currently free loopback port (for PyAV's listen mode, which cannot report an ephemeral port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RawRtmp:
    """A hand-driven RTMP client for hostile-input tests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, handshake: bool = True, source: str | None = None) -> RawRtmp:
        """Connect (from loopback address ``source``, e.g. 127.0.0.2: another client address on Linux)."""
        local = (source, 0) if source else None
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local)
        client = cls(reader, writer)
        if handshake:
            writer.write(b"\x03" + os.urandom(HANDSHAKE_SIZE))
            s0s1s2 = await reader.readexactly(1 + 2 * HANDSHAKE_SIZE)
            writer.write(s0s1s2[1 : 1 + HANDSHAKE_SIZE])
        return client

    def command(self, stream_id: int, *values: object) -> None:
        payload = amf0.encode(*values)
        self.writer.write(encode_message(3, COMMAND_AMF0, stream_id, 0, payload, 128))

    def connect_and_publish(self, key: str, app: str = "live") -> None:
        self.command(0, "connect", 1, {"app": app, "tcUrl": f"rtmp://127.0.0.1/{app}"})
        self.command(0, "createStream", 2, None)
        self.command(1, "publish", 3, None, key, "live")

    async def read_until(self, fragment: bytes, timeout: float = 5.0) -> bytes:
        """What the server sent up to and including ``fragment`` (or until it closed / the timeout)."""
        data = bytearray()
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(timeout):
                while fragment not in data and (chunk := await self.reader.read(65536)):
                    data += chunk
        return bytes(data)

    async def read_until_closed(self, timeout: float = 5.0) -> bytes:
        data = bytearray()
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(timeout):
                while chunk := await self.reader.read(65536):
                    data += chunk
        return bytes(data)

    def close(self) -> None:
        self.writer.transport.abort()


async def collect_frames(stream_queue, timeout: float = 30.0) -> AsyncIterator:
    """Every chunk from a stream's queue until it closes."""
    async with asyncio.timeout(timeout):
        while (chunk := await stream_queue.get()) is not None:
            yield chunk


class Collector:
    """Consumes every stream the server starts (as a service would) and keeps its chunks."""

    def __init__(self, consumer_delay_s: float = 0.0) -> None:
        self.consumer_delay_s = consumer_delay_s  # > 0: a slow downstream
        self.chunks: dict[str, list] = {}
        self.audio: dict[str, list] = {}  # stream id → the EncodedAudio batches its passthrough made
        self.streams: dict[str, object] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._started: dict[str, asyncio.Event] = {}

    def on_stream_start(self, stream) -> None:
        self.streams[stream.stream_id] = stream
        self.chunks.setdefault(stream.stream_id, [])
        batches = self.audio.setdefault(stream.stream_id, [])

        async def keep(msg) -> None:
            batches.append(msg)

        stream.audio.sink = keep
        self._tasks[stream.stream_id] = asyncio.create_task(self._consume(stream))
        self._event(stream.stream_id).set()

    def _event(self, stream_id: str) -> asyncio.Event:
        return self._started.setdefault(stream_id, asyncio.Event())

    async def _consume(self, stream) -> None:
        while (chunk := await stream.queue.get()) is not None:
            self.chunks[stream.stream_id].append(chunk)
            if self.consumer_delay_s:
                await asyncio.sleep(self.consumer_delay_s)

    async def finished(self, stream_id: str, timeout: float = 30.0) -> list:
        """The stream's chunks once it has ended (publisher gone and linger elapsed)."""
        async with asyncio.timeout(timeout):
            await self._event(stream_id).wait()
            await self._tasks[stream_id]
        return self.chunks[stream_id]

    def frame_indices(self, stream_id: str) -> list[int]:
        return [read_barcode(f) for c in self.chunks.get(stream_id, []) for f in c.frames]


@contextlib.asynccontextmanager
async def ingest_server(
    keys: dict[str, str] | None = None, width: int = 160, height: int = 120, fps: float = 16, **overrides: object
) -> AsyncIterator[tuple]:
    """A real RtmpServer on an ephemeral loopback port with a Collector attached."""
    from ingest.server import KeyTableAuthoriser, RtmpServer, StreamShape
    from services.config import IngestSettings

    params: dict = {
        "rtmp_host": "127.0.0.1",
        "rtmp_port": 0,
        "stream_linger_s": 0.3,
        "chunk_queue_depth": 256,
        "handshake_timeout_s": 5.0,
        "idle_timeout_s": 5.0,
        # Every test client connects from 127.0.0.1: the per-address caps are raised unless a test is about them.
        "max_preauth_per_ip": 64,
        "max_connections_per_ip": 256,
    }
    params.update(overrides)
    collector = Collector(float(params.pop("consumer_delay_s", 0.0)))
    server = RtmpServer(
        IngestSettings(**params),
        KeyTableAuthoriser(keys or {"key-a": "stream-a"}),
        StreamShape(width, height, fps),
        latency_budget_s=1.0,
        on_stream_start=collector.on_stream_start,
    )
    await server.start()
    try:
        yield server, collector
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def serve_app(app) -> AsyncIterator[int]:
    """Run a FastAPI app with uvicorn on an ephemeral loopback port; yields the port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            await asyncio.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


class LiveSource:
    """A stand-in for the decoder process: chunks of 4 frames every 4/fps s (with optional outages) pushed
    into the CFR pacer, encoded in real time, and handed to ``sink`` (a packager's push, an RTMP push)."""

    def __init__(
        self,
        sink,
        width: int = 160,
        height: int = 120,
        fps: int = 16,
        segment_s: float = 1.0,
        part_s: float = 0.2,
        preset: str = "ultrafast",
    ) -> None:
        from media.h264 import CfrPacer, H264Encoder, PartLayout

        self.layout = PartLayout.for_rate(fps, segment_s, part_s)
        self.encoder = H264Encoder(width, height, fps, self.layout.gop_frames, preset, 400)
        self.pacer = CfrPacer(fps, start_delay_s=0.05)
        self.sink, self.width, self.height, self.fps = sink, width, height, fps
        self.frames_pushed = 0

    async def run(self, seconds: float, outages: tuple[tuple[float, float], ...] = ()) -> None:
        """Push chunk k at t0 + 4k/fps (skipping those inside an outage), encode until ``seconds`` have passed."""
        import time as _time

        from media.h264 import run_cfr

        stop = asyncio.Event()
        encoder_task = asyncio.create_task(run_cfr(self.pacer, self.encoder, self.sink, stop))
        t0, chunk, k = _time.time(), 4, 0
        try:
            while (at := k * chunk / self.fps) < seconds:
                await asyncio.sleep(max(0.0, t0 + at - _time.time()))
                if not any(a <= at < b for a, b in outages):
                    frames = [barcode_frame(self.frames_pushed + i, self.width, self.height) for i in range(chunk)]
                    self.frames_pushed += chunk
                    self.pacer.push(frames, _time.time())
                k += 1
            await asyncio.sleep(max(0.0, t0 + seconds - _time.time()))
        finally:
            stop.set()
            await encoder_task
