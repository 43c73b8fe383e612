"""The LL-HLS packager across media restarts and resumes: media sequence never goes back, discontinuities are tagged
(RFC 8216: EXT-X-DISCONTINUITY, EXT-X-DISCONTINUITY-SEQUENCE, an EXT-X-MAP per period), timestamps stay monotonic."""

from __future__ import annotations

import io
from pathlib import Path

import av
import m3u8
import numpy as np
import pytest

from media.h264 import H264Encoder, PartLayout
from media.llhls import LlHlsStream, init_name
from media_io.mediakit import barcode_frame, read_barcode
from proto import HlsState, decode

LAYOUT = PartLayout.for_rate(16, 1.0, 0.2)  # parts of 3 frames, segments of 15


def encoder(width: int = 160, height: int = 120) -> H264Encoder:
    return H264Encoder(width, height, 16, LAYOUT.gop_frames, "ultrafast", 300)


def feed(stream: LlHlsStream, enc: H264Encoder, frames: range, pts0: int = 0) -> None:
    """Encode barcoded frames with pts = ``pts0`` + their index in ``frames`` (a new encoder starts at 0)."""
    for i, n in enumerate(frames):
        for unit in enc.encode(barcode_frame(n, enc.config.width, enc.config.height), pts0 + i):
            stream.push(unit)


def periods(playlist: m3u8.M3U8, fetch) -> list[tuple[list[int], list[float]]]:
    """Decode a playlist period by period (each with its own EXT-X-MAP): (barcodes, presentation times) each."""
    out, data, current = [], b"", None
    for seg in playlist.segments:
        if current is None or seg.discontinuity:
            if data:
                out.append(_decode(data))
            current, data = seg.init_section.uri, fetch(seg.init_section.uri)
        data += fetch(seg.uri)
    out.append(_decode(data))
    return out


def _decode(data: bytes) -> tuple[list[int], list[float]]:
    with av.open(io.BytesIO(data)) as c:
        frames = list(c.decode(video=0))
    return [read_barcode(f.to_ndarray(format="rgb24")) for f in frames], [float(f.time) for f in frames]


def test_a_new_encoder_mid_stream_is_a_discontinuity_not_a_new_playlist(tmp_path: Path) -> None:
    stream = LlHlsStream("s", encoder().config, LAYOUT, tmp_path, playlist_segments=10)
    saved: list[HlsState] = []
    stream.on_segment = lambda s: saved.append(s.state())
    feed(stream, encoder(), range(0, 40))  # 2 segments + 10 frames of a third
    stream.restart()  # the decoder restarted: a new encoder, pts from 0 again
    feed(stream, encoder(), range(100, 160))
    stream.end()

    pl = m3u8.loads(stream.plain_playlist())
    assert [s.uri for s in pl.segments] == [f"seg_{n}.m4s" for n in range(len(pl.segments))]  # msn never restarts
    assert [s.discontinuity for s in pl.segments] == [False] * 3 + [True] + [False] * 3
    assert [s.init_section.uri for s in pl.segments] == [init_name(0)] * 3 + [init_name(1)] * 4
    assert pl.discontinuity_sequence in (0, None)
    assert pl.segments[2].duration == pytest.approx(10 / 16)  # the interrupted segment closed short, not lost
    ll = m3u8.loads(stream.ll_playlist())
    assert [s.discontinuity for s in ll.segments] == [s.discontinuity for s in pl.segments]

    (codes0, t0), (codes1, t1) = periods(pl, lambda name: (tmp_path / name).read_bytes())
    assert codes0 == list(range(0, 40)) and codes1 == [n % 256 for n in range(100, 160)]
    times = t0 + t1
    assert times == sorted(times) and len(set(times)) == len(times)  # monotonic across the restart
    assert t1[0] == pytest.approx(t0[-1] + 1 / 16)  # the timeline goes on where it stopped
    # state is written once per closed segment and always moves forward
    assert [s.next_msn for s in saved] == list(range(1, 8))
    assert decode(saved[-1].encode(), HlsState) == saved[-1]


def test_timestamps_going_back_or_jumping_at_an_idr_restart_the_media() -> None:
    stream = LlHlsStream("s", encoder().config, LAYOUT, None, playlist_segments=10)
    feed(stream, encoder(), range(0, 30))
    feed(stream, encoder(), range(30, 60))  # a new encoder without notice: pts 0 again, at an IDR
    enc = encoder()
    units = [u for i in range(30) for u in enc.encode(barcode_frame(60 + i, 160, 120), 1000 + i)]  # far ahead
    for u in units:
        stream.push(u)
    stream.end()
    assert stream.stats.restarts == 2 and stream.discontinuity == 2
    pl = m3u8.loads(stream.ll_playlist())
    assert sum(s.discontinuity for s in pl.segments) == 2
    _, times = zip(*periods(pl, lambda name: _served(stream, name)), strict=True)
    flat = [t for period in times for t in period]
    assert flat == sorted(flat) and len(flat) == 90


