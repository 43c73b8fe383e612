"""The egress service restreams each stream to its own RTMP URL (``egress.rtmp_push_url`` with ``{stream_id}``),
received by our real RTMP server over loopback and decoded there."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from media_io.audiokit import RATE, TONE_HZ, aac_tone, decode_audio, dominant_hz
from media_io.mediakit import free_port, ingest_server

from egress.service import EgressService
from media.aac import AacConfig
from media.h264 import H264Encoder, PartLayout
from proto import AudioUnit, EncodedAudio, EncodedVideo, StreamSpec, Subjects
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.streams import StreamTable, new_stream_id

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
            assert out.hls.ended and out.restream is not None and len(out.restream.pushes) == 1
            push = next(iter(out.restream.pushes.values()))
            assert push.stats.connects == 1 and push.stats.tags_dropped == 0
            received = collector.streams["pushed"]
            assert received.stats.decode_errors == 0
            assert received.stats.frames_decoded >= frames - 8  # the tail past the last whole chunk may be cut
            assert received.stats.audio_messages > 0  # the silent AAC track YouTube/Twitch want
        finally:
            egress.stop()
            assert await asyncio.wait_for(task, 15) == 0


async def test_a_stream_with_audio_is_pushed_to_its_own_destinations_with_its_aac(
        nats_settings: NatsSettings, bus: Bus, tmp_path: Path) -> None:
    """The record's own list replaces the template; a dead destination is retried and counted without disturbing
    the live one or the HLS output, and stops when the list drops it mid-stream; audio sent ahead of its video
    reaches HLS and the push as the 1 kHz tone."""
    sid = new_stream_id()
    table = await StreamTable.open(bus)
    await table.create(StreamSpec(stream_id=sid, width=64, height=64, fps=FPS, steps=2, prompt="p"))
    dead = f"rtmp://127.0.0.1:{free_port()}/live/dead-key"
    async with ingest_server({"own-key": "own", "template-key": "template"}, width=64, height=48, fps=FPS) as (
            server, collector):
        own = f"rtmp://127.0.0.1:{server.port}/live/own-key"
        await table.update(sid, lambda r: r.model_copy(update={"restream": [own, dead]}))
        settings = Settings(
            nats=nats_settings, telemetry={"metrics_port": 0}, lifecycle={"http_host": "127.0.0.1"},
            egress={"hls_dir": tmp_path / "hls", "http_host": "127.0.0.1", "http_port": 0,
                    "rtmp_push_url": f"rtmp://127.0.0.1:{server.port}/live/template-key",
                    "rtmp_push_backoff_s": 0.1, "rtmp_push_backoff_max_s": 0.2},
        )
        egress = EgressService(settings, member_id="egress-audio-push-test")
        task = asyncio.create_task(egress.run())
        try:
            deadline = time.monotonic() + 30
            while not egress.ready or egress.restream_lists.get(sid) != [own, dead]:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.05)
            t0, frames = time.time(), 48
            asc, tone = aac_tone(frames / FPS + 0.5)
            units = [AudioUnit(capture_time=t0 + t, data=d) for t, d in tone]
            for seq, i in enumerate(range(0, len(units), 7)):  # the audio comes ahead of its (styled) video
                await bus.publish(Subjects.stream_audio(sid), EncodedAudio(
                    stream_id=sid, seq=seq, config=asc, sample_rate=RATE, channels=2, units=units[i:i + 7]))
            layout = PartLayout.from_settings(FPS, settings.egress)
            enc = H264Encoder(64, 48, FPS, layout.gop_frames, "ultrafast")
            for i in range(frames):  # real time, as the decoder sends it
                video = enc.encode(np.full((48, 64, 3), (5 * i) % 256, np.uint8), i, t0 + i / FPS)
                await bus.publish(Subjects.stream_video(sid), EncodedVideo(
                    stream_id=sid, seq=i, width=64, height=48, fps=FPS, extradata=enc.config.extradata,
                    units=video + (enc.flush() if i == frames - 1 else []), end_of_stream=i == frames - 1))
                await asyncio.sleep(1 / FPS)
                if i == frames // 2:  # the list changes while the stream plays
                    restream = egress.outputs[sid].restream
                    assert restream is not None and set(restream.pushes) == {own, dead}
                    dead_push, dead_task = restream.pushes[dead], restream.tasks[dead]
                    await table.update(sid, lambda r: r.model_copy(update={"restream": [own]}))
            await asyncio.wait_for(collector.finished("own"), 15)
            out = egress.outputs[sid]
            assert out.restream is not None and set(out.restream.pushes) == {own} and dead_task.cancelled()
            assert dead_push.stats.failures >= 2 and out.restream.pushes[own].stats.failures == 0
            assert "template" not in collector.streams  # the record's list replaces the template
            received = [u.data for m in collector.audio["own"] for u in m.units]
            assert len(received) >= 2 * RATE / 1024  # ≥ 2 s of the 3 s
            config = AacConfig.parse(collector.audio["own"][0].config)
            samples, _, rate = decode_audio(b"".join(config.adts(f) for f in received))
            assert dominant_hz(samples, rate) == pytest.approx(TONE_HZ, abs=5)
            hls = out.hls
            samples, _, rate = decode_audio(hls.inits[hls.discontinuity] + b"".join(s.data for s in hls.segments))
            assert len(samples) >= 2.5 * RATE and dominant_hz(samples, rate) == pytest.approx(TONE_HZ, abs=5)
            assert egress.audio[sid].stats.units["late"] == 0
        finally:
            egress.stop()
            assert await asyncio.wait_for(task, 15) == 0
