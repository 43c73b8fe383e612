"""One stream as ingest keeps it: ``IngestStream``, its state and what it does with each chunk.

The object owns everything per stream between the chunk source and the bus: the Stream-VAE encoder cache and the
motion EMA (V2V), the prompt versions with their blend schedule, the step count per segment, the warm-up segment,
the chunk counters, the drop counts and the replay ring; and, while the stream is live here, the runtime handles
that do not move (its chunk source, credit window, subscriptions). ``to_bytes``/``from_bytes`` move the state in
one format. The chunk source is the RTMP side (``ingest.server.RtmpStream``: pacer, chunker, queue) or, for a T2V
stream, ``ingest.t2v.T2VSource``; either gives ``RawChunk``s in a ``ChunkQueue`` and can ``cut`` a new segment.
"""

from __future__ import annotations

import asyncio
import collections
import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import nats.errors
import numpy as np
import torch
from nats.aio.subscription import Subscription
from prometheus_client import Counter, Histogram

from encoder.motion import MotionNoiseConfig, MotionNoiseController, MotionNoiseState
from encoder.vae import StreamVAE, StreamVAEState
from ingest.drops import CHUNKS_DROPPED, DropLog, DropReason, count_drop, stream_drop_log
from ingest.liveness import StreamLiveness
from ingest.pacing import ChunkQueue, RawChunk
from ingest.replay import ReplayRing
from proto import DEFAULT_RING, LatentChunk, StreamRecord, StreamSpec, decode
from proto.clock import ChunkClock
from proto.spec import chunk_timesteps
from services import telemetry
from services.bus import CreditTimeout, CreditWindow, PayloadTooLarge
from services.runtime import write_debug_tap

__all__ = ["CHUNKS_DROPPED", "ChunkSource", "IngestStream", "PromptChange", "motion_controller", "to_pixels"]

log = logging.getLogger("rheo.ingest")

CHUNKS_PUBLISHED = Counter("rheo_ingest_chunks_published_total", "latent chunks published to the first DiT stage")
CHUNKS_REPLAYED = Counter("rheo_ingest_chunks_replayed_total", "latent chunks republished to rebuild lost KV")
ENCODE_SECONDS = Histogram("rheo_ingest_encode_seconds", "VAE encode + motion estimate time per chunk",
                           buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0))



