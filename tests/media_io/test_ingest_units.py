"""Ingest pieces on their own: pacer, chunker, bounded queue, shaper, FLV tag parsing and the decoder's size cap."""

from __future__ import annotations

import asyncio
from fractions import Fraction

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.pacing import Chunker, ChunkQueue, FramePacer, RawChunk
from media.flv import AvcDecoder, TagKind, UnsupportedVideo, VideoTag, metadata_codec_problem, parse_video_tag
from media.frames import shape_frame
from proto.clock import ChunkClock


def place_all(pacer: FramePacer, times: list[float], now0: float = 1000.0) -> list[int]:
    """Output slot of each emitted frame (repeats of the previous frame included, as -1)."""
    out: list[int] = []
    for t in times:
        slot = pacer.place(t, now0 + t)
        if slot.keep:
            out += [-1] * slot.repeat_previous + [slot.index]
    return out


def test_pacer_same_rate_keeps_every_frame() -> None:
    pacer = FramePacer(16)
    slots = place_all(pacer, [round(i * 1000 / 16) / 1000 for i in range(64)])
    assert slots == list(range(64)) and pacer.stats.dropped == pacer.stats.duplicated == 0


def test_pacer_double_rate_drops_every_other_frame() -> None:
    pacer = FramePacer(15)
    slots = place_all(pacer, [round(i * 1000 / 30) / 1000 for i in range(60)])
    assert slots == list(range(30)) and pacer.stats.dropped == 30


def test_pacer_half_rate_repeats_the_previous_frame() -> None:
    pacer = FramePacer(16)
    slots = place_all(pacer, [i / 8 for i in range(10)])
    assert len(slots) == 19 and slots.count(-1) == 9 and pacer.stats.duplicated == 9


def test_pacer_resyncs_on_a_timestamp_jump_without_dropping() -> None:
    pacer = FramePacer(16)
    times = [i / 16 for i in range(10)] + [100 + i / 16 for i in range(10)]
    slots = place_all(pacer, times)
    assert slots == list(range(20)) and pacer.stats.resyncs == 1
    captures = [pacer.capture_time(s) for s in range(20)]
    assert captures == sorted(captures)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 0.3), min_size=1, max_size=80), st.sampled_from([8.0, 15.0, 16.0, 30.0]))
def test_pacer_output_is_a_gapless_monotonic_grid(gaps: list[float], fps: float) -> None:
    pacer = FramePacer(fps)
    times = list(np.cumsum(gaps))
    slots = [s for s in place_all(pacer, times) if s >= 0]
    assert slots == sorted(set(slots))
    assert pacer.stats.frames_out == pacer.next_slot  # every slot filled exactly once
    assert pacer.stats.frames_in == len(times)


def test_chunker_uses_the_chunk_clock() -> None:
    clock = ChunkClock()
    chunker = Chunker("s", clock, latency_budget_s=0.5)
    chunks = [c for i in range(21) if (c := chunker.push(np.full((2, 2, 3), i, np.uint8), 10.0 + i / 16))]
    assert [c.num_frames for c in chunks] == [clock.input_frames(c) for c in range(5)] == [5, 4, 4, 4, 4]
    assert [int(f[0, 0, 0]) for c in chunks for f in c.frames] == list(range(21))
    assert chunks[1].capture_time == 10.0 + 8 / 16 and chunks[1].deadline == chunks[1].capture_time + 0.5


async def test_queue_drops_the_oldest_chunk_when_full_but_keeps_the_prepare_chunk() -> None:
    """Chunk 0 prepares its segment (segment_start 0): without it the others cannot run, so the oldest of the
    others goes; every drop reaches ``on_drop`` with its reason."""
    dropped: list[tuple[str, int]] = []
    queue = ChunkQueue(depth=2, on_drop=lambda reason, chunk: dropped.append((reason, chunk.seq)))
    for seq in range(5):
        queue.put(RawChunk("s", seq, np.zeros((1, 1, 1, 3), np.uint8), [0.0], 0.0, 1.0))
    assert queue.stats.dropped == 3 and len(queue) == 2
    assert dropped == [("queue_overflow", 1), ("queue_overflow", 2), ("queue_overflow", 3)]
    assert [(await queue.get()).seq, (await queue.get()).seq] == [0, 4]
    waiter = asyncio.create_task(queue.get())
    await asyncio.sleep(0.01)
    queue.close()
    assert await waiter is None


