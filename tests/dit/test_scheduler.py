"""Flow-matching scheduler, deterministic noise and the SDv2-compatible defaults."""

from __future__ import annotations

import torch

from pipeline.pipeline import PipelineConfig
from wan.scheduler import SDV2_STEPS, FlowMatchScheduler, draw_noise, first_timestep


def test_sigma_table_is_the_shifted_flow_matching_table():
    sched = FlowMatchScheduler(shift=8.0)
    base = torch.linspace(1.0, 0.0, 1001)[:-1]
    sigmas = 8.0 * base / (1 + 7.0 * base)
    assert sched.sigmas == sigmas.tolist()
    assert sched.timesteps == (sigmas * 1000).tolist()
    for t in (700.0, 500.0, 400.0, 200.0, 0.0, 999.0, 1000.0, 123.4):
        want = sigmas[(sigmas * 1000 - t).abs().argmin()].item()
        assert sched.sigma(t) == want
    # timesteps are σ·1000, so σ(t) ≈ t/1000 up to the table spacing
    assert abs(sched.sigma(700.0) - 0.7) < 2e-3
    assert sched.sigma(0.0) == sigmas[-1].item()  # the smallest table sigma, 8·0.001/1.007


def test_add_noise_per_row():
    sched = FlowMatchScheduler()
    x0, eps = torch.ones(2, 3), torch.zeros(2, 3)
    out = sched.add_noise(x0, eps, [700.0, 200.0])
    torch.testing.assert_close(out[:, 0], torch.tensor([1 - sched.sigma(700.0), 1 - sched.sigma(200.0)]))
    torch.testing.assert_close(sched.add_noise(x0, eps, 500.0), torch.full((2, 3), 1 - sched.sigma(500.0)))


def test_noise_is_a_pure_function_of_seed_chunk_step_purpose():
    a = draw_noise((2, 3), 7, 4, 1, "renoise")
    assert torch.equal(a, draw_noise((2, 3), 7, 4, 1, "renoise"))
    for other in (
        draw_noise((2, 3), 8, 4, 1, "renoise"),
        draw_noise((2, 3), 7, 5, 1, "renoise"),
        draw_noise((2, 3), 7, 4, 2, "renoise"),
        draw_noise((2, 3), 7, 4, 1, "input"),
    ):
        assert not torch.equal(a, other)
    assert draw_noise((2, 3), 7, 4, 1, "renoise", dtype=torch.float64).dtype == torch.float64


def test_sdv2_defaults():
    cfg = PipelineConfig()
    assert SDV2_STEPS == (700, 500, 400, 200)
    assert cfg.timesteps(0.8) == [700, 500] and cfg.timesteps(0.7) == [600, 500]
    assert PipelineConfig(steps=4).timesteps(None) == list(SDV2_STEPS)  # T2V: the list itself
    assert (cfg.noise_scale, cfg.ring.kv_window, cfg.ring.sink, cfg.ring.adaptive_threshold) == (0.8, 6, 3, 0.2)
    assert first_timestep(0.8) == 700 and first_timestep(0.7) == 600
    clock = cfg.clock(t2v=False)
    assert clock.t_refresh == 50 and clock.refresh_to == 5
    assert cfg.ring.cache_mode == "sdv2" and FlowMatchScheduler().shift == 8.0
