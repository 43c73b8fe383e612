"""The timed stand-in stage: the real model's outputs, the modelled time, the modelled per-block report."""

from __future__ import annotations

import time

import torch
from dit_service.helpers import CONFIG, chunk_message, latents, prompt, run_ring, stage_models

from dit_stage.micro_step import MicroStep, StageOutput, SwitchStep
from dit_stage.timed import TimedStageWorker, make_stage_worker
from dit_stage.worker import StageWorker
from services.config import DitStageSettings


def _ring(timed: bool) -> list[StageWorker]:
    opts = {"window": CONFIG.kv_window, "sink": CONFIG.sink, "adaptive_threshold": CONFIG.adaptive_threshold,
            "max_queued_chunks": 64}
    if not timed:
        return [StageWorker(m, **opts) for m in stage_models(3)]
    return [TimedStageWorker(m, block_ms=4.0, item_ms=1.0, slowdown=2.0 if i == 1 else 1.0, **opts)
            for i, m in enumerate(stage_models(3))]


def _run(ring: list[StageWorker]) -> list:
    zs = latents(5, 4, (4, 6))
    ring[0].add_prompt("s", 0, prompt(1))
    for c, z in enumerate(zs):
        ring[0].add_chunk(chunk_message("s", c, z, seed=3))
    return run_ring(ring)


def _recording(worker: StageWorker) -> list[float]:
    """Mean modelled ms per block of each micro-step ``worker`` runs (what its StageStats report)."""
    seen: list[float] = []
    compute = worker.compute

    def recorded(step: MicroStep | SwitchStep) -> StageOutput:
        out = compute(step)
        if out.times is not None and out.times.blocks:
            seen.append(1000 * sum(out.times.blocks.values()) / len(out.times.blocks))
        return out

    worker.compute = recorded  # type: ignore[method-assign]
    return seen


def test_timed_stages_compute_what_normal_stages_compute_and_take_the_modelled_time() -> None:
    want = _run(_ring(False))
    ring = _ring(True)
    seen = [_recording(w) for w in ring]
    t0 = time.perf_counter()
    got = _run(ring)
    elapsed = time.perf_counter() - t0
    assert [c.seq for c in got] == [c.seq for c in want] and len(got) == 4
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.latent, w.latent, rtol=0, atol=0)
    floor = sum(w.micro_steps * w.modelled_block_ms(1) * w.num_blocks for w in ring) / 1000
    reports = [sum(s) / len(s) for s in seen]
    # every micro-step runs 1 or 2 items: per block 4 + 1·items ms, the middle stage twice that
    assert 5.0 <= reports[0] <= 6.0 and 10.0 <= reports[1] <= 12.0 and 5.0 <= reports[2] <= 6.0
    assert floor > 0 and elapsed >= floor  # at least every micro-step's modelled time, slept for real


def test_the_config_picks_the_worker() -> None:
    model = stage_models(1)[0]
    assert type(make_stage_worker(DitStageSettings(), model)) is StageWorker
    timed = make_stage_worker(DitStageSettings(timed_block_ms=3.0, slowdown=1.5), model)
    assert isinstance(timed, TimedStageWorker) and timed.modelled_block_ms(2) == 4.5
