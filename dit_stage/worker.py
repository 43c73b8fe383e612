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

An online rebalance (``prepare_switch``, docs/rebalance.md) switches the block map at a micro-step boundary: the
first stage emits an ``EpochSwitch`` marker between two micro-steps, every stage runs the micro-steps before it
under the old map and those after it under the new one, ships the blocks it loses (``ShardMove``, ring state
included) when it reads the marker, and runs nothing of the new epoch before the blocks it gains have arrived.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from dit_stage.forward import Forward
from dit_stage.kv_cache import KVCacheShard
from dit_stage.model import CausalWanDiT
from dit_stage.state import SlotItem, StreamDiTState
from dit_stage.timing import BlockTimer, BlockTimes
from proto import (
    ChunkHeader,
    EpochSwitch,
    LatentChunk,
    Message,
    RingItem,
    RingReturn,
    ShardLayout,
    ShardMove,
    ShardMoveEnd,
    StageItems,
    StagePrompt,
)
from proto.clock import segment_seed
from wan.scheduler import FlowMatchScheduler, draw_noise

CacheMode = Literal["sdv2", "self_forcing"]

__all__ = ["CacheMode", "EpochChange", "Finished", "MicroStep", "StageOutput", "StageWorker", "SwitchStep"]

log = logging.getLogger("rheo.dit_stage.worker")

PROMPT_VERSIONS_KEPT = 2
"""Prompt versions whose cross-attention K/V a stage keeps per stream at least (the newest ones). A stream keeps
one more than its step count: during a `blend` every chunk enters under its own version, and the B chunks in the
slots plus the one entering may all differ."""


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
    blends: dict[tuple[int, int, float], StreamDiTState] = field(default_factory=dict)
    """Mid-blend views, (to, from, alpha) → state sharing the shard; rebuilt from the embeddings after a move."""
    segment: int = 0
    segment_start: int = 0  # seq of the segment's prepare chunk: noise draws count chunks from it
    # first stage only
    seed: int = 0  # the segment's seed (``segment_seed``)
    new: collections.deque[_Pending] = field(default_factory=collections.deque)
    returns: dict[int, collections.deque[_Pending]] = field(default_factory=dict)
    slot_next: list[int] = field(default_factory=list)  # next cache frame per slot
    last_seq: int = -1
    prepared: bool = False
    in_flight: dict[tuple[int, int], float] = field(default_factory=dict)  # returns to come: (seq, step) → deadline
    epoch: int = 0  # the block-map epoch this state was built under (a failure epoch discards older ones)
    draining: bool = False  # lockstep: the returns may run without a new chunk (the input ended)


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
class SwitchStep:
    """The epoch switch point of this stage: everything before ran under the old epoch (docs/rebalance.md)."""

    epoch: int
    items: tuple[()] = ()
    queue_wait_s: float = 0.0


@dataclass
class EpochChange:
    """An online switch of this stage to block-map ``epoch`` (reasons rebalance and join; docs/rebalance.md)."""

    epoch: int
    model: CausalWanDiT  # this stage's blocks under the new epoch (the old model when its range is unchanged)
    stage_id: str
    send: dict[str, list[int]] = field(default_factory=dict)  # new owner → blocks this stage hands over
    receive: dict[str, list[int]] = field(default_factory=dict)  # old owner → blocks this stage takes over
    joining: bool = False  # a stage new to the ring: nothing of the old epoch here, every block arrives by move
    relink: bool = False  # the next stage changes at the switch (a stage joined after this one)
    go: bool = False  # first stage: every stage is prepared; switch at the next micro-step boundary
    switched: bool = False  # this stage ran its last micro-step of the old epoch and shipped its moved blocks


