"""RTMP push of the output: received by a PyAV listener, and reconnecting with backoff when the far end goes away."""

from __future__ import annotations

import asyncio
import sys

from egress.rtmp_push import RtmpPush, split_rtmp_url
from media_io.mediakit import LISTEN_SCRIPT, LiveSource, free_port, ingest_server, run_process


def test_split_rtmp_url() -> None:
    assert split_rtmp_url("rtmp://a.example:1940/live2/abc?x=1") == ("a.example", 1940, "live2", "abc?x=1")
    assert split_rtmp_url("rtmp://host/app/key")[1] == 1935


async def test_push_is_received_by_a_pyav_listener_with_silent_aac() -> None:
    url = f"rtmp://127.0.0.1:{free_port()}/live/out-key"
    listener = asyncio.create_task(run_process(sys.executable, str(LISTEN_SCRIPT), url, timeout=40))
    holder: dict = {}
    source = LiveSource(lambda unit: holder["push"].push(unit))
    push = holder["push"] = RtmpPush(url, source.encoder.config, backoff_s=0.1, backoff_max_s=0.5)
    push_task = asyncio.create_task(push.run())  # connects (after a few refused attempts) once the listener is up
    await source.run(3.0)
    await push.finish()
    await asyncio.wait_for(push_task, 10)
    report = (await listener).report
    assert report.get("frames") == source.encoder.stats.frames, (report, push.stats)
    assert report["audio_streams"] == 1 and report["width"] == 160
    assert report["pts"] == sorted(report["pts"])
    assert push.stats.connects == 1 and push.stats.tags_dropped == 0


async def test_push_reconnects_with_backoff_and_resumes_at_a_keyframe() -> None:
    keys = {"push-key": "pushed"}
    holder: dict = {}
    source = LiveSource(lambda unit: holder["push"].push(unit))
    async with ingest_server(keys, stream_linger_s=0.1) as (first, first_col):
        port = first.port
        url = f"rtmp://127.0.0.1:{port}/live/push-key"
        push = holder["push"] = RtmpPush(url, source.encoder.config, backoff_s=0.1, backoff_max_s=0.4)
        push_task = asyncio.create_task(push.run())
        live = asyncio.create_task(source.run(5.0))
        await asyncio.sleep(1.5)
    first_frames = len(first_col.frame_indices("pushed"))
    await asyncio.sleep(1.0)  # nobody listening: connection refused, backoff
    async with ingest_server(keys, rtmp_port=port, stream_linger_s=0.1) as (second, second_col):
        await live
        await push.finish()
        await asyncio.wait_for(push_task, 10)
        await second_col.finished("pushed")
    assert first_frames > 0
    assert push.stats.connects == 2 and push.stats.failures >= 1
    second = second_col.streams["pushed"]
    assert second.stats.frames_decoded >= 16 and second.stats.decode_errors == 0
    assert second.stats.audio_messages > 0
