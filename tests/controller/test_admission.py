"""Admission from measured capacity: with room for two streams a third is refused, with a reason the RTMP client
(ingest asks the controller at publish) and the API (the stream's status) both see; advisory mode decides the same
without refusing; a stream that ends frees its share."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from media_io.mediakit import RawRtmp

from ingest.admission import ask_admission
from ingest.service import IngestService
from proto import SLO, Ack, Buckets, Error, StreamEvent, StreamSpec, Subjects
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.gateway.api import make_api
from services.natsd import NatsServer
from services.streams import StreamTable, new_stream_id
from support.sync import running

from .conftest import Controllers, controller_settings, stats_for


@pytest_asyncio.fixture(loop_scope="session")
async def ingest(nats_settings: NatsSettings) -> AsyncIterator[IngestService]:
    settings = Settings(nats=nats_settings, telemetry={"metrics_port": 0},
                        lifecycle={"http_host": "127.0.0.1", "heartbeat_interval_s": 0.2},
                        ingest={"rtmp_host": "127.0.0.1", "rtmp_port": 0, "admission_timeout_s": 5.0})
    async with running(IngestService(settings, member_id="ingest-admission-test")) as service:
        # these tests fill the DiT: the encode cost this ingest measures (it varies with the machine's load) is left
        # out of its heartbeats; the VAE bottlenecks are the policy's tests (tests/controller/test_policy.py)
        service.work.report = list  # type: ignore[method-assign]
        yield service


@contextlib.asynccontextmanager
async def _telemetry(bus: Bus, svc) -> AsyncIterator[None]:
    """Stages whose slowest runs 4 blocks x 22.5 ms per micro-step of 2 items: 45 ms per item, 20 items/s at 90 %
    headroom, i.e. room for two 16 fps, 2-step streams (8 items/s each)."""

    async def loop() -> None:
        while True:
            if svc.block_map is not None:
                for s in stats_for(svc.block_map, {}, block_ms=22.5, items=2.0):
                    await bus.publish(Subjects.stats(s.stage_id), s)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _streams(bus: Bus, n: int) -> tuple[StreamTable, list[tuple[StreamSpec, str]]]:
    table = await StreamTable.open(bus)
    out = []
    for _ in range(n):
        spec = StreamSpec(stream_id=new_stream_id(), width=64, height=64, fps=16.0, steps=2, prompt="p",
                          slo=SLO(target_fps=16.0, max_latency_ms=60000))  # the DiT is what these tests fill
        _, key = await table.create(spec)
        out.append((spec, key))
    return table, out


async def test_a_third_stream_is_refused_with_a_reason(nats_settings: NatsSettings, bus: Bus,
                                                        controllers: Controllers, ingest: IngestService,
                                                        eventually) -> None:
    table, streams = await _streams(bus, 3)
    decisions = {}
    try:
        for advisory in (False, True):
            svc = await controllers.start(controller_settings(nats_settings, advisory=advisory))
            async with _telemetry(bus, svc):
                await eventually(lambda svc=svc: svc.item_ms is not None, timeout=15)
            assert svc.item_ms == pytest.approx(45.0)
            for spec, _ in streams[:2]:
                assert isinstance(await bus.request(Subjects.admission(), spec, timeout=10), Ack)
            (third, key) = streams[2]
            if advisory:  # applied nowhere: the controller admits it, and says what it would have done
                reply = await bus.request(Subjects.admission(), third, timeout=10)
                assert isinstance(reply, Ack) and "advisory: would refuse: no capacity" in reply.detail
            else:
                reply = await bus.request(Subjects.admission(), third, timeout=10)
                assert isinstance(reply, Error) and reply.code == "no_capacity" and "no capacity" in reply.message
                # the RTMP client is refused at publish with the controller's reason
                client = await RawRtmp.open(ingest.rtmp.port)
                client.connect_and_publish(key)
                answer = await client.read_until_closed()
                client.close()
                assert b"no capacity" in answer, answer[-400:]
                # the API shows it on the stream's status
                app = make_api(Settings(nats=nats_settings, gateway={"allow_anonymous": True}), bus, table,
                               httpx.AsyncClient())
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as http:
                    info = (await http.get(f"/v1/streams/{third.stream_id}")).json()
                    assert info["admission"].startswith("refused: no capacity"), info
                    first = (await http.get(f"/v1/streams/{streams[0][0].stream_id}")).json()
                    assert first["admission"].startswith("admitted: ")
                # a stream that ends frees its share: now the third fits
                await bus.publish(Subjects.stream_event(streams[0][0].stream_id), StreamEvent(
                    stream_id=streams[0][0].stream_id, kind="ended", at=time.time()))
                await eventually(lambda svc=svc: streams[0][0].stream_id not in svc.admitted)
                assert isinstance(await bus.request(Subjects.admission(), third, timeout=10), Ack)
            decisions[advisory] = [(d["stream_id"], d["admit"], d["reason"]) for d in svc.decisions
                                   if d["kind"] == "admission"][:3]
            await controllers.stop(svc)
            await (await bus.kv(Buckets.CONTROLLER)).delete("state")
        assert [admit for _, admit, _ in decisions[False]] == [True, True, False]
        assert decisions[True] == decisions[False]
    finally:
        for spec, _ in streams:
            with contextlib.suppress(Exception):
                await table.delete(spec.stream_id)


async def test_without_a_controller_admission_fails_closed(tmp_path) -> None:
    """No controller answers (it is down or restarting): a stream is refused with that reason, unless the deployment
    says it runs without one. A private server: other tests' controllers on the shared one would answer."""
    server = NatsServer(tmp_path / "nats", anonymous=True).start()
    try:
        bus = await Bus.connect(NatsSettings(url=server.url))
        spec = StreamSpec(stream_id=new_stream_id(), width=64, height=64, fps=16.0, steps=2, prompt="p")
        try:
            assert "no controller answers admission" in await ask_admission(bus, spec, 2.0)
            assert await ask_admission(bus, spec, 2.0, without_controller="admit") == ""
        finally:
            await bus.close()
    finally:
        server.stop()


