"""The one forward on CPU: every mode falls back to eager (said once), bit-identical to the model's own call."""

from __future__ import annotations

import logging

import pytest
import torch

from dit_stage.forward import CapturePolicy, Forward, make_forward
from dit_stage.state import SlotItem
from dit_stage.timing import BlockTimer

from .helpers import LATENT_HW, context, random_model


def _chunks(call, model, n: int = 4) -> list[torch.Tensor]:
    state = model.new_state("s", 2, LATENT_HW, window=4, sink=1, adaptive_threshold=0.3)
    model.set_prompt(state, context(3))
    g = torch.Generator().manual_seed(0)
    grid = model.grid_of(1, *LATENT_HW)
    outs = []
    for c in range(n):
        x = torch.randn(2, 4, 1, *LATENT_HW, generator=g, dtype=torch.float64)
        items = [SlotItem(state, k, c, c, 700.0 - 300 * k) for k in range(2)]
        outs.append(call(x, items, grid, noisy=x, sigmas=[0.7, 0.4]))
    return outs


def test_auto_on_cpu_is_eager_bit_identical_and_says_so_once(caplog):
    want_model, got_model = random_model(2, seed=7), random_model(2, seed=7)
    want = _chunks(want_model, want_model)
    with caplog.at_level(logging.INFO, logger="dit_stage.forward"):
        fwd = make_forward(got_model, "auto")
        got = _chunks(fwd, got_model)
    assert fwd.mode == "eager" and fwd.requested == "auto"
    assert "_compiled" not in got_model.__dict__
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
    fallbacks = [r for r in caplog.records if r.name == "dit_stage.forward"]
    assert len(fallbacks) == 1 and "eagerly" in fallbacks[0].getMessage()


def test_eager_is_silent_and_follows_a_new_model(caplog):
    model = random_model(2)
    with caplog.at_level(logging.INFO, logger="dit_stage.forward"):
        fwd = Forward(model)
    assert not caplog.records
    assert fwd.follow(model) is fwd
    other = random_model(2, seed=1)
    moved = make_forward(model, "graph").follow(other)
    assert moved.model is other and moved.requested == "graph" and moved.mode == "eager"


def test_invalid_mode_is_rejected():
    with pytest.raises(ValueError, match="forward mode 'fast'"):
        make_forward(random_model(1), "fast")  # type: ignore[arg-type]


def test_eager_timer_marks_every_block_and_graph_marks_spread_over_blocks():
    model = random_model(3)
    timer = BlockTimer(model.device)
    _chunks(lambda *a, **kw: Forward(model)(*a, **kw, timer=timer), model, n=1)
    assert sorted(timer.collect().blocks) == model.block_ids
    spread = BlockTimer(model.device)
    spread.mark_blocks(model.block_ids)
    times = spread.collect()
    assert sorted(times.blocks) == model.block_ids and times.extra == 0.0
    assert len(set(times.blocks.values())) == 1


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_signature_is_captured_on_its_second_sighting_and_not_soon_after_a_failure():
    """A failed capture is not retried for ``retry_s``, then is (pooled state storage outlives streams, so a
    signature whose capture failed once, out of memory say, recurs)."""
    clock = _Clock()
    policy = CapturePolicy(after=2, clock=clock, retry_s=120.0)
    assert [policy.sighted(("a",)) for _ in range(2)] == [False, True]
    assert policy.sighted(("b",)) is False  # a composition seen once runs eagerly
    policy.failed(("c",))
    assert [policy.sighted(("c",)) for _ in range(3)] == [False, False, False]
    clock.t += 119.0
    assert policy.sighted(("c",)) is False
    clock.t += 2.0
    assert [policy.sighted(("c",)) for _ in range(2)] == [False, True]


def test_captures_past_the_time_budget_wait_until_the_window_has_room():
    """Streams batching in ever new compositions must not stall every stream with capture after capture: past 10 %
    of the last 20 s spent capturing, a new signature runs eagerly (counted ``deferred``) until old captures age
    out of the window. Negative control: without a budget every second sighting captures."""
    clock = _Clock()
    policy = CapturePolicy(after=2, budget=0.1, window_s=20.0, clock=clock)
    unlimited = CapturePolicy(after=2, budget=float("inf"), clock=clock)
    captured, free = [], []
    for i in range(6):  # six new compositions, each seen twice, each capture taking 0.8 s
        for p, out in ((policy, captured), (unlimited, free)):
            p.sighted((i,))
            if p.sighted((i,)):
                p.spent(0.8)
                out.append(i)
        clock.t += 0.5
    assert captured == [0, 1, 2] and free == list(range(6))  # 3 × 0.8 s ≥ 2 s: the budget is spent
    assert policy.deferred == 3
    clock.t += 20.0
    assert policy.sighted((3,))  # its earlier sightings counted: it captures once the window has room


def test_a_call_that_compiles_for_new_input_shapes_is_a_warm_up():
    """In compile mode the first call with new input shapes compiles inside it (seconds on a GPU): ``warmups``
    counts it, so the stage leaves its time out of the latency model, as it does a capture's. The batch size counts
    only as one or more (the pieces compile ``dynamic``). Bookkeeping only: the mode is set after construction and
    captures are never due, so the calls run eagerly on CPU. Negative control: eager mode counts no warm-up for the
    same calls."""
    model = random_model(2)
    grid = model.grid_of(1, *LATENT_HW)

    def call(fwd: Forward, n: int) -> int:
        state = model.new_state(f"s{n}", n, LATENT_HW, window=4, sink=1)
        model.set_prompt(state, context(3))
        x = torch.zeros(n, 4, 1, *LATENT_HW, dtype=torch.float64)
        fwd(x, [SlotItem(state, k, 0, 0, 500.0) for k in range(n)], grid, noisy=x, sigmas=[0.5] * n)
        return fwd.warmups

    warmups = {}
    for mode in ("compile", "eager"):
        fwd = Forward(model, policy=CapturePolicy(after=10**9))
        fwd.mode = mode  # type: ignore[assignment]
        warmups[mode] = [call(fwd, n) for n in (2, 2, 2, 1, 3)]  # compiled for 2, for 1; 3 is as 2
    assert warmups == {"compile": [1, 1, 1, 2, 2], "eager": [0, 0, 0, 0, 0]}
