"""Hostile and broken RTMP clients: each one only ever affects its own connection, and gets a logged reason.

Every scenario runs next to a good real-time publisher, whose frames must all arrive, in order.
"""

from __future__ import annotations

import asyncio
import random
import time

from media import amf0
from media.chunkstream import COMMAND_AMF0, SET_CHUNK_SIZE, VIDEO, control_message, encode_message
from media_io.mediakit import RawRtmp, ingest_server, publish_pyav

KEYS = {
    "key-good": "good",
    "key-cut": "cut",
    "key-idle": "idle",
    "key-trunc": "trunc",
    "key-huge": "huge",
    "key-amf": "amf",
    "key-8k": "eightk",
}
GOOD_FRAMES = 48  # 3 s at 16 fps: chunks 0..10 hold frames 0..44


async def good_publisher(port: int):
    return await publish_pyav(f"rtmp://127.0.0.1:{port}/live/key-good", GOOD_FRAMES, 16, "320x240", "--realtime")


async def published(port: int, key: str) -> RawRtmp:
    client = await RawRtmp.open(port)
    client.connect_and_publish(key)
    await client.writer.drain()
    await asyncio.sleep(0.2)
    return client


async def random_bytes_after_handshake(port: int) -> bytes:
    client = await RawRtmp.open(port)
    client.writer.write(random.Random(5).randbytes(64 * 1024))
    return await client.read_until_closed()


async def bad_version(port: int) -> bytes:
    client = await RawRtmp.open(port, handshake=False)
    client.writer.write(b"\x06" + bytes(1536))
    return await client.read_until_closed()


async def truncated_chunk_then_close(port: int) -> None:
    client = await published(port, "key-trunc")
    message = encode_message(6, VIDEO, 1, 0, b"\x17\x01\x00\x00\x00" + bytes(3000), 128)
    client.writer.write(message[:1000])
    await client.writer.drain()
    client.close()


async def huge_declared_length(port: int) -> bytes:
    # RTMP's length field is 24 bits, so 16 MiB - 1 is the largest a chunk header can declare.
    client = await published(port, "key-huge")
    header = (
        bytes([6]) + (0).to_bytes(3, "big") + (0xFFFFFF).to_bytes(3, "big") + bytes([VIDEO]) + (1).to_bytes(4, "little")
    )
    client.writer.write(header + bytes(100))
    return await client.read_until_closed()


async def two_gigabyte_amf_string(port: int) -> bytes:
    # The 2 GB declaration that fits in RTMP: an AMF0 long string claiming 2**31 - 1 bytes.
    client = await published(port, "key-amf")
    payload = amf0.encode("releaseStream", 9.0, None) + b"\x0c" + (2**31 - 1).to_bytes(4, "big") + b"abc"
    client.writer.write(encode_message(3, COMMAND_AMF0, 0, 0, payload, 128))
    return await client.read_until_closed()


async def oversized_chunk_size(port: int) -> bytes:
    client = await RawRtmp.open(port)
    client.writer.write(control_message(SET_CHUNK_SIZE, 1 << 30))
    return await client.read_until_closed()


async def silent_after_connect(port: int) -> bytes:
    client = await RawRtmp.open(port, handshake=False)
    return await client.read_until_closed(timeout=10)


async def idle_publisher(port: int) -> bytes:
    client = await published(port, "key-idle")
    return await client.read_until_closed(timeout=10)


async def test_hostile_clients_do_not_disturb_a_good_publisher() -> None:
    async with ingest_server(KEYS, handshake_timeout_s=1.5, idle_timeout_s=1.5, max_width=1920, max_height=1080) as (
        server,
        col,
    ):
        port = server.port
        t0 = time.monotonic()
        good, *_ = await asyncio.gather(
            good_publisher(port),
            random_bytes_after_handshake(port),
            bad_version(port),
            truncated_chunk_then_close(port),
            huge_declared_length(port),
            two_gigabyte_amf_string(port),
            oversized_chunk_size(port),
            silent_after_connect(port),
            idle_publisher(port),
            publish_pyav(f"rtmp://127.0.0.1:{port}/live/key-cut", 40, 16, "320x240", "--abort-after", "24"),
            publish_pyav(f"rtmp://127.0.0.1:{port}/live/key-8k", 3, 16, "7680x4320", "--realtime"),
        )
        assert good.report.get("ok"), good
        await col.finished("good")
        await col.finished("cut")
        elapsed = time.monotonic() - t0
    assert col.frame_indices("good") == list(range(45))
    good_stream = col.streams["good"]
    assert good_stream.pacer.stats.frames_in == GOOD_FRAMES and good_stream.pacer.stats.dropped == 0
    assert good_stream.queue.stats.dropped == 0

    cut = col.frame_indices("cut")
    assert cut == list(range(len(cut))) and len(cut) >= 5  # an abrupt close loses nothing already received

    reasons = [reason for _, reason in server.refusals]

    def seen(fragment: str) -> bool:
        return any(fragment in r for r in reasons)

    assert seen("protocol error") or seen("handshake/publish timeout")  # random bytes
    assert seen("unsupported RTMP version 6")
    assert seen("connection closed mid-message")
    assert seen("message length 16777215 exceeds the cap")
    assert seen("bad AMF0 command: truncated AMF0 value")
    assert seen("chunk size 1073741824 outside")
    assert seen("handshake/publish timeout")
    assert seen("idle timeout")
    assert seen("video 7680x4320 exceeds the 1920x1080 cap")
    assert "eightk" not in col.chunks or col.frame_indices("eightk") == []
    assert elapsed < 30


async def test_ten_thousand_connections_opened_and_dropped() -> None:
    async with ingest_server(KEYS, max_preauth_connections=256, max_preauth_per_ip=256) as (server, col):
        port = server.port

        async def churn(count: int) -> int:
            opened = 0
            for i in range(count):
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    continue
                opened += 1
                if i % 3 == 0:
                    writer.write(b"\x03" + bytes(100))  # a partial handshake, then gone
                writer.transport.abort()
            return opened

        good_task = asyncio.create_task(good_publisher(port))
        counts = await asyncio.gather(*(churn(10_000 // 50) for _ in range(50)))
        good = await good_task
        assert good.report.get("ok"), good
        await col.finished("good")
        await asyncio.sleep(0.2)
        assert len(server._sessions) == 0
    assert sum(counts) >= 9_900
    assert server.stats.connections >= 9_900
    assert server.stats.probes > 5_000  # connect + close without a byte: counted, logged at debug only
    assert server.stats.refused["protocol"] > 2_000  # the partial handshakes
    assert any("truncated handshake" in r for _, r in server.refusals)
    assert col.frame_indices("good") == list(range(45))
    assert col.streams["good"].pacer.stats.frames_in == GOOD_FRAMES


async def test_publisher_cap_refuses_the_extra_publisher() -> None:
    """``max_connections`` counts publishers (connections past the key check); the next one is told why."""
    async with ingest_server(KEYS, max_connections=2) as (server, _):
        held = [await published(server.port, key) for key in ("key-idle", "key-trunc")]
        extra = await published(server.port, "key-huge")
        assert b"connection cap of 2 publishers reached" in await extra.read_until_closed(timeout=3)
        for client in held:
            client.close()
    assert server.stats.refused["connection_cap"] == 1
