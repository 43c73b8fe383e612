"""The decoder service: finished x0 latents in, H.264 access units out (design §1; docs/decoder.md).

Subscribes to ``rheo.stream.*.x0`` (``LatentChunk`` from the last DiT stage, credit window) and
``rheo.stream.*.event``; publishes ``EncodedVideo`` on ``rheo.stream.<id>.video`` through a per-stream credit
window. Raw frames never leave this process.

Per stream one ``DecoderStream`` (created on the stream's first chunk, freed when it ends): the Stream-VAE decoder
cache, a CFR pacer and a libx264 encoder. Two tasks per stream: the decode loop (chunks in order, VAE decode on the
one model thread, frames into the pacer) and the output loop (one frame per 1/fps of wall time — the last frame
repeats when chunks are late or missing — encode, publish). A chunk that fails (bad shape, VAE error) is dropped
and counted; nothing one stream does reaches another stream's state.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
from nats.aio.msg import Msg
from prometheus_client import Counter

from decoder.tracing import OutputTraces
from encoder.batching import ChunkBatcher
from encoder.vae import StreamVAE, StreamVAEState
from encoder.vae_loading import (
    StreamVAEConfig,
    compile_stream_vae,
    load_stream_vae,
    random_stream_vae,
    tiny_stream_vae,
)
from media.h264 import CfrPacer, H264Encoder, PacedFrame
from proto import CHANNELS, EncodedVideo, LatentChunk, StreamEvent, StreamOutput, Subjects, VideoUnit
from proto.clock import ChunkClock
from services import telemetry
from services.assignments import Assignments
from services.bus import CreditTimeout, CreditWindow, PayloadTooLarge
from services.model_source import model_source
from services.runtime import Service, ServiceStartError, main, write_debug_tap
from services.workmeter import WorkMeter, seed_size

log = logging.getLogger("rheo.decoder")

DecodeJob = tuple[StreamVAEState, torch.Tensor]
"""One chunk to decode: the stream's VAE state and its latents ``[1, C, F, h, w]``."""
DecodedFrames = tuple[np.ndarray, np.ndarray]
"""``frames_from_decoded``: float32 [T, H, W, 3] in [0, 1] and uint8 RGB."""

CHUNKS = Counter("rheo_decoder_chunks_total", "latent chunks by outcome", ["result"])
FRAMES = Counter("rheo_decoder_frames_total", "frames decoded, output by the CFR pacer, repeated, dropped, padded "
                 "(a mid-segment join)", ["kind"])
VIDEO_DROPPED = Counter("rheo_decoder_units_dropped_total", "encoded access units not sent", ["reason"])

OUTPUT_REPORT_S = 0.5
"""Per stream, at most one ``StreamOutput`` this often (ingest's liveness bound is seconds)."""
_T = TypeVar("_T")
_ENDED_MEMORY_S = 600.0  # how long an ended stream's last seq is remembered (late chunks are dropped, not revived)


