"""The bus against a real nats-server: delivery, bad input, sizes, trace context, credit windows, KV, auth."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
import torch
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proto import CHANNELS, Ack, BlockMap, Error, LatentChunk, StageAssignment, StreamSpec, Subjects, decode
from services import telemetry
from services.bus import KV, Bus, BusError, CreditTimeout, PayloadConfigError, PayloadTooLarge
from services.config import NatsSettings
from services.natsd import NatsServer
from services.runtime import watch_keys
from support.sync import settle


def _chunk(seq: int, stream: str = "cam", size: int = 8) -> LatentChunk:
    return LatentChunk(stream_id=stream, seed=0, fps=16.0, seq=seq, epoch=0, latent_start=seq, rope_start=seq,
                       capture_time=0.0,
                       deadline=1.0, prompt_version=0, noise_scale=0.8, timesteps=[700],
                       latent=torch.full((1, 16, size, size), float(seq)))


async def test_publish_subscribe_round_trip(bus: Bus, bus2: Bus, eventually) -> None:
    got: list[LatentChunk] = []

    async def handler(msg: LatentChunk, _raw) -> None:
        got.append(msg)

    await bus2.subscribe(Subjects.stream_latent("rt"), handler, expected=LatentChunk)
    await settle(bus2, bus)
    for i in range(5):
        await bus.publish(Subjects.stream_latent("rt"), _chunk(i, "rt"))
    await eventually(lambda: len(got) == 5)
    assert [m.seq for m in got] == list(range(5))
    assert torch.equal(got[3].latent, _chunk(3, "rt").latent)


async def test_malformed_messages_are_counted_and_dropped(bus: Bus, bus2: Bus, eventually) -> None:
    good: list[int] = []

    async def handler(msg: LatentChunk, _raw) -> None:
        good.append(msg.seq)

    subject = Subjects.stream_latent("bad")
    await bus2.subscribe(subject, handler, expected=LatentChunk)
    await settle(bus2, bus)
    await bus.publish(subject, _chunk(0, "bad"))
    await bus.publish(subject, b"garbage")
    await bus.publish(subject, _chunk(1, "bad").encode()[:-10])
    await bus.publish(subject, Ack(ref="x"))  # valid frame, wrong type for this subject
    await bus.publish(subject, _chunk(2, "bad"))
    await eventually(lambda: len(good) == 2 and bus2.stats.malformed == 3)
    assert good == [0, 2]


async def test_a_failing_handler_loses_only_its_message(bus: Bus, bus2: Bus, eventually) -> None:
    seen: list[str] = []

    async def handler(msg: StreamSpec, _raw) -> None:
        if msg.stream_id == "boom":
            raise RuntimeError("stream-specific failure")
        seen.append(msg.stream_id)

    await bus2.subscribe(CHANNELS["stream_spec"].wildcard(), handler, expected=StreamSpec)
    await settle(bus2, bus)
    for sid in ["a", "boom", "b"]:
        spec = StreamSpec(stream_id=sid, width=64, height=64, fps=16.0, steps=1, prompt="p")
        await bus.publish(Subjects.stream_spec(sid), spec)
    await eventually(lambda: seen == ["a", "b"])
    assert bus2.stats.handler_errors == 1


async def test_oversized_publish_fails_fast(bus: Bus) -> None:
    big = _chunk(0, size=1024)  # 16·1024·1024·4 = 64 MiB > 8 MB
    t0 = time.perf_counter()
    with pytest.raises(PayloadTooLarge, match="max_payload"):
        await bus.publish(Subjects.stream_latent("big"), big)
    assert time.perf_counter() - t0 < 0.1
    # raw nats-py path too: a frame just over the limit
    t0 = time.perf_counter()
    with pytest.raises(PayloadTooLarge):
        await bus.publish(Subjects.stream_latent("big"), bytes(bus.max_payload + 1))
    assert time.perf_counter() - t0 < 0.1
    assert bus.nc.is_connected  # the connection survives


async def test_service_refuses_to_start_when_its_messages_cannot_fit(tmp_path: Path) -> None:
    small = await asyncio.to_thread(NatsServer(tmp_path / "small", max_payload=1024 * 1024, anonymous=True).start)
    try:
        with pytest.raises(PayloadConfigError, match=r"max_payload"):
            await Bus.connect(NatsSettings(url=small.url, max_send_bytes=4 * 1024 * 1024), name="dit-stage")
        ok = await Bus.connect(NatsSettings(url=small.url, max_send_bytes=512 * 1024))
        assert ok.max_payload == 1024 * 1024
        await ok.close()
    finally:
        await asyncio.to_thread(small.stop)


async def test_unreachable_server_is_a_clear_error() -> None:
    t0 = time.perf_counter()
    with pytest.raises(BusError, match="cannot connect to NATS"):
        await Bus.connect(NatsSettings(url="nats://127.0.0.1:1", initial_connect_attempts=1,
                                       connect_timeout_s=0.5, reconnect_wait_s=0.05))
    assert time.perf_counter() - t0 < 10


async def test_auth_settings_are_used(tmp_path: Path) -> None:
    server = await asyncio.to_thread(NatsServer(tmp_path / "auth", user="rheo", password="s3cret").start)
    try:
        with pytest.raises(BusError):
            await Bus.connect(NatsSettings(url=server.url, user="rheo", password="wrong",
                                           initial_connect_attempts=1, reconnect_wait_s=0.05))
        b = await Bus.connect(NatsSettings(url=server.url, user="rheo", password="s3cret"))
        await b.close()
    finally:
        await asyncio.to_thread(server.stop)


async def test_trace_context_survives_a_hop(bus: Bus, bus2: Bus, span_exporter: InMemorySpanExporter,
                                            eventually) -> None:
    span_exporter.clear()
    inner: list[trace.SpanContext] = []

    async def handler(_msg: Ack, _raw) -> None:
        with trace.get_tracer("test").start_as_current_span("handle") as span:
            inner.append(span.get_span_context())

    await bus2.subscribe("rheo.ctl.trace-test", handler, expected=Ack)
    await settle(bus2, bus)
    with trace.get_tracer("test").start_as_current_span("produce") as root:
        await bus.publish("rheo.ctl.trace-test", Ack(ref="t"))
    await eventually(lambda: len(inner) == 1)
    spans = {s.name: s for s in span_exporter.get_finished_spans()}
    assert inner[0].trace_id == root.get_span_context().trace_id
    receive = spans["rheo.receive"]
    assert receive.context.trace_id == root.get_span_context().trace_id
    assert receive.parent.span_id == spans["rheo.publish"].context.span_id
    assert spans["handle"].parent.span_id == receive.context.span_id


async def test_request_reply(bus: Bus, bus2: Bus) -> None:
    async def admit(spec: StreamSpec, raw) -> None:
        if spec.width > 1920:
            await bus2.respond(raw, Error(code="too_large", message="over 1080p", stream_id=spec.stream_id))
        else:
            await bus2.respond(raw, Ack(ref=spec.stream_id))

    await bus2.subscribe(Subjects.admission(), admit, expected=StreamSpec)
    await settle(bus2, bus)
    ok = await bus.request(Subjects.admission(),
                           StreamSpec(stream_id="s1", width=512, height=512, fps=16.0, steps=2, prompt="p"))
    assert isinstance(ok, Ack) and ok.ref == "s1"
    no = await bus.request(Subjects.admission(),
                           StreamSpec(stream_id="s2", width=7680, height=4320, fps=16.0, steps=2, prompt="p"))
    assert isinstance(no, Error) and no.code == "too_large"


async def test_credit_window_bounds_unconsumed_bytes(bus: Bus, bus2: Bus, eventually) -> None:
    subject = Subjects.stream_x0("credit")
    msg_bytes = len(_chunk(0, "credit", size=64).encode())
    window = bus.credit_window(subject, window_bytes=msg_bytes * 8)
    await window.start()
    received: list[int] = []
    max_outstanding = 0

    async def slow_consumer(msg: LatentChunk, _raw) -> None:
        await asyncio.sleep(0.005)
        received.append(msg.seq)

    await bus2.subscribe(subject, slow_consumer, expected=LatentChunk, credit=True)
    await settle(bus2, bus)
    for i in range(60):
        await window.publish(_chunk(i, "credit", size=64))
        max_outstanding = max(max_outstanding, window.outstanding)
    await eventually(lambda: len(received) == 60)
    assert received == list(range(60))
    assert max_outstanding <= window.window_bytes
    await window.close()


async def test_credit_window_times_out_without_a_consumer(bus: Bus) -> None:
    """No consumer: the window fills and ``publish`` times out. The one reset policy: with ``reset_after_s`` 0
    (the default) the timeout itself forgets the credit, so the next message goes; with a quiet period, only a
    timeout that comes after that long without credit does (a slow but live consumer keeps its window)."""
    window = await bus.credit_window(Subjects.stream_x0("nobody"), window_bytes=1 << 20).start()
    chunk = _chunk(0, "nobody", size=64)  # ~256 KiB
    with pytest.raises(CreditTimeout):
        for _ in range(10):
            await window.publish(chunk, timeout=0.2)
    assert window.resets == 1 and window.outstanding == 0
    await window.publish(chunk, timeout=0.2)
    patient = await bus.credit_window(Subjects.stream_x0("nobody"), window_bytes=1 << 20, reset_after_s=3600).start()
    with pytest.raises(CreditTimeout):
        for _ in range(10):
            await patient.publish(chunk, timeout=0.2)
    assert patient.resets == 0 and patient.outstanding > 0
    with pytest.raises(CreditTimeout):
        await patient.publish(chunk, timeout=0.1)  # still full: nothing was forgotten
    await patient.close()
    with pytest.raises(PayloadTooLarge, match="credit window"):
        await window.publish(_chunk(0, "nobody", size=128), timeout=0.2)
    await window.close()


async def test_kv_helpers(bus: Bus) -> None:
    kv = await bus.kv("rheo-test-kv", history=4)
    bm = BlockMap(epoch=1, num_blocks=4, stages=[StageAssignment(stage_id="a", block_start=0, block_end=4)])
    rev = await kv.put("current", bm)
    assert (await kv.get_message("current", BlockMap)).epoch == 1
    assert await kv.get("absent") is None
    seen: list[int] = []

    async def watch() -> None:
        async for e in kv.watch("current"):
            if e.value is not None:
                seen.append(decode(e.value, BlockMap).epoch)
            if len(seen) == 2:
                return

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.1)
    bm2 = bm.model_copy(update={"epoch": 2})
    rev2 = await kv.update("current", bm2, last=rev)
    assert rev2 > rev
    with pytest.raises(Exception, match="wrong last sequence"):
        await kv.update("current", bm, last=rev)  # compare-and-set: a stale writer loses
    await asyncio.wait_for(watcher, 5)
    assert seen == [1, 2]
    assert "current" in await kv.keys()
    await kv.delete("current")
    assert await kv.get("current") is None


async def test_a_lost_bucket_is_created_again_and_its_watches_reopen(bus: Bus, bus2: Bus, eventually) -> None:
    """The NATS store lost under running services (a bucket deleted): writes create the bucket again, and a watch
    that would otherwise wait forever on the dead bucket ends with ``BucketLost`` and can be opened again
    (``watch_keys`` does that), seeing what is written from then on."""
    kv = await bus.kv("rheo-test-lost")
    KV.LOST_CHECK_S = 0.2  # the class default (2 s) would only slow the test
    await kv.put("a", b"1")
    counted = telemetry.BUS_KV_RECREATED.labels(bucket="rheo-test-lost")
    before = counted._value.get()
    seen: list[bytes | None] = []
    reopened = asyncio.Event()

    async def on_entry(_key: str, value: bytes | None, _revision: int) -> None:
        seen.append(value)

    async def kv_for_watch() -> KV:
        if seen:
            reopened.set()
        return kv

    watch = asyncio.create_task(watch_keys(kv_for_watch, ">", on_entry, what="test", retry_s=0.05))
    try:
        await eventually(lambda: seen == [b"1"])
        await bus2._js.delete_key_value("rheo-test-lost")
        await asyncio.wait_for(reopened.wait(), 10)  # the watch noticed, created the bucket again and reopened
        assert await kv.get("a") is None  # the contents are gone: owners write them again
        await kv.put("a", b"2")
        await eventually(lambda: seen[-1:] == [b"2"])
        assert kv.recreated == 1 and counted._value.get() == before + 1
        await bus2._js.delete_key_value("rheo-test-lost")
        assert await kv.create("b", b"3") >= 1  # a write finds it gone: created again, the write retried
        assert kv.recreated == 2 and counted._value.get() == before + 2 and "b" in await kv.keys()
    finally:
        KV.LOST_CHECK_S = 2.0
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)


async def test_a_kv_watch_ends_on_its_cancel_even_where_the_cancel_was_swallowed_below_it() -> None:
    """On Python 3.11 ``asyncio.wait_for`` (nats-py's) can swallow a cancel and raise its own error instead: the
    watch loop must still end, else a service whose start failed never exits (asyncio.run waits on its tasks; the
    first GPU run of the served path hung this way, logging a failed watch twice a second)."""
    opened = asyncio.Event()

    async def swallowing_open() -> KV:
        opened.set()
        with contextlib.suppress(asyncio.CancelledError):  # what a swallowing wait_for does: the cancel
            await asyncio.sleep(60)                          # becomes another error
        raise RuntimeError("timed out")

    async def on_entry(_key: str, _value: bytes | None, _revision: int) -> None:
        raise AssertionError("no entry expected")

    watch = asyncio.create_task(watch_keys(swallowing_open, ">", on_entry, what="test", retry_s=0.01))
    await asyncio.wait_for(opened.wait(), 5)
    watch.cancel()
    done, _ = await asyncio.wait({watch}, timeout=5)
    assert watch in done and watch.cancelled()


async def test_a_kv_watch_on_a_closed_connection_ends_instead_of_retrying(nats_settings, caplog) -> None:
    """A connection closed for good (a drain, or one NATS closed) has nothing to retry on; the negative control is
    the retry of an ordinary failure (``test_a_lost_bucket_is_created_again_and_its_watches_reopen``)."""
    closed = await Bus.connect(nats_settings, name="closed")
    kv = await closed.kv("rheo-test-closed")
    await closed.close()
    calls = 0

    async def open_kv() -> KV:
        nonlocal calls
        calls += 1
        return kv

    async def on_entry(_key: str, _value: bytes | None, _revision: int) -> None:
        raise AssertionError("no entry expected")

    await asyncio.wait_for(watch_keys(open_kv, ">", on_entry, what="test", retry_s=0.01), 5)
    assert calls == 1 and "the NATS connection is closed" in caplog.text
