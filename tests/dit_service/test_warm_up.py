"""The stage's throwaway stream before it serves (``dit_stage/warm_up.py``): the first real stream runs on its
storage and batch signatures (on CUDA: its compiled pieces and captured graphs), and is otherwise untouched by it."""

from __future__ import annotations

import torch

from dit_stage import timed
from dit_stage.epochs import StageEpochs
from dit_stage.forward import CapturePolicy, Forward
from dit_stage.state_pool import StatePool
from dit_stage.warm_up import warm_up_stage
from services.config import Settings

from .helpers import CONFIG, NOISE_SCALE, chunk_message, full_model, latents, prompt, run_ring, workers
from .test_state_pool import CHUNKS, _ring, _SignatureForward


def test_a_warmed_up_stage_serves_its_first_stream_on_the_warm_up_streams_graphs():
    """A stage holding every block runs a throwaway stream before it serves: afterwards it holds no stream, no
    measurement and no drop, and its first real stream (chunks arriving one by one, as live) equals the same
    stream on a stage without a warm-up bit for bit, on the warm-up stream's storage, with batch signatures the
    warm-up already ran (so on CUDA, graphs it captured). Control: a stage of a two-stage ring cannot run a stream
    alone and does nothing."""
    assert not warm_up_stage(_ring(pooled=True)[0], (4, 6), CONFIG.steps, CONFIG.clock(), NOISE_SCALE)

    def live(warmed: bool):
        (worker,) = ring = workers(1)
        worker.storage = StatePool()
        worker.forward = _SignatureForward(worker.model)
        if warmed:
            assert warm_up_stage(worker, (4, 6), CONFIG.steps, CONFIG.clock(), NOISE_SCALE, chunks=CHUNKS)
            assert not worker.streams and not worker.prompts and not worker.dropped and not worker.latency.fits()
        warm = set(worker.forward.signatures)
        worker.forward.signatures.clear()
        worker.add_prompt("b", 0, prompt(7))
        got = []
        for c, z in enumerate(latents(2, CHUNKS, (4, 6))):
            assert worker.add_chunk(chunk_message("b", c, z, seed=7))
            got += [g.latent for g in run_ring(ring)]
        return got, worker, warm

    want, _, _ = live(warmed=False)
    got, worker, warm = live(warmed=True)
    assert len(got) == CHUNKS and all(torch.equal(w, g) for w, g in zip(want, got, strict=True))
    assert worker.storage.reused == 1 and set(worker.forward.signatures) <= warm


def test_the_stage_service_warms_up_a_whole_model_stage_whose_forward_has_one_off_costs(monkeypatch):
    """``StageEpochs`` builds the worker it will serve with and runs the warm-up stream at the default stream size
    and steps when its forward is not eager (on CUDA); the stage then serves with that worker. Here a graph-mode
    forward whose captures are never due stands in for CUDA. Controls: an eager forward (every forward on a CPU),
    or ``dit_stage.warm_up_chunks`` 0, runs no warm-up."""
    settings = Settings(stream={"width": 64, "height": 48, "steps": 2})
    epochs = StageEpochs(settings, "dit-0", None, lambda actions: None, None, None, {}, lambda epoch: None,
                         None)  # type: ignore[arg-type]
    model = full_model()
    assert epochs._warm_up(model) is None  # eager

    def graph_forward(model, mode, capture_budget):
        fwd = Forward(model, policy=CapturePolicy(after=10**9))
        fwd.mode = "graph"  # type: ignore[assignment]
        return fwd

    monkeypatch.setattr(timed, "make_forward", graph_forward)
    off = Settings(stream={"width": 64, "height": 48, "steps": 2}, dit_stage={"warm_up_chunks": 0})
    assert StageEpochs(off, "dit-0", None, lambda actions: None, None, None, {}, lambda epoch: None,
                       None)._warm_up(model) is None  # type: ignore[arg-type]
    warmed = epochs._warm_up(model)
    assert warmed is not None and warmed.model is model and not warmed.streams
    assert warmed.storage.enabled and warmed.storage.nbytes() > 0
    # the warm-up stream's storage is that of a default stream: 64 × 48 pixels (latents 6 × 8), 2 steps
    model.new_state("first", 2, (6, 8), warmed.window, warmed.sink, warmed.adaptive_threshold, pool=warmed.storage)
    assert warmed.storage.reused == 1
