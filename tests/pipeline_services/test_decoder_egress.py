"""Decoder and egress services over a real nats-server: x0 latents → VAE → CFR → H.264 → LL-HLS over HTTP → PyAV."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import httpx
import m3u8
import numpy as np
import pytest
import pytest_asyncio
import torch

from decoder.service import DecoderService
from egress.restream import rtmp_push_url
from egress.service import EgressService
from encoder.vae import StreamVAE
from media.h264 import H264Encoder, PartLayout
from proto import EncodedVideo, StreamEvent, StreamSpec, Subjects
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.streams import StreamTable, new_stream_id
from support.playback import signed
from support.videokit import (
    feed_chunks,
    latent_chunk,
    load_tap,
    match_frames,
    random_latents,
    read_ended_hls,
    reference_frames,
    to_uint8,
)
from wan.tiny import make_tiny_vae

torch.set_num_threads(2)

FPS = 8.0  # slow enough that a loaded 2-core machine decodes in real time; chunks are 0.5 s apart
# mean |Δ| (0–255) of an output frame vs its source frame: ≈17 at most here (4:2:0 chroma of noise-like frames);
# frames of other latents differ by ≥ 29 (the negative control in the end-to-end test checks that margin)
MAX_MATCH_ERROR = 23.0


def service_settings(nats_settings: NatsSettings, root: Path) -> Settings:
    return Settings(
        nats=nats_settings,
        telemetry={"metrics_port": 0},
        lifecycle={"http_host": "127.0.0.1", "heartbeat_interval_s": 0.2, "drain_timeout_s": 4.0},
        egress={"hls_dir": root / "hls", "http_host": "127.0.0.1", "http_port": 0, "segment_seconds": 1.0,
                "part_seconds": 0.25, "x264_preset": "ultrafast", "cfr_start_delay_s": 0.3, "ended_grace_s": 5.0,
                "playlist_segments": 30},  # the whole test stream stays listed
        decoder={"debug_tap_dir": root / "tap", "ended_grace_s": 5.0},
    )


@dataclass
class Stack:
    decoder: DecoderService
    egress: EgressService
    settings: Settings
    vae: StreamVAE
    table: StreamTable
    created: list[str]

    @property
    def tap(self) -> Path:
        assert self.settings.decoder.debug_tap_dir is not None
        return self.settings.decoder.debug_tap_dir


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(nats_settings: NatsSettings, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    settings = service_settings(nats_settings, tmp_path_factory.mktemp("decoder-egress"))
    decoder = DecoderService(settings, member_id="decoder-test")
    egress = EgressService(settings, member_id="egress-test")
    tasks = [asyncio.create_task(decoder.run()), asyncio.create_task(egress.run())]
    deadline = time.monotonic() + 60
    while not (decoder.ready and egress.ready):
        assert time.monotonic() < deadline, "services never became ready"
        assert not any(t.done() for t in tasks), [t.result() for t in tasks if t.done()]
        await asyncio.sleep(0.05)
    assert decoder.bus is not None
    table = await StreamTable.open(decoder.bus)
    stack = Stack(decoder, egress, settings, StreamVAE(make_tiny_vae(0)), table, [])
    yield stack
    for sid in stack.created:  # the stream table is shared by the whole session
        await table.delete(sid)
    decoder.stop()
    egress.stop()
    assert await asyncio.wait_for(asyncio.gather(*tasks), 20) == [0, 0]


async def new_stream(stack: Stack, width: int, height: int) -> str:
    sid = new_stream_id()
    await stack.table.create(StreamSpec(stream_id=sid, width=width, height=height, fps=FPS, steps=1, prompt="p"))
    stack.created.append(sid)
    return sid


def check_timing(times: list[Fraction]) -> None:
    """Constant frame rate: presentation times exactly 1/fps apart, from 0, never a jump or a repeat."""
    assert times[0] == 0
    assert [b - a for a, b in itertools.pairwise(times)] == [Fraction(1, int(FPS))] * (len(times) - 1)


def check_content(frames: np.ndarray, expected: np.ndarray, repeated: int) -> list[int]:
    """Every output frame is one of the expected frames, in order, none lost, and the only duplicates are the
    pacer's repeats; returns the matched indices."""
    idx, err = match_frames(frames, expected)
    assert max(err) < MAX_MATCH_ERROR, err
    assert idx == sorted(idx), idx  # never backwards
    assert sorted(set(idx)) == list(range(len(expected))), idx  # every decoded frame reached the viewer
    assert sum(a == b for a, b in itertools.pairwise(idx)) == repeated, idx
    return idx