def frames_from_decoded(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``StreamVAE.decode`` output ``[1, 3, T, H, W]`` in [-1, 1] → (float32 [T, H, W, 3] in [0, 1], uint8 RGB).

    The same conversions as ``StreamPipeline``'s float and uint8 outputs, so the debug tap compares with the
    single-process pipeline exactly."""
    frames = x[0].permute(1, 2, 3, 0).float()
    float01 = ((frames + 1.0) / 2.0).clamp(0, 1).cpu().numpy()
    rgb = ((frames + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    return float01, rgb


@dataclass
class DecoderStats:
    streams_started: int = 0
    streams_ended: int = 0
    chunks_decoded: int = 0
    chunks_failed: int = 0
    chunks_dropped: int = 0  # queue overflow, stale/out-of-order, after the stream ended, subject mismatch
    chunks_unassigned: int = 0  # chunks of streams placed on another decoder (services/assignments.py)
    chunk_gaps: int = 0  # chunks missing between two decoded ones of a segment
    joins: int = 0  # chunks decoded on an empty cache mid-segment (a decoder restart, a lost prepare chunk)
    frames_decoded: int = 0
    frames_padded: int = 0  # repeats that give a mid-segment join its chunk's frame count
    frames_output: int = 0
    frames_repeated: int = 0
    messages_sent: int = 0
    units_sent: int = 0
    units_dropped: int = 0


@dataclass
class _EndRequest:
    last_seq: int  # the stream's last chunk (StreamEvent.seq); -1: end now
    deadline: float  # wall time after which the stream ends even if that chunk never came


@dataclass
class DecoderStream:
    """Everything the decoder keeps for one stream: VAE decoder cache, CFR pacer, H.264 encoder, counters."""

    stream_id: str
    fps: float
    width: int
    height: int
    latent_hw: tuple[int, int]
    vae: StreamVAEState
    pacer: CfrPacer
    encoder: H264Encoder
    window: CreditWindow
    queue: asyncio.Queue[LatentChunk | None] = field(default_factory=asyncio.Queue)
    end: _EndRequest | None = None
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    last_seq: int = -1  # the last chunk decoded
    segment: int = 0  # warm-up segment of the last chunk decoded (a `cut` starts the next: the cache starts over)
    accepted: tuple[int, int] = (-1, -1)  # (segment, seq) of the last chunk queued: the stream's order
    message_seq: int = 0
    task: asyncio.Task[None] | None = None
    decoded: int = 0  # chunks decoded (what the StreamOutput reports count)
    reported_at: float = 0.0  # when the last StreamOutput went out
    traces: OutputTraces = field(default_factory=OutputTraces)  # decoded chunks' traces, until egress gets them


class DecoderService(Service):
    role = "decoder"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.vae: StreamVAE | None = None
        self.stats = DecoderStats()
        self.decoding: dict[str, DecoderStream] = {}
        # streams ended here → ((segment, seq) of the last chunk taken, ended at)
        self._ended: dict[str, tuple[tuple[int, int], float]] = {}
        self._early_ends: dict[str, tuple[int, float]] = {}  # 'ended' events of streams with no chunk yet
        self._model_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vae-decode")
        # every stream's chunk ready in one loop turn is decoded by one VAE call (encoder/batching.py)
        self._batcher: ChunkBatcher[DecodeJob, DecodedFrames] = ChunkBatcher(
            self._decode_batch, self._model_thread, self.settings.encoder.batch_window_ms / 1000.0, "decode")
        self.assignments = Assignments("decoder", self.member_id)
        self._closing = False
        self.checks["vae"] = False
        if self.video_message_bytes() < 64 * 1024:
            raise ServiceStartError(f"decoder: video messages limited to {self.video_message_bytes()} bytes "
                                    "(min of nats.max_send_bytes and half of nats.credit_window_bytes); need 64 KiB")

    # -- sizes --------------------------------------------------------------------------------------------

    def video_message_bytes(self) -> int:
        """The byte budget of one ``EncodedVideo`` message: units are packed under it, a larger unit is dropped."""
        nats = self.settings.nats
        return min(nats.max_send_bytes, nats.credit_window_bytes // 2)

    def max_send_bytes(self) -> int:
        # EncodedVideo messages are packed to the budget; heartbeats (≈100 B + 66 B per stream) are far smaller.
        return self.video_message_bytes()

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        assert self.bus is not None
        loop = asyncio.get_running_loop()
        self.vae = await loop.run_in_executor(self._model_thread, self._load_vae)
        stream = self.settings.stream
        await loop.run_in_executor(self._model_thread, _warm_up, self.vae, self.work, (stream.height, stream.width))
        self.checks["vae"] = True
        await self.assignments.start(self.bus)
        known = self.assignments.known(self.serves)
        await self.bus.subscribe(CHANNELS["stream_x0"].wildcard(), self._on_chunk, expected=LatentChunk, credit=True,
                                 known=known)
        await self.bus.subscribe(CHANNELS["stream_event"].wildcard(), self._on_event, expected=StreamEvent,
                                 known=known)

    def _load_vae(self) -> StreamVAE:
        vae = self._load_model_vae()
        if self.settings.model.passthrough:  # measurement mode: frames pass unchanged (encoder/passthrough.py)
            from encoder.passthrough import PassthroughVAE

            return PassthroughVAE.around(vae) if self.settings.model.passthrough_runs_vae else PassthroughVAE(vae.vae)
        return vae

    def _load_model_vae(self) -> StreamVAE:
        from wan.device import resolve_device, resolve_dtype

        model = self.settings.model
        device = resolve_device(model.device)
        dtype = resolve_dtype(model.dtype, device)
        torch.set_grad_enabled(False)
        dec, enc = self.settings.decoder, self.settings.encoder
        taehv = enc.vae == "taehv" or dec.decoder == "taehv"  # encoder.vae: both ways; decoder.decoder: decode only
        config = StreamVAEConfig(decoder="taehv" if taehv else "wan", taehv_path=dec.taehv_path or enc.taehv_path)
        source = model_source(model, "decoder")
        if source == "tiny":
            log.warning("decoder: no model.model_dir: decoding with the tiny RANDOM VAE (plumbing only)")
            return tiny_stream_vae(config, dtype=dtype, device=device)
        if source == "random":
            vae = random_stream_vae(config, dtype=dtype, device=device)  # ingest builds the same one
            if enc.compile:
                compile_stream_vae(vae)
            return vae
        assert model.model_dir is not None
        try:
            vae = load_stream_vae(model.model_dir, config, dtype=dtype, device=device)
        except (FileNotFoundError, ValueError) as e:
            raise ServiceStartError(f"decoder: cannot load the VAE from {model.model_dir}: {e}") from e
        if enc.compile:
            compile_stream_vae(vae)
        return vae

    def _decode_batch(self, jobs: list[DecodeJob]) -> list[DecodedFrames | Exception]:
        """Model thread: one batch; a stuck decode fails /healthz, its time is what admission counts per
        megapixel-frame."""
        assert self.vae is not None
        with self.watchdog.busy("vae_decode", mpx=sum(_output_mpx(self.vae, z) for _, z in jobs)):
            return _decode_frames(self.vae, jobs)

    async def drain(self) -> None:
        """End every stream now: buffered frames are encoded and sent with ``end_of_stream``."""
        self._closing = True
        for st in list(self.decoding.values()):
            self._request_end(st, _EndRequest(-1, time.time()))
        tasks = [st.task for st in self.decoding.values() if st.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        await self.assignments.stop()

    # -- input --------------------------------------------------------------------------------------------

    def _drop(self, reason: str, chunk: LatentChunk, why: str = "") -> None:
        self.stats.chunks_dropped += 1
        CHUNKS.labels(result=reason).inc()
        log.warning("stream %s chunk %d dropped (%s)%s", chunk.stream_id, chunk.seq, reason, f": {why}" if why else "")

    def _fail(self, chunk: LatentChunk, why: str) -> None:
        self.stats.chunks_failed += 1
        CHUNKS.labels(result="failed").inc()
        log.warning("stream %s chunk %d failed: %s", chunk.stream_id, chunk.seq, why)

    def _check_latent(self, chunk: LatentChunk, st: DecoderStream | None) -> str | None:
        """Why this chunk's latent cannot be decoded for its stream (None: it can)."""
        assert self.vae is not None
        z = chunk.latent
        if z.ndim != 4 or z.shape[0] < 1 or z.shape[1] != self.vae.z_dim or min(z.shape[2:]) < 1:
            return f"latent must be [F>=1, {self.vae.z_dim}, H, W], got {tuple(z.shape)}"
        if not z.dtype.is_floating_point:
            return f"latent dtype {z.dtype} is not floating point"
        if st is not None and tuple(z.shape[2:]) != st.latent_hw:
            return f"latent size {tuple(z.shape[2:])} differs from the stream's {st.latent_hw}"
        return None

    async def _on_chunk(self, chunk: LatentChunk, raw: Msg) -> None:
        if raw.subject != Subjects.stream_x0(chunk.stream_id):
            self._drop("mismatched", chunk, f"stream id does not match the subject {raw.subject}")
            return
        if not self.assignments.mine(chunk.stream_id):  # another decoder's (counted, not logged: the normal case)
            self.stats.chunks_unassigned += 1
            CHUNKS.labels(result="unassigned").inc()
            return
        st = self.decoding.get(chunk.stream_id)
        if st is None:
            ended = self._ended.get(chunk.stream_id)
            if self._closing:
                self._drop("draining", chunk)
                return
            if ended is not None and not _comes_after(chunk, ended[0]):
                self._drop("after_end", chunk)
                return
        problem = self._check_latent(chunk, st)
        if problem is not None:
            self._fail(chunk, problem)
            return
        if st is None:
            st = await self._open(chunk)
        elif not _comes_after(chunk, st.accepted):
            self._drop("stale", chunk, f"(segment, seq) ({chunk.segment}, {chunk.seq}) not after {st.accepted}")
            return
        st.accepted = (chunk.segment, chunk.seq)
        chunks_queued = st.queue.qsize()
        if chunks_queued >= self.settings.decoder.max_queued_chunks:
            oldest = st.queue.get_nowait()
            if oldest is not None:
                self._drop("queue_full", oldest)
        st.queue.put_nowait(chunk)

    async def _on_event(self, event: StreamEvent, raw: Msg) -> None:
        if raw.subject != Subjects.stream_event(event.stream_id) or event.kind != "ended":
            return
        st = self.decoding.get(event.stream_id)
        if st is not None:
            self._request_end(st, _EndRequest(event.seq, time.time() + self.settings.decoder.ended_grace_s))
        else:  # a short stream's x0 chunks can arrive after its 'ended' event (the DiT ring takes time)
            _remember(self._early_ends, event.stream_id, event.seq)

    def _request_end(self, st: DecoderStream, request: _EndRequest) -> None:
        if st.end is None or request.deadline < st.end.deadline:
            st.end = request
        st.queue.put_nowait(None)  # wakes the decode loop

    async def _open(self, chunk: LatentChunk) -> DecoderStream:
        assert self.vae is not None and self.bus is not None
        sid = chunk.stream_id
        fps = chunk.fps  # the stream's rate travels with its chunks: no stream-table read per hop
        h, w = (int(v) for v in chunk.latent.shape[2:])
        sf = self.vae.spatial_factor
        eg = self.settings.egress
        # a video stream's steady chunk: its prepare chunk's extra frame starts the output that much sooner
        # (CfrPacer); a T2V chunk (noise_scale 1) is generated a whole chunk of frames after the one before it, so
        # there is no surplus to count on
        steady = ChunkClock.v2v().output_frames(1) if chunk.noise_scale < 1 else None
        pacer = CfrPacer.from_settings(fps, eg, steady)
        encoder = H264Encoder.from_settings(w * sf, h * sf, fps, eg)
        window_bytes = self.settings.nats.credit_window_bytes
        window = await self.bus.credit_window(Subjects.stream_video(sid), window_bytes).start()
        st = DecoderStream(stream_id=sid, fps=fps, width=w * sf, height=h * sf, latent_hw=(h, w),
                           vae=self.vae.new_state(), pacer=pacer, encoder=encoder, window=window)
        self.decoding[sid] = st
        self.streams.add(sid)
        self._ended.pop(sid, None)
        early_end = self._early_ends.pop(sid, None)
        if early_end is not None and time.time() - early_end[1] < _ENDED_MEMORY_S:
            self._request_end(st, _EndRequest(early_end[0], time.time() + self.settings.decoder.ended_grace_s))
        self.stats.streams_started += 1
        st.task = asyncio.create_task(self._run_stream(st), name=f"decoder-{sid}")
        log.info("stream %s: decoding %dx%d at %g fps", sid, st.width, st.height, fps)
        return st

    # -- per-stream work ----------------------------------------------------------------------------------

    async def _run_stream(self, st: DecoderStream) -> None:
        output = asyncio.create_task(self._output_loop(st), name=f"decoder-out-{st.stream_id}")
        try:
            await self._decode_loop(st)
        except Exception:
            log.exception("stream %s: decode loop failed; ending the stream", st.stream_id)
        finally:
            st.closing.set()
            with contextlib.suppress(Exception):
                await output
            while not st.queue.empty():
                left = st.queue.get_nowait()
                if left is not None:
                    self._drop("ended", left, "the stream ended first")
            await st.window.close()
            if self.decoding.get(st.stream_id) is st:
                del self.decoding[st.stream_id]
            self.streams.discard(st.stream_id)
            _remember(self._ended, st.stream_id, st.accepted)
            self.stats.streams_ended += 1
            log.info("stream %s ended after chunk %d", st.stream_id, st.last_seq)

    async def _decode_loop(self, st: DecoderStream) -> None:
        idle = self.settings.decoder.idle_timeout_s
        while True:
            if st.end is not None:
                if st.last_seq >= st.end.last_seq:
                    return
                if st.queue.empty() and time.time() >= st.end.deadline:
                    log.warning("stream %s ended before its last chunk %d arrived", st.stream_id, st.end.last_seq)
                    return
            timeout = idle if st.end is None else max(0.0, st.end.deadline - time.time())
            try:
                chunk = await asyncio.wait_for(st.queue.get(), timeout)
            except TimeoutError:
                if st.end is None:
                    log.warning("stream %s: no chunk for %.0fs; ending it", st.stream_id, idle)
                return
            if chunk is not None:
                await self._decode(st, chunk)

    async def _decode(self, st: DecoderStream, chunk: LatentChunk) -> None:
        assert self.vae is not None
        latents = chunk.latent.permute(1, 0, 2, 3).unsqueeze(0)  # [F, C, H, W] → [1, C, F, H, W]
        new_segment = chunk.segment != st.segment or chunk.latent_start == 0
        if new_segment and st.vae.latents_decoded:  # a new warm-up (a `cut`, an ingest restart): the cache
            st.vae = self.vae.new_state()          # starts over; its prepare chunk decodes as a stream's first
        joined = st.vae.latents_decoded == 0 and chunk.latent_start != 0
        span = st.traces.start(chunk)
        try:  # batched with the other streams' ready chunks (_decode_batch: watchdog, work meter)
            float01, rgb = await self._batcher.submit((st.vae, latents))
        except Exception as e:
            st.traces.failed(span, e)
            self._fail(chunk, f"{type(e).__name__}: {e}")
            return
        if st.last_seq >= 0 and not new_segment and chunk.seq > st.last_seq + 1:
            self.stats.chunk_gaps += chunk.seq - st.last_seq - 1
            log.warning("stream %s: chunks %d..%d missing", st.stream_id, st.last_seq + 1, chunk.seq - 1)
        st.last_seq, st.segment = chunk.seq, chunk.segment
        st.decoded += 1
        await self._report_output(st, chunk)
        self.stats.chunks_decoded += 1
        self.stats.frames_decoded += rgb.shape[0]
        CHUNKS.labels(result="decoded").inc()
        FRAMES.labels(kind="decoded").inc(rgb.shape[0])
        if joined:
            float01, rgb = self._pad_join(st, chunk, float01, rgb)
        tap = self.settings.decoder.debug_tap_dir
        if tap is not None:
            await asyncio.to_thread(write_debug_tap, tap / st.stream_id / f"{chunk.seq}.npy", float01)
        dropped = st.pacer.stats.dropped
        # frame i of a chunk was captured i/fps after its first (a join's padding stands in for the missing ones)
        st.pacer.push(list(rgb), time.time(), [chunk.capture_time + i / chunk.fps for i in range(rgb.shape[0])])
        FRAMES.labels(kind="dropped").inc(st.pacer.stats.dropped - dropped)
        st.traces.decoded(chunk, span)

    async def _report_output(self, st: DecoderStream, chunk: LatentChunk) -> None:
        """Tell the stream's ingest that styled output flows (its liveness watch), at most every
        ``OUTPUT_REPORT_S`` per stream, and at once for a new segment's first chunk (a repair answered)."""
        now = time.monotonic()
        if now - st.reported_at < OUTPUT_REPORT_S and chunk.latent_start != 0:
            return
        st.reported_at = now
        assert self.bus is not None
        try:
            await self.bus.publish(Subjects.stream_output(st.stream_id), StreamOutput(
                stream_id=st.stream_id, seq=chunk.seq, segment=chunk.segment, decoded=st.decoded, late=st.traces.late,
                at=time.time()))
        except Exception as e:  # the watch sees the next one; decoding goes on
            log.warning("stream %s: output report not sent: %s", st.stream_id, e)

    def _pad_join(self, st: DecoderStream, chunk: LatentChunk, float01: np.ndarray,
                  rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A chunk decoded on an empty cache mid-segment (this decoder restarted, or the segment's prepare chunk
        was lost) gives 1 frame for its first latent instead of 4: its first frame is repeated so the chunk yields
        the frames a continuing decode would, and the CFR output sees no hole."""
        assert self.vae is not None
        pad = chunk.latent.shape[0] * self.vae.temporal_factor - rgb.shape[0]
        self.stats.joins += 1
        log.info("stream %s: joined segment %d at chunk %d on an empty decoder cache", st.stream_id, chunk.segment,
                 chunk.seq)
        if pad <= 0:
            return float01, rgb
        self.stats.frames_padded += pad
        FRAMES.labels(kind="padded").inc(pad)
        return (np.concatenate([np.repeat(float01[:1], pad, axis=0), float01]),
                np.concatenate([np.repeat(rgb[:1], pad, axis=0), rgb]))

    async def _output_loop(self, st: DecoderStream) -> None:
        while not st.closing.is_set():
            due = st.pacer.next_due()
            delay = 0.02 if due is None else due - time.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(st.closing.wait(), delay)
                continue
            await self._emit(st, st.pacer.pop_due(time.time()), final=False)
        await self._emit(st, st.pacer.flush(), final=True)

    async def _emit(self, st: DecoderStream, paced: list[PacedFrame], *, final: bool) -> None:
        try:
            units = await asyncio.to_thread(_encode, st.encoder, paced, final)
        except Exception as e:
            log.error("stream %s: H.264 encode failed: %s", st.stream_id, e)
            units = []
        repeated = sum(p.repeated for p in paced)
        self.stats.frames_output += len(paced)
        self.stats.frames_repeated += repeated
        FRAMES.labels(kind="output").inc(len(paced))
        FRAMES.labels(kind="repeated").inc(repeated)
        if units or final:
            await self._send(st, units, end_of_stream=final)

    def _message(self, st: DecoderStream, units: list[VideoUnit], end: bool) -> EncodedVideo:
        cfg = st.encoder.config
        return EncodedVideo(stream_id=st.stream_id, seq=st.message_seq, width=cfg.width, height=cfg.height,
                            fps=cfg.fps, extradata=cfg.extradata, units=units, end_of_stream=end)

    async def _send(self, st: DecoderStream, units: list[VideoUnit], *, end_of_stream: bool) -> None:
        """Pack units into messages under the byte budget and publish them in order (the last carries the end)."""
        budget = self.video_message_bytes()
        batches: list[list[VideoUnit]] = []
        batch: list[VideoUnit] = []
        for unit in units:
            if len(self._message(st, [*batch, unit], True).encode()) <= budget:
                batch.append(unit)
                continue
            if batch:
                batches.append(batch)
            batch = [unit]
            if len(self._message(st, batch, True).encode()) > budget:
                self._unit_dropped("too_large", 1, f"{len(unit.data)}-byte access unit over the {budget}-byte budget")
                batch = []
        if batch or end_of_stream:
            batches.append(batch)
        for i, batch_units in enumerate(batches):
            end = end_of_stream and i == len(batches) - 1
            data = self._message(st, batch_units, end).encode()
            trace, headers = st.traces.carried(batch_units)
            try:
                with telemetry.in_chunk_trace(trace):  # egress's span continues the chunk's trace
                    await st.window.publish(data, timeout=self.settings.decoder.publish_timeout_s, headers=headers)
            except CreditTimeout as e:  # (the window forgets credit a gone or restarted consumer never returns)
                self._unit_dropped("no_credit", len(batch_units), str(e))
                continue
            except PayloadTooLarge as e:
                self._unit_dropped("too_large", len(batch_units), str(e))
                continue
            except Exception as e:  # connection trouble: this message is lost, the stream goes on
                self._unit_dropped("publish_error", len(batch_units), f"{type(e).__name__}: {e}")
                continue
            st.message_seq += 1
            self.stats.messages_sent += 1
            self.stats.units_sent += len(batch_units)

    def _unit_dropped(self, reason: str, n: int, why: str) -> None:
        self.stats.units_dropped += n
        VIDEO_DROPPED.labels(reason=reason).inc(n)
        log.warning("dropped %d access unit(s) (%s): %s", n, reason, why)


def _comes_after(chunk: LatentChunk, accepted: tuple[int, int]) -> bool:
    """Whether a chunk is new for its stream: (segment, seq) order — a new segment is new even at a lower seq (an
    ingest that restarted its count) — or a stream start (seq 0 with a prepare chunk: a session started over)."""
    return (chunk.segment, chunk.seq) > accepted or (chunk.seq == 0 and chunk.latent_start == 0)


def _remember(table: dict[str, tuple[_T, float]], stream_id: str, seq: _T) -> None:
    """Note (seq, now) for a stream, forgetting entries older than ``_ENDED_MEMORY_S`` (bounded memory)."""
    now = time.time()
    for sid, (_, at) in list(table.items()):
        if now - at > _ENDED_MEMORY_S:
            del table[sid]
    table[stream_id] = (seq, now)


def _warm_up(vae: StreamVAE, meter: WorkMeter, stream_size: tuple[int, int]) -> None:
    """Throwaway decodes (a first and steady chunks), so a stream's first chunk does not pay for lazy init; the
    last is the first measurement of what a decode costs here, at ``seed_size`` of the default stream size."""
    h, w = (max(1, n // vae.spatial_factor) for n in seed_size(vae.device.type, stream_size))
    latents = torch.zeros(1, vae.z_dim, 2, h, w, device=vae.device, dtype=vae.dtype)
    state = vae.new_state()
    vae.decode(state, latents)
    vae.decode(state, latents[:, :, :1])  # a steady chunk's first call pays for its kernels
    with meter.measure("vae_decode", _output_mpx(vae, latents[:, :, :1])):
        vae.decode(state, latents[:, :, :1]).cpu()  # (the copy waits for an asynchronous device)


def _output_mpx(vae: StreamVAE, latents: torch.Tensor) -> float:
    """Megapixel-frames a decode of ``latents`` ``[1, C, F, h, w]`` makes: 4 frames per latent frame (the first of a
    stream 1; counted as 4, the steady rate), at the VAE's spatial factor."""
    _, _, f, h, w = latents.shape
    return 4 * f * h * w * vae.spatial_factor ** 2 / 1e6


def _decode_frames(vae: StreamVAE, jobs: list[DecodeJob]) -> list[DecodedFrames | Exception]:
    """Model thread: every job's frames from one batched decode (a failed job: its own exception)."""
    out: list[DecodedFrames | Exception] = []
    for r in vae.decode_batch([st for st, _ in jobs], [z for _, z in jobs]):
        try:
            out.append(r if isinstance(r, Exception) else frames_from_decoded(r))
        except Exception as e:
            out.append(e)
    return out


def _encode(encoder: H264Encoder, paced: list[PacedFrame], final: bool) -> list[VideoUnit]:
    units = [u for p in paced for u in encoder.encode(p.frame, p.index, p.capture_time)]
    return units + encoder.flush() if final else units



if __name__ == "__main__":
    sys.exit(main(DecoderService))