async def test_a_queued_stream_waits_its_turn_and_one_that_waits_too_long_is_refused(
        nats_settings: NatsSettings, bus: Bus, controllers: Controllers, eventually) -> None:
    """``controller.admission_queue``: with room for two, a third stream's ingest waits (state ``queued`` with its
    position in the API's status and list) and starts once the first ends; a fourth, with nothing freeing, is
    refused with the reason after ``admission_queue_max_wait_s``."""
    table, streams = await _streams(bus, 4)
    settings = controller_settings(nats_settings, admission_queue=True, admission_queue_max_wait_s=3.0)
    app = make_api(Settings(nats=nats_settings, gateway={"allow_anonymous": True}), bus, table, httpx.AsyncClient())
    try:
        svc = await controllers.start(settings)
        async with _telemetry(bus, svc), httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                                           base_url="http://gw") as http:
            await eventually(lambda: svc.item_ms is not None, timeout=15)
            for spec, _ in streams[:2]:
                assert await ask_admission(bus, spec, 5.0, queued_wait_s=10.0) == ""
            third = streams[2][0].stream_id
            waiting = asyncio.create_task(ask_admission(bus, streams[2][0], 5.0, queued_wait_s=10.0))

            async def state(sid: str) -> tuple[str, str]:
                info = (await http.get(f"/v1/streams/{sid}")).json()
                return info["state"], info["state_reason"]

            async def queued() -> bool:  # in its status and in the list (the queue's own key, written just after)
                listed = {s["id"]: s for s in (await http.get("/v1/streams")).json()}
                return (await state(third))[0] == "queued" and listed[third]["state"] == "queued"

            deadline = time.monotonic() + 10
            while not await queued():
                assert time.monotonic() < deadline and not waiting.done()
                await asyncio.sleep(0.1)
            assert (await state(third))[1].startswith("queued: position 1 of 1"), await state(third)
            listed = {s["id"]: s for s in (await http.get("/v1/streams")).json()}
            assert listed[third]["state"] == "queued" and "position 1 of 1" in listed[third]["state_reason"]
            await bus.publish(Subjects.stream_event(streams[0][0].stream_id), StreamEvent(
                stream_id=streams[0][0].stream_id, kind="ended", at=time.time()))
            assert await asyncio.wait_for(waiting, 10) == ""  # admitted when the first stream's share freed
            assert (await state(third))[0] != "queued"
            t0 = time.monotonic()
            refused = await ask_admission(bus, streams[3][0], 5.0, queued_wait_s=10.0)
            assert refused.startswith("no capacity after waiting 3 s in the admission queue: no capacity"), refused
            assert 3.0 <= time.monotonic() - t0 < 8.0
            assert (await state(streams[3][0].stream_id))[0] != "queued"
            info = (await http.get(f"/v1/streams/{streams[3][0].stream_id}")).json()
            assert info["admission"].startswith("refused: no capacity after waiting"), info
    finally:
        for spec, _ in streams:
            with contextlib.suppress(Exception):
                await table.delete(spec.stream_id)
