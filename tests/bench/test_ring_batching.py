"""The timed batching benchmark (bench/ring_batching.py), scaled down: a ring of three timed stand-in stages
(real ``DitStageService`` objects over a real nats-server) serves two tight-SLO streams next to four loose ones
whose chunks arrive in bursts. The SLO batcher keeps the tight streams on time; greedy-by-capture-time (the negative
control) serves the older loose bursts first and makes tight chunks late."""

from __future__ import annotations

from bench.ring_batching import run_ring, scenario


async def test_the_slo_batcher_keeps_tight_streams_on_time_where_greedy_does_not(nats_settings):
    plans = scenario("mixed", mixed_fps=16.0, slo_ms=400.0, loose_slo_ms=3000.0)
    slo = await run_ring(nats_settings, "slo", plans, duration_s=3.0, warmup_s=0.5)
    greedy = await run_ring(nats_settings, "greedy", plans, duration_s=3.0, warmup_s=0.5)
    for res in (slo, greedy):
        assert {s["cls"] for s in res.streams} == {"tight", "loose"} and all(s["fed"] >= 6 for s in res.streams)
    tight = sum(s["fed"] for s in slo.by_cls("tight"))
    slo_missed = sum(s["missed"] for s in slo.by_cls("tight"))
    greedy_missed = sum(s["missed"] for s in greedy.by_cls("tight"))
    # 24 tight chunks in 3 s: a loaded 2-core CI machine stalls the one process for a few hundred ms now and then,
    # which makes a chunk late whatever the order (2 of 24 in one CI run; 0 of 80 in the 10 s bench, BENCHMARKS.md)
    assert slo_missed <= max(2, 0.01 * tight), slo.streams
    assert all(s["missed"] == 0 for s in slo.by_cls("loose")), slo.streams  # not at the loose streams' expense
    assert greedy_missed >= slo_missed + 3, greedy.streams  # negative control: oldest-first starves them
