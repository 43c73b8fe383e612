"""Continuity across restarts over a real nats-server (issue #12 item 4; docs/media.md, docs/decoder.md).

Egress: a stream's playlist continues across an egress restart (a new ``EgressService`` on the same KV and HLS
directory) and across a decoder restart (a new encoder session: message seq and pts from 0): media sequence numbers
only grow, ``EXT-X-DISCONTINUITY`` marks each restart, every period decodes with PyAV on a monotonic timeline.
Decoder: a new ``DecoderService`` joins a stream mid-segment and decodes it; a new segment at a lower seq (an ingest
that restarted its count) or at a seq jump (the ingest contract) is decoded, not dropped as stale; CFR stays
continuous.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import av
import httpx
import m3u8
import numpy as np
import pytest
import torch
from media_io.mediakit import barcode_frame, read_barcode

from decoder.service import DecoderService
from egress.service import EgressService
from media.h264 import H264Encoder, PartLayout
from proto import Buckets, EncodedVideo, HlsState, LatentChunk, StreamEvent, Subjects
from services.bus import Bus
from services.config import NatsSettings, Settings
from services.runtime import Service
from services.streams import new_stream_id
from support.playback import signed
from support.videokit import latent_chunk, random_latents

torch.set_num_threads(2)

FPS = 8.0  # GOP = segment = 8 frames


def settings_for(nats: NatsSettings, root: Path) -> Settings:
    return Settings(
        nats=nats,
        telemetry={"metrics_port": 0},
        lifecycle={"http_host": "127.0.0.1", "heartbeat_interval_s": 0.2, "drain_timeout_s": 4.0},
        egress={"hls_dir": root / "hls", "http_host": "127.0.0.1", "http_port": 0, "segment_seconds": 1.0,
                "part_seconds": 0.25, "x264_preset": "ultrafast", "cfr_start_delay_s": 0.3, "ended_grace_s": 5.0,
                "playlist_segments": 30},
        decoder={"debug_tap_dir": root / "tap", "ended_grace_s": 5.0},
    )


async def started(service: Service) -> asyncio.Task[int]:
    task = asyncio.create_task(service.run())
    deadline = time.monotonic() + 60
    while not service.ready:
        assert time.monotonic() < deadline, f"{service.member_id} never became ready"
        assert not task.done(), task.result()
        await asyncio.sleep(0.05)
    return task


async def stopped(service: Service, task: asyncio.Task[int]) -> None:
    service.stop()
    assert await asyncio.wait_for(task, 20) == 0


async def until(predicate: Callable[[], bool] | Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class DecoderSession:
    """What one decoder incarnation sends egress: its own encoder, message seq and pts from 0."""

    def __init__(self, bus: Bus, stream_id: str) -> None:
        layout = PartLayout.for_rate(FPS, 1.0, 0.25)
        self.bus, self.stream_id = bus, stream_id
        self.encoder = H264Encoder(64, 48, FPS, layout.gop_frames, "ultrafast")
        self.seq = self.pts = 0

    async def send(self, codes: range, end: bool = False) -> None:
        units = [u for n in codes for u in self.encoder.encode(barcode_frame(n, 64, 48), self._next_pts())]
        if end:
            units += self.encoder.flush()
        cfg = self.encoder.config
        for k in range(0, len(units), 2):
            last = k + 2 >= len(units)
            await self.bus.publish(Subjects.stream_video(self.stream_id), EncodedVideo(
                stream_id=self.stream_id, seq=self.seq, width=cfg.width, height=cfg.height, fps=cfg.fps,
                extradata=cfg.extradata, units=units[k : k + 2], end_of_stream=end and last))
            self.seq += 1

    def _next_pts(self) -> int:
        self.pts += 1
        return self.pts - 1


async def decode_periods(base_url: str, sid: str, playlist: m3u8.M3U8) -> list[tuple[list[int], list[float]]]:
    """Fetch and decode each period (its EXT-X-MAP init + its segments): (barcodes, presentation times) each."""
    chunks: list[bytes] = []
    async with httpx.AsyncClient(base_url=f"{base_url}{signed(sid)}/", timeout=10) as http:
        for seg in playlist.segments:
            if not chunks or seg.discontinuity:
                chunks.append((await http.get(seg.init_section.uri)).raise_for_status().content)
            chunks[-1] += (await http.get(seg.uri)).raise_for_status().content
    out = []
    for data in chunks:
        with av.open(io.BytesIO(data)) as c:
            frames = list(c.decode(video=0))
        out.append(([read_barcode(f.to_ndarray(format="rgb24")) for f in frames], [float(f.time) for f in frames]))
    return out


async def playlist(base_url: str, sid: str) -> m3u8.M3U8:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        r = await http.get(f"{signed(sid)}/index.m3u8")
        r.raise_for_status()
        return m3u8.loads(r.text)


async def test_egress_restart_and_decoder_restart_continue_the_playlist(
        nats_settings: NatsSettings, bus: Bus, tmp_path: Path) -> None:
    settings = settings_for(nats_settings, tmp_path)
    sid = new_stream_id()
    first = EgressService(settings, member_id="egress-a")
    task = await started(first)
    decoder = DecoderSession(bus, sid)
    await decoder.send(range(0, 28))  # segments 0, 1, 2 closed, the 4th open
    await until(lambda: sid in first.outputs and sum(s.complete for s in first.outputs[sid].hls.segments) >= 3,
                "3 segments at the first egress")
    seen = await playlist(first.base_url, sid)
    assert seen.media_sequence == 0 and not any(s.discontinuity for s in seen.segments)
    await stopped(first, task)  # (its drain closes the open segment; the state in KV stays)
    kv = await bus.kv(Buckets.EGRESS)
    state = await kv.get_message(sid, HlsState)
    assert state is not None and state.next_msn == 4

    second = EgressService(settings, member_id="egress-b")
    task = await started(second)
    try:
        await decoder.send(range(28, 48))  # the same decoder session goes on (seq and pts continue)
        restarted = DecoderSession(bus, sid)  # then the decoder restarts: seq 0, pts 0, a new encoder
        await restarted.send(range(100, 124), end=True)
        await until(lambda: sid in second.outputs and second.outputs[sid].hls.ended, "the end of the playlist")
        final = await playlist(second.base_url, sid)
        periods = await decode_periods(second.base_url, sid, final)
    finally:
        await stopped(second, task)

    # media sequence never restarts: segments of the first egress are still listed (their files survived), the
    # new ones follow
    assert final.media_sequence == 0 and final.is_endlist
    assert [s.uri for s in final.segments] == [f"seg_{n}.m4s" for n in range(len(final.segments))]
    flags = [s.discontinuity for s in final.segments]
    assert flags[:4] == [False] * 4 and flags[4], flags  # the new egress: a discontinuity before its first segment
    assert sum(flags) == 2, flags  # ... and one where the decoder restarted
    assert second.stats.streams_resumed == 1 and second.stats.media_restarts == 1
    (codes0, t0), (codes1, t1), (codes2, t2) = periods
    assert codes0 == list(range(0, 28))  # the first egress closed its open segment on the way out
    assert codes1 == list(range(32, 48))  # resumed at the session's next keyframe (the units before it skipped)
    assert codes2 == list(range(100, 124))
    times = t0 + t1 + t2
    assert times == sorted(times) and len(set(times)) == len(times), times  # monotonic across both restarts
    assert all(b - a == pytest.approx(1 / FPS) for a, b in itertools.pairwise(t2))
    assert (await kv.get_message(sid, HlsState)).next_msn == len(final.segments)  # type: ignore[union-attr]


def chunk(sid: str, seq: int, latent: torch.Tensor, *, segment: int = 0, latent_start: int | None = None
          ) -> LatentChunk:
    c = latent_chunk(sid, seq, latent, FPS)
    update: dict[str, int] = {"segment": segment}
    if latent_start is not None:
        update["latent_start"] = update["rope_start"] = latent_start
    return c.model_copy(update=update)


async def test_a_restarted_decoder_joins_mid_stream_and_takes_new_segments(
        nats_settings: NatsSettings, bus: Bus, tmp_path: Path) -> None:
    settings = settings_for(nats_settings, tmp_path)
    sid = new_stream_id()
    video: list[EncodedVideo] = []

    async def on_video(msg: EncodedVideo, _raw) -> None:
        video.append(msg)

    await bus.subscribe(Subjects.stream_video(sid), on_video, expected=EncodedVideo, credit=True)
    latents = random_latents(8, 32, 32, seed=7)
    window = await bus.credit_window(Subjects.stream_x0(sid)).start()

    async def send(*chunks: LatentChunk) -> None:
        for c in chunks:
            await window.publish(c)
            await asyncio.sleep(4 / FPS / 4)  # 4× real time: the pacer buffers, nothing is dropped

    first = DecoderService(settings, member_id="decoder-a")
    task = await started(first)
    await send(*(chunk(sid, c, latents[c]) for c in range(4)))
    await until(lambda: first.stats.chunks_decoded == 4, "4 chunks at the first decoder")
    await stopped(first, task)
    await until(lambda: any(m.end_of_stream for m in video), "the first decoder's last message")

    second = DecoderService(settings, member_id="decoder-b")
    task = await started(second)
    try:
        video.clear()
        await send(*(chunk(sid, c, latents[c]) for c in range(4, 8)))  # mid-segment: 1 latent each, no prepare
        await until(lambda: second.stats.chunks_decoded == 4, "the mid-stream chunks at the second decoder")
        assert second.stats.joins == 1 and second.stats.frames_padded == 3
        assert [np.load(tmp_path / "tap" / sid / f"{c}.npy").shape[0] for c in range(4, 8)] == [4] * 4
        # the old ingest behaviour: a new segment whose seq starts lower — a new segment, not stale
        await send(chunk(sid, 2, random_latents(1, 32, 32, seed=8)[0], segment=1, latent_start=0),
                   chunk(sid, 3, latents[3], segment=1, latent_start=2))
        # the ingest contract: a new segment at a seq larger than any before, after a jump
        await send(chunk(sid, 20, random_latents(1, 32, 32, seed=9)[0], segment=2, latent_start=0),
                   chunk(sid, 21, latents[5], segment=2, latent_start=2),
                   chunk(sid, 19, latents[6], segment=2, latent_start=1))  # late: stale
        await until(lambda: second.stats.chunks_decoded == 8, "the new segments' chunks")
        assert second.stats.chunks_dropped == 1 and second.stats.chunk_gaps == 0
        assert second.stats.frames_decoded == 4 * 4 - 3 + 2 * (5 + 4)
        await until(lambda: second.stats.frames_output >= second.stats.frames_decoded + 3, "the output")
    finally:
        await stopped(second, task)
        await window.close()
    units = [u for m in video for u in m.units]
    assert [m.seq for m in video] == list(range(len(video)))  # a new encoder session: seq from 0
    assert units[0].keyframe and units[0].pts == 0  # it starts with an IDR (parameter sets in every message)
    assert [u.pts for u in units] == list(range(len(units)))  # CFR: no jump, no burst, never backwards
    assert len(units) >= second.stats.frames_decoded + second.stats.frames_padded


async def test_an_ended_stream_takes_a_new_segment_not_its_late_chunks(
        nats_settings: NatsSettings, bus: Bus, tmp_path: Path) -> None:
    """After a stream ended at the decoder (its 'ended' event, or idle), a late chunk is dropped, but a new
    segment — even at a lower seq, as an ingest that restarted its count sends it — starts the stream again."""
    settings = settings_for(nats_settings, tmp_path)
    sid = new_stream_id()
    decoder = DecoderService(settings, member_id="decoder-c")
    task = await started(decoder)
    window = await bus.credit_window(Subjects.stream_x0(sid)).start()
    try:
        latents = random_latents(3, 32, 32, seed=11)
        for c in range(3):
            await window.publish(chunk(sid, c, latents[c]))
        await bus.publish(Subjects.stream_event(sid), StreamEvent(stream_id=sid, kind="ended", seq=2, at=time.time()))
        await until(lambda: decoder.stats.streams_ended == 1, "the stream's end")
        await window.publish(chunk(sid, 1, latents[1]))  # late: dropped after the end
        await window.publish(chunk(sid, 1, random_latents(1, 32, 32, seed=12)[0], segment=1, latent_start=0))
        await until(lambda: decoder.stats.chunks_decoded == 4, "the new segment's prepare chunk")
        assert decoder.stats.chunks_dropped == 1 and decoder.stats.streams_started == 2
    finally:
        await window.close()
        await stopped(decoder, task)
