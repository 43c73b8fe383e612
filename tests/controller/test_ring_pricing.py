"""Ring pricing from the fitted latency model (docs/scheduling.md, "Ring pricing"): a ring costs L(n)/n per item at
the batch n its streams reach, L the stages' fitted a + b·n (the batcher's ``LatencyModel``, reported in
``StageStats.latency_fits``), not the ms per item measured at today's small batches."""

from __future__ import annotations

import dataclasses

import pytest
from dit_service.helpers import CONFIG, chunk_message, latents, prompt, run_ring, stage_models

from dit_stage.batcher import LatencyModel
from dit_stage.micro_step import MicroStep
from dit_stage.telemetry import StageTelemetry
from dit_stage.worker import StageWorker
from proto import SLO, StageStats, StreamSpec, decode
from services.controller.costmodel import CostModel
from services.controller.policy import (
    PathCosts,
    StreamNeed,
    batch_reached,
    decide_admission,
    ring_item_ms,
    stream_need,
)
from services.controller.scaling import Demand, pool_demand, ring_work

A, B = 30.0, 3.0  # ms: the timed ring of bench/ring_batching.py


def _spec(i: int, steps: int = 2) -> StreamSpec:
    return StreamSpec(stream_id=f"s{i}", width=64, height=64, fps=16.0, steps=steps, prompt="p",
                      slo=SLO(target_fps=16.0, max_latency_ms=60000))


def test_the_price_is_the_fitted_micro_step_per_item_at_the_batch_the_streams_reach():
    needs = [stream_need(_spec(i)) for i in range(4)]  # 2 steps each: micro-steps of up to 8 items
    assert batch_reached(needs, 16) == 8 and batch_reached(needs, 5) == 5 and batch_reached([], 16) == 1
    one = [[(A, B, 100)]]  # one stage, one grid
    assert ring_item_ms(one, needs, 16) == pytest.approx((A + 8 * B) / 8)
    assert ring_item_ms(one, needs[:1], 16) == pytest.approx((A + 2 * B) / 2)  # one stream: 2 items at most
    assert ring_item_ms(one, needs * 3, 16) == pytest.approx((A + 16 * B) / 16)  # the cap
    # the slowest stage paces the ring
    assert ring_item_ms([[(A, B, 100)], [(2 * A, B, 100)]], needs, 16) == pytest.approx((2 * A + 8 * B) / 8)
    # two grids do not share a forward: a quarter of the items (2 of 8) batch among themselves at their own fit
    mix = [[(A, B, 300), (A, 4 * B, 100)]]
    assert ring_item_ms(mix, needs, 16) == pytest.approx(0.75 * (A + 6 * B) / 6 + 0.25 * (A + 4 * 2 * B) / 2)
    assert ring_item_ms([], needs, 16) is None  # no fit: the caller keeps the measured price


def test_the_batch_priced_at_keeps_the_streams_latency():
    """Four 4-step streams with a 400 ms SLO: their traversals may take half of it, 50 ms each, so the ring is
    priced at the largest batch whose traversal fits (30 + 3·6 = 48 ms: 6 items), not the 16 their slots allow; a
    two-stage ring's traversal passes both stages (3 items: 2·(30 + 3·3) = 78 > 50, 2 items: 72 > 50, so 1)."""
    tight = [stream_need(_spec(i, steps=4).model_copy(update={"slo": SLO(target_fps=16.0, max_latency_ms=400)}))
             for i in range(4)]
    assert ring_item_ms([[(A, B, 100)]], tight, 16) == pytest.approx((A + 6 * B) / 6)
    assert ring_item_ms([[(A, B, 100)], [(A, B, 100)]], tight, 16) == pytest.approx(A + B)
    loose = [stream_need(_spec(i, steps=4)) for i in range(4)]  # 60 s SLO: the slots bound it
    assert ring_item_ms([[(A, B, 100)]], loose, 16) == pytest.approx((A + 16 * B) / 16)


def test_fitted_pricing_admits_what_the_ring_batches_and_measured_pricing_refuses():
    """Measured at one stream's batch of 2 items, a ring looks like (A + 2B)/2 = 18 ms per item: 0.9 · 1000 / 18 =
    50 items/s, room for 6 streams of 8 items/s. Priced at the batch eight or more such streams reach (the cap of
    16: L(16)/16 = 4.875 ms per item, 185 items/s at 90 %) it has room for 23."""
    measured = (A + 2 * B) / 2
    admitted: dict[str, StreamNeed] = {}
    for i in range(40):
        spec = _spec(i)
        price = ring_item_ms([[(A, B, 100)]], [*admitted.values(), stream_need(spec)], 16)
        if not decide_admission(spec, admitted, price, headroom=0.9, prior_streams=4).admit:
            break
        admitted[spec.stream_id] = stream_need(spec)
    by_fit = len(admitted)
    by_measure = sum(1 for i in range(1, 41) if decide_admission(
        _spec(i), {f"x{k}": stream_need(_spec(k)) for k in range(i - 1)}, measured, headroom=0.9,
        prior_streams=4).admit)
    assert by_measure == 6
    assert by_fit == 23
    # the autoscaler's demand uses the same price: 23 streams are 0.9 of a ring, not 3.3
    assert Demand(ring_item_ms([[(A, B, 100)]], list(admitted.values()), 16), PathCosts(), 4).of(
        "rings", list(admitted.values())) == pytest.approx(23 * 8 * (A + 16 * B) / 16 / 1000)


