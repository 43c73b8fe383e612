"""``GET/PUT /v1/streams/{id}/restream``: destinations validated, stored whole in the stream record, shown back with
the stream key masked; operators and the stream's own token only, internal addresses for operators only."""

from __future__ import annotations

import asyncio
import contextlib

import httpx

from proto import Buckets, StreamRecord, decode
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.gateway.service import GatewayService

TOKEN = "operator-token-0123456789"

YT = "rtmp://a.rtmp.youtube.com/live2/abcd-efgh-ijkl-mnop"
TW = "rtmps://live.twitch.tv:443/app/live_123456_SECRET?bandwidthtest=true"


@contextlib.asynccontextmanager
async def _gateway(nats_settings: NatsSettings, eventually):
    settings = Settings(nats=nats_settings, telemetry={"metrics_port": 0}, lifecycle={"http_host": "127.0.0.1"},
                        gateway={"host": "127.0.0.1", "port": 0, "api_tokens": [TOKEN], "write_burst": 100})
    service = GatewayService(settings)
    task = asyncio.create_task(service.run())
    await eventually(lambda: service.api_port != 0 and service.ready)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.api_port}", timeout=30,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        yield http
    service.stop()
    assert await asyncio.wait_for(task, 20) == 0


async def test_restream_destinations_are_validated_masked_and_scoped(nats_settings: NatsSettings, bus: Bus,
                                                                     eventually) -> None:
    async with _gateway(nats_settings, eventually) as http:
        mine = (await http.post("/v1/streams", json={"prompt": "mine"})).json()["id"]
        theirs = (await http.post("/v1/streams", json={"prompt": "theirs"})).json()["id"]
        scoped = {"Authorization": f"Bearer {(await http.post(f'/v1/streams/{mine}/tokens', json={})).json()['token']}"}
        path = f"/v1/streams/{mine}/restream"
        assert (await http.get(path)).json() == {"destinations": [], "default": True}

        r = await http.put(path, json={"destinations": [YT, TW]}, headers=scoped)
        assert r.status_code == 200, r.text
        masked = ["rtmp://a.rtmp.youtube.com/live2/***", "rtmps://live.twitch.tv:443/app/***"]
        assert r.json() == {"destinations": masked, "default": False}
        got = await http.get(path, headers=scoped)
        assert got.json()["destinations"] == masked and "abcd" not in got.text and "SECRET" not in got.text
        kv = await bus.kv(Buckets.STREAMS)
        entry = await kv.get(f"s.{mine}")
        assert decode(entry.value, StreamRecord).restream == [YT, TW]  # egress needs the whole URL

        for bad in (["http://example.com/live/key"], ["rtmp://example.com/live"], ["rtmp:///live/key"],
                    ["rtmp://user:pw@example.com/live/key"], ["rtmp://example.com/live/ke y"], [YT, YT],
                    [f"rtmp://h{i}.example.com/live/k" for i in range(5)], ["rtmp://127.0.0.1/live/key"],
                    ["rtmp://10.1.2.3:1935/live/key"], ["rtmp://localhost/live/key"], ["rtmp://[::1]/live/key"]):
            r = await http.put(path, json={"destinations": bad}, headers=scoped)
            assert r.status_code == 422, (bad, r.text)
            assert "abcd" not in r.text and "pw@" not in r.text  # keys never echoed
        internal = await http.put(path, json={"destinations": ["rtmp://10.1.2.3/live/key"]})  # an operator may
        assert internal.status_code == 200 and internal.json()["destinations"] == ["rtmp://10.1.2.3/live/***"]

        for method, p, body in [("GET", f"/v1/streams/{theirs}/restream", None),
                                ("PUT", f"/v1/streams/{theirs}/restream", {"destinations": [YT]})]:
            assert (await http.request(method, p, json=body, headers=scoped)).status_code == 403
            assert (await http.request(method, p, json=body, headers={"Authorization": ""})).status_code == 401
        assert (await http.put("/v1/streams/nope/restream", json={"destinations": []})).status_code == 404
        cleared = await http.put(path, json={"destinations": []}, headers=scoped)
        assert cleared.json() == {"destinations": [], "default": True}
