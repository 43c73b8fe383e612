"""RTMP limits against the real server: a pre-auth hold does not lock a publisher out, unauthenticated memory is
bounded, slow drips are closed, key guessing is throttled per address. Attackers bind 127.0.0.x (x ≥ 2): on Linux
the whole 127.0.0.0/8 is loopback, so they are other addresses to the server; publishers stay on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from media.chunkstream import AUDIO, COMMAND_AMF0, HANDSHAKE_SIZE, SET_CHUNK_SIZE, control_message, encode_message
from media_io.mediakit import RawRtmp, ingest_server, publish_pyav
from services.config import IngestSettings

KEYS = {"key-good": "good", "key-drip": "drip"}
# The per-address caps as shipped (mediakit raises them for tests whose clients all share 127.0.0.1).
SHIPPED = {k: IngestSettings.model_fields[k].default for k in ("max_preauth_per_ip", "max_connections_per_ip")}
_READ_LIMIT = 1 << 16  # ingest.server's StreamReader limit: a paused reader holds at most 2x this


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def _open_from(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    with contextlib.suppress(OSError):
        return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    return None


def _unfinished_command(declared: int, sent: int) -> bytes:
    """A fmt-0 command chunk header declaring ``declared`` bytes, then ``sent`` of them (chunk size raised)."""
    head = bytes([3]) + (0).to_bytes(3, "big") + declared.to_bytes(3, "big") + bytes([COMMAND_AMF0]) + bytes(4)
    return control_message(SET_CHUNK_SIZE, 65536) + head + bytes(sent)


async def test_a_preauth_hold_does_not_lock_out_a_publisher() -> None:
    """300 version-byte sockets from one address, and sockets from 40 more that stall mid-handshake or hold an
    unfinished message: the per-address caps and the pre-auth pool (evicting the biggest holder's oldest) keep a
    publisher on 127.0.0.1 able to go live. Before these limits, 256 idle sockets held every slot."""
    async with ingest_server(KEYS, handshake_timeout_s=30, **SHIPPED) as (server, col):
        port = server.port
        held = [c for c in await asyncio.gather(*(_open_from(port, "127.0.0.2") for _ in range(300))) if c]
        for _, w in held:
            w.write(b"\x03")
        for i in range(40):
            for j in range(4):
                if (c := await _open_from(port, f"127.0.0.{10 + i}")) is None:
                    continue
                held.append(c)
                if j % 2:
                    c[1].write(b"\x03" + bytes(100))  # stalls mid-handshake
                else:
                    client = RawRtmp(*c)
                    c[1].write(b"\x03" + bytes(HANDSHAKE_SIZE))
                    with contextlib.suppress(Exception):
                        s0s1s2 = await asyncio.wait_for(c[0].readexactly(1 + 2 * HANDSHAKE_SIZE), 2)
                        client.writer.write(s0s1s2[1 : 1 + HANDSHAKE_SIZE] + _unfinished_command(60_000, 50_000))
        assert len(held) >= 400
        assert len(server.gate.preauth) == server.settings.max_preauth_connections  # the pool is full
        t0 = time.monotonic()
        good = await publish_pyav(f"rtmp://127.0.0.1:{port}/live/key-good", 24, 16, "320x240")
        elapsed = time.monotonic() - t0
        assert good.report.get("ok"), good
        await col.finished("good")
        for _, w in held:
            w.transport.abort()
    assert col.frame_indices("good") == list(range(21))  # chunks of 4 frames (the 24th frame's chunk is short)
    refused = server.stats.refused
    assert refused["preauth_ip_cap"] >= 292  # 127.0.0.2 holds at most max_preauth_per_ip (8) of its 300
    assert refused["preauth_evicted"] > 0  # 41 addresses x 4 > the pool of 64: the oldest made room
    assert elapsed < 20, elapsed


async def test_unauthenticated_memory_is_bounded() -> None:
    """256 unauthenticated connections (64 addresses x 4) holding unfinished messages: half 50 KB of a 60 KB
    command (under the 64 KiB pre-auth cap), half 512 KiB of a declared 1 MiB one. The server holds at most
    ``max_preauth_connections x (preauth_buffer_bytes + 2 x 64 KiB read buffer)`` = 64 x 192 KiB = 12 MiB for them
    (before: up to 32 MiB pending per connection, 8 GiB for 256), and its RSS grows by less than 64 MiB."""
    async with ingest_server(KEYS, handshake_timeout_s=30, **SHIPPED) as (server, _):
        port = server.port
        rss0 = _rss_bytes()

        async def attacker(i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
            c = await _open_from(port, f"127.0.0.{100 + i // 4}")
            if c is None:
                return None
            with contextlib.suppress(Exception):
                c[1].write(b"\x03" + bytes(HANDSHAKE_SIZE))
                s0s1s2 = await asyncio.wait_for(c[0].readexactly(1 + 2 * HANDSHAKE_SIZE), 5)
                body = _unfinished_command(60_000, 50_000) if i % 2 else _unfinished_command(1 << 20, 512 << 10)
                c[1].write(s0s1s2[1 : 1 + HANDSHAKE_SIZE] + body)
            return c

        conns = [c for c in await asyncio.gather(*(attacker(i) for i in range(256))) if c]
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # until the server has read what it will hold
            holding = [s for s in server._sessions if s.stream is None and s.parser.pending_bytes >= 50_000]
            if len(holding) >= 32:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        budget = server.settings.max_preauth_connections * (server.settings.preauth_buffer_bytes + 2 * _READ_LIMIT)
        buffered = server.preauth_buffered_bytes
        held_at_end = len(server.gate.preauth)
        closed = sum(server.stats.refused.values())
        growth = _rss_bytes() - rss0
        for _, w in conns:
            w.transport.abort()
    assert len(conns) == 256
    assert len(holding) >= 32, len(holding)  # the under-cap messages are really held, unfinished
    assert 32 * 50_000 <= buffered <= budget, (buffered, budget)
    assert growth < 64 << 20, growth
    assert held_at_end <= server.settings.max_preauth_connections
    assert held_at_end + closed == 256  # every other one was closed with a counted reason (evicted, over the cap)


async def test_slow_drip_publishers_are_closed_within_the_frame_floor() -> None:
    """After publish, one byte every 0.5 s (never a whole frame) keeps the idle timeout quiet but not the frame
    floor; a real-time publisher beside it, sending longer than the floor, is untouched."""
    floor = 2.0
    async with ingest_server(KEYS, frame_timeout_s=floor, idle_timeout_s=5.0) as (server, col):
        port = server.port
        good = asyncio.create_task(publish_pyav(f"rtmp://127.0.0.1:{port}/live/key-good", 40, 16, "320x240",
                                                "--realtime"))  # 2.5 s: longer than the floor
        drip = await RawRtmp.open(port)
        drip.connect_and_publish("key-drip")
        assert b"NetStream.Publish.Start" in await drip.read_until(b"NetStream.Publish.Start")
        t0 = time.monotonic()
        header = bytes([6]) + bytes(3) + (3000).to_bytes(3, "big") + bytes([9]) + (1).to_bytes(4, "little")
        drip.writer.write(header)
        with contextlib.suppress(ConnectionError):
            for _ in range(40):  # 20 s of drip, unless closed
                drip.writer.write(b"\x17")
                await drip.writer.drain()
                if drip.reader.at_eof() or drip.writer.transport.is_closing():
                    break
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(drip.reader.read(65536), 0.5) == b"":
                        break
        closed_after = time.monotonic() - t0
        assert (await good).report.get("ok")
        await col.finished("good")
        await col.finished("drip")
    assert floor - 0.1 <= closed_after < floor + 2.0, closed_after
    assert server.stats.refused["no_frames"] == 1
    assert "no video frame for 2 s" in col.streams["drip"].end_reason
    assert col.frame_indices("good") == list(range(37))


async def test_an_audio_only_publisher_is_refused_with_a_reason() -> None:
    """AAC without any video message: past ``ingest.audio_only_grace_s`` the publisher gets an onStatus error that
    says why, the refusal is counted as ``audio_only`` and the stream's end reason says it (nothing silent)."""
    grace = 1.0
    async with ingest_server(KEYS, audio_only_grace_s=grace) as (server, col):
        client = await RawRtmp.open(server.port)
        client.connect_and_publish("key-good")
        assert b"NetStream.Publish.Start" in await client.read_until(b"NetStream.Publish.Start")
        t0 = time.monotonic()
        sent = bytearray()
        with contextlib.suppress(ConnectionError):
            for i in range(40):  # 8 s of 5 AAC frames a second, unless refused
                aac = bytes([0xAF, 0x00 if i == 0 else 0x01]) + (b"\x12\x10" if i == 0 else bytes(32))
                client.writer.write(encode_message(4, AUDIO, 1, i * 200, aac, 128))
                await client.writer.drain()
                with contextlib.suppress(TimeoutError):
                    got = await asyncio.wait_for(client.reader.read(65536), 0.2)
                    sent += got
                    if not got or b"audio only" in sent:
                        break
        refused_after = time.monotonic() - t0
        await col.finished("good")
    assert b"NetStream.Publish.Rejected" in sent and b"audio only" in sent, bytes(sent[-200:])
    assert grace - 0.1 <= refused_after < grace + 2.0, refused_after
    assert server.stats.refused["audio_only"] == 1
    assert "audio only" in col.streams["good"].end_reason


async def test_key_guessing_is_throttled_per_address() -> None:
    """After ``key_failures_per_ip`` bad keys, the address is refused (the right key too) with a clear onStatus
    error and counted; another address publishes the same key at once."""
    async with ingest_server(KEYS, key_failures_per_ip=3, key_backoff_s=30, **SHIPPED) as (server, col):
        port = server.port

        async def attempt(key: str, source: str) -> bytes:
            client = await RawRtmp.open(port, source=source)
            client.connect_and_publish(key)
            reply = await client.read_until(b"NetStream.Publish.Start")
            client.close()
            return reply

        for i in range(3):
            assert b"bad stream key" in await attempt(f"guess-{i}", "127.0.0.2")
        blocked = await attempt("key-good", "127.0.0.2")
        assert b"too many failed stream keys from this address; retry in 30 s" in blocked
        assert b"NetStream.Publish.Start" not in blocked
        assert b"NetStream.Publish.Start" in await attempt("key-good", "127.0.0.3")
        await col.finished("good")
    assert server.stats.refused["bad_key"] == 3
    assert server.stats.refused["key_rate_limited"] == 1
