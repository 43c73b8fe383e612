"""The first stage's half of the ring, mixed into ``StageWorker``: admitting chunks and returns, and forming
micro-steps (docs/dit-ring.md).

Every drop decision is taken here, before an item enters a micro-step (stale epoch, deadline, queue cap, out of
order, malformed), so every stage processes exactly the items the first stage admitted, in its order. The cache
frame an item writes is counted here per (stream, slot), so a dropped chunk leaves no gap in any slot's ring.
Lockstep streams (the single-process engine; Self-Forcing) run one wave per new chunk. The methods here use the
worker's state (``streams``, ``successors``, ``prompts``, ``dropped``, ``clock``, ``model``).
"""

from __future__ import annotations

import collections
import logging

import torch

from dit_stage.batcher import Candidate, select
from dit_stage.micro_step import MicroStep
from dit_stage.stage_stream import Pending, StageStream, is_clean, signature, step_signature
from proto import LatentChunk, RingItem, RingReturn
from proto.clock import segment_seed
from proto.spec import MAX_STEPS
from wan.scheduler import draw_noise

__all__ = ["PREPARE_LOST_GRACE_S", "TAKEN_KEPT", "FirstStage"]

PREPARE_LOST_GRACE_S = 10.0
"""A prepare item awaited this long past its deadline is lost, not slow: the stream is dropped (and re-prepared)."""

TAKEN_KEPT = 4096
"""Items whose take time the first stage keeps to measure their ring round trip (the oldest forgotten first)."""

log = logging.getLogger("rheo.dit_stage.worker")


