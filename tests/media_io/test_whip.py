"""WHIP ingest in-process (ingest/whip.py): aiortc publishes a moving picture over real sockets (HTTP, ICE, DTLS,
SRTP) to a real RtmpServer's streams; the chunks come out of the same queue RTMP feeds, its Opus as AAC in step with
the video. A bad key, a bad offer and a key of another stream are refused with counted reasons; DELETE of the
Location ends the session."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from ingest.whip import WhipServer
from media.aac import SAMPLES_PER_FRAME, AacConfig
from media_io.audiokit import TONE_HZ, decode_audio, dominant_hz, mux_hls, tone_offset_s
from media_io.mediakit import barcode_frame, ingest_server, read_barcode
from support import whip


async def _until(predicate, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_whip_publishes_chunks_refuses_bad_keys_and_offers_and_delete_ends_it() -> None:
    keys = {"key-a": "stream-a", "key-b": "stream-b"}
    async with ingest_server(keys, width=64, height=64, fps=8, whip_port=0) as (server, collector):
        w = WhipServer(server)
        await w.start()
        base = f"http://127.0.0.1:{w.port}/whip"
        try:
            async with httpx.AsyncClient(timeout=20) as client:
                # refusals before any session exists, each counted with its reason
                bad = await whip.offer()
                r = await whip.publish(client, f"{base}/stream-a", "wrong", bad)
                assert r.status_code == 401 and "bad stream key" in r.text and r.headers["www-authenticate"]
                r = await whip.publish(client, f"{base}/stream-a", "key-b", bad)  # a key of another stream
                assert r.status_code == 401
                await bad.close()
                r = await client.post(f"{base}/stream-a", content=b"v=0\r\nnot an offer",
                                      headers={"Content-Type": "application/sdp", "Authorization": "Bearer key-a"})
                assert r.status_code == 400 and "bad offer" in r.text
                r = await client.post(f"{base}/stream-a", content=b"{}",
                                      headers={"Content-Type": "application/json", "Authorization": "Bearer key-a"})
                assert r.status_code == 415
                assert server.stats.refused["bad_key"] == 2 and server.stats.refused["protocol"] == 1
                assert not collector.streams and not server._sessions
                # past the key check, an offer aiortc cannot take: 400, and the session is released
                r = await client.post(f"{base}/stream-a", content=b"v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n",
                                      headers={"Content-Type": "application/sdp", "Authorization": "Bearer key-a"})
                assert r.status_code == 400 and "bad offer" in r.text, r.text
                assert not server.streams["stream-a"].publishing and not server._sessions
                assert server.stats.refused["protocol"] == 2

                pc = await whip.offer(audio=True)
                r = await whip.publish(client, f"{base}/stream-a", "key-a", pc)
                assert r.status_code == 201, r.text
                assert r.headers["content-type"].startswith("application/sdp")
                location = r.headers["location"]
                assert location.startswith("/whip/stream-a/")
                await _until(lambda: len(collector.chunks.get("stream-a", [])) >= 3)
                chunks = collector.chunks["stream-a"]
                assert chunks[0].frames.shape[1:] == (64, 64, 3)
                assert not (chunks[-1].frames[0] == chunks[0].frames[0]).all(), "the picture does not move"
                stream = server.streams["stream-a"]
                assert stream.publishing and stream.stats.frames_decoded > 0
                await _until(lambda: stream.audio.stats.units["published"] > 0)  # Opus → AAC, passed through

                r = await client.delete(f"http://127.0.0.1:{w.port}{location}", headers={"Authorization": "Bearer x"})
                assert r.status_code == 401
                r = await client.delete(f"http://127.0.0.1:{w.port}{location}",
                                        headers={"Authorization": "Bearer key-a"})
                assert r.status_code == 200
                assert not stream.publishing and not w.sessions and not server._sessions
                assert server.stats.refused.total() == 4  # a clean end is not a refusal
                await pc.close()
        finally:
            await w.close()


async def test_whip_audio_is_heard_in_step_with_the_video() -> None:
    """The publisher's tone (Opus) starts with barcode frame ``MARK``: as AAC it is stamped within 50 ms of that
    frame's capture time at ingest, and muxed within 50 ms of it in the LL-HLS parts; before it, silence."""
    fps, mark = 16, 24  # the tone starts at 1.5 s
    async with ingest_server(fps=fps, whip_port=0) as (server, collector):
        w = WhipServer(server)
        await w.start()
        clock = whip.Clock()
        pc = await whip.offer(whip.Tone(mark / fps, clock), whip.Pictures(lambda n: barcode_frame(n, 160, 120), fps,
                                                                              clock))
        try:
            async with httpx.AsyncClient(timeout=20) as client:
                r = await whip.publish(client, f"http://127.0.0.1:{w.port}/whip/stream-a", "key-a", pc)
                assert r.status_code == 201, r.text
                await _until(lambda: any(read_barcode(f) >= mark + fps for c in collector.chunks.get("stream-a", [])
                                         for f in c.frames))
                await client.delete(f"http://127.0.0.1:{w.port}{r.headers['location']}",
                                    headers={"Authorization": "Bearer key-a"})
            chunks = await collector.finished("stream-a")
        finally:
            await pc.close()
            await w.close()
    stream, batches = collector.streams["stream-a"], collector.audio["stream-a"]
    units = [u for m in batches for u in m.units]
    assert AacConfig.parse(batches[0].config).sample_rate == 48000
    assert stream.audio.stats.units["published"] == len(units) and stream.audio.stats.units["transcode_failed"] == 0
    samples, _, rate = decode_audio(b"".join(AacConfig.parse(batches[0].config).adts(u.data) for u in units))
    loud = int(np.flatnonzero(np.abs(samples) > 0.1)[0])
    assert loud >= 0.5 * rate, "no silence before the tone"  # negative control: the onset is not the audio's start
    assert dominant_hz(samples[loud + 2048:], rate) == pytest.approx(TONE_HZ, abs=5)
    onset = units[loud // SAMPLES_PER_FRAME].capture_time + (loud % SAMPLES_PER_FRAME) / rate
    frames = [(f, t) for c in chunks for f, t in zip(c.frames, c.frame_times, strict=True)]
    marked = next(t for f, t in frames if read_barcode(f) == mark)
    print(f"WHIP audio onset - marked frame's capture time at ingest: {(onset - marked) * 1000:+.1f} ms")
    assert abs(onset - marked) <= 0.05, f"audio stamped {(onset - marked) * 1000:.0f} ms off its video"
    data, sync = mux_hls(frames, batches, fps)
    offset = tone_offset_s(data, mark)
    print(f"WHIP audio onset - marked frame's time in LL-HLS: {offset * 1000:+.1f} ms")
    assert abs(offset) <= 0.05 and sync.stats.units["muxed"] > 0, f"audio is {offset * 1000:.0f} ms off the video"


async def test_gateway_forwards_whip_same_origin_and_names_the_client() -> None:
    """/v1/streams/{id}/whip → ingest: the answer and a Location on the gateway's path; DELETE through it ends the
    session; ingest counts key failures against the client the gateway names, not against the gateway."""
    from fastapi import FastAPI

    from media_io.mediakit import serve_app
    from services.config import Settings
    from services.gateway.whip import make_whip_router

    async with ingest_server({"key-a": "stream-a"}, width=64, height=64, fps=8, whip_port=0,
                             whip_client_header="X-Forwarded-For", key_failures_per_ip=2) as (server, collector):
        w = WhipServer(server)
        await w.start()
        app = FastAPI()
        async with httpx.AsyncClient(timeout=20) as proxy:
            off = FastAPI()
            off.include_router(make_whip_router(Settings(), proxy))
            settings = Settings(gateway={"whip_url": f"http://127.0.0.1:{w.port}",
                                         "client_address_header": "X-Real-Client"})
            app.include_router(make_whip_router(settings, proxy))
            try:
                async with serve_app(app) as port, serve_app(off) as off_port, httpx.AsyncClient(timeout=20) as c:
                    base = f"http://127.0.0.1:{port}/v1/streams"
                    r = await c.post(f"http://127.0.0.1:{off_port}/v1/streams/stream-a/whip", content=b"v=0",
                                     headers={"Content-Type": "application/sdp"})
                    assert r.status_code == 503 and "gateway.whip_url" in r.text
                    pc = await whip.offer()
                    for client in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):  # two failures block 10.0.0.1 only
                        c.headers["X-Real-Client"] = client
                        r = await whip.publish(c, f"{base}/stream-a/whip", "wrong", pc)
                        assert r.status_code == 401, r.text
                    r = await whip.publish(c, f"{base}/stream-a/whip", "wrong", pc)
                    assert r.status_code == 401 and server.stats.refused["key_rate_limited"] == 0
                    c.headers["X-Real-Client"] = "10.0.0.1"
                    r = await whip.publish(c, f"{base}/stream-a/whip", "key-a", pc)
                    assert r.status_code == 429 and server.stats.refused["key_rate_limited"] == 1
                    c.headers["X-Real-Client"] = "10.0.0.3"
                    r = await whip.publish(c, f"{base}/stream-a/whip", "key-a", pc)
                    assert r.status_code == 201, r.text
                    location = r.headers["location"]
                    assert location.startswith("/v1/streams/stream-a/whip/")
                    await _until(lambda: len(collector.chunks.get("stream-a", [])) >= 1)
                    r = await c.delete(f"http://127.0.0.1:{port}{location}", headers={"Authorization": "Bearer key-a"})
                    assert r.status_code == 200 and not server.streams["stream-a"].publishing
                    r = await c.delete(f"{base}/stream-a/whip/..%2f..%2fx", headers={"Authorization": "Bearer key-a"})
                    assert r.status_code == 404
                    await pc.close()
            finally:
                await w.close()