def test_discontinuity_sequence_counts_the_tags_that_slid_out() -> None:
    stream = LlHlsStream("s", encoder().config, LAYOUT, None, playlist_segments=3)
    for period in range(3):
        if period:
            stream.restart()
        feed(stream, enc := encoder(), range(30))  # 2 segments per period
    # a segment closes with its last frame: 0..5 are complete, the window is 3 (period 1), 4 and 5 (period 2)
    pl = m3u8.loads(stream.plain_playlist())
    assert pl.media_sequence == 3 and pl.discontinuity_sequence == 1
    assert [s.discontinuity for s in pl.segments] == [False, True, False]
    feed(stream, enc, range(30, 60), pts0=30)  # segments 6 and 7 close: 3 and 4 slide out, and period 1 with 3
    pl = m3u8.loads(stream.plain_playlist())
    assert pl.media_sequence == 5 and pl.discontinuity_sequence == 2 and not any(s.discontinuity for s in pl.segments)
    assert set(stream.inits) == {1, 2}  # period 0's init is no longer needed (segments 0, 1 are gone)


def test_a_period_without_a_segment_takes_no_discontinuity_number() -> None:
    stream = LlHlsStream("s", encoder().config, LAYOUT, None)
    feed(stream, encoder(), range(15))
    stream.restart()
    stream.restart()  # nothing was published in between
    feed(stream, encoder(), range(15))
    assert [s.discontinuity for s in stream.segments] == [0, 1]


def test_resume_lists_the_segments_still_on_disk_and_continues(tmp_path: Path) -> None:
    first = LlHlsStream("s", encoder().config, LAYOUT, tmp_path, playlist_segments=4)
    saved: list[HlsState] = []
    first.on_segment = lambda s: saved.append(s.state())
    feed(first, encoder(), range(0, 100))  # 6 segments closed + 10 frames open; then the process dies
    (tmp_path / "seg_99.m4s").write_bytes(b"a stale file of an earlier life")
    state = decode(saved[-1].encode(), HlsState)  # what the KV holds
    assert state.next_msn == 6 and [s.msn for s in state.segments] == [0, 1, 2, 3, 4, 5]

    second = LlHlsStream("s", encoder().config, LAYOUT, tmp_path, playlist_segments=4, resume=state)
    assert second.stats.segments_restored == 6 and not (tmp_path / "seg_99.m4s").exists()
    before = m3u8.loads(second.plain_playlist())
    assert before.media_sequence == 2 and [s.uri for s in before.segments][-1] == "seg_5.m4s"
    feed(second, encoder(), range(200, 245))  # the stream's next encoder session, pts from 0
    second.end()
    pl = m3u8.loads(second.plain_playlist())
    assert [s.uri for s in pl.segments] == [f"seg_{n}.m4s" for n in range(5, 9)]
    assert [s.discontinuity for s in pl.segments] == [False, True, False, False]
    assert pl.discontinuity_sequence in (0, None) and second.discontinuity == 1
    (old, t_old), (new, t_new) = periods(pl, lambda name: (tmp_path / name).read_bytes())
    assert old == list(range(75, 90)) and new == [n % 256 for n in range(200, 245)]
    assert t_new[0] > t_old[-1]  # timestamps continue after the previous life's

    # without the files (a new pod): numbering and timestamps still continue; only what exists is listed
    third = LlHlsStream("s", encoder().config, LAYOUT, tmp_path / "elsewhere", resume=second.state())
    assert third.segments == [] and third.next_part == (9, 0)
    assert m3u8.loads(third.ll_playlist()).media_sequence == 9
    feed(third, encoder(), range(15))
    assert third.segments[0].msn == 9 and third.segments[0].discontinuity == 2
    assert third.segments[0].start_pts >= second.state().next_pts


def _served(stream: LlHlsStream, name: str) -> bytes:
    if name.startswith("init_"):
        return stream.inits[int(name[5:-4])]
    seg = stream.segment(int(name[4:-4]))
    assert seg is not None
    return seg.data


def test_registry_resume_keeps_the_directory(tmp_path: Path) -> None:
    from media.llhls import HlsRegistry

    registry = HlsRegistry(tmp_path)
    first = registry.open("s", encoder().config, LAYOUT)
    feed(first, encoder(), range(30))
    first.end()
    second = registry.open("s", encoder().config, LAYOUT, resume=first.state())  # a new session after the end
    assert [s.msn for s in second.segments] == [0, 1] and (tmp_path / "s" / "seg_0.m4s").exists()
    third = registry.open("s", encoder().config, LAYOUT)  # no resume: a fresh playlist, old files removed
    assert third.segments == [] and not (tmp_path / "s" / "seg_0.m4s").exists()
    assert np.all([p.name != "seg_0.m4s" for p in (tmp_path / "s").iterdir()])
