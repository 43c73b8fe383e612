"""The online epoch switch of a stage (docs/rebalance.md), mixed into ``StageWorker``.

At a rebalance the first stage puts an ``EpochSwitch`` marker between two micro-steps; every stage runs the
micro-steps before it under the old block map and those after it under the new one, ships the blocks it loses
(``ShardMove``, ring state included) when it reads the marker, and runs nothing of the new epoch before the blocks
it gains have arrived. The methods here use the worker's state (``streams``, ``incoming``, ``model``, ``change``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dit_stage.micro_step import StageOutput, SwitchStep
from dit_stage.stage_stream import StageStream, kv_tensors, merge_kv, stream_from_layout
from proto import EpochSwitch, ShardLayout, ShardMove, ShardMoveEnd

if TYPE_CHECKING:
    from dit_stage.model import CausalWanDiT

__all__ = ["EpochChange", "EpochSwitching"]

log = logging.getLogger("rheo.dit_stage.worker")


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


class EpochSwitching:
    """The switch half of ``StageWorker`` (a mixin: it reads and writes the worker's fields)."""

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
            self.storage.clear()  # shards of the old block range
            self._retiring.clear()
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
        self.storage.clear()  # shards of the old block range (no forward in flight: nothing retiring is in use)
        self._retiring.clear()
        self._epoch = change.epoch  # items that entered under the previous epoch stay valid: their KV moves along
        change.switched = True
        if not was_last:  # on the old link: the old successor's last micro-step of the old epoch comes before it
            out.link.append(EpochSwitch(epoch=change.epoch, previous=previous))
        return out

    def _export(self, st: StageStream, change: EpochChange, target: str, blocks: list[int]) -> list[ShardMove]:
        """A stream's state for ``blocks`` (freed here), in parts of at most ``move_frame_bytes`` (one tensor per
        part when a tensor alone is larger)."""
        moved = st.shard_state.split_blocks(blocks)
        tensors = kv_tensors(moved.shard, st.views, blocks, take=True)
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
        self.streams[stream_id] = stream_from_layout(
            stream_id, first.layout.model_dump(), (first.latent_h, first.latent_w), first.segment,
            first.segment_start, [k for p in parts for k in p.tensors], self.model.device)

    def _import(self, st: StageStream, parts: list[ShardMove]) -> None:
        dev = self.model.device
        move = parts[0]
        if any(p.blocks != move.blocks or p.layout != move.layout for p in parts):
            raise ValueError(f"stream {st.stream_id}: the parts of a shard move disagree on blocks or layout")
        tensors = {k: t for p in parts for k, t in p.tensors.items()}
        self._rebuild_views(st, merge_kv(st, list(move.blocks), move.layout.model_dump(), tensors, dev))

    def _rebuild_views(self, st: StageStream, versions: list[int]) -> None:
        """Prompt views whose cross K/V did not arrive with moved KV: recomputed from the embedding when this stage
        has it, else dropped (rebuilt when an item of that version comes, or counted as no_prompt)."""
        for version in versions:
            emb = self.prompts.get(st.stream_id, {}).get(version)
            if emb is None:
                del st.views[version]
            else:
                self.model.set_prompt(st.views[version], emb, version)
