"""The transport-free ring: N StageWorkers equal the single-process StreamBatchRunner."""

from __future__ import annotations

import pytest
import torch

from oracle.stream_batch import StreamBatchRunner
from proto.clock import segment_seed

from .helpers import (
    CONFIG,
    NOISE_SCALE,
    as_chunk_latent,
    chunk_message,
    full_model,
    latents,
    prompt,
    reference,
    run_ring,
    workers,
)

CHUNKS = 9


def test_stage_weights_are_the_tiny_models_blocks():
    """A stage's blocks are exactly blocks [a, b) of the one tiny model the pipeline also uses."""
    from dit_stage.model import make_tiny_dit
    from dit_stage.stage_model import slice_stage

    want = make_tiny_dit(0, 4).state_dict()
    stage = slice_stage(make_tiny_dit(0, 4), (1, 3)).state_dict()
    assert {k.split(".")[1] for k in stage if k.startswith("blocks.")} == {"1", "2"}
    assert all(torch.equal(t, want[k]) for k, t in stage.items())
    assert not torch.equal(make_tiny_dit(1, 4).state_dict()["blocks.1.ffn.0.weight"], want["blocks.1.ffn.0.weight"])


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_ring_equals_stream_batch_runner(stages):
    zs = latents(3, CHUNKS, (4, 6))
    want = reference({"a": (11, prompt(1), zs)})["a"]
    ring = workers(stages)
    ring[0].add_prompt("a", 0, prompt(1))
    for c, z in enumerate(zs):
        assert ring[0].add_chunk(chunk_message("a", c, z, seed=11))
    got = run_ring(ring)
    # the ring finishes every chunk; the runner's last B−1 are still in its slots (no flush)
    assert [g.seq for g in got] == list(range(CHUNKS))
    assert len(want) == CHUNKS - CONFIG.steps + 1
    for w, g in zip(want, got, strict=False):
        assert torch.equal(as_chunk_latent(w), g.latent), (g.seq, (as_chunk_latent(w) - g.latent).abs().max())


def test_two_streams_with_different_prompts_and_sizes_equal_each_alone():
    """Different grids never share a micro-step, same-grid streams do; neither changes a stream's output."""
    streams = {
        "small": (5, prompt(5), latents(5, 6, (4, 6))),
        "large": (6, prompt(6), latents(6, 6, (6, 8))),
        "twin": (7, prompt(7), latents(7, 6, (4, 6))),  # same grid as "small": shares its micro-steps
    }
    want = {s: reference({s: v})[s] for s, v in streams.items()}
    ring = workers(2)
    for s, (_, ctx, _) in streams.items():
        ring[0].add_prompt(s, 0, ctx)
    for c in range(6):  # interleaved, as they would arrive
        for s, (seed, _, zs) in streams.items():
            assert ring[0].add_chunk(chunk_message(s, c, zs[c], seed=seed))
    got = run_ring(ring)
    for s in streams:
        mine = [g for g in got if g.stream_id == s]
        assert [g.seq for g in mine] == list(range(6))
        for w, g in zip(want[s], mine, strict=False):
            torch.testing.assert_close(g.latent, as_chunk_latent(w), atol=1e-5, rtol=0)


def test_stale_epoch_late_and_overflowing_chunks_are_dropped_and_counted():
    zs = latents(3, 6, (4, 6))
    ring = workers(1, max_queued_chunks=2)
    w = ring[0]
    w.epoch = 3
    w.add_prompt("a", 0, prompt(1))
    assert not w.add_chunk(chunk_message("a", 0, zs[0], epoch=2, seed=1))
    assert w.dropped["stale_epoch"] == 1
    assert not w.add_chunk(chunk_message("a", 0, zs[0], epoch=3, deadline=0.0, seed=1))
    assert w.dropped["deadline"] == 1
    assert not w.add_chunk(chunk_message("a", 1, zs[1], epoch=3, seed=1))
    assert w.dropped["unprepared"] == 1
    assert w.add_chunk(chunk_message("a", 0, zs[0], epoch=3, seed=1))
    for c in (1, 2, 3):
        assert w.add_chunk(chunk_message("a", c, zs[c], epoch=3, seed=1))
    assert w.dropped["queue_full"] == 1  # cap 2: chunk 1 made room for 3; the prepare chunk 0 is never dropped
    assert [p.meta.seq for p in w.streams["a"].new] == [0, 2, 3]
    assert not w.add_chunk(chunk_message("a", 3, zs[3], epoch=3, seed=1))
    assert w.dropped["out_of_order"] == 1
    bad = chunk_message("a", 4, zs[4], epoch=3, seed=1)
    bad.latent = torch.zeros(1, 3, 4, 6)
    assert not w.add_chunk(bad)
    assert w.dropped["bad_shape"] == 1
    assert not w.add_prompt("a", 1, torch.zeros(12, 31))
    assert w.dropped["bad_prompt"] == 1


