"""Online rebalancing without transport: StageWorkers switch block ranges at a micro-step boundary, moving KV shards
(ring state included) between stages, and the streams' outputs do not change (docs/rebalance.md)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dit_stage.micro_step import SwitchStep
from dit_stage.stage_model import slice_stage
from dit_stage.switching import EpochChange
from dit_stage.worker import StageWorker
from proto import (
    BlockMap,
    EpochSwitch,
    LatentChunk,
    RingReturn,
    ShardMove,
    ShardMoveEnd,
    StageAssignment,
    StageItems,
    StagePrompt,
    decode,
)
from services.rebalance import block_moves, offline_reason, stage_moves

from .helpers import CONFIG, as_chunk_latent, chunk_message, full_model, latents, prompt, reference

BLOCKS = 5
CHUNKS = 8
SWITCH_AFTER = 7  # first-stage micro-steps before the switch: prepare done, both streams mid-run

# (old split, new split): moves to the next stage, to the previous one, and two hops upstream
MOVES = {
    "down-2": ([(0, 3), (3, 5)], [(0, 1), (1, 5)]),
    "up-2": ([(0, 1), (1, 5)], [(0, 4), (4, 5)]),
    "down-3": ([(0, 2), (2, 4), (4, 5)], [(0, 1), (1, 2), (2, 5)]),
    "up-3": ([(0, 1), (1, 2), (2, 5)], [(0, 3), (3, 4), (4, 5)]),
}

MoveHook = Callable[[ShardMove], ShardMove]


# a third stage joins a two-stage ring: between the two, or after the last (which then loses the head)
JOINS = {
    "join-middle": ([(0, 3), (3, 5)], [("s0", (0, 2)), ("s2", (2, 3)), ("s1", (3, 5))]),
    "join-end": ([(0, 3), (3, 5)], [("s0", (0, 2)), ("s1", (2, 4)), ("s2", (4, 5))]),
}


def _map(split: list[tuple[int, int]] | list[tuple[str, tuple[int, int]]], epoch: int,
         reason: str = "rebalance") -> BlockMap:
    named = [x if isinstance(x[0], str) else (f"s{i}", x) for i, x in enumerate(split)]
    return BlockMap(epoch=epoch, num_blocks=BLOCKS, reason=reason, stages=[
        StageAssignment(stage_id=sid, block_start=a, block_end=b) for sid, (a, b) in named])


class Ring:
    """In-process stages by id; every message goes through encode → decode as on the wire."""

    def __init__(self, split: list[tuple[int, int]], **kw: object) -> None:
        self.full = full_model(BLOCKS)
        self.opts = {"window": CONFIG.kv_window, "sink": CONFIG.sink, "adaptive_threshold": CONFIG.adaptive_threshold,
                     "max_queued_chunks": 64} | kw
        self.ids = [f"s{i}" for i in range(len(split))]
        self.workers = [StageWorker(slice_stage(self.full, r), **self.opts) for r in split]
        self.next = {sid: (i + 1) % len(split) for i, sid in enumerate(self.ids)}
        self.next_after_switch = dict(self.next)
        self.finished: list[LatentChunk] = []
        self.first_steps = 0
        self.move_hook: MoveHook | None = None
        self.moved_bytes = 0
        self.move_parts = 0

    def switch(self, old: BlockMap, new: BlockMap) -> None:
        """What each stage service does on an online block map: prepare (weights of the new range), then the
        first stage goes once every stage is prepared."""
        new_ids = [s.stage_id for s in new.stages]
        for s in new.stages:
            sid, rng = s.stage_id, (s.block_start, s.block_end)
            if sid not in self.ids:  # joins: sees only the new map
                w = StageWorker(slice_stage(self.full, rng), **self.opts)
                w.epoch = old.epoch
                self.ids.append(sid)
                self.workers.append(w)
                w.prepare_switch(EpochChange(new.epoch, w.model, sid, joining=True))
                continue
            w = self.workers[self.ids.index(sid)]
            send, receive = stage_moves(old, new, sid)
            model = w.model if rng == w.model.block_range else slice_stage(self.full, rng)
            relink = new_ids[(new_ids.index(sid) + 1) % len(new_ids)] != self.ids[self.next[sid]]
            w.prepare_switch(EpochChange(new.epoch, model, sid, send, receive, relink=relink))
        self.next_after_switch = {sid: self.ids.index(new_ids[(i + 1) % len(new_ids)]) for i, sid in
                                  enumerate(new_ids)}
        for sid in new_ids:
            if sid not in self.next:
                self.next[sid] = self.next_after_switch[sid]
        self.workers[0].change.go = True

    def run(self, until: Callable[[], bool] | None = None, max_rounds: int = 20_000) -> None:
        """Round-robin over the stages until idle, or until ``until()`` holds (checked after every step, so the
        ring can stop with micro-steps in flight)."""
        for _ in range(max_rounds):
            progressed = False
            for i, w in enumerate(self.workers):
                if until is not None and until():
                    return
                step = w.take()
                if step is None:
                    continue
                progressed = True
                if i == 0 and step.items:
                    self.first_steps += 1
                out = w.compute(step)
                self.finished.extend(decode(c.encode(), LatentChunk) for c in out.finished)
                sid = self.ids[i]
                nxt = self.workers[self.next[sid]]
                if isinstance(step, SwitchStep):  # the marker goes on the old link; what follows on the new one
                    self.next[sid] = self.next_after_switch[sid]
                for msg in out.link:
                    wire = decode(msg.encode())
                    if isinstance(wire, StagePrompt):
                        nxt.add_prompt(wire.stream_id, wire.version, wire.embedding)
                    elif isinstance(wire, StageItems | EpochSwitch):
                        nxt.add_items(wire)
                    else:
                        assert isinstance(wire, RingReturn)
                        nxt.add_return(wire)
                for move in out.moves:
                    data = move.encode()
                    wire = decode(data)
                    assert isinstance(wire, ShardMove | ShardMoveEnd)
                    if isinstance(wire, ShardMove):
                        self.moved_bytes += len(data)
                        self.move_parts += 1
                        if self.move_hook is not None:
                            wire = self.move_hook(wire)
                    self.workers[self.ids.index(wire.target)].add_shard_move(wire)
            if not progressed:
                assert until is None, "ring went idle before the condition held"
                return
        raise AssertionError("ring did not go idle")


def _streams() -> dict[str, tuple[int, torch.Tensor, list[torch.Tensor]]]:
    return {"a": (11, prompt(1), latents(3, CHUNKS, (4, 6))), "b": (12, prompt(2), latents(4, CHUNKS, (4, 6)))}


def _run(old_split, new_split, *, switch: bool = True, hook: MoveHook | None = None, **kw) -> Ring:
    ring = Ring(old_split, **kw)
    ring.move_hook = hook
    first = ring.workers[0]
    for s, (_, ctx, _) in _streams().items():
        first.add_prompt(s, 0, ctx)
    for c in range(CHUNKS):  # interleaved, as they arrive
        for s, (seed, _, zs) in _streams().items():
            assert first.add_chunk(chunk_message(s, c, zs[c], seed=seed))
    if switch:
        ring.run(until=lambda: ring.first_steps >= SWITCH_AFTER)
        ring.switch(_map(old_split, 0), _map(new_split, 1))
    ring.run()
    return ring


def _outputs(ring: Ring) -> dict[str, list[LatentChunk]]:
    return {s: [g for g in ring.finished if g.stream_id == s] for s in _streams()}


def test_block_moves_between_maps():
    old, new = _map(MOVES["up-3"][0], 0), _map(MOVES["up-3"][1], 1)
    assert offline_reason(_map(JOINS["join-end"][0], 0), _map(JOINS["join-end"][1], 1, reason="join")) == ""
    assert "first" in offline_reason(old, _map([("s9", (0, 1)), ("s0", (1, 2)), ("s1", (2, 3)), ("s2", (3, 5))], 1))
    assert block_moves(old, new) == {("s1", "s0"): [1], ("s2", "s0"): [2], ("s2", "s1"): [3]}
    assert stage_moves(old, new, "s2") == ({"s0": [2], "s1": [3]}, {})
    assert stage_moves(old, new, "s0") == ({}, {"s1": [1], "s2": [2]})
    assert offline_reason(old, new) == ""
    assert "reason" in offline_reason(old, _map(MOVES["up-3"][1], 1, reason="failure"))
    assert "left" in offline_reason(old, _map([(0, 1), (1, 5)], 1))


@pytest.mark.parametrize("case", list(MOVES))
def test_online_rebalance_equals_the_reference_and_drops_nothing(case):
    old_split, new_split = MOVES[case]
    want = {s: reference({s: v}, num_blocks=BLOCKS)[s] for s, v in _streams().items()}
    ring = _run(old_split, new_split)
    assert [w.model.block_range for w in ring.workers] == new_split
    assert all(w.epoch == 1 and w.change is None for w in ring.workers)
    assert not any(sum(w.dropped.values()) for w in ring.workers), [dict(w.dropped) for w in ring.workers]
    assert ring.moved_bytes > 0
    for s, got in _outputs(ring).items():
        assert [g.seq for g in got] == list(range(CHUNKS))
        assert {g.epoch for g in got} == {0}  # items keep the epoch they entered with
        for w, g in zip(want[s], got, strict=False):
            torch.testing.assert_close(g.latent, as_chunk_latent(w), atol=1e-5, rtol=0, msg=lambda m, g=g: f"{g.seq}")
    for w, (a, b) in zip(ring.workers, new_split, strict=True):  # moved-out blocks are freed by the old owner
        assert all(st.shard_state.shard.blocks == list(range(a, b)) for st in w.streams.values())


def _frame_pos_forgotten(move: ShardMove) -> ShardMove:
    """The reference's defect (streamdiffusionv2.md §8.2): the new owner gets K/V and counters but not the ring's
    write/evict state — here, which frame each ring slot holds."""
    tensors = {k: torch.full_like(t, -1) if k.startswith("frame_pos.") else t for k, t in move.tensors.items()}
    return move.model_copy(update={"tensors": tensors})


@pytest.mark.parametrize("case", ["down-2", "up-3"])
def test_moved_shards_continue_bit_exactly_and_need_their_ring_state(case):
    """One item per micro-step, so grouping cannot differ: a rebalanced run equals an unmoved one bit for bit; the
    same run with the ring state left behind (the reference's defect) diverges (negative control). The moved run
    splits every stream's slice into many small ShardMoves."""
    old_split, new_split = MOVES[case]
    still = _outputs(_run(old_split, new_split, switch=False, max_batch_items=1))
    ring = _run(old_split, new_split, max_batch_items=1, move_frame_bytes=4096)
    moves = sum(len(v) for v in block_moves(_map(old_split, 0), _map(new_split, 1)).values())
    assert ring.move_parts > 2 * len(_streams()) * moves
    moved = _outputs(ring)
    stale = _outputs(_run(old_split, new_split, hook=_frame_pos_forgotten, max_batch_items=1))
    for s in still:
        assert [g.seq for g in moved[s]] == [g.seq for g in still[s]] == list(range(CHUNKS))
        for a, b in zip(still[s], moved[s], strict=True):
            assert torch.equal(a.latent, b.latent), (s, a.seq, (a.latent - b.latent).abs().max())
    worst = max((a.latent - b.latent).abs().max().item() for s in still for a, b in zip(still[s], stale[s],
                                                                                          strict=False))
    assert worst > 1e-3


def test_ring_counters_must_match_or_the_move_is_refused():
    """A slice whose frame counters differ from the new owner's (a move at the wrong point) is an error, not a
    silently misaligned ring."""
    old_split, new_split = MOVES["down-2"]

    def shifted(move: ShardMove) -> ShardMove:
        layout = move.layout.model_copy(update={"frames_end": [n + 1 for n in move.layout.frames_end]})
        return move.model_copy(update={"layout": layout})

    with pytest.raises(ValueError, match="frames_end"):
        _run(old_split, new_split, hook=shifted)


@pytest.mark.parametrize("case", list(JOINS))
def test_a_stage_joins_online_and_nothing_changes(case):
    """A third stage joins a running ring: it gets its blocks' KV (and prompt state) from the old owners, the ring
    re-links at the marker, and every chunk comes out equal to the reference."""
    old_split, new_map = JOINS[case]
    want = {s: reference({s: v}, num_blocks=BLOCKS)[s] for s, v in _streams().items()}
    ring = Ring(old_split)
    first = ring.workers[0]
    for s, (_, ctx, _) in _streams().items():
        first.add_prompt(s, 0, ctx)
    for c in range(CHUNKS):
        for s, (seed, _, zs) in _streams().items():
            assert first.add_chunk(chunk_message(s, c, zs[c], seed=seed))
    ring.run(until=lambda: ring.first_steps >= SWITCH_AFTER)
    ring.switch(_map(old_split, 0), _map(new_map, 1, reason="join"))
    ring.run()
    assert [ring.workers[ring.ids.index(sid)].model.block_range for sid, _ in new_map] == [r for _, r in new_map]
    assert all(w.epoch == 1 and w.change is None for w in ring.workers)
    assert not any(sum(w.dropped.values()) for w in ring.workers), [dict(w.dropped) for w in ring.workers]
    joined = ring.workers[ring.ids.index("s2")]
    assert set(joined.streams) == set(_streams()) and all(st.views for st in joined.streams.values())
    for s, got in _outputs(ring).items():
        assert [g.seq for g in got] == list(range(CHUNKS))
        for w, g in zip(want[s], got, strict=False):
            torch.testing.assert_close(g.latent, as_chunk_latent(w), atol=1e-5, rtol=0, msg=lambda m, g=g: f"{g.seq}")


def test_every_micro_step_times_each_owned_block():
    """Per-block telemetry (the controller's balancing input): one time per owned block, the rest as extra; the
    parts add up to the forward."""
    ring = Ring([(0, 2), (2, 5)])
    first = ring.workers[0]
    first.add_prompt("a", 0, prompt(1))
    first.add_chunk(chunk_message("a", 0, latents(3, 1, (4, 6))[0], seed=1))
    for w, blocks in zip(ring.workers, ([0, 1], [2, 3, 4]), strict=True):
        step = w.take()
        out = w.compute(step)
        assert out.times is not None and sorted(out.times.blocks) == blocks
        assert all(t > 0 for t in out.times.blocks.values()) and out.times.extra > 0
        assert out.times.total <= out.compute_s
        if not w.is_last:
            ring.workers[1].add_prompt("a", 0, prompt(1))
            ring.workers[1].add_items(next(m for m in out.link if isinstance(m, StageItems)))
