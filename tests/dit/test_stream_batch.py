"""Block-range split, stream-batch and multi-stream equivalence, and moving per-stream state."""

from __future__ import annotations

import pytest
import torch

from dit_stage.kv_cache import KVCacheShard
from dit_stage.model import CausalWanDiT
from dit_stage.state import SlotItem, StreamDiTState
from oracle.stream_batch import StreamBatchConfig, StreamBatchRunner

from .helpers import LATENT_HW, context, random_model, split_models

CHUNKS = 9


def _chunks(seed: int, n: int = CHUNKS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(1, 4, 2, *LATENT_HW, generator=g)
    return [first] + [torch.randn(1, 4, 1, *LATENT_HW, generator=g) for _ in range(n - 1)]


def _config(**kw) -> StreamBatchConfig:
    # a high adaptive threshold makes sink replacements frequent and different per block and slot
    base = {"steps": 2, "kv_window": 5, "sink": 2, "adaptive_threshold": 0.97, "t_refresh": 6}
    return StreamBatchConfig(**(base | kw))


def _run(runner: StreamBatchRunner, streams: dict[str, int], upto: int, start: int = 0) -> dict[str, list]:
    """Prepare (if start == 0) and step every stream through chunks [start, upto); returns outputs."""
    out: dict[str, list] = {s: [] for s in streams}
    if start == 0:
        for s, seed in streams.items():
            if s not in runner.slots:
                runner.open_stream(s, seed, context(seed, torch.float32), LATENT_HW)
            out[s].append(runner.prepare(s, _chunks(seed)[0]))
        start = 1
    for c in range(start, upto):
        res = runner.step({s: _chunks(seed)[c] for s, seed in streams.items()})
        for s in streams:
            out[s].append(res[s])
    return out


@pytest.fixture(scope="module")
def full32() -> CausalWanDiT:
    return random_model(dtype=torch.float32, seed=5)


@pytest.fixture(scope="module")
def full64() -> CausalWanDiT:
    return random_model(dtype=torch.float64, seed=5)


def _same(a: list, b: list, exact: bool = True) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            assert x is None and y is None
        elif exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mode", ["sdv2", "self_forcing"])
def test_split_equals_monolithic_bit_exactly(full32, mode):
    cfg = _config(cache_mode=mode)
    want = _run(StreamBatchRunner([full32], cfg), {"a": 11}, CHUNKS)["a"]
    assert sum(x is not None for x in want) == CHUNKS - 1  # B−1 warm-up forwards yield nothing
    for cuts in ([1], [2], [1, 2]):
        got = _run(StreamBatchRunner(split_models(full32, cuts), cfg), {"a": 11}, CHUNKS)["a"]
        _same(want, got, exact=True)


def test_b_slot_forward_equals_b_single_slot_forwards(full64):
    """One forward over slots [0, 1, 2] equals three one-slot forwards from the same cache state."""
    model = full64
    state = model.new_state("s", 3, LATENT_HW, window=4, sink=1, adaptive_threshold=0.3)
    model.set_prompt(state, context(3))
    grid = model.grid_of(1, *LATENT_HW)
    g = torch.Generator().manual_seed(0)
    for frame in range(6):  # fill and wrap every slot's ring, slots lagging like a stream-batch
        items = [SlotItem(state, k, frame, frame, 300.0 + 100 * k) for k in range(3)]
        model(torch.randn(3, 4, 1, *LATENT_HW, generator=g, dtype=torch.float64), items, grid)
    x = torch.randn(3, 4, 1, *LATENT_HW, generator=g, dtype=torch.float64)
    blob = state.to_bytes()
    batched = model(x, [SlotItem(state, k, 6, 6, 300.0 + 100 * k) for k in range(3)], grid)
    single = StreamDiTState.from_bytes(blob)
    outs = [model(x[k : k + 1], [SlotItem(single, k, 6, 6, 300.0 + 100 * k)], grid) for k in (2, 0, 1)]
    torch.testing.assert_close(batched, torch.cat([outs[1], outs[2], outs[0]]), atol=1e-12, rtol=0)
    for key, t in state.shard.state_dict().items():
        torch.testing.assert_close(t, single.shard.state_dict()[key], atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode", ["sdv2", "self_forcing"])
def test_two_streams_batched_equal_each_alone(full64, mode):
    cfg = _config(cache_mode=mode)
    together = _run(StreamBatchRunner([full64], cfg), {"a": 1, "b": 2}, 6)
    for s, seed in (("a", 1), ("b", 2)):
        alone = _run(StreamBatchRunner([full64], cfg), {s: seed}, 6)[s]
        _same(together[s], alone, exact=False)


def test_shard_move_mid_stream_is_bit_exact(full32):
    cfg = _config()
    want = _run(StreamBatchRunner(split_models(full32, [2]), cfg), {"a": 4}, CHUNKS)["a"]
    first = StreamBatchRunner(split_models(full32, [2]), cfg)
    got = _run(first, {"a": 4}, 5)["a"]
    # serialise every stage's state, restore into fresh stage objects, continue there
    blobs = [st.to_bytes() for st in first.states["a"]]
    moved = StreamBatchRunner(split_models(full32, [2]), cfg)
    moved.adopt(first.slots["a"], [StreamDiTState.from_bytes(b) for b in blobs])
    got += _run(moved, {"a": 4}, CHUNKS, start=5)["a"]
    _same(want, got, exact=True)


def test_split_off_blocks_to_the_next_stage_is_bit_exact(full32):
    """Rebalance [0,2)+[2,3) → [0,1)+[1,3) mid-stream: block 1's ring state travels with its KV."""
    cfg = _config()
    want = _run(StreamBatchRunner(split_models(full32, [2]), cfg), {"a": 4}, CHUNKS)["a"]
    first = StreamBatchRunner(split_models(full32, [2]), cfg)
    got = _run(first, {"a": 4}, 6)["a"]
    st0, st1 = first.states["a"]
    shipped = StreamDiTState.from_bytes(st0.split_blocks([1]).to_bytes())
    shipped.merge(st1)
    assert st0.shard.blocks == [0] and shipped.shard.blocks == [1, 2]
    rebalanced = StreamBatchRunner(split_models(full32, [1]), cfg)
    rebalanced.adopt(first.slots["a"], [st0, shipped])
    got += _run(rebalanced, {"a": 4}, CHUNKS, start=6)["a"]
    _same(want, got, exact=True)


def test_shard_bytes_round_trip_and_errors():
    shard = KVCacheShard(
        [3, 4], 2, window=4, sink=1, tokens_per_frame=6, num_heads=2, head_dim=16, adaptive_threshold=0.2
    )
    for t in shard.state_dict().values():
        t.copy_(torch.randint(-1, 5, t.shape) if t.dtype == torch.long else torch.randn(t.shape))
    shard.frames_end = [7, 6]
    back = KVCacheShard.from_bytes(shard.to_bytes())
    assert back.meta() == shard.meta()
    assert all(torch.equal(t, back.state_dict()[k]) for k, t in shard.state_dict().items())
    with pytest.raises(ValueError, match="not in this shard"):
        shard.split_blocks([9])
    part = shard.split_blocks([4])
    with pytest.raises(ValueError, match="in both shards"):
        part.merge(KVCacheShard.from_bytes(part.to_bytes()))
    with pytest.raises(ValueError, match="neither extend"):
        shard.plan([0], [9], 1)  # a gap in slot 0's frames
    with pytest.raises(ValueError, match="once per forward"):
        shard.plan([0, 0], [7, 7], 1)


def test_self_forcing_clean_pass_rewrites_every_slot():
    """After a chunk finishes, every slot that holds its frame holds the same (clean) K/V for it."""
    model = random_model(num_layers=2, seed=9)
    runner = StreamBatchRunner(
        [model], _config(steps=3, kv_window=5, cache_mode="self_forcing", adaptive_threshold=None)
    )
    _run(runner, {"a": 3}, 6)
    shard = runner.states["a"][0].shard
    s = shard.tokens_per_frame
    for b in shard.blocks:
        pos = shard.frame_pos[b]
        finished = 5 - 2  # chunk 5 entered last; chunk 3 (latent frame 4) finished in the last forward
        frame = runner.slots["a"].clock.latent_start(finished)
        rows = [(k, int((pos[k] == frame).nonzero()[0])) for k in range(shard.num_slots) if (pos[k] == frame).any()]
        assert len(rows) >= 2
        ref_k = shard.k[b][rows[0][0], rows[0][1] * s : (rows[0][1] + 1) * s]
        for k, j in rows[1:]:
            assert torch.equal(shard.k[b][k, j * s : (j + 1) * s], ref_k)


def test_t2v_stream_with_multi_frame_chunks():
    """T2V: no input latents, 2 latent frames per chunk (the clock's t2v mode), Self-Forcing cache mode."""
    model = random_model(num_layers=2, seed=1, dtype=torch.float32)
    cfg = _config(cache_mode="self_forcing", kv_window=6)
    runner = StreamBatchRunner([model], cfg)
    runner.open_stream("t", 3, context(3, torch.float32), LATENT_HW, clock=cfg.clock(t2v_frames=2))
    first = runner.prepare("t", None)
    assert first.shape == (1, 4, 2, *LATENT_HW)
    outs = [runner.step({"t": None})["t"] for _ in range(4)]
    assert outs[0] is None and all(o is not None and o.shape == first.shape for o in outs[1:])
    assert runner.states["t"][0].shard.frames_end == [10, 8]


def test_prompt_change_applies_to_chunks_entering_after_it(full32):
    """A new prompt applies to the chunks entering after it; a chunk in flight finishes under the prompt it entered
    with (as every item does in the distributed ring). A view no chunk uses is rewritten in place (captured CUDA
    graphs stay valid); a second one sharing the KV shard exists only while both are in use."""
    cfg = _config()
    a = StreamBatchRunner([full32], cfg)
    b = StreamBatchRunner([full32], cfg)
    out_a = _run(a, {"s": 2}, 5)["s"]
    out_b = _run(b, {"s": 2}, 3)["s"]
    old = b.states["s"]
    old_ids = old[0].cross_ids()
    b.set_prompt("s", context(99, torch.float32), version=1)  # chunk 2 is in slot 1
    new = b.states["s"]
    assert new is not old and new[0].shard is old[0].shard and new[0].prompt_version == 1
    out_b += _run(b, {"s": 2}, 5, start=3)["s"]
    torch.testing.assert_close(out_b[3], out_a[3], atol=1e-6, rtol=0)  # chunk 2: entered before the change
    assert not torch.allclose(out_a[4], out_b[4], atol=1e-3)  # chunk 3: the new prompt
    b.set_prompt("s", context(98, torch.float32), version=2)  # chunk 2 has finished: its view is free
    assert b.states["s"] is old and old[0].cross_ids() == old_ids and old[0].prompt_version == 2


def test_refused_batch_leaves_every_stream_untouched():
    model = random_model(num_layers=1, seed=2)
    a = model.new_state("a", 1, LATENT_HW, window=4, sink=1)
    b = model.new_state("b", 1, LATENT_HW, window=4, sink=1)
    for st in (a, b):
        model.set_prompt(st, context())
    grid = model.grid_of(1, *LATENT_HW)
    x = torch.randn(2, 4, 1, *LATENT_HW, dtype=torch.float64)
    with pytest.raises(ValueError, match="neither extend"):
        model(x, [SlotItem(a, 0, 0, 0, 500.0), SlotItem(b, 0, 3, 3, 500.0)], grid)  # b: a gap
    with pytest.raises(ValueError, match="first stage takes latents"):
        model(x[:1], [SlotItem(a, 0, 0, 0, 500.0), SlotItem(b, 0, 0, 0, 500.0)], grid)
    with pytest.raises(ValueError, match="contiguous"):
        interleaved = [SlotItem(a, 0, 0, 0, 1.0), SlotItem(b, 0, 0, 0, 1.0), SlotItem(a, 0, 0, 0, 1.0)]
        model(torch.cat([x, x[:1]]), interleaved, grid)
    assert a.shard.frames_end == [0] and b.shard.frames_end == [0]
    model(x, [SlotItem(a, 0, 0, 0, 500.0), SlotItem(b, 0, 0, 0, 500.0)], grid)
    assert a.shard.frames_end == [1] and b.shard.frames_end == [1]
