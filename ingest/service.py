"""The ingest service: RTMP publishers in, latent chunks and prompt embeddings out (``rheo ingest``).

One process owns everything a stream has before the DiT: the RTMP session (``ingest.server``), the pacer and
chunker, the Stream-VAE encoder cache, the motion-aware noise EMA and the umT5 prompt encoder. Raw frames never
leave it. Per stream it keeps one ``IngestStreamState`` (serialisable), created when the publisher starts and
dropped when the stream ends.

What it speaks on the bus (subjects from ``proto.Subjects`` only):

- ``rheo.stream.<id>.latent``: one ``LatentChunk`` per chunk, through a ``CreditWindow``. The chunk carries the
  *clean* latent ``z`` (``[F, C, h, w]``, fp32, exactly what ``StreamPipeline`` feeds ``StreamBatchRunner``), the
  motion-adapted noise scale ``s`` and the timesteps ``[int(1000·s) − 100, t_1, ..]``; the first DiT stage draws
  the input noise itself (``draw_noise(.., c, 0, "input")``) and mixes ``s·ε + (1 − s)·z``, as the
  single-process path does, so the noise never crosses the bus.
- ``rheo.stream.<id>.prompt``: at stream start, and for every accepted prompt change, a ``PromptUpdate`` with
  the embedding of the prompt's L real tokens (``[L, D]`` in the encoder's dtype; the DiT zero-pads it back to
  text_len, losslessly — ``max_prompt_tokens`` says how many fit a message, longer prompts are refused); the same
  message is kept in the ``rheo-prompts`` KV bucket under ``<stream id>.<version>`` for stages that join late.
  A gateway request (no embedding) is answered with ``Ack(ref=<seq of the first chunk under the new version>)``;
  a ``cut`` request starts a new warm-up segment at that chunk (``LatentChunk.segment``, docs/architecture.md).
- ``rheo.stream.<id>.event``: ``StreamEvent`` ``live`` at start, ``ended`` (with the last published seq) at end.

Recovery (docs/recovery.md): per stream a ``ReplayRing`` keeps the segment's prepare and sink chunks and the last
K published chunks; when the block map moves to a ``failure`` epoch, every live stream's ring is republished, in
order and through the same credit window, with ``replay=True``, the new epoch and fresh deadlines, before any
further live chunk.

Streams are authorised against the stream table (``services.streams``) at RTMP ``publish``; a refusal reaches the
client as the ``onStatus`` description. See docs/ingest-service.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.errors
import numpy as np
import torch
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter, Histogram

from encoder.motion import MotionNoiseConfig, MotionNoiseController, MotionNoiseState
from encoder.prompt import PromptEncoder, trim_padding
from encoder.vae import StreamVAE, StreamVAEState
from ingest.pacing import RawChunk
from ingest.replay import ReplayRing, sink_chunks, window_chunks
from ingest.server import Decision, IngestStream, RtmpServer, StreamShape
from proto import (
    Ack,
    BlockMap,
    Buckets,
    Error,
    LatentChunk,
    PromptUpdate,
    ProtocolError,
    StreamEvent,
    StreamSpec,
    Subjects,
    decode,
)
from proto.clock import ChunkClock
from proto.spec import RingConfig, chunk_timesteps
from services.bus import KV, CreditTimeout, CreditWindow, PayloadTooLarge
from services.config import ModelSettings, Settings
from services.runtime import Service, main, write_debug_tap
from services.streams import StreamNotFound, StreamTable
from wan.config import WanDiTConfig

__all__ = [
    "IngestModels",
    "IngestService",
    "IngestStreamState",
    "motion_controller",
    "to_pixels",
]

log = logging.getLogger("rheo.ingest")

CHUNKS_PUBLISHED = Counter("rheo_ingest_chunks_published_total", "latent chunks published to the first DiT stage")
CHUNKS_DROPPED = Counter("rheo_ingest_chunks_dropped_total", "chunks dropped by ingest, by reason", ["reason"])
CHUNKS_REPLAYED = Counter("rheo_ingest_chunks_replayed_total", "latent chunks republished to rebuild lost KV")
ENCODE_SECONDS = Histogram("rheo_ingest_encode_seconds", "VAE encode + motion estimate time per chunk",
                           buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0))
PROMPT_REQUESTS = Counter("rheo_ingest_prompt_requests_total", "prompt change requests, by result", ["result"])

TINY_SEED = 0
"""Seed of the tiny random models: the same as ``rheo run``'s tiny preset, so every service builds the same ones."""

_LATENT_BYTES = 4  # latents travel as fp32, as the single-process pipeline hands them to the DiT
_MESSAGE_MARGIN = 64 * 1024  # frame header, msgpack body, prompt text (the gateway caps prompts at 2000 chars)
_CREDIT_RESET_S = 5.0  # no credit for this long: the consumer restarted or never came; forget outstanding bytes
_DRAIN_WAIT_S = 2.0  # longest a SIGTERM drain waits for queued chunks before cancelling the stream tasks


