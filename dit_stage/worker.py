"""StageWorker: one DiT stage's part of the stream-batch ring, without any transport (docs/dit-ring.md).

This is the one engine: the stage services move its messages over NATS and the tensor link, ``StreamPipeline``
drives N of them in-process (``dit_stage/ring.py``). N workers over contiguous block ranges, wired first → … →
last → first:

* the **first** stage forms each micro-step from new chunks (step 0, noised with ``draw_noise(…, "input")``) and
  items the last stage returned (steps 1..B−1, chunk 0's sequential prepare steps, Self-Forcing clean passes),
  across streams (``dit_stage/admission.py``); it runs the patch embedding and its blocks;
* **middle** stages run the micro-steps they receive, in order, through their blocks;
* the **last** stage runs its blocks and the head, computes x0; items at step B−1 are finished chunks, the
  others are re-noised to t_{k+1} (``draw_noise(…, "renoise")``) and returned to the first stage.

Consistency of the shards across stages is the invariant everything keeps: every stage processes exactly the
items the first stage admitted, in the first stage's micro-step order. Per (stream, slot) the order is FIFO — the
only order stream-batch results depend on. What a stage keeps per stream is one ``StageStream``
(``dit_stage/stage_stream.py``); online rebalancing is ``dit_stage/switching.py``.

The worker is not thread-safe: ``take``/``compute`` and state changes (``end_stream``) are serialised by the
caller; the ``add_*`` methods only touch queues and may run while ``compute`` runs in another thread.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import torch

from dit_stage.admission import FirstStage
from dit_stage.batcher import BatcherPolicy, LatencyModel
from dit_stage.forward import Forward
from dit_stage.micro_step import MicroStep, StageOutput, SwitchStep
from dit_stage.model import CausalWanDiT
from dit_stage.stage_stream import (
    Pending,
    StageStream,
    is_clean,
    kv_tensors,
    merge_kv,
    stream_from_layout,
    versions_kept,
    view_order,
)
from dit_stage.state import SlotItem, StreamDiTState
from dit_stage.state_pool import StatePool
from dit_stage.switching import EpochChange, EpochSwitching
from dit_stage.timing import BlockTimer
from proto import (
    ChunkHeader,
    EpochSwitch,
    LatentChunk,
    RingItem,
    RingReturn,
    ShardMove,
    ShardMoveEnd,
    StageItems,
    StagePrompt,
)
from proto.clock import segment_seed
from wan.scheduler import FlowMatchScheduler, draw_noise

CacheMode = Literal["sdv2", "self_forcing"]

__all__ = ["CacheMode", "StageWorker"]

log = logging.getLogger("rheo.dit_stage.worker")


class StageWorker(FirstStage, EpochSwitching):
    """One stage's blocks, its per-stream states and (on the first stage) the ring's queues."""

    def __init__(
        self,
        model: CausalWanDiT,
        *,
        window: int = 6,
        sink: int = 3,
        adaptive_threshold: float | None = 0.2,
        max_batch_items: int = 16,
        batcher: BatcherPolicy = "slo",
        max_queued_chunks: int = 4,
        move_frame_bytes: int = 32 * 1024 * 1024,
        shift: float = 8.0,
        lockstep: bool = False,
        finished_on_host: bool = True,
        cache_mode: CacheMode = "sdv2",
        context_noise: float = 0.0,
        clock: Callable[[], float] = time.time,
        forward: Forward | None = None,
    ) -> None:
        self.model = model
        self.lockstep = lockstep
        self.finished_on_host = finished_on_host
        """First stage: a prepared stream runs one *wave* per new chunk (the chunk at step 0 with every return of
        the previous wave, in one micro-step) instead of running returns as soon as they are back. The single-
        process engine uses it: one forward per chunk, B items each (stream-batch's throughput), and the
        grouping of the oracle runner. Results do not depend on it beyond GEMM rounding."""
        self.forward = forward if forward is not None else Forward(model)
        self.storage = StatePool(enabled=self.forward.mode != "eager")
        """Ended streams' and segments' KV and cross K/V storage for new ones, whose graphs then replay at once (CUDA
        graph modes only). Given back between forwards only (``_retire``): nothing else holds it then."""
        self._retiring: list[StageStream] = []
        if cache_mode not in ("sdv2", "self_forcing"):
            raise ValueError(f"unknown cache mode {cache_mode!r}")
        self.cache_mode = cache_mode
        """``sdv2``: a slot's cache holds the K/V its own denoising forwards wrote. ``self_forcing``: once a chunk is
        finished, one more *clean pass* (the chunk's x0 re-noised to ``context_noise``, ``RingItem.step == steps``)
        rewrites its K/V in every slot that holds it, before anything later of the stream runs; such streams run in
        lockstep, so the order of clean passes and denoising steps never depends on timing."""
        self.context_noise = context_noise
        self.window, self.sink, self.adaptive_threshold = window, sink, adaptive_threshold
        self.max_batch_items = max_batch_items
        self.batcher: BatcherPolicy = batcher
        """First stage: how micro-steps are formed (``dit_stage/batcher.py``): ``slo`` or ``greedy``."""
        self.latency = LatencyModel()  # first stage: L(n, signature), fitted from ``measured`` micro-steps
        self._taken: dict[tuple[str, int, int], tuple[float, int]] = {}  # (stream, seq, step back) → (taken, n)
        self.max_queued_chunks = max_queued_chunks
        self.move_frame_bytes = move_frame_bytes  # a stream's moved KV goes in ShardMoves of at most this size
        self.scheduler = FlowMatchScheduler(shift=shift)
        self.clock = clock
        self._epoch = self._admit_from = 0
        self.streams: dict[str, StageStream] = {}
        self.successors: dict[str, StageStream] = {}  # first stage: a stream's next segment (after a `cut`), waiting
        self.prompts: dict[str, dict[int, torch.Tensor]] = {}
        self.forwarded: set[tuple[str, int]] = set()  # prompt versions already handed to the next stage
        self.incoming: collections.deque[StageItems | EpochSwitch] = collections.deque()
        self.dropped: collections.Counter[str] = collections.Counter()
        self.change: EpochChange | None = None
        self._moves: dict[tuple[int, str], dict[str, list[ShardMove]]] = {}  # (epoch, old owner) → stream → parts
        self._move_ends: dict[tuple[int, str], ShardMoveEnd] = {}
        self.floor = 0
        """Oldest epoch whose items may still run here: a failure epoch raises it (``recover``)."""
        self.replayed = 0
        """Replayed chunks finished here (last stage): they rebuilt KV and were not published."""
        self.recovered_streams = 0

    @property
    def epoch(self) -> int:
        """The block-map epoch this stage's micro-steps run under. Setting it is a hard switch: items that entered
        under an older epoch are stale (their KV may be gone); an online switch keeps them (``prepare_switch``)."""
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = self._admit_from = value

    @property
    def is_first(self) -> bool:
        return self.model.is_first

    @property
    def is_last(self) -> bool:
        return self.model.is_last

    # ------------------------------------------------------------------ inputs
    def add_prompt(self, stream_id: str, version: int, embedding: torch.Tensor) -> bool:
        """Cache a prompt embedding [L, D] (or [1, L, D]); False (counted) when its shape cannot be a prompt."""
        cfg = self.model.config
        emb = embedding[0] if embedding.dim() == 3 and embedding.shape[0] == 1 else embedding
        if emb.dim() != 2 or emb.shape[1] != cfg.text_dim or not 0 < emb.shape[0] <= cfg.text_len:
            self.dropped["bad_prompt"] += 1
            log.warning("prompt %s v%d: embedding %s is not [<= %d, %d]; dropped", stream_id, version,
                        tuple(embedding.shape), cfg.text_len, cfg.text_dim)
            return False
        versions = self.prompts.setdefault(stream_id, {})
        versions[version] = emb.detach().clone()
        st = self.streams.get(stream_id)
        keep = versions_kept(st) + (self.max_queued_chunks if self.is_first else 0)
        for old in sorted(versions)[:-keep]:
            del versions[old]
        return True


    def add_items(self, msg: StageItems | EpochSwitch) -> None:
        """Middle and last stages: queue a micro-step (or the epoch switch marker) from the previous stage (run in
        arrival order)."""
        if isinstance(msg, StageItems) and msg.epoch < self.floor:
            self.dropped["stale_epoch"] += len(msg.items)
            return
        self.incoming.append(msg)


    # ------------------------------------------------------------------ online epoch switch (docs/rebalance.md)


    def recover(self, epoch: int) -> None:
        """A failure epoch began: some KV of every stream is lost somewhere in the ring, so no state built under
        an older epoch can be trusted. Drop it, with every queued item of an older epoch (counted as
        ``stale_epoch``); ingest replays each stream from its prepare chunk, which builds the state afresh.
        Idempotent and selective: state and items of ``epoch`` or newer (a replay that came first) stay."""
        self.floor = max(self.floor, epoch)
        for sid in [sid for sid, st in self.streams.items() if st.epoch < self.floor]:
            self._free(sid, reason="stale_epoch")
            self.recovered_streams += 1
        for st in self.streams.values():
            for q in (st.new, *st.returns.values()):
                stale = [p for p in q if p.meta.epoch < self.floor]
                for p in stale:
                    q.remove(p)
                self.dropped["stale_epoch"] += len(stale)
        stale_msgs = [m for m in self.incoming if m.epoch < self.floor]
        for m in stale_msgs:
            self.incoming.remove(m)
            if isinstance(m, StageItems):
                self.dropped["stale_epoch"] += len(m.items)
        self.forwarded.clear()  # the next stage may be new: hand the prompts down again


    def export_stream(self, stream_id: str) -> dict[str, Any]:
        """Everything this stage holds for one stream as plain data and CPU tensors (``torch.save``-able, loadable
        with ``weights_only=True``): its KV in the format an online rebalance moves it in (``kv_tensors``: the shard
        with its ring state, cross-attention K/V per prompt version), the prompt embeddings and, on the first
        stage, the queued items and slot counters. ``import_stream`` takes it back, here or in another worker of
        the same block range."""
        st = self.streams[stream_id]
        if stream_id in self.successors:
            raise ValueError(f"stream {stream_id!r} is between two segments (a `cut` in progress); move it after")

        def items(q: collections.deque[Pending]) -> list[dict[str, Any]]:
            return [{"meta": p.meta.model_dump(), "latent": p.latent.detach().cpu()} for p in q]

        return {
            "stream_id": stream_id, "steps": st.steps, "latent_hw": list(st.latent_hw), "segment": st.segment,
            "segment_start": st.segment_start, "seed": st.seed, "slot_next": list(st.slot_next),
            "last_seq": st.last_seq, "prepared": st.prepared, "epoch": st.epoch, "draining": st.draining,
            "in_flight": [[seq, step, deadline] for (seq, step), deadline in st.in_flight.items()],
            "layout": json.dumps(st.shard_state.shard.meta()),
            "kv": kv_tensors(st.shard_state.shard, st.views, st.shard_state.shard.blocks, take=False),
            "new": items(st.new),
            "returns": {slot: items(q) for slot, q in st.returns.items()},
            "prompts": {v: e.detach().cpu() for v, e in self.prompts.get(stream_id, {}).items()},
        }

    def import_stream(self, data: dict[str, Any]) -> None:
        """Take over a stream exported by ``export_stream`` (its blocks must be this stage's): its KV arrives through
        the same merge as an online move's (``merge_kv``)."""
        sid, dev = data["stream_id"], self.model.device
        if sid in self.streams:
            raise ValueError(f"stream {sid!r} is already here")
        layout = json.loads(data["layout"])
        if layout["blocks"] != self.model.block_ids:
            raise ValueError(f"stream {sid!r} holds blocks {layout['blocks']}, this stage runs {self.model.block_ids}")
        now = self.clock()

        def items(rows: list[dict[str, Any]]) -> collections.deque[Pending]:
            return collections.deque(Pending(RingItem.model_validate(r["meta"]), r["latent"].to(dev), now)
                                     for r in rows)

        latent_hw = (int(data["latent_hw"][0]), int(data["latent_hw"][1]))
        st = stream_from_layout(sid, layout, latent_hw, int(data["segment"]), int(data["segment_start"]),
                                data["kv"], dev)
        self.prompts[sid] = {int(v): e.to(dev) for v, e in data["prompts"].items()}
        self._rebuild_views(st, merge_kv(st, layout["blocks"], layout, data["kv"], dev))
        st.seed, st.last_seq = int(data["seed"]), int(data["last_seq"])
        st.slot_next = [int(n) for n in data["slot_next"]]
        st.prepared, st.epoch, st.draining = bool(data["prepared"]), int(data["epoch"]), bool(data["draining"])
        st.new, st.returns = items(data["new"]), {int(k): items(q) for k, q in data["returns"].items()}
        st.in_flight = {(int(a), int(b)): float(d) for a, b, d in data["in_flight"]}
        self.streams[sid] = st

    def end_stream(self, stream_id: str) -> None:
        """Free everything this stage holds for a stream (its items still in flight will be dropped); its storage
        goes to ``storage`` (called between forwards: nothing else holds it)."""
        ended = [s for s in (self.streams.get(stream_id), self.successors.get(stream_id)) if s is not None]
        if stream_id in self.streams:
            self._free(stream_id)
        self.successors.pop(stream_id, None)
        self._retire(*ended)
        self.prompts.pop(stream_id, None)
        self.forwarded = {k for k in self.forwarded if k[0] != stream_id}

    def forget_timing(self) -> None:
        """Forget every measured micro-step and round trip (those of a warm-up stream, ``dit_stage/warm_up.py``)."""
        self.latency = LatencyModel()
        self._taken.clear()

    def _retire(self, *ended: StageStream, deferred: bool = False) -> None:
        """Give the storage of ended streams or segments to ``storage``, with any put off before: at once between
        forwards; ``deferred`` inside ``compute``, until the next micro-step begins (after the forward that may
        still read it)."""
        self._retiring.extend(ended)
        if not deferred:
            for st in self._retiring:
                self.storage.retire([st.shard_state, *st.views.values(), *st.blends.values()])
            self._retiring.clear()

    def _free(self, stream_id: str, reason: str = "stream_ended") -> None:
        st = self.streams.pop(stream_id)
        nxt = self.successors.pop(stream_id, None)
        dropped = len(st.new) + sum(len(q) for q in st.returns.values()) + (len(nxt.new) if nxt else 0)
        if dropped:
            self.dropped[reason] += dropped

    def _new_stream(self, stream_id: str, steps: int, latent_hw: tuple[int, int], epoch: int) -> StageStream:
        state = self.model.new_state(stream_id, steps, latent_hw, self.window, self.sink, self.adaptive_threshold,
                                     pool=self.storage)
        st = StageStream(stream_id, steps, latent_hw, state, slot_next=[0] * steps, epoch=epoch)
        self.streams[stream_id] = st
        return st

    # ------------------------------------------------------------------ forming a micro-step
    def pending(self) -> int:
        """Items waiting at this stage."""
        if not self.is_first:
            return sum(len(m.items) for m in self.incoming if isinstance(m, StageItems))
        return (sum(len(st.new) + sum(len(q) for q in st.returns.values()) for st in self.streams.values())
                + sum(len(st.new) for st in self.successors.values()))

    def take(self) -> MicroStep | SwitchStep | None:
        """The next micro-step to run (or this stage's epoch switch), or None when nothing is ready."""
        change = self.change
        if change is not None:
            if change.switched:
                if not self._finish_switch(change):
                    return None  # the new epoch waits for the blocks this stage takes over
            elif self._at_switch(change):
                return SwitchStep(change.epoch)
        return self._take_first() if self.is_first else self._take_next()

    def _take_next(self) -> MicroStep | None:
        i = self._next_incoming()
        if i is None or isinstance(self.incoming[i], EpochSwitch):
            return None  # the marker waits for this stage's prepared switch
        msg = self.incoming[i]
        del self.incoming[i]
        assert isinstance(msg, StageItems)
        return MicroStep(msg.epoch, list(msg.items), msg.hidden, msg.noisy)


    # ------------------------------------------------------------------ running it
    @torch.no_grad()
    def compute(self, step: MicroStep | SwitchStep) -> StageOutput:
        """Run a micro-step through this stage's blocks; returns what goes on (link) and what finished."""
        if isinstance(step, SwitchStep):
            return self._switch_out(step)
        self._retire()  # the last forward is done: what it retired is free now
        t0 = time.perf_counter()
        keep: list[int] = []
        slot_items: list[SlotItem] = []
        for row, meta in enumerate(step.items):
            state = self._state_for(meta, step.noisy)
            if state is None:
                continue
            keep.append(row)
            slot_items.append(SlotItem(state, meta.slot, meta.frame_start, meta.rope_start, self._timestep(meta),
                                       clean=is_clean(meta)))
        out = StageOutput()
        if not keep:
            return out
        items = [step.items[r] for r in keep]
        x, noisy = step.x, step.noisy
        if len(keep) != len(step.items):
            idx = torch.tensor(keep)
            x, noisy = x[idx], noisy[idx]
        dev = self.model.device
        x = x.to(dev)
        noisy = noisy.to(dev)
        h, w = noisy.shape[-2:]
        grid = self.model.grid_of(items[0].frames, h, w)
        sigmas = [self.scheduler.sigma(self._timestep(m)) for m in items] if self.is_last else None
        timer = BlockTimer(dev)
        self.forward = self.forward.follow(self.model)  # an epoch switch may have changed the model
        warmups = self.forward.warmups
        y = self.forward(x, slot_items, grid, noisy if self.is_last else None, sigmas, timer)
        out.warmup = self.forward.warmups != warmups
        for meta, it in zip(items, slot_items, strict=True):
            if meta.latent_start == 0 and meta.step == meta.steps - (self.cache_mode == "sdv2"):
                it.state.shard.replicate_slot(0)  # prepare done (its clean pass too): every slot starts from it
        if self.is_last:
            self._finish(items, y, out)
        else:
            for meta in items:
                for version in sorted({meta.prompt_version, meta.blend_from} - {None}):
                    key = (meta.stream_id, version)
                    emb = self.prompts.get(meta.stream_id, {}).get(version)
                    if key not in self.forwarded and emb is not None:  # (a joined stage may hold only cross K/V)
                        out.link.append(StagePrompt(stream_id=meta.stream_id, version=version, embedding=emb))
                        self.forwarded.add(key)
            out.link.append(StageItems(epoch=step.epoch, items=items, hidden=y.contiguous(),
                                       noisy=noisy.contiguous()))
        out.items = len(items)
        out.times = timer.collect()
        out.compute_s = time.perf_counter() - t0
        return out

    def _finish(self, items: list[RingItem], x0: torch.Tensor, out: StageOutput) -> None:
        back: list[RingItem] = []
        latents: list[torch.Tensor] = []
        for row, meta in enumerate(items):
            x0_k = x0[row : row + 1]
            if is_clean(meta):
                continue  # its K/V rewrite was the point; its x0 is not used
            st = self.streams.get(meta.stream_id)
            c = meta.seq - (st.segment_start if st is not None else 0)  # the chunk's index in its segment
            seed = segment_seed(meta.seed, meta.segment)
            if meta.step == meta.steps - 1 and self.cache_mode == "self_forcing":
                eps = draw_noise(x0_k.shape, seed, c, meta.steps, "context", x0_k.device)
                latents.append(self.scheduler.add_noise(x0_k, eps, self.context_noise))
                back.append(meta.model_copy(update={"step": meta.steps}))  # same slot and cache frames
            if meta.step == meta.steps - 1 and meta.replay:
                self.replayed += 1  # it rebuilt this stream's KV; its output was shown (or lost) before
                out.replayed += 1
                continue
            if meta.step == meta.steps - 1:
                out.finished.append(LatentChunk(**(meta.header() | {"timesteps": list(meta.timesteps)}),
                                                latent=self._finished_latent(x0_k)))
                continue
            k = meta.step + 1
            eps = draw_noise(x0_k.shape, seed, c, k, "renoise", x0_k.device)
            latents.append(self.scheduler.add_noise(x0_k, eps, meta.timesteps[k]))
            back.append(meta.model_copy(update={"step": k, "slot": 0 if meta.latent_start == 0 else k}))
        if back:
            out.link.append(RingReturn(epoch=self.epoch, items=back, latents=torch.cat(latents).contiguous()))

    def _finished_latent(self, x0: torch.Tensor) -> torch.Tensor:
        """A finished chunk's latent [F, C, H, W]: copied to the host in the compute thread when it leaves the
        process (the stage service publishes it), left on the device for an in-process consumer (the pipeline's
        VAE decode), which would only copy it back."""
        latent = x0[0].permute(1, 0, 2, 3).contiguous()
        return latent.cpu() if self.finished_on_host else latent

    def _timestep(self, meta: RingItem) -> float:
        return float(self.context_noise if is_clean(meta) else meta.timesteps[meta.step])

    def _state_for(self, meta: RingItem, noisy: torch.Tensor) -> StreamDiTState | None:
        """The stream's state under the item's prompt version; None (counted) when the item cannot run here."""
        st = self.streams.get(meta.stream_id)
        if not self.is_first and meta.latent_start == 0 and meta.step == 0:  # a stream's or a segment's start
            if st is not None:
                self._free(meta.stream_id)
                self._retire(st, deferred=True)
            st = self._new_stream(meta.stream_id, meta.steps, (noisy.shape[-2], noisy.shape[-1]), meta.epoch)
            st.segment, st.segment_start = meta.segment, meta.seq
        if st is None:
            self.dropped["unknown_stream"] += 1
            return None
        blend = meta.blend_from is not None
        views: dict = st.blends if blend else st.views
        key = (meta.prompt_version, meta.blend_from, meta.blend_alpha) if blend else meta.prompt_version
        view = views.get(key)
        if view is None:
            emb = self._embedding(meta)
            if emb is None:
                self.dropped["no_prompt"] += 1
                log.warning("item %s/%d: no embedding for prompt version %d (blend from %s) here", meta.stream_id,
                            meta.seq, meta.prompt_version, meta.blend_from)
                return None
            view = StreamDiTState(meta.stream_id, st.shard_state.shard)
            self.model.set_prompt(view, emb, meta.prompt_version, pool=self.storage)
            views[key] = view
            for old in sorted(views, key=view_order)[:-versions_kept(st)]:
                del views[old]
        return view

    def _embedding(self, meta: ChunkHeader) -> torch.Tensor | None:
        """The embedding an item runs under: its prompt version's, or mid-blend lerp(from, to, alpha) of the two,
        zero-padded to the model's text length first (as ``set_prompt`` pads), so every path blends the same
        tensors."""
        versions = self.prompts.get(meta.stream_id, {})
        emb = versions.get(meta.prompt_version)
        if emb is None or meta.blend_from is None:
            return emb
        src = versions.get(meta.blend_from)
        if src is None:
            return None
        n = self.model.config.text_len
        pad = [torch.nn.functional.pad(e, (0, 0, 0, n - e.shape[0])) for e in (src, emb)]
        return torch.lerp(pad[0], pad[1], meta.blend_alpha)

    def kv_bytes(self) -> dict[str, int]:
        return {sid: st.shard_state.shard.nbytes() for sid, st in self.streams.items()}


