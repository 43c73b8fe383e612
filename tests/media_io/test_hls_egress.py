"""Egress: CFR pacer, H.264 encoder, HLS files and LL-HLS over HTTP, all decoded back with PyAV."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import av
import httpx
import m3u8
import numpy as np
import pytest
from fastapi import FastAPI

from egress.http import make_hls_router
from media.h264 import CfrPacer, H264Encoder, PartLayout
from media.llhls import HlsRegistry, LlHlsStream
from media_io.mediakit import LiveSource, read_barcode, serve_app
from support.playback import KEYS, signed


def test_part_layout_aligns_gop_parts_and_segments() -> None:
    layout = PartLayout.for_rate(16, 1.0, 0.2)
    assert (layout.frames_per_part, layout.parts_per_segment, layout.gop_frames) == (3, 5, 15)
    layout = PartLayout.for_rate(30, 1.0, 0.2)
    assert (layout.frames_per_part, layout.parts_per_segment, layout.gop_frames) == (6, 5, 30)
    assert layout.part_seconds == pytest.approx(0.2) and layout.segment_seconds == pytest.approx(1.0)


def test_cfr_pacer_repeats_late_frames_and_never_jumps() -> None:
    pacer = CfrPacer(10, max_buffer_frames=8)
    frame = [np.full((2, 2, 3), v, np.uint8) for v in range(100)]
    out = []
    pacer.push(frame[0:4], now=0.0)
    for step in range(1, 31):  # 3 s of wall time, ticks every 0.1 s
        t = step * 0.1
        if step == 4:
            pacer.push(frame[4:8], t)  # on time
        if step == 20:
            pacer.push(frame[8:12], t)  # 1.2 s late: the output held the last frame meanwhile
        out += pacer.pop_due(t + 1e-9)
    assert [p.index for p in out] == list(range(len(out))) and len(out) == 31  # frames 0..30, one per tick
    values = [int(p.frame[0, 0, 0]) for p in out]
    assert values[:8] == list(range(8)) and values[20:24] == [8, 9, 10, 11]
    assert values == sorted(values)  # held frames repeat, order never goes back
    assert pacer.stats.repeated == 31 - 12


def test_cfr_pacer_bounds_its_buffer_and_catches_up_without_bursts() -> None:
    pacer = CfrPacer(10, max_buffer_frames=4, max_catchup_s=0.5)
    pacer.push([np.zeros((1, 1, 3), np.uint8)] * 10, now=0.0)
    assert pacer.stats.dropped == 6
    burst = pacer.pop_due(5.0)  # the caller was blocked for 5 s
    assert len(burst) == 1 and pacer.stats.catchups == 1
    assert [p.index for p in pacer.pop_due(5.25)] == [1, 2]


def test_cfr_pacer_empties_a_standing_buffer() -> None:
    """Two chunks at once at the start (a backlog), then one per 0.5 s: without the pull every later chunk would
    wait 0.675 s in the buffer; with it, once the standing frames are seen, a chunk's first frame goes out the
    jitter allowance (0.1 s, not a whole frame more) after its arrival, indices stay gapless and nothing repeats."""
    pacer = CfrPacer(8, start_delay_s=0.1)
    arrivals = {0.0: 5, 0.05: 4} | {0.05 + 0.5 * k: 4 for k in range(1, 12)}
    waits, out, t = [], [], 0.0
    for at, n in sorted(arrivals.items()):
        while t < at:
            out += pacer.pop_due(t)
            t = round(t + 0.01, 6)
        first = pacer.next_index + pacer.buffered
        pacer.push([np.zeros((1, 1, 3), np.uint8)] * n, now=at)
        waits.append(pacer.due_time(first) - at)
    assert [p.index for p in out] == list(range(len(out))) and not any(p.repeated for p in out)
    assert waits[-4:] == pytest.approx([0.1] * 4, abs=1e-9) and pacer.stats.pulled_s > 0  # the allowance stands


@pytest.mark.parametrize("fps", [16, 8])
def test_a_longer_first_chunk_starts_the_output_sooner_with_the_same_allowance(fps: int) -> None:
    """The prepare chunk (5 frames, steady chunks 4): the output starts the surplus frame earlier (never before the
    arrival), and the next chunk, on time 4 frames later, still waits at least the 0.1 s allowance; without
    ``chunk_frames`` the start is the whole allowance after the arrival."""
    frames = [np.zeros((1, 1, 3), np.uint8)] * 5
    plain, sized = CfrPacer(fps, start_delay_s=0.1), CfrPacer(fps, start_delay_s=0.1, chunk_frames=4)
    for pacer in (plain, sized):
        pacer.push(frames, now=10.0)
    assert plain.due_time(0) == pytest.approx(10.1)
    assert sized.due_time(0) == pytest.approx(10.0 + max(0.0, 0.1 - 1 / fps))
    sized.push(frames[:4], now=10.0 + 4 / fps)
    assert sized.due_time(5) - (10.0 + 4 / fps) >= 0.1 - 1e-9


def test_encoder_fixed_gop_no_b_frames() -> None:
    layout = PartLayout.for_rate(16, 1.0, 0.2)
    enc = H264Encoder(160, 120, 16, layout.gop_frames, "ultrafast", 300)
    units = [u for i in range(40) for u in enc.encode(np.full((120, 160, 3), i * 5, np.uint8), i)] + enc.flush()
    assert [u.pts for u in units] == list(range(40))  # one AU out per frame in: no reordering delay
    assert [u.pts for u in units if u.keyframe] == [0, 15, 30]
    assert enc.config.codecs.startswith("avc1.")


def decode(data: bytes) -> list[av.VideoFrame]:
    with av.open(io.BytesIO(data)) as container:
        return list(container.decode(video=0))


def package_offline(out_dir: Path | None, frames: int, playlist_segments: int = 3) -> LlHlsStream:
    layout = PartLayout.for_rate(16, 1.0, 0.2)
    enc = H264Encoder(160, 120, 16, layout.gop_frames, "ultrafast", 300)
    stream = LlHlsStream("s", enc.config, layout, out_dir, playlist_segments)
    from media_io.mediakit import barcode_frame

    for i in range(frames):
        for unit in enc.encode(barcode_frame(i, 160, 120), i):
            stream.push(unit)
    for unit in enc.flush():
        stream.push(unit)
    stream.end()
    return stream


def test_hls_files_rolling_playlist_deleted_segments_and_endlist(tmp_path: Path) -> None:
    stream = package_offline(tmp_path, 16 * 8)  # 8 s, segments of 15 frames
    playlist = m3u8.load(str(tmp_path / "playlist.m3u8"))
    assert playlist.is_endlist and playlist.target_duration == 1 and playlist.version == 7
    assert len(playlist.segments) == 3 and playlist.media_sequence == 6  # 9 segments, last 3 listed
    on_disk = sorted(p.name for p in tmp_path.glob("seg_*.m4s"))
    assert on_disk == [f"seg_{n}.m4s" for n in range(4, 9)]  # window + 2 kept, older deleted
    data = (tmp_path / "init.mp4").read_bytes() + b"".join((tmp_path / s.uri).read_bytes() for s in playlist.segments)
    frames = decode(data)
    first = playlist.media_sequence * 15
    assert [read_barcode(f.to_ndarray(format="rgb24")) for f in frames] == [i % 256 for i in range(first, 128)]
    pts = [f.pts for f in frames]
    assert len(set(np.diff(pts))) == 1 and pts == sorted(pts)
    assert float(frames[1].time - frames[0].time) == pytest.approx(1 / 16)
    assert stream.stats.misaligned_segments == 0 and stream.stats.non_monotonic_dropped == 0


def test_ll_playlist_tags_parse_with_m3u8() -> None:
    layout = PartLayout.for_rate(16, 1.0, 0.2)
    enc = H264Encoder(160, 120, 16, layout.gop_frames, "ultrafast", 300)
    stream = LlHlsStream("s", enc.config, layout, None, 6)
    for i in range(40):  # 2 full segments + 3 complete parts of the third (the 4th part is still open)
        for unit in enc.encode(np.full((120, 160, 3), i, np.uint8), i):
            stream.push(unit)
    text = stream.ll_playlist()
    pl = m3u8.loads(text)
    assert pl.server_control.can_block_reload == "YES"
    assert pl.part_inf.part_target == pytest.approx(0.1875)
    assert pl.server_control.part_hold_back >= 3 * pl.part_inf.part_target
    assert [len(s.parts) for s in pl.segments] == [5, 5, 3]  # the open segment's parts hang on a last entry
    assert pl.preload_hint.uri == "part_2_3.m4s" and pl.preload_hint.hint_type == "PART"
    assert [p.independent for p in pl.segments[1].parts] == ["YES", None, None, None, None]
    parts = b"".join(p.data for p in stream.segment(0).parts)
    assert parts == stream.segment(0).data
    assert len(decode(stream.init + stream.segment(0).data + stream.segment(1).data)) == 30
    stream.push(enc.encode(np.zeros((120, 160, 3), np.uint8), 3)[0])  # pts going back: dropped, counted
    assert stream.stats.non_monotonic_dropped == 1


async def test_ll_hls_blocking_requests_over_http_and_cfr_through_an_outage(tmp_path: Path) -> None:
    registry = HlsRegistry(tmp_path)
    app = FastAPI()
    app.include_router(make_hls_router(registry, KEYS))
    holder: dict = {}

    def sink(unit) -> None:
        holder["stream"].push(unit)

    source = LiveSource(sink)
    holder["stream"] = stream = registry.open("cam-1", source.encoder.config, source.layout)
    part_s = source.layout.part_seconds
    async with serve_app(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}{signed('cam-1')}/") as http:
        live = asyncio.create_task(source.run(5.0, outages=((2.0, 3.0),)))  # upstream silent for 1 s
        await asyncio.sleep(1.5)
        blocked = []
        for _ in range(4):
            msn, part = stream.next_part
            t0 = time.monotonic()
            r = await http.get("index.m3u8", params={"_HLS_msn": msn, "_HLS_part": part})
            blocked.append(time.monotonic() - t0)
            assert r.status_code == 200 and f"part_{msn}_{part}.m4s" in r.text
        msn, part = stream.next_part
        t0 = time.monotonic()
        hinted = await http.get(f"part_{msn}_{part}.m4s")
        hinted_wait = time.monotonic() - t0
        assert hinted.status_code == 200 and hinted.content == stream.part(msn, part).data
        assert (await http.get("index.m3u8", params={"_HLS_msn": msn + 5})).status_code == 400
        assert (await http.get("index.m3u8", params={"_HLS_part": 1})).status_code == 400
        origin = f"http://127.0.0.1:{port}"  # (a path starting with / is still relative to the client's base URL)
        assert (await http.get(f"{origin}{signed('nope')}/index.m3u8")).status_code == 404
        # egress plays nothing unsigned, expired or signed for another stream, whatever the path
        for path in ("/hls/cam-1/index.m3u8", f"{signed('cam-1', -5)}/index.m3u8",
                     f"{signed('nope')}/init.mp4".replace("nope", "cam-1"), "/hls/cam-1/x/part_0_0.m4s"):
            assert (await http.get(origin + path)).status_code in (401, 403), path
        await live
        stream.end()
        final = m3u8.loads((await http.get("index.m3u8")).text)
        init = (await http.get("init.mp4")).content
        segs = [(await http.get(s.uri)).content for s in final.segments]
    # A blocking reload for the next part returns once it exists: within one part duration (+ 1 frame of
    # muxer latency and scheduling slack on a busy 2-core machine).
    assert max(blocked) < part_s + 1 / 16 + 0.15, blocked
    assert hinted_wait < part_s + 1 / 16 + 0.15
    assert final.is_endlist and "#EXT-X-PRELOAD-HINT" not in final.dumps()
    frames = decode(init + b"".join(segs))
    pts = [f.pts for f in frames]
    assert pts == sorted(pts) and len(set(np.diff(pts))) == 1  # constant frame rate through the outage
    total = sum(s.duration for s in final.segments)
    assert len(frames) == round(total * 16)
    assert source.pacer.stats.repeated >= 10  # the 1 s outage was filled by repeating the last frame
    assert abs(source.pacer.stats.emitted - 5.0 * 16) <= 3
    assert (tmp_path / "cam-1" / "playlist.m3u8").read_text().rstrip().endswith("#EXT-X-ENDLIST")