def test_shape_frame_scales_to_cover_then_centre_crops() -> None:
    img = np.zeros((360, 640, 3), np.uint8)
    img[:, :140] = (255, 0, 0)  # cropped away: outside the centre 360x360
    img[:, 140:500] = (0, 255, 0)
    img[:, 500:] = (0, 0, 255)
    out = shape_frame(av.VideoFrame.from_ndarray(img, format="rgb24"), 96, 96)
    assert out.shape == (96, 96, 3)
    assert out[:, 2:-2, 1].min() > 200 and out[:, 2:-2, 0].max() < 60 and out[:, 2:-2, 2].max() < 60


def test_flv_tag_parsing() -> None:
    assert parse_video_tag(b"\x17\x00\x00\x00\x00\x01\x64").kind is TagKind.CONFIG
    tag = parse_video_tag(b"\x27\x01\x00\x00\x21" + b"nal")
    assert tag.kind is TagKind.FRAME and not tag.keyframe and tag.composition_ms == 33 and tag.data == b"nal"
    assert parse_video_tag(b"\x17\x01\xff\xff\xfe" + b"x").composition_ms == -2
    assert parse_video_tag(b"\x52\x00").kind is TagKind.IGNORED  # command frame
    ex = parse_video_tag(b"\x91avc1" + b"\x00\x00\x05" + b"nal")  # E-RTMP avc1 CodedFrames, keyframe
    assert ex.kind is TagKind.FRAME and ex.keyframe and ex.composition_ms == 5
    with pytest.raises(UnsupportedVideo, match="'hvc1'"):
        parse_video_tag(b"\x90hvc1" + b"\x01")
    with pytest.raises(UnsupportedVideo, match="'av01'"):
        parse_video_tag(b"\x91av01" + b"\x00")
    with pytest.raises(UnsupportedVideo, match="On2 VP6"):
        parse_video_tag(b"\x14" + bytes(5))
    assert metadata_codec_problem({"videocodecid": 7.0}) is None
    assert "hvc1" in metadata_codec_problem({"videocodecid": float(int.from_bytes(b"hvc1", "big"))})
    assert "Sorenson" in metadata_codec_problem({"videocodecid": 2.0})


def _encoded_avc(width: int, height: int, frames: int) -> tuple[bytes, list[av.Packet]]:
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = width, height, "yuv420p"
    enc.time_base = Fraction(1, 16)
    enc.flags |= av.codec.context.Flags.global_header
    enc.options = {"preset": "ultrafast", "tune": "zerolatency"}
    packets = []
    for i in range(frames):
        f = av.VideoFrame.from_ndarray(np.full((height, width, 3), 100, np.uint8), format="rgb24")
        f.pts = i
        packets += enc.encode(f.reformat(format="yuv420p"))
    packets += enc.encode(None)
    return bytes(enc.extradata), packets


def test_decoder_refuses_a_picture_above_the_cap_even_when_metadata_lied() -> None:
    annexb_extradata, packets = _encoded_avc(640, 480, 2)
    # AVCDecoderConfigurationRecord from the Annex B SPS/PPS.
    nals = [n for n in annexb_extradata.split(b"\x00\x00\x01") if n.strip(b"\x00")]
    sps, pps = (n.rstrip(b"\x00") for n in nals[:2])
    record = bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1]) + len(sps).to_bytes(2, "big") + sps
    record += bytes([1]) + len(pps).to_bytes(2, "big") + pps

    def avcc(data: bytes) -> bytes:
        units = [u.rstrip(b"\x00") for u in data.split(b"\x00\x00\x01") if u.strip(b"\x00")]
        return b"".join(len(u).to_bytes(4, "big") + u for u in units)

    ok = AvcDecoder(1920, 1080)
    ok.configure(record)
    assert [f.width for f in ok.decode(VideoTag(TagKind.FRAME, True, 0, avcc(bytes(packets[0]))), 0)] in ([640], [])
    capped = AvcDecoder(320, 240)
    capped.configure(record)
    with pytest.raises(UnsupportedVideo, match="exceeds the 320x240 cap"):
        for i, p in enumerate(packets):
            capped.decode(VideoTag(TagKind.FRAME, i == 0, 0, avcc(bytes(p))), i * 62)
        capped.flush()