class FirstStage:
    """The first stage's admission and micro-step forming (a mixin of ``StageWorker``)."""

    def add_chunk(self, chunk: LatentChunk) -> bool:
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
        if chunk.seq == 0 or st is None or _replayed_prepare(chunk, st):
            # a stream's start, or its segment's prepare chunk replayed after a failure
            if st is not None:
                self._free(chunk.stream_id, reason="stale_epoch")
            st = self._new_stream(chunk.stream_id, len(chunk.timesteps), (h, w), self.epoch)
            st.segment, st.segment_start, st.seed = chunk.segment, chunk.seq, segment_seed(chunk.seed, chunk.segment)
        st = self._segment_for(st, chunk)
        st.seed = segment_seed(chunk.seed, chunk.segment)  # a live seed change: its noise from this chunk on
        st.last_seq = chunk.seq
        st.draining = False
        meta = RingItem(**(chunk.header() | {"epoch": self.epoch, "timesteps": list(chunk.timesteps)}), step=0,
                        slot=0, steps=st.steps, frame_start=0, frames=f)
        z = chunk.latent.permute(1, 0, 2, 3).unsqueeze(0)  # [F, C, H, W] → [1, C, F, H, W]
        eps = draw_noise((1, c, f, h, w), st.seed, chunk.seq - st.segment_start, 0, "input", self.model.device)
        ns = chunk.noise_scale
        x = ns * eps + (1 - ns) * z.to(device=self.model.device, dtype=torch.float32)
        st.new.append(Pending(meta, x, now))
        # the cap bounds live chunks; replayed ones are bounded by ingest's ring and must all run, or the
        # caches they rebuild would have a hole; so must a segment's prepare chunk (latent positions from 0): the
        # rest of its segment cannot run without it (a burst after a bus stall dropped it, and the stream with it)
        live = [p for p in st.new if not p.meta.replay and p.meta.latent_start != 0]
        for old in live[: max(0, len(live) - self.max_queued_chunks)]:
            st.new.remove(old)
            self.dropped["queue_full"] += 1
            log.info("chunk %s/%d dropped: stream queue full", old.meta.stream_id, old.meta.seq)
        return True

    def _segment_for(self, st: StageStream, chunk: LatentChunk) -> StageStream:
        """The stream state an admitted chunk belongs to: the current segment's, or (after a `cut`) the next
        segment's, begun by its prepare chunk and kept aside until the current one has left the ring."""
        nxt = self.successors.get(chunk.stream_id)
        if chunk.segment == st.segment or (nxt is not None and chunk.segment == nxt.segment):
            return st if chunk.segment == st.segment else nxt  # type: ignore[return-value]
        if nxt is not None:  # a second cut before the first one's segment ran: that segment is skipped
            self.dropped["segment_superseded"] += len(nxt.new)
        steps = len(chunk.timesteps)  # a segment may change the step count (ingest starts one to do so)
        nxt = StageStream(chunk.stream_id, steps, st.latent_hw, self.model.new_state(
            chunk.stream_id, steps, st.latent_hw, self.window, self.sink, self.adaptive_threshold, pool=self.storage),
            slot_next=[0] * steps, segment=chunk.segment, segment_start=chunk.seq,
            seed=segment_seed(chunk.seed, chunk.segment))
        self.successors[chunk.stream_id] = nxt
        return nxt

    def _left_ring(self, st: StageStream, now: float) -> bool:
        """Every item of the stream's segment has left the first stage for good (returns lost past their
        deadline are given up)."""
        if st.new or any(st.returns.values()):
            return False
        self._give_up_lost(st, now)
        return not st.in_flight

    def _give_up_lost(self, st: StageStream, now: float) -> None:
        """Returns still awaited past their deadline are lost in the ring (a dropped link frame, a stage that
        restarted): forget them, counted, so nothing waits for them for ever."""
        for key, deadline in list(st.in_flight.items()):
            if deadline <= now:
                del st.in_flight[key]
                self.dropped["lost_in_ring"] += 1

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
        if not lat.is_floating_point() or not 1 <= len(chunk.timesteps) <= MAX_STEPS:
            return "bad_shape"
        if chunk.rope_start + lat.shape[0] > cfg.rope_max_seq_len:
            return "bad_shape"
        st = self.streams.get(chunk.stream_id)
        if chunk.seq == 0 or (st is None and chunk.latent_start == 0) or _replayed_prepare(chunk, st):
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
            taken = self._taken.pop((meta.stream_id, meta.seq, meta.step), None)
            if taken is not None:
                self.latency.observe_round_trip((meta.frames, *ret.latents.shape[-2:]), taken[1], now - taken[0])
            if meta.segment != st.segment:
                self.dropped["stale_segment"] += 1
                continue
            latent = ret.latents[row : row + 1].to(self.model.device, copy=True)
            q = st.returns.setdefault(meta.slot, collections.deque())
            q.append(Pending(meta, latent, now))
            if len(q) > 1 and (q[-2].meta.seq, q[-2].meta.step) > (meta.seq, meta.step):
                # two last stages around a join: their returns may cross; a slot runs its chunks in order
                st.returns[meta.slot] = collections.deque(sorted(q, key=lambda p: (p.meta.seq, p.meta.step)))

    def _may_run(self, st: StageStream, now: float) -> bool:
        """Whether a stream's items may enter the next micro-step (always, unless lockstep holds its returns until
        its next chunk: see ``lockstep``; a stream that is preparing, draining or cut runs its returns freely). A
        lockstep wave waits for the previous one's returns only until their deadline: a lost one never freezes it."""
        if not (self.lockstep or self.cache_mode == "self_forcing"):
            return True
        if not st.prepared or st.draining or st.stream_id in self.successors:
            return True
        self._give_up_lost(st, now)
        if st.in_flight:
            return False
        return bool(st.new) or any(q and is_clean(q[0].meta) for q in st.returns.values())

    def drain(self, stream_id: str) -> None:
        """The stream's input has ended: its chunks in flight may finish without new chunks (lockstep)."""
        st = self.streams.get(stream_id)
        if st is not None:
            st.draining = True

    def _refuse_item(self, meta: RingItem, now: float) -> str:
        """Why a queued item must not enter the next micro-step (empty: it may). A prepare chunk always
        completes: without it the stream has no caches; so does a replayed chunk (bounded by ingest's
        ring): without it the rebuilt caches would miss a frame the reference has."""
        if meta.step == 0 and meta.epoch < self._admit_from:
            return "stale_epoch"  # the block map changed while it was queued
        if meta.deadline <= now and not _deadline_exempt(meta):
            return "deadline"
        return ""

    def _prepare_lost(self, st: StageStream, now: float) -> bool:
        """An unprepared stream none of whose prepare items is queued here or still awaited (the last one lost in
        the ring past its deadline and a grace: a link frame dropped, a stage restarted without a failure epoch).
        It would never be prepared: its chunks would wait behind nothing and overflow its queue for ever."""
        if st.prepared or st.stream_id in self.successors or any(st.returns.values()):
            return False
        if st.new and st.new[0].meta.latent_start == 0:
            return False  # the prepare chunk has not started yet
        return all(deadline + PREPARE_LOST_GRACE_S <= now for deadline in st.in_flight.values())

    def _take_first(self) -> MicroStep | None:
        now = self.clock()
        for sid in [sid for sid, st in self.streams.items() if self._prepare_lost(st, now)]:
            # dropped: its later chunks are refused `unprepared`, which asks ingest for a new segment (docs/recovery.md)
            self.dropped["prepare_lost"] += 1
            self._free(sid, reason="unprepared")
            log.warning("stream %s: its prepare chunk was lost in the ring; state dropped until a new segment", sid)
        for sid, nxt in list(self.successors.items()):  # a cut's segment starts once the old one is gone
            if sid not in self.streams or self._left_ring(self.streams[sid], now):
                old = self.streams.get(sid)
                self.streams[sid] = nxt
                del self.successors[sid]
                if old is not None:
                    self._retire(old)  # between forwards: it has left the ring
        candidates: list[tuple[StageStream, collections.deque[Pending], Pending]] = []
        for st in self.streams.values():
            if not self._may_run(st, now):
                continue
            versions = self.prompts.get(st.stream_id, {})
            heads: list[collections.deque[Pending]] = [q for _, q in sorted(st.returns.items())]
            if st.prepared or not st.new or st.new[0].meta.latent_start == 0:
                heads.append(st.new)
            used_slots: set[int] = set()
            mine: list[tuple[StageStream, collections.deque[Pending], Pending]] = []
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
            clean = [c for c in mine if is_clean(c[2].meta)]
            candidates.extend(clean or mine)  # a clean pass runs before anything later of its stream
        if not candidates:
            return None
        # one grid per forward; which items and how many: the batcher's policy (docs/scheduling.md)
        self.latency.ring_scale = self.model.config.num_layers / len(self.model.block_ids)
        sel = select(self.batcher, [self._candidate(c[2]) for c in candidates], self.latency, now,
                     self.max_batch_items)
        for i in sel.infeasible:  # dropped before it costs compute
            st, q, head = candidates[i]
            q.popleft()
            self.dropped["deadline_infeasible"] += 1
            log.info("item %s/%d step %d dropped: deadline_infeasible", head.meta.stream_id, head.meta.seq,
                     head.meta.step)
        if not sel.take:
            return None
        chosen = [candidates[i] for i in sel.take]
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
                self._taken[(meta.stream_id, meta.seq, meta.step + 1)] = (now, len(chosen))  # its round trip
            if is_clean(meta):
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
        while len(self._taken) > TAKEN_KEPT:  # returns lost in the ring are never popped
            del self._taken[next(iter(self._taken))]
        x = torch.cat(xs)
        return MicroStep(self.epoch, items, x, x, wait / len(items))

    def _candidate(self, p: Pending) -> Candidate:
        """An item as the batcher sees it: its ring traversals left count its Self-Forcing clean pass."""
        m = p.meta
        return Candidate(signature(p), m.deadline, m.steps - m.step + (self.cache_mode == "self_forcing"),
                         (m.capture_time, m.seq, -m.step), _deadline_exempt(m))

    def measured(self, step: MicroStep, seconds: float, warmup: bool = False) -> None:
        """A micro-step took ``seconds`` here: the latency model learns from it (the first stage's selects
        micro-steps; every stage's fit goes into its StageStats, which the controller prices its ring with). Not
        from a ``warmup`` step (a CUDA-graph capture, seconds long): it would price every later step as infeasible,
        and items dropped as infeasible never bring the measurements that would correct it."""
        if step.items and not warmup:
            self.latency.observe(step_signature(step), len(step.items), seconds)


def _deadline_exempt(meta: RingItem) -> bool:
    """An item that runs however late: a segment's prepare chunk (without it every later chunk of the segment is
    refused until ingest starts a new one, seconds later: losing one late chunk costs less), a replay, a clean pass
    (``_refuse_item``)."""
    return meta.replay or meta.latent_start == 0 or is_clean(meta)


def _replayed_prepare(chunk: LatentChunk, st: StageStream | None) -> bool:
    """A replayed prepare chunk of an epoch newer than the stream's state: it rebuilds the stream from scratch,
    whether or not the failure epoch's recovery has dropped the old state yet (a later segment's prepare chunk
    has a seq the old state has passed, and must not be refused as out of order)."""
    return st is not None and chunk.replay and chunk.latent_start == 0 and st.epoch < chunk.epoch
