"""The packager's own fMP4 fragments (media/fmp4.py): a part is out the moment its last frame is pushed, its samples
are byte for byte what libavformat's mp4 muxer makes of the same access units, and the parts decode back on a
contiguous timeline, a lost unit included."""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest

from media import fmp4
from media.h264 import H264Encoder, PartLayout
from media.llhls import LlHlsStream

LAYOUT = PartLayout.for_rate(16, 1.0, 0.125)  # parts of 2 frames, segments of 16


def _units(n: int) -> tuple[H264Encoder, list]:
    enc = H264Encoder(160, 120, 16, LAYOUT.gop_frames, "ultrafast", 300)
    units = []
    for i in range(n):
        frame = np.zeros((120, 160, 3), np.uint8)
        frame[:, (7 * i) % 150 : (7 * i) % 150 + 10] = 255
        units += enc.encode(frame, i, 100.0 + i / 16)
    return enc, units + enc.flush()


def _walk(data: bytes) -> list[tuple[bytes, bytes]]:
    """(kind, payload) of every box, container boxes opened (an independent parser: not media.fmp4's)."""
    out, off = [], 0
    while off < len(data):
        size, kind = struct.unpack(">I4s", data[off : off + 8])
        payload = data[off + 8 : off + size]
        out.append((kind, payload))
        if kind in (b"moof", b"traf"):
            out += _walk(payload)
        off += size
    return out


def _samples(fragments: bytes) -> list[tuple[int, int, bytes]]:
    """(decode time, duration, sample bytes) of every video sample (track 1) in a run of fragments."""
    out, off = [], 0
    while off < len(fragments):
        size, kind = struct.unpack(">I4s", fragments[off : off + 8])
        assert kind == b"moof"
        boxes = dict(_walk(fragments[off : off + size])[1:])
        track = struct.unpack(">I", boxes[b"tfhd"][4:8])[0]
        base = struct.unpack(">Q", boxes[b"tfdt"][4:12])[0]
        trun = boxes[b"trun"]
        flags = int.from_bytes(trun[1:4], "big")
        count, data_offset = struct.unpack(">Ii", trun[4:12])
        assert flags & 0x100 and flags & 0x200, "durations and sizes per sample"
        width = 12 if flags & 0x400 else 8
        pos, t = off + data_offset, base
        for k in range(count):
            duration, length = struct.unpack(">II", trun[12 + k * width : 20 + k * width])
            if track == 1:
                out.append((t, duration, fragments[pos : pos + length]))
            pos, t = pos + length, t + duration
        mdat_size = struct.unpack(">I", fragments[off + size : off + size + 4])[0]
        off += size + mdat_size
    return out


def _muxer_mdat(enc: H264Encoder, units: list) -> bytes:
    """The sample bytes (every ``mdat`` in order) libavformat's mp4 muxer writes for the same access units: the
    reference for the Annex B conversion."""
    sink = io.BytesIO()
    with av.open(io.BytesIO(enc.config.extradata + units[0].data), format="h264") as template, \
            av.open(sink, "w", format="mp4", options={"movflags": "frag_keyframe+empty_moov+default_base_moof"}) as out:
        stream = out.add_stream_from_template(template.streams.video[0])
        stream.time_base = enc.config.time_base
        for u in units:
            packet = av.Packet(u.data)
            packet.pts = packet.dts = u.pts
            packet.time_base, packet.is_keyframe, packet.stream = enc.config.time_base, u.keyframe, stream
            out.mux(packet)
    data, off, mdat = sink.getvalue(), 0, []
    while off < len(data):
        size, kind = struct.unpack(">I4s", data[off : off + 8])
        if kind == b"mdat":
            mdat.append(data[off + 8 : off + size])
        off += size
    return b"".join(mdat)


def test_a_part_is_out_with_its_last_frame_and_its_samples_are_the_muxers() -> None:
    enc, units = _units(40)
    stream = LlHlsStream("s", enc.config, LAYOUT, None)
    for k, unit in enumerate(units):
        stream.push(unit)
        assert stream.stats.parts == (k + 1) // LAYOUT.frames_per_part  # no part waits for the next frame
    parts = b"".join(p.data for seg in stream.segments for p in seg.parts)
    ours = _samples(parts)
    ticks = fmp4.timescale(stream.init, 1) // 16
    assert [(t, d) for t, d, _ in ours] == [(i * ticks, ticks) for i in range(len(units))]
    assert b"".join(s for _, _, s in ours) == _muxer_mdat(enc, units)
    with av.open(io.BytesIO(stream.init + parts)) as c:
        times = [round(float(f.time) * 16) for f in c.decode(video=0)]
    assert times == list(range(len(units)))


def test_a_lost_unit_closes_up_the_timeline_and_is_counted() -> None:
    enc, units = _units(24)
    stream = LlHlsStream("s", enc.config, LAYOUT, None)
    for unit in units[:5] + units[6:]:  # unit 5 lost on the way (not an IDR: the period goes on)
        stream.push(unit)
    stream.end()
    assert stream.stats.gaps_closed == 1 and stream.stats.restarts == 0
    parts = b"".join(p.data for seg in stream.segments for p in seg.parts)
    with av.open(io.BytesIO(stream.inits[0] + parts)) as c:
        times = [round(float(f.time) * 16) for f in c.decode(video=0)]
    assert times == list(range(len(units) - 1))


def test_a_unit_that_is_no_access_unit_is_refused_alone() -> None:
    """Refused at push, before any state moves: the part it would have joined comes out with the units around it
    (the egress counts the refusal: ``units_failed``)."""
    enc, units = _units(12)
    stream = LlHlsStream("s", enc.config, LAYOUT, None)
    for unit in units[:3]:
        stream.push(unit)
    with pytest.raises(ValueError, match="Annex B"):
        stream.push(units[3].model_copy(update={"data": b"\x65garbage"}))
    for unit in units[4:]:
        stream.push(unit)
    stream.end()
    parts = b"".join(p.data for seg in stream.segments for p in seg.parts)
    with av.open(io.BytesIO(stream.inits[0] + parts)) as c:
        assert len(list(c.decode(video=0))) == len(units) - 1
    assert stream.stats.units == len(units) - 1 and stream.stats.gaps_closed == 1


def test_annex_b_becomes_length_prefixed_and_other_input_is_refused() -> None:
    sps, pps, idr = b"\x67\x42\x00\x0a", b"\x68\xce\x3c\x80", b"\x65\x88\x84\x00\x33"
    annex_b = b"\x00\x00\x00\x01" + sps + b"\x00\x00\x01" + pps + b"\x00\x00\x00\x01" + idr
    assert fmp4.avc_sample(annex_b) == b"".join(struct.pack(">I", len(n)) + n for n in (sps, pps, idr))
    with pytest.raises(ValueError, match="Annex B"):
        fmp4.avc_sample(struct.pack(">I", len(idr)) + idr)  # already length-prefixed
