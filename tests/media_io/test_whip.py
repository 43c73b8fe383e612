"""WHIP ingest in-process (ingest/whip.py): aiortc publishes a moving picture over real sockets (HTTP, ICE, DTLS,
SRTP) to a real RtmpServer's streams; the chunks come out of the same queue RTMP feeds. A bad key, a bad offer and a
key of another stream are refused with counted reasons; DELETE of the Location ends the session."""

from __future__ import annotations

import asyncio

import httpx

from ingest.whip import WhipServer
from media_io.mediakit import ingest_server
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
                await _until(lambda: stream.audio.stats.units["not_aac"] > 0)  # Opus: dropped, counted

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
