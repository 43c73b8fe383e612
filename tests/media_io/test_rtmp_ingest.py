"""RTMP ingest end to end: real publishers (PyAV flv muxer, ffmpeg CLI) over loopback into RtmpServer."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from media import amf0
from media.aac import AacConfig
from media.chunkstream import ACKNOWLEDGEMENT, COMMAND_AMF0, WINDOW_ACK_SIZE, ChunkStreamParser, control_message
from media_io.audiokit import RATE, TONE_HZ, decode_audio, dominant_hz
from media_io.mediakit import FFMPEG, RawRtmp, ingest_server, publish_ffmpeg, publish_pyav, read_barcode
from proto.clock import ChunkClock

CLOCK = ChunkClock()


def expected_sizes(frames: int) -> list[int]:
    """Chunk sizes that ``frames`` paced frames fill completely (the tail of a partial chunk is not emitted)."""
    sizes, used, c = [], 0, 0
    while used + CLOCK.input_frames(c) <= frames:
        sizes.append(CLOCK.input_frames(c))
        used += sizes[-1]
        c += 1
    return sizes


async def test_pyav_publisher_frames_arrive_in_order_with_model_size() -> None:
    async with ingest_server(width=160, height=120) as (server, col):
        result = await publish_pyav(f"rtmp://127.0.0.1:{server.port}/live/key-a", 45)
        assert result.report.get("ok"), result
        chunks = await col.finished("stream-a")
    assert [c.seq for c in chunks] == list(range(11))
    assert [c.num_frames for c in chunks] == expected_sizes(45) == [5] + [4] * 10
    assert all(c.frames.shape[1:] == (120, 160, 3) and c.frames.dtype == np.uint8 for c in chunks)
    assert col.frame_indices("stream-a") == list(range(45))
    times = [t for c in chunks for t in c.frame_times]
    assert times == sorted(times) and np.allclose(np.diff(times), 1 / 16)
    assert all(c.deadline == pytest.approx(c.capture_time + 1.0) for c in chunks)
    stream = col.streams["stream-a"]
    assert stream.metadata["width"] == 320 and stream.stats.sessions == 1


async def test_resize_and_centre_crop_to_a_different_aspect() -> None:
    # 320x240 (4:3) into 96x96: scaled to 128x96, then 16 px cropped from each side.
    async with ingest_server(width=96, height=96) as (server, col):
        result = await publish_pyav(f"rtmp://127.0.0.1:{server.port}/live/key-a", 21)
        assert result.report.get("ok"), result
        chunks = await col.finished("stream-a")
    assert sum(c.num_frames for c in chunks) == 21
    assert chunks[0].frames.shape[1:] == (96, 96, 3)


async def test_frame_rate_is_converted_by_dropping() -> None:
    # 32 fps in, 16 fps out: every second frame is dropped against the source timestamps.
    async with ingest_server(fps=16) as (server, col):
        result = await publish_pyav(f"rtmp://127.0.0.1:{server.port}/live/key-a", 90, 32)
        assert result.report.get("ok"), result
        await col.finished("stream-a")
    indices = col.frame_indices("stream-a")
    assert indices == list(range(0, 90, 2))[: len(indices)] and len(indices) == 45
    assert col.streams["stream-a"].pacer.stats.dropped == 45


@pytest.mark.skipif(FFMPEG is None, reason="ffmpeg CLI not installed (apt-get install ffmpeg)")
async def test_ffmpeg_cli_publisher_with_audio_and_b_frames() -> None:
    """…and its AAC passes through: batched, stamped on the video's capture clock (the tone starting at 1.5 s
    lands on the capture time of frame 24, the frame of source time 1.5 s)."""
    tone = r"aevalsrc=if(gte(t\,1.5)\,0.5*sin(2*PI*1000*t)\,0):s=44100"
    async with ingest_server() as (server, col):
        result = await publish_ffmpeg(f"rtmp://127.0.0.1:{server.port}/live/key-a", 45, audio=tone)
        assert result.returncode == 0, result.stderr[-2000:]
        chunks = await col.finished("stream-a")
    stream = col.streams["stream-a"]
    assert sum(c.num_frames for c in chunks) == 45
    assert col.frame_indices("stream-a") == list(range(45))
    assert stream.stats.frames_decoded == 45 and stream.stats.decode_errors == 0
    assert stream.stats.reordered_frames > 0  # B-frames: pts = dts + composition time was exercised
    assert stream.stats.audio_messages > 0 and stream.audio_config  # audio accepted, kept, not decoded
    assert stream.metadata.get("width") == 320 and stream.metadata.get("audiocodecid") == 10
    units = [u for m in col.audio["stream-a"] for u in m.units]
    assert stream.audio.stats.units["published"] == len(units) >= 1.5 * RATE / 1024  # before the 1st frame: counted
    assert 10 <= len(col.audio["stream-a"]) <= 25  # ≈150 ms batches, not one message per AAC frame
    config = AacConfig.parse(col.audio["stream-a"][0].config)
    samples, _, rate = decode_audio(b"".join(config.adts(u.data) for u in units))
    assert dominant_hz(samples[-8192:], rate) == pytest.approx(TONE_HZ, abs=10)
    loud = int(np.flatnonzero(np.abs(samples) > 0.1)[0])
    onset = units[loud // 1024].capture_time + (loud % 1024) / rate
    marked = next(t for c in chunks for f, t in zip(c.frames, c.frame_times, strict=True) if read_barcode(f) == 24)
    assert abs(onset - marked) <= 0.05, f"audio stamped {(onset - marked) * 1000:.0f} ms off its video"


async def test_three_publishers_with_different_keys_and_two_refused() -> None:
    keys = {"key-a": "stream-a", "key-b": "stream-b", "key-c": "stream-c"}
    async with ingest_server(keys) as (server, col):
        base = f"rtmp://127.0.0.1:{server.port}"
        results = await asyncio.gather(
            *(publish_pyav(f"{base}/live/{k}", 45, 16, "320x240", "--start", str(i * 50)) for i, k in enumerate(keys)),
            publish_pyav(f"{base}/live/wrong-key", 10),
            publish_pyav(f"{base}/other/key-a", 10),
        )
        for sid in keys.values():
            await col.finished(sid)
    for i, (sid, result) in enumerate(zip(keys.values(), results, strict=False)):
        assert result.report.get("ok"), result
        assert col.frame_indices(sid) == [(i * 50 + n) % 256 for n in range(45)]
    bad_key, bad_app = results[3].report, results[4].report
    assert not bad_key["ok"] and any("bad stream key" in line for line in bad_key["log"]), bad_key
    assert not bad_app["ok"] and any("unknown application 'other'" in line for line in bad_app["log"]), bad_app
    reasons = [r for _, r in server.refusals]
    assert "bad stream key" in reasons and "unknown application 'other'" in reasons
    assert set(col.streams) == set(keys.values())


@pytest.mark.skipif(FFMPEG is None, reason="ffmpeg CLI not installed (apt-get install ffmpeg)")
async def test_ffmpeg_cli_sees_the_refusal_reason() -> None:
    async with ingest_server() as (server, _):
        result = await publish_ffmpeg(f"rtmp://127.0.0.1:{server.port}/live/nope", 10)
    assert result.returncode != 0
    assert "bad stream key" in result.stderr


async def test_reconnect_with_the_same_key_resumes_the_stream() -> None:
    async with ingest_server(stream_linger_s=5.0) as (server, col):
        url = f"rtmp://127.0.0.1:{server.port}/live/key-a"
        assert (await publish_pyav(url, 21)).report.get("ok")
        await asyncio.sleep(0.2)
        stream = server.streams["stream-a"]
        assert not stream.publishing and not stream.ended
        assert (await publish_pyav(url, 20, 16, "320x240", "--start", "21")).report.get("ok")
        await asyncio.sleep(0.2)
        assert server.streams["stream-a"] is stream and stream.stats.sessions == 2
        server._end_stream(stream)
        chunks = await col.finished("stream-a")
    assert [c.seq for c in chunks] == list(range(10))  # 5 + 4*4 = 21, then 4*5 = 20: no new chunk 0
    assert col.frame_indices("stream-a") == list(range(41))


async def test_unsupported_codec_is_refused_with_a_reason() -> None:
    async with ingest_server() as (server, col):
        url = f"rtmp://127.0.0.1:{server.port}/live/key-a"
        result = await publish_pyav(url, 16, 16, "320x240", "--codec", "libx265", "--realtime")
        await asyncio.sleep(0.1)
    assert not result.report.get("ok")
    reasons = [r for _, r in server.refusals]
    assert any("unsupported video codec" in r and "hvc1" in r for r in reasons), reasons
    assert any("unsupported video codec" in line for line in result.report["log"]), result.report
    assert col.frame_indices("stream-a") == []


async def test_play_is_refused() -> None:
    async with ingest_server() as (server, _):
        client = await RawRtmp.open(server.port)
        client.command(0, "connect", 1, {"app": "live"})
        client.command(0, "createStream", 2, None)
        client.command(1, "play", 3, None, "key-a")
        reply = await client.read_until_closed()
        client.close()
    assert b"NetStream.Play.Failed" in reply
    assert any("only accepts publishers" in r for _, r in server.refusals)


async def test_server_acknowledges_per_the_client_window_and_answers_the_publish_sequence() -> None:
    async with ingest_server() as (server, _):
        client = await RawRtmp.open(server.port)
        client.writer.write(control_message(WINDOW_ACK_SIZE, 1000))
        client.command(0, "connect", 1, {"app": "live", "padding": "x" * 1500})
        for txn, name in ((2, "releaseStream"), (3, "FCPublish")):
            client.command(0, name, txn, None, "key-a")
        client.command(0, "createStream", 4, None)
        client.command(1, "publish", 5, None, "key-a", "live")
        await client.writer.drain()
        parser, got = ChunkStreamParser(), []
        async with asyncio.timeout(5):
            while not any(m.type_id == COMMAND_AMF0 and b"NetStream.Publish.Start" in m.payload for m in got):
                got += parser.feed(await client.reader.read(65536))
        client.close()
    acks = [int.from_bytes(m.payload[:4], "big") for m in got if m.type_id == ACKNOWLEDGEMENT]
    assert acks and acks[0] >= 1000
    results = [amf0.decode_all(m.payload) for m in got if m.type_id == COMMAND_AMF0]
    assert [r[1] for r in results if r[0] == "_result"] == [1, 2, 3, 4]  # connect, releaseStream, FCPublish, create
    assert results[0][3]["code"] == "NetConnection.Connect.Success"
    assert [r[3] for r in results if r[0] == "_result" and r[1] == 4] == [1.0]  # the media stream id


async def test_slow_downstream_drops_the_oldest_chunks_and_counts_them() -> None:
    async with ingest_server(chunk_queue_depth=2, consumer_delay_s=0.4) as (server, col):
        result = await publish_pyav(f"rtmp://127.0.0.1:{server.port}/live/key-a", 45)
        assert result.report.get("ok"), result
        chunks = await col.finished("stream-a")
    stats = col.streams["stream-a"].queue.stats
    seqs = [c.seq for c in chunks]
    assert stats.put == 11 and stats.dropped == 11 - len(chunks) and stats.dropped >= 5
    assert seqs == sorted(seqs) and seqs[-2:] == [9, 10]  # the newest chunks survive
