"""The single-process StreamPipeline: frames in → Stream-VAE encode → stream-batched causal DiT → decode → frames.

The offline mode (``rheo run``) and the reference output of the services. It runs the one engine: the DiT is the
stream-batch ring of ``StageWorker``s (one per block range; one by default) that the stage service runs, driven
in-process by ``dit_stage.ring.LocalRing``; chunks are the same ``LatentChunk`` messages ingest publishes. Chunk
arithmetic comes from ``proto.clock.ChunkClock``, the VAE/prompt/motion code from ``encoder/``. Every random draw is
``draw_noise`` keyed by (stream seed, chunk, step, purpose), so the same seed gives the same frames, alone or
batched with other streams, in one process or across stage services. See docs/pipeline.md.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch

from dit_stage.forward import ForwardMode, make_forward
from dit_stage.model import CausalWanDiT
from dit_stage.ring import LocalRing
from dit_stage.state import StreamDiTState
from dit_stage.worker import StageWorker
from encoder.motion import MotionNoiseConfig, MotionNoiseController
from encoder.vae import StreamVAE
from pipeline.state import PromptBlend, StreamSpec, StreamState
from proto import LatentChunk
from proto.clock import ChunkClock
from proto.spec import SIZE_MULTIPLE, RingConfig, chunk_timesteps

__all__ = ["FixedEmbedding", "PipelineConfig", "PipelineError", "PromptMode", "StreamPipeline", "TextEncoder"]

PromptMode = Literal["cut", "blend"]
Frames = np.ndarray | torch.Tensor
MAX_BATCH_ITEMS = 1 << 16
"""Items of one forward: unbounded in practice (every ready stream's slots in one forward, as grids allow)."""
OFFLINE_DEADLINE_S = 365 * 24 * 3600.0
"""Offline chunks have no real-time deadline; the ring's deadline checks never fire for them."""


class PipelineError(ValueError):
    """A call the pipeline cannot honour (unknown stream, wrong frame shape, pushing to an ended stream)."""


class TextEncoder(Protocol):
    """What the pipeline needs from a prompt encoder: ``encode(prompt) -> [1, L, text_dim]``."""

    def encode(self, prompt: str) -> torch.Tensor: ...


class FixedEmbedding:
    """A text encoder stand-in: one fixed random embedding for every prompt (benchmarks without umT5 weights)."""

    def __init__(self, text_len: int, text_dim: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.embedding = torch.randn(1, text_len, text_dim, generator=g)

    def encode(self, prompt: str) -> torch.Tensor:
        return self.embedding.clone()


@dataclass(frozen=True)
class PipelineConfig:
    """Pipeline-wide settings (every stream of one pipeline shares the model size and the slot count)."""

    width: int = 512
    height: int = 512
    steps: int = 2
    noise_scale: float = 0.8
    """s_init: the input noise mix of a still input (and of every chunk when motion-aware noise is off)."""
    motion_aware_noise: bool = True
    blend_chunks: int = 4
    """Chunks a `blend` prompt change interpolates over (the default of ``set_prompt``)."""
    t2v_latent_frames: int = 1
    ring: RingConfig = field(default_factory=RingConfig)
    """KV window, sinks, RoPE refresh and cache mode: the stage services get theirs from ``dit_stage.*``."""
    output: Literal["uint8", "float"] = "uint8"
    """Returned frames: uint8 [T, H, W, 3], or float32 [T, H, W, 3] in [0, 1]."""

    def __post_init__(self) -> None:
        if self.width % SIZE_MULTIPLE or self.height % SIZE_MULTIPLE or self.width <= 0 or self.height <= 0:
            raise ValueError(f"size {self.width}x{self.height} must be positive multiples of {SIZE_MULTIPLE}")
        if self.blend_chunks < 1:
            raise ValueError("blend_chunks must be >= 1")
        chunk_timesteps(self.steps, self.noise_scale)  # raises for a step count out of range

    def clock(self, t2v: bool) -> ChunkClock:
        return self.ring.clock(self.t2v_latent_frames if t2v else None)

    def timesteps(self, noise_scale: float | None, steps: int | None = None) -> list[int]:
        """A chunk's timesteps, step 0 first: V2V starts at ``first_timestep(s)``; T2V (None) at the list's head."""
        return chunk_timesteps(self.steps if steps is None else steps, noise_scale)


class StreamPipeline:
    """Many streams, one process: ``open_stream`` → ``push``/``feed`` + ``step_all`` → ``finish`` → ``close_stream``.

    ``push(stream, frames)`` runs that stream alone and returns the frames ready so far (empty during the
    stream-batch warm-up). ``feed`` only buffers; ``step_all`` then runs one round: every stream with a whole
    chunk buffered hands its chunk to the ring, which runs them (with the chunks of earlier rounds still in the
    slots) in as few forwards as their grids allow. Both paths give the same frames (fp tolerance).

    ``dit`` is one model holding every block, or stage models over contiguous block ranges (one ``StageWorker``
    each, as the stage services split it); ``forward`` the mode of their ``Forward`` (dit_stage/forward.py: graph +
    compile on CUDA with ``auto``, eager elsewhere). The ring runs in lockstep: one forward per chunk entering, so
    a chunk comes back B − 1 rounds after it entered.
    """

    def __init__(
        self,
        dit: CausalWanDiT | Sequence[CausalWanDiT],
        vae: StreamVAE,
        text_encoder: TextEncoder,
        config: PipelineConfig | None = None,
        *,
        forward: ForwardMode = "auto",
        description: str = "",
    ) -> None:
        stages = [dit] if isinstance(dit, CausalWanDiT) else list(dit)
        config = config or PipelineConfig()
        self.config = config
        ring = config.ring
        self.ring = LocalRing([
            StageWorker(stage, window=ring.kv_window, sink=ring.sink, adaptive_threshold=ring.adaptive_threshold,
                        max_batch_items=MAX_BATCH_ITEMS, lockstep=True, finished_on_host=False,
                        cache_mode=ring.cache_mode,
                        context_noise=ring.context_noise, forward=make_forward(stage, forward))
            for stage in stages
        ])
        dit_cfg = stages[0].config
        if vae.z_dim != dit_cfg.in_dim:
            raise ValueError(f"VAE latent channels {vae.z_dim} != DiT in_dim {dit_cfg.in_dim}")
        f = vae.spatial_factor
        if config.height % (f * dit_cfg.patch_size[1]) or config.width % (f * dit_cfg.patch_size[2]):
            raise ValueError(f"size {config.width}x{config.height} is not a multiple of {f}×patch")
        self.vae = vae
        self.text_encoder = text_encoder
        self.latent_hw = (config.height // f, config.width // f)
        self.description = description
        self.streams: dict[str, StreamState] = {}

    @property
    def device(self) -> torch.device:
        return self.ring.first.model.device

    # ------------------------------------------------------------------ streams
    def open_stream(self, spec: StreamSpec) -> str:
        stream_id = spec.stream_id or uuid.uuid4().hex[:12]
        if stream_id in self.streams:
            raise PipelineError(f"stream {stream_id!r} is already open")
        context = self._embed(spec.prompt)
        self.ring.add_prompt(stream_id, 0, context)
        self.streams[stream_id] = StreamState(
            stream_id=stream_id,
            seed=spec.seed,
            t2v=spec.t2v,
            fps=spec.fps,
            clock=self.config.clock(spec.t2v),
            vae=self.vae.new_state(),
            motion=self._motion(self.config.noise_scale).new_state(),
            steps=self.config.steps,
            noise_scale=self.config.noise_scale,
            prompt=spec.prompt,
            prompt_version=0,
            context=context,
        )
        return stream_id

    def close_stream(self, stream_id: str) -> None:
        self._stream(stream_id)
        del self.streams[stream_id]
        self.ring.end_stream(stream_id)

    def stream_state(self, stream_id: str) -> StreamState:
        return self._stream(stream_id)

    def dit_states(self, stream_id: str) -> list[StreamDiTState]:
        """The stream's KV-cache state at each stage (empty before its first chunk entered the ring)."""
        self._stream(stream_id)
        return [w.streams[stream_id].shard_state for w in self.ring.workers if stream_id in w.streams]

    def save_stream(self, stream_id: str) -> bytes:
        """The stream's whole state — this object's and every stage's — as bytes (restore with
        ``restore_stream``, here or in another pipeline with the same model split)."""
        st = self._stream(stream_id)
        blob = {"stream": st.to_dict(), "dit": [w.export_stream(stream_id) if stream_id in w.streams else None
                                                for w in self.ring.workers]}
        buf = io.BytesIO()
        torch.save(blob, buf)
        return buf.getvalue()

    def restore_stream(self, data: bytes) -> str:
        blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        state = StreamState.from_dict(blob["stream"], self.device)
        if state.stream_id in self.streams:
            raise PipelineError(f"stream {state.stream_id!r} is already open")
        parts = blob["dit"]
        if len(parts) != len(self.ring.workers):
            raise PipelineError(f"the stream was saved from {len(parts)} stages, this pipeline has "
                                f"{len(self.ring.workers)}")
        if any(p is not None and tuple(p["latent_hw"]) != self.latent_hw for p in parts):
            raise PipelineError("the stream's latent size does not match this pipeline")
        try:
            for worker, part in zip(self.ring.workers, parts, strict=True):
                if part is not None:
                    worker.import_stream(part)
            if parts[0] is None:  # saved before its first chunk: only the prompt was in the ring
                self.ring.add_prompt(state.stream_id, state.prompt_version, state.context)
        except ValueError as e:
            self.ring.end_stream(state.stream_id)
            raise PipelineError(str(e)) from e
        self.streams[state.stream_id] = state
        return state.stream_id

    # ------------------------------------------------------------------ prompts
    def set_prompt(self, stream_id: str, prompt: str, mode: PromptMode = "blend", chunks: int | None = None) -> None:
        """Change a stream's prompt without a restart.

        Either way a chunk keeps the prompt embedding it entered the DiT with for all its steps (chunks already in
        the slots finish under the old prompt): every chunk carries its prompt version through the ring.

        ``cut``: the chunks in the slots finish, then every cache (KV, VAE, motion) is reset and the next
        buffered frames start a new warm-up segment (a 5-frame prepare chunk) with a fresh segment seed.
        ``blend``: the KV cache is kept; the embedding moves linearly from the current one to the new one over
        ``chunks`` chunks (default ``config.blend_chunks``), one step (one prompt version) per chunk entering.
        """
        st = self._stream(stream_id)
        if mode not in ("cut", "blend"):
            raise PipelineError(f"unknown prompt mode {mode!r}; use 'cut' or 'blend'")
        target = self._embed(prompt)
        st.prompt = prompt
        started = st.next_chunk > 0
        if mode == "blend" and started:
            total = chunks if chunks is not None else self.config.blend_chunks
            if total < 1:
                raise PipelineError("a blend needs at least one chunk")
            if st.blend is not None:  # a blend mid-way: the next one starts from where it got to
                self._use_prompt(st, st.context)
            source_version, source = st.prompt_version, st.context
            self._use_prompt(st, target)
            st.context = source  # until the next chunk enters
            st.blend = PromptBlend(source, target, total, source_version=source_version)
            return
        st.blend = None
        if mode == "cut" and started:
            self._new_segment(st)
        self._use_prompt(st, target)

    def set_params(self, stream_id: str, *, steps: int | None = None, noise_scale: float | None = None,
                   seed: int | None = None) -> None:
        """Change a stream's live parameters, as a ``PATCH`` does in the services: the noise scale (the motion
        controller's s_init) and the seed (every noise draw of the chunks entering from now on; the chunks carry
        it, the ring's stream state follows) apply from the next chunk; a new step count finishes the chunks in
        the slots and starts a new warm-up segment (the ring has one KV slot per step)."""
        st = self._stream(stream_id)
        if seed is not None and not 0 <= seed < 2**63:
            raise PipelineError(f"seed must be in [0, 2**63), got {seed}")
        if steps is not None:
            try:
                chunk_timesteps(steps, st.noise_scale)
            except ValueError as e:
                raise PipelineError(str(e)) from e
        if noise_scale is not None:
            if not 0 < noise_scale <= 1:
                raise PipelineError(f"noise_scale must be in (0, 1], got {noise_scale}")
            st.noise_scale = noise_scale
        if seed is not None:
            st.seed = seed
        if steps is not None and steps != st.steps:
            if st.next_chunk > 0:
                self._new_segment(st)
            st.steps = steps

    def _new_segment(self, st: StreamState) -> None:
        """Finish the chunks in the slots, then start over: the next chunk is a new segment's prepare chunk, with a
        fresh VAE cache, motion EMA and segment seed (KV: the ring starts the segment's state from it)."""
        self._drain(st)
        st.segment += 1
        st.segment_start = st.seq
        st.vae.reset()
        st.motion = self._motion(st.noise_scale).new_state()

    def _motion(self, noise_scale: float) -> MotionNoiseController:
        """The motion-aware noise controller of a stream at ``noise_scale`` (configured as ingest configures it)."""
        return MotionNoiseController(MotionNoiseConfig(enabled=self.config.motion_aware_noise, s_init=noise_scale))

    def _use_prompt(self, st: StreamState, context: torch.Tensor) -> None:
        """Chunks entering from now on run under ``context`` (a new prompt version)."""
        st.prompt_version += 1
        st.context = context
        self.ring.add_prompt(st.stream_id, st.prompt_version, context)

    # ------------------------------------------------------------------ frames
    def feed(self, stream_id: str, frames: Frames) -> None:
        """Buffer input frames (uint8 [T, H, W, 3], or float in [0, 1]) without running anything."""
        st = self._stream(stream_id)
        if st.ended:
            raise PipelineError(f"stream {stream_id!r} has ended")
        if st.t2v:
            raise PipelineError(f"stream {stream_id!r} is a T2V stream; it takes no input frames")
        px = self._to_pixels(frames)
        st.frames_in += px.shape[2]
        st.pending = px if st.pending is None else torch.cat([st.pending, px], dim=2)

    def push(self, stream_id: str, frames: Frames) -> np.ndarray:
        """Feed frames and run this stream alone; returns its output frames available so far."""
        self.feed(stream_id, frames)
        st = self._stream(stream_id)
        while self._ready(st):
            self._round([st])
        return self._take(st)

    def generate(self, stream_id: str, num_frames: int) -> np.ndarray:
        """T2V: ask for ``num_frames`` more frames and run this stream alone until they are all out."""
        st = self._stream(stream_id)
        self.request(stream_id, num_frames)
        while self._ready(st):
            self._round([st])
        return self._take(st)

    def request(self, stream_id: str, num_frames: int) -> None:
        """T2V: ask for ``num_frames`` more frames (produced by ``generate`` or ``step_all`` rounds)."""
        st = self._stream(stream_id)
        if not st.t2v:
            raise PipelineError(f"stream {stream_id!r} is a video-to-video stream; push frames instead")
        if num_frames < 0:
            raise PipelineError("num_frames must be >= 0")
        st.t2v_target += num_frames

    def ready(self) -> list[str]:
        """Streams with a whole chunk to run (V2V: enough frames buffered; T2V: frames still wanted)."""
        return [sid for sid, st in self.streams.items() if self._ready(st)]

    def step_all(self) -> dict[str, np.ndarray]:
        """One round over every ready stream (their chunks batched into as few DiT forwards as their grids allow);
        returns the frames each stream has ready now (streams without new frames are left out)."""
        ready = [self.streams[sid] for sid in self.ready()]
        if ready:
            self._round(ready)
        out = {}
        for st in self.streams.values():
            if st.outbox:
                out[st.stream_id] = self._take(st)
        return out

    def finish(self, stream_id: str) -> np.ndarray:
        """End of input: run the buffered tail (padded with its last frame to a whole chunk), let every chunk in
        the slots finish, and return the remaining frames — exactly as many frames out as went in (T2V: as
        were requested)."""
        st = self._stream(stream_id)
        if not st.ended:
            while self._ready(st):
                self._round([st])
            n = 0 if st.pending is None else st.pending.shape[2]
            if n and not st.t2v:
                pad = st.clock.input_frames(st.next_chunk) - n
                st.pending = torch.cat([st.pending, st.pending[:, :, -1:].expand(-1, -1, pad, -1, -1)], dim=2)
                self._round([st])
            self._drain(st)
            st.ended = True
        return self._take(st)

    # ------------------------------------------------------------------ internals
    def _stream(self, stream_id: str) -> StreamState:
        try:
            return self.streams[stream_id]
        except KeyError:
            raise PipelineError(f"unknown stream {stream_id!r}") from None

    def _embed(self, prompt: str) -> torch.Tensor:
        """The prompt's embedding [L, text_dim] on the pipeline's device."""
        dit_cfg = self.ring.first.model.config
        ctx = self.text_encoder.encode(prompt)
        if ctx.dim() == 2:
            ctx = ctx[None]
        if ctx.dim() != 3 or ctx.shape[0] != 1 or ctx.shape[-1] != dit_cfg.text_dim or ctx.shape[1] > dit_cfg.text_len:
            raise PipelineError(
                f"prompt embedding {tuple(ctx.shape)} does not fit the DiT ([1, <= {dit_cfg.text_len}, "
                f"{dit_cfg.text_dim}])"
            )
        return ctx[0].to(device=self.device, dtype=torch.float32)

    def _to_pixels(self, frames: Frames) -> torch.Tensor:
        """[T, H, W, 3] uint8 or float [0, 1] → [1, 3, T, H, W] float32 in [-1, 1] on the pipeline's device."""
        t = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
        h, w = self.config.height, self.config.width
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or tuple(t.shape[1:]) != (h, w, 3):
            raise PipelineError(f"frames must be [T, {h}, {w}, 3], got {tuple(t.shape)}")
        x = t.float() / 127.5 - 1.0 if t.dtype == torch.uint8 else t.float() * 2.0 - 1.0
        return x.permute(3, 0, 1, 2)[None].to(self.device)

    def _ready(self, st: StreamState) -> bool:
        if st.ended:
            return False
        if st.t2v:  # T2V chunks need no input: keep entering chunks until enough frames are out
            return st.frames_out < st.t2v_target
        n = 0 if st.pending is None else st.pending.shape[2]
        return n >= st.clock.input_frames(st.next_chunk)

    def _advance_prompt(self, st: StreamState) -> tuple[int | None, float]:
        """A blend moves one step per chunk entering the DiT: the chunk's (blend_from, blend_alpha)."""
        if st.blend is None:
            return None, 1.0
        st.context, alpha = st.blend.advance()
        source = st.blend.source_version
        if alpha == 1.0:
            st.blend = None
            return None, 1.0
        return source, alpha

    def _next_chunk(self, st: StreamState, blend_from: int | None, blend_alpha: float) -> LatentChunk:
        """The stream's next chunk as the ring takes it: ingest's message (V2V: the encoded frames and the motion-
        adapted noise scale; T2V: no input, pure noise at the step list's first timestep)."""
        c = st.next_chunk
        clock = st.clock
        frames = clock.latent_frames(c)
        if st.t2v:
            z = torch.zeros(frames, self.ring.first.model.config.in_dim, *self.latent_hw)
            scale, timesteps = 1.0, self.config.timesteps(None, st.steps)
        else:
            need = clock.input_frames(c)
            assert st.pending is not None
            px, rest = st.pending[:, :, :need], st.pending[:, :, need:]
            st.pending = rest if rest.shape[2] else None
            level = self._motion(st.noise_scale).update(st.motion, px)
            z = self.vae.encode(st.vae, px.to(self.vae.dtype)).float()[0].permute(1, 0, 2, 3)
            scale, timesteps = level.scale, self.config.timesteps(level.scale, st.steps)
        now = time.time()
        return LatentChunk(
            stream_id=st.stream_id, seed=st.seed, fps=st.fps, seq=st.seq, epoch=0, latent_start=clock.latent_start(c),
            rope_start=clock.rope_start(c), capture_time=now, deadline=now + OFFLINE_DEADLINE_S,
            prompt_version=st.prompt_version, blend_from=blend_from, blend_alpha=blend_alpha, noise_scale=scale,
            timesteps=timesteps, segment=st.segment, latent=z.contiguous(),
        )

    def _round(self, streams: Sequence[StreamState]) -> None:
        """One chunk per stream into the ring, then the ring runs until idle (lockstep: one wave per chunk)."""
        for st in streams:
            chunk = self._next_chunk(st, *self._advance_prompt(st))
            try:
                self.ring.add_chunk(chunk)
            except ValueError as e:
                raise PipelineError(str(e)) from e
            st.seq += 1
            st.chunks += 1
        self._collect(self.ring.run())

    def _drain(self, st: StreamState) -> None:
        """Let the stream's chunks in the slots finish (no new chunk follows them)."""
        self.ring.first.drain(st.stream_id)
        self._collect(self.ring.run())

    def _collect(self, finished: list[LatentChunk]) -> None:
        for chunk in finished:
            st = self.streams.get(chunk.stream_id)
            if st is None:
                continue  # a stream closed while its chunks were in the ring
            st.out_seq = chunk.seq + 1
            x0 = chunk.latent.permute(1, 0, 2, 3)[None].to(self.device)  # no copy: it stays on the device
            frames = self.vae.decode(st.vae, x0.to(self.vae.dtype))
            st.frames_out += frames.shape[2]
            st.outbox.append(frames)

    def _take(self, st: StreamState) -> np.ndarray:
        """Hand out decoded frames, never more than went in (V2V; the tail padding is cut) or were asked for
        (T2V; the rest waits for the next request)."""
        target = st.t2v_target if st.t2v else st.frames_in
        x = torch.cat(st.outbox, dim=2) if st.outbox else None
        n = min(0 if x is None else x.shape[2], max(0, target - st.delivered))
        st.outbox = [x[:, :, n:]] if x is not None and x.shape[2] > n and not st.ended else []
        st.delivered += n
        h, w = self.config.height, self.config.width
        if n == 0:
            dtype = np.uint8 if self.config.output == "uint8" else np.float32
            return np.zeros((0, h, w, 3), dtype=dtype)
        assert x is not None
        frames = x[0, :, :n].permute(1, 2, 3, 0).float()
        if self.config.output == "float":
            return ((frames + 1.0) / 2.0).clamp(0, 1).cpu().numpy()
        return ((frames + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