async def test_latents_to_llhls_end_to_end(stack: Stack, bus: Bus) -> None:
    sid = await new_stream(stack, 32, 32)
    latents = random_latents(5, 32, 32, seed=1)
    repeated_before = stack.decoder.stats.frames_repeated
    await feed_chunks(bus, sid, latents, FPS)

    deadline = time.monotonic() + 20
    while (record := await stack.table.get(sid)).egress_url == "":  # written when the first video arrives
        assert time.monotonic() < deadline, record
        await asyncio.sleep(0.05)
    assert record.egress_url == stack.egress.base_url and record.state == "live"
    out = await read_ended_hls(record.egress_url, sid)  # the URL the gateway proxies to

    # the debug tap holds exactly what StreamVAE.decode gives for the same latents (before H.264)
    tap = load_tap(stack.tap, sid, list(range(5)))
    for got, want in zip(tap, reference_frames(stack.vae, latents), strict=True):
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.array_equal(got, want)
    decoded = to_uint8(tap)
    assert len(decoded) == 5 + 4 * 4

    assert out.playlist.is_endlist and out.playlist.version == 9
    assert all(seg.parts for seg in out.playlist.segments[-3:])  # LL-HLS parts listed
    assert out.frames.shape[1:] == (32, 32, 3)
    repeated = stack.decoder.stats.frames_repeated - repeated_before
    # every decoded frame, plus the pacer's repeats
    assert len(out.frames) == len(decoded) + repeated, (stack.decoder.stats, stack.egress.stats)
    check_timing(out.times)
    check_content(out.frames, decoded, repeated)
    # negative control: the same check against another latent sequence's frames fails
    _, err = match_frames(out.frames, to_uint8(reference_frames(stack.vae, random_latents(5, 32, 32, seed=99))))
    assert min(err) > MAX_MATCH_ERROR, err


async def test_program_date_time_is_the_capture_time(stack: Stack, bus: Bus) -> None:
    """Chunks captured 5 s before the decoder gets them (a slow ring): each segment's EXT-X-PROGRAM-DATE-TIME is
    the capture time of its first frame on the publisher's clock, not the decoder's output time (5 s later)."""
    lag = 5.0
    sid = await new_stream(stack, 32, 32)
    t0 = time.time()
    await feed_chunks(bus, sid, random_latents(4, 32, 32, seed=3), FPS, capture_lag_s=lag)
    out = await read_ended_hls(stack.egress.base_url, sid)
    read_at = time.time()
    pdts = [seg.program_date_time.timestamp() for seg in out.playlist.segments]
    # chunk 0 was captured at t0 - lag (±the publish call's delay); frames are 1/fps apart on that clock
    assert abs(pdts[0] - (t0 - lag)) < 0.5, (pdts[0] - t0)
    assert all(b > a for a, b in itertools.pairwise(pdts)), pdts
    assert all(pdt < read_at - lag + 0.5 for pdt in pdts), [read_at - p for p in pdts]


async def test_missing_chunk_keeps_constant_frame_rate(stack: Stack, bus: Bus) -> None:
    sid = await new_stream(stack, 32, 32)
    latents = random_latents(7, 32, 32, seed=2)
    gaps_before, repeated_before = stack.decoder.stats.chunk_gaps, stack.decoder.stats.frames_repeated
    await feed_chunks(bus, sid, latents, FPS, skip=frozenset({2, 3, 4}))  # a 1.5 s hole
    out = await read_ended_hls(stack.egress.base_url, sid)

    seqs = [0, 1, 5, 6]
    tap = load_tap(stack.tap, sid, seqs)
    for got, want in zip(tap, reference_frames(stack.vae, [latents[s] for s in seqs]), strict=True):
        assert np.array_equal(got, want)
    assert not (stack.tap / sid / "2.npy").exists()
    assert stack.decoder.stats.chunk_gaps - gaps_before == 3
    repeated = stack.decoder.stats.frames_repeated - repeated_before
    check_timing(out.times)  # no pts jump across the hole
    idx = check_content(out.frames, to_uint8(tap), repeated)
    # the hole (12 frame slots, more than the jitter buffer holds) was filled by repeating chunk 1's last frame
    last_of_chunk1 = 5 + 4 - 1
    assert idx.count(last_of_chunk1) >= 4, idx