def test_the_autoscaler_prices_each_ring_at_its_own_streams():
    """With many rings each runs the batch its own streams reach, bounded by its own tightest stream. One price over
    every stream (the batch of their sum, bounded by the tightest of all) would bill the loose ring as if it
    held the tight streams (batches of 4): here 0.84 rings of work are billed 1.08. A ring holding streams with
    no price yet: not priced."""
    fits = [[(40.0, 5.0, 100)]]
    tight = [StreamNeed(items_per_s=16.0, steps=4, slo_ms=500.0)] * 2
    loose = [StreamNeed(items_per_s=4.0, steps=1, slo_ms=2000.0)] * 10
    placed = ring_work([(tight, ring_item_ms(fits, tight, 16)), (loose, ring_item_ms(fits, loose, 16)), ([], None)])
    assert placed == pytest.approx((32 * (40 + 4 * 5) / 4 + 40 * (40 + 10 * 5) / 10) / 1000)  # 0.48 + 0.36
    pooled = Demand(ring_item_ms(fits, tight + loose, 16), PathCosts(), 4)
    assert pool_demand(pooled, tight + loose, [])["rings"][0] == pytest.approx(72 * (40 + 4 * 5) / 4 / 1000)
    as_placed = dataclasses.replace(pooled, rings_placed=placed)
    assert pool_demand(as_placed, tight + loose, tight)["rings"] == pytest.approx((placed, 32 * 15 / 1000))
    assert ring_work([(tight, None)]) is None


def test_a_stage_reports_its_fit_and_the_controller_keeps_it():
    """Every stage's ``LatencyModel`` learns from its own micro-steps (not only the first stage's); its StageStats
    carry the fit in ms (most measured grid first) and the controller's cost model keeps it per stage."""
    opts = {"window": CONFIG.kv_window, "sink": CONFIG.sink, "adaptive_threshold": CONFIG.adaptive_threshold,
            "max_queued_chunks": 64}
    ring = [StageWorker(m, **opts) for m in stage_models(3)]
    ring[0].add_prompt("a", 0, prompt(1))
    for c, z in enumerate(latents(1, 4, (4, 6))):
        ring[0].add_chunk(chunk_message("a", c, z, seed=1))
    for w in ring:  # what ComputeLoop does after each forward
        compute = w.compute

        def measured(step, w=w, compute=compute):
            out = compute(step)
            if isinstance(step, MicroStep):
                w.measured(step, out.compute_s)
            return out

        w.compute = measured  # type: ignore[method-assign]
    assert len(run_ring(ring)) == 4
    assert next(sig for sig, *_ in ring[2].latency.fits()) == (1, 4, 6)  # the last stage learnt the steady grid
    model = ring[1].latency = LatencyModel()  # known timings: 4 + 2·n ms
    for n in (1, 2, 4, 2):
        model.observe((1, 4, 6), n, (4.0 + 2.0 * n) / 1000)
    stats = StageTelemetry("t-dit-1").window(ring[1], 1.0)
    assert stats is not None and len(stats.latency_fits) == 1
    fit = stats.latency_fits[0]
    assert fit.grid == [1, 4, 6] and fit.a_ms == pytest.approx(4.0) and fit.b_ms == pytest.approx(2.0)
    assert fit.items == 9  # the items of its micro-steps: the share of this grid in the mix
    wire = decode(stats.encode(), StageStats)  # v3 on the bus
    assert wire.latency_fits == stats.latency_fits
    cost = CostModel(num_blocks=3)
    busy = stats.model_copy(update={"micro_steps": 3, "epoch": 0, "block_ms": [5.0]})
    for at in (0.0, 1.0):  # a stage's first window of an epoch is not used (it may straddle the change)
        cost.observe(busy, 0, at, first=False, last=False)
    assert cost.reports["t-dit-1"].fits == ((pytest.approx(4.0), pytest.approx(2.0), 9),)


def test_the_model_lists_its_fits_most_measured_first():
    model = LatencyModel()
    for n in (1, 2, 3):
        model.observe("big", n, 0.01 + 0.002 * n)
    for n in (1, 2, 3, 4):
        model.observe("small", n, 0.005 + 0.001 * n)
    model.observe("new", 1, 0.004)  # one measurement: no fit yet
    assert [(s, round(a, 6), round(b, 6), k) for s, a, b, k in model.fits()] == [("small", 0.005, 0.001, 10),
                                                                                ("big", 0.01, 0.002, 6)]
