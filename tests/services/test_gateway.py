"""The gateway over real HTTP and a real nats-server: auth, stream CRUD, hashed keys, live PATCH, HLS routing."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response

from proto import CHANNELS, Ack, Buckets, Error, IngestStatus, PromptUpdate, StreamRecord, StreamSpec, Subjects
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.gateway.service import GatewayService
from services.runtime import ServiceStartError
from services.streams import StreamTable, ingest_silent, session_state

TOKEN = "test-token-123"


def _settings(nats_settings: NatsSettings, **gateway) -> Settings:
    return Settings(nats=nats_settings, telemetry={"metrics_port": 0},
                    lifecycle={"http_host": "127.0.0.1", "heartbeat_interval_s": 0.2},
                    gateway={"host": "127.0.0.1", "port": 0, "api_tokens": [TOKEN],
                             "public_url": "http://viewer.example", "prompt_ack_timeout_s": 5.0, **gateway})


@contextlib.asynccontextmanager
async def _gateway(nats_settings: NatsSettings, eventually):
    service = GatewayService(_settings(nats_settings))
    task = asyncio.create_task(service.run())
    await eventually(lambda: service.api_port != 0 and service.ready)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.api_port}",
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        yield service, http
    service.stop()
    assert await asyncio.wait_for(task, 10) == 0


def test_refuses_to_start_without_tokens(nats_settings: NatsSettings) -> None:
    with pytest.raises(ServiceStartError, match="no API token"):
        GatewayService(_settings(nats_settings, api_tokens=[]))


async def test_api_needs_a_valid_token(nats_settings: NatsSettings, eventually) -> None:
    async with _gateway(nats_settings, eventually) as (_service, http):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
            r = await http.get("/v1/streams", headers={**headers} if headers else {"Authorization": ""})
            assert r.status_code == 401, r.text
            assert "API token" in r.json()["detail"]
        assert (await http.get("/v1/streams")).status_code == 200
        docs = await http.get("/openapi.json")
        assert "/v1/streams" in docs.json()["paths"]
        page = await http.get("/docs", headers={})  # the offline page (services/gateway/docs.py), not Swagger's CDN
        assert page.status_code == 200 and "cdn" not in page.text.lower() and "openapi.json" in page.text
        assert (await http.get("/")).headers["location"] == "/console/"
        assert (await http.get("/console/", headers={"Authorization": ""})).status_code == 200  # signs in itself
        assert (await http.get("/v1/stats", headers={"Authorization": ""})).status_code == 401
        assert isinstance((await http.get("/v1/stats")).json(), list)


async def test_create_list_get_delete_and_hashed_keys(nats_settings: NatsSettings, bus: Bus, eventually) -> None:
    specs: list[StreamSpec] = []
    errors: list[Error] = []

    async def on_spec(spec: StreamSpec, _raw) -> None:
        specs.append(spec)

    async def on_error(err: Error, _raw) -> None:
        errors.append(err)

    await bus.subscribe(CHANNELS["stream_spec"].wildcard(), on_spec, expected=StreamSpec)
    await bus.subscribe(CHANNELS["stream_error"].wildcard(), on_error, expected=Error)
    await bus.nc.flush()
    async with _gateway(nats_settings, eventually) as (_service, http):
        r = await http.post("/v1/streams", json={"prompt": "a watercolour city", "width": 832, "height": 480})
        assert r.status_code == 201, r.text
        created = r.json()
        sid, key = created["id"], created["stream_key"]
        assert created["publish_url"].endswith(f"/live/{key}")
        assert created["llhls_url"].startswith(f"http://viewer.example/hls/{sid}/")  # + the signed token
        assert created["llhls_url"].endswith("/index.m3u8") and created["hls_url"].endswith("/playlist.m3u8")
        assert created["spec"]["width"] == 832 and created["spec"]["prompt"] == "a watercolour city"
        await eventually(lambda: any(s.stream_id == sid for s in specs))

        listed = (await http.get("/v1/streams")).json()  # the session's table may hold other tests' streams
        assert sid in [s["id"] for s in listed]
        assert all("stream_key" not in s for s in listed)
        got = (await http.get(f"/v1/streams/{sid}")).json()
        assert got["state"] == "created" and got["prompt_version"] == 0

        table = StreamTable(await bus.kv(Buckets.STREAMS))
        raw = [e.value for k in await table.kv.keys() if (e := await table.kv.get(k)) is not None]
        assert all(key.encode() not in (v or b"") for v in raw)  # the key itself is never stored
        assert (await table.lookup_key(key)).spec.stream_id == sid
        assert await table.lookup_key(key + "x") is None

        assert (await http.delete(f"/v1/streams/{sid}")).status_code == 204
        assert (await http.get(f"/v1/streams/{sid}")).status_code == 404
        assert await table.lookup_key(key) is None
        await eventually(lambda: any(e.stream_id == sid and e.code == "stream_deleted" for e in errors))
        assert (await http.delete("/v1/streams/nope")).status_code == 404
        assert (await http.get("/v1/streams/a.b")).status_code == 404


async def test_an_operator_rotates_a_streams_key(nats_settings: NatsSettings, bus: Bus, eventually) -> None:
    """``POST /v1/streams/{id}/key``: a new key, shown once with its publish URL; the old key opens nothing, the
    stream keeps its id and settings. A per-stream token may not (tests/services/test_gateway_security.py)."""
    async with _gateway(nats_settings, eventually) as (_service, http):
        created = (await http.post("/v1/streams", json={"prompt": "a key that leaked"})).json()
        sid, old = created["id"], created["stream_key"]
        r = await http.post(f"/v1/streams/{sid}/key")
        assert r.status_code == 200, r.text
        rotated = r.json()
        new = rotated["stream_key"]
        assert new != old and rotated["id"] == sid and rotated["publish_url"].endswith(f"/live/{new}")
        assert rotated["spec"] == created["spec"] and rotated["rtmp_url"] == created["rtmp_url"]
        table = StreamTable(await bus.kv(Buckets.STREAMS))
        assert await table.lookup_key(old) is None
        assert (await table.lookup_key(new)).spec.stream_id == sid
        got = (await http.get(f"/v1/streams/{sid}")).json()
        assert "stream_key" not in got and got["state"] == "created"
        assert (await http.post("/v1/streams/st-000000000000/key")).status_code == 404
        assert (await http.post("/v1/streams/a.b/key")).status_code == 404
        assert (await http.delete(f"/v1/streams/{sid}")).status_code == 204
        assert (await http.post(f"/v1/streams/{sid}/key")).status_code == 404


async def test_bad_requests_are_refused_clearly(nats_settings: NatsSettings, eventually) -> None:
    async with _gateway(nats_settings, eventually) as (_service, http):
        before = len((await http.get("/v1/streams")).json())
        for body in ({"prompt": "x", "width": 500}, {"prompt": ""}, {"prompt": "x", "steps": 9},
                     {"prompt": "x", "colour": "red"}, {}):
            r = await http.post("/v1/streams", json=body)
            assert r.status_code == 422, (body, r.text)
        assert len((await http.get("/v1/streams")).json()) == before


async def test_live_prompt_change_reports_the_effective_seq(nats_settings: NatsSettings, bus: Bus,
                                                            eventually) -> None:
    updates: list[PromptUpdate] = []
    live = {"on": False}

    async def ingest(update: PromptUpdate, raw) -> None:
        updates.append(update)
        if update.prompt == "too long":
            await bus.respond(raw, Error(code="prompt_too_long", message="the prompt has too many tokens",
                                         stream_id=update.stream_id))
        else:
            await bus.respond(raw, Ack(ref="12"))

    async with _gateway(nats_settings, eventually) as (_service, http):
        sid = (await http.post("/v1/streams", json={"prompt": "first"})).json()["id"]
        # not live: no ingest answers, the change applies when the stream starts
        r = await http.patch(f"/v1/streams/{sid}", json={"prompt": "second"})
        assert r.status_code == 200, r.text
        assert r.json()["effective_seq"] is None and r.json()["prompt_version"] == 1

        sub = await bus.subscribe(CHANNELS["stream_prompt"].wildcard(), ingest, expected=PromptUpdate)
        await bus.nc.flush()
        live["on"] = True
        r = await http.patch(f"/v1/streams/{sid}", json={"prompt": "third", "mode": "blend", "blend_chunks": 6})
        body = r.json()
        assert body["effective_seq"] == 12 and body["prompt_version"] == 2
        assert body["spec"]["prompt"] == "third"
        assert updates[-1].mode == "blend" and updates[-1].blend_chunks == 6 and updates[-1].version == 2
        r = await http.patch(f"/v1/streams/{sid}", json={"prompt": "too long"})
        assert r.status_code == 409 and "too many tokens" in r.json()["detail"]
        kept = (await http.get(f"/v1/streams/{sid}")).json()
        assert kept["spec"]["prompt"] == "third"  # the refused prompt is not recorded as the stream's
        await sub.unsubscribe()

        r = await http.patch(f"/v1/streams/{sid}", json={"steps": 3, "noise_scale": 0.7})
        assert r.json()["spec"]["steps"] == 3 and r.json()["spec"]["noise"]["noise_scale"] == 0.7
        assert r.json()["prompt_version"] == 3  # no prompt change, no new version (3: the refused one is spent)
        assert r.json()["effective_seq"] is None  # not live: applies from the first chunk
        assert (await http.patch(f"/v1/streams/{sid}", json={"mode": "fade"})).status_code == 422

        # live: a parameter change is a request to ingest too, answered with its seq or refused before anything
        specs: list[StreamSpec] = []

        async def ingest_spec(spec: StreamSpec, raw) -> None:
            specs.append(spec)
            if spec.steps == 1:
                await bus.respond(raw, Error(code="bad_spec", message="one step is not served here",
                                             stream_id=spec.stream_id))
            else:
                await bus.respond(raw, Ack(ref="20"))

        sub = await bus.subscribe(Subjects.stream_spec(sid), ingest_spec, expected=StreamSpec)
        await bus.nc.flush()
        r = await http.patch(f"/v1/streams/{sid}", json={"steps": 4})
        assert r.status_code == 200 and r.json()["effective_seq"] == 20 and specs[-1].steps == 4
        r = await http.patch(f"/v1/streams/{sid}", json={"steps": 1, "prompt": "never sent"})
        assert r.status_code == 409 and "one step is not served here" in r.json()["detail"]
        kept = (await http.get(f"/v1/streams/{sid}")).json()["spec"]
        assert (kept["steps"], kept["prompt"]) == (4, "third")  # refused before the prompt went anywhere
        assert updates[-1].prompt == "too long"
        await sub.unsubscribe()


async def test_hls_is_routed_to_the_streams_egress(nats_settings: NatsSettings, bus: Bus, eventually) -> None:
    upstream = FastAPI()

    @upstream.get("/hls/{sid}/{path:path}")
    async def serve(sid: str, path: str, request: Request) -> Response:
        q = dict(request.query_params)
        return Response(f"#EXTM3U\n# {sid} {path} {q}\n", media_type="application/vnd.apple.mpegurl")

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(upstream, log_level="warning"))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with _gateway(nats_settings, eventually) as (_service, http):
            created = (await http.post("/v1/streams", json={"prompt": "p"})).json()
            sid, base = created["id"], httpx.URL(created["llhls_url"]).path.rsplit("/", 1)[0]
            r = await http.get(f"{base}/index.m3u8")
            assert r.status_code == 503 and "not playing" in r.text
            table = StreamTable(await bus.kv(Buckets.STREAMS))
            await table.update(sid, lambda rec: rec.model_copy(update={"egress_url": f"http://127.0.0.1:{port}",
                                                                       "state": "live"}))
            r = await http.get(f"{base}/index.m3u8", params={"_HLS_msn": 4, "_HLS_part": 2},
                               headers={"Authorization": ""})  # playback needs no API token: its signed URL
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("application/vnd.apple.mpegurl")
            token = base.rsplit("/", 1)[1]
            assert f"{sid} {token}/index.m3u8" in r.text and "'_HLS_msn': '4'" in r.text
            assert "'_HLS_part': '2'" in r.text
            assert (await http.get(f"/hls/unknown/{token}/index.m3u8")).status_code == 403  # bound to its stream
    finally:
        server.should_exit = True
        await serving


def test_a_session_whose_ingest_went_silent_is_not_shown_live() -> None:
    """Ingest cannot report its own death: the API derives it from the checkpoint ingest stops writing
    (every ``ingest.status_interval_s``): recovering after 3 missed checkpoints, failed after a minute."""
    spec = StreamSpec(stream_id="st-silent", width=64, height=64, fps=16.0, steps=2, prompt="p")
    record = StreamRecord(spec=spec, key_hash="0" * 64, state="live", created_at=0.0, updated_at=0.0,
                          ingest=IngestStatus(member="ingest-a", at=1000.0))
    assert session_state(record, 2.0, 1005.0) == ("live", "")
    state, reason = session_state(record, 2.0, 1009.0)
    assert state == "recovering" and "ingest-a" in reason and "reconnects" in reason
    state, reason = session_state(record, 2.0, 1061.0)
    assert state == "failed" and "gone" in reason
    degraded = record.model_copy(update={"state": "degraded", "state_reason": "why"})
    assert session_state(degraded, 2.0, 1001.0) == ("degraded", "why")  # ingest's own word while it writes
    ended = record.model_copy(update={"state": "ended"})
    assert session_state(ended, 2.0, 5000.0) == ("ended", "")  # no session: nothing to judge
    assert ingest_silent(record, 2.0, 1005.0) is None and ingest_silent(record, 2.0, 1009.0) == 9.0