async def test_two_streams_at_different_sizes_never_mix(stack: Stack, bus: Bus) -> None:
    sizes = {await new_stream(stack, 32, 32): (32, 32), await new_stream(stack, 48, 32): (48, 32)}
    latents = {sid: random_latents(4, h, w, seed=10 + i) for i, (sid, (w, h)) in enumerate(sizes.items())}
    repeated_before = stack.decoder.stats.frames_repeated
    await asyncio.gather(*(feed_chunks(bus, sid, latents[sid], FPS) for sid in sizes))
    outs = await asyncio.gather(*(read_ended_hls(stack.egress.base_url, sid) for sid in sizes))
    repeated = stack.decoder.stats.frames_repeated - repeated_before
    for (sid, (w, h)), out in zip(sizes.items(), outs, strict=True):
        tap = load_tap(stack.tap, sid, list(range(4)))
        for got, want in zip(tap, reference_frames(stack.vae, latents[sid]), strict=True):
            assert np.array_equal(got, want)
        assert out.frames.shape[1:] == (h, w, 3)
        check_timing(out.times)
        idx, _ = match_frames(out.frames, to_uint8(tap))
        repeated -= sum(a == b for a, b in itertools.pairwise(idx))
        check_content(out.frames, to_uint8(tap), sum(a == b for a, b in itertools.pairwise(idx)))
    assert repeated == 0  # the repeats seen in the two outputs are exactly the pacers' repeats


async def test_ended_event_before_the_first_chunk(stack: Stack, bus: Bus) -> None:
    """A short stream's x0 chunks may reach the decoder after its 'ended' event: all are still decoded and sent."""
    sid = await new_stream(stack, 32, 32)
    latents = random_latents(3, 32, 32, seed=4)
    repeated_before = stack.decoder.stats.frames_repeated
    await bus.publish(Subjects.stream_event(sid), StreamEvent(stream_id=sid, kind="ended", seq=2, at=time.time()))
    await feed_chunks(bus, sid, latents, fps=FPS, pace=1000.0, end=False)  # a burst, as after a long ring latency
    out = await read_ended_hls(stack.egress.base_url, sid)
    tap = load_tap(stack.tap, sid, [0, 1, 2])
    check_timing(out.times)
    check_content(out.frames, to_uint8(tap), stack.decoder.stats.frames_repeated - repeated_before)


async def test_stream_event_ended_closes_the_playlist(stack: Stack, bus: Bus) -> None:
    """Egress alone: video without end_of_stream, then the stream's 'ended' event → EXT-X-ENDLIST (on disk too)."""
    sid = await new_stream(stack, 32, 32)
    layout = PartLayout.from_settings(FPS, stack.settings.egress)
    enc = H264Encoder(32, 32, FPS, layout.gop_frames, "ultrafast")
    units = [u for i in range(12) for u in enc.encode(np.full((32, 32, 3), 20 * i, np.uint8), i)] + enc.flush()
    cfg = enc.config
    for seq, k in enumerate(range(0, len(units), 3)):
        await bus.publish(Subjects.stream_video(sid), EncodedVideo(
            stream_id=sid, seq=seq, width=cfg.width, height=cfg.height, fps=cfg.fps, extradata=cfg.extradata,
            units=units[k : k + 3]))
    async with httpx.AsyncClient(base_url=stack.egress.base_url) as http:
        deadline = time.monotonic() + 10.0
        # 404 until the egress has taken the first video message (the bus is asynchronous); then the blocking
        # request holds until segment 0 is complete
        while (r := await http.get(f"{signed(sid)}/index.m3u8", params={"_HLS_msn": 0})).status_code == 404:
            assert time.monotonic() < deadline, "the egress never registered the stream"
            await asyncio.sleep(0.05)
        assert r.status_code == 200 and "#EXT-X-ENDLIST" not in r.text
    grace = stack.settings.egress.ended_grace_s
    stack.settings.egress.ended_grace_s = 1.0  # read when the event arrives; the other tests want a long one
    try:
        ended_at = time.monotonic()
        await bus.publish(Subjects.stream_event(sid), StreamEvent(stream_id=sid, kind="ended", seq=0, at=time.time()))
        out = await read_ended_hls(stack.egress.base_url, sid)
        assert time.monotonic() - ended_at < 1.0 + 2.0
    finally:
        stack.settings.egress.ended_grace_s = grace
    assert len(out.frames) == 12
    check_timing(out.times)
    on_disk = m3u8.load(str(stack.settings.egress.hls_dir / sid / "playlist.m3u8"))
    assert on_disk.is_endlist and len(on_disk.segments) == 2


