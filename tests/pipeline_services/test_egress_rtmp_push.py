"""The egress service restreams each stream to its own RTMP URL (``egress.rtmp_push_url`` with ``{stream_id}``),
received by our real RTMP server over loopback and decoded there."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
from media_io.mediakit import ingest_server

from egress.service import EgressService
from media.h264 import H264Encoder, PartLayout
from proto import EncodedVideo, Subjects
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.streams import new_stream_id

FPS = 16.0


async def test_each_stream_is_pushed_to_its_templated_url(nats_settings: NatsSettings, bus: Bus,
                                                          tmp_path: Path) -> None:
    sid = new_stream_id()
    async with ingest_server({sid: "pushed"}, width=64, height=48, fps=FPS) as (server, collector):
        settings = Settings(
            nats=nats_settings, telemetry={"metrics_port": 0}, lifecycle={"http_host": "127.0.0.1"},
            egress={"hls_dir": tmp_path / "hls", "http_host": "127.0.0.1", "http_port": 0,
                    "rtmp_push_url": f"rtmp://127.0.0.1:{server.port}/live/{{stream_id}}",
                    "rtmp_push_backoff_s": 0.1},
        )
        egress = EgressService(settings, member_id="egress-push-test")
        task = asyncio.create_task(egress.run())
        try:
            deadline = time.monotonic() + 30
            while not egress.ready:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.05)
            layout = PartLayout.from_settings(FPS, settings.egress)
            enc = H264Encoder(64, 48, FPS, layout.gop_frames, "ultrafast")
            cfg = enc.config
            frames = 48
            for i in range(frames):  # real time, as the decoder sends it
                units = enc.encode(np.full((48, 64, 3), (5 * i) % 256, np.uint8), i, time.time())
                if i == frames - 1:
                    units += enc.flush()
                await bus.publish(Subjects.stream_video(sid), EncodedVideo(
                    stream_id=sid, seq=i, width=64, height=48, fps=FPS, extradata=cfg.extradata, units=units,
                    end_of_stream=i == frames - 1))
                await asyncio.sleep(1 / FPS)
            await asyncio.wait_for(collector.finished("pushed"), 15)
            out = egress.outputs[sid]
            assert out.hls.ended and out.push is not None
            assert out.push.stats.connects == 1 and out.push.stats.tags_dropped == 0
            received = collector.streams["pushed"]
            assert received.stats.decode_errors == 0
            assert received.stats.frames_decoded >= frames - 8  # the tail past the last whole chunk may be cut
            assert received.stats.audio_messages > 0  # the silent AAC track YouTube/Twitch want
        finally:
            egress.stop()
            assert await asyncio.wait_for(task, 15) == 0
