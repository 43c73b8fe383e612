"""Flood isolation on the bus (services/dispatch.py): a served stream's messages keep their latency while a flood of
malformed frames and of slow unknown-stream messages arrives on the same wildcard subscription (real nats-server);
every message is accounted for, the log stays short, no metric series per attacker-chosen subject."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import torch
from nats.aio.msg import Msg
from prometheus_client import REGISTRY

from proto import CHANNELS, LatentChunk, Subjects
from services.bus import Bus
from services.config import NatsSettings
from services.dispatch import NEWCOMERS, Dispatcher, LaneLimits, channel_of
from services.droplog import DropLog
from support.sync import settle

LIVE = "live"
N_BAD, N_SLOW = 20_000, 3_000
SLOW_HANDLER_S = 0.002  # an unknown stream's message costs this much (a decoder opening a stream, say)


def _chunk(stream: str, seq: int) -> LatentChunk:
    return LatentChunk(stream_id=stream, seed=0, fps=16.0, seq=seq, epoch=0, latent_start=seq, rope_start=seq,
                       capture_time=time.monotonic(), deadline=1.0, prompt_version=0, noise_scale=0.8,
                       timesteps=[700], latent=torch.zeros((1, 16, 4, 4)))


def _flood(settings: NatsSettings, done: threading.Event) -> None:
    """Another client, in its own thread and loop, at full speed: malformed frames and well-formed chunks, each on
    a subject of its own."""

    async def run() -> None:
        bus = await Bus.connect(settings, name="flood")
        try:
            good = _chunk("x", 0).encode()
            for i in range(N_BAD):
                await bus.nc.publish(f"rheo.stream.bad{i}.latent.0", b"RH\x01\x00\xff\xff\xff\x7fnot a message")
                if i < N_SLOW:
                    await bus.nc.publish(Subjects.stream_latent(f"slow{i}"), good)
            await bus.nc.flush()
        finally:
            await bus.close()

    asyncio.run(run())
    done.set()


def _series(prefix: str = "rheo_bus_") -> list[tuple[str, dict[str, str]]]:
    return [(s.name, s.labels) for m in REGISTRY.collect() for s in m.samples
            if s.name.startswith(prefix) and not s.name.endswith("_created")]


@pytest.mark.timeout(120)
async def test_a_flood_on_unknown_streams_does_not_delay_a_served_stream(
        bus: Bus, bus2: Bus, nats_settings: NatsSettings, eventually, caplog: pytest.LogCaptureFixture) -> None:
    latencies: list[float] = []
    slow_handled = [0]

    async def handler(msg: LatentChunk, _raw: Msg) -> None:
        if msg.stream_id == LIVE:
            latencies.append(time.monotonic() - msg.capture_time)
        else:
            slow_handled[0] += 1
            await asyncio.sleep(SLOW_HANDLER_S)

    await bus2.subscribe(Subjects.ring_latents("0"), handler, expected=LatentChunk,  # as a first stage does
                         known=lambda key: key == LIVE)
    await settle(bus2, bus)
    series_before = _series()
    sent = [0]

    async def live(until: threading.Event | None, n: int = 0) -> None:
        while (until is not None and not until.is_set()) or sent[0] < n:
            await bus.publish(Subjects.stream_latent(LIVE), _chunk(LIVE, sent[0]))
            sent[0] += 1
            await asyncio.sleep(0.02)

    await live(None, 25)  # the baseline: no flood
    await eventually(lambda: len(latencies) == 25)
    baseline = max(latencies)

    caplog.set_level(logging.INFO, logger="rheo.bus")
    done = threading.Event()
    flood = asyncio.create_task(asyncio.to_thread(_flood, nats_settings, done))
    await live(done)
    await flood
    total = N_BAD + N_SLOW + sent[0]
    await eventually(lambda: bus2.stats.received + bus2.stats.dropped == total, timeout=60)
    flooded = max(latencies[25:])

    # the served stream: every message, never later than the baseline allows
    assert len(latencies) == sent[0], (len(latencies), sent[0])
    assert flooded <= baseline + 1.0, f"served stream delayed {flooded:.3f} s under the flood (baseline " \
                                      f"{baseline:.3f} s)"
    # nothing lost silently: decoded and failed, handled, or dropped with a reason before decoding
    assert bus2.stats.malformed + slow_handled[0] + len(latencies) + bus2.stats.dropped == total
    assert bus2.stats.dropped > 0 and slow_handled[0] <= N_SLOW
    # a few log lines (one per reason and interval), not one per message
    lines = [r for r in caplog.records if r.name == "rheo.bus"]
    assert len(lines) <= 6, [r.getMessage() for r in lines]
    # no series per subject: the flood added at most a series per drop reason of this channel
    after = _series()
    assert not [s for s in after if any("bad" in v or "slow" in v for v in s[1].values())]
    assert len(after) - len(series_before) <= 6, sorted(set(map(str, after)) - set(map(str, series_before)))


def _msg(subject: str, data: bytes) -> Msg:
    return Msg(_client=None, subject=subject, data=data)  # type: ignore[arg-type]


async def test_lanes_keep_order_per_key_and_bound_what_they_hold() -> None:
    order: list[bytes] = []
    known: set[str] = set()
    gate = asyncio.Event()

    async def process(msg: Msg) -> None:
        order.append(msg.data)
        if msg.data == b"1":
            known.add("a")  # served from its first message on (a decoder opening the stream)
            await gate.wait()

    d = Dispatcher("rheo.stream.*.x0", process, known=known.__contains__, lane=LaneLimits(4, 1 << 20),
                   max_message_bytes=1000)
    subject = Subjects.stream_x0("a")
    d.offer(_msg(subject, b"1"))
    d.offer(_msg(subject, b"2"))
    await asyncio.sleep(0.01)  # 1 is being handled; "a" is known now, 2 still waits among the newcomers
    d.offer(_msg(subject, b"3"))  # behind 2, not ahead of it in a lane of its own
    gate.set()
    await d.idle()
    d.offer(_msg(subject, b"4"))  # nothing of "a" waits: its own lane
    assert "a" in d._lanes
    await d.idle()
    assert order == [b"1", b"2", b"3", b"4"] and not d._lanes and not d._waiting

    # bounds: the newcomers lane, a known key's lane, sizes and subject tokens are checked before anything else
    gate.clear()
    order.clear()
    known.add("b")
    for i in range(NEWCOMERS.msgs + 10):
        d.offer(_msg(Subjects.stream_x0(f"n{i}"), b"x"))
    for _ in range(6):
        d.offer(_msg(Subjects.stream_x0("b"), b"y"))
    d.offer(_msg(Subjects.stream_x0("b"), bytes(2000)))
    d.offer(_msg("rheo.stream.a%b.x0", b"z"))
    assert d.dropped == {"newcomers_full": 10, "lane_full": 2, "oversize": 1, "bad_subject": 1}, d.dropped
    await d.idle()
    assert len(order) == NEWCOMERS.msgs + 4


def test_metric_labels_are_channels_never_subjects() -> None:
    assert channel_of(CHANNELS["stream_latent"].wildcard()) == "stream_latent"
    assert channel_of(Subjects.stream_x0("any-id")) == "stream_x0"
    assert channel_of(Subjects.heartbeat("dit-stage", "m1")) == "ctl_heartbeat"
    assert channel_of("_INBOX.abc.def") == "other"


async def test_drop_log_writes_a_pending_summary_when_its_interval_is_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="rheo.test")
    drops = DropLog("bus x", noun="message", logger=logging.getLogger("rheo.test"), interval_s=0.05)
    for i in range(100):
        drops.note("malformed", f"m{i}")

    def lines() -> list[str]:  # this log's only: other tests' drop logs share the session's loop and caplog
        return [r.getMessage() for r in caplog.records if r.name == "rheo.test"]

    assert len(lines()) == 1
    await asyncio.sleep(0.3)  # no further drop: the timer writes the summary
    assert lines()[1:] == ["bus x: 99 messages dropped (malformed) in the last 0 s (latest: m99)"]


async def test_slow_consumer_drops_are_counted(bus: Bus, bus2: Bus, eventually,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """nats-py's own queue in front of the dispatcher overflows only if the loop stops: its drops are counted too."""
    import services.bus

    monkeypatch.setattr(services.bus, "NATS_PENDING_MSGS", 5)
    subject = Subjects.stream_spec("slowc")
    await bus2.subscribe(subject, lambda *_: asyncio.sleep(0))
    await settle(bus2, bus)

    def slow_consumer() -> float:
        return REGISTRY.get_sample_value("rheo_bus_dropped_messages_total",
                                         {"channel": "stream_spec", "reason": "slow_consumer"}) or 0.0

    before, received = slow_consumer(), bus2.stats.received
    for _ in range(200):
        await bus.nc.publish(subject, b"x")
    await bus.nc.flush()
    time.sleep(0.3)  # the loop stops: everything arrives at once, more than nats-py may queue
    await eventually(lambda: bus2.stats.received - received + slow_consumer() - before == 200)
    assert slow_consumer() > before