async def test_malformed_messages_are_counted_and_dropped(stack: Stack, bus: Bus) -> None:
    sid = await new_stream(stack, 32, 32)
    latents = random_latents(5, 32, 32, seed=3)
    dec, eg = stack.decoder, stack.egress
    assert dec.bus is not None and eg.bus is not None
    repeated_before = dec.stats.frames_repeated
    before = (dec.bus.stats.malformed, eg.bus.stats.malformed, dec.stats.chunks_failed, dec.stats.chunks_dropped,
              eg.stats.messages_dropped)
    feeding = asyncio.create_task(feed_chunks(bus, sid, latents, FPS))
    deadline = time.monotonic() + 10
    while sid not in eg.outputs:  # the stream is live at the egress
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)

    garbage = b"RH\x01\x00\xff\xff\xff\x7fnot a message"
    for subject in (Subjects.stream_x0(sid), Subjects.stream_video(sid), Subjects.stream_event(sid)):
        await bus.publish(subject, garbage)
    # well-formed but wrong: a latent with 3 channels, a chunk of another stream on this stream's subject,
    # and video of another size on this stream's subject
    await bus.publish(Subjects.stream_x0(sid), latent_chunk(sid, 99, torch.zeros(1, 3, 4, 4)))
    await bus.publish(Subjects.stream_x0(sid), latent_chunk("someone-else", 1, torch.zeros(1, 4, 4, 4)))
    enc = H264Encoder(64, 48, FPS, 8, "ultrafast")
    units = enc.encode(np.zeros((48, 64, 3), np.uint8), 0) + enc.flush()
    await bus.publish(Subjects.stream_video(sid), EncodedVideo(
        stream_id=sid, seq=1000, width=64, height=48, fps=FPS, extradata=enc.config.extradata, units=units))
    await feeding
    out = await read_ended_hls(eg.base_url, sid)

    after = (dec.bus.stats.malformed, eg.bus.stats.malformed, dec.stats.chunks_failed, dec.stats.chunks_dropped,
             eg.stats.messages_dropped)
    d_dec_malformed, d_eg_malformed, d_failed, d_dropped, d_eg_dropped = (a - b for a, b in zip(after, before,
                                                                                               strict=True))
    assert d_dec_malformed == 2  # x0 + event garbage
    assert d_eg_malformed == 2  # video + event garbage
    assert d_failed == 1  # the 3-channel latent
    assert d_dropped == 1  # the other stream's chunk
    assert d_eg_dropped == 1  # the 64×48 video
    # and the stream went on: every chunk decoded, every frame delivered, at its own size
    tap = load_tap(stack.tap, sid, list(range(5)))
    for got, want in zip(tap, reference_frames(stack.vae, latents), strict=True):
        assert np.array_equal(got, want)
    assert out.frames.shape[1:] == (32, 32, 3)
    check_timing(out.times)
    check_content(out.frames, to_uint8(tap), dec.stats.frames_repeated - repeated_before)


def test_rtmp_push_url_template() -> None:
    assert rtmp_push_url("rtmp://a.example/live/{stream_id}", "st-1") == "rtmp://a.example/live/st-1"
    assert rtmp_push_url("rtmp://a.example/live/fixed", "st-1") == "rtmp://a.example/live/fixed"


def test_decoder_declares_its_largest_message(nats_settings: NatsSettings, tmp_path: Path) -> None:
    settings = service_settings(nats_settings, tmp_path)
    assert DecoderService(settings).max_send_bytes() == settings.nats.max_send_bytes
    small_window = settings.model_copy(update={"nats": settings.nats.model_copy(
        update={"credit_window_bytes": 4 * 1024 * 1024})})
    assert DecoderService(small_window).max_send_bytes() == 2 * 1024 * 1024  # half the credit window
    assert EgressService(settings).max_send_bytes() <= 1024 * 1024


def test_access_units_cross_the_wire_unchanged() -> None:
    """The encoder's units are ``proto.VideoUnit``; the packager's config comes from the ``EncodedVideo`` fields."""
    from media.h264 import CfrPacer, VideoConfig
    from proto import VideoUnit, decode

    layout = PartLayout.for_rate(FPS, 1.0, 0.25)
    enc = H264Encoder(32, 32, FPS, layout.gop_frames, "ultrafast")
    units = [u for i in range(9) for u in enc.encode(np.full((32, 32, 3), 25 * i, np.uint8), i)] + enc.flush()
    assert all(isinstance(u, VideoUnit) for u in units)
    cfg = enc.config
    msg = EncodedVideo(stream_id="s", seq=0, width=cfg.width, height=cfg.height, fps=cfg.fps,
                       extradata=cfg.extradata, units=units)
    back = decode(msg.encode(), EncodedVideo)
    assert VideoConfig.from_message(back) == cfg and back.units == units

    pacer = CfrPacer(FPS)
    pacer.push([np.zeros((2, 2, 3), np.uint8)] * 5, now=100.0)
    first = pacer.pop_due(100.0 + 1 / FPS)
    rest = pacer.flush()  # the stream ended: what is buffered goes out now, at the next indices
    assert [p.index for p in first + rest] == list(range(5)) and pacer.buffered == 0
    assert not any(p.repeated for p in first + rest)
