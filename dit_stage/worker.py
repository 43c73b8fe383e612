"""StageWorker: one DiT stage's part of the stream-batch ring, without any transport (docs/dit-ring.md).

N workers over contiguous block ranges, wired first → … → last → first, compute exactly what
``StreamBatchRunner`` computes in one process:

* the **first** stage forms each micro-step from new chunks (step 0, noised with ``draw_noise(…, "input")``) and
  items the last stage returned (steps 1..B−1, and chunk 0's sequential prepare steps), across streams; it runs
  the patch embedding and its blocks;
* **middle** stages run the micro-steps they receive, in order, through their blocks;
* the **last** stage runs its blocks and the head, computes x0; items at step B−1 are finished chunks, the
  others are re-noised to t_{k+1} (``draw_noise(…, "renoise")``) and returned to the first stage.

Consistency of the shards across stages is the invariant everything here keeps: every stage processes exactly
the items the first stage admitted, in the first stage's micro-step order. So every drop decision (stale epoch,
past deadline, queue cap) is made at the first stage before an item enters a micro-step, and the cache frame an
item writes is counted per (stream, slot) by the first stage (``RingItem.frame_start``): a dropped chunk leaves
no gap in any slot's ring. Per (stream, slot) the first stage admits the oldest item only, one per micro-step,
so the order is FIFO per slot — the only order stream-batch results depend on.

The worker is not thread-safe: ``take``/``compute`` and state changes (``end_stream``) are serialised by the
caller; the ``add_*`` methods only touch queues and may run while ``compute`` runs in another thread.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dit_stage.model import CausalWanDiT
from dit_stage.scheduler import FlowMatchScheduler, draw_noise
from dit_stage.state import SlotItem, StreamDiTState
from proto import LatentChunk, Message, RingItem, RingReturn, StageItems, StagePrompt

__all__ = ["Finished", "MicroStep", "StageOutput", "StageWorker"]

log = logging.getLogger("rheo.dit_stage.worker")

PROMPT_VERSIONS_KEPT = 2
"""Prompt versions whose cross-attention K/V a stage keeps per stream (the newest ones)."""


@dataclass
class _Pending:
    """An item waiting at the first stage: its header and its noisy latent [1, C, f, H, W] at ``meta.step``."""

    meta: RingItem
    latent: torch.Tensor
    queued_at: float


@dataclass
class _Stream:
    """What one stage keeps for one stream."""

    stream_id: str
    steps: int
    latent_hw: tuple[int, int]
    shard_state: StreamDiTState
    views: dict[int, StreamDiTState] = field(default_factory=dict)  # prompt version → state sharing the shard
    # first stage only
    seed: int = 0
    new: collections.deque[_Pending] = field(default_factory=collections.deque)
    returns: dict[int, collections.deque[_Pending]] = field(default_factory=dict)
    slot_next: list[int] = field(default_factory=list)  # next cache frame per slot
    last_seq: int = -1
    prepared: bool = False
    epoch: int = 0  # the block-map epoch this state was built under (a failure epoch discards older ones)


@dataclass
class MicroStep:
    """Items of one forward, in batch order, with their input (latents on the first stage, else hidden)."""

    epoch: int
    items: list[RingItem]
    x: torch.Tensor
    noisy: torch.Tensor
    queue_wait_s: float = 0.0


@dataclass
class Finished:
    """A finished chunk (the last stage's output for the decoder)."""

    chunk: LatentChunk


@dataclass
class StageOutput:
    """What a micro-step produced: messages for the next stage's link (in order) and finished chunks."""

    link: list[Message] = field(default_factory=list)
    finished: list[LatentChunk] = field(default_factory=list)
    items: int = 0
    compute_s: float = 0.0
    replayed: int = 0  # replayed chunks finished (last stage): they rebuilt KV, nothing to publish


class StageWorker:
    """One stage's blocks, its per-stream states and (on the first stage) the ring's queues."""

    def __init__(
        self,
        model: CausalWanDiT,
        *,
        window: int = 6,
        sink: int = 3,
        adaptive_threshold: float | None = 0.2,
        max_batch_items: int = 16,
        max_queued_chunks: int = 4,
        shift: float = 8.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        self.window, self.sink, self.adaptive_threshold = window, sink, adaptive_threshold
        self.max_batch_items = max_batch_items
        self.max_queued_chunks = max_queued_chunks
        self.scheduler = FlowMatchScheduler(shift=shift)
        self.clock = clock
        self.epoch = 0
        self.streams: dict[str, _Stream] = {}
        self.prompts: dict[str, dict[int, torch.Tensor]] = {}
        self.forwarded: set[tuple[str, int]] = set()  # prompt versions already handed to the next stage
        self.incoming: collections.deque[StageItems] = collections.deque()
        self.dropped: collections.Counter[str] = collections.Counter()
        self.floor = 0
        """Oldest epoch whose items may still run here: a failure epoch raises it (``recover``)."""
        self.replayed = 0
        """Replayed chunks finished here (last stage): they rebuilt KV and were not published."""
        self.recovered_streams = 0

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
        for old in sorted(versions)[:-PROMPT_VERSIONS_KEPT]:
            del versions[old]
        return True

    def add_chunk(self, chunk: LatentChunk, seed: int) -> bool:
        """First stage: queue a new chunk (step 0). Stale, late, out-of-order or malformed chunks are counted
        and dropped; a full queue drops its oldest chunk."""
        assert self.is_first
        now = self.clock()
        reason = self._refuse_chunk(chunk, now)
        if reason:
            self.dropped[reason] += 1
            log.info("chunk %s/%d dropped: %s", chunk.stream_id, chunk.seq, reason)
            return False
        f, c, h, w = chunk.latent.shape
        st = self.streams.get(chunk.stream_id)
        if chunk.seq == 0:
            if st is not None:
                self._free(chunk.stream_id)
            st = self._new_stream(chunk.stream_id, len(chunk.timesteps), (h, w), self.epoch)
            st.seed = seed
        assert st is not None
        st.last_seq = chunk.seq
        meta = RingItem(
            stream_id=chunk.stream_id, seq=chunk.seq, step=0, slot=0, steps=st.steps, epoch=self.epoch,
            frame_start=0, latent_start=chunk.latent_start, rope_start=chunk.rope_start, frames=f,
            timesteps=list(chunk.timesteps), prompt_version=chunk.prompt_version, noise_scale=chunk.noise_scale,
            seed=st.seed, capture_time=chunk.capture_time, deadline=chunk.deadline, segment=chunk.segment,
            replay=chunk.replay,
        )
        z = chunk.latent.permute(1, 0, 2, 3).unsqueeze(0)  # [F, C, H, W] → [1, C, F, H, W]
        eps = draw_noise((1, c, f, h, w), st.seed, chunk.seq, 0, "input", self.model.device)
        ns = chunk.noise_scale
        x = ns * eps + (1 - ns) * z.to(device=self.model.device, dtype=torch.float32)
        st.new.append(_Pending(meta, x, now))
        # the cap bounds live chunks; replayed ones are bounded by ingest's ring and must all run, or the
        # caches they rebuild would have a hole
        live = [p for p in st.new if not p.meta.replay]
        for old in live[: max(0, len(live) - self.max_queued_chunks)]:
            st.new.remove(old)
            self.dropped["queue_full"] += 1
            log.info("chunk %s/%d dropped: stream queue full", old.meta.stream_id, old.meta.seq)
        return True

    def _refuse_chunk(self, chunk: LatentChunk, now: float) -> str:
        if chunk.epoch < self.epoch:
            return "stale_epoch"
        if chunk.deadline <= now and not chunk.replay:
            return "deadline"
        lat = chunk.latent
        cfg = self.model.config
        _, ph, pw = cfg.patch_size
        if lat.dim() != 4 or lat.shape[1] != cfg.in_dim or lat.shape[0] < 1 or lat.shape[2] % ph or lat.shape[3] % pw:
            return "bad_shape"
        if not lat.is_floating_point() or not 1 <= len(chunk.timesteps) <= 8:
            return "bad_shape"
        if chunk.rope_start + lat.shape[0] > cfg.rope_max_seq_len:
            return "bad_shape"
        st = self.streams.get(chunk.stream_id)
        if chunk.seq == 0:
            return ""
        if st is None:
            return "unprepared"  # joined mid-stream: no prepare chunk to build the caches from
        if chunk.seq <= st.last_seq:
            return "out_of_order"
        if len(chunk.timesteps) != st.steps or (lat.shape[2], lat.shape[3]) != st.latent_hw:
            return "bad_shape"
        return ""

    def add_return(self, ret: RingReturn) -> None:
        """First stage: take back items the last stage re-noised to their next step."""
        now = self.clock()
        for row, meta in enumerate(ret.items):
            if meta.epoch < self.floor:
                self.dropped["stale_epoch"] += 1  # ran on state a failure epoch discarded
                continue
            st = self.streams.get(meta.stream_id)
            if st is None:
                self.dropped["unknown_stream"] += 1
                continue
            latent = ret.latents[row : row + 1].to(self.model.device, copy=True)
            st.returns.setdefault(meta.slot, collections.deque()).append(_Pending(meta, latent, now))

    def add_items(self, msg: StageItems) -> None:
        """Middle and last stages: queue a micro-step from the previous stage (run in arrival order)."""
        if msg.epoch < self.floor:
            self.dropped["stale_epoch"] += len(msg.items)
            return
        self.incoming.append(msg)

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
            self.dropped["stale_epoch"] += len(m.items)
        self.forwarded.clear()  # the next stage may be new: hand the prompts down again

    def end_stream(self, stream_id: str) -> None:
        """Free everything this stage holds for a stream (its items still in flight will be dropped)."""
        if stream_id in self.streams:
            self._free(stream_id)
        self.prompts.pop(stream_id, None)
        self.forwarded = {k for k in self.forwarded if k[0] != stream_id}

    def _free(self, stream_id: str, reason: str = "stream_ended") -> None:
        st = self.streams.pop(stream_id)
        dropped = len(st.new) + sum(len(q) for q in st.returns.values())
        if dropped:
            self.dropped[reason] += dropped

    def _new_stream(self, stream_id: str, steps: int, latent_hw: tuple[int, int], epoch: int) -> _Stream:
        state = self.model.new_state(stream_id, steps, latent_hw, self.window, self.sink, self.adaptive_threshold)
        st = _Stream(stream_id, steps, latent_hw, state, slot_next=[0] * steps, epoch=epoch)
        self.streams[stream_id] = st
        return st

    # ------------------------------------------------------------------ forming a micro-step
    def pending(self) -> int:
        """Items waiting at this stage."""
        if not self.is_first:
            return sum(len(m.items) for m in self.incoming)
        return sum(len(st.new) + sum(len(q) for q in st.returns.values()) for st in self.streams.values())

    def take(self) -> MicroStep | None:
        """The next micro-step to run, or None when nothing is ready."""
        return self._take_first() if self.is_first else self._take_next()

    def _take_next(self) -> MicroStep | None:
        while self.incoming and self.incoming[0].epoch < self.floor:
            self.dropped["stale_epoch"] += len(self.incoming.popleft().items)
        if not self.incoming:
            return None
        msg = self.incoming.popleft()
        return MicroStep(msg.epoch, list(msg.items), msg.hidden, msg.noisy)

    def _refuse_item(self, meta: RingItem, now: float) -> str:
        """Why a queued item must not enter the next micro-step (empty: it may). A prepare chunk that has begun
        always completes: without it the stream has no caches; so does a replayed chunk (bounded by ingest's
        ring): without it the rebuilt caches would miss a frame the reference has."""
        if meta.step == 0 and meta.epoch < self.epoch:
            return "stale_epoch"  # the block map changed while it was queued
        if meta.deadline <= now and not meta.replay and not (meta.seq == 0 and meta.step > 0):
            return "deadline"
        return ""

    def _take_first(self) -> MicroStep | None:
        now = self.clock()
        candidates: list[tuple[_Stream, collections.deque[_Pending], _Pending]] = []
        for st in self.streams.values():
            versions = self.prompts.get(st.stream_id, {})
            heads: list[collections.deque[_Pending]] = [q for _, q in sorted(st.returns.items())]
            if st.prepared or not st.new or st.new[0].meta.seq == 0:
                heads.append(st.new)
            used_slots: set[int] = set()
            for q in heads:
                while q:
                    reason = self._refuse_item(q[0].meta, now)
                    if not reason:
                        break
                    late = q.popleft()
                    self.dropped[reason] += 1
                    log.info("item %s/%d step %d dropped: %s", late.meta.stream_id, late.meta.seq, late.meta.step,
                             reason)
                if not q or q[0].meta.slot in used_slots:
                    continue
                head = q[0]
                if head.meta.prompt_version not in versions:
                    continue  # waits for its prompt embedding; other streams go on
                used_slots.add(head.meta.slot)
                candidates.append((st, q, head))
        if not candidates:
            return None
        # one grid per forward: the signature of the oldest item, then the oldest items of that signature
        candidates.sort(key=lambda c: (c[2].meta.capture_time, c[2].meta.seq, -c[2].meta.step))
        sig = _signature(candidates[0][2])
        chosen = [c for c in candidates if _signature(c[2]) == sig][: self.max_batch_items]
        order = {sid: i for i, sid in enumerate(self.streams)}
        chosen.sort(key=lambda c: (order[c[0].stream_id], c[2].meta.prompt_version, c[2].meta.slot))
        items: list[RingItem] = []
        xs: list[torch.Tensor] = []
        wait = 0.0
        for st, q, head in chosen:
            q.popleft()
            meta = head.meta
            if meta.seq == 0:
                frame_start = 0
                st.slot_next[0] = meta.frames
                if meta.step == meta.steps - 1:
                    st.prepared = True  # chunk 1 may enter from the next micro-step on
                    st.slot_next = [meta.frames] * st.steps
            else:
                frame_start = st.slot_next[meta.slot]
                st.slot_next[meta.slot] += meta.frames
            items.append(meta.model_copy(update={"frame_start": frame_start}))
            xs.append(head.latent)
            wait += now - head.queued_at
        x = torch.cat(xs)
        return MicroStep(self.epoch, items, x, x, wait / len(items))

    # ------------------------------------------------------------------ running it
    @torch.no_grad()
    def compute(self, step: MicroStep) -> StageOutput:
        """Run a micro-step through this stage's blocks; returns what goes on (link) and what finished."""
        t0 = time.perf_counter()
        keep: list[int] = []
        slot_items: list[SlotItem] = []
        for row, meta in enumerate(step.items):
            state = self._state_for(meta, step.noisy)
            if state is None:
                continue
            keep.append(row)
            t = float(meta.timesteps[meta.step])
            slot_items.append(SlotItem(state, meta.slot, meta.frame_start, meta.rope_start, t))
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
        sigmas = [self.scheduler.sigma(float(m.timesteps[m.step])) for m in items] if self.is_last else None
        self.model.check_input(x, len(items), grid)
        batch = self.model.prepare_batch(slot_items, grid, sigmas)
        y = self.model.run(x, batch, noisy if self.is_last else None)
        for meta, it in zip(items, slot_items, strict=True):
            if meta.seq == 0 and meta.step == meta.steps - 1:
                it.state.shard.replicate_slot(0)  # prepare done: every slot starts from its cache
        if self.is_last:
            self._finish(items, y, out)
        else:
            for meta in items:
                key = (meta.stream_id, meta.prompt_version)
                if key not in self.forwarded:
                    emb = self.prompts[meta.stream_id][meta.prompt_version]
                    out.link.append(StagePrompt(stream_id=meta.stream_id, version=meta.prompt_version, embedding=emb))
                    self.forwarded.add(key)
            out.link.append(StageItems(epoch=step.epoch, items=items, hidden=y.contiguous(),
                                       noisy=noisy.contiguous()))
        out.items = len(items)
        out.compute_s = time.perf_counter() - t0
        return out

    def _finish(self, items: list[RingItem], x0: torch.Tensor, out: StageOutput) -> None:
        back: list[RingItem] = []
        latents: list[torch.Tensor] = []
        for row, meta in enumerate(items):
            x0_k = x0[row : row + 1]
            if meta.step == meta.steps - 1 and meta.replay:
                self.replayed += 1  # it rebuilt this stream's KV; its output was shown (or lost) before
                out.replayed += 1
                continue
            if meta.step == meta.steps - 1:
                out.finished.append(LatentChunk(
                    stream_id=meta.stream_id, seq=meta.seq, epoch=meta.epoch, latent_start=meta.latent_start,
                    rope_start=meta.rope_start, capture_time=meta.capture_time, deadline=meta.deadline,
                    prompt_version=meta.prompt_version, noise_scale=meta.noise_scale, timesteps=list(meta.timesteps),
                    segment=meta.segment, latent=x0_k[0].permute(1, 0, 2, 3).contiguous().cpu(),
                ))
                continue
            k = meta.step + 1
            eps = draw_noise(x0_k.shape, meta.seed, meta.seq, k, "renoise", x0_k.device)
            latents.append(self.scheduler.add_noise(x0_k, eps, meta.timesteps[k]))
            back.append(meta.model_copy(update={"step": k, "slot": 0 if meta.seq == 0 else k}))
        if back:
            out.link.append(RingReturn(epoch=self.epoch, items=back, latents=torch.cat(latents).contiguous()))

    def _state_for(self, meta: RingItem, noisy: torch.Tensor) -> StreamDiTState | None:
        """The stream's state under the item's prompt version; None (counted) when the item cannot run here."""
        st = self.streams.get(meta.stream_id)
        if not self.is_first and meta.seq == 0 and meta.step == 0:
            if st is not None:
                self._free(meta.stream_id)
            st = self._new_stream(meta.stream_id, meta.steps, (noisy.shape[-2], noisy.shape[-1]), meta.epoch)
        if st is None:
            self.dropped["unknown_stream"] += 1
            return None
        view = st.views.get(meta.prompt_version)
        if view is None:
            emb = self.prompts.get(meta.stream_id, {}).get(meta.prompt_version)
            if emb is None:
                self.dropped["no_prompt"] += 1
                log.warning("item %s/%d: no embedding for prompt version %d here", meta.stream_id, meta.seq,
                            meta.prompt_version)
                return None
            view = StreamDiTState(meta.stream_id, st.shard_state.shard)
            self.model.set_prompt(view, emb, meta.prompt_version)
            st.views[meta.prompt_version] = view
            for old in sorted(st.views)[:-PROMPT_VERSIONS_KEPT]:
                del st.views[old]
        return view

    def kv_bytes(self) -> dict[str, int]:
        return {sid: st.shard_state.shard.nbytes() for sid, st in self.streams.items()}


def _signature(p: _Pending) -> tuple[int, int, int]:
    return (p.meta.frames, *p.latent.shape[-2:])