def test_dropped_chunks_leave_no_gap_in_any_slot():
    """A chunk dropped at admission (deadline) must not break the later chunks' cache writes on any stage."""
    zs = latents(4, 8, (4, 6))
    ring = workers(2)
    ring[0].add_prompt("a", 0, prompt(2))
    for c, z in enumerate(zs):
        late = c == 4
        ring[0].add_chunk(chunk_message("a", c, z, seed=2))
        if late:  # expires while queued
            ring[0].streams["a"].new[-1].meta.deadline = 0.0
    got = run_ring(ring)
    assert ring[0].dropped["deadline"] == 1
    assert [g.seq for g in got] == [0, 1, 2, 3, 5, 6, 7]
    assert all(torch.isfinite(g.latent).all() for g in got)
    assert not any(w.dropped["compute_error"] for w in ring)


def test_micro_step_cap_and_grouping_do_not_change_results():
    """max_batch_items=1: every item runs alone (the runner batches a stream's slots): equal to fp tolerance."""
    zs = latents(3, 6, (4, 6))
    want = reference({"a": (11, prompt(1), zs)})["a"]
    ring = workers(2, max_batch_items=1)
    ring[0].add_prompt("a", 0, prompt(1))
    for c, z in enumerate(zs):
        ring[0].add_chunk(chunk_message("a", c, z, seed=11))
    sizes = []
    take = ring[1].take

    def spy():
        step = take()
        if step is not None:
            sizes.append(len(step.items))
        return step

    ring[1].take = spy
    got = run_ring(ring)
    assert sizes and set(sizes) == {1}
    assert [g.seq for g in got] == list(range(6))
    for w, g in zip(want, got, strict=False):
        torch.testing.assert_close(g.latent, as_chunk_latent(w), atol=1e-5, rtol=0)


def test_queued_chunks_of_an_old_epoch_are_dropped_when_the_map_changes():
    zs = latents(3, 4, (4, 6))
    ring = workers(1)
    w = ring[0]
    w.add_prompt("a", 0, prompt(1))
    for c, z in enumerate(zs):
        assert w.add_chunk(chunk_message("a", c, z, seed=1))
    first = w.take()
    assert first is not None and [(m.seq, m.step) for m in first.items] == [(0, 0)]
    w.epoch = 1  # the block map moved on while chunks 1..3 wait
    for msg in w.compute(first).link:  # one stage: its ring return comes back to itself
        w.add_return(msg)
    got = run_ring(ring)
    assert [g.seq for g in got] == [0] and got[0].epoch == 0  # the begun prepare completes under its epoch
    assert w.dropped["stale_epoch"] == 3


def _segment_reference(seed: int, segments: list[tuple[list[torch.Tensor], list[tuple[int, torch.Tensor]]]],
                       segment_seeds: list[int]) -> list[torch.Tensor]:
    """StreamBatchRunner through segments (a `cut` between them, as StreamPipeline does it: a stand-in chunk
    pushes the last one out, then a fresh stream state with the segment's seed). Per segment: its latents and
    its prompt changes as (chunk index, embedding), the first at 0."""
    runner = StreamBatchRunner([full_model()], CONFIG)
    out: list[torch.Tensor] = []
    for (zs, prompts), segment_seed_ in zip(segments, segment_seeds, strict=True):
        changes = dict(prompts)
        runner.open_stream("a", segment_seed_, changes.pop(0)[None], tuple(zs[0].shape[-2:]))
        out.append(runner.prepare("a", zs[0], NOISE_SCALE))
        for c, z in enumerate(zs[1:], start=1):
            if c in changes:
                runner.set_prompt("a", changes[c][None], c)
            x0 = runner.step({"a": (z, NOISE_SCALE)})["a"]
            if x0 is not None:
                out.append(x0)
        out.append(runner.step({"a": (zs[-1], NOISE_SCALE)})["a"])  # drain: a stand-in pushes the last one out
    return out