@dataclass
class StageOutput:
    """What a micro-step produced: messages for the next stage's link (in order), finished chunks, and on an epoch
    switch the KV moves to other stages (``ShardMove``s, then a ``ShardMoveEnd`` per target)."""

    link: list[Message] = field(default_factory=list)
    finished: list[LatentChunk] = field(default_factory=list)
    moves: list[ShardMove | ShardMoveEnd] = field(default_factory=list)
    items: int = 0
    compute_s: float = 0.0
    times: BlockTimes | None = None
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
        move_frame_bytes: int = 32 * 1024 * 1024,
        shift: float = 8.0,
        lockstep: bool = False,
        cache_mode: CacheMode = "sdv2",
        context_noise: float = 0.0,
        clock: Callable[[], float] = time.time,
        forward: Forward | None = None,
    ) -> None:
        self.model = model
        self.lockstep = lockstep
        """First stage: a prepared stream runs one *wave* per new chunk (the chunk at step 0 with every return of
        the previous wave, in one micro-step) instead of running returns as soon as they are back. The single-
        process engine uses it: one forward per chunk, B items each (stream-batch's throughput), and the
        grouping of the oracle runner. Results do not depend on it beyond GEMM rounding."""
        self.forward = forward if forward is not None else Forward(model)
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
        self.max_queued_chunks = max_queued_chunks
        self.move_frame_bytes = move_frame_bytes  # a stream's moved KV goes in ShardMoves of at most this size
        self.scheduler = FlowMatchScheduler(shift=shift)
        self.clock = clock
        self._epoch = self._admit_from = 0
        self.streams: dict[str, _Stream] = {}
        self.successors: dict[str, _Stream] = {}  # first stage: a stream's next segment (after a `cut`), waiting
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
        keep = self._versions_kept(st) + (self.max_queued_chunks if self.is_first else 0)
        for old in sorted(versions)[:-keep]:
            del versions[old]
        return True

    @staticmethod
    def _versions_kept(st: _Stream | None) -> int:
        return max(PROMPT_VERSIONS_KEPT, 1 + (st.steps if st is not None else 0))

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
        if chunk.seq == 0 or st is None:  # a stream's start, or its segment's prepare chunk replayed after a failure
            if st is not None:
                self._free(chunk.stream_id)
            st = self._new_stream(chunk.stream_id, len(chunk.timesteps), (h, w), self.epoch)
            st.segment, st.segment_start, st.seed = chunk.segment, chunk.seq, segment_seed(seed, chunk.segment)
        st = self._segment_for(st, chunk, seed)
        st.last_seq = chunk.seq
        st.draining = False
        meta = RingItem(**(chunk.header() | {"epoch": self.epoch, "timesteps": list(chunk.timesteps)}), step=0,
                        slot=0, steps=st.steps, frame_start=0, frames=f, seed=st.seed)
        z = chunk.latent.permute(1, 0, 2, 3).unsqueeze(0)  # [F, C, H, W] → [1, C, F, H, W]
        eps = draw_noise((1, c, f, h, w), st.seed, chunk.seq - st.segment_start, 0, "input", self.model.device)
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

    def _segment_for(self, st: _Stream, chunk: LatentChunk, seed: int) -> _Stream:
        """The stream state an admitted chunk belongs to: the current segment's, or (after a `cut`) the next
        segment's, begun by its prepare chunk and kept aside until the current one has left the ring."""
        nxt = self.successors.get(chunk.stream_id)
        if chunk.segment == st.segment or (nxt is not None and chunk.segment == nxt.segment):
            return st if chunk.segment == st.segment else nxt  # type: ignore[return-value]
        if nxt is not None:  # a second cut before the first one's segment ran: that segment is skipped
            self.dropped["segment_superseded"] += len(nxt.new)
        steps = len(chunk.timesteps)  # a segment may change the step count (ingest starts one to do so)
        nxt = _Stream(chunk.stream_id, steps, st.latent_hw, self.model.new_state(
            chunk.stream_id, steps, st.latent_hw, self.window, self.sink, self.adaptive_threshold),
            slot_next=[0] * steps, segment=chunk.segment, segment_start=chunk.seq,
            seed=segment_seed(seed, chunk.segment))
        self.successors[chunk.stream_id] = nxt
        return nxt

    def _left_ring(self, st: _Stream, now: float) -> bool:
        """Every item of the stream's segment has left the first stage for good (returns lost past their
        deadline are given up)."""
        if st.new or any(st.returns.values()):
            return False
        for key, deadline in list(st.in_flight.items()):
            if deadline > now:
                return False
            del st.in_flight[key]
            self.dropped["lost_in_ring"] += 1
        return True

    def _refuse_chunk(self, chunk: LatentChunk, now: float) -> str:
        if chunk.epoch < self._admit_from:
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
        if chunk.seq == 0 or (st is None and chunk.latent_start == 0):
            return ""
        if st is None:
            return "unprepared"  # joined mid-stream: no prepare chunk to build the caches from
        nxt = self.successors.get(chunk.stream_id)
        if nxt is not None and chunk.segment >= nxt.segment:
            st = nxt
        if chunk.segment < st.segment:
            return "stale_segment"
        if chunk.segment > st.segment and chunk.latent_start != 0:
            return "unprepared"  # a new segment (a `cut`) begins with its prepare chunk
        if chunk.seq <= st.last_seq:
            return "out_of_order"
        if (chunk.segment == st.segment and len(chunk.timesteps) != st.steps) or \
                (lat.shape[2], lat.shape[3]) != st.latent_hw:
            return "bad_shape"  # a new segment's prepare chunk may bring a new step count
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
            st.in_flight.pop((meta.seq, meta.step), None)
            if meta.segment != st.segment:
                self.dropped["stale_segment"] += 1
                continue
            latent = ret.latents[row : row + 1].to(self.model.device, copy=True)
            q = st.returns.setdefault(meta.slot, collections.deque())
            q.append(_Pending(meta, latent, now))
            if len(q) > 1 and (q[-2].meta.seq, q[-2].meta.step) > (meta.seq, meta.step):
                # two last stages around a join: their returns may cross; a slot runs its chunks in order
                st.returns[meta.slot] = collections.deque(sorted(q, key=lambda p: (p.meta.seq, p.meta.step)))

    def add_items(self, msg: StageItems | EpochSwitch) -> None:
        """Middle and last stages: queue a micro-step (or the epoch switch marker) from the previous stage (run in
        arrival order)."""
        if isinstance(msg, StageItems) and msg.epoch < self.floor:
            self.dropped["stale_epoch"] += len(msg.items)
            return
        self.incoming.append(msg)

    def add_shard_move(self, msg: ShardMove | ShardMoveEnd) -> None:
        """KV of blocks this stage takes over at an online switch (kept until the switch can use it)."""
        key = (msg.epoch, msg.source)
        if msg.epoch <= self._epoch and (self.change is None or self.change.epoch != msg.epoch):
            self.dropped["stale_shard_move"] += 1
            return
        if isinstance(msg, ShardMove):
            self._moves.setdefault(key, {}).setdefault(msg.stream_id, []).append(msg)
        else:
            self._move_ends[key] = msg

    # ------------------------------------------------------------------ online epoch switch (docs/rebalance.md)
    def prepare_switch(self, change: EpochChange) -> None:
        """Register the next epoch (its model already loaded). The first stage switches once ``change.go`` is set;
        the others when they read the first stage's ``EpochSwitch`` marker."""
        if change.epoch <= self._epoch:
            raise ValueError(f"epoch {change.epoch} is not after the current epoch {self._epoch}")
        if change.model.config.num_layers != self.model.config.num_layers:
            raise ValueError("an online switch keeps the model; its block count differs")
        self.change = change
        if change.joining:  # no old epoch to finish: wait for the moves only
            if self.streams:
                raise ValueError("a joining stage starts without streams")
            self.model = change.model
            self._epoch = change.epoch
            change.switched = True

    def abort_switch(self) -> None:
        """Forget a prepared switch (a hard epoch replaces it)."""
        self.change = None
        self._moves.clear()
        self._move_ends.clear()

    def _at_switch(self, change: EpochChange) -> bool:
        if self.is_first:
            return change.go
        i = self._next_incoming()
        head = self.incoming[i] if i is not None else None
        return isinstance(head, EpochSwitch) and head.epoch == change.epoch

    def _next_incoming(self) -> int | None:
        """Index of the next frame to run: the oldest micro-step of an epoch this stage has reached, or the
        switch marker. Micro-steps of a later epoch (from a new predecessor, after a join) wait for the switch."""
        i = 0
        while i < len(self.incoming):
            msg = self.incoming[i]
            if isinstance(msg, EpochSwitch):
                if msg.epoch > self._epoch:
                    return i
                del self.incoming[i]  # a marker of an epoch a hard switch has passed
                continue
            if msg.epoch < self.floor:  # a failure epoch passed it: its KV is gone
                del self.incoming[i]
                self.dropped["stale_epoch"] += len(msg.items)
                continue
            if msg.epoch <= self._epoch:
                return i
            i += 1
        return None

    def _switch_out(self, step: SwitchStep) -> StageOutput:
        """The last micro-step of the old epoch is done here: ship the blocks this stage loses, take the new
        model, pass the marker on."""
        change = self.change
        assert change is not None and change.epoch == step.epoch and not change.switched
        i = self._next_incoming()
        if i is not None and isinstance(self.incoming[i], EpochSwitch):
            del self.incoming[i]
        out = StageOutput()
        streams = list(self.streams.values())  # a snapshot: add_chunk may open a stream meanwhile (it starts fresh)
        for target, blocks in sorted(change.send.items()):
            for st in streams:
                out.moves.extend(self._export(st, change, target, blocks))
            out.moves.append(ShardMoveEnd(epoch=change.epoch, source=change.stage_id, target=target,
                                          blocks=list(blocks), streams=[st.stream_id for st in streams]))
        previous = self._epoch
        was_last = self.is_last
        if change.relink:
            self.forwarded.clear()  # the new next stage has none of the prompt embeddings
        self.model = change.model
        self._epoch = change.epoch  # items that entered under the previous epoch stay valid: their KV moves along
        change.switched = True
        if not was_last:  # on the old link: the old successor's last micro-step of the old epoch comes before it
            out.link.append(EpochSwitch(epoch=change.epoch, previous=previous))
        return out

    def _export(self, st: _Stream, change: EpochChange, target: str, blocks: list[int]) -> list[ShardMove]:
        """A stream's state for ``blocks`` (freed here), in parts of at most ``move_frame_bytes`` (one tensor per
        part when a tensor alone is larger)."""
        moved = st.shard_state.split_blocks(blocks)
        tensors = {key: t.detach().cpu() for key, t in moved.shard.state_dict().items()}
        for version, view in st.views.items():
            for b in blocks:
                if b in view.cross_k:
                    tensors[f"cross_k.{version}.{b}"] = view.cross_k.pop(b).cpu()
                    tensors[f"cross_v.{version}.{b}"] = view.cross_v.pop(b).cpu()
        meta = moved.shard.meta()
        layout = ShardLayout(**{k: meta[k] for k in ShardLayout.model_fields})
        parts: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, t in tensors.items():
            n = t.numel() * t.element_size()
            if parts[-1] and size + n > self.move_frame_bytes:
                parts.append({})
                size = 0
            parts[-1][key] = t
            size += n
        return [ShardMove(epoch=change.epoch, source=change.stage_id, target=target, stream_id=st.stream_id,
                          blocks=list(blocks), latent_h=st.latent_hw[0], latent_w=st.latent_hw[1],
                          segment=st.segment, segment_start=st.segment_start, layout=layout, tensors=part)
                for part in parts]

    def _finish_switch(self, change: EpochChange) -> bool:
        """Merge the blocks this stage takes over once every old owner's moves are here; False while waiting.
        A joining stage does not know the old map: it waits until the moves' ends cover its whole range."""
        if change.joining:
            ends = [e for (epoch, _), e in self._move_ends.items() if epoch == change.epoch]
            if sorted(b for e in ends for b in e.blocks) != self.model.block_ids:
                return False
            change.receive = {e.source: list(e.blocks) for e in ends}
            for sid in sorted({s for e in ends for s in e.streams}):
                self._join_stream(change, sid)
        elif any((change.epoch, src) not in self._move_ends for src in change.receive):
            return False
        for sid in list(self.streams):
            st = self.streams[sid]
            moves = [self._moves.get((change.epoch, src), {}).get(sid) for src in change.receive]
            if any(not m for m in moves):
                if any(st.shard_state.shard.frames_end):
                    self._free(sid)  # its KV on the old owner is gone (the stream ended there): counted
                    self.dropped["switch_lost"] += 1
                    log.warning("stream %s: no KV for blocks %s at epoch %d; state dropped", sid,
                                sorted(b for bs in change.receive.values() for b in bs), change.epoch)
                else:  # nothing ran yet: fresh state for the new range
                    st.shard_state = self.model.new_state(sid, st.steps, st.latent_hw, self.window, self.sink,
                                                          self.adaptive_threshold)
                    st.views.clear()
                continue
            for parts in moves:
                assert parts
                self._import(st, parts)
            if st.shard_state.shard.blocks != self.model.block_ids:
                raise RuntimeError(f"stream {sid}: blocks {st.shard_state.shard.blocks} after the switch to epoch "
                                   f"{change.epoch}, expected {self.model.block_ids}")
        for key in [k for k in self._moves if k[0] <= change.epoch]:
            del self._moves[key]
        for key in [k for k in self._move_ends if k[0] <= change.epoch]:
            del self._move_ends[key]
        self.change = None
        log.info("epoch %d: blocks %s here", change.epoch, self.model.block_range)
        return True

    def _join_stream(self, change: EpochChange, stream_id: str) -> None:
        """A joining stage's state for a stream it has never seen: empty shard of the moves' layout, and a view per
        prompt version whose cross-attention K/V the moves carry for every block (the others are rebuilt from the
        embedding the previous stage hands down before the next item of that version)."""
        parts = [p for src in change.receive for p in self._moves.get((change.epoch, src), {}).get(stream_id, [])]
        if not parts:
            return
        first = parts[0]
        meta = first.layout.model_dump() | {"blocks": []}
        shard = KVCacheShard.from_state(meta, {}, self.model.device)
        st = _Stream(stream_id, first.layout.num_slots, (first.latent_h, first.latent_w),
                     StreamDiTState(stream_id, shard), slot_next=[0] * first.layout.num_slots,
                     segment=first.segment, segment_start=first.segment_start)
        versions = {int(k.split(".")[1]) for p in parts for k in p.tensors if k.startswith("cross_k.")}
        for v in sorted(versions)[-PROMPT_VERSIONS_KEPT:]:
            st.views[v] = StreamDiTState(stream_id, shard, prompt_version=v)
        self.streams[stream_id] = st

    def _import(self, st: _Stream, parts: list[ShardMove]) -> None:
        dev = self.model.device
        move = parts[0]
        if any(p.blocks != move.blocks or p.layout != move.layout for p in parts):
            raise ValueError(f"stream {st.stream_id}: the parts of a shard move disagree on blocks or layout")
        tensors = {k: t for p in parts for k, t in p.tensors.items()}
        meta = move.layout.model_dump() | {"blocks": list(move.blocks)}
        shard = {k: t for k, t in tensors.items() if not k.startswith("cross_")}
        st.shard_state.shard.merge(KVCacheShard.from_state(meta, shard, dev))  # refuses other ring counters
        for version, view in list(st.views.items()):
            keys = [(f"cross_k.{version}.{b}", f"cross_v.{version}.{b}") for b in move.blocks]
            if all(k in tensors and v in tensors for k, v in keys):
                for b, (k, v) in zip(move.blocks, keys, strict=True):
                    view.cross_k[b] = tensors[k].to(dev)
                    view.cross_v[b] = tensors[v].to(dev)
                continue
            emb = self.prompts.get(st.stream_id, {}).get(version)
            if emb is None:
                del st.views[version]  # rebuilt when an item of that version comes (or counted as no_prompt)
            else:
                self.model.set_prompt(view, emb, version)

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
        """Everything this stage holds for one stream (KV shard with its ring state, cross-attention K/V per prompt
        version, prompt embeddings and, on the first stage, the queued items and slot counters) as plain data and
        CPU tensors: ``torch.save``-able and loadable with ``weights_only=True``. ``import_stream`` takes it back,
        here or in another worker of the same block range."""
        st = self.streams[stream_id]
        if stream_id in self.successors:
            raise ValueError(f"stream {stream_id!r} is between two segments (a `cut` in progress); move it after")

        def items(q: collections.deque[_Pending]) -> list[dict[str, Any]]:
            return [{"meta": p.meta.model_dump(), "latent": p.latent.detach().cpu()} for p in q]

        return {
            "stream_id": stream_id, "steps": st.steps, "latent_hw": list(st.latent_hw), "segment": st.segment,
            "segment_start": st.segment_start, "seed": st.seed, "slot_next": list(st.slot_next),
            "last_seq": st.last_seq, "prepared": st.prepared, "epoch": st.epoch, "draining": st.draining,
            "in_flight": [[seq, step, deadline] for (seq, step), deadline in st.in_flight.items()],
            "shard": torch.frombuffer(bytearray(st.shard_state.shard.to_bytes()), dtype=torch.uint8),
            "views": {v: {"cross_k": {b: t.detach().cpu() for b, t in view.cross_k.items()},
                          "cross_v": {b: t.detach().cpu() for b, t in view.cross_v.items()}}
                      for v, view in st.views.items()},
            "new": items(st.new),
            "returns": {slot: items(q) for slot, q in st.returns.items()},
            "prompts": {v: e.detach().cpu() for v, e in self.prompts.get(stream_id, {}).items()},
        }

    def import_stream(self, data: dict[str, Any]) -> None:
        """Take over a stream exported by ``export_stream`` (its blocks must be this stage's)."""
        sid, dev = data["stream_id"], self.model.device
        if sid in self.streams:
            raise ValueError(f"stream {sid!r} is already here")
        shard = KVCacheShard.from_bytes(data["shard"].numpy().tobytes(), dev)
        if shard.blocks != self.model.block_ids:
            raise ValueError(f"stream {sid!r} holds blocks {shard.blocks}, this stage runs {self.model.block_ids}")
        now = self.clock()

        def items(rows: list[dict[str, Any]]) -> collections.deque[_Pending]:
            return collections.deque(_Pending(RingItem.model_validate(r["meta"]), r["latent"].to(dev), now)
                                     for r in rows)

        st = _Stream(sid, int(data["steps"]), (int(data["latent_hw"][0]), int(data["latent_hw"][1])),
                     StreamDiTState(sid, shard), segment=int(data["segment"]),
                     segment_start=int(data["segment_start"]), seed=int(data["seed"]),
                     new=items(data["new"]), returns={int(k): items(q) for k, q in data["returns"].items()},
                     slot_next=[int(n) for n in data["slot_next"]], last_seq=int(data["last_seq"]),
                     prepared=bool(data["prepared"]), epoch=int(data["epoch"]), draining=bool(data["draining"]),
                     in_flight={(int(a), int(b)): float(d) for a, b, d in data["in_flight"]})
        for v, cross in data["views"].items():
            view = st.views[int(v)] = StreamDiTState(sid, shard, prompt_version=int(v))
            view.cross_k = {int(b): t.to(dev) for b, t in cross["cross_k"].items()}
            view.cross_v = {int(b): t.to(dev) for b, t in cross["cross_v"].items()}
        self.streams[sid] = st
        self.prompts[sid] = {int(v): e.to(dev) for v, e in data["prompts"].items()}

    def end_stream(self, stream_id: str) -> None:
        """Free everything this stage holds for a stream (its items still in flight will be dropped)."""
        if stream_id in self.streams:
            self._free(stream_id)
        self.successors.pop(stream_id, None)
        self.prompts.pop(stream_id, None)
        self.forwarded = {k for k in self.forwarded if k[0] != stream_id}

    def _free(self, stream_id: str, reason: str = "stream_ended") -> None:
        st = self.streams.pop(stream_id)
        nxt = self.successors.pop(stream_id, None)
        dropped = len(st.new) + sum(len(q) for q in st.returns.values()) + (len(nxt.new) if nxt else 0)
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

    def _may_run(self, st: _Stream) -> bool:
        """Whether a stream's items may enter the next micro-step (always, unless lockstep holds its returns until
        its next chunk: see ``lockstep``; a stream that is preparing, draining or cut runs its returns freely)."""
        if not (self.lockstep or self.cache_mode == "self_forcing"):
            return True
        if not st.prepared or st.draining or st.stream_id in self.successors:
            return True
        if st.in_flight:
            return False
        return bool(st.new) or any(q and _is_clean(q[0].meta) for q in st.returns.values())

    def drain(self, stream_id: str) -> None:
        """The stream's input has ended: its chunks in flight may finish without new chunks (lockstep)."""
        st = self.streams.get(stream_id)
        if st is not None:
            st.draining = True

    def _refuse_item(self, meta: RingItem, now: float) -> str:
        """Why a queued item must not enter the next micro-step (empty: it may). A prepare chunk that has begun
        always completes: without it the stream has no caches; so does a replayed chunk (bounded by ingest's
        ring): without it the rebuilt caches would miss a frame the reference has."""
        if meta.step == 0 and meta.epoch < self._admit_from:
            return "stale_epoch"  # the block map changed while it was queued
        if meta.deadline <= now and not meta.replay and not (meta.latent_start == 0 and meta.step > 0) \
                and not _is_clean(meta):
            return "deadline"
        return ""

    def _take_first(self) -> MicroStep | None:
        now = self.clock()
        for sid, nxt in list(self.successors.items()):  # a cut's segment starts once the old one is gone
            if sid not in self.streams or self._left_ring(self.streams[sid], now):
                self.streams[sid] = nxt
                del self.successors[sid]
        candidates: list[tuple[_Stream, collections.deque[_Pending], _Pending]] = []
        for st in self.streams.values():
            if not self._may_run(st):
                continue
            versions = self.prompts.get(st.stream_id, {})
            heads: list[collections.deque[_Pending]] = [q for _, q in sorted(st.returns.items())]
            if st.prepared or not st.new or st.new[0].meta.latent_start == 0:
                heads.append(st.new)
            used_slots: set[int] = set()
            mine: list[tuple[_Stream, collections.deque[_Pending], _Pending]] = []
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
                if head.meta.prompt_version not in versions or head.meta.blend_from not in (None, *versions):
                    continue  # waits for its prompt embeddings; other streams go on
                used_slots.add(head.meta.slot)
                mine.append((st, q, head))
            clean = [c for c in mine if _is_clean(c[2].meta)]
            candidates.extend(clean or mine)  # a clean pass runs before anything later of its stream
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
            if meta.step < meta.steps - 1 or (meta.step == meta.steps - 1 and self.cache_mode == "self_forcing"):
                st.in_flight[(meta.seq, meta.step + 1)] = meta.deadline  # its next step, or its clean pass
            if _is_clean(meta):
                frame_start = meta.frame_start  # rewrites the frames its last step wrote
                if meta.latent_start == 0:
                    st.prepared = True
            elif meta.latent_start == 0:
                frame_start = 0
                st.slot_next[0] = meta.frames
                if meta.step == meta.steps - 1:
                    st.prepared = self.cache_mode != "self_forcing"  # chunk 1 may enter from the next micro-step on
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
    def compute(self, step: MicroStep | SwitchStep) -> StageOutput:
        """Run a micro-step through this stage's blocks; returns what goes on (link) and what finished."""
        if isinstance(step, SwitchStep):
            return self._switch_out(step)
        t0 = time.perf_counter()
        keep: list[int] = []
        slot_items: list[SlotItem] = []
        for row, meta in enumerate(step.items):
            state = self._state_for(meta, step.noisy)
            if state is None:
                continue
            keep.append(row)
            slot_items.append(SlotItem(state, meta.slot, meta.frame_start, meta.rope_start, self._timestep(meta),
                                       clean=_is_clean(meta)))
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
        y = self.forward(x, slot_items, grid, noisy if self.is_last else None, sigmas, timer)
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
            if _is_clean(meta):
                continue  # its K/V rewrite was the point; its x0 is not used
            st = self.streams.get(meta.stream_id)
            c = meta.seq - (st.segment_start if st is not None else 0)  # the chunk's index in its segment
            if meta.step == meta.steps - 1 and self.cache_mode == "self_forcing":
                eps = draw_noise(x0_k.shape, meta.seed, c, meta.steps, "context", x0_k.device)
                latents.append(self.scheduler.add_noise(x0_k, eps, self.context_noise))
                back.append(meta.model_copy(update={"step": meta.steps}))  # same slot and cache frames
            if meta.step == meta.steps - 1 and meta.replay:
                self.replayed += 1  # it rebuilt this stream's KV; its output was shown (or lost) before
                out.replayed += 1
                continue
            if meta.step == meta.steps - 1:
                out.finished.append(LatentChunk(**(meta.header() | {"timesteps": list(meta.timesteps)}),
                                                latent=x0_k[0].permute(1, 0, 2, 3).contiguous().cpu()))
                continue
            k = meta.step + 1
            eps = draw_noise(x0_k.shape, meta.seed, c, k, "renoise", x0_k.device)
            latents.append(self.scheduler.add_noise(x0_k, eps, meta.timesteps[k]))
            back.append(meta.model_copy(update={"step": k, "slot": 0 if meta.latent_start == 0 else k}))
        if back:
            out.link.append(RingReturn(epoch=self.epoch, items=back, latents=torch.cat(latents).contiguous()))

    def _timestep(self, meta: RingItem) -> float:
        return float(self.context_noise if _is_clean(meta) else meta.timesteps[meta.step])

    def _state_for(self, meta: RingItem, noisy: torch.Tensor) -> StreamDiTState | None:
        """The stream's state under the item's prompt version; None (counted) when the item cannot run here."""
        st = self.streams.get(meta.stream_id)
        if not self.is_first and meta.latent_start == 0 and meta.step == 0:  # a stream's or a segment's start
            if st is not None:
                self._free(meta.stream_id)
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
            self.model.set_prompt(view, emb, meta.prompt_version)
            views[key] = view
            for old in sorted(views, key=_view_order)[:-self._versions_kept(st)]:
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


def _view_order(key: int | tuple[int, int, float]) -> tuple[int, float]:
    """Older views first: by prompt version, then (mid-blend) by how far the blend has come."""
    return (key, 1.0) if isinstance(key, int) else (key[0], key[2])


def _signature(p: _Pending) -> tuple[int, int, int]:
    return (p.meta.frames, *p.latent.shape[-2:])


def _is_clean(meta: RingItem) -> bool:
    """A Self-Forcing clean pass: the finished chunk once more at ``context_noise``, rewriting its K/V."""
    return meta.step == meta.steps
