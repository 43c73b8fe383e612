"""Stream-batch: one forward over B slots, slot k at denoising step k — and the single-process runner.

Slot layout (per stream, B = number of denoising steps): slot k always runs step k at timestep t_k, on the
chunk that entered k forwards ago, with its own KV cache slot. After a forward, slot k's x0 is re-noised to
t_{k+1} with fresh noise and moves to slot k+1; slot B−1's x0 is a finished chunk. One forward per new
chunk yields one finished chunk, B−1 chunks later. Several streams go side by side in the same forward,
each with its own shard, clock and slot contents.

Cache modes:
* ``sdv2``: a slot's cache holds the K/V its own denoising forwards wrote (at that slot's noise level);
* ``self_forcing``: after a chunk is finished, one extra *clean pass* at ``context_noise`` rewrites that
  chunk's K/V in every slot that still holds it. With B = 1 this is exactly Self-Forcing / CausVid.

``StreamBatchRunner`` drives a list of stages (one ``CausalWanDiT`` with all blocks, or several block
ranges) in one process, in lockstep: one forward per new chunk over every slot. It is a **frozen test oracle**, not
part of rheo: the one engine is the stage ring (``dit_stage/worker.py``, driven in-process by
``dit_stage/ring.py``), and the tests prove it equal to this independent, slot-array formulation of the same
algorithm. Eager only. All random draws come from ``draw_noise`` keyed by (stream seed, chunk, step, purpose).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from dit_stage.model import CausalWanDiT
from dit_stage.state import SlotItem, StreamDiTState
from proto.clock import ChunkClock
from wan.scheduler import SDV2_STEPS, FlowMatchScheduler, draw_noise, first_timestep

__all__ = ["StreamBatchConfig", "StreamBatchRunner", "StreamSlots"]


@dataclass(frozen=True)
class StreamBatchConfig:
    """DiT-side stream settings; defaults are SDv2's v2v ones."""

    steps: int = 2
    step_list: tuple[int, ...] = SDV2_STEPS
    noise_scale: float = 0.8
    kv_window: int = 6
    sink: int = 3
    adaptive_threshold: float | None = 0.2
    t_refresh: int | None = 50
    cache_mode: Literal["sdv2", "self_forcing"] = "sdv2"
    context_noise: float = 0.0
    shift: float = 8.0

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= len(self.step_list):
            raise ValueError(f"steps must be in 1..{len(self.step_list)}")
        if self.cache_mode not in ("sdv2", "self_forcing"):
            raise ValueError(f"unknown cache mode {self.cache_mode!r}")

    @property
    def timesteps(self) -> tuple[int, ...]:
        return tuple(self.step_list[: self.steps])

    def first_timestep(self, noise_scale: float) -> int:
        """Slot 0's timestep for an input mixed at ``noise_scale`` (``scheduler.first_timestep``)."""
        return first_timestep(noise_scale)

    def clock(self, t2v_frames: int | None = None) -> ChunkClock:
        if t2v_frames is not None:
            return ChunkClock.t2v(t2v_frames, kv_window=self.kv_window, t_refresh=self.t_refresh)
        return ChunkClock.v2v(kv_window=self.kv_window, t_refresh=self.t_refresh)


@dataclass
class StreamSlots:
    """The first/last stage's view of one stream: which chunk sits in which slot, and its noisy latent."""

    stream_id: str
    seed: int
    clock: ChunkClock
    num_slots: int
    latent_hw: tuple[int, int]
    chunk: list[int | None] = field(default_factory=list)
    latent: list[torch.Tensor | None] = field(default_factory=list)
    timestep: list[float] = field(default_factory=list)
    next_chunk: int = 0
    context: list[torch.Tensor | None] = field(default_factory=list)
    """The prompt embedding each slot's chunk entered with: a chunk keeps it for all its steps."""
    views: list[list[StreamDiTState] | None] = field(default_factory=list, repr=False)
    """Per slot, the per-stage states holding that embedding's cross-attention K/V (runtime only)."""

    def __post_init__(self) -> None:
        self.chunk = self.chunk or [None] * self.num_slots
        self.latent = self.latent or [None] * self.num_slots
        self.timestep = self.timestep or [0.0] * self.num_slots
        self.context = self.context or [None] * self.num_slots
        self.views = self.views or [None] * self.num_slots


