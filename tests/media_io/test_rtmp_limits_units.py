"""The RTMP limit policies without sockets: the pre-auth pool and its eviction, per-address caps and buckets, the
key-guess backoff, the rate-limited refusal log, and the parser pausing after a command."""

from __future__ import annotations

import logging

import pytest

from ingest.rtmp_limits import RTMP_REFUSED, ConnectionGate, KeyGuessLimiter, RefusalLog, address_bucket
from media import amf0
from media.chunkstream import COMMAND_AMF0, VIDEO, ChunkLimits, ChunkStreamParser, RtmpProtocolError, encode_message
from services.config import IngestSettings


class Conn:
    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self.evicted: str | None = None

    def evict(self, kind: str, reason: str) -> None:
        self.evicted = kind


def test_address_buckets() -> None:
    assert address_bucket("10.1.2.3") == "10.1.2.3"
    assert address_bucket("::ffff:10.1.2.3") == "10.1.2.3"
    assert address_bucket("2001:db8:1:2:aaaa::1") == address_bucket("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert address_bucket("fe80::1%eth0") == "fe80::/64"


def test_gate_caps_per_address_and_evicts_the_biggest_holders_oldest() -> None:
    gate = ConnectionGate(IngestSettings(max_preauth_connections=4, max_preauth_per_ip=3, max_connections_per_ip=5,
                                         max_connections=1))
    a = [Conn("a") for _ in range(3)]
    assert all(gate.admit(c) is None for c in a)
    assert gate.admit(Conn("a"))[0] == "preauth_ip_cap"
    b = Conn("b")
    assert gate.admit(b) is None  # the pool (4) is now full
    c = Conn("c")
    assert gate.admit(c) is None  # evicts a[0]: "a" holds the most, a[0] is its oldest
    assert a[0].evicted == "preauth_evicted" and [x.evicted for x in (*a[1:], b)] == [None, None, None]
    assert len(gate.preauth) == 4
    gate.promote(b)  # past the key check: out of the pool, into a publisher slot
    assert not gate.has_publisher_room() and len(gate.preauth) == 3
    gate.release(a[0])  # the evicted connection's task ends later: nothing is released twice
    for x in (*a[1:], b, c):
        gate.release(x)
    assert not gate.preauth and not gate.publishing and not gate.per_bucket and not gate.preauth_per_bucket


def test_gate_total_cap_per_address_counts_publishers() -> None:
    gate = ConnectionGate(IngestSettings(max_connections_per_ip=2, max_preauth_per_ip=2))
    first, second = Conn("a"), Conn("a")
    assert gate.admit(first) is None
    gate.promote(first)
    assert gate.admit(second) is None
    gate.promote(second)
    assert gate.admit(Conn("a"))[0] == "ip_cap"


def test_key_guess_backoff_per_address() -> None:
    now = [0.0]
    limiter = KeyGuessLimiter(failures=3, window_s=10, backoff_s=30, max_tracked=100, clock=lambda: now[0])
    limiter.failed("a")
    now[0] = 11.0  # the first failure left the window
    limiter.failed("a")
    limiter.failed("a")
    assert limiter.blocked_for("a") == 0
    limiter.failed("a")
    assert limiter.blocked_for("a") == 30 and limiter.blocked_for("b") == 0
    now[0] = 41.5
    assert limiter.blocked_for("a") == 0


def test_key_guess_tracking_is_bounded() -> None:
    limiter = KeyGuessLimiter(failures=2, window_s=10, backoff_s=30, max_tracked=50)
    for i in range(10_000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._recent) <= 50


def test_refusals_are_counted_and_logged_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    refusals = RefusalLog(interval_s=10, clock=lambda: now[0])
    before = RTMP_REFUSED.labels(reason="preauth_ip_cap")._value.get()
    with caplog.at_level(logging.WARNING, logger="rheo.ingest.rtmp"):
        for i in range(300):
            refusals.note("preauth_ip_cap", f"127.0.0.2:{i}", "per-address cap")
        now[0] = 10.0
        refusals.note("preauth_ip_cap", "127.0.0.2:1", "per-address cap")
    assert refusals.counts["preauth_ip_cap"] == 301
    assert RTMP_REFUSED.labels(reason="preauth_ip_cap")._value.get() - before == 301
    assert len(caplog.records) == 2 and "300 connections closed (preauth_ip_cap)" in caplog.records[1].getMessage()
    with pytest.raises(ValueError):
        refusals.note("10.0.0.1", "peer", "an unbounded label")  # type: ignore[arg-type]


def test_parser_pauses_after_a_command_so_limits_can_change() -> None:
    """Before the key check the budget is small; the video right behind ``publish`` in one read is parsed under the
    publishing limits once the caller lifted them."""
    publish = encode_message(3, COMMAND_AMF0, 1, 0, amf0.encode("publish", 3.0, None, "key", "live"), 128)
    video = encode_message(6, VIDEO, 1, 0, bytes(5000), 128)
    parser = ChunkStreamParser(ChunkLimits(max_message_bytes=1024, max_pending_bytes=1024))
    messages = parser.feed(publish + video, stop=lambda m: m.type_id == COMMAND_AMF0)
    assert [m.type_id for m in messages] == [COMMAND_AMF0] and parser.paused
    parser.limits = ChunkLimits()
    assert [len(m.payload) for m in parser.feed(b"")] == [5000] and not parser.paused
    strict = ChunkStreamParser(ChunkLimits(max_message_bytes=1024, max_pending_bytes=1024))
    with pytest.raises(RtmpProtocolError, match="exceeds the cap of 1024"):
        strict.feed(publish + video)