def to_pixels(frames: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` → float32 ``[1, 3, T, H, W]`` in [-1, 1] (the same mapping as ``StreamPipeline``)."""
    t = torch.from_numpy(np.ascontiguousarray(frames))
    return (t.float() / 127.5 - 1.0).permute(3, 0, 1, 2)[None].to(device)


def motion_controller(spec: StreamSpec) -> MotionNoiseController:
    """The stream's noise controller, configured as ``StreamPipeline`` configures its own."""
    return MotionNoiseController(MotionNoiseConfig(enabled=spec.noise.motion_aware, s_init=spec.noise.noise_scale))


class ChunkSource(Protocol):
    """Where a stream's chunks come from (RTMP or the T2V clock)."""

    queue: ChunkQueue
    first: tuple[int, int]
    """(seq, segment) of the session's first chunk."""

    @property
    def segment(self) -> int: ...

    @property
    def segment_start(self) -> int: ...

    def cut(self) -> int: ...


@dataclass(frozen=True)
class PromptChange:
    """An accepted prompt change: ``version`` from chunk ``start`` on; a `blend` over ``chunks`` chunks from
    ``blend_from`` stamps chunk ``start + j − 1`` with alpha j/chunks (the ``chunks``-th is plain ``version``)."""

    start: int
    version: int
    blend_from: int | None = None
    chunks: int = 1

    def of(self, seq: int) -> tuple[int, int | None, float]:
        """(prompt version, blend_from, blend_alpha) of chunk ``seq`` (``seq >= start``)."""
        j = seq - self.start + 1
        if self.blend_from is None or j >= self.chunks:
            return self.version, None, 1.0
        return self.version, self.blend_from, j / self.chunks


@dataclass(eq=False)
class IngestStream:
    """Everything ingest keeps for one stream: one object, moved with ``to_bytes``/``from_bytes``.

    ``next_seq`` is the seq of the next chunk taken from the source's queue (what a `blend` prompt change
    answers; a `cut` answers the first chunk of the new segment), ``last_seq`` the last one published.
    ``segment``/``segment_start``: the warm-up segment being encoded and the seq of its prepare chunk (latent and
    RoPE positions count from it). ``versions``: the accepted prompt changes in order; a chunk takes the last one
    that has begun; ``steps_from``: (first seq, step count) likewise (a change of it begins at a new segment's
    prepare chunk: the DiT's stream state has one slot per step); ``seeds_from``: (first seq, seed) likewise (a
    new noise seed from the next chunk, same segment). ``replay`` holds the segment's prepare and sink
    chunks and the last ``ingest.replay_chunks`` published chunks, for rebuilding a lost DiT stage's KV cache.
    ``prepared``: the segment's prepare chunk was published; until it is, the segment's other chunks cannot run and
    are dropped (a new segment is cut). ``reserved_seq``/``reserved_segment``: the reservation last written into
    the stream record: no chunk at or above either is published before a larger one is (``ingest.status``).
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
    versions: list[PromptChange] = field(default_factory=list)
    steps_from: list[tuple[int, int]] = field(default_factory=list)
    seeds_from: list[tuple[int, int]] = field(default_factory=list)
    prompt_keys: list[str] = field(default_factory=list)
    published: int = 0
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    prepared: bool = False
    reserved_seq: int = 0
    reserved_segment: int = 0
    # runtime handles while the stream is live here (not part of the movable state)
    source: ChunkSource | None = field(default=None, repr=False)
    ring_id: str = DEFAULT_RING
    """The ring its chunks go into (its placement's: ingest/rings.py)."""
    window: CreditWindow | None = field(default=None, repr=False)
    subs: list[Subscription] = field(default_factory=list, repr=False)
    publishing: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    """Live chunks and a replay never interleave."""
    liveness: StreamLiveness | None = field(default=None, repr=False)
    """Published chunks against styled output (``ingest.liveness``); set while live here."""
    record: StreamRecord | None = field(default=None, repr=False)
    """The stream's record as last written here: written back if a lost NATS store took the table with it."""
    table_born: object | None = field(default=None, repr=False)
    """The stream table's incarnation when the record was last written (``KV.incarnation``)."""
    drop_log: DropLog = field(init=False, repr=False)
    """Every drop of this stream is logged through it (rate-limited)."""

    def __post_init__(self) -> None:
        self.drop_log = stream_drop_log(self.spec.stream_id)

    @classmethod
    def new(cls, spec: StreamSpec, prompt_version: int, replay_chunks: int, replay_head: int = 0,
            first: tuple[int, int] = (0, 0)) -> IngestStream:
        """``replay_chunks``: the ring's depth K; ``replay_head``: sink chunks kept after the prepare chunk;
        ``first``: (seq, segment) of the session's first chunk."""
        seq, segment = first
        return cls(spec=spec, vae=StreamVAEState(), motion=motion_controller(spec).new_state(),
                   prompt_version=prompt_version, replay=ReplayRing(replay_chunks, replay_head),
                   versions=[PromptChange(seq, prompt_version)], steps_from=[(seq, spec.steps)],
                   seeds_from=[(seq, spec.seed)], next_seq=seq,
                   segment=segment, segment_start=seq)

    def attach(self, source: ChunkSource) -> None:
        """Take ``source``'s chunks: the drops its queue made before (while the stream went live, already in the
        metric) become this stream's, later ones are counted and logged as they happen."""
        self.source = source
        earlier = source.queue.stats.dropped
        if earlier:
            self.dropped["queue_overflow"] += earlier
            self.drop_log.note("queue_overflow", "while the stream went live", earlier)
        source.queue.on_drop = lambda reason, raw: self.drop(reason, f"chunk {raw.seq}")

    def reserved(self, seq: int, segment: int) -> bool:
        """Chunk (``seq``, ``segment``) is below the reservation in the stream record: it may be published."""
        return seq < self.reserved_seq and segment < self.reserved_segment

    @property
    def stream_id(self) -> str:
        return self.spec.stream_id

    def version_of(self, seq: int) -> int:
        """The prompt version chunk ``seq`` is encoded under: the last accepted change that has begun by it."""
        return self.prompt_of(seq)[0]

    def prompt_of(self, seq: int) -> tuple[int, int | None, float]:
        """(prompt version, blend_from, blend_alpha) of chunk ``seq``. Changes before the last begun one can never
        apply again (seqs only grow), so they are dropped."""
        begun = [i for i, change in enumerate(self.versions) if change.start <= seq]
        if not begun:
            return self.prompt_version, None, 1.0
        del self.versions[: begun[-1]]
        return self.versions[0].of(seq)

    def steps_of(self, seq: int) -> int:
        """The denoising steps of chunk ``seq``: those of the last step change that has begun by it."""
        return _in_force(self.steps_from, seq, self.spec.steps)

    def seed_of(self, seq: int) -> int:
        """The noise seed of chunk ``seq``: that of the last seed change that has begun by it."""
        return _in_force(self.seeds_from, seq, self.spec.seed)

    def drop(self, reason: DropReason, detail: str = "", n: int = 1) -> None:
        """Count (metric, this stream) and log (rate-limited) ``n`` dropped chunks; every ingest drop comes here."""
        count_drop(reason, n)
        self.dropped[reason] += n
        self.drop_log.note(reason, detail, n)

    # -- live changes -------------------------------------------------------------------------------------------

    def accept_prompt(self, version: int, prompt: str, mode: str, blend_chunks: int) -> int:
        """Apply an accepted prompt change; returns the seq of the first chunk it applies to.

        `cut`: the chunks already cut finish the old segment; the next one warms up anew. `blend` over N > 1
        chunks: the next N − 1 chunks carry (``version``, the version in force, j/N), the stages lerp the two
        embeddings; a blend that would begin at a segment's prepare chunk just replaces the prompt (as
        ``StreamPipeline.set_prompt`` does before a stream's first chunk)."""
        effective = self.next_seq
        if mode == "cut" and self.source is not None:
            effective = max(effective, self.source.cut())
        starts_segment = effective == (self.source or self).segment_start
        blend = mode == "blend" and blend_chunks > 1 and not starts_segment
        self.versions.append(PromptChange(effective, version, self.prompt_version if blend else None,
                                          blend_chunks if blend else 1))
        self.prompt_version = version
        self.spec = self.spec.model_copy(update={"prompt": prompt})
        return effective

    def accept_spec(self, new: StreamSpec) -> int:
        """Apply live parameters; returns the seq of the first chunk they apply to. The noise scale and the seed
        apply from the next chunk encoded; a new step count starts a new warm-up segment (as a `cut`)."""
        effective = self.next_seq
        if new.steps != self.spec.steps:  # the spec holds the count last accepted (chunks may not have it yet)
            if self.source is not None:
                effective = max(effective, self.source.cut())
            self.steps_from.append((effective, new.steps))
        if new.seed != self.spec.seed:
            self.seeds_from.append((effective, new.seed))
        self.spec = new
        return effective

    # -- chunks -------------------------------------------------------------------------------------------------

    def begin(self, raw: RawChunk) -> bool:
        """Take chunk ``raw`` from the queue: a segment's prepare chunk resets the caches; a chunk of a segment whose
        prepare chunk was not published (dropped anywhere: queue, deadline, encode, bus) cannot run, so it is
        dropped and a new segment is cut: its prepare chunk brings the stream back."""
        self.next_seq = raw.seq + 1
        if raw.prepares:
            self.segment, self.segment_start, self.prepared = raw.segment, raw.seq, False
            self.vae = StreamVAEState()
            self.motion = motion_controller(self.spec).new_state()
            return True
        if raw.segment == self.segment and self.prepared:
            return True
        if self.source is not None and self.source.segment == raw.segment:
            self.source.cut()
        self.drop("segment_unprepared", f"chunk {raw.seq}: segment {raw.segment} lost its prepare chunk; "
                                        f"a new segment is cut")
        return False

    def encode(self, vae: StreamVAE, raw: RawChunk, spec: StreamSpec,
               tap_dir: str | Path | None = None) -> tuple[torch.Tensor, float]:
        """Model thread: the chunk's latent ``[F, C, h, w]`` and noise scale (``encode_chunks`` of this one job)."""
        result = encode_chunks(vae, [EncodeJob(self, raw, spec, tap_dir)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def encode_input(self, vae: StreamVAE, raw: RawChunk, spec: StreamSpec,
                     tap_dir: str | Path | None = None) -> tuple[torch.Tensor, float, bool]:
        """Model thread, before the VAE: (pixels ``[1, 3, T, H, W]``, noise scale, True) for V2V, after the motion
        estimate, exactly as ``StreamPipeline._next_chunk``; T2V: (zero latent ``[F, C, h, w]``, 1, False), pure
        noise, nothing to encode. ``spec`` is the one in force when the chunk was taken (``begin``): a live change
        answered meanwhile reports the next chunk as its effective seq, so it must not reach this one."""
        if spec.t2v:
            frames = spec.clock().latent_frames(raw.seq - self.segment_start)
            f = vae.spatial_factor
            return torch.zeros(frames, vae.z_dim, spec.height // f, spec.width // f), 1.0, False
        expected = (len(raw.frame_times), spec.height, spec.width, 3)
        if tuple(raw.frames.shape) != expected or raw.frames.dtype != np.uint8:
            raise ValueError(f"chunk frames are {raw.frames.dtype}{tuple(raw.frames.shape)}, expected uint8{expected}")
        if tap_dir is not None:
            write_debug_tap(Path(tap_dir) / self.stream_id / f"chunk_{raw.seq:06d}.npy", raw.frames)
        px = to_pixels(raw.frames, vae.device)
        level = motion_controller(spec).update(self.motion, px)
        return px.to(vae.dtype), level.scale, True

    def chunk(self, raw: RawChunk, latent: torch.Tensor, scale: float, deadline: float, epoch: int,
              clock: ChunkClock, trace: str | None = None) -> LatentChunk:
        """The ``LatentChunk`` of ``raw``: clocked in its segment, under its prompt (mid-blend: with the blend's
        source and weight) and step count. T2V chunks run the step list itself (no input to keep)."""
        c = raw.seq - self.segment_start
        version, blend_from, alpha = self.prompt_of(raw.seq)
        steps = self.steps_of(raw.seq)
        timesteps = chunk_timesteps(steps, None if self.spec.t2v else scale)
        return LatentChunk(stream_id=self.stream_id, seed=self.seed_of(raw.seq), fps=self.spec.fps, seq=raw.seq,
                           epoch=epoch,
                           latent_start=clock.latent_start(c), rope_start=clock.rope_start(c),
                           capture_time=raw.frame_times[0], deadline=deadline,
                           prompt_version=version, blend_from=blend_from, blend_alpha=alpha, noise_scale=scale,
                           timesteps=timesteps, segment=self.segment, latent=latent, trace=trace)

    async def publish(self, chunk: LatentChunk) -> None:
        """Through the credit window, or dropped (counted) once it cannot make its deadline."""
        assert self.window is not None
        remaining = chunk.deadline - time.time()
        if remaining <= 0:
            self.drop("deadline", f"chunk {chunk.seq}: {-remaining * 1000:.0f} ms past its deadline before publishing")
            return
        try:
            with telemetry.in_chunk_trace(chunk.trace):  # the bus's spans and headers continue the chunk's trace
                await self.window.publish(chunk, timeout=remaining)
        except CreditTimeout:
            self.drop("deadline", f"chunk {chunk.seq}: no credit from the first DiT stage before its deadline")
            return
        except (PayloadTooLarge, nats.errors.Error) as e:
            self.drop("publish_error", f"chunk {chunk.seq}: {e}")
            return
        if chunk.segment == self.segment and chunk.seq == self.segment_start:
            self.prepared = True
        self.last_seq = chunk.seq
        self.published += 1
        if self.liveness is not None:
            self.liveness.published(time.monotonic())
        self.replay.add(chunk)
        CHUNKS_PUBLISHED.inc()

    async def replay_under(self, epoch: int, current: Callable[[], int | None],
                           ready: Awaitable[None] | None = None) -> None:
        """Republish the replay ring under failure epoch ``epoch``, before any further live chunk; stops when
        ``current()`` (the latest failure epoch, or None once the stream ended) is no longer ``epoch``. ``ready``:
        the epoch is acknowledged by its stages (live chunks wait behind the replay meanwhile)."""
        assert self.window is not None
        async with self.publishing:
            if ready is not None:
                await asyncio.shield(ready)
            chunks = list(self.replay)
            sent = 0
            for chunk in chunks:
                if current() != epoch:
                    break  # a newer failure epoch replays again; an ended stream needs nothing
                budget = self.spec.slo.max_latency_ms / 1000.0
                again = chunk.model_copy(update={"replay": True, "epoch": epoch, "deadline": time.time() + budget})
                try:
                    await self.window.publish(again, timeout=budget)
                except (CreditTimeout, PayloadTooLarge, nats.errors.Error) as e:
                    self.drop("replay_error", f"chunk {chunk.seq} under epoch {epoch}: {e}")
                    continue
                sent += 1
                CHUNKS_REPLAYED.inc()
            log.info("stream %s: replayed %d of %d chunks (seq %s) under failure epoch %d", self.stream_id, sent,
                     len(chunks), [c.seq for c in chunks], epoch)

    # -- one format ---------------------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The state as one ``torch.save`` blob (messages as their wire frames; loads with ``weights_only``)."""
        data = {
            "spec": _frame_tensor(self.spec.encode()),
            "vae": _cpu_tree(self.vae.to_dict()),
            "motion": _cpu_tree(self.motion.to_dict()),
            "prompt_version": self.prompt_version,
            "next_seq": self.next_seq,
            "last_seq": self.last_seq,
            "replay_head": [_frame_tensor(c.encode()) for c in self.replay.head],
            "replay": [_frame_tensor(c.encode()) for c in self.replay.tail],
            "replay_chunks": self.replay.depth,
            "replay_head_chunks": self.replay.head_chunks,
            "segment": self.segment,
            "segment_start": self.segment_start,
            "versions": [[v.start, v.version, -1 if v.blend_from is None else v.blend_from, v.chunks]
                         for v in self.versions],
            "steps_from": [list(v) for v in self.steps_from],
            "seeds_from": [list(v) for v in self.seeds_from],
            "prompt_keys": list(self.prompt_keys),
            "published": self.published,
            "dropped": dict(self.dropped),
            "prepared": self.prepared,
            "reserved": [self.reserved_seq, self.reserved_segment],
        }
        buf = io.BytesIO()
        torch.save(data, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> IngestStream:
        d = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        replay = ReplayRing(int(d["replay_chunks"]), int(d["replay_head_chunks"]))
        replay.head = [decode(t.numpy().tobytes(), LatentChunk) for t in d["replay_head"]]
        replay.tail.extend(decode(t.numpy().tobytes(), LatentChunk) for t in d["replay"])
        replay.segment = next((c.segment for c in reversed([*replay])), None)
        versions = [PromptChange(int(v[0]), int(v[1]), None if len(v) < 4 or v[2] < 0 else int(v[2]),
                                 int(v[3]) if len(v) >= 4 else 1) for v in d.get("versions", [])]
        return cls(spec=decode(d["spec"].numpy().tobytes(), StreamSpec), vae=StreamVAEState.from_dict(d["vae"]),
                   motion=MotionNoiseState.from_dict(d["motion"]), prompt_version=int(d["prompt_version"]),
                   next_seq=int(d["next_seq"]), last_seq=d["last_seq"], replay=replay,
                   segment=int(d.get("segment", 0)), segment_start=int(d.get("segment_start", 0)),
                   versions=versions, steps_from=[(int(a), int(b)) for a, b in d.get("steps_from", [])],
                   seeds_from=[(int(a), int(b)) for a, b in d.get("seeds_from", [])],
                   prompt_keys=list(d["prompt_keys"]), published=int(d["published"]),
                   dropped=collections.Counter(d["dropped"]), prepared=bool(d.get("prepared", True)),
                   reserved_seq=int(d.get("reserved", [0, 0])[0]), reserved_segment=int(d.get("reserved", [0, 0])[1]))


def _in_force(changes: list[tuple[int, int]], seq: int, default: int) -> int:
    """The value of the last (first seq, value) change that has begun by ``seq`` (``default`` before any). Changes
    before it can never apply again (seqs only grow), so they are dropped."""
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


@dataclass
class EncodeJob:
    """One chunk for the model thread: the stream, the raw chunk and the spec it is encoded under."""

    stream: IngestStream
    raw: RawChunk
    spec: StreamSpec
    tap_dir: str | Path | None = None


def encode_chunks(vae: StreamVAE, jobs: list[EncodeJob]) -> list[tuple[torch.Tensor, float] | Exception]:
    """Model thread: every job's latent ``[F, C, h, w]`` and noise scale, or its own exception. The V2V chunks'
    VAE encode is one ``StreamVAE.encode_batch`` call (each stream's cache exact; encoder/vae_batch.py)."""
    started = time.perf_counter()
    results: list[tuple[torch.Tensor, float] | Exception | None] = [None] * len(jobs)
    pending: list[tuple[int, torch.Tensor, float]] = []
    for i, job in enumerate(jobs):
        try:
            x, scale, needs_vae = job.stream.encode_input(vae, job.raw, job.spec, job.tap_dir)
        except Exception as e:
            results[i] = e
            continue
        if needs_vae:
            pending.append((i, x, scale))
        else:
            results[i] = (x, scale)
    if pending:
        latents = vae.encode_batch([jobs[i].stream.vae for i, _, _ in pending], [x for _, x, _ in pending])
        share = (time.perf_counter() - started) / len(pending)  # each chunk's share of the batch
        for (i, _, scale), z in zip(pending, latents, strict=True):
            if isinstance(z, Exception):
                results[i] = z
                continue
            results[i] = z.float()[0].transpose(0, 1).contiguous().cpu(), scale  # [1, C, F, h, w] → [F, C, h, w]
            ENCODE_SECONDS.observe(share)
    return [r if r is not None else RuntimeError("not encoded") for r in results]