class StreamBatchRunner:
    """Single-process stream-batch driver over ``stages`` (contiguous block ranges covering all blocks)."""

    def __init__(
        self,
        stages: Sequence[CausalWanDiT],
        config: StreamBatchConfig = StreamBatchConfig(),
    ) -> None:
        if not stages or not stages[0].is_first or not stages[-1].is_last:
            raise ValueError("stages must start at block 0 and end at the head")
        for a, b in itertools.pairwise(stages):
            if a.block_range[1] != b.block_range[0]:
                raise ValueError(f"stages {a.block_range} and {b.block_range} are not contiguous")
        self.stages = list(stages)
        self.config = config
        self.scheduler = FlowMatchScheduler(shift=config.shift)
        self.slots: dict[str, StreamSlots] = {}
        self.states: dict[str, list[StreamDiTState]] = {}
        """Per stream, the per-stage states of the current prompt (chunks entering now use them)."""
        self._views: dict[str, list[tuple[list[StreamDiTState], torch.Tensor]]] = {}

    @property
    def device(self) -> torch.device:
        return self.stages[0].device

    # ------------------------------------------------------------------ streams
    def open_stream(
        self,
        stream_id: str,
        seed: int,
        context: torch.Tensor,
        latent_hw: tuple[int, int],
        clock: ChunkClock | None = None,
    ) -> StreamSlots:
        cfg = self.config
        clock = clock or cfg.clock()
        if clock.kv_window != cfg.kv_window:
            raise ValueError("the clock's kv_window must match the cache window")
        b = cfg.steps
        self.slots[stream_id] = StreamSlots(stream_id, seed, clock, b, latent_hw)
        self.states[stream_id] = []
        for stage in self.stages:
            state = stage.new_state(stream_id, b, latent_hw, cfg.kv_window, cfg.sink, cfg.adaptive_threshold)
            stage.set_prompt(state, context)
            self.states[stream_id].append(state)
        self._views[stream_id] = [(self.states[stream_id], context)]
        return self.slots[stream_id]

    def set_prompt(self, stream_id: str, context: torch.Tensor, version: int) -> None:
        """The prompt of the chunks entering from now on. Chunks already in the slots keep the one they entered
        with for all their steps (as in the distributed ring, where each item carries its prompt version), so a
        change never depends on how items are grouped into forwards. A free view is rewritten in place (captured
        CUDA graphs stay valid); a new one sharing the KV shards is made only while every view is in use."""
        s = self.slots[stream_id]
        pool = self._views[stream_id]
        busy = {id(v) for c, v in zip(s.chunk, s.views, strict=True) if c is not None and v is not None}
        free = [i for i, (v, _) in enumerate(pool) if id(v) not in busy]
        if free:
            i = free[0]
        else:
            pool.append(([StreamDiTState(stream_id, st.shard) for st in pool[0][0]], context))
            i = len(pool) - 1
        view = pool[i][0]
        for stage, state in zip(self.stages, view, strict=True):
            stage.set_prompt(state, context, version)
        pool[i] = (view, context)
        self.states[stream_id] = view

    def adopt(
        self, slots: StreamSlots, states: Sequence[StreamDiTState], context: torch.Tensor | None = None
    ) -> None:
        """Take over a stream moved from elsewhere (its slot contents, per-stage states and current prompt
        embedding); the views of chunks in flight under another embedding are rebuilt from theirs. Without
        ``context``, every chunk in flight is taken to have entered under the states' prompt."""
        self.slots[slots.stream_id] = slots
        self.states[slots.stream_id] = list(states)
        current = context if context is not None else next((c for c in slots.context if c is not None), None)
        pool = self._views[slots.stream_id] = [(self.states[slots.stream_id], current)]
        for k, ctx in enumerate(slots.context):
            slots.views[k] = None
            if slots.chunk[k] is None:
                continue
            if ctx is None or context is None:
                slots.views[k] = self.states[slots.stream_id]
                continue
            view = next((v for v, c in pool if c is not None and c.shape == ctx.shape and torch.equal(c, ctx)), None)
            if view is None:
                view = [StreamDiTState(slots.stream_id, st.shard) for st in states]
                for stage, state in zip(self.stages, view, strict=True):
                    stage.set_prompt(state, ctx, states[0].prompt_version)
                pool.append((view, ctx))
            slots.views[k] = view

    def close_stream(self, stream_id: str) -> None:
        self.slots.pop(stream_id, None)
        self.states.pop(stream_id, None)
        self._views.pop(stream_id, None)

    def _enter(self, s: StreamSlots, stream_id: str) -> None:
        """A chunk enters slot 0 under the current prompt."""
        view = self.states[stream_id]
        s.views[0] = view
        s.context[0] = next(c for v, c in self._views[stream_id] if v is view)

    # ------------------------------------------------------------------ running
    def _input(self, s: StreamSlots, c: int, z: torch.Tensor | None, noise_scale: float | None) -> tuple:
        """Noisy input of chunk c at slot 0 and its timestep (v2v: s·ε + (1−s)·z; T2V: ε at t_0)."""
        c_h, c_w = s.latent_hw
        frames = s.clock.latent_frames(c)
        shape = (1, self.stages[0].config.in_dim, frames, c_h, c_w)
        eps = draw_noise(shape, s.seed, c, 0, "input", self.device)
        if z is None:
            return eps, float(self.config.timesteps[0])
        if tuple(z.shape) != shape:
            raise ValueError(f"chunk {c} latent must be {shape}, got {tuple(z.shape)}")
        ns = self.config.noise_scale if noise_scale is None else noise_scale
        x = ns * eps + (1 - ns) * z.to(device=self.device, dtype=torch.float32)
        return x, float(self.config.first_timestep(ns))

    def _run(
        self,
        x: torch.Tensor,
        plan: list[tuple[str, int, int, float, bool]],
        frames: int,
        views: Sequence[list[StreamDiTState] | None] | None = None,
    ) -> torch.Tensor:
        """One forward through every stage. plan rows: (stream, slot, chunk, timestep, clean); ``views``: per row,
        the per-stage states to use (default: the slot's, else the stream's current ones)."""
        first = self.slots[plan[0][0]]
        grid = self.stages[0].grid_of(frames, *first.latent_hw)
        h: torch.Tensor = x
        for idx, stage in enumerate(self.stages):
            items = []
            for row, (stream_id, slot, c, t, clean) in enumerate(plan):
                s = self.slots[stream_id]
                clock = s.clock
                view = views[row] if views is not None else s.views[slot]
                state = (view if view is not None else self.states[stream_id])[idx]
                items.append(SlotItem(state, slot, clock.latent_start(c), clock.rope_start(c), t, clean))
            if stage.is_last:
                sigmas = [self.scheduler.sigma(row[3]) for row in plan]
                h = stage(h, items, grid, noisy=x, sigmas=sigmas)
            else:
                h = stage(h, items, grid)
        return h

    def prepare(self, stream_id: str, z0: torch.Tensor | None, noise_scale: float | None = None) -> torch.Tensor:
        """First chunk: full sequential denoise on slot 0, then every slot starts from its cache."""
        s = self.slots[stream_id]
        if s.next_chunk != 0:
            raise ValueError(f"stream {stream_id!r} is already prepared")
        steps = self.config.timesteps
        self._enter(s, stream_id)
        x, t = self._input(s, 0, z0, noise_scale)
        frames = s.clock.latent_frames(0)
        x0 = x
        for j in range(len(steps)):
            tj = t if j == 0 else float(steps[j])
            x0 = self._run(x, [(stream_id, 0, 0, tj, False)], frames)
            if j + 1 < len(steps):
                eps = draw_noise(x0.shape, s.seed, 0, j + 1, "renoise", self.device)
                x = self.scheduler.add_noise(x0, eps, steps[j + 1])
        if self.config.cache_mode == "self_forcing":
            self._clean_pass([(stream_id, 0, 0, x0, s.views[0])], frames)
        for state in self.states[stream_id]:
            state.shard.replicate_slot(0)
        s.next_chunk = 1
        s.views[0], s.context[0] = None, None
        return x0

    def _clean_pass(
        self, finished: list[tuple[str, int, int, torch.Tensor, list[StreamDiTState] | None]], frames: int
    ) -> None:
        """Self-Forcing cache pass: re-run finished chunks at context_noise, rewriting their K/V everywhere."""
        t = float(self.config.context_noise)
        xs, plan, views = [], [], []
        for stream_id, slot, c, x0, view in finished:
            s = self.slots[stream_id]
            eps = draw_noise(x0.shape, s.seed, c, self.config.steps, "context", self.device)
            xs.append(self.scheduler.add_noise(x0, eps, t))
            plan.append((stream_id, slot, c, t, True))
            views.append(view)
        self._run(torch.cat(xs), plan, frames, views)

    def step(
        self, inputs: Mapping[str, torch.Tensor | tuple[torch.Tensor | None, float | None] | None]
    ) -> dict[str, torch.Tensor | None]:
        """One stream-batched forward for every stream in ``inputs`` (its next chunk's latent, or None for
        T2V, optionally with a motion-adapted noise scale). Returns each stream's finished x0 or None."""
        cfg = self.config
        steps = cfg.timesteps
        b = cfg.steps
        plan: list[tuple[str, int, int, float, bool]] = []
        xs: list[torch.Tensor] = []
        frames = None
        for stream_id, given in inputs.items():
            s = self.slots[stream_id]
            if s.next_chunk == 0:
                raise ValueError(f"stream {stream_id!r} must be prepared first")
            z, ns = given if isinstance(given, tuple) else (given, None)
            c = s.next_chunk
            s.latent[0], s.timestep[0] = self._input(s, c, z, ns)
            s.chunk[0] = c
            self._enter(s, stream_id)
            s.next_chunk += 1
            for k in range(b):
                ck = s.chunk[k]
                if ck is None:
                    continue
                latent = s.latent[k]
                assert latent is not None
                if frames is None:
                    frames = s.clock.latent_frames(ck)
                elif frames != s.clock.latent_frames(ck):
                    raise ValueError("all items of one forward must have the same number of latent frames")
                plan.append((stream_id, k, ck, s.timestep[k], False))
                xs.append(latent)
        assert frames is not None
        x0 = self._run(torch.cat(xs), plan, frames)

        out: dict[str, torch.Tensor | None] = {stream_id: None for stream_id in inputs}
        finished: list[tuple[str, int, int, torch.Tensor, list[StreamDiTState] | None]] = []
        moved: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
        for row, (stream_id, k, ck, _, _) in enumerate(plan):
            x0_k = x0[row : row + 1]
            if k == b - 1:
                out[stream_id] = x0_k
                finished.append((stream_id, k, ck, x0_k, self.slots[stream_id].views[k]))
            else:
                s = self.slots[stream_id]
                eps = draw_noise(x0_k.shape, s.seed, ck, k + 1, "renoise", self.device)
                moved.setdefault(stream_id, []).append((k + 1, ck, self.scheduler.add_noise(x0_k, eps, steps[k + 1])))
        for stream_id in inputs:
            s = self.slots[stream_id]
            views, contexts = s.views, s.context
            s.chunk, s.latent, s.views, s.context = [None] * b, [None] * b, [None] * b, [None] * b
            for k, ck, latent in moved.get(stream_id, []):
                s.chunk[k], s.latent[k], s.timestep[k] = ck, latent, float(steps[k])
                s.views[k], s.context[k] = views[k - 1], contexts[k - 1]
        if cfg.cache_mode == "self_forcing" and finished:
            self._clean_pass(finished, frames)
        return out
