"""The decoder and egress as real processes (``python -m decoder.service`` / ``egress.service``): SIGTERM mid-stream
drains (the decoder flushes and sends end_of_stream, the playlist gets EXT-X-ENDLIST) and exits 0, bounded."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import m3u8

from proto import CHANNELS, EncodedVideo, Heartbeat, StreamSpec, Subjects
from services.bus import Bus
from services.config import NatsSettings
from services.streams import StreamNotFound, StreamTable, new_stream_id
from support.videokit import feed_chunks, random_latents

ROOT = Path(__file__).resolve().parents[2]
FPS = 8.0


async def _terminate(proc: subprocess.Popen, what: str) -> None:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = await asyncio.to_thread(proc.wait, 15)
    took = time.monotonic() - started
    assert rc == 0, f"{what} exited {rc}"
    # bounded by the runtime's drain (the bus drain alone may take BUS_DRAIN_S = 4 s) plus a loaded machine's start
    assert took < 10.0, f"{what} took {took:.1f}s to exit after SIGTERM"


async def test_sigterm_mid_stream_drains_and_exits(nats_settings: NatsSettings, bus: Bus, tmp_path: Path) -> None:
    hls_dir = tmp_path / "hls"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "RHEO_NATS__URL": nats_settings.url, "RHEO_TELEMETRY__METRICS_PORT": "0",
           "RHEO_LIFECYCLE__HTTP_HOST": "127.0.0.1", "RHEO_LIFECYCLE__HEARTBEAT_INTERVAL_S": "0.2",
           "RHEO_LIFECYCLE__DRAIN_TIMEOUT_S": "4", "RHEO_EGRESS__HTTP_HOST": "127.0.0.1",
           "RHEO_EGRESS__HTTP_PORT": "0", "RHEO_EGRESS__HLS_DIR": str(hls_dir),
           "RHEO_EGRESS__X264_PRESET": "ultrafast", "RHEO_EGRESS__PART_SECONDS": "0.25"}
    beats: dict[str, Heartbeat] = {}

    async def on_beat(hb: Heartbeat, _raw) -> None:
        beats[hb.member_id] = hb

    await bus.subscribe(CHANNELS["ctl_heartbeat"].wildcard(), on_beat, expected=Heartbeat)
    procs: dict[str, subprocess.Popen] = {}
    logs = {name: tmp_path / f"{name}.log" for name in ("decoder", "egress")}
    feeding: asyncio.Task[None] | None = None
    table = await StreamTable.open(bus)
    sid = new_stream_id()
    try:
        for name in ("decoder", "egress"):
            with logs[name].open("w") as log:
                procs[name] = subprocess.Popen([sys.executable, "-m", f"{name}.service"], env=env, cwd=ROOT,
                                               stdout=log, stderr=subprocess.STDOUT)

        def ready(name: str) -> bool:
            return any(hb.ready and hb.role == name and hb.member_id.endswith(f"-{procs[name].pid}")
                       for hb in beats.values())

        deadline = time.monotonic() + 90
        while not (ready("decoder") and ready("egress")):
            assert time.monotonic() < deadline, "services never became ready"
            for name, p in procs.items():
                assert p.poll() is None, f"{name} exited early: {logs[name].read_text()[-2000:]}"
            await asyncio.sleep(0.1)

        await table.create(StreamSpec(stream_id=sid, width=32, height=32, fps=FPS, steps=1, prompt="p"))
        video: list[EncodedVideo] = []

        async def on_video(msg: EncodedVideo, _raw) -> None:
            video.append(msg)

        await bus.subscribe(Subjects.stream_video(sid), on_video, expected=EncodedVideo)
        feeding = asyncio.create_task(feed_chunks(bus, sid, random_latents(40, 32, 32, seed=5), FPS, end=False))
        deadline = time.monotonic() + 30
        while (record := await table.get(sid)).egress_url == "" or len(video) < 8:  # live and playing
            assert time.monotonic() < deadline, (record, len(video))
            await asyncio.sleep(0.05)
        assert not any(m.end_of_stream for m in video)

        await _terminate(procs["decoder"], "decoder")
        feeding.cancel()
        assert video[-1].end_of_stream  # the drain flushed the stream
        assert [m.seq for m in video] == list(range(len(video)))
        playlist = hls_dir / sid / "playlist.m3u8"
        deadline = time.monotonic() + 10
        while "#EXT-X-ENDLIST" not in (playlist.read_text() if playlist.exists() else ""):
            assert time.monotonic() < deadline, "the egress never ended the playlist"
            await asyncio.sleep(0.05)

        await _terminate(procs["egress"], "egress")
        parsed = m3u8.load(str(playlist))
        assert parsed.is_endlist and parsed.segments
        assert all((hls_dir / sid / seg.uri).is_file() for seg in parsed.segments)
    finally:
        if feeding is not None:
            feeding.cancel()
            with contextlib.suppress(BaseException):
                await feeding
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        with contextlib.suppress(StreamNotFound):  # the stream table is shared by the whole session
            await table.delete(sid)
    for name, path in logs.items():
        assert "Traceback" not in path.read_text(), f"{name}: {path.read_text()[-3000:]}"
