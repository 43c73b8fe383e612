"""GPU-only checks (skipped without CUDA) of the one ``Forward``: graph replay equals eager, compiled pieces stay
close, bf16 stays close to fp32, per-block CUDA-event timing accounts for the forward, and the stage worker's
default ``auto`` forward equals eager.

The functions take no fixtures so they can also be run directly on a lent GPU machine without pytest.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dit_stage.forward import Forward, make_forward
from dit_stage.state import SlotItem
from dit_stage.timing import BlockTimer

from .helpers import LATENT_HW, context, random_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _steps(
    call, model, seed: int, chunks: int = 9, slots: int = 3, adaptive: float | None = 0.97
) -> tuple[list[torch.Tensor], object]:
    state = model.new_state("s", slots, LATENT_HW, window=5, sink=2, adaptive_threshold=adaptive)
    # draw in fp32, then cast: torch versions differ in what randn draws directly in bf16
    model.set_prompt(state, context(dtype=torch.float32).to(model.device, model.dtype))
    g = torch.Generator().manual_seed(seed)
    grid = model.grid_of(1, *LATENT_HW)
    outs = []
    for c in range(chunks):
        ks = [k for k in range(slots) if c - k >= 0]  # warm-up: slots fill one by one, like a stream-batch
        x = torch.randn(len(ks), 4, 1, *LATENT_HW, generator=g).to(model.device, model.dtype)
        items = [SlotItem(state, k, c - k, c - k, 700.0 - 200 * k) for k in ks]
        outs.append(call(x, items, grid, noisy=x, sigmas=[0.7 - 0.2 * k for k in ks]))
    return outs, state


def test_cuda_graph_replay_equals_eager():
    eager = random_model(num_layers=2, seed=3, dtype=torch.float32).cuda()
    want, want_state = _steps(eager, eager, 0)
    graphed = make_forward(eager, "graph")
    got, got_state = _steps(graphed, eager, 0)
    assert graphed.mode == "graph" and len(graphed._graphs) > 0
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for key, t in want_state.shard.state_dict().items():
        torch.testing.assert_close(t, got_state.shard.state_dict()[key], atol=1e-5, rtol=0)


def test_a_signature_is_captured_the_second_time_it_is_seen():
    """A batch seen once (streams meeting in one micro-step by chance) runs eagerly; the second sighting captures,
    the third replays."""
    model = random_model(num_layers=2, seed=3, dtype=torch.float32).cuda()
    fwd = make_forward(model, "graph")
    state = model.new_state("s", 1, LATENT_HW, window=5, sink=2, adaptive_threshold=None)
    model.set_prompt(state, context(dtype=torch.float32).to(model.device, model.dtype))
    grid = model.grid_of(1, *LATENT_HW)
    x = torch.randn(1, 4, 1, *LATENT_HW).cuda()
    captures = []
    for _ in range(3):  # the same frame each time: a re-run of the slot's latest chunk, one signature
        fwd(x, [SlotItem(state, 0, 0, 0, 500.0)], grid, noisy=x, sigmas=[0.5])
        captures.append(fwd.captures)
    assert captures == [0, 1, 1]


def test_capture_survives_cuda_work_on_another_thread():
    """The stage service captures in a worker thread while its event loop pins and copies arriving chunks: with
    global capture errors such a copy invalidated the capture (seen on the H200)."""
    model = random_model(num_layers=2, seed=3, dtype=torch.float32).cuda()
    fwd = make_forward(model, "graph")
    stop = threading.Event()

    def arriving_chunks() -> None:
        while not stop.is_set():
            torch.randn(4, 64).pin_memory().to("cuda", non_blocking=True)

    other = threading.Thread(target=arriving_chunks)
    other.start()
    try:
        _steps(fwd, model, 0)
    finally:
        stop.set()
        other.join()
    assert fwd.captures > 0 and not fwd.policy._failed


@pytest.mark.slow  # minutes of torch.compile: bench/gpu-suite.sh runs it in its opt-in compile_tests step
def test_compiled_pieces_match_eager():
    eager = random_model(num_layers=2, seed=3, dtype=torch.float32).cuda()
    want, _ = _steps(eager, eager, 0, adaptive=None)
    compiled = random_model(num_layers=2, seed=3, dtype=torch.float32).cuda()
    fwd = make_forward(compiled, "auto")
    assert fwd.mode == "compile" and "_compiled" in compiled.__dict__
    got, _ = _steps(fwd, compiled, 0, adaptive=None)
    for a, b in zip(want, got, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_bf16_close_to_fp32():
    """Adaptive sinks off: bf16 noise can flip a near-threshold sink decision (never test cache logic in bf16)."""
    fp32 = random_model(num_layers=2, seed=4, dtype=torch.float32).cuda()
    bf16 = random_model(num_layers=2, seed=4, dtype=torch.float32).cuda().to(torch.bfloat16)
    want, _ = _steps(fp32, fp32, 1, chunks=4, adaptive=None)
    got, _ = _steps(bf16, bf16, 1, chunks=4, adaptive=None)
    for a, b in zip(want, got, strict=True):
        cos = torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)
        assert cos > 0.999


def test_block_timer_accounts_for_the_forward_on_cuda():
    """CUDA events per block (what StageStats.block_ms reports): every owned block timed, and the parts account for
    the forward's synchronised wall time."""
    model = random_model(num_layers=4, seed=5, dtype=torch.float32).cuda()
    state = model.new_state("s", 1, LATENT_HW, window=5, sink=2, adaptive_threshold=None)
    model.set_prompt(state, context(dtype=torch.float32).to(model.device, model.dtype))
    grid = model.grid_of(1, *LATENT_HW)
    x = torch.randn(1, 4, 1, *LATENT_HW).cuda()
    for fwd in (Forward(model, "eager"), Forward(model, "graph")):  # graph: the replay's time spread over the blocks
        for c in range(3):  # warm-up (allocations, kernels, capture)
            fwd(x, [SlotItem(state, 0, c, c, 500.0)], grid, noisy=x, sigmas=[0.5])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        timer = BlockTimer(model.device)
        fwd(x, [SlotItem(state, 0, 3, 3, 500.0)], grid, noisy=x, sigmas=[0.5], timer=timer)
        times = timer.collect()
        wall = time.perf_counter() - t0
        assert sorted(times.blocks) == model.block_ids and all(t > 0 for t in times.blocks.values()), fwd.mode
        assert times.total <= wall * 1.05, (fwd.mode, times, wall)
        if fwd.mode == "eager":  # (a replay is so short that host work dominates the wall time)
            assert times.total >= 0.5 * wall, (times, wall)