async def test_a_whip_publisher_replaces_an_rtmp_one_with_the_same_key() -> None:
    """One publisher definition: a WHIP session with the key of a live RTMP stream takes it over (the RTMP
    connection is closed, counted as ``replaced``) and the stream goes on, one stream, its numbering continued."""
    from media_io.mediakit import publish_pyav

    async with ingest_server({"key-a": "stream-a"}, width=64, height=64, fps=8, whip_port=0) as (server, collector):
        w = WhipServer(server)
        await w.start()
        rtmp = asyncio.create_task(publish_pyav(f"rtmp://127.0.0.1:{server.port}/live/key-a", 400, 16, "64x64",
                                                "--realtime"))
        try:
            await _until(lambda: len(collector.chunks.get("stream-a", [])) >= 1)
            stream = server.streams["stream-a"]
            pc = await whip.offer()
            async with httpx.AsyncClient(timeout=20) as client:
                r = await whip.publish(client, f"http://127.0.0.1:{w.port}/whip/stream-a", "key-a", pc)
                assert r.status_code == 201, r.text
                await _until(lambda: server.stats.refused["replaced"] == 1)
                before = len(collector.chunks["stream-a"])
                await _until(lambda: len(collector.chunks["stream-a"]) >= before + 2)
                assert server.streams["stream-a"] is stream and stream.stats.sessions == 2
                seqs = [c.seq for c in collector.chunks["stream-a"]]
                assert seqs == sorted(set(seqs))
                await client.delete(f"http://127.0.0.1:{w.port}{r.headers['location']}",
                                    headers={"Authorization": "Bearer key-a"})
            await pc.close()
            async with asyncio.timeout(30):
                result = await rtmp  # the replaced publisher's connection was closed under it
            assert '"ok": false' in result.stdout, result
        finally:
            await w.close()