@pytest.mark.parametrize("stages", [1, 3])
def test_prompt_switch_and_cut_equal_stream_batch_runner(stages):
    """Chunks 3, 4 switch to prompt 1 (chunk 2, in flight, keeps prompt 0 for its last step), then a `cut`:
    chunks 5.. are segment 1 — a prepare chunk at seq 5 with latent/RoPE positions from 0, the segment's seed,
    prompt 2. All of it is queued at once, so segment 1 must wait for segment 0 to leave the ring. The ring
    equals the runner doing the same; with the stream seed instead of the segment's, segment 1 differs."""
    seed, cut, hw = 11, 5, (4, 6)
    zs0, zs1 = latents(3, cut, hw), latents(4, 4, hw)
    p = [prompt(1), prompt(2), prompt(3)]
    want = _segment_reference(seed, [(zs0, [(0, p[0]), (3, p[1])]), (zs1, [(0, p[2])])],
                              [seed, segment_seed(seed, 1)])
    wrong = _segment_reference(seed, [(zs0, [(0, p[0]), (3, p[1])]), (zs1, [(0, p[2])])], [seed, seed])
    # everything is queued at once, so three prompt versions are live together (a stage keeps steps + 1)
    ring = workers(stages)
    for version, emb in enumerate(p):
        ring[0].add_prompt("a", version, emb)
    for c, z in enumerate(zs0):
        assert ring[0].add_chunk(chunk_message("a", c, z, prompt_version=0 if c < 3 else 1, seed=seed))
    for j, z in enumerate(zs1):
        msg = chunk_message("a", j, z, prompt_version=2, seed=seed).model_copy(update={"seq": cut + j, "segment": 1})
        assert ring[0].add_chunk(msg)
    got = run_ring(ring)
    assert [(g.seq, g.segment) for g in got] == [(c, 0) for c in range(cut)] + [(cut + j, 1) for j in range(4)]
    assert len(want) == len(got)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g.latent, as_chunk_latent(w), atol=1e-5, rtol=0)
    assert all((as_chunk_latent(w) - g.latent).abs().max() > 1e-3 for w, g in zip(wrong[cut:], got[cut:], strict=True))
    assert not ring[0].successors and ring[0].streams["a"].segment == 1


def test_a_replayed_prepare_chunk_rebuilds_a_later_segment_before_recovery_ran():
    """The failure epoch's replay may reach the first stage before its recovery has dropped the old state (the
    micro-step loop applies it between forwards). A later segment's prepare chunk has a seq that state has passed:
    it must rebuild the stream, not be refused as out of order (the stream would never be prepared again)."""
    zs = latents(3, 4, (4, 6))
    ring = workers(1)
    w = ring[0]
    w.epoch = 1
    w.add_prompt("a", 0, prompt(1))

    def seg1(c: int, **kw) -> object:  # the segment a `cut` began at seq 5
        return chunk_message("a", c, zs[c], seed=1).model_copy(update={"seq": 5 + c, "segment": 1} | kw)

    for c in range(3):
        assert w.add_chunk(seg1(c, epoch=1))
    assert w.streams["a"].last_seq == 7
    w.epoch = 2  # the failure map's hard switch; no recover() yet
    for c in range(3):
        assert w.add_chunk(seg1(c, epoch=2, replay=True)), w.dropped
    assert w.add_chunk(seg1(3, epoch=2))  # the first live chunk after the replay
    assert w.dropped["out_of_order"] == 0 and w.dropped["stale_epoch"] == 3  # the old state's queued chunks
    st = w.streams["a"]
    assert (st.epoch, st.segment, st.segment_start) == (2, 1, 5)
    got = run_ring(ring)
    assert [(g.seq, g.epoch) for g in got] == [(8, 2)]  # replayed chunks rebuild the cache, only live ones show