def test_stage_worker_auto_forward_equals_eager():
    """The stage service's path: a two-stage ring of StageWorkers with the default ``auto`` forward (graph+compile
    on CUDA) finishes the same chunks as with eager forwards."""
    from dit_stage.worker import StageWorker
    from tests.dit_service.helpers import chunk_message, latents, prompt, run_ring, stage_models

    def ring(mode: str) -> list:
        models = [m.cuda() for m in stage_models(2)]
        workers = [StageWorker(m, window=5, sink=2, adaptive_threshold=None, max_queued_chunks=64,
                               forward=make_forward(m, mode)) for m in models]
        assert all(w.forward.mode == ("compile" if mode == "auto" else "eager") for w in workers)
        workers[0].add_prompt("a", 0, prompt(1))
        for c, z in enumerate(latents(3, 6, (4, 6))):
            assert workers[0].add_chunk(chunk_message("a", c, z, seed=11))
        return run_ring(workers)

    want, got = ring("eager"), ring("auto")
    assert [g.seq for g in got] == [w.seq for w in want] == list(range(6))
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g.latent, w.latent, atol=1e-4, rtol=0)


def test_a_stream_after_an_ended_one_replays_its_graphs():
    """Graph mode in a two-stage ring of StageWorkers: stream b, opened after stream a ended, runs on a's storage
    (``StatePool``, on by default on CUDA), so it captures fewer graphs than a did (a's replay for b: the same batch
    signatures), and its chunks equal an eager ring's for b alone."""
    from dit_stage.worker import StageWorker
    from tests.dit_service.helpers import chunk_message, latents, prompt, run_ring, stage_models

    def ring(mode: str) -> list:
        models = [m.cuda() for m in stage_models(2)]
        return [StageWorker(m, window=5, sink=2, adaptive_threshold=None, max_queued_chunks=64,
                            forward=make_forward(m, mode)) for m in models]

    def run(workers: list, sid: str, seed: int) -> list:
        workers[0].add_prompt(sid, 0, prompt(seed))
        for c, z in enumerate(latents(seed, 6, (4, 6))):
            assert workers[0].add_chunk(chunk_message(sid, c, z, seed=seed))
        return run_ring(workers)

    graphs = ring("graph")
    assert all(w.storage.enabled for w in graphs)
    run(graphs, "a", 3)
    after_a = [w.forward.warmups for w in graphs]
    for w in graphs:
        w.end_stream("a")
    got = run(graphs, "b", 7)
    want = run(ring("eager"), "b", 7)
    assert all(w.storage.reused == 1 for w in graphs)
    assert all(w.forward.warmups - a < a for w, a in zip(graphs, after_a, strict=True)), after_a
    assert [g.seq for g in got] == [w.seq for w in want] == list(range(6))
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g.latent, w.latent, atol=1e-4, rtol=0)


def test_a_warmed_up_stage_serves_its_first_stream_on_captured_graphs():
    """``warm_up_stage`` on a one-stage ring in graph mode: the first real stream (chunks one by one, as live)
    captures fewer graphs than the warm-up did and equals an eager stage's stream."""
    from dit_stage.warm_up import warm_up_stage
    from dit_stage.worker import StageWorker
    from tests.dit_service.helpers import CONFIG, NOISE_SCALE, chunk_message, latents, prompt, run_ring, stage_models

    def stage(mode: str) -> StageWorker:
        (model,) = [m.cuda() for m in stage_models(1)]
        return StageWorker(model, window=CONFIG.kv_window, sink=CONFIG.sink, adaptive_threshold=None,
                           max_queued_chunks=64, forward=make_forward(model, mode))

    def live(worker: StageWorker) -> list:
        worker.add_prompt("b", 0, prompt(7))
        out = []
        for c, z in enumerate(latents(2, 6, (4, 6))):
            assert worker.add_chunk(chunk_message("b", c, z, seed=7))
            out += run_ring([worker])
        return out

    warmed = stage("graph")
    assert warm_up_stage(warmed, (4, 6), CONFIG.steps, CONFIG.clock(), NOISE_SCALE)
    during_warm_up = warmed.forward.warmups
    got, want = live(warmed), live(stage("eager"))
    assert during_warm_up > 0 and warmed.forward.warmups - during_warm_up < during_warm_up
    assert [g.seq for g in got] == [w.seq for w in want] == list(range(6))
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g.latent, w.latent, atol=1e-4, rtol=0)