# -- the math the single-process pipeline does, in one place for the service ----------------------------------


def to_pixels(frames: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` → float32 ``[1, 3, T, H, W]`` in [-1, 1] (the same mapping as ``StreamPipeline``)."""
    t = torch.from_numpy(np.ascontiguousarray(frames))
    return (t.float() / 127.5 - 1.0).permute(3, 0, 1, 2)[None].to(device)


def motion_controller(spec: StreamSpec) -> MotionNoiseController:
    """The stream's noise controller, configured as ``StreamPipeline`` configures its own."""
    return MotionNoiseController(MotionNoiseConfig(enabled=spec.noise.motion_aware, s_init=spec.noise.noise_scale))


# -- models -----------------------------------------------------------------------------------------------------


@dataclass
class IngestModels:
    """What ingest runs: the Stream-VAE (encoder side) and the prompt encoder."""

    vae: StreamVAE
    prompt: PromptEncoder
    description: str

    @classmethod
    def tiny(cls) -> IngestModels:
        """The tiny random VAE and umT5 of ``wan.tiny`` (seed ``TINY_SEED``), as every tiny service builds."""
        from wan.tiny import make_tiny_t5, make_tiny_tokenizer, make_tiny_vae

        text_len = WanDiTConfig.tiny().text_len
        return cls(StreamVAE(make_tiny_vae(TINY_SEED)),
                   PromptEncoder(make_tiny_t5(TINY_SEED), make_tiny_tokenizer(), max_length=text_len),
                   "tiny random model (no weights)")

    @classmethod
    def load(cls, model: ModelSettings) -> IngestModels:
        if model.model_dir is None:
            return cls.tiny()
        from encoder.vae_loading import load_stream_vae
        from wan.device import resolve_device, resolve_dtype

        device = resolve_device(model.device)
        dtype = resolve_dtype(model.dtype, device)
        vae = load_stream_vae(model.model_dir, dtype=dtype, device=device)
        prompt = PromptEncoder.from_model_dir(model.model_dir, dtype=dtype, device=device,
                                              max_length=WanDiTConfig.named("1.3b").text_len)
        return cls(vae, prompt, f"weights from {model.model_dir}")


    def warm_up(self, size: int = 64) -> None:
        """Run each model once (first calls pay for kernel selection and allocation; chunk 0 must not)."""
        frames = torch.zeros(1, 3, 5, size, size, device=self.vae.device, dtype=self.vae.dtype)
        state = self.vae.new_state()
        self.vae.encode(state, frames)
        self.vae.encode(state, frames[:, :, :4])
        self.prompt.encode("warm up")
        self.prompt.clear_cache()


def _model_sizes(settings: Settings) -> tuple[int, int, int, int, int]:
    """(VAE latent channels, VAE spatial factor, text_len, text_dim, bytes per embedding value)."""
    from wan.tiny import TINY_T5_CONFIG, TINY_VAE_CONFIG

    model = settings.model
    if model.model_dir is None:
        z_dim, spatial = TINY_VAE_CONFIG["z_dim"], 2 ** (len(TINY_VAE_CONFIG["dim_mult"]) - 1)
        return z_dim, spatial, WanDiTConfig.tiny().text_len, TINY_T5_CONFIG["d_model"], 4
    from wan.device import resolve_device, resolve_dtype

    dtype = resolve_dtype(model.dtype, resolve_device(model.device))
    text_bytes = torch.empty((), dtype=dtype).element_size()
    return 16, 8, WanDiTConfig.named("1.3b").text_len, 4096, text_bytes  # the Wan2.1 VAE, umT5-XXL


def max_prompt_tokens(settings: Settings) -> int:
    """Most prompt tokens whose embedding fits one message: a ``PromptUpdate`` carries only the prompt's real
    tokens ``[L, D]`` (``encoder.prompt.trim_padding``; the DiT zero-pads back to text_len, losslessly). In bf16
    all 512 of umT5 fit (4 MiB); in fp32 a 512-token embedding alone is 8 MiB, over NATS' 8 MB ``max_payload``,
    so longer prompts are refused with a clear error instead of being cut or cast."""
    _, _, text_len, text_dim, text_bytes = _model_sizes(settings)
    return max(1, min(text_len, (settings.nats.max_send_bytes - _MESSAGE_MARGIN) // (text_dim * text_bytes)))


def largest_messages(settings: Settings) -> tuple[int, int]:
    """Bytes of the largest ``LatentChunk`` and ``PromptUpdate`` this configuration can publish (before loading)."""
    ing = settings.ingest
    z_dim, spatial, _, text_dim, text_bytes = _model_sizes(settings)
    first_latents = 2  # chunk 0 (ChunkClock.first_latent_frames): the largest latent chunk
    latent = z_dim * first_latents * -(-ing.max_model_height // spatial) * -(-ing.max_model_width // spatial)
    prompt = max_prompt_tokens(settings) * text_dim * text_bytes
    return latent * _LATENT_BYTES + _MESSAGE_MARGIN, prompt + _MESSAGE_MARGIN


# -- per-stream state -------------------------------------------------------------------------------------------


@dataclass(eq=False)
class IngestStreamState:
    """Everything ingest keeps for one stream: one object, moved with ``to_bytes``/``from_bytes``.

    ``next_seq`` is the seq of the next chunk to be taken from the RTMP queue (what a `blend` prompt change
    answers; a `cut` answers the first chunk of the new segment), ``last_seq`` the last one published.
    ``segment``/``segment_start``: the warm-up segment being encoded and the seq of its prepare chunk (latent and
    RoPE positions count from it). ``versions``: (first seq, prompt version) per accepted change, in order; a
    chunk takes the last one that has begun; ``steps_from`` the same for the step count (a change of it begins
    at a new segment's prepare chunk: the DiT's stream state has one slot per step). ``replay`` holds the
    segment's prepare and sink chunks and the last ``ingest.replay_chunks`` published chunks, for rebuilding a
    lost DiT stage's KV cache (docs/recovery.md).
    """

    spec: StreamSpec
    vae: StreamVAEState
    motion: MotionNoiseState
    prompt_version: int = 0
    next_seq: int = 0
    last_seq: int | None = None
    replay: ReplayRing = field(default_factory=lambda: ReplayRing(0, 0))
    segment: int = 0
    segment_start: int = 0
    versions: list[tuple[int, int]] = field(default_factory=list)
    steps_from: list[tuple[int, int]] = field(default_factory=list)
    prompt_keys: list[str] = field(default_factory=list)
    published: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)

    @classmethod
    def new(cls, spec: StreamSpec, prompt_version: int, replay_chunks: int,
            replay_head: int = 0) -> IngestStreamState:
        """``replay_chunks``: the ring's depth K; ``replay_head``: sink chunks kept after the prepare chunk."""
        return cls(spec=spec, vae=StreamVAEState(), motion=motion_controller(spec).new_state(),
                   prompt_version=prompt_version, replay=ReplayRing(replay_chunks, replay_head),
                   versions=[(0, prompt_version)], steps_from=[(0, spec.steps)])

    @property
    def stream_id(self) -> str:
        return self.spec.stream_id

    def version_of(self, seq: int) -> int:
        """The prompt version chunk ``seq`` is encoded under: the last accepted change that has begun by it."""
        return _in_force(self.versions, seq, self.prompt_version)

    def steps_of(self, seq: int) -> int:
        """The denoising steps of chunk ``seq``: those of the last step change that has begun by it."""
        return _in_force(self.steps_from, seq, self.spec.steps)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        CHUNKS_DROPPED.labels(reason=reason).inc()

    def to_bytes(self) -> bytes:
        """The state as one ``torch.save`` blob (messages as their wire frames; loads with ``weights_only``)."""
        frame = _frame_tensor
        data = {
            "spec": frame(self.spec.encode()),
            "vae": _cpu_tree(self.vae.to_dict()),
            "motion": _cpu_tree(self.motion.to_dict()),
            "prompt_version": self.prompt_version,
            "next_seq": self.next_seq,
            "last_seq": self.last_seq,
            "replay_head": [frame(c.encode()) for c in self.replay.head],
            "replay": [frame(c.encode()) for c in self.replay.tail],
            "replay_chunks": self.replay.depth,
            "replay_head_chunks": self.replay.head_chunks,
            "segment": self.segment,
            "segment_start": self.segment_start,
            "versions": [list(v) for v in self.versions],
            "steps_from": [list(v) for v in self.steps_from],
            "prompt_keys": list(self.prompt_keys),
            "published": self.published,
            "dropped": dict(self.dropped),
        }
        buf = io.BytesIO()
        torch.save(data, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> IngestStreamState:
        d = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        replay = ReplayRing(int(d["replay_chunks"]), int(d["replay_head_chunks"]))
        replay.head = [decode(t.numpy().tobytes(), LatentChunk) for t in d["replay_head"]]
        replay.tail.extend(decode(t.numpy().tobytes(), LatentChunk) for t in d["replay"])
        replay.segment = next((c.segment for c in reversed([*replay])), None)
        return cls(spec=decode(d["spec"].numpy().tobytes(), StreamSpec), vae=StreamVAEState.from_dict(d["vae"]),
                   motion=MotionNoiseState.from_dict(d["motion"]), prompt_version=int(d["prompt_version"]),
                   next_seq=int(d["next_seq"]), last_seq=d["last_seq"], replay=replay,
                   segment=int(d.get("segment", 0)), segment_start=int(d.get("segment_start", 0)),
                   versions=[(int(a), int(b)) for a, b in d.get("versions", [])],
                   steps_from=[(int(a), int(b)) for a, b in d.get("steps_from", [])],
                   prompt_keys=list(d["prompt_keys"]), published=int(d["published"]),
                   dropped=collections.Counter(d["dropped"]))


def _in_force(changes: list[tuple[int, int]], seq: int, default: int) -> int:
    """The value of the last (first seq, value) change begun by ``seq``; the ones before it can never apply again
    (seqs only grow), so they are dropped."""
    begun = [i for i, (start, _) in enumerate(changes) if start <= seq]
    if not begun:
        return default
    del changes[: begun[-1]]
    return changes[0][1]


def _frame_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _cpu_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").clone()
    if isinstance(obj, dict):
        return {k: _cpu_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu_tree(v) for v in obj]
    return obj


# -- the service ------------------------------------------------------------------------------------------------


@dataclass
class _Live:
    """Runtime handles of a live stream (not part of its movable state)."""

    state: IngestStreamState
    window: CreditWindow
    clock: ChunkClock
    stream: IngestStream
    subs: list[Subscription] = field(default_factory=list)
    last_credit_progress: float = field(default_factory=time.monotonic)
    publishing: asyncio.Lock = field(default_factory=asyncio.Lock)  # live chunks and a replay never interleave


class IngestService(Service):
    role = "ingest"

    def __init__(self, settings: Settings, member_id: str | None = None) -> None:
        super().__init__(settings, member_id)
        self.models: IngestModels | None = None
        self.rtmp: RtmpServer | None = None
        self.table: StreamTable | None = None
        self.live: dict[str, _Live] = {}
        self.checks.update({"models": False, "rtmp": False})
        self._prompts: KV | None = None
        self._specs: dict[str, StreamSpec] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._watch: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Model work (VAE encode, umT5) runs on one thread: the event loop keeps serving RTMP and NATS, and one
        # stream's chunks are encoded strictly in order.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-model")
        self.ring: RingConfig = settings.dit_stage.ring()
        """The ring the stages run (the one the controller's block map carries): chunks are clocked by it."""

    def max_send_bytes(self) -> int:
        return max(largest_messages(self.settings))

    @property
    def states(self) -> dict[str, IngestStreamState]:
        return {sid: lv.state for sid, lv in self.live.items()}

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        assert self.bus is not None
        loop = asyncio.get_running_loop()
        self.table = await StreamTable.open(self.bus)
        self._prompts = await self.bus.kv(Buckets.PROMPTS, replicas=self.settings.nats.kv_replicas)
        blockmaps = await self.bus.kv(Buckets.BLOCKMAP, replicas=self.settings.nats.kv_replicas)
        self._watch = asyncio.create_task(self._watch_blockmap(blockmaps), name="blockmap-watch")
        self.models = await loop.run_in_executor(self._compute, IngestModels.load, self.settings.model)
        await loop.run_in_executor(self._compute, self.models.warm_up)
        if self.settings.model.model_dir is None:
            log.warning("NO MODEL WEIGHTS (model.model_dir unset): ingest runs the tiny RANDOM VAE and umT5")
        self.checks["models"] = True
        slo = self.settings.stream.slo_latency_ms / 1000.0
        self.rtmp = RtmpServer(self.settings.ingest, self.authorise, latency_budget_s=slo,
                               on_stream_start=self._on_stream_start, on_stream_end=self._on_stream_end)
        await self.rtmp.start()
        self.checks["rtmp"] = True
        log.info("ingest: %s; RTMP on :%d", self.models.description, self.rtmp.port)

    async def drain(self) -> None:
        """Stop taking publishers, finish the chunks already queued, announce every stream's end."""
        if self.rtmp is not None:
            await self.rtmp.close()  # ends every stream: their queues close, their tasks finish and clean up
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_DRAIN_WAIT_S)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        background = [*self._background, *([self._watch] if self._watch is not None else [])]
        for t in background:
            t.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        self._compute.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watch_blockmap(self, kv: KV) -> None:
        """Track the current block-map epoch: every chunk enters the DiT under the epoch current at publish."""
        while True:
            try:
                async for entry in kv.watch("current"):
                    if entry.value is None:
                        continue
                    try:
                        bm = decode(entry.value, BlockMap, kv.limits)
                    except ProtocolError as e:
                        log.warning("ignored a malformed block map in %s: %s", Buckets.BLOCKMAP, e)
                        continue
                    newer = bm.epoch > self.epoch
                    self.epoch = bm.epoch
                    if newer and bm.ring != self.ring:
                        log.error("block map epoch %d: the stages run ring %s, this ingest clocks chunks by %s: "
                                  "configure dit_stage the same for every service", bm.epoch, bm.ring, self.ring)
                    if newer and bm.reason == "failure":
                        for live in list(self.live.values()):
                            self._spawn(self._replay(live, bm.epoch), f"replay-{live.state.stream_id}")
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a NATS hiccup: keep the last epoch, watch again
                log.warning("block map watch failed (%s); retrying", e)
            await asyncio.sleep(1.0)

    # -- admission ----------------------------------------------------------------------------------------------

    async def authorise(self, app: str, stream_key: str, metadata: dict[str, Any]) -> Decision:
        """RTMP ``publish``: the key must open a stream in the table whose spec this ingest can serve."""
        if self._draining:
            return Decision(False, "ingest is shutting down; reconnect")
        assert self.table is not None
        try:
            record = await self.table.lookup_key(stream_key)
        except Exception as e:
            log.warning("stream table lookup failed: %s", e)
            return Decision(False, f"stream table unavailable ({type(e).__name__}); retry")
        if record is None:
            return Decision(False, "unknown stream key")
        spec = record.spec
        problem = self._unservable(spec) or self._prompt_problem(spec.prompt) or await self._admission(spec)
        if problem:
            return Decision(False, f"stream {spec.stream_id}: {problem}")
        self._specs[spec.stream_id] = spec
        return Decision(True, stream_id=spec.stream_id, shape=StreamShape(spec.width, spec.height, spec.fps))

    async def _admission(self, spec: StreamSpec) -> str:
        """The controller's refusal reason, or "" when the stream may start (no controller deployed: admitted)."""
        assert self.bus is not None
        try:
            reply = await self.bus.request(Subjects.admission(), spec, timeout=self.settings.ingest.admission_timeout_s)
        except nats.errors.NoRespondersError:
            log.warning("stream %s: no controller answers admission; admitted", spec.stream_id)
            return ""
        except (nats.errors.TimeoutError, TimeoutError):
            return "the controller did not answer admission in time; retry"
        except nats.errors.Error as e:  # connection closed or draining (shutdown)
            return f"cannot reach the controller ({type(e).__name__}); retry"
        except ProtocolError as e:
            return f"malformed admission answer ({e}); retry"
        return reply.message if isinstance(reply, Error) else ""

    def _unservable(self, spec: StreamSpec) -> str:
        ing = self.settings.ingest
        if spec.t2v:
            return "a text-to-video stream takes no input video"
        if spec.width > ing.max_model_width or spec.height > ing.max_model_height:
            return f"model size {spec.width}x{spec.height} exceeds {ing.max_model_width}x{ing.max_model_height}"
        return ""

    # -- streams ------------------------------------------------------------------------------------------------

    def _on_stream_start(self, stream: IngestStream) -> None:
        spec = self._specs.pop(stream.stream_id, None)
        if spec is None:  # cannot happen: the authoriser ran just before
            log.error("stream %s started without an authorised spec; closing it", stream.stream_id)
            stream.queue.close()
            return
        previous = self._tasks.get(stream.stream_id)
        task = asyncio.create_task(self._run_stream(stream, spec, previous), name=f"ingest-{stream.stream_id}")
        self._tasks[stream.stream_id] = task
        task.add_done_callback(lambda t, sid=stream.stream_id: self._tasks.pop(sid, None)
                               if self._tasks.get(sid) is t else None)

    def _on_stream_end(self, stream: IngestStream) -> None:
        log.info("stream %s: publisher gone for good (%d chunks queued to finish)", stream.stream_id,
                 len(stream.queue))

    async def _run_stream(self, stream: IngestStream, spec: StreamSpec, previous: asyncio.Task | None) -> None:
        """One stream's life: go live, encode every chunk in order, announce the end."""
        if previous is not None:  # a new session of the same stream waits for the old one's clean-up
            await asyncio.gather(previous, return_exceptions=True)
        assert self.bus is not None and self.table is not None
        sid = spec.stream_id
        live: _Live | None = None
        try:
            record = await self.table.update(sid, lambda r: r.model_copy(update={"state": "live"}))
            spec = record.spec if not self._unservable(record.spec) else spec
            state = IngestStreamState.new(spec, record.prompt_version, *self.replay_depth())
            window = await self.bus.credit_window(Subjects.stream_latent(sid),
                                                  self.settings.nats.credit_window_bytes).start()
            live = _Live(state, window, spec.clock(self.ring), stream)
            self.live[sid] = live
            self.streams.add(sid)
            live.subs.append(await self.bus.subscribe(
                Subjects.stream_prompt(sid), lambda m, raw: self._on_prompt(live, m, raw), expected=PromptUpdate))
            live.subs.append(await self.bus.subscribe(
                Subjects.stream_spec(sid), lambda m, raw: self._on_spec(live, m, raw), expected=StreamSpec))
            await self.bus.publish(Subjects.stream_event(sid), StreamEvent(stream_id=sid, kind="live",
                                                                           at=time.time()))
            await self._announce_prompt(live, PromptUpdate(stream_id=sid, version=record.prompt_version,
                                                           prompt=spec.prompt))
            log.info("stream %s live (%dx%d @ %g fps, %d steps, prompt v%d)", sid, spec.width, spec.height,
                     spec.fps, spec.steps, record.prompt_version)
        except StreamNotFound:
            log.warning("stream %s was deleted before it went live; refusing its media", sid)
            stream.queue.close()
        except Exception:
            log.exception("stream %s: could not go live; its media is dropped", sid)
            stream.queue.close()
        try:
            while (raw := await stream.queue.get()) is not None:
                if live is None:
                    CHUNKS_DROPPED.labels(reason="not_live").inc()
                    continue
                await self._process(live, raw, ending=stream.queue.closed)
        finally:
            if self.rtmp is not None and self.rtmp.streams.get(sid) is stream:
                self.rtmp._end_stream(stream)  # a failed start: stop taking media for it
            if live is not None:
                await self._end(live)

    async def _end(self, live: _Live) -> None:
        assert self.bus is not None and self.table is not None
        state, sid = live.state, live.state.stream_id
        for sub in live.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await live.window.close()
        last = state.last_seq if state.last_seq is not None else 0
        try:
            with contextlib.suppress(StreamNotFound):  # the table first: whoever hears the event reads "ended"
                await self.table.update(sid, lambda r: r.model_copy(update={"state": "ended"}))
            await self.bus.publish(Subjects.stream_event(sid), StreamEvent(stream_id=sid, kind="ended", seq=last,
                                                                           at=time.time()))
            if self._prompts is not None:
                for key in state.prompt_keys:
                    with contextlib.suppress(Exception):
                        await self._prompts.delete(key)
        except Exception as e:
            log.warning("stream %s: end not fully announced: %s", sid, e)
        finally:
            if self.live.get(sid) is live:
                del self.live[sid]
                self.streams.discard(sid)
        log.info("stream %s ended after chunk %d (%d published, dropped: %s)", sid, last, state.published,
                 dict(state.dropped) or "none")

    # -- chunks -------------------------------------------------------------------------------------------------

    async def _process(self, live: _Live, raw: RawChunk, ending: bool = False) -> None:
        """Encode one chunk and publish it, or drop it with a counted, logged reason (this stream only).

        A chunk is encoded even when it is already late, so the VAE cache and the motion EMA stay those of the
        whole stream; only once the stream has ended (``ending``) is a late chunk dropped unencoded.
        """
        assert self.bus is not None
        state = live.state
        spec, version = state.spec, state.version_of(raw.seq)
        state.next_seq = raw.seq + 1
        if raw.segment != state.segment:
            if raw.seq != raw.segment_start:  # its prepare chunk was lost (queue overflow): warm up again
                state.drop("segment_unprepared")
                if live.stream.chunker.segment == raw.segment:
                    live.stream.cut()
                log.warning("stream %s chunk %d dropped: segment %d lost its prepare chunk", state.stream_id,
                            raw.seq, raw.segment)
                return
            state.segment, state.segment_start = raw.segment, raw.seq  # a cut: the caches start over
            state.vae = StreamVAEState()
            state.motion = motion_controller(spec).new_state()
        deadline = raw.capture_time + spec.slo.max_latency_ms / 1000.0
        if ending and time.time() > deadline:
            state.drop("deadline")
            log.warning("stream %s chunk %d dropped: past its deadline after the stream ended", state.stream_id,
                        raw.seq)
            return
        loop = asyncio.get_running_loop()
        try:
            latent, scale = await loop.run_in_executor(self._compute, self._encode, state, raw)
        except Exception as e:
            state.drop("encode_error")
            log.warning("stream %s chunk %d dropped: encode failed: %s: %s", state.stream_id, raw.seq,
                        type(e).__name__, e)
            return
        async with live.publishing:  # a replay in progress goes first; the epoch is the one current at publish
            await self._publish(live, raw, latent, scale, deadline, version)

    async def _publish(self, live: _Live, raw: RawChunk, latent: torch.Tensor, scale: float, deadline: float,
                       version: int) -> None:
        state, clock = live.state, live.clock
        c = raw.seq - state.segment_start  # the chunk's index in its segment
        chunk = LatentChunk(stream_id=state.stream_id, seed=state.spec.seed, fps=state.spec.fps, seq=raw.seq,
                            epoch=self.epoch,
                            latent_start=clock.latent_start(c), rope_start=clock.rope_start(c),
                            capture_time=raw.frame_times[0], deadline=deadline, prompt_version=version,
                            noise_scale=scale, timesteps=chunk_timesteps(state.steps_of(raw.seq), scale),
                            segment=state.segment, latent=latent)
        remaining = deadline - time.time()
        if remaining <= 0:
            state.drop("deadline")
            log.warning("stream %s chunk %d dropped: %.0f ms past its deadline before publishing",
                        state.stream_id, raw.seq, -remaining * 1000)
            return
        try:
            await live.window.publish(chunk, timeout=remaining)
        except CreditTimeout:
            state.drop("deadline")
            log.warning("stream %s chunk %d dropped: no credit from the first DiT stage before its deadline",
                        state.stream_id, raw.seq)
            self._maybe_reset_credit(live)
            return
        except (PayloadTooLarge, nats.errors.Error) as e:
            state.drop("publish_error")
            log.warning("stream %s chunk %d dropped: %s", state.stream_id, raw.seq, e)
            return
        live.last_credit_progress = time.monotonic()
        state.last_seq = raw.seq
        state.published += 1
        state.replay.add(chunk)
        CHUNKS_PUBLISHED.inc()

    def replay_depth(self) -> tuple[int, int]:
        """(K, sink chunks) of every stream's replay ring: ``ingest.replay_chunks``, or the rolling KV window."""
        ring = self.ring
        depth = self.settings.ingest.replay_chunks
        if depth is None:
            depth = window_chunks(ring.kv_window, ring.sink, ring.clock())
        return depth, sink_chunks(ring.sink, ring.clock())

    async def _replay(self, live: _Live, epoch: int) -> None:
        """Republish the stream's ring under failure epoch ``epoch``, before any further live chunk."""
        state = live.state
        async with live.publishing:
            chunks = list(state.replay)
            sent = 0
            for chunk in chunks:
                if self.epoch != epoch or self.live.get(state.stream_id) is not live:
                    break  # a newer failure epoch replays again; an ended stream needs nothing
                budget = state.spec.slo.max_latency_ms / 1000.0
                again = chunk.model_copy(update={"replay": True, "epoch": epoch, "deadline": time.time() + budget})
                try:
                    await live.window.publish(again, timeout=budget)
                except (CreditTimeout, PayloadTooLarge, nats.errors.Error) as e:
                    state.drop("replay_error")
                    log.warning("stream %s: replay of chunk %d under epoch %d failed: %s", state.stream_id,
                                chunk.seq, epoch, e)
                    self._maybe_reset_credit(live)
                    continue
                live.last_credit_progress = time.monotonic()
                sent += 1
                CHUNKS_REPLAYED.inc()
            log.info("stream %s: replayed %d of %d chunks (seq %s) under failure epoch %d", state.stream_id, sent,
                     len(chunks), [c.seq for c in chunks], epoch)

    def _maybe_reset_credit(self, live: _Live) -> None:
        """Credits lost with a restarted (or absent) consumer never come back: after a while, start afresh."""
        if time.monotonic() - live.last_credit_progress > _CREDIT_RESET_S:
            log.warning("stream %s: no credit for %.0f s; resetting the latent credit window", live.state.stream_id,
                        _CREDIT_RESET_S)
            live.window.reset()
            live.last_credit_progress = time.monotonic()

    def _encode(self, state: IngestStreamState, raw: RawChunk) -> tuple[torch.Tensor, float]:
        """Model thread: motion estimate + Stream-VAE encode, exactly as ``StreamPipeline._next_input``."""
        assert self.models is not None
        vae = self.models.vae
        spec = state.spec
        expected = (len(raw.frame_times), spec.height, spec.width, 3)
        if tuple(raw.frames.shape) != expected or raw.frames.dtype != np.uint8:
            raise ValueError(f"chunk frames are {raw.frames.dtype}{tuple(raw.frames.shape)}, expected uint8{expected}")
        tap = self.settings.ingest.debug_tap_dir
        if tap is not None:
            write_debug_tap(Path(tap) / state.stream_id / f"chunk_{raw.seq:06d}.npy", raw.frames)
        started = time.perf_counter()
        px = to_pixels(raw.frames, vae.device)
        level = motion_controller(spec).update(state.motion, px)
        z = vae.encode(state.vae, px.to(vae.dtype)).float()
        ENCODE_SECONDS.observe(time.perf_counter() - started)
        return z[0].transpose(0, 1).contiguous().cpu(), level.scale  # [1, C, F, h, w] → [F, C, h, w]

    # -- prompts and live parameters ----------------------------------------------------------------------------

    def _prompt_problem(self, prompt: str) -> str:
        """Why ``prompt``'s embedding cannot be published (empty: it can); tokenizing only, milliseconds."""
        assert self.models is not None
        limit = max_prompt_tokens(self.settings)
        n = self.models.prompt.token_count(prompt)
        if n <= limit:
            return ""
        return (f"the prompt has {n} tokens; at most {limit} fit one message at this model's embedding precision "
                f"(nats.max_send_bytes {self.settings.nats.max_send_bytes}): shorten it")

    async def _embed(self, prompt: str) -> torch.Tensor:
        """The prompt's real tokens ``[L, D]``: the zero padding to text_len is left to the DiT (lossless)."""
        assert self.models is not None
        enc = self.models.prompt
        loop = asyncio.get_running_loop()
        emb = await loop.run_in_executor(self._compute, enc.encode, prompt)
        return trim_padding(emb[0]).contiguous().cpu()  # [1, text_len, D] → [L, D]

    async def _announce_prompt(self, live: _Live, update: PromptUpdate) -> PromptUpdate:
        """Encode, publish the update with its embedding, keep it in the prompts bucket for late joiners."""
        assert self.bus is not None
        embedded = PromptUpdate(stream_id=update.stream_id, version=update.version, prompt=update.prompt,
                                mode=update.mode, blend_chunks=update.blend_chunks,
                                embedding=await self._embed(update.prompt))
        await self.bus.publish(Subjects.stream_prompt(update.stream_id), embedded)
        if self._prompts is not None:
            key = f"{update.stream_id}.{update.version}"
            try:
                await self._prompts.put(key, embedded)
                live.state.prompt_keys.append(key)
                while len(live.state.prompt_keys) > 2:  # the version in force and the one chunks in flight may use
                    await self._prompts.delete(live.state.prompt_keys.pop(0))
            except Exception as e:
                log.warning("stream %s: prompt v%d not stored in %s: %s", update.stream_id, update.version,
                            Buckets.PROMPTS, e)
        return embedded

    async def _on_prompt(self, live: _Live, update: PromptUpdate, msg: Msg) -> None:
        """A prompt change request (from the gateway): answer with the chunk seq it takes effect at."""
        assert self.bus is not None
        if update.embedding is not None:
            return  # an update already encoded (our own republish): for the DiT stages, not for us
        state = live.state
        if update.stream_id != state.stream_id:
            PROMPT_REQUESTS.labels(result="refused").inc()
            await self.bus.respond(msg, Error(code="bad_request", stream_id=state.stream_id,
                                              message=f"update for {update.stream_id!r} sent to {state.stream_id!r}"))
            return
        too_long = self._prompt_problem(update.prompt)
        if too_long:
            PROMPT_REQUESTS.labels(result="refused").inc()
            await self.bus.respond(msg, Error(code="prompt_too_long", stream_id=state.stream_id, message=too_long))
            return
        if update.version <= state.prompt_version:
            PROMPT_REQUESTS.labels(result="refused").inc()
            await self.bus.respond(msg, Error(code="stale_prompt_version", stream_id=state.stream_id,
                                              message=f"version {update.version} is not newer than the "
                                                      f"{state.prompt_version} in force"))
            return
        try:
            await self._announce_prompt(live, update)
        except Exception as e:
            PROMPT_REQUESTS.labels(result="failed").inc()
            log.warning("stream %s: prompt v%d failed: %s: %s", state.stream_id, update.version,
                        type(e).__name__, e)
            await self.bus.respond(msg, Error(code="prompt_failed", stream_id=state.stream_id,
                                              message=f"{type(e).__name__}: {e}"))
            return
        effective = state.next_seq
        if update.version > state.prompt_version:  # a concurrent newer change may have won meanwhile
            if update.mode == "cut":  # chunks already cut finish the old segment; the next one warms up anew
                effective = max(effective, live.stream.cut())
            state.prompt_version = update.version
            state.versions.append((effective, update.version))
            state.spec = state.spec.model_copy(update={"prompt": update.prompt})
        PROMPT_REQUESTS.labels(result="accepted").inc()
        log.info("stream %s: prompt v%d (%s) from chunk %d", state.stream_id, update.version, update.mode, effective)
        await self.bus.respond(msg, Ack(ref=str(effective), detail=f"prompt version {update.version}"))

    async def _on_spec(self, live: _Live, spec: StreamSpec, msg: Msg) -> None:
        """A live parameter change (from the gateway): answered with the chunk seq it takes effect at.

        The noise scale (motion controller s_init) applies from the next chunk encoded. A new step count cannot
        join a running segment (the DiT's stream state has one KV slot per step), so it starts a new warm-up
        segment, as a `cut` prompt change does: chunks already cut finish with the old count, the next one is the
        new segment's prepare chunk. Size, rate and mode are fixed for the session; the prompt changes through
        its own request (versions)."""
        assert self.bus is not None
        state = live.state
        if spec.stream_id != state.stream_id:
            await self.bus.respond(msg, Error(code="bad_request", stream_id=state.stream_id,
                                              message=f"spec for {spec.stream_id!r} sent to {state.stream_id!r}"))
            return
        kept = ("width", "height", "fps", "t2v", "t2v_frames", "prompt")
        new = spec.model_copy(update={k: getattr(state.spec, k) for k in kept})
        problem = self._unservable(new)
        if problem:
            log.warning("stream %s: spec change refused: %s", state.stream_id, problem)
            await self.bus.respond(msg, Error(code="bad_spec", stream_id=state.stream_id, message=problem))
            return
        effective = state.next_seq
        if new.steps != state.spec.steps:  # the spec holds the count last accepted (chunks may not have it yet)
            effective = max(effective, live.stream.cut())
            state.steps_from.append((effective, new.steps))
        state.spec = new
        log.info("stream %s: %d steps, noise scale %g from chunk %d", state.stream_id, new.steps,
                 new.noise.noise_scale, effective)
        await self.bus.respond(msg, Ack(ref=str(effective), detail=f"{new.steps} steps, noise scale "
                                                                   f"{new.noise.noise_scale:g}"))



if __name__ == "__main__":
    code = main(IngestService)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is drained and closed; skip tearing down torch/diffusers/transformers modules, which alone
    # takes seconds on a loaded node and would eat the SIGTERM budget.
    os._exit(code)
